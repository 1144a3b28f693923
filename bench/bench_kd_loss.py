"""kd_loss forward + backward: kdfast against the plain PyTorch reference, eager and compiled.

CPU (writes the JSON, then the markdown table from it):

    python -m pytest bench/bench_kd_loss.py --benchmark-only -k cpu \\
        --benchmark-json=bench/results/kd_loss-cpu.json
    python bench/bench_kd_loss.py bench/results/kd_loss-cpu.json bench/results/kd_loss-cpu.md

CUDA (the cases are skipped without a GPU): ``-k cuda`` and ``kd_loss-cuda.*`` in the lines above.
``KDFAST_BENCH_QUICK=1`` swaps the CPU shapes for the small ``CPU_QUICK_SHAPES`` (a smoke run).

Every case is one forward + backward: ``loss = f(logits, ...)``, then ``torch.autograd.grad(loss,
logits)``, with labels, T = 2, hard_weight = soft_weight = 0.5, forward KL, reduction "mean". The
top-64 teacher is sparse with ``teacher_kind="logits"`` (the raw teacher logits of its 64 largest
entries, renormalized over them at temperature T). Backends:

- ``kdfast``: ``kdfast.kd_loss`` (C++ on CPU, Triton on CUDA), the gradient in a new buffer (on CPU
  from the backend's pool of reusable buffers: a fresh, page-faulted one only while the previous
  round's gradient is still held, which pytest-benchmark does for one round);
- ``kdfast-inplace``: the same with ``inplace=True`` (the gradient overwrites the logits, as a
  training step that no longer needs them would do); the logits are restored outside the timing;
- ``torch-eager``: ``kdfast.reference.kd_loss``, the plain PyTorch formulation;
- ``torch-compile``: the same under ``torch.compile`` (compiled during the warm-up round);
- CUDA only, when Liger-Kernel is installed, dense teacher: ``liger-kldiv`` (``LigerKLDIVLoss`` on
  log_softmax(z/T) and softmax(t/T), times T^2) and ``liger-jsd`` (``LigerJSD``, beta 0.5, on the log-
  softmaxes), each plus ``F.cross_entropy`` for the hard term; ``kdfast-jsd`` is kdfast at that JSD.

Reported: the median of the timed rounds (CUDA-synchronized), GB/s against the bytes the op must
move (``shapes.kd_loss_bytes``: read the logits and the teacher, write the gradient), the device's
copy bandwidth measured in the same run (``dst.copy_(src)``, bytes read + written), on CUDA the peak
memory beyond the inputs, and, because the CPU machines are shared, the machine's 1-minute load
average around each case and the median CPU time of the process per round (all threads; on an idle
machine the wall time of a well-parallelized op approaches CPU time / cores).
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import platform
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from shapes import CPU_QUICK_SHAPES, CPU_SHAPES, CUDA_SHAPES, LossShape, kd_loss_bytes

import kdfast
from kdfast import reference

try:
    from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
except ImportError:
    LigerJSD = LigerKLDIVLoss = None

HAS_CUDA = torch.cuda.is_available()
TEMPERATURE = 2.0
LOSS_OPTIONS = {"temperature": TEMPERATURE, "hard_weight": 0.5, "soft_weight": 0.5}
ROUNDS = {"kdfast": 9, "kdfast-inplace": 9, "kdfast-jsd": 9, "torch-compile": 5, "torch-eager": 3,
          "liger-kldiv": 9, "liger-jsd": 9}
COPY_BYTES = 2**30


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    isa = getattr(kdfast._backend.cpu_extension(), "isa", lambda: "?")()
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, kdfast ISA {isa}"


def cpu_memory_system() -> str:
    """Caches of CPU 0 and the transparent-huge-page mode, from sysfs (empty where absent)."""
    caches = []
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index[0-9]*")):
        try:
            level, kind, size = (open(f"{index}/{name}").read().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            caches.append(f"L{level} {size}")
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        thp = "?"
    return f"caches per core/CPU 0: {', '.join(caches) or '?'}; transparent huge pages: {thp}"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Inputs and the timed steps
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)  # one shape's [N, V] tensors alive at a time
def make_inputs(shape: LossShape, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    n, v = shape.rows, shape.vocab
    logits = (2 * torch.randn(n, v, generator=gen, device=device)).to(shape.dtype)  # [N, V]
    teacher = (2 * torch.randn(n, v, generator=gen, device=device)).to(shape.dtype)  # [N, V]
    labels = torch.randint(0, v, (n,), generator=gen, device=device)  # [N]
    if shape.teacher == "dense":
        return logits, labels, {"teacher_logits": teacher}
    values, indices = teacher.topk(shape.k, dim=-1)  # [N, k]
    del teacher
    return logits, labels, {"teacher_indices": indices, "teacher_values": values, "teacher_kind": "logits"}


@functools.cache
def compiled_reference():
    return torch.compile(reference.kd_loss, dynamic=False)


def _liger_step(kind: str):
    def loss_fn(logits, labels, teacher_logits):
        log_q = torch.log_softmax(logits / TEMPERATURE, dim=-1)
        log_p = torch.log_softmax(teacher_logits / TEMPERATURE, dim=-1)
        if kind == "kldiv":
            soft = LigerKLDIVLoss(reduction="batchmean")(log_q, log_p.exp()) * TEMPERATURE**2
        else:
            soft = LigerJSD(beta=0.5)(log_q, log_p) * TEMPERATURE**2
        return 0.5 * F.cross_entropy(logits, labels) + 0.5 * soft

    return loss_fn


def loss_fn_for(backend: str, device: str):
    kdfast_backend = "triton" if device == "cuda" else "cpu"
    if backend in ("kdfast", "kdfast-inplace"):
        inplace = backend == "kdfast-inplace"
        return lambda z, y, teacher: kdfast.kd_loss(z, y, **teacher, **LOSS_OPTIONS, inplace=inplace, backend=kdfast_backend)
    if backend == "kdfast-jsd":
        return lambda z, y, teacher: kdfast.kd_loss(z, y, **teacher, **LOSS_OPTIONS, divergence="jsd", backend=kdfast_backend)
    if backend == "torch-eager":
        return lambda z, y, teacher: reference.kd_loss(z, y, **teacher, **LOSS_OPTIONS)
    if backend == "torch-compile":
        return lambda z, y, teacher: compiled_reference()(z, y, **teacher, **LOSS_OPTIONS)
    liger = _liger_step(backend.removeprefix("liger-"))
    return lambda z, y, teacher: liger(z, y, teacher["teacher_logits"])


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------

CPU_BACKENDS = ("kdfast", "kdfast-inplace", "torch-compile", "torch-eager")
CUDA_BACKENDS = ("kdfast", "kdfast-inplace", "kdfast-jsd", "torch-compile", "torch-eager", "liger-kldiv", "liger-jsd")


def _cases():
    cases = []
    cpu_shapes = CPU_QUICK_SHAPES if os.environ.get("KDFAST_BENCH_QUICK") == "1" else CPU_SHAPES
    for device, shapes, backends in (("cpu", cpu_shapes, CPU_BACKENDS), ("cuda", CUDA_SHAPES, CUDA_BACKENDS)):
        marks = [] if device == "cpu" or HAS_CUDA else [pytest.mark.skip(reason="no CUDA device")]
        for shape in shapes:
            for backend in backends:
                if backend.startswith("liger") or backend == "kdfast-jsd":
                    if shape.teacher != "dense":
                        continue
                    if backend.startswith("liger") and LigerJSD is None:
                        continue
                cases.append(pytest.param(device, shape, backend, marks=marks, id=f"{device}-{shape.label}-{backend}"))
    return cases


@pytest.mark.parametrize("device,shape,backend", _cases())
def test_kd_loss(benchmark, device, shape, backend):
    logits, labels, teacher = make_inputs(shape, device)
    loss_fn = loss_fn_for(backend, device)
    inplace = backend == "kdfast-inplace"
    work = logits.clone() if inplace else logits  # [N, V] overwritten by each inplace round

    def setup():
        if inplace:
            with torch.no_grad():
                work.copy_(logits)
        return (work.requires_grad_(True),), {}

    cpu_seconds = []

    def step(z):
        start = time.process_time()
        (grad,) = torch.autograd.grad(loss_fn(z, labels, teacher), z)
        _sync(device)
        cpu_seconds.append(time.process_time() - start)
        return grad

    load_before = os.getloadavg()
    try:
        benchmark.pedantic(step, setup=setup, rounds=ROUNDS[backend], warmup_rounds=1, iterations=1)
    except torch.cuda.OutOfMemoryError:  # the eager reference holds several fp32 [N, V] temporaries
        pytest.skip(f"{backend} runs out of device memory at {shape.label}")
    benchmark.extra_info.update(
        case=shape.label, backend=backend, device=device_name(device), bytes=kd_loss_bytes(shape),
        torch=torch.__version__, load_before=load_before, load_after=os.getloadavg(),
        memory_system=cpu_memory_system() if device == "cpu" else "",
        cpu_s_median=statistics.median(cpu_seconds[1:]),  # the first one is the warm-up round
        command="python -m pytest " + " ".join(sys.argv[1:]),
    )
    if device == "cuda":
        benchmark.extra_info["peak_extra_mib"] = _peak_extra_mib(step, setup)


def _peak_extra_mib(step, setup) -> float:
    (z,), _ = setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(z)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]
)
def test_copy_bandwidth(benchmark, device):
    make_inputs.cache_clear()
    src = torch.ones(COPY_BYTES // 4, device=device)
    dst = torch.zeros_like(src)

    def copy():
        dst.copy_(src)
        _sync(device)

    benchmark.pedantic(copy, rounds=9, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(backend="copy", device=device_name(device), bytes=2 * COPY_BYTES, torch=torch.__version__)


# ----------------------------------------------------------------------------------------------
# Markdown report from the pytest-benchmark JSON
# ----------------------------------------------------------------------------------------------


NOTES = """## Reading the numbers (generated with the table)

