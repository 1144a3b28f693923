"""Evaluate distilled students next to their teacher (``kdfast eval``): quality, agreement, calibration, size, speed.

    report = evaluate({"teacher": t_dir, "student": s_dir}, "eval-shards", ood=["ood-shards"],
                      out_dir="eval-out")            # report.md, report.json, reliability.png, quality_vs_size.png

For every model on every data set (teacher shard directories, read through ``ShardDataset``; a
position whose label is -100 is not learned and not scored), over the P learned positions with
student logits z [P, V] and labels y [P]:

    ce          mean over positions of logsumexp(z) - z[y]  (nats/token); perplexity = exp(ce)
    accuracy    share of positions with argmax z == y
    agreement   share of positions with argmax z == the teacher's top-1: slot 0 of the shards' targets
                (the most likely id of top-k captures, the most frequent sample of sampled ones), or the
                argmax of a live teacher's logits (``teacher=``)
    kl          mean KL(teacher || student), computed by ``kdfast.kd_loss`` (one implementation of the
                divergence): from the shards, the top-k log-probs plus the tail bucket (kind
                "logprobs") or the sampled probabilities ("probs"), the student at the capture
                temperature; from a live teacher, the full-vocabulary KL at T = 1
    ece         expected calibration error of the top-1 probability c = max softmax(z) over 15
                equal-width bins: sum_b |sum_{i in b} (correct_i - c_i)| / P

Temperature scaling: one temperature T per model is fitted on a calibration split of the first
data set (``calibration_fraction`` of its sequences, a seeded permutation: ``calibration_split``) by
minimizing the mean NLL of softmax(z / T), a convex problem in 1 / T solved by safeguarded Newton
steps (``fit_temperature``) on the calibration positions' float32 logits (at most 256 MiB of them,
``_CALIBRATION_BYTES``, are kept; ``calibration_tokens`` in the report says how many positions).
``ece_heldout`` and ``ece_heldout_scaled`` are the ECE before and after dividing by T on every
position not used for fitting (the other sequences of the first data set, all of the others).
Calibration sequences come first in the pass, so every sequence goes through the model once.

Size and speed: unique parameters (tied embeddings once), bytes of the weight files, and on the
evaluation device: tokens/s of batched scoring (forward passes of the evaluation itself) and of
greedy generation (batch 1, ``generate_tokens`` new tokens after a 16-token prompt, the fastest of
``_GENERATION_REPEATS`` runs after a warm-up). Batches hold up to ``batch_size`` sequences of one length.

``add_eval_arguments`` / ``run_eval`` are the ``kdfast eval`` command (the parser part imports no
torch). The two plots are ``kdfast.report.plot_reliability`` and ``plot_quality_vs_size``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

__all__ = ["evaluate", "ECE_BINS", "expected_calibration_error", "fit_temperature", "calibration_split",
           "token_statistics", "causal_lm_config", "load_causal_lm", "count_parameters", "weights_bytes",
           "write_report", "format_report", "add_eval_arguments", "run_eval"]

ECE_BINS = 15
_CALIBRATION_BYTES = 1 << 28  # float32 calibration logits kept for fitting T (256 MiB)
_CHUNK_ELEMENTS = 1 << 22  # float64 elements per chunk of row statistics
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_TEMPERATURE_RANGE = (0.01, 100.0)
_GENERATION_REPEATS = 5


# --- models ----------------------------------------------------------------------------------------


def causal_lm_config(path, *, what: str = "model"):
    """The transformers config of a local causal-LM directory; ValueError (naming ``what`` and the
    path) when the directory holds no model or one that is not a causal language model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{what} {path}: no config.json, not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{what} {path}: model_type {config.model_type!r} is not a causal language model "
                         f"(transformers' AutoModelForCausalLM has no class for it)")
    return config


