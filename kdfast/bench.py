"""`kdfast bench`: time the fused loss on this machine against the PyTorch reference.

One forward + backward of ``hard_weight * CE + soft_weight * T^2 * KL`` per measurement
(``LOSS_OPTIONS``), for every implementation that can run on the chosen device:

    kdfast-cpu, kdfast-triton   ``kdfast.kd_loss(..., backend=...)`` (Triton only on CUDA: the
                                interpreter is a correctness tool, not something to time)
    torch-eager                 ``kdfast.reference.kd_loss``, the plain PyTorch formulation
    torch-compile               the same function under ``torch.compile``, compiled for each shape
                                (static shapes, as a training loop with fixed shapes gets) in the
                                untimed warm-up
    liger                       Liger-Kernel's CE + KL-divergence kernels, where installed (CUDA,
                                dense teachers only: Liger has no sparse-teacher loss)

Shapes come from ``kdfast._shapes`` (the grid ``bench/`` uses too). Every number is the median of
``--repeats`` timed runs after one untimed warm-up, CUDA-synchronized on GPU. The runs are interleaved
(each round runs every implementation) so that a change of machine load hits all of them alike, and
each timed run directly follows an untimed run of the same implementation: it is timed in the state
its own previous call left (caches, kdfast's gradient buffer pool), as a loop calling it repeatedly
sees and as ``bench/bench_kd_loss.py`` times it, not in the state the implementation before it in the
round left (kdfast timed right after torch-eager's and torch-compile's steps measured 24% (dense) and
34% (top-64) slower at N=1024, V=128256 float32: bench/results/bench-cli-vs-suite.md). GB/s is computed
against ``kd_loss_bytes`` (the traffic the op cannot avoid) and also shown as a percentage of this
machine's measured copy bandwidth (``tensor.copy_`` of a large buffer, read + write). Peak memory is
what one forward + backward allocates through PyTorch above what was live before it: on CUDA from
``max_memory_allocated``, on CPU from the profiler's memory timeline (the only allocation record the
CPU allocator keeps).

Writes ``bench.json`` (machine, settings, every result) and ``bench_vocab.png`` (time against
vocabulary size) into the output directory (``kdfast bench --out``) and prints the table.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import kdfast
from kdfast import reference
from kdfast._backend import resolve_device, synchronize
from kdfast._shapes import (
    CPU_QUICK_SHAPES,
    CPU_SHAPES,
    CUDA_SHAPES,
    QUICK_VOCAB_SWEEP,
    VOCAB_SWEEP,
    LossShape,
    kd_loss_bytes,
    vocab_sweep,
)
from kdfast.report import describe_machine, load_average, markdown_table, plot_sweep

__all__ = ["LOSS_OPTIONS", "IMPLS", "run_bench"]

LOSS_OPTIONS = {"temperature": 2.0, "hard_weight": 0.5, "soft_weight": 0.5}
TOPK_KIND = "logits"  # renormalized top-k teacher logits, as in bench/bench_kd_loss.py
IMPLS = ("kdfast-cpu", "kdfast-triton", "torch-eager", "torch-compile", "liger")
MIB = 2**20

LossFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass
class Result:
    impl: str
    shape: str
    rows: int
    vocab: int
    dtype: str
    teacher: str
    k: int
    repeats: int
    median_ms: float | None = None
    gbps: float | None = None
    pct_copy: float | None = None
    peak_mib: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Plan:
    """What one `kdfast bench` invocation measures."""

    device: torch.device
    shapes: list[LossShape]
    sweep: list[LossShape]
    repeats: int
    copy_mib: int


def run_bench(out: Path, *, device: str | None = None, quick: bool = False, repeats: int | None = None,
              impls: list[str] | None = None, sweep: bool = True) -> int:
    """Measure, print the table, write ``out/bench.json`` (and ``out/bench_vocab.png`` with the sweep).
    device: "cpu", "cuda" or None (CUDA when available); impls: names from IMPLS (default: all that
    can run here). Returns 1 when any measurement failed (its cell shows the error), else 0."""
    device = resolve_device(device)
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    plan = make_plan(device, quick, repeats, not sweep)
    impls, skipped = available_impls(device, impls)
    machine = describe_machine(device)
    print(f"kdfast bench on {machine['device_name']} ({device.type}, {machine['threads']} threads)", flush=True)
    for name, reason in skipped.items():
        print(f"  skipped {name}: {reason}", flush=True)

    copy_gbps = copy_bandwidth(device, plan.copy_mib, plan.repeats)
    print(f"  copy bandwidth: {copy_gbps:.1f} GB/s (read + write of {plan.copy_mib} MiB)", flush=True)
    results = measure_all(plan, impls, copy_gbps)
    machine |= {"copy_gbps": copy_gbps, "load_average_after": load_average()}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench.json"
    report = {
        "machine": machine,
        "settings": {"quick": quick, "repeats": plan.repeats, "loss": LOSS_OPTIONS, "topk_kind": TOPK_KIND,
                     "skipped": skipped},
        "results": [asdict(r) for r in results["table"]],
        "sweep": [asdict(r) for r in results["sweep"]],
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_table(results["table"], machine))
    print(f"\nwrote {json_path}", end="")
    if plan.sweep:
        png_path = out / "bench_vocab.png"
        plot_vocab_sweep(results["sweep"], png_path, machine["device_name"])
        print(f" and {png_path}", end="")
    print()
    return 1 if any(r.error for r in results["table"] + results["sweep"]) else 0


# ----------------------------------------------------------------------------------------------
# What to run
# ----------------------------------------------------------------------------------------------


def make_plan(device: torch.device, quick: bool, repeats: int | None, no_sweep: bool) -> Plan:
    if device.type == "cuda":
        shapes = CUDA_SHAPES[:1] if quick else CUDA_SHAPES
        sweep = vocab_sweep(VOCAB_SWEEP[:2] if quick else VOCAB_SWEEP, 4096, torch.bfloat16)
        default_repeats, copy_mib = (5, 256) if quick else (20, 1024)
    elif quick:
        shapes, sweep = CPU_QUICK_SHAPES, vocab_sweep(QUICK_VOCAB_SWEEP, 256, torch.float32)
        default_repeats, copy_mib = 3, 64
    else:
        shapes, sweep = CPU_SHAPES, vocab_sweep(VOCAB_SWEEP, 256, torch.float32)
        default_repeats, copy_mib = 5, 512
    return Plan(device, shapes, [] if no_sweep else sweep, repeats or default_repeats, copy_mib)


def available_impls(device: torch.device, wanted: list[str] | None) -> tuple[dict[str, LossFn], dict[str, str]]:
    """Implementations runnable on ``device`` (name -> loss function) and why the others are not."""
    unknown = sorted(set(wanted or ()) - set(IMPLS))
    if unknown:
        raise ValueError(f"impls: {unknown} not among {IMPLS}")
    backends = kdfast.available_backends()
    impls: dict[str, LossFn] = {}
    skipped: dict[str, str] = {}
    for name in wanted or IMPLS:
        reason = _unavailable_reason(name, device, backends)
        if reason:
            skipped[name] = reason
        else:
            impls[name] = _make_impl(name)
    return impls, skipped


def _unavailable_reason(name: str, device: torch.device, backends: list[str]) -> str | None:
    if name == "kdfast-cpu":
        if device.type != "cpu":
            return "CPU backend; run with --device cpu"
        return None if "cpu" in backends else "the kdfast._C extension is not built"
    if name == "kdfast-triton":
        if device.type != "cuda":
            return "needs CUDA (the Triton interpreter is for tests, not timing)"
        return None if "triton" in backends else "triton is not installed"
    if name == "liger":
        if device.type != "cuda":
            return "Liger-Kernel runs on CUDA only"
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
    return None


def _make_impl(name: str) -> LossFn:
    if name.startswith("kdfast-"):
        backend = name.removeprefix("kdfast-")
        return lambda z, y, teacher: kdfast.kd_loss(z, y, **teacher, **LOSS_OPTIONS, backend=backend)
    if name == "torch-eager":
        return lambda z, y, teacher: reference.kd_loss(z, y, **teacher, **LOSS_OPTIONS)
    if name == "torch-compile":
        compiled = torch.compile(reference.kd_loss, dynamic=False)
        return lambda z, y, teacher: compiled(z, y, **teacher, **LOSS_OPTIONS)
    return _liger_loss()


def _liger_loss() -> LossFn:
    """Liger's kernels composed the way a user would: fused CE, plus KL on torch log-softmaxes."""
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    ce = LigerCrossEntropyLoss()
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    temperature = LOSS_OPTIONS["temperature"]

    def loss(z, y, teacher):
        log_q = torch.log_softmax(z.float() / temperature, dim=-1)
        log_p = torch.log_softmax(teacher["teacher_logits"].float() / temperature, dim=-1)
        soft = LOSS_OPTIONS["soft_weight"] * temperature**2 * kl(log_q, log_p)
        return LOSS_OPTIONS["hard_weight"] * ce(z, y) + soft

    return loss


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _timed_after_own_run(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of ``fn`` run right after an untimed ``fn``: timed in the state (caches, buffer pool) its
    own previous call left, not in whatever the code before it left."""
    fn()
    return _timed(fn, device)


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one untimed warm-up."""
    fn()
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def copy_bandwidth(device: torch.device, mib: int, repeats: int) -> float:
    """GB/s of ``dst.copy_(src)`` counting the read and the write: the roofline for a streaming op."""
    src = torch.randn(mib * MIB // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, max(repeats, 5))
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def make_inputs(shape: LossShape, device: torch.device, seed: int = 0):
    """Student logits (a leaf that wants a gradient), labels and the teacher keyword arguments."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, v = shape.rows, shape.vocab
    logits = torch.randn(n, v, generator=gen).to(device=device, dtype=shape.dtype).requires_grad_()  # [N, V]
    labels = torch.randint(0, v, (n,), generator=gen).to(device)  # [N]
    if shape.teacher == "dense":
        teacher = {"teacher_logits": torch.randn(n, v, generator=gen).to(device=device, dtype=shape.dtype)}  # [N, V]
    else:
        # Distinct indices per row without sorting [N, V] random numbers: slot j of row r is j*s + o_r, o_r < s.
        stride = v // shape.k
        offsets = torch.randint(0, stride, (n, 1), generator=gen)
        indices = torch.arange(shape.k)[None, :] * stride + offsets  # [N, k]
        values = torch.randn(n, shape.k, generator=gen)  # [N, k] teacher logits of those slots
        teacher = {
            "teacher_indices": indices.to(device),
            "teacher_values": values.to(device=device, dtype=shape.dtype),
            "teacher_kind": TOPK_KIND,
        }
    return logits, labels, teacher


def measure_shape(shape: LossShape, impls: dict[str, LossFn], plan: Plan, copy_gbps: float) -> list[Result]:
    """Every implementation on one shape, interleaved: one untimed warm-up each (compiles), then
    ``repeats`` rounds that time each implementation once (``_timed_after_own_run``), so that a change
    of machine load during the measurement hits all of them alike."""
    logits, labels, teacher = make_inputs(shape, plan.device)
    results, steps, times = {}, {}, {}
    for name, fn in impls.items():
        results[name] = Result(name, shape.label, shape.rows, shape.vocab, str(shape.dtype).removeprefix("torch."),
                               shape.teacher, shape.k if shape.teacher != "dense" else 0, plan.repeats)
        steps[name] = _step(fn, logits, labels, teacher)
        times[name] = []
        _guarded(results[name], steps[name])
    for _ in range(plan.repeats):
        for name in impls:
            if not results[name].error:
                timed = functools.partial(_timed_after_own_run, steps[name], plan.device)
                times[name].append(_guarded(results[name], timed))
    for name, result in results.items():
        if result.error:
            continue
        seconds = statistics.median(times[name])
        result.median_ms = seconds * 1e3
        result.gbps = kd_loss_bytes(shape) / seconds / 1e9
        result.pct_copy = 100 * result.gbps / copy_gbps
        logits.grad = None  # else the previous gradient, freed inside the step, hides the new one
        peak = peak_memory(steps[name], plan.device)
        result.peak_mib = None if peak is None else peak / MIB
    return list(results.values())


def _step(fn: LossFn, logits: torch.Tensor, labels: torch.Tensor, teacher: dict) -> Callable[[], None]:
    """One forward + backward; the gradient of the previous one is dropped first."""

    def step() -> None:
        logits.grad = None
        fn(logits, labels, teacher).backward()

    return step


def _guarded(result: Result, fn: Callable):
    """``fn()``, or None with ``result.error`` set: one failing cell must not lose the rest of the table."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 (reported in the table; the other cells still run)
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return None


def peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Bytes allocated through PyTorch during one ``step`` above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_memory(step)


def _cpu_peak_memory(step: Callable[[], None]) -> int | None:
    """From the profiler's memory timeline; None where this PyTorch cannot export one."""
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                     with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the export is deprecated in favour of CUDA-only tools
        path = Path(tmp) / "timeline.json"
        try:
            prof.export_memory_timeline(str(path), device="cpu")
        except (AttributeError, RuntimeError, ValueError):
            return None
        _, sizes = json.loads(path.read_text())
    totals = [sum(categories) for categories in sizes]
    return max(totals) - totals[0] if totals else 0


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's native library logs every start and stop on file descriptor 2; mute it meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_all(plan: Plan, impls: dict[str, LossFn], copy_gbps: float) -> dict[str, list[Result]]:
    """The table shapes, then the sweep; a sweep shape already in the table is not run twice."""
    done: dict[str, list[Result]] = {}
    out: dict[str, list[Result]] = {"table": [], "sweep": []}
    for part, shapes in (("table", plan.shapes), ("sweep", plan.sweep)):
        for shape in shapes:
            if shape.label not in done:
                runnable = {name: fn for name, fn in impls.items() if name != "liger" or shape.teacher == "dense"}
                if "torch-compile" in runnable:
                    torch._dynamo.reset()  # a static-shape graph per shape, never the recompile limit
                done[shape.label] = measure_shape(shape, runnable, plan, copy_gbps)  # Liger: dense teachers only
                for result in done[shape.label]:
                    _print_progress(result)
            out[part].extend(done[shape.label])
    return out


def _print_progress(r: Result) -> None:
    status = r.error if r.error else f"{r.median_ms:.2f} ms"
    print(f"  {r.impl:<14} {r.shape:<34} {status}", flush=True)


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def format_table(results: list[Result], machine: dict) -> str:
    header = ("impl", "shape", "median ms", "GB/s", "% copy BW", "peak MiB")
    rows = []
    for r in results:
        if r.error:
            rows.append((r.impl, r.shape, "error", "", "", r.error[:60]))
        else:
            peak = "n/a" if r.peak_mib is None else f"{r.peak_mib:.0f}"
            rows.append((r.impl, r.shape, f"{r.median_ms:.2f}", f"{r.gbps:.1f}", f"{r.pct_copy:.0f}%", peak))
    title = (f"kd_loss forward+backward on {machine['device_name']} ({machine['threads']} threads), median times; "
             f"copy bandwidth {machine['copy_gbps']:.1f} GB/s")
    if machine["device"] == "cpu" and machine["load_average"] is not None:
        title += f"; load average {machine['load_average'][0]:.1f} -> {machine['load_average_after'][0]:.1f}"
    return f"{title}\n\n{markdown_table(header, rows)}"


def plot_vocab_sweep(results: list[Result], path: Path, device_name: str) -> None:
    """Median time against V, one line per implementation (``kdfast.report.plot_sweep``)."""
    series = {impl: [(r.vocab, r.median_ms) for r in results if r.impl == impl and not r.error]
              for impl in dict.fromkeys(r.impl for r in results)}
    first = results[0] if results else None
    subtitle = f" (N={first.rows}, {first.dtype}, {first.teacher} teacher)" if first else ""
    plot_sweep(path, series, title=f"kd_loss on {device_name}{subtitle}")

