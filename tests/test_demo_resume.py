"""`kdfast demo --quick` killed with SIGKILL mid-way, twice, then rerun: it continues where it stopped and
its report equals an uninterrupted run's (except times and load)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdfast import demo
from kdfast.cli import main
from kdfast.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow
# One thread in every run: another thread count rounds differently (the report names it).
DEMO = [sys.executable, "-m", "kdfast", "demo", "--quick", "--no-progress", "--threads", "1"]
EARLY_STAGES = ["corpus", "tokenizer", "teacher", "capture"]
TIMEOUT = 900  # seconds for one demo run on a busy 2-core machine


def run_demo(out: Path, log: Path) -> None:
    """The demo into ``out`` to the end; its output in ``log``."""
    with open(log, "w") as output:
        code = subprocess.run(DEMO + ["--out", str(out)], stdout=output, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT).returncode
    assert code == 0, log.read_text()


def sigkill_when(out: Path, log: Path, ready, what: str) -> None:
    """Starts the demo into ``out`` and SIGKILLs it as soon as ``ready()`` is true; asserts that it was
    killed (not finished) and that the stage ``what`` was not recorded as finished."""
    with open(log, "w") as output:
        process = subprocess.Popen(DEMO + ["--out", str(out)], stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, f"the demo ended before it could be killed:\n{log.read_text()}"
    assert what not in finished_stages(out), f"killed too late: {what} had finished"


def finished_stages(out: Path) -> list[str]:
    return list(json.loads((out / "stages.json").read_text())["stages"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run killed during the capture, rerun, killed during the distilled
    student's training (after its first checkpoint), and rerun to the end."""
    root = tmp_path_factory.mktemp("demo-resume")
    reference, resumed = root / "reference", root / "resumed"
    run_demo(reference, root / "reference.log")
    sigkill_when(resumed, root / "kill-1.log", lambda: (resumed / "shards" / "train" / "manifest.json").is_file(),
                 "capture")
    after_first = finished_stages(resumed)
    sigkill_when(resumed, root / "kill-2.log", lambda: bool(list_checkpoints(resumed / "runs" / "distill")),
                 "distill")
    after_second = finished_stages(resumed)
    run_demo(resumed, root / "resume.log")
    return {"reference": reference, "resumed": resumed, "log": (root / "resume.log").read_text(),
            "second_log": (root / "kill-2.log").read_text(), "after_first": after_first,
            "after_second": after_second}


def comparable(out: Path) -> dict:
    """report.json without the times, the load and the resume history, with ``out`` written as <out>."""
    report = json.loads((out / "report.json").read_text())
    for key in ("total_seconds", "machine", "resumed_stages"):
        del report[key]
    for stage in report["stages"]:
        del stage["seconds"], stage["tokens_per_second"]
    for name, summary in report["train_summaries"].items():
        report["train_summaries"][name] = {key: value for key, value in summary.items()
                                           if not key.endswith(("_seconds", "_per_s"))}
    return json.loads(json.dumps(report).replace(str(out), "<out>"))


def test_the_kills_stopped_the_demo_mid_way(runs):
    assert runs["after_first"] == ["corpus", "tokenizer", "teacher"]
    assert runs["after_second"] == EARLY_STAGES
    assert "[kdfast demo] capture ..." in runs["second_log"]  # the interrupted capture ran again


def test_the_rerun_skipped_the_finished_stages_and_continued_the_student_run(runs):
    log, resumed = runs["log"], runs["resumed"]
    for name in EARLY_STAGES:
        assert f"[kdfast demo] {name}: finished by an earlier run" in log
        assert f"[kdfast demo] {name} ..." not in log
    continued = re.search(r"\[kdfast demo\] distill: continuing from runs/distill/checkpoints/step_(\d+)", log)
    assert continued and 0 < int(continued[1]) < demo.QUICK.student_steps, log
    assert json.loads((resumed / "report.json").read_text())["resumed_stages"] == EARLY_STAGES
    assert "Resumed: corpus, tokenizer, teacher, capture finished in an earlier run" in (
        resumed / "report.md").read_text()


def test_the_resumed_report_equals_the_uninterrupted_one(runs):
    reference, resumed = comparable(runs["reference"]), comparable(runs["resumed"])
    assert resumed["scores"] == reference["scores"]  # CE, perplexity, accuracy, agreement, ECE: exactly
    assert resumed["stages"] == reference["stages"]  # names, tokens, notes, threads
    assert resumed == reference


def test_the_resumed_capture_wrote_the_same_shards(runs):
    for split in ("train", "heldout"):
        shards = sorted((runs["reference"] / "shards" / split).glob("*.kds"))
        assert shards
        for path in shards:
            assert (runs["resumed"] / "shards" / split / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_finished_run_rerun_skips_every_stage_and_keeps_its_report(runs):
    out = runs["resumed"]
    before = comparable(out)
    threads = torch.get_num_threads()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            assert main(DEMO[3:] + ["--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert stdout.getvalue().count("finished by an earlier run") == 7
    assert comparable(out) == before


def test_other_settings_with_a_finished_run_are_refused(runs, capsys):
    out = runs["reference"]
    report = (out / "report.json").read_bytes()
    threads = torch.get_num_threads()
    try:
        assert main(DEMO[3:] + ["--seed", "1", "--out", str(out)]) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert f"kdfast demo: error: --out {out} holds a kdfast demo run with other settings (seed 0 there, 1 here)" in err
    assert (out / "report.json").read_bytes() == report
    assert not any(name.startswith(".tmp-") for name in os.listdir(out))