def load_causal_lm(path, *, device="cpu", what: str = "model", progress: bool = True):
    """A local Hugging Face causal LM (checked by ``causal_lm_config``) in float32, eval mode, on
    ``device``. A checkpoint quantized with torchao loads quantized (torchao must be installed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdfast.capture import transformers_progress_bars

    causal_lm_config(path, what=what)
    with transformers_progress_bars(progress):
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.to(device).eval()


def count_parameters(model) -> int:
    """Unique parameters (a tied embedding counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weights_bytes(path) -> int:
    """Bytes of the weight files in a model directory (what a checkpoint costs on disk)."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)


def _vocab_size(config, what: str) -> int:
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is None:
        raise ValueError(f"{what}: its config has no vocab_size")
    return int(vocab)


# --- per-position statistics -------------------------------------------------------------------------


def token_statistics(logits, labels, temperature: float = 1.0) -> dict:  # logits: [P, V], labels: [P]
    """Per position, in float64: ``ce`` [P] (at T = 1), ``top1`` [P] int64, ``confidence`` [P] (max
    softmax(z)) and ``confidence_scaled`` [P] (max softmax(z / temperature))."""
    import torch

    rows = max(1, _CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    parts = []
    for z, y in zip(logits.split(rows), labels.split(rows)):
        z = z.double()
        top_value, top1 = z.max(dim=-1)
        lse = torch.logsumexp(z, dim=-1)
        lse_scaled = torch.logsumexp(z / temperature, dim=-1)
        parts.append((lse - z.gather(-1, y[:, None].long()).squeeze(-1), top1, (top_value - lse).exp(),
                      (top_value / temperature - lse_scaled).exp()))
    names = ("ce", "top1", "confidence", "confidence_scaled")
    return {name: torch.cat(column) for name, column in zip(names, zip(*parts))}


def _bins(confidence, correct, bins: int = ECE_BINS):  # [P], [P] -> 3 x [bins] float64
    """Per equal-width confidence bin: position count, correct count, confidence sum."""
    import torch

    which = torch.clamp((confidence * bins).long(), max=bins - 1)
    ones = torch.ones_like(confidence, dtype=torch.float64)
    return (torch.bincount(which, weights=ones, minlength=bins),
            torch.bincount(which, weights=correct.double(), minlength=bins),
            torch.bincount(which, weights=confidence.double(), minlength=bins))


def expected_calibration_error(confidence, correct, bins: int = ECE_BINS) -> float:  # [P] float, [P] bool
    """sum_b |hits_b - confidence sum_b| / P over ``bins`` equal-width bins of the confidence."""
    _, hits, confidence_sums = _bins(confidence, correct, bins)
    return float((hits - confidence_sums).abs().sum() / len(confidence))


def fit_temperature(logits, labels, max_iterations: int = 100) -> float:  # logits: [P, V], labels: [P]
    """The T minimizing mean NLL of softmax(logits / T) at ``labels``, within [0.01, 100].

    With b = 1 / T, NLL(b) = mean(logsumexp(b z) - b z_y) is convex; NLL'(b) = mean(E_b[z] - z_y),
    NLL''(b) = mean(Var_b[z]). When NLL' has one sign over the whole range the nearer end is the
    answer; otherwise Newton steps from b = 1, kept inside the bracket that the sign of NLL' narrows
    (bisection when a step leaves it), until a step is below 1e-7 relative. float32 softmax,
    float64 sums (each NLL' / NLL'' is one pass over the logits)."""
    import torch

    if logits.shape[0] == 0:
        raise ValueError("fit_temperature: no positions to fit on (logits has 0 rows)")
    rows = max(1, _CHUNK_ELEMENTS // max(logits.shape[-1], 1))

    def derivatives(b: float) -> tuple[float, float]:
        grad = curvature = 0.0
        for z, y in zip(logits.split(rows), labels.split(rows)):
            z = z.float()
            p = torch.softmax(b * z, dim=-1)
            mean = (p * z).sum(-1, dtype=torch.float64)
            grad += float((mean - z.gather(-1, y[:, None].long()).squeeze(-1)).sum())
            curvature += float(((p * z * z).sum(-1, dtype=torch.float64) - mean * mean).clamp(min=0).sum())
        return grad / len(labels), curvature / len(labels)

    low, high = 1 / _TEMPERATURE_RANGE[1], 1 / _TEMPERATURE_RANGE[0]
    if derivatives(low)[0] >= 0:
        return _TEMPERATURE_RANGE[1]
    if derivatives(high)[0] <= 0:
        return _TEMPERATURE_RANGE[0]
    b = 1.0
    for _ in range(max_iterations):
        grad, curvature = derivatives(b)
        low, high = (low, b) if grad > 0 else (b, high)
        step = b - grad / curvature if curvature > 0 else math.nan
        new = step if low < step < high else (low + high) / 2
        if abs(new - b) <= 1e-7 * b:
            break
        b = new
    return 1 / b


def calibration_split(num_sequences: int, fraction: float, seed: int = 0):
    """(calibration ids, held-out ids) of a data set: a seeded permutation cut at ``fraction``."""
    import numpy as np

    if not 0 < fraction < 1:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {fraction}")
    if num_sequences < 2:
        raise ValueError(f"the first data set needs >= 2 sequences to split off a calibration part, got {num_sequences}")
    order = np.random.default_rng(seed).permutation(num_sequences)
    cut = min(max(1, round(num_sequences * fraction)), num_sequences - 1)
    return order[:cut].tolist(), order[cut:].tolist()


# --- the evaluation ---------------------------------------------------------------------------------


class _Totals:
    """Sums over the positions of one model on one data set: counts, float64 sums, ECE bins
    [3, ECE_BINS] (positions, correct, confidence) of all positions and of the held-out ones."""

    def __init__(self):
        import torch

        self.tokens = self.correct = self.agree = 0
        self.ce = self.kl = 0.0
        self.bins, self.heldout, self.heldout_scaled = (torch.zeros(3, ECE_BINS, dtype=torch.float64) for _ in range(3))

    def add(self, stats: dict, labels, teacher_top, kl_sum: float | None, heldout: bool) -> None:
        import torch

        correct = stats["top1"] == labels
        self.tokens += len(labels)
        self.ce += float(stats["ce"].sum())
        self.correct += int(correct.sum())
        self.bins += torch.stack(_bins(stats["confidence"], correct))
        if teacher_top is not None:
            self.agree += int((stats["top1"] == teacher_top).sum())
            self.kl += kl_sum
        if heldout:
            self.heldout += torch.stack(_bins(stats["confidence"], correct))
            self.heldout_scaled += torch.stack(_bins(stats["confidence_scaled"], correct))

    def result(self, compared: bool) -> dict:
        ce = self.ce / self.tokens
        return {
            "tokens": self.tokens, "ce": ce, "perplexity": math.exp(ce), "accuracy": self.correct / self.tokens,
            "agreement": self.agree / self.tokens if compared else None,
            "kl": self.kl / self.tokens if compared else None,
            "ece": _ece(self.bins), "heldout_tokens": int(self.heldout[0].sum()),
            "ece_heldout": _ece(self.heldout), "ece_heldout_scaled": _ece(self.heldout_scaled),
            "reliability": _diagram(self.heldout), "reliability_scaled": _diagram(self.heldout_scaled),
        }


def _ece(bins) -> float | None:  # bins: [3, ECE_BINS]
    return float((bins[1] - bins[2]).abs().sum() / bins[0].sum()) if bins[0].sum() else None


def _diagram(bins) -> dict:  # bins: [3, ECE_BINS]
    count = bins[0].clamp(min=1)
    return {"counts": bins[0].long().tolist(), "accuracy": (bins[1] / count).tolist(),
            "confidence": (bins[2] / count).tolist()}


class _Scorer:
    """One model's passes over data sets: logits of the learned positions, statistics, teacher comparison."""

    def __init__(self, model, live_teacher, device, batch_size: int, progress: bool, name: str):
        self.model, self.live, self.device = model, live_teacher, device
        self.batch_size, self.progress, self.name = batch_size, progress, name
        self.scored_tokens, self.scoring_seconds = 0, 0.0

    def run(self, dataset, order, totals: _Totals, *, temperature: float, compare: bool, heldout: bool,
            keep_bytes: int = 0):
        """Add the sequences ``order`` of ``dataset`` to ``totals``; returns up to ``keep_bytes`` of the
        float32 learned-position logits [P, V] with their labels [P] (for fitting T)."""
        import torch
        from tqdm import tqdm

        kept, kept_labels, room = [], [], keep_bytes // 4
        order = list(order)
        with tqdm(total=len(order), unit="seq", desc=f"eval {self.name}", disable=not self.progress,
                  leave=False) as bar, torch.inference_mode():
            for batch in _batches(dataset, order, self.batch_size):
                rows, labels, teacher_top, kl_sum = self._batch(batch, dataset, compare)
                stats = {key: value.cpu() for key, value in token_statistics(rows, labels, temperature).items()}
                totals.add(stats, labels.cpu(), None if teacher_top is None else teacher_top.cpu(), kl_sum, heldout)
                take = min(len(rows), room // rows.shape[1])
                if take:
                    kept.append(rows[:take].cpu())
                    kept_labels.append(labels[:take].cpu())
                    room -= take * rows.shape[1]
                bar.update(len(batch))
        return (torch.cat(kept), torch.cat(kept_labels)) if kept else None

    def _batch(self, batch: list[dict], dataset, compare: bool):
        """Learned-position logits [P, V] float32 and labels [P], the teacher's top-1 [P] and summed KL."""
        import torch

        import kdfast
        from kdfast._backend import synchronize

        input_ids = torch.stack([s["input_ids"] for s in batch]).to(self.device)  # [B, L]
        labels = torch.stack([s["labels"] for s in batch]).to(self.device)  # [B, L]
        began = time.perf_counter()
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        synchronize(self.device)
        self.scoring_seconds += time.perf_counter() - began
        self.scored_tokens += input_ids.numel()
        learned = labels != -100
        rows, labels = logits[learned].float(), labels[learned]  # [P, V], [P]
        if not compare:
            return rows, labels, None, None
        if self.live is not None:
            teacher_rows = self.live(input_ids=input_ids, use_cache=False).logits[learned].float()  # [P, V]
            kl = kdfast.kd_loss(rows, teacher_logits=teacher_rows, reduction="sum", scale_t2=False)
            return rows, labels, teacher_rows.argmax(-1), float(kl)
        indices = torch.stack([s["teacher_indices"] for s in batch]).to(self.device)[learned]  # [P, k]
        values = torch.stack([s["teacher_values"] for s in batch]).to(self.device)[learned]  # [P, k]
        tail = torch.stack([s["teacher_tail"] for s in batch]).to(self.device)[learned]  # [P]
        logprobs = dataset.kind == "logprobs"
        kl = kdfast.kd_loss(rows, teacher_indices=indices, teacher_values=values,
                            teacher_tail=tail if logprobs else None, teacher_kind=dataset.kind, tail=logprobs,
                            temperature=dataset.capture_temperature, allow_tail_temperature=True,
                            reduction="sum", scale_t2=False)
        return rows, labels, indices[:, 0].long(), float(kl)


def _batches(dataset, order: list[int], size: int):
    """Lists of up to ``size`` consecutive samples of ``order``, cut where the sequence length changes."""
    batch = []
    for index in order:
        sample = dataset[index]
        if batch and (len(batch) == size or len(sample["input_ids"]) != len(batch[0]["input_ids"])):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def _generation_speed(model, dataset, device, new_tokens: int) -> dict:
    """Greedy generation tokens/s, batch 1, from the first sequence's start: after a short warm-up,
    the fastest of ``_GENERATION_REPEATS`` runs (the least disturbed by other work on the machine)."""
    import torch

    from kdfast._backend import synchronize

    if new_tokens == 0:
        return {"generation_tokens_per_s": None, "generation_tokens": 0}
    ids = dataset[0]["input_ids"]
    prompt = ids[:min(16, len(ids))][None].to(device)  # [1, p]
    limit = getattr(model.config, "max_position_embeddings", None)
    new_tokens = min(new_tokens, limit - prompt.shape[1]) if limit else new_tokens
    options = {"do_sample": False, "pad_token_id": model.config.eos_token_id}
    seconds = math.inf
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **options)
        for _ in range(_GENERATION_REPEATS):
            began = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
            synchronize(device)
            seconds = min(seconds, time.perf_counter() - began)
    generated = out.shape[1] - prompt.shape[1]
    return {"generation_tokens_per_s": generated / seconds, "generation_tokens": generated}


def _named(paths) -> dict:
    """{name: Path}: a dict as given, or directories named by their shortest distinct trailing path
    (``runs/distill/final`` and ``runs/baseline/final`` become ``distill/final`` and ``baseline/final``)."""
    if isinstance(paths, dict):
        return {str(name): Path(path) for name, path in paths.items()}
    paths = [Path(p) for p in paths]
    parts = [p.resolve().parts for p in paths]
    for n in range(1, max(map(len, parts), default=0) + 1):
        names = ["/".join(q[-n:]) for q in parts]
        if len(set(names)) == len(names):
            return dict(zip(names, paths))
    raise ValueError(f"models: the same directory is given twice ({[str(p) for p in paths]})")


class SequenceData:
    """A dataset file (JSONL, Parquet, ``datasets`` directory) read by ``kdfast.sources.DataSource`` as
    evaluation data: ``{"input_ids" [L], "labels" [L]}`` samples with labels -100 where the next token
    is not learned (the shards' convention), no teacher targets. The token ids are kept in memory."""

    kind = k = capture_temperature = None

    def __init__(self, path: Path, tokenizer, fields: dict):
        import numpy as np

        from kdfast.sources import DataSource

        source = DataSource(path, tokenizer, **fields)
        self.sequences = [(np.asarray(tokens, np.int64), np.asarray(mask, bool)) for tokens, mask in source]
        if not self.sequences:
            raise ValueError(f"data {path}: no sequences")
        self.vocab_size = len(tokenizer)
        self.learned_tokens = sum(int(mask.sum()) for _, mask in self.sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict:
        import numpy as np
        import torch

        tokens, mask = self.sequences[index]
        labels = np.full(len(tokens), -100, np.int64)
        labels[:-1] = np.where(mask[:-1], tokens[1:], -100)
        return {"input_ids": torch.from_numpy(tokens), "labels": torch.from_numpy(labels)}


def _is_shard_directory(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def _open_data(paths: dict, vocab_sizes: dict, fields: dict | None, tokenizer) -> dict:
    """Data sets by name: ShardDatasets for shard directories, SequenceData for dataset files (read with
    ``fields``, the ``kdfast.sources.DataSource`` options, and ``tokenizer``), after checking every
    model's vocabulary against every data set's."""
    from kdfast.shards import ShardDataset

    datasets = {}
    for name, path in paths.items():
        if _is_shard_directory(path):
            dataset = ShardDataset(path, shuffle=False)
            mismatch = [(m, v) for m, v in vocab_sizes.items() if v != dataset.vocab_size]
            what = f"was captured with {dataset.vocab_size}: they do not share a tokenizer"
        else:
            if fields is None:
                raise ValueError(f"data {path} is not a shard directory (no manifest.json); a dataset file needs "
                                 f"one of --text-field, --prompt-field/--response-field, --messages-field, and "
                                 f"--max-len")
            dataset = SequenceData(path, _data_tokenizer(tokenizer, path), fields)
            mismatch = [(m, v) for m, v in vocab_sizes.items() if v < dataset.vocab_size]
            what = f"is tokenized with a tokenizer of {dataset.vocab_size} tokens: ids beyond the model's"
        for model_name, vocab in mismatch:
            raise ValueError(f"model {model_name!r} has a vocabulary of {vocab} tokens, but data {path} {what}")
        datasets[name] = dataset
    return datasets


def _data_tokenizer(tokenizer, path: Path):
    if tokenizer is None:
        raise ValueError(f"data {path}: a dataset file needs a tokenizer (--tokenizer DIR, or tokenizer files "
                         f"in the first model's directory)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {tokenizer}: cannot load it ({e})") from None


def _default_tokenizer(models: dict):
    """The first model directory holding tokenizer files (students are saved with their tokenizer)."""
    from kdfast.capture import _tokenizer_beside

    return next((found for path in models.values() if (found := _tokenizer_beside(str(path)))), None)


def evaluate(models, data, *, ood=(), teacher=None, out_dir=None, device=None, batch_size: int = 8,
             calibration_fraction: float = 0.5, generate_tokens: int = 32, seed: int = 0,
             fields: dict | None = None, tokenizer=None, progress: bool = True) -> dict:
    """Evaluate ``models`` (directories, or {name: directory}) on ``data`` (in-distribution; its
    calibration split fits T) and ``ood``; see the module docstring. Each data set is a shard
    directory, or a dataset file read with ``fields`` (``kdfast.sources.DataSource``'s options:
    ``max_len`` and one of ``text_field``, ``prompt_field`` + ``response_field``, ``messages_field``;
    optionally ``truncate``, ``skip_bad``) and ``tokenizer`` (a directory; default: the first model's),
    scored on its learned tokens. ``teacher``: a live teacher model directory compared against
    instead of the shards' targets (a model that is the teacher is not compared with itself); a
    dataset file without ``teacher`` has no agreement or KL. ``out_dir``: where report.md,
    report.json, reliability.png and quality_vs_size.png go (None: nothing written). Returns the
    report (what report.json holds)."""
    from kdfast._backend import resolve_device
    from kdfast.report import describe_machine

    if batch_size < 1 or generate_tokens < 0:
        raise ValueError(f"batch_size must be >= 1 and generate_tokens >= 0, got {batch_size} and {generate_tokens}")
    models = _named(models)
    if not models:
        raise ValueError("models: give at least one model directory")
    ood = [ood] if isinstance(ood, (str, Path)) else list(ood)
    data_paths = {"in-distribution": Path(data),
                  **{("ood" if len(ood) == 1 else f"ood-{i + 1}"): Path(p) for i, p in enumerate(ood)}}
    vocab_sizes = {name: _vocab_size(causal_lm_config(path, what=f"model {name!r}"), f"model {name!r}")
                   for name, path in models.items()}  # bad models and vocabularies fail before any pass
    if teacher is not None:
        vocab_sizes["teacher"] = _vocab_size(causal_lm_config(teacher, what="teacher"), "teacher")
    datasets = _open_data(data_paths, vocab_sizes, fields, tokenizer if tokenizer is not None else
                          _default_tokenizer(models))
    calibration, heldout = calibration_split(len(datasets["in-distribution"]), calibration_fraction, seed)
    run_device = resolve_device(device)
    live = None if teacher is None else load_causal_lm(teacher, device=run_device, what="teacher", progress=progress)
    machine = describe_machine(run_device)
    report = {
        "machine": machine,
        "settings": {"device": str(run_device), "batch_size": batch_size, "calibration_fraction": calibration_fraction,
                     "seed": seed, "generate_tokens": generate_tokens, "ece_bins": ECE_BINS,
                     "teacher": None if teacher is None else str(teacher)},
        "data": {name: {"path": str(path), "sequences": len(ds), "learned_tokens": ds.learned_tokens, "kind": ds.kind,
                        "k": ds.k, "capture_temperature": ds.capture_temperature,
                        "teacher_targets": "live teacher" if live is not None else
                        "shards" if ds.kind is not None else "none",
                        "calibration_sequences": len(calibration) if name == "in-distribution" else 0}
                 for (name, path), ds in zip(data_paths.items(), datasets.values())},
        "models": {name: _evaluate_model(name, path, datasets, calibration, heldout, live, teacher, run_device,
                                         machine, batch_size, generate_tokens, progress)
                   for name, path in models.items()},
    }
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def _evaluate_model(name, path, datasets, calibration, heldout, live, teacher, device, machine, batch_size,
                    generate_tokens, progress) -> dict:
    """One model: calibration sequences (kept to fit T), then every held-out sequence, then latency."""
    model = load_causal_lm(path, device=device, what=f"model {name!r}", progress=progress)
    is_teacher = live is not None and Path(path).resolve() == Path(teacher).resolve()
    scorer = _Scorer(model, live, device, batch_size, progress, name)
    results = {}
    for data_name, dataset in datasets.items():
        totals = _Totals()
        compare = not is_teacher and (live is not None or dataset.kind is not None)
        if data_name == "in-distribution":
            logits, labels = scorer.run(dataset, calibration, totals, temperature=1.0, compare=compare,
                                        heldout=False, keep_bytes=_CALIBRATION_BYTES)
            temperature = fit_temperature(logits, labels)
            calibration_tokens = len(labels)
            del logits
            scorer.run(dataset, heldout, totals, temperature=temperature, compare=compare, heldout=True)
        else:
            scorer.run(dataset, range(len(dataset)), totals, temperature=temperature, compare=compare, heldout=True)
        if totals.tokens == 0:
            raise ValueError(f"data set {data_name!r}: no learned positions to evaluate")
        results[data_name] = totals.result(compare)
    return {
        "path": str(path), "parameters": count_parameters(model), "size_bytes": weights_bytes(path),
        "temperature": temperature, "calibration_tokens": calibration_tokens,
        "latency": {"device": machine["device"], "device_name": machine["device_name"],
                    "scoring_tokens_per_s": scorer.scored_tokens / scorer.scoring_seconds,
                    **_generation_speed(model, datasets["in-distribution"], device, generate_tokens)},
        "data": results,
    }


# --- the report -------------------------------------------------------------------------------------


def write_report(report: dict, out_dir) -> None:
    """report.json, report.md, reliability.png and quality_vs_size.png in ``out_dir`` (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(format_report(report))
    from kdfast.report import plot_quality_vs_size, plot_reliability

    plot_reliability(out_dir / "reliability.png", report)
    plot_quality_vs_size(out_dir / "quality_vs_size.png", report)


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict) -> str:
    """report.md: data sets, quality per data set, calibration, size and speed, the machine."""
    from kdfast.report import markdown_table

    models, machine = report["models"], report["machine"]
    lines = ["# kdfast eval report", "",
             markdown_table(("data", "path", "sequences", "scored tokens", "teacher targets"),
                            [(name, d["path"], d["sequences"], f"{next(iter(models.values()))['data'][name]['tokens']:,}",
                              d["teacher_targets"]) for name, d in report["data"].items()]), ""]
    for data_name in report["data"]:
        lines += [f"## {data_name}", "", markdown_table(
            ("model", "CE (nats/token)", "perplexity", "top-1 acc", "top-1 agreement", "KL(teacher||model)", "ECE"),
            [(name, f"{r['ce']:.4f}", f"{r['perplexity']:.2f}", f"{r['accuracy']:.4f}",
              _number(r["agreement"], ".4f"), _number(r["kl"], ".4f"), _number(r["ece"], ".4f"))
             for name, m in models.items() for r in [m["data"][data_name]]]), ""]
    lines += ["## Calibration (temperature fitted on the in-distribution calibration split)", "", markdown_table(
        ("model", "fitted T", "fit tokens", *(f"{d}: ECE -> ECE at T" for d in report["data"])),
        [(name, f"{m['temperature']:.4f}", f"{m['calibration_tokens']:,}",
          *(f"{_number(m['data'][d]['ece_heldout'], '.4f')} -> {_number(m['data'][d]['ece_heldout_scaled'], '.4f')}"
            for d in report["data"])) for name, m in models.items()]), ""]
    lines += ["## Size and speed", "", markdown_table(
        ("model", "parameters", "weights on disk", "scoring tokens/s", "greedy generation tokens/s", "device"),
        [(name, f"{m['parameters']:,}", f"{m['size_bytes'] / 2**20:.2f} MiB",
          f"{m['latency']['scoring_tokens_per_s']:,.0f}", _number(m["latency"]["generation_tokens_per_s"], ",.1f"),
          m["latency"]["device_name"]) for name, m in models.items()]), ""]
    lines += [f"Batch size {report['settings']['batch_size']}; {machine['threads']} PyTorch threads, "
              f"{machine['usable_cpus']} of {machine['cpus']} CPUs usable, load average {machine['load_average']}. "
              "Plots: `reliability.png` (held-out in-distribution positions), `quality_vs_size.png`.", ""]
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------------


def add_eval_arguments(parser) -> None:
    """The ``kdfast eval`` options (imports no torch)."""
    parser.add_argument("--model", action="append", required=True, metavar="DIR",
                        help="Hugging Face causal-LM directory to evaluate (repeat for several)")
    parser.add_argument("--teacher", metavar="DIR",
                        help="live teacher model directory for agreement and KL (default: the shards' targets)")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="in-distribution data: a teacher shard directory (kdfast capture), or a .jsonl / "
                             ".parquet / datasets directory read with the field options below; a calibration "
                             "split of it fits each model's temperature")
    parser.add_argument("--data-ood", action="append", default=[], metavar="PATH",
                        help="out-of-distribution data, the same kinds as --data (repeatable)")
    parser.add_argument("--text-field", help="dataset file: plain-text field (every token scored)")
    parser.add_argument("--prompt-field", help="dataset file: prompt field (not scored), with --response-field")
    parser.add_argument("--response-field", help="dataset file: response field (scored, with its EOS)")
    parser.add_argument("--messages-field", help="dataset file: {role, content} list rendered with the chat "
                                                 "template; only assistant turns are scored")
    parser.add_argument("--max-len", type=int, help="dataset file: longest sequence in tokens")
    parser.add_argument("--truncate", action="store_true", help="dataset file: cut sequences longer than --max-len")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="dataset file: tokenizer directory (default: the first --model directory holding one)")
    parser.add_argument("--out", required=True, type=Path, help="output directory for report.md / report.json / PNGs")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--calibration-fraction", type=float, default=0.5,
                        help="share of the --data sequences used to fit the temperature (default 0.5)")
    parser.add_argument("--generate-tokens", type=int, default=32,
                        help="new tokens of the greedy-generation timing (0: skip it; default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration split")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fields(args) -> dict | None:
    """The DataSource options given on the command line (None when none is: shard directories only)."""
    given = {name: getattr(args, name) for name in ("text_field", "prompt_field", "response_field", "messages_field")
             if getattr(args, name) is not None}
    if not given and args.max_len is None:
        return None
    return {**given, "max_len": args.max_len, "truncate": args.truncate}


def run_eval(args) -> int:
    """``kdfast eval``: evaluate, write the report, print its quality tables."""
    report = evaluate(args.model, args.data, ood=args.data_ood, teacher=args.teacher, out_dir=args.out,
                      device=args.device, batch_size=args.batch_size, calibration_fraction=args.calibration_fraction,
                      generate_tokens=args.generate_tokens, seed=args.seed, fields=_fields(args),
                      tokenizer=args.tokenizer, progress=not args.no_progress)
    print(format_report(report))
    print(f"report: {args.out / 'report.md'}")
    return 0
