"""Ship a student (``kdfast export``): a Hugging Face directory, optionally int8 weight-only, with its card.

    result = export("student", "student-int8", quantize="int8-weight", temperature=1.31, data="eval-shards")
    AutoModelForCausalLM.from_pretrained("student-int8")      # torchao installed for a quantized export

What the directory holds: the model as ``save_pretrained`` writes it (safetensors, config.json,
generation_config.json), the source directory's tokenizer files, and a README.md model card. The
temperature (fitted by ``kdfast eval``) is recorded in config.json under ``"kdfast"``
(``{"temperature": T, "quantization": ..., "source": ...}``; ``model.config.kdfast`` after
loading) and in the card: divide the logits by T for calibrated probabilities.

Quantization: ``int8-weight`` is torchao's ``Int8WeightOnlyConfig`` applied through transformers'
``TorchAoConfig`` while loading (the Linear layers get int8 weights with one scale per output row;
embeddings and the output head stay float, as transformers leaves them by default), saved as
safetensors that ``from_pretrained`` reloads quantized. Why torchao: it is the PyTorch project's
quantization library and its int8 checkpoints round-trip through ``save_pretrained`` /
``from_pretrained``; optimum-quanto 0.2.7 quantizes on CPU too, but transformers refuses to save a
quanto-quantized model ("not serializable"). No int4: with torch 2.13 on CPU, none of torchao
0.18's int4 weight-only layouts runs (``plain`` needs the mslk kernels, ``plain_int32`` has no CPU
support, ``tile_packed_to_4d`` needs CUDA and bfloat16), and torchao's int4 ``IntxWeightOnlyConfig``
stores each 4-bit value in an int8, so it would not shrink the file. No GGUF: the ``gguf`` package
is llama.cpp's file writer; turning a Hugging Face model into GGUF (tensor renaming and the
per-architecture permutations, tokenizer metadata) is llama.cpp's ``convert_hf_to_gguf.py``, which
is not a library on PyPI; run it on a float export.

Safety: everything is written to a hidden sibling directory ``.<out>.partial-<pid>``, reloaded
(``from_pretrained`` must find every weight), measured, and only then renamed to ``out_dir``; on
any error the partial directory is removed, so a directory named ``out_dir`` is always a finished
export. With ``data`` (teacher shards of the evaluation), the card reports the float model's and
the export's mean cross-entropy on the learned tokens and their relative change.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

__all__ = ["export", "QUANTIZATIONS", "add_export_arguments", "run_export"]

QUANTIZATIONS = ("none", "int8-weight")


def export(model, out_dir, *, quantize: str = "none", temperature: float | None = None, data=None,
           device=None, batch_size: int = 8, progress: bool = True) -> dict:
    """Export the causal LM directory ``model`` to ``out_dir`` (new or empty); see the module docstring.
    Returns what the card says: sizes, temperature, and with ``data`` the cross-entropies."""
    from kdfast._backend import resolve_device
    from kdfast.evaluate import _open_data, _vocab_size, causal_lm_config, load_causal_lm, weights_bytes

    model, out_dir = Path(model), Path(out_dir)
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    if temperature is not None and not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature!r}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"out_dir {out_dir} exists and is not an empty directory; choose a new one")
    config = causal_lm_config(model, what="model")
    quantization_config = _quantization_config(quantize)
    dataset = None
    if data is not None:
        dataset = _open_data({"data": Path(data)}, {"model": _vocab_size(config, "model")}, None, None)["data"]
    run_device = resolve_device(device)

    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write(model, partial, quantization_config, quantize, temperature, progress)
        _check_reloads(partial, progress)
        result = {"source": str(model), "quantization": quantize, "temperature": temperature,
                  "source_bytes": weights_bytes(model), "export_bytes": weights_bytes(partial)}
        if dataset is not None:
            result["data"] = str(data)
            result["ce_source"] = _mean_ce(load_causal_lm(model, device=run_device, progress=progress), dataset,
                                           run_device, batch_size, progress)
            result["ce_export"] = _mean_ce(load_causal_lm(partial, device=run_device, progress=progress), dataset,
                                           run_device, batch_size, progress)
            result["ce_change"] = result["ce_export"] / result["ce_source"] - 1
        (partial / "README.md").write_text(model_card(result, config.model_type))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {**result, "path": str(out_dir)}


def _quantization_config(quantize: str):
    """transformers' TorchAoConfig for ``quantize`` (None for "none"); ValueError without torchao."""
    if quantize == "none":
        return None
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError:
        raise ValueError(f"quantize={quantize!r} needs torchao (pip install torchao)") from None
    from transformers import TorchAoConfig

    return TorchAoConfig(quant_type=Int8WeightOnlyConfig())


def _write(source: Path, directory: Path, quantization_config, quantize: str, temperature, progress: bool) -> None:
    """Load ``source`` (quantizing while loading), record the kdfast metadata, save with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdfast.capture import _TOKENIZER_FILES, transformers_progress_bars

    with transformers_progress_bars(progress):
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch.float32,
                                                     quantization_config=quantization_config)
        model.config.kdfast = {"temperature": temperature, "quantization": quantize, "source": source.resolve().name}
        model.save_pretrained(directory, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)


def _check_reloads(directory: Path, progress: bool) -> None:
    """The written directory loads with every weight present (a quantized checkpoint that silently
    reinitializes a tensor must not pass as an export)."""
    from transformers import AutoModelForCausalLM

    from kdfast.capture import transformers_progress_bars

    with transformers_progress_bars(progress):
        _, info = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, output_loading_info=True)
    missing = [*info.get("missing_keys", ()), *info.get("mismatched_keys", ())]
    if missing:
        raise ValueError(f"the export does not reload: {len(missing)} weights missing or mismatched "
                         f"({sorted(map(str, missing))[:5]})")


def _mean_ce(model, dataset, device, batch_size: int, progress: bool) -> float:
    """Mean cross-entropy on the learned tokens of every sequence, through kdfast.evaluate's scorer."""
    from kdfast.evaluate import _Scorer, _Totals

    totals = _Totals()
    _Scorer(model, None, device, batch_size, progress, "export").run(
        dataset, range(len(dataset)), totals, temperature=1.0, compare=False, heldout=False)
    return totals.ce / totals.tokens


def model_card(result: dict, model_type: str) -> str:
    """README.md of the export: how to load it, the temperature, the quantization and what it cost."""
    temperature = result["temperature"]
    lines = ["---", "library_name: transformers", "tags:", "- kdfast", "- knowledge-distillation", "---", "",
             f"# {result['source'].rstrip('/').split('/')[-1]} (kdfast export)", "",
             f"A distilled {model_type} causal language model exported by `kdfast export`.", "", "```python",
             "from transformers import AutoModelForCausalLM", "", 'model = AutoModelForCausalLM.from_pretrained(".")',
             "```", ""]
    if result["quantization"] == "int8-weight":
        lines += ["Weights: int8 weight-only (torchao `Int8WeightOnlyConfig`: Linear layers int8 with one scale "
                  "per output row; embeddings and output head float). Loading needs `pip install torchao`.", ""]
    else:
        lines += ["Weights: float32, as trained.", ""]
    if temperature is None:
        lines += ["Temperature: none recorded (`kdfast eval` fits one).", ""]
    else:
        lines += [f"Temperature: **T = {temperature:.4f}**, fitted by `kdfast eval` on held-out data; divide the "
                  "logits by T for calibrated probabilities (`model.config.kdfast['temperature']`).", ""]
    lines += [f"Weights on disk: {result['export_bytes']:,} bytes (source: {result['source_bytes']:,} bytes).", ""]
    if "ce_source" in result:
        lines += [f"Cross-entropy on the learned tokens of `{result['data']}`: source {result['ce_source']:.4f}, "
                  f"this export {result['ce_export']:.4f} nats/token ({100 * result['ce_change']:+.2f}%).", ""]
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------------


def add_export_arguments(parser) -> None:
    """The ``kdfast export`` options (imports no torch)."""
    parser.add_argument("--model", required=True, type=Path, help="Hugging Face causal-LM directory to export")
    parser.add_argument("--out", required=True, type=Path, help="new (or empty) output directory")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                        help="weight-only quantization through torchao (default none)")
    parser.add_argument("--temperature", type=float,
                        help="calibration temperature to record (the fitted T of `kdfast eval`'s report)")
    parser.add_argument("--data", type=Path,
                        help="teacher shard directory on which the card reports the CE of source and export")
    parser.add_argument("--device", default="cpu", help="device of the CE measurement (default cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_export(args) -> int:
    """``kdfast export``: write the directory, print what the card says."""
    result = export(args.model, args.out, quantize=args.quantize, temperature=args.temperature, data=args.data,
                    device=args.device, batch_size=args.batch_size, progress=not args.no_progress)
    print(json.dumps(result, indent=1))
    return 0
