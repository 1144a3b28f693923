"""`kdfast bench --quick`: writes its JSON and PNG, prints the table, every number is a real measurement, and
each implementation is timed right after its own untimed run."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast import _shapes
from kdfast.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["bench", "--quick", "--device", "cpu", "--out", str(out)])
    return code, out, stdout.getvalue()


def test_bench_quick_exits_cleanly_and_writes_files(quick_bench):
    code, out, _ = quick_bench
    assert code == 0
    assert (out / "bench.json").is_file()
    png = (out / "bench_vocab.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_bench_json_holds_every_shape_and_impl_with_finite_numbers(quick_bench):
    _, out, _ = quick_bench
    report = json.loads((out / "bench.json").read_text())
    assert report["machine"]["copy_gbps"] > 0
    impls = {"torch-eager", "torch-compile"} | ({"kdfast-cpu"} if "cpu" in kdfast.available_backends() else set())
    measured = {(r["impl"], r["shape"]) for r in report["results"]}
    assert measured == {(impl, shape.label) for impl in impls for shape in _shapes.CPU_QUICK_SHAPES}
    sweep_vocabs = {r["vocab"] for r in report["sweep"]}
    assert sweep_vocabs == set(_shapes.QUICK_VOCAB_SWEEP)
    for r in report["results"] + report["sweep"]:
        assert r["error"] is None, r
        for key in ("median_ms", "gbps", "pct_copy", "peak_mib"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert r["median_ms"] > 0


def test_bench_prints_the_table(quick_bench):
    _, _, stdout = quick_bench
    assert "| impl" in stdout and "% copy BW" in stdout
    for shape in _shapes.CPU_QUICK_SHAPES:
        assert shape.label in stdout
    assert "torch-compile" in stdout


def test_bench_shapes_module_is_a_reexport_of_the_package_grid():
    spec = importlib.util.spec_from_file_location("bench_shapes", REPO / "bench" / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.CPU_SHAPES is _shapes.CPU_SHAPES
    assert module.kd_loss_bytes is _shapes.kd_loss_bytes
    shape = _shapes.LossShape(4, 10, _shapes.torch.float32, "topk", k=3)
    assert _shapes.kd_loss_bytes(shape) == 2 * 4 * 10 * 4 + 4 * 3 * (8 + 4)


def test_unknown_implementation_is_refused(tmp_path):
    from kdfast.bench import run_bench

    with pytest.raises(ValueError, match=r"impls: \['torch-jit'\] not among"):
        run_bench(tmp_path, device="cpu", quick=True, impls=["torch-eager", "torch-jit"])


def test_each_timed_run_directly_follows_a_run_of_the_same_implementation():
    """Rounds interleave the implementations, and within a round each runs twice in a row (untimed, then
    timed), so its time never depends on what the implementation before it left in the caches."""
    from kdfast import bench, reference

    calls = []

    def recorded(name):
        def loss(logits, labels, teacher):
            calls.append(name)
            return reference.kd_loss(logits, labels, **teacher, **bench.LOSS_OPTIONS)
        return loss

    shape = _shapes.LossShape(4, 64, torch.float32, "dense")
    plan = bench.Plan(torch.device("cpu"), [shape], [], repeats=2, copy_mib=1)
    results = bench.measure_shape(shape, {"a": recorded("a"), "b": recorded("b")}, plan, copy_gbps=1.0)
    warm_up, rounds, peak_memory_runs = calls[:2], calls[2:-2], calls[-2:]
    assert warm_up == ["a", "b"] and peak_memory_runs == ["a", "b"]
    assert rounds == ["a", "a", "b", "b"] * 2
    assert all(r.error is None and r.median_ms > 0 for r in results)
