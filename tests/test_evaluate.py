"""kdfast.evaluate: the report's numbers against float64 recomputations, temperature scaling, bad input."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig  # noqa: E402

from kdfast.capture import capture  # noqa: E402
from kdfast.evaluate import (  # noqa: E402
    ECE_BINS, _batches, add_eval_arguments, calibration_split, evaluate, expected_calibration_error, fit_temperature, run_eval,
)

VOCAB, LENGTH, K = 64, 16, 8


def tiny_llama(directory, *, hidden: int, seed: int, vocab: int = VOCAB, head_scale: float = 1.0):
    """A random Llama causal LM saved to ``directory``; ``head_scale`` sharpens (over-confident) its logits."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(directory)
    return model


def sample(model, count: int, generator: torch.Generator) -> np.ndarray:
    """[count, LENGTH] token ids drawn from ``model`` itself (so that the model is calibrated on them)."""
    ids = torch.randint(0, VOCAB, (count, 1), generator=generator)
    with torch.no_grad():
        for _ in range(LENGTH - 1):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], 1)
    return ids.numpy().astype(np.int32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    teacher = tiny_llama(root / "teacher", hidden=32, seed=0, head_scale=6.0)
    student = tiny_llama(root / "student", hidden=16, seed=1, head_scale=2.0)
    # the teacher with its logits tripled: over-confident on the teacher's own samples
    overconfident = tiny_llama(root / "overconfident", hidden=32, seed=0, head_scale=18.0)
    generator = torch.Generator().manual_seed(0)
    tokens = sample(teacher, 24, generator)
    ood_tokens = np.random.default_rng(0).integers(0, VOCAB, (6, LENGTH)).astype(np.int32)  # uniform tokens
    capture(root / "teacher", tokens, root / "shards", k=K, device="cpu", progress=False)
    capture(root / "teacher", ood_tokens, root / "ood", k=K, device="cpu", progress=False)
    return {"root": root, "teacher": teacher, "student": student, "overconfident": overconfident, "tokens": tokens,
            "ood_tokens": ood_tokens}


def reference(model, teacher, tokens: np.ndarray, temperature: float = 1.0) -> dict:
    """Per learned position (0..L-2 of every sequence), in float64 from the models' own logits."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        z = model(input_ids=ids).logits[:, :-1].double().reshape(-1, VOCAB)
        t = teacher(input_ids=ids).logits[:, :-1].double().reshape(-1, VOCAB)
    labels = ids[:, 1:].reshape(-1)
    log_q = torch.log_softmax(z, -1)
    conf = torch.softmax(z / temperature, -1).max(-1).values
    return {"ce": -log_q.gather(1, labels[:, None]).squeeze(1), "correct": z.argmax(-1) == labels, "conf": conf,
            "agree": z.argmax(-1) == t.argmax(-1), "log_q": log_q, "log_p": torch.log_softmax(t, -1)}


def numpy_ece(confidence: np.ndarray, correct: np.ndarray) -> float:
    """ECE written out with a loop over 15 equal-width bins."""
    which = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    total = 0.0
    for b in range(ECE_BINS):
        inside = which == b
        total += abs(correct[inside].sum() - confidence[inside].sum())
    return total / len(confidence)


def tail_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:  # [P, V] each -> [P]
    """KL of the teacher's top-K log-probs plus the tail bucket against the student, float64."""
    top = log_p.topk(K, dim=-1).indices
    in_top = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, top, True)
    p_top, lp_top, lq_top = log_p.gather(1, top).exp(), log_p.gather(1, top), log_q.gather(1, top)
    lp_tail = torch.logsumexp(log_p.masked_fill(in_top, -math.inf), -1)
    lq_tail = torch.logsumexp(log_q.masked_fill(in_top, -math.inf), -1)
    return (p_top * (lp_top - lq_top)).sum(-1) + lp_tail.exp() * (lp_tail - lq_tail)


@pytest.fixture(scope="module")
def shard_report(setup):
    root = setup["root"]
    return evaluate({"teacher": root / "teacher", "student": root / "student", "overconfident": root / "overconfident"},
                    root / "shards", ood=[root / "ood"],
                    out_dir=root / "out", device="cpu", batch_size=5, generate_tokens=4, progress=False)


def test_report_matches_float64_recomputation(setup, shard_report):
    root = setup["root"]
    written = json.loads((root / "out" / "report.json").read_text())
    for data_name, tokens in (("in-distribution", setup["tokens"]), ("ood", setup["ood_tokens"])):
        for name in ("teacher", "student", "overconfident"):
            ref = reference(setup[name], setup["teacher"], tokens)
            got = written["models"][name]["data"][data_name]
            assert got["tokens"] == len(ref["ce"])
            assert got["ce"] == pytest.approx(float(ref["ce"].mean()), rel=1e-6, abs=1e-6)
            assert got["perplexity"] == pytest.approx(math.exp(float(ref["ce"].mean())), rel=1e-6)
            assert got["accuracy"] == pytest.approx(float(ref["correct"].double().mean()), abs=1e-12)
            assert got["agreement"] == pytest.approx(float(ref["agree"].double().mean()), abs=1e-12)
            assert got["ece"] == pytest.approx(numpy_ece(ref["conf"].numpy(), ref["correct"].numpy()), abs=1e-6)
            # float16 shard values and float32 kernels: KL to 1e-3 relative
            assert got["kl"] == pytest.approx(float(tail_kl(ref["log_q"], ref["log_p"]).mean()), rel=1e-3, abs=1e-5)
    assert written["models"]["teacher"]["data"]["in-distribution"]["agreement"] == 1.0


