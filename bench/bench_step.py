"""One distillation training step of a Llama-style student: kdfast's fused loss against the plain PyTorch loop.

    python bench/bench_step.py --device cpu  --markdown bench/results/step-cpu.md
    python bench/bench_step.py --device cuda --markdown bench/results/step-cuda.md

A step is forward + backward + ``AdamW.step()`` + ``zero_grad(set_to_none=True)`` of a student built from a
``transformers.LlamaConfig`` (float32, random init, nothing downloaded) on one batch of sparse top-64
targets shaped as ``kdfast.shards.ShardDataset`` yields them and the default collate stacks them:
input_ids / labels [B, L] int64 (labels shifted, the last position -100), teacher_indices [B, L, 64] int32,
teacher_values [B, L, 64] float32 log-probs and teacher_tail [B, L] float32 (log of the teacher's mass
outside the slots). Loss: 0.2 CE + 0.8 forward KL with the tail bucket, T = 1, mean over the labelled
positions. Variants, each with its own copy of the same initial model and its own AdamW:

- ``kdfast``: what ``kdfast.train`` does (``DistillationModule.forward``): the decoder's last hidden state
  and the LM head weight from ``kdfast.hf.hidden_and_head``, then ``kdfast.fused_linear_kd_loss``
  (``teacher_kind="logprobs", tail=True``, the batch's ``teacher_tail``); no [B, L, V] logits exist;
- ``torch eager``: the loop a user writes without kdfast: ``model(input_ids).logits`` ([B, L, V]), then
  ``plain_torch_loss``: ``log_softmax`` over the vocabulary, gathered at the teacher's indices,
  ``F.kl_div(..., log_target=True)`` over the slots plus the tail bucket, and ``F.cross_entropy``;
- ``torch.compile``: the same with ``plain_torch_loss`` under ``torch.compile(dynamic=False)`` (the model
  stays eager: compiling the whole step takes minutes per shape on a small CPU). Its first call, which
  compiles, is reported as the compile time.

Before timing, every variant's first loss (same weights, same batch) is compared; they must agree to
1e-4 relative or the run stops, so the variants compute the same thing. Then one untimed warm-up step
each (AdamW allocates its state), then ``--steps`` rounds that run every variant once, so that a change
of machine load hits all of them alike. Reported per variant: the median step time, and the peak extra
memory of a step: CPU, the resident-set high-water mark (``VmHWM``, reset by writing ``5`` to
``/proc/self/clear_refs``) minus the resident set just before the step, after ``malloc_trim(0)`` has
returned glibc's free heap to the OS (tensors of 32 MiB and more are mmap'd and go back on free); CUDA,
``max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus the allocation before. The largest
over the timed steps is reported; the model, its AdamW state and the batch are resident before the step,
so the peak is activations, gradients and the loss's temporaries.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import kdfast
from kdfast import hf

MiB = 2**20
IGNORE_INDEX = -100
TOP_K = 64
HARD_WEIGHT, SOFT_WEIGHT, TEMPERATURE = 0.2, 0.8, 1.0
KDFAST_LOSS = {"teacher_kind": "logprobs", "tail": True, "temperature": TEMPERATURE,
               "hard_weight": HARD_WEIGHT, "soft_weight": SOFT_WEIGHT}
AGREEMENT_RTOL = 1e-4
VARIANTS = ("kdfast", "torch eager", "torch.compile")


@dataclass(frozen=True)
class StepConfig:
    vocab: int
    batch: int
    seq: int

    @property
    def label(self) -> str:
        return f"V={self.vocab} B={self.batch} L={self.seq}"


# Student: a small Llama; the decoder is cheap next to the [B*L, V] head at these vocabularies.
STUDENT = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
           "num_key_value_heads": 8, "max_position_embeddings": 8192, "tie_word_embeddings": False}
CPU_CONFIGS = [StepConfig(32000, 1, 512), StepConfig(32000, 1, 2048), StepConfig(128256, 1, 512),
               StepConfig(128256, 1, 1024)]
CUDA_CONFIGS = [StepConfig(32000, 4, 2048), StepConfig(32000, 4, 4096), StepConfig(128256, 4, 2048),
                StepConfig(128256, 4, 4096)]


# ---------------------------------------------------------------------------------------------
# Model, batch, losses
# ---------------------------------------------------------------------------------------------


def build_student(vocab: int, device: torch.device, seed: int = 0):
    """A float32 ``LlamaForCausalLM`` from a config, randomly initialised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **STUDENT)).to(device)


