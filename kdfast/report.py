"""Reports: metrics files, curves, plain-text tables and the machine a number was measured on.

The one reporting module: the trainer (``metrics.jsonl``, ``loss_curves.png``), ``kdfast demo``
(``curves.png``, ``report.md``), ``kdfast bench`` (``bench_vocab.png``, the table) and ``kdfast eval``
(``reliability.png``, ``quality_vs_size.png``) all read, draw and describe through it.

    records = read_metrics(run_dir / "metrics.jsonl")      # one dict per logged step / evaluation
    plot_curves(run_dir / "metrics.jsonl", "loss_curves.png")   # one training run
    plot_comparison("curves.png", {"distill": path, ...}, teacher_log=..., teacher_ce=...)
    plot_sweep("bench_vocab.png", {"kdfast-cpu": [(32000, 6.4), ...]}, title=...)
    plot_reliability("reliability.png", report)            # kdfast eval's report (kdfast.evaluate)
    plot_quality_vs_size("quality_vs_size.png", report)
    markdown_table(("a", "b"), [(1, 2)])
    describe_machine(device)                                # CPU model, ISA, threads, versions, load

Plots use matplotlib's object API (``matplotlib.figure.Figure``: no pyplot state, no backend to
switch); without matplotlib a plot function logs a warning and returns False. This module imports
neither torch nor matplotlib at import time.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
from pathlib import Path

__all__ = ["read_metrics", "plot_curves", "plot_comparison", "plot_sweep", "plot_reliability", "plot_quality_vs_size",
           "markdown_table", "load_average",
           "describe_machine", "usable_cpus"]

log = logging.getLogger("kdfast.report")

_LIBRARIES = ("torch", "numpy", "triton", "transformers", "tokenizers")


# --- metrics and curves ----------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line); [] when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _figure(png_path: str | Path, figsize: tuple[float, float]):
    """A matplotlib Figure, or None (with a warning) when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", png_path)
        return None
    return Figure(figsize=figsize, layout="constrained")


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> bool:
    """One training run: its loss (and the CE / divergence parts) and held-out metrics against the step.
    Returns False, with a warning, when matplotlib is not installed."""
    fig = _figure(png_path, (11, 4))
    if fig is None:
        return False
    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_kd" in r]
    left, right = fig.subplots(1, 2)
    for key, label in (("loss", "loss"), ("kd", "divergence D"), ("ce", "cross-entropy")):
        left.plot([r["step"] for r in train], [r[key] for r in train], label=label)
    left.set(title="training", xlabel="step")
    for key, label in (("eval_kd", "divergence D"), ("eval_ce", "cross-entropy")):
        right.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=label)
    right.set(title="held-out", xlabel="step")
    if evals:
        agreement = right.twinx()
        agreement.plot([r["step"] for r in evals], [r["eval_top1"] for r in evals], "k--", label="top-1 agreement")
        agreement.set(ylabel="top-1 agreement", ylim=(0, 1))
        agreement.legend(loc="center right")
    for axis in (left, right):
        axis.legend(loc="upper right")
        axis.grid(alpha=0.3)
    fig.savefig(png_path, dpi=100)
    return True


