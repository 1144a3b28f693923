"""fused_linear_kd_loss vs the eager path: time and peak memory of forward + backward.

    python bench/bench_fused_linear_kd_loss.py --device cpu  --markdown bench/results/fused_linear_kd_loss-cpu.md
    python bench/bench_fused_linear_kd_loss.py --device cuda --markdown bench/results/fused_linear_kd_loss-cuda.md

Variants, all forward + backward to hidden and weight, top-64 sparse teacher, hard_weight 0.5, one run:
- ``eager``: ``logits = hidden @ weight.T`` with autograd, then ``kdfast.reference.kd_loss`` (the plain
  PyTorch loss), what a training script does without kdfast;
- ``eager+kdfast``: the same logits, then ``kdfast.kd_loss`` (fused loss, [N, V] logits still held);
- ``fused``: ``kdfast.fused_linear_kd_loss`` with the default chunk size;
- ``matmuls``: the three matmuls alone (logits, grad_hidden, grad_weight), the floor of any fused linear loss;
- CUDA only, when installed: Liger's ``LigerFusedLinearJSDLoss`` at the same shape; as it takes an online
  teacher (teacher hidden + weight) and JSD, it is compared with ``fused`` run on the same online teacher.

Time: median wall clock of ``--reps`` rounds after one warm-up, each round running every variant once
(CUDA-synchronized), so that a change of machine load hits all variants alike. Throughput
is TFLOP/s against the 6·N·H·V flops of the three matmuls, which is what this op must do; the bytes
it moves are dominated by them too (the loss's own GB/s is bench_kd_loss's business).

Peak memory is the extra memory while one forward + backward runs, inputs excluded, the returned
gradients included. CPU: the process's resident-set high-water mark (``VmHWM`` in
``/proc/self/status``), reset before each repetition by writing ``5`` to ``/proc/self/clear_refs``,
minus the resident set just before; PyTorch's CPU allocator has no cache and glibc returns these
large blocks (mmap'd) to the kernel on free, so RSS follows the tensors. CUDA:
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the allocation before.
The largest of the repetitions is reported.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import kdfast
from kdfast import reference

MiB = 2**20


@dataclass(frozen=True)
class Shape:
    rows: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    k: int = 64

    @property
    def flops(self) -> int:
        return 6 * self.rows * self.hidden * self.vocab

    @property
    def label(self) -> str:
        return f"N={self.rows} H={self.hidden} V={self.vocab} {str(self.dtype).removeprefix('torch.')} top-{self.k}"


CPU_SHAPE = Shape(4096, 1024, 128256, torch.float32)
CUDA_SHAPE = Shape(8192, 4096, 128256, torch.bfloat16)
LOSS_OPTIONS = {"hard_weight": 0.5, "temperature": 1.0}
EAGER = "eager: hidden @ W.T + reference.kd_loss"
FUSED = "fused_linear_kd_loss"


def make_inputs(shape: Shape, device: torch.device, online_teacher: bool = False) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(shape.dtype)

    inputs = {
        "hidden": randn(shape.rows, shape.hidden).requires_grad_(),
        "weight": randn(shape.vocab, shape.hidden, scale=shape.hidden**-0.5).requires_grad_(),
        "labels": torch.randint(0, shape.vocab, (shape.rows,), generator=gen, device=device),
    }
    if online_teacher:
        inputs["teacher_hidden"] = randn(shape.rows, shape.hidden)
        inputs["teacher_weight"] = randn(shape.vocab, shape.hidden, scale=shape.hidden**-0.5)
    else:
        inputs["teacher_indices"] = torch.randint(0, shape.vocab, (shape.rows, shape.k), generator=gen, device=device)
        inputs["teacher_values"] = randn(shape.rows, shape.k, scale=3.0)
    return inputs


def teacher_of(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k.startswith("teacher_")}


def eager(inputs, loss_fn):
    logits = inputs["hidden"] @ inputs["weight"].T
    loss = loss_fn(logits, inputs["labels"], **teacher_of(inputs), **LOSS_OPTIONS)
    return torch.autograd.grad(loss, [inputs["hidden"], inputs["weight"]])


def fused(inputs, **options):
    loss = kdfast.fused_linear_kd_loss(
        inputs["hidden"], inputs["weight"], inputs["labels"], **teacher_of(inputs), **LOSS_OPTIONS, **options
    )
    return torch.autograd.grad(loss, [inputs["hidden"], inputs["weight"]])


def matmuls(inputs, grad_logits):
    """The three GEMMs of any (fused or not) linear + loss, with a given [N, V] gradient."""
    hidden, weight = inputs["hidden"].detach(), inputs["weight"].detach()
    logits = hidden @ weight.T
    del logits
    return grad_logits @ weight, grad_logits.T @ hidden


def liger_jsd(inputs, loss_module):
    loss = loss_module(
        inputs["hidden"], inputs["weight"], inputs["teacher_hidden"], inputs["teacher_weight"], inputs["labels"]
    )
    return torch.autograd.grad(loss, [inputs["hidden"], inputs["weight"]])


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _start_memory(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _proc_status_kib("VmRSS") * 1024


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_status_kib("VmHWM") * 1024


def measure_once(fn, device: torch.device) -> tuple[float, int]:
    """(seconds, extra peak bytes) of one fn() call."""
    base = _start_memory(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _peak_memory(device) - base
    del result
    return seconds, peak


def measure(variants: dict, device: torch.device, reps: int) -> dict:
    """Median seconds and largest extra peak bytes per variant: one warm-up each, then ``reps`` rounds
    that run every variant once, so that a change of machine load hits all variants alike."""
    for fn in variants.values():
        fn()
    runs = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            runs[name].append(measure_once(fn, device))
    return {
        name: {"seconds": statistics.median(t for t, _ in r), "times": [t for t, _ in r], "peak": max(p for _, p in r)}
        for name, r in runs.items()
    }


def run_case(shape: Shape, device: torch.device, reps: int) -> dict:
    inputs = make_inputs(shape, device)
    # Input of the matmul floor; allocated before any measurement, so it counts in no variant's peak.
    grad_logits = torch.randn(shape.rows, shape.vocab, device=device).to(shape.dtype)
    variants = {
        "matmuls (3 GEMMs alone)": lambda: matmuls(inputs, grad_logits),
        EAGER: lambda: eager(inputs, reference.kd_loss),
        "eager: hidden @ W.T + kdfast.kd_loss": lambda: eager(inputs, kdfast.kd_loss),
        FUSED: lambda: fused(inputs),
    }
    results = measure(variants, device, reps)
    results[FUSED]["backend"] = kdfast.last_backend()
    if device.type == "cuda":
        results.update(run_online_jsd(shape, device, reps))
    return results


def run_online_jsd(shape: Shape, device: torch.device, reps: int) -> dict:
    """Online teacher (hidden + weight), JSD beta 0.5: ours and Liger's, when Liger is installed."""
    inputs = make_inputs(shape, device, online_teacher=True)
    variants = {"fused_linear_kd_loss, online teacher, JSD": lambda: fused(inputs, divergence="jsd", beta=0.5)}
    try:
        from liger_kernel.transformers import LigerFusedLinearJSDLoss
    except ImportError:
        return measure(variants, device, reps)
    module = LigerFusedLinearJSDLoss(jsd_beta=0.5, temperature=1.0)
    variants["Liger LigerFusedLinearJSDLoss, online teacher"] = lambda: liger_jsd(inputs, module)
    return measure(variants, device, reps)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor()