def sparse_batch(config: StepConfig, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random top-k targets as ShardDataset + default collate give them: distinct indices per position,
    log-probs sorted high to low, and a tail of 2-30% of the teacher's mass outside the slots."""
    gen = torch.Generator().manual_seed(seed)
    b, length, v = config.batch, config.seq, config.vocab
    input_ids = torch.randint(0, v, (b, length), generator=gen)  # [B, L]
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # [B, L]
    labels[:, :-1] = input_ids[:, 1:]
    stride = v // TOP_K  # slot j of a position holds an id in [j * stride, (j + 1) * stride): all distinct
    indices = torch.arange(TOP_K) * stride + torch.randint(0, stride, (b, length, TOP_K), generator=gen)  # [B, L, k]
    tail_mass = 0.02 + 0.28 * torch.rand(b, length, generator=gen)  # [B, L]
    slot_probs = torch.softmax(2 * torch.randn(b, length, TOP_K, generator=gen), dim=-1).sort(-1, descending=True).values
    values = (slot_probs * (1 - tail_mass)[..., None]).log()  # [B, L, k] log-probs
    batch = {"input_ids": input_ids, "labels": labels, "teacher_indices": indices.to(torch.int32),
             "teacher_values": values, "teacher_tail": tail_mass.log()}
    return {name: t.to(device) for name, t in batch.items()}


def kdfast_loss(model, batch: dict) -> torch.Tensor:
    """The trainer's path: hidden states and head weight into the fused loss; no logits are materialized."""
    hidden, weight, bias = hf.hidden_and_head(model, batch["input_ids"])
    return kdfast.fused_linear_kd_loss(hidden, weight, batch["labels"], bias=bias,
                                       teacher_indices=batch["teacher_indices"],
                                       teacher_values=batch["teacher_values"],
                                       teacher_tail=batch["teacher_tail"], **KDFAST_LOSS)


def plain_torch_loss(logits, labels, teacher_indices, teacher_values, teacher_tail) -> torch.Tensor:
    """Without kdfast: hard_weight * CE + soft_weight * T^2 * KL(p || q) over the top-k slots and the tail
    bucket (the teacher's mass outside the slots against the student's, 1 - sum of its slot probabilities),
    averaged over the labelled positions. logits [B, L, V], labels [B, L], teacher_* [B, L, k] / [B, L]."""
    logits, labels = logits.flatten(0, 1).float(), labels.flatten()  # [N, V], [N]
    log_q = F.log_softmax(logits / TEMPERATURE, dim=-1)  # [N, V]
    log_q_slots = log_q.gather(-1, teacher_indices.flatten(0, 1).long())  # [N, k]
    kl_slots = F.kl_div(log_q_slots, teacher_values.flatten(0, 1), log_target=True, reduction="none").sum(-1)  # [N]
    log_p_rest = teacher_tail.flatten()  # [N]
    log_q_rest = (1 - log_q_slots.exp().sum(-1)).clamp_min(torch.finfo(torch.float32).tiny).log()  # [N]
    kl = kl_slots + log_p_rest.exp() * (log_p_rest - log_q_rest)  # [N]
    active = labels != IGNORE_INDEX
    kl_mean = torch.where(active, kl, torch.zeros_like(kl)).sum() / active.sum()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return HARD_WEIGHT * ce + SOFT_WEIGHT * TEMPERATURE**2 * kl_mean


def logits_loss(loss_fn):
    """Loss of the plain loop: the model's full logits, then ``loss_fn`` (plain_torch_loss, maybe compiled)."""
    def loss(model, batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # [B, L, V]
        return loss_fn(logits, batch["labels"], batch["teacher_indices"], batch["teacher_values"],
                       batch["teacher_tail"])
    return loss


class Trainee:
    """One variant: its own copy of the student, its AdamW and its loss function."""

    def __init__(self, model, loss_of_batch):
        self.model = model
        self.loss_of_batch = loss_of_batch
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def first_loss(self, batch: dict) -> float:
        """Forward + backward without an optimizer step: the loss at the initial weights."""
        loss = self.loss_of_batch(self.model, batch)
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def step(self, batch: dict) -> None:
        """One training step: forward, backward, AdamW step, gradients dropped."""
        loss = self.loss_of_batch(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def make_trainees(config: StepConfig, device: torch.device) -> dict[str, Trainee]:
    """The three variants, each on its own copy of one freshly initialised student."""
    torch._dynamo.reset()  # a static-shape graph per configuration
    model = build_student(config.vocab, device)
    losses = {"kdfast": kdfast_loss, "torch eager": logits_loss(plain_torch_loss),
              "torch.compile": logits_loss(torch.compile(plain_torch_loss, dynamic=False))}
    return {name: Trainee(copy.deepcopy(model), losses[name]) for name in VARIANTS}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _trim_heap() -> None:
    """Return glibc's free heap memory to the OS, so the resident set before a step holds live data only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _memory_before(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _trim_heap()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    return _proc_status_bytes("VmRSS")


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def timed_step(trainee: Trainee, batch: dict, device: torch.device) -> tuple[float, int]:
    """(seconds, peak extra bytes) of one training step."""
    before = _memory_before(device)
    start = time.perf_counter()
    trainee.step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, _memory_peak(device) - before


def check_agreement(trainees: dict[str, Trainee], batch: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(first loss, seconds of that call) per variant; raises when a loss differs from kdfast's by more
    than AGREEMENT_RTOL. The compiled variant compiles during this call."""
    losses, seconds = {}, {}
    for name, trainee in trainees.items():
        start = time.perf_counter()
        losses[name] = trainee.first_loss(batch)
        seconds[name] = time.perf_counter() - start
    reference = losses["kdfast"]
    for name, value in losses.items():
        if abs(value - reference) > AGREEMENT_RTOL * abs(reference):
            raise RuntimeError(f"bench_step: {name} loss {value!r} differs from kdfast's {reference!r}")
    return losses, seconds


def run_config(config: StepConfig, device: torch.device, steps: int) -> dict:
    """Every variant on one configuration: agreement check, a warm-up step each, then interleaved rounds."""
    load_before = os.getloadavg()
    trainees = make_trainees(config, device)
    batch = sparse_batch(config, device)
    losses, first_seconds = check_agreement(trainees, batch)
    for trainee in trainees.values():
        trainee.step(batch)
    runs = {name: [] for name in trainees}
    for _ in range(steps):
        for name, trainee in trainees.items():
            runs[name].append(timed_step(trainee, batch, device))
    backend = kdfast.last_backend()  # of the kdfast variant: the other two never call kdfast
    del trainees
    return {
        "config": config, "load": (load_before[0], os.getloadavg()[0]), "losses": losses,
        "compile_seconds": first_seconds["torch.compile"], "kdfast_backend": backend,
        "variants": {name: {"seconds": statistics.median(t for t, _ in r), "times": [t for t, _ in r],
                            "peak": max(p for _, p in r)} for name, r in runs.items()},
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    return f"cpu, {torch.get_num_threads()} torch threads"


def report(results: list[dict], device: torch.device, steps: int, skipped: list[str]) -> str:
    import transformers

    student = ", ".join(f"{k}={v}" for k, v in STUDENT.items())
    lines = [
        f"# One distillation training step, {device.type}",
        "",
        f"- device: {device_name(device)}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, kdfast {kdfast.__version__}",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- student: LlamaForCausalLM, float32, {student}; AdamW (lr 1e-4, PyTorch defaults)",
        f"- loss: {HARD_WEIGHT} CE + {SOFT_WEIGHT} forward KL over top-{TOP_K} log-probs + tail bucket, T={TEMPERATURE}",
        f"- step = forward + backward + AdamW step + zero_grad; one warm-up step each, then {steps} interleaved "
        "rounds; time = median; peak = largest extra memory of a step (method: bench/bench_step.py docstring)",
        "",
        "| config | variant | median step s | vs kdfast | peak extra MiB | vs kdfast | first loss | load before / after |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ours = r["variants"]["kdfast"]
        for name, v in r["variants"].items():
            label = f"{name} ({r['kdfast_backend']} backend)" if name == "kdfast" else name
            if name == "torch.compile":
                label += f" (compile + first call {r['compile_seconds']:.1f} s)"
            lines.append(
                f"| {r['config'].label} | {label} | {v['seconds']:.3f} | {v['seconds'] / ours['seconds']:.2f}x | "
                f"{v['peak'] / MiB:.0f} | {v['peak'] / max(ours['peak'], 1):.2f}x | {r['losses'][name]:.6f} | "
                f"{r['load'][0]:.1f} / {r['load'][1]:.1f} |"
            )
    if skipped:
        lines += ["", f"Out of device memory, not measured: {', '.join(skipped)}."]
    lines += ["", "Step times (s), in round order:", ""]
    for r in results:
        times = "; ".join(f"{n}: {', '.join(f'{t:.2f}' for t in v['times'])}" for n, v in r["variants"].items())
        lines.append(f"- {r['config'].label}: {times}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (each runs every variant once)")
    parser.add_argument("--threads", type=int, help="PyTorch intra-op threads (default: PyTorch's choice)")
    parser.add_argument("--config", action="append", metavar="V,B,L",
                        help="vocabulary, batch, sequence length (repeatable); default: the device's grid")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    default = CUDA_CONFIGS if device.type == "cuda" else CPU_CONFIGS
    configs = [StepConfig(*map(int, c.split(","))) for c in args.config] if args.config else default
    results, skipped = [], []
    for config in configs:
        print(f"bench_step: {config.label} ...", file=sys.stderr, flush=True)
        try:
            results.append(run_config(config, device, args.steps))
        except torch.cuda.OutOfMemoryError:  # the eager variants hold several [B, L, V] float32 tensors
            skipped.append(config.label)
            torch.cuda.empty_cache()
    text = report(results, device, args.steps, skipped)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
