"""`kdfast demo --quick` end to end: every stage leaves its output and the report is complete and finite."""
from __future__ import annotations

import contextlib
import dataclasses
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


def test_saved_configs_are_the_configs_the_runs_used(quick_demo):
    from kdfast.train import load_config

    _, out, _ = quick_demo
    for run in ("distill", "baseline"):
        used = json.loads((out / "runs" / run / "config.json").read_text())
        assert load_config(out / "configs" / f"{run}.toml").to_dict() == used


def test_report_names_the_machine(quick_demo):
    _, out, _ = quick_demo
    machine = json.loads((out / "report.json").read_text())["machine"]
    markdown = (out / "report.md").read_text()
    assert machine["isa"] == torch.backends.cpu.get_cpu_capability()
    assert f"{machine['cpu']} ({machine['isa']})" in markdown
    assert f"{torch.get_num_threads()} PyTorch threads" in markdown
    assert f"torch {torch.__version__}" in markdown


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


def test_every_stage_is_recorded_with_its_result(quick_demo):
    _, out, _ = quick_demo
    records = json.loads((out / "stages.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert records["settings"] == dataclasses.asdict(demo.QUICK)
    assert list(records["stages"]) == list(STAGES) and report["resumed_stages"] == []
    assert [records["stages"][name]["stage"] for name in STAGES] == [
        {key: stage[key] for key in ("name", "seconds", "tokens", "note", "threads")} for stage in report["stages"]]
    assert records["stages"]["evaluate"]["result"] == report["scores"]
    assert {name: records["stages"][name]["result"]["summary"] for name in ("distill", "baseline")} == \
        report["train_summaries"]
    assert not [path for path in out.rglob(".tmp-*")]


def test_demo_refuses_a_non_empty_directory_that_holds_no_demo_run(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="is not an empty directory and holds no kdfast demo run"):
        demo.run_demo(tmp_path, demo.QUICK, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_demo_refuses_a_run_with_other_settings_and_names_them(tmp_path):
    demo.StageRecords.open(tmp_path, dataclasses.asdict(demo.QUICK))
    records = (tmp_path / "stages.json").read_bytes()
    with pytest.raises(ValueError, match=r"holds a kdfast demo run with other settings \(seed 0 there, 1 here\)"):
        demo.run_demo(tmp_path, dataclasses.replace(demo.QUICK, seed=1), progress=False)
    with pytest.raises(ValueError) as refused:
        demo.run_demo(tmp_path, demo.FULL, progress=False)
    for difference in ("name 'quick' there, 'full' here", "teacher.hidden 128 there, 256 here",
                       "teacher_steps 80 there, 600 here", "k 32 there, 64 here"):
        assert difference in str(refused.value)
    assert "vocab_size" not in str(refused.value)  # the same in both
    assert (tmp_path / "stages.json").read_bytes() == records


def test_the_cli_refuses_other_settings_in_one_line(tmp_path, capsys):
    demo.StageRecords.open(tmp_path, dataclasses.asdict(demo.QUICK))
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--quick", "--seed", "3", "--threads", "1", "--out", str(tmp_path)]) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "kdfast demo: error: --out" in err and "(seed 0 there, 3 here)" in err and "Traceback" not in err


def test_stage_records_read_back_what_was_recorded(tmp_path):
    records = demo.StageRecords.open(tmp_path / "out", dataclasses.asdict(demo.QUICK))
    stage = demo.Stage("corpus", 1.5, None, "2 + 1 files", threads=1)
    records.add(stage, {"train_files": 2, "ce": 0.1 + 0.2})
    again = demo.StageRecords.open(tmp_path / "out", dataclasses.asdict(demo.QUICK))
    assert again.finished == {"corpus": {"stage": dataclasses.asdict(stage), "result": {"train_files": 2,
                                                                                        "ce": 0.1 + 0.2}}}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["stages.json"]


def test_stage_records_of_another_format_are_refused(tmp_path):
    (tmp_path / "stages.json").write_text(json.dumps({"format": 99, "settings": {}, "stages": {}}))
    with pytest.raises(ValueError, match="stage records of format 99"):
        demo.StageRecords.open(tmp_path, dataclasses.asdict(demo.QUICK))


def test_contention_note_reads_the_load_average():
    machine = {"threads": 2, "usable_cpus": 2}
    assert "no other work kept a CPU busy" in demo.contention_note(machine | {"load_average": [0.2, 0.1, 0.1]})
    busy = demo.contention_note(machine | {"load_average": [2.5, 2.0, 1.0]})
    assert "load average 2.5 on 2 CPUs: other processes are running" in busy
    assert "no load average" in demo.contention_note(machine | {"load_average": None})


def test_corpus_split_is_deterministic_and_disjoint():
    first = demo.build_corpus(200_000, 50_000)
    second = demo.build_corpus(200_000, 50_000)
    assert first.train_files == second.train_files and first.heldout_files == second.heldout_files
    assert not set(first.train_files) & set(first.heldout_files)
    assert sum(map(len, first.heldout)) >= 50_000 and sum(map(len, first.train)) >= 200_000
    assert all(name.endswith(".py") and "test" not in name.split("/")[:-1] for name in first.train_files)


def independent_scores(model_dir, dataset) -> dict:
    """CE, accuracy, agreement with the shards' stored teacher top-1 (slot 0, docs/evaluate.md) and
    15-bin ECE of one model on ``dataset``, one sequence per forward pass, float64 log_softmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    ce, top1, confidence, labels, teacher_top = [], [], [], [], []
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[index]
            learned = sample["labels"] != -100
            logits = model(input_ids=sample["input_ids"][None], use_cache=False).logits[0]  # [L, V]
            logp = torch.log_softmax(logits[learned].double(), dim=-1)  # [P, V]
            y = sample["labels"][learned]
            ce.append(-logp[torch.arange(len(y)), y])
            best, argmax = logp.max(dim=-1)
            top1.append(argmax)
            confidence.append(best.exp())
            labels.append(y)
            teacher_top.append(sample["teacher_indices"][learned][:, 0].long())
    ce, top1, confidence, labels, teacher_top = map(torch.cat, (ce, top1, confidence, labels, teacher_top))
    correct = (top1 == labels).double()
    edges = torch.linspace(0, 1, 16, dtype=torch.float64)[1:-1]
    which = torch.bucketize(confidence, edges, right=True)  # bin b holds [b/15, (b+1)/15); 1.0 in the last
    ece = sum(abs(float(correct[which == b].sum() - confidence[which == b].sum())) for b in range(15))
    return {"tokens": len(labels), "ce": float(ce.mean()), "accuracy": float(correct.mean()),
            "agreement": float((top1 == teacher_top).double().mean()), "ece": ece / len(labels)}


def test_kdfast_eval_of_the_demo_models_matches_an_independent_computation(quick_demo, tmp_path):
    from kdfast.shards import ShardDataset

    _, out, _ = quick_demo
    models = [out / "teacher", out / "runs" / "distill" / "final", out / "runs" / "baseline" / "final"]
    heldout = out / "shards" / "heldout"
    args = ["eval", "--no-progress", "--batch-size", "1", "--generate-tokens", "0", "--data", str(heldout),
            "--out", str(tmp_path / "eval")]
    for directory in models:
        args += ["--model", str(directory)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["settings"]["ece_bins"] == 15
    by_path = {result["path"]: result for result in report["models"].values()}
    assert set(by_path) == {str(directory) for directory in models}
    dataset = ShardDataset(heldout, shuffle=False)
    for directory in models:
        name = directory.relative_to(out)
        got = by_path[str(directory)]["data"]["in-distribution"]
        expected = independent_scores(directory, dataset)
        assert got["tokens"] == expected["tokens"], name
        for key in ("ce", "accuracy", "agreement", "ece"):
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-6), (name, key)
    assert by_path[str(out / "teacher")]["data"]["in-distribution"]["agreement"] == 1.0
