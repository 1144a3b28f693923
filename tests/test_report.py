"""kdfast.report: metrics files, the three plots, tables and the machine description."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from kdfast import report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "tokens": 64 * s, "loss": 3.0 / s, "kd": 2.0 / s, "ce": 1.0 / s} for s in (1, 2, 3)]
    records.append({"step": 3, "eval_kd": 1.5, "eval_ce": 2.5, "eval_top1": 0.4})
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return path, records


def test_read_metrics_returns_every_record_and_nothing_for_a_missing_file(metrics, tmp_path):
    path, records = metrics
    assert report.read_metrics(path) == records
    assert report.read_metrics(tmp_path / "absent.jsonl") == []


def test_each_plot_writes_a_png(metrics, tmp_path):
    path, _ = metrics
    assert report.plot_curves(path, tmp_path / "run.png")
    assert report.plot_comparison(tmp_path / "compare.png", {"a": path, "b": path}, teacher_ce=2.0,
                                  teacher_log=[{"tokens": 64 * s, "loss": 4.0 / s} for s in range(1, 9)])
    assert report.plot_sweep(tmp_path / "sweep.png", {"x": [(1024, 2.0), (4096, 8.0)], "y": []}, title="t")
    for name in ("run", "compare", "sweep"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG)


def test_plots_without_matplotlib_warn_and_return_false(metrics, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert report.plot_curves(metrics[0], tmp_path / "run.png") is False
    assert not (tmp_path / "run.png").exists()
    assert "matplotlib is not installed" in caplog.text


def test_markdown_table_pads_columns():
    assert report.markdown_table(("a", "bb"), [(1, 2), ("333", 4)]).splitlines() == [
        "| a   | bb |", "|-----|----|", "| 1   | 2  |", "| 333 | 4  |"]


def test_machine_description_names_the_isa_threads_and_versions():
    machine = report.describe_machine("cpu")
    assert machine["isa"] == torch.backends.cpu.get_cpu_capability()
    assert machine["threads"] == torch.get_num_threads()
    assert machine["usable_cpus"] == len(os.sched_getaffinity(0))
    assert machine["versions"]["torch"] == torch.__version__
    assert machine["device"] == "cpu" and machine["cpu"] in machine["device_name"]