def plot_comparison(png_path: str | Path, runs: dict[str, str | Path], *, teacher_log: list[dict],
                    teacher_ce: float) -> bool:
    """Several student runs next to their teacher. Left: training cross-entropy on the hard labels
    against tokens (``teacher_log``: records with "tokens" and "loss", smoothed); right: held-out CE
    of each run (``runs``: label -> metrics.jsonl) against the step, and the teacher's final
    ``teacher_ce``. Returns False, with a warning, when matplotlib is not installed."""
    fig = _figure(png_path, (11, 4.2))
    if fig is None:
        return False
    from matplotlib.ticker import EngFormatter

    train_ax, eval_ax = fig.subplots(1, 2)
    window = max(1, len(teacher_log) // 50)
    losses = [r["loss"] for r in teacher_log]
    smoothed = [sum(losses[i - window + 1:i + 1]) / window for i in range(window - 1, len(losses))]
    train_ax.plot([r["tokens"] for r in teacher_log][window - 1:], smoothed, label="teacher")
    for name, metrics_path in runs.items():
        metrics = read_metrics(metrics_path)
        steps = [r for r in metrics if "ce" in r]
        train_ax.plot([r["tokens"] for r in steps], [r["ce"] for r in steps], label=f"{name} (hard CE)")
        evals = [r for r in metrics if "eval_ce" in r]
        eval_ax.plot([r["step"] for r in evals], [r["eval_ce"] for r in evals], marker="o", label=name)
    eval_ax.axhline(teacher_ce, color="gray", linestyle="--", label="teacher (final)")
    train_ax.set(xlabel="training tokens", ylabel="cross-entropy (nats/token)", title="training loss on the hard labels")
    train_ax.xaxis.set_major_formatter(EngFormatter())
    eval_ax.set(xlabel="student step", ylabel="cross-entropy (nats/token)", title="held-out cross-entropy")
    for ax in (train_ax, eval_ax):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.savefig(png_path, dpi=120)
    return True


def plot_sweep(png_path: str | Path, series: dict[str, list[tuple[int, float]]], *, title: str) -> bool:
    """Milliseconds against vocabulary size, log-log, one line per implementation
    (``series``: name -> [(vocab, ms), ...]). Returns False, with a warning, without matplotlib."""
    fig = _figure(png_path, (6.4, 4.2))
    if fig is None:
        return False
    ax = fig.subplots()
    for name, points in series.items():
        if points:
            ax.plot(*zip(*sorted(points)), marker="o", label=name)
    vocabs = sorted({vocab for points in series.values() for vocab, _ in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(vocabs, labels=[f"{v:,}" for v in vocabs], minor=False)
    ax.set_xticks([], minor=True)
    ax.set_yscale("log")
    ax.set(xlabel="vocabulary size V", ylabel="forward + backward, median ms")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(png_path, dpi=120)
    return True


def plot_reliability(png_path: str | Path, report: dict) -> bool:
    """One panel per model: accuracy against mean confidence per bin on the held-out in-distribution
    positions, before and after temperature scaling. Returns False (with a warning) without matplotlib."""
    models = report["models"]
    fig = _figure(png_path, (3.6 * len(models), 3.6))
    if fig is None:
        return False
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, (name, m) in zip(axes, models.items()):
        result, top = m["data"]["in-distribution"], 0.0
        for key, label in (("reliability", "as is"), ("reliability_scaled", f"T = {m['temperature']:.2f}")):
            bins = result[key]
            points = [(c, a) for c, a, n in zip(bins["confidence"], bins["accuracy"], bins["counts"]) if n]
            ax.plot(*zip(*points), marker="o", label=label)
            top = max(top, *(max(point) for point in points))
        limit = min(1.0, 1.15 * top)  # zoomed in on the occupied bins (small models are rarely confident)
        ax.plot([0, limit], [0, limit], color="gray", linestyle="--", linewidth=1)
        ax.set(xlim=(0, limit), ylim=(0, limit), xlabel="confidence (top-1 probability)", ylabel="accuracy")
        ax.set_title(f"{name}\nECE {result['ece_heldout']:.3f} -> {result['ece_heldout_scaled']:.3f}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.savefig(png_path, dpi=110)
    return True


def plot_quality_vs_size(png_path: str | Path, report: dict) -> bool:
    """Cross-entropy on each data set against the weights' size on disk, one labelled point per model.
    Returns False (with a warning) without matplotlib."""
    fig = _figure(png_path, (5.6, 4.2))
    if fig is None:
        return False
    ax = fig.subplots()
    models = report["models"]
    sizes = [m["size_bytes"] / 2**20 for m in models.values()]
    for data_name in report["data"]:
        ces = [m["data"][data_name]["ce"] for m in models.values()]
        ax.plot(sizes, ces, marker="o", linestyle="none", label=data_name)
        for name, x, y in zip(models, sizes, ces):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="weights on disk (MiB)", ylabel="cross-entropy (nats/token)", title="quality against size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(png_path, dpi=110)
    return True


# --- tables -----------------------------------------------------------------------------------------


def markdown_table(header: tuple, rows: list[tuple]) -> str:
    """A GitHub-flavoured markdown table with padded columns, so that it reads as plain text too."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# --- the machine ------------------------------------------------------------------------------------


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: timings on a shared machine are only as good as its load."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's limit), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def describe_machine(device=None) -> dict:
    """What produced a number: device, CPU model and the SIMD level PyTorch dispatches to (AVX2 and
    AVX-512 machines round differently), CPU and thread counts, library versions, load average."""
    import torch

    import kdfast
    from kdfast import _backend

    device = torch.device(device or "cpu")
    cpu = _cpu_model() or platform.processor() or platform.machine()
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu} x{os.cpu_count()}",
        "cpu": cpu,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kdfast": kdfast.__version__,
        "versions": _library_versions(),
        "backends": _backend.available_backends(),
        "load_average": load_average(),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions
