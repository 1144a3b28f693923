"""kdfast.export: a loadable Hugging Face directory, int8 weights through torchao, the card, nothing partial."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, ViTConfig  # noqa: E402

from kdfast import export as export_module  # noqa: E402
from kdfast.capture import capture  # noqa: E402
from kdfast.export import add_export_arguments, export, run_export  # noqa: E402

VOCAB, LENGTH = 64, 16


def tiny_llama(directory, *, seed: int, vocab: int = VOCAB):
    """Linear layers hold most of the weights, so int8 visibly shrinks the file."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # a less uniform prediction than a fresh model's
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = tiny_llama(root / "student", seed=0)
    (root / "student" / "tokenizer.json").write_text("{}")  # stands for the tokenizer files
    tokens = np.random.default_rng(0).integers(0, VOCAB, (8, LENGTH)).astype(np.int32)
    capture(root / "student", tokens, root / "shards", k=8, device="cpu", progress=False)
    return {"root": root, "model": model, "tokens": tokens}


def mean_ce(model, tokens: np.ndarray) -> float:
    """Float64 mean CE over positions 0..L-2 (the learned ones) of every sequence."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))


def test_int8_export_loads_and_keeps_the_cross_entropy(setup):
    pytest.importorskip("torchao")
    root = setup["root"]
    result = export(root / "student", root / "int8", quantize="int8-weight", temperature=1.3, data=root / "shards",
                    progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(root / "int8").eval()
    assert type(loaded.model.layers[0].self_attn.q_proj.weight).__module__.startswith("torchao")
    ce_float, ce_int8 = mean_ce(setup["model"], setup["tokens"]), mean_ce(loaded, setup["tokens"])
    assert result["ce_source"] == pytest.approx(ce_float, rel=1e-6)
    assert result["ce_export"] == pytest.approx(ce_int8, rel=1e-6)
    assert abs(ce_int8 / ce_float - 1) < 0.02
    assert ce_int8 != ce_float  # the weights really are rounded
    size = sum(f.stat().st_size for f in (root / "int8").glob("*.safetensors"))
    assert result["export_bytes"] == size < 0.6 * result["source_bytes"]
    config = json.loads((root / "int8" / "config.json").read_text())
    assert config["kdfast"]["temperature"] == 1.3 and config["quantization_config"]["quant_method"] == "torchao"
    assert loaded.config.kdfast["temperature"] == 1.3
    card = (root / "int8" / "README.md").read_text()
    assert "T = 1.3000" in card and f"this export {ce_int8:.4f}" in card and f"{size:,} bytes" in card
    assert (root / "int8" / "tokenizer.json").read_text() == "{}"


def test_float_export_is_the_same_model(setup, capsys):
    root = setup["root"]
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    assert run_export(parser.parse_args(["--model", str(root / "student"), "--out", str(root / "float"),
                                         "--no-progress"])) == 0
    assert json.loads(capsys.readouterr().out)["quantization"] == "none"
    loaded = AutoModelForCausalLM.from_pretrained(root / "float").eval()
    assert mean_ce(loaded, setup["tokens"]) == mean_ce(setup["model"], setup["tokens"])
    assert loaded.config.kdfast == {"temperature": None, "quantization": "none", "source": "student"}
    assert "none recorded" in (root / "float" / "README.md").read_text()


def test_a_failed_export_leaves_nothing(setup, tmp_path, monkeypatch):
    def broken(directory, progress):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "_check_reloads", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export(setup["root"] / "student", tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_input(setup, tmp_path, monkeypatch):
    root = setup["root"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        export(root / "student", tmp_path / "full", progress=False)
    with pytest.raises(ValueError, match="quantize must be one of"):
        export(root / "student", tmp_path / "a", quantize="int4-weight", progress=False)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        export(root / "student", tmp_path / "a", temperature=0.0, progress=False)
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="not a causal language model"):
        export(tmp_path / "vit", tmp_path / "a", progress=False)
    tiny_llama(tmp_path / "small-vocab", seed=1, vocab=48)
    with pytest.raises(ValueError, match="vocabulary of 48 tokens"):
        export(tmp_path / "small-vocab", tmp_path / "a", data=root / "shards", progress=False)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
    with pytest.raises(ValueError, match="needs torchao"):
        export(root / "student", tmp_path / "a", quantize="int8-weight", progress=False)
    assert not (tmp_path / "a").exists()