- GB/s: the bytes the op must move (read the logits and a dense teacher, or the top-k indices and
  values; write the gradient) over the median. Issue 16's CPU targets on this grid: kdfast at least
  6x torch-compile on float32 dense, 10x on float32 top-64, and 40% of the copy bandwidth.
- kdfast on CPU: one statistics pass stores the exponentials it computes, the gradient sweep
  computes none (the exponentials per element of every path are tabled in csrc/kd_loss.cpp);
  gradients above 32 MiB are written with non-temporal stores. `kdfast` takes its gradient buffer
  from the backend's pool (kdfast/ops/cpu/kd_loss.py): a fresh [N, V] buffer costs its first-touch
  page faults, on some VMs longer than the kernel. `kdfast-inplace` writes into the logits.
- The machines are shared: compare ratios taken in one run, and read them with the load average."""


def report(results: dict) -> str:
    rows = [(b["extra_info"], b["stats"]["median"], b["params"]) for b in results["benchmarks"]]
    copy = {p["device"]: info["bytes"] / median / 1e9 for info, median, p in rows if info.get("backend") == "copy"}
    order = {name: i for i, name in enumerate(CPU_BACKENDS + CUDA_BACKENDS)}
    cases = sorted(((info, median, p) for info, median, p in rows if info.get("backend") != "copy"),
                   key=lambda row: (row[2]["device"], row[0]["case"], order[row[0]["backend"]]))
    by_case = {}
    for info, median, _ in cases:
        by_case.setdefault(info["case"], {})[info["backend"]] = median
    first = cases[0][0] if cases else rows[0][0]
    lines = [
        "# kd_loss benchmark",
        "",
        f"- device: {first['device']}",
        f"- torch {first['torch']}, kdfast {kdfast.__version__}, {results['datetime']}",
        f"- command: `{first.get('command', '')}`",
        "- timed: forward + backward (`torch.autograd.grad(loss, logits)`), labels, T=2, "
        + "hard_weight=soft_weight=0.5, forward KL, mean; top-64 teacher: `teacher_kind=\"logits\"`",
        *([f"- {first['memory_system']}"] if first.get("memory_system") else []),
        "- copy bandwidth (`dst.copy_(src)`, 1 GiB, read + write): "
        + ", ".join(f"{dev} {gbs:.1f} GB/s" for dev, gbs in copy.items()),
        "",
        "| case | backend | median s | GB/s | % of copy BW | vs torch-compile | vs torch-eager | CPU s (all threads) | load avg before/after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for info, median, params in cases:
        gbs = info["bytes"] / median / 1e9
        medians = by_case[info["case"]]
        load = f"{info['load_before'][0]:.1f} / {info['load_after'][0]:.1f}"
        peak = f" (peak +{info['peak_extra_mib']:.0f} MiB)" if "peak_extra_mib" in info else ""
        share = f"{100 * gbs / copy[params['device']]:.1f}%" if params["device"] in copy else "-"
        lines.append(
            f"| {info['case']} | {info['backend']}{peak} | {median:.4f} | {gbs:.1f} | {share} | "
            f"{_speedup(medians, 'torch-compile', median)} | {_speedup(medians, 'torch-eager', median)} | "
            f"{info['cpu_s_median']:.3f} | {load} |"
        )
    return "\n".join(lines + ["", NOTES]) + "\n"


def _speedup(medians: dict, baseline: str, median: float) -> str:
    return f"{medians[baseline] / median:.2f}x" if baseline in medians else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description="Markdown table from a bench_kd_loss pytest-benchmark JSON")
    parser.add_argument("json_path")
    parser.add_argument("markdown_path")
    args = parser.parse_args()
    with open(args.json_path) as f:
        text = report(json.load(f))
    with open(args.markdown_path, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