def report(shape: Shape, device: torch.device, results, reps: int, load: tuple[float, float]) -> str:
    eager_time, eager_peak = results[EAGER]["seconds"], results[EAGER]["peak"]
    lines = [
        f"# fused_linear_kd_loss, {device.type}",
        "",
        f"- device: {device_name(device)}",
        f"- torch {torch.__version__}, kdfast {kdfast.__version__}, backends {kdfast.available_backends()}",
        f"- shape: {shape.label}; forward + backward to hidden and weight; options {LOSS_OPTIONS}",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- 1-minute load average at start / end: {load[0]:.1f} / {load[1]:.1f} (other processes on the machine slow all variants)",
        f"- one warm-up, then {reps} rounds running each variant once; time = median, peak = largest extra memory (method: bench file docstring)",
        "",
        "| variant | median s | TFLOP/s | vs eager time | peak extra MiB | vs eager peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        backend = f" ({r['backend']} backend)" if "backend" in r else ""
        lines.append(
            f"| {name}{backend} | {r['seconds']:.3f} | {shape.flops / r['seconds'] / 1e12:.3f} | "
            f"{r['seconds'] / eager_time:.2f}x | {r['peak'] / MiB:.0f} | {r['peak'] / eager_peak:.3f} |"
        )
    lines += [
        "",
        "Repetition times (s): "
        + "; ".join(f"{n}: {', '.join(f'{t:.2f}' for t in r['times'])}" for n, r in results.items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", type=int, help="override N of the default shape")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the CUDA case is skipped")
        return
    device = torch.device(args.device)
    shape = CUDA_SHAPE if device.type == "cuda" else CPU_SHAPE
    if args.rows:
        shape = Shape(args.rows, shape.hidden, shape.vocab, shape.dtype, shape.k)
    load_start = os.getloadavg()[0]
    results = run_case(shape, device, args.reps)
    text = report(shape, device, results, args.reps, (load_start, os.getloadavg()[0]))
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