def test_heldout_ece_before_and_after_temperature(setup, shard_report):
    calibration, heldout = calibration_split(len(setup["tokens"]), 0.5, 0)
    assert sorted(calibration + heldout) == list(range(len(setup["tokens"])))
    for name in ("student", "overconfident"):
        result = shard_report["models"][name]
        assert result["calibration_tokens"] == len(calibration) * (LENGTH - 1)
        before = reference(setup[name], setup["teacher"], setup["tokens"][heldout])
        after = reference(setup[name], setup["teacher"], setup["tokens"][heldout], result["temperature"])
        got = result["data"]["in-distribution"]
        assert got["heldout_tokens"] == len(heldout) * (LENGTH - 1)
        assert got["ece_heldout"] == pytest.approx(numpy_ece(before["conf"].numpy(), before["correct"].numpy()),
                                                   abs=1e-6)
        assert got["ece_heldout_scaled"] == pytest.approx(numpy_ece(after["conf"].numpy(), after["correct"].numpy()),
                                                          abs=1e-6)
        ood = result["data"]["ood"]
        assert ood["heldout_tokens"] == ood["tokens"] and ood["ece_heldout"] == pytest.approx(ood["ece"], abs=1e-12)


def test_temperature_scaling_calibrates_an_overconfident_model(shard_report):
    """The teacher's logits x3 on the teacher's own samples: the fitted T undoes about that factor,
    and the held-out ECE drops."""
    result = shard_report["models"]["overconfident"]
    got = result["data"]["in-distribution"]
    assert 2 < result["temperature"] < 4.5, result["temperature"]
    assert got["ece_heldout_scaled"] < 0.5 * got["ece_heldout"], got


def test_fitted_temperature_minimizes_nll():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4000, 20, generator=generator)
    labels = torch.multinomial(torch.softmax(logits / 2.5, -1), 1, generator=generator).squeeze(1)
    temperature = fit_temperature(logits, labels)

    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits.double() / t, labels))

    assert nll(temperature) < min(nll(temperature * 1.01), nll(temperature / 1.01))
    assert 2.2 < temperature < 2.8  # the labels were drawn at T = 2.5


def test_expected_calibration_error_of_known_bins():
    confidence = torch.tensor([0.05, 0.05, 0.95, 0.95, 1.0], dtype=torch.float64)
    correct = torch.tensor([False, True, True, True, False])
    # bin 0: |1 - 0.1|, bin 14: |2 - 2.9| (1.0 falls into the last bin)
    assert expected_calibration_error(confidence, correct) == pytest.approx((0.9 + 0.9) / 5, abs=1e-12)


def test_batches_never_mix_sequence_lengths():
    dataset = [{"input_ids": torch.zeros(n)} for n in (4, 4, 4, 6, 6, 4)]
    lengths = [[len(s["input_ids"]) for s in batch] for batch in _batches(dataset, [0, 1, 2, 3, 4, 5], 2)]
    assert lengths == [[4, 4], [4], [6, 6], [4]]


def test_live_teacher_gives_full_vocabulary_kl(setup):
    root = setup["root"]
    report = evaluate([root / "student"], root / "shards", teacher=root / "teacher", device="cpu",
                      generate_tokens=0, progress=False)
    ref = reference(setup["student"], setup["teacher"], setup["tokens"])
    got = report["models"]["student"]["data"]["in-distribution"]
    kl = (ref["log_p"].exp() * (ref["log_p"] - ref["log_q"])).sum(-1).mean()
    assert got["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert got["agreement"] == pytest.approx(float(ref["agree"].double().mean()), abs=1e-12)
    assert report["data"]["in-distribution"]["teacher_targets"] == "live teacher"


def test_outputs_and_command(setup, shard_report, capsys):
    root = setup["root"]
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(["--model", str(root / "student"), "--data", str(root / "shards"), "--out",
                              str(root / "cli"), "--device", "cpu", "--generate-tokens", "2", "--no-progress"])
    assert run_eval(args) == 0
    assert "## in-distribution" in capsys.readouterr().out
    for directory in (root / "out", root / "cli"):
        for name in ("report.md", "report.json", "reliability.png", "quality_vs_size.png"):
            assert (directory / name).stat().st_size > 0, name
    student = shard_report["models"]["student"]
    assert student["parameters"] == sum(p.numel() for p in setup["student"].parameters())
    assert student["size_bytes"] == (root / "student" / "model.safetensors").stat().st_size
    latency = student["latency"]
    assert latency["device"] == "cpu" and latency["scoring_tokens_per_s"] > 0
    assert latency["generation_tokens"] == 4 and latency["generation_tokens_per_s"] > 0


def test_bad_models_and_data(setup, tmp_path):
    root = setup["root"]
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="'vit' is not a causal language model"):
        evaluate([tmp_path / "vit"], root / "shards", progress=False)
    with pytest.raises(ValueError, match="no config.json"):
        evaluate([tmp_path], root / "shards", progress=False)
    tiny_llama(tmp_path / "small-vocab", hidden=16, seed=2, vocab=48)
    with pytest.raises(ValueError, match="vocabulary of 48 tokens, but data .* captured with 64"):
        evaluate([tmp_path / "small-vocab"], root / "shards", progress=False)
    with pytest.raises(ValueError, match="calibration_fraction"):
        evaluate([root / "student"], root / "shards", calibration_fraction=1.0, progress=False)
