"""`kdfast demo --quick` end to end: every stage leaves its output and the report is complete and finite."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from kdfast import demo
from kdfast.cli import main

pytestmark = pytest.mark.slow
MODELS = ("teacher", "distilled student", "baseline student")
STAGES = ("corpus", "tokenizer", "teacher", "capture", "distill", "baseline", "evaluate")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--quick", "--no-progress", "--out", str(out)])
    return code, out, stdout.getvalue()


def test_demo_exits_cleanly(quick_demo):
    code, _, _ = quick_demo
    assert code == 0


def test_every_stage_left_its_output(quick_demo):
    _, out, _ = quick_demo
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    assert len(tokenizer) >= demo.QUICK.vocab_size
    assert tokenizer.decode(tokenizer("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"
    assert (out / "teacher" / "config.json").is_file() and (out / "teacher" / "model.safetensors").is_file()
    for split in ("train", "heldout"):
        assert main(["verify", "--no-progress", str(out / "shards" / split)]) == 0
    for run in ("distill", "baseline"):
        assert (out / "configs" / f"{run}.toml").is_file()
        assert (out / "runs" / run / "final" / "config.json").is_file()
        assert (out / "runs" / run / "metrics.jsonl").stat().st_size > 0
        assert json.loads((out / "runs" / run / "summary.json").read_text())["status"] == "completed"
    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_distill_and_baseline_differ_only_in_the_loss_weights(quick_demo):
    _, out, _ = quick_demo
    distill, baseline = (json.loads((out / "runs" / r / "config.json").read_text()) for r in ("distill", "baseline"))
    differ = {key for key in distill if distill[key] != baseline[key]}
    assert differ == {"run_dir", "hard_weight", "soft_weight"}
    assert (baseline["hard_weight"], baseline["soft_weight"]) == (1.0, 0.0)
    summaries = [json.loads((out / "runs" / r / "summary.json").read_text()) for r in ("distill", "baseline")]
    assert summaries[0]["step"] == summaries[1]["step"] == demo.QUICK.student_steps
    assert summaries[0]["tokens"] == summaries[1]["tokens"]


def test_report_has_every_row_and_finite_numbers(quick_demo):
    _, out, stdout = quick_demo
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert set(report["scores"]) == set(MODELS)
    for name, scores in report["scores"].items():
        assert f"| {name}" in markdown and f"| {name}" in stdout
        for key in ("ce", "perplexity", "accuracy", "agreement", "ece"):
            assert math.isfinite(scores[key]), (name, key, scores[key])
        assert 0 < scores["ce"] < math.log(demo.QUICK.vocab_size) + 3
        assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["agreement"] <= 1 and 0 <= scores["ece"] <= 1
    assert report["scores"]["teacher"]["agreement"] == 1.0
    assert [stage["name"] for stage in report["stages"]] == list(STAGES)
    for stage in report["stages"]:
        assert f"| {stage['name']}" in markdown and stage["seconds"] > 0
        if stage["name"] != "corpus":
            assert math.isfinite(stage["tokens_per_second"]) and stage["tokens_per_second"] > 0, stage
    assert 0 < report["shards"]["bytes_per_token"] < report["shards"]["dense_fp16_bytes_per_token"]
    assert math.isfinite(report["distill_minus_baseline_ce"])
    assert "bytes/token" in markdown


def test_demo_refuses_a_non_empty_output_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not an empty directory"):
        demo.run_demo(tmp_path, demo.QUICK, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_expected_calibration_error_on_known_cases():
    confidence = torch.full((10,), 0.9, dtype=torch.float64)
    nine_right = torch.tensor([True] * 9 + [False])
    assert demo.expected_calibration_error(confidence, nine_right) == pytest.approx(0.0, abs=1e-12)
    assert demo.expected_calibration_error(torch.ones(4, dtype=torch.float64), torch.tensor([1, 0, 1, 0]).bool()) == 0.5
    # two bins: 0.15 (always wrong) and 0.95 (always right): |0 - 0.15| and |1 - 0.95|, weighted 1/2 each
    two_bins = torch.tensor([0.15, 0.15, 0.95, 0.95], dtype=torch.float64)
    assert demo.expected_calibration_error(two_bins, torch.tensor([0, 0, 1, 1]).bool()) == pytest.approx(0.1)


def test_corpus_split_is_deterministic_and_disjoint():
    first = demo.build_corpus(200_000, 50_000)
    second = demo.build_corpus(200_000, 50_000)
    assert first.train_files == second.train_files and first.heldout_files == second.heldout_files
    assert not set(first.train_files) & set(first.heldout_files)
    assert sum(map(len, first.heldout)) >= 50_000 and sum(map(len, first.train)) >= 200_000
    assert all(name.endswith(".py") and "test" not in name.split("/")[:-1] for name in first.train_files)
