"""Distill a student from teacher shards: ``TrainConfig``, ``Trainer`` and ``kdfast train``.

    kdfast train --config run.toml [--key value ...]                       # one process
    torchrun --nproc_per_node=8 -m kdfast train --config run.toml          # DDP (or FSDP2: --fsdp true)

Student. A Hugging Face causal LM (``student``: a directory or hub id for ``from_pretrained``;
``student_config``: a config dict / JSON file to build one from scratch), trained through
``kdfast.hf.hidden_and_head`` and ``kdfast.fused_linear_kd_loss``, so the [B, L, V] logits never
exist. Any other ``nn.Module`` works through this protocol (``student_module = "pkg.mod:factory"`` or
``Trainer(config, model=module)``):

    module(input_ids [B, L] int64) -> hidden [B, L, H]      causal: row i sees tokens 0..i only
    module.get_output_embeddings() -> a layer with .weight [V, H] (and .bias [V] or None),
        or module.output_weight [V, H] (and optionally module.output_bias [V])
    logits = hidden @ weight.T + bias                       nothing applied after the head

Batches are right-padded (inputs 0, labels -100, teacher slots -1) and no attention mask is passed:
in a causal model real tokens never attend to the padding after them, and padded rows are ignored.

Data and its order. Each rank reads ``ShardDataset(rank, world_size)``: epoch e is a permutation of
the sequences that is a pure function of (seed, e), and rank r takes its entries r, r + W, r + 2W, ...
A step consumes ``micro_batch_size * grad_accum_steps`` samples per rank, batches run across epoch
boundaries, and the data position is one number: the samples consumed by all ranks together (each
rank resumes at that count / W, so a resumption on another number of ranks keeps its place when the
global batch is unchanged). Micro-batch m of a step therefore holds, over all
ranks together, the entries [m * W * b, (m + 1) * W * b) of the step's slice of the permutation: a
single process with ``micro_batch_size = W * b`` (same accumulation) trains on exactly the same
samples in every step and micro-batch, so its losses equal the W-rank run's up to float rounding.
That equality spans epochs when the number of sequences is a multiple of W (otherwise the < W
left-over sequences of each epoch, which ranks skip, differ).

Loss normalisation. Before the first micro-batch of a step the trainer counts the active tokens
(label != -100) of all its micro-batches, sums that count over ranks with one all_reduce and gives it
to every micro-batch as ``num_items``; each micro-batch's loss is then its share of the mean over the
whole global batch. DDP and FSDP average gradients over ranks, so the loss is multiplied by the world
size before backward: the gradient equals the single-process one. The logged loss is the all-reduced
sum of these shares, i.e. the global batch mean.

Temperature. Shard values are teacher log-probs at the manifest's capture temperature T_c (kind
"logprobs") or probabilities (kind "probs"). ``tail = true`` (missing-mass bucket) is exact only when
the training temperature equals T_c, so anything else raises ValueError. Without the tail,
log-probs captured at T_c != 1 are multiplied by T_c, which turns them into teacher logits up to a
per-row constant, so the renormalised top-k target is softmax(teacher_logits / T) at the training T.
The student's vocabulary must equal the manifest's (``ShardDataset`` raises ShardError otherwise).

Schedule and precision. AdamW (no weight decay on 1-D parameters: norms, biases), linear warmup over
``warmup_steps`` then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``, gradient clipping at
``max_grad_norm``. Parameters and optimizer states are float32; on CUDA the student's forward runs
under bf16 autocast (``bf16``) and the loss takes the head in the hidden states' dtype (the fused loss
computes the softmax in float32).

Evaluation (``eval_shards``): over the first ``eval_sequences`` held-out sequences, the hard
cross-entropy, the divergence D at the training temperature (unscaled by T^2) and the top-1 agreement
(student argmax == the teacher's most likely slot), means over active tokens, computed ``chunk_size``
rows at a time from the hidden states: at most one chunk of logits exists at once.

Checkpoints (``run_dir/checkpoints/step_NNNNNNNN``): model and optimizer as full (unsharded) state
dicts keyed by parameter name (``torch.distributed.checkpoint.state_dict``, the same files for one
process, DDP and FSDP2), scheduler, the RNG states of every rank (torch, numpy, python, CUDA) and
``trainer_state.json`` (step, epoch, consumed samples, config). Each is written into a temporary
directory, fsynced, and renamed into place, so a checkpoint directory is complete or absent; the last
``keep_checkpoints`` are kept. ``resume = true`` continues from the newest one exactly (on CPU a
resumed run reproduces the losses of an uninterrupted one bit for bit); with no checkpoint it starts
fresh, so a requeued job can always pass ``--resume``. Without it, a run directory that already holds
checkpoints is refused. SIGINT / SIGTERM set a flag; the trainer finishes the current step, saves a
checkpoint and returns (status "interrupted"). A second signal stops at once.

Outputs in ``run_dir``: config.json, metrics.jsonl (one JSON object per logged step and per
evaluation), summary.json (also printed), loss_curves.png (matplotlib, if installed) and, at the end,
``final/`` (``save_pretrained`` for Hugging Face students, ``model.pt`` state dict otherwise).

FSDP2 (``fsdp = true``): ``fully_shard`` on each transformer block (the model's
``_no_split_modules`` classes), then on the whole student + loss module; the head is unsharded by the
root's forward, so the fused loss sees the full weight. Checkpoints gather full state dicts on rank 0
(fine for students up to a few billion parameters).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import gc
import importlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kdfast import hf
from kdfast._io import fsync_path
from kdfast.api import fused_linear_kd_loss, kd_loss
from kdfast.fused_linear import default_chunk_rows
from kdfast.shards import IGNORE_INDEX, ShardDataset, ShardSampler

__all__ = ["TrainConfig", "Trainer", "load_config", "config_from_args", "add_train_arguments", "run_train",
           "list_checkpoints", "read_metrics", "plot_curves"]

log = logging.getLogger("kdfast.train")

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_PAD = {"input_ids": 0, "labels": IGNORE_INDEX, "teacher_indices": -1, "teacher_values": 0.0}
# Keys that may change between a run and its resumption without breaking exactness.
_OPERATIONAL_KEYS = {"run_dir", "resume", "progress", "num_workers", "eval_every", "eval_sequences",
                     "eval_batch_size", "eval_shards", "log_every", "save_every", "keep_checkpoints", "save_final",
                     "device"}


def _opt(default, description: str):
    return field(default=default, metadata={"help": description})


@dataclass
class TrainConfig:
    """Every setting of a run; a TOML file holds these keys at top level (``student_config`` may be a table)."""

    # data
    train_shards: str = _opt("", "training shard directory (required)")
    eval_shards: str = _opt("", "held-out shard directory ('' = no evaluation)")
    run_dir: str = _opt("runs/kdfast", "output directory: checkpoints, metrics, summary, plot, final model")
    # student: exactly one of the three
    student: str = _opt("", "Hugging Face model directory (or hub id) for from_pretrained")
    student_config: dict | str = _opt("", "HF config (JSON file or dict with model_type) for a new student")
    student_module: str = _opt("", "'pkg.module:factory': factory() returns an nn.Module following the protocol")
    # loss (kdfast.kd_loss options; the teacher kind comes from the shard manifest)
    temperature: float = _opt(1.0, "distillation temperature T")
    hard_weight: float = _opt(0.0, "weight of the hard cross-entropy on the labels")
    soft_weight: float = _opt(1.0, "weight of the distillation divergence")
    divergence: str = _opt("forward_kl", "forward_kl (sparse shard targets support only this), reverse_kl, jsd")
    beta: float = _opt(0.5, "JSD beta")
    tail: bool = _opt(False, "missing-mass bucket for logprobs shards; needs T == capture temperature")
    scale_t2: bool = _opt(True, "multiply the divergence by T^2")
    chunk_size: int = _opt(0, "rows per logits chunk in the fused loss and evaluation (0 = automatic)")
    loss_backend: str = _opt("", "kd_loss backend: triton, cpu, torch ('' = automatic)")
    # optimisation
    max_steps: int = _opt(1000, "optimizer steps; also the length of the cosine schedule")
    micro_batch_size: int = _opt(8, "sequences per micro-batch per rank")
    grad_accum_steps: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(3e-4, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of lr")
    warmup_steps: int = _opt(100, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (not applied to 1-D parameters)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.95, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = no clipping)")
    seed: int = _opt(0, "seed of the data order and of the student's initialisation")
    # hardware
    device: str = _opt("auto", "auto (cuda:LOCAL_RANK when available), cpu, cuda")
    bf16: bool = _opt(True, "bf16 autocast of the student's forward on CUDA (ignored on CPU)")
    fsdp: bool = _opt(False, "shard the student with FSDP2 (fully_shard) instead of DDP")
    num_workers: int = _opt(0, "DataLoader worker processes")
    # evaluation, logging, checkpoints
    eval_every: int = _opt(200, "evaluate every N steps (0 = only at the start and the end)")
    eval_sequences: int = _opt(256, "held-out sequences per evaluation (0 = all)")
    eval_batch_size: int = _opt(0, "sequences per evaluation batch per rank (0 = micro_batch_size)")
    log_every: int = _opt(10, "write a metrics line every N steps")
    save_every: int = _opt(500, "checkpoint every N steps (0 = only at the end or on a signal)")
    keep_checkpoints: int = _opt(3, "checkpoints to keep")
    resume: bool = _opt(False, "continue from the newest checkpoint in run_dir (fresh start if there is none)")
    progress: bool = _opt(True, "progress bar")
    save_final: bool = _opt(True, "save the student into run_dir/final at the end")

    def __post_init__(self):
        positive = ("max_steps", "micro_batch_size", "grad_accum_steps", "keep_checkpoints")
        non_negative = ("warmup_steps", "eval_every", "eval_sequences", "eval_batch_size", "log_every", "save_every",
                        "num_workers", "chunk_size", "seed", "max_grad_norm", "weight_decay")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"TrainConfig: need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")
        if not self.train_shards:
            raise ValueError("TrainConfig: train_shards is required")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from plain values (TOML or overrides); unknown keys and wrong types raise ValueError."""
        hints = typing.get_type_hints(cls)
        unknown = [key for key in values if key not in hints]
        if unknown:
            hints_for = {key: difflib.get_close_matches(key, hints, n=1) for key in unknown}
            described = ", ".join(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for k, m in hints_for.items())
            raise ValueError(f"TrainConfig: unknown key(s) {described}")
        return cls(**{key: _check_type(key, value, hints[key]) for key, value in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(name: str, value, hint):
    """``value`` as the field type: ints are accepted for floats; anything else must match."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in allowed:
        raise ValueError(f"TrainConfig: {name} must be {_type_name(hint)}, got {value!r}")
    if not isinstance(value, allowed):
        raise ValueError(f"TrainConfig: {name} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def _type_name(hint) -> str:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join(t.__name__ for t in allowed)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig from a TOML file (flat keys; paths as written, relative to the working directory)
    updated by ``overrides`` (e.g. from the command line)."""
    values = {}
    if path is not None:
        import tomllib  # Python >= 3.11

        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config {path}: invalid TOML: {e}") from None
    values.update(overrides or {})
    return TrainConfig.from_dict(values)


# ------------------------------------------------------------------------------------------------
# Command line: `kdfast train --config run.toml [--key value ...]`, one option per TrainConfig field.
# ------------------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _cli_converter(hint):
    """str -> field value, by the field's type (argparse reports the ValueError as a usage error)."""
    if hint is bool:
        return _parse_bool
    if hint in (int, float, str):
        return hint
    return lambda text: json.loads(text) if text.lstrip().startswith("{") else text  # dict | str


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` plus ``--<field>`` (and ``--<field-with-dashes>``) for every TrainConfig field."""
    parser.add_argument("--config", help="TOML file of TrainConfig keys; command-line options override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        options = dict(dest=f.name, default=argparse.SUPPRESS, type=_cli_converter(hints[f.name]),
                       help=f"{f.metadata['help']} (default: {f.default!r})")
        if hints[f.name] is bool:
            options.update(nargs="?", const=True, metavar="BOOL")
        parser.add_argument(*names, **options)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TOML file of ``--config`` updated by the options given on the command line."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return load_config(args.config, overrides)


def run_train(args: argparse.Namespace) -> int:
    """The ``kdfast train`` command: build the config, train, print the summary; exit code 0."""
    config = config_from_args(args)
    _setup_logging()
    with Trainer(config) as trainer:
        trainer.train()
    return 0


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")


# ------------------------------------------------------------------------------------------------
# Student: Hugging Face causal LM or the nn.Module protocol, wrapped with the loss.
# ------------------------------------------------------------------------------------------------


def build_student(config: TrainConfig) -> nn.Module:
    """The student named by the config, in float32, initialised from ``config.seed``."""
    given = [name for name in ("student", "student_config", "student_module") if getattr(config, name)]
    if len(given) != 1:
        raise ValueError("TrainConfig: give exactly one of student, student_config, student_module; "
                         f"got {given or 'none'}")
    torch.manual_seed(config.seed)
    if config.student_module:
        return _student_from_factory(config.student_module)
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.student:
        return AutoModelForCausalLM.from_pretrained(config.student, dtype=torch.float32)
    values = config.student_config
    if isinstance(values, str):
        try:
            values = json.loads(Path(values).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"student_config {config.student_config}: cannot read a JSON config ({e})") from None
    values = dict(values)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"student_config needs a 'model_type' key (e.g. 'llama'), got keys {sorted(values)}")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values), dtype=torch.float32)


def _student_from_factory(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"student_module {spec!r}: cannot import it ({e}); expected 'pkg.module:factory'") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"student_module {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def is_hf_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "base_model") and hasattr(model, "save_pretrained")


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of a protocol module's output layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return head.weight, getattr(head, "bias", None)
    weight = getattr(model, "output_weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} exposes no output layer: define get_output_embeddings() or output_weight [V, H]"
        )
    return weight, getattr(model, "output_bias", None)


class DistillationModule(nn.Module):
    """Student + fused loss in one ``forward``, so that DDP / FSDP2 hooks see the whole computation.

    ``forward(batch, num_items)`` -> (loss, LossComponents) for training; ``forward(batch,
    evaluate=True)`` -> float64 sums [ce, kd, active tokens, top-1 matches, top-1 rows] for evaluation.
    """

    def __init__(self, student: nn.Module, loss_options: dict, autocast_bf16: bool):
        super().__init__()
        self.student = student
        self.loss_options = loss_options
        self.autocast_bf16 = autocast_bf16
        self.hf = is_hf_causal_lm(student)

    def hidden_and_head(self, input_ids: torch.Tensor):  # [B, L]
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            if self.hf:
                hidden, weight, bias = hf.hidden_and_head(self.student, input_ids)
            else:
                hidden = self.student(input_ids)
                weight, bias = output_head(self.student)
        if weight.dtype != hidden.dtype:  # autocast: a 16-bit copy of the head (its gradient flows back)
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        return hidden, weight, bias  # [B, L, H], [V, H], [V]

    def forward(self, batch: dict, num_items: torch.Tensor | None = None, evaluate: bool = False):
        hidden, weight, bias = self.hidden_and_head(batch["input_ids"])
        if evaluate:
            with torch.no_grad():
                return self._eval_sums(hidden, weight, bias, batch)
        return fused_linear_kd_loss(
            hidden, weight, batch["labels"], bias=bias, teacher_indices=batch["teacher_indices"],
            teacher_values=batch["teacher_values"], num_items=num_items, return_components=True, **self.loss_options,
        )

    def _eval_sums(self, hidden, weight, bias, batch) -> torch.Tensor:
        """[ce_sum, kd_sum, active, top1_matches, top1_rows] over the batch, a chunk of logits at a time."""
        hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
        labels = batch["labels"].reshape(-1)  # [N]
        k = batch["teacher_indices"].shape[-1]
        indices = batch["teacher_indices"].reshape(-1, k)  # [N, k]
        values = batch["teacher_values"].reshape(-1, k)  # [N, k]
        options = {key: self.loss_options[key] for key in ("teacher_kind", "tail", "temperature", "divergence", "beta",
                                                           "backend")}
        rows = self.loss_options["chunk_size"] or default_chunk_rows(hidden.shape[0], weight.shape[0], hidden.dtype)
        sums = torch.zeros(5, dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            end = min(start + rows, hidden.shape[0])
            logits = nn.functional.linear(hidden[start:end], weight, bias)  # [c, V]
            active = labels[start:end] != IGNORE_INDEX
            n_active = active.sum()
            _, parts = kd_loss(logits, labels[start:end], teacher_indices=indices[start:end],
                               teacher_values=values[start:end], return_components=True, **options)
            teacher_top1 = _teacher_top1(indices[start:end], values[start:end])  # [c]
            scored = active & (teacher_top1 >= 0)
            matches = (logits.argmax(-1) == teacher_top1) & scored
            chunk = [parts.ce * n_active, parts.kd * n_active, n_active, matches.sum(), scored.sum()]
            sums += torch.stack(chunk).double()
        return sums


def _teacher_top1(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # [N, k] -> [N], -1 = none
    """The teacher's most likely slot (values are log-probs or probs: both rank the same way)."""
    scores = values.float().masked_fill(indices < 0, -math.inf)
    best = indices.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1).long()
    return torch.where((indices >= 0).any(-1), best, torch.full_like(best, -1))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad a list of ShardDataset samples into [B, L] / [B, L, k] tensors (the stored tail is unused:
    the loss derives the missing mass from the values)."""
    return {name: nn.utils.rnn.pad_sequence([s[name] for s in samples], batch_first=True, padding_value=pad)
            for name, pad in _PAD.items()}


class MicroBatchSampler(torch.utils.data.Sampler):
    """Endless lists of ``size`` sequence ids from a ShardSampler, epoch after epoch (batches may span two)."""

    def __init__(self, sampler: ShardSampler, size: int):
        self.sampler, self.size = sampler, size

    def __iter__(self):
        batch = []
        while True:
            for index in self.sampler:
                batch.append(index)
                if len(batch) == self.size:
                    yield batch
                    batch = []


# ------------------------------------------------------------------------------------------------
# Checkpoint files: temporary directory, fsync, rename.
# ------------------------------------------------------------------------------------------------


def _publish_dir(tmp: Path, final: Path) -> None:
    """fsync every file in ``tmp`` and rename it to ``final`` (replacing an older ``final``)."""
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(tmp)
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    """Every RNG state as tensors and numbers, so that checkpoints load with ``weights_only=True``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": python_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load(path: Path):
    """A checkpoint file: tensors and plain containers only (``weights_only``: never arbitrary pickles)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: p.name)


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------


class StopRequest:
    """SIGINT / SIGTERM set ``requested``; the trainer stops at the next step boundary. A second signal
    restores the default handlers and re-raises it (stop now)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.requested = True
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self.uninstall()


# ------------------------------------------------------------------------------------------------
# Metrics and plot
# ------------------------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> bool:
    """Training loss (and its CE / divergence parts) and held-out metrics against the step, as a PNG.
    Returns False, with a warning, when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", png_path)
        return False
    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_kd" in r]
    fig = Figure(figsize=(11, 4), layout="constrained")
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


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------


class Trainer:
    """Distils ``config``'s student (or ``model``, an nn.Module following the protocol) from shards.

    Under torchrun (WORLD_SIZE > 1) it joins the process group (gloo on CPU, nccl on CUDA) unless one is
    already initialised. ``train()`` runs to ``max_steps`` or to a signal and returns the summary;
    ``evaluate()`` returns the held-out metrics. Use as a context manager (or call ``close()``) to leave
    the process group it created.
    """

    def __init__(self, config: TrainConfig, model: nn.Module | None = None):
        self.config = config
        self._owns_process_group = _init_distributed(config)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = _pick_device(config.device)
        self.run_dir = Path(config.run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        _seed_everything(config.seed)

        student = model if model is not None else build_student(config)
        self.student = student
        vocab = _student_vocab(student)
        self.train_data = ShardDataset(config.train_shards, seed=config.seed, rank=self.rank,
                                       world_size=self.world_size, vocab_size=vocab)
        self.eval_data = (ShardDataset(config.eval_shards, shuffle=False, rank=self.rank, world_size=self.world_size,
                                       vocab_size=vocab) if config.eval_shards else None)
        self.value_scale = _check_teacher_targets(config, self.train_data, self.eval_data)

        loss_options = dict(teacher_kind=self.train_data.kind, tail=config.tail, temperature=config.temperature,
                            hard_weight=config.hard_weight, soft_weight=config.soft_weight,
                            divergence=config.divergence, beta=config.beta, scale_t2=config.scale_t2,
                            chunk_size=config.chunk_size or None, backend=config.loss_backend or None)
        module = DistillationModule(student, loss_options, config.bf16 and self.device.type == "cuda")
        self.model = self._wrap(module.to(self.device))
        self.optimizer = _build_optimizer(module, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config))

        self.step = 0
        self.consumed = 0  # samples of all ranks trained on: the data position
        self.tokens = 0
        self.elapsed = 0.0
        self.last_eval: dict = {}
        self.last_checkpoint: Path | None = None
        self._prepare_run_dir()
        self.train_data.sampler.set_consumed(self.consumed // self.world_size)
        self._batches = iter(torch.utils.data.DataLoader(
            self.train_data, batch_sampler=MicroBatchSampler(self.train_data.sampler, config.micro_batch_size),
            collate_fn=collate, num_workers=config.num_workers, pin_memory=self.device.type == "cuda",
        ))

    # --- setup -----------------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.config.micro_batch_size * self.config.grad_accum_steps * self.world_size

    def _wrap(self, module: DistillationModule) -> nn.Module:
        if self.world_size == 1:
            return module
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard

            blocks = set(getattr(module.student, "_no_split_modules", None) or ())
            for sub in module.student.modules():
                if type(sub).__name__ in blocks:
                    fully_shard(sub)
            return fully_shard(module)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    def _prepare_run_dir(self) -> None:
        """Resume from the newest checkpoint, or start fresh in a directory without checkpoints."""
        checkpoints = list_checkpoints(self.run_dir)
        if checkpoints and not self.config.resume:
            raise ValueError(f"run_dir {self.run_dir} already holds checkpoints (newest {checkpoints[-1].name}); "
                             "pass --resume to continue that run or choose another run_dir")
        if checkpoints:
            self._load_checkpoint(checkpoints[-1])
        elif self.config.resume:
            log.info("resume: no checkpoint in %s, starting a fresh run", self.run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
            kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._barrier()

    # --- collectives -----------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    # --- training --------------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        batch = {name: t.to(self.device, non_blocking=True) for name, t in batch.items()}
        if self.value_scale != 1.0:
            batch["teacher_values"] = batch["teacher_values"] * self.value_scale
        return batch

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool):
        """Reduce gradients across ranks only on the last micro-batch of a step."""
        if self.world_size == 1:
            yield
        elif self.config.fsdp:
            self.model.set_requires_gradient_sync(enabled)
            yield
        elif enabled:
            yield
        else:
            with self.model.no_sync():
                yield

    def train_step(self, stop: StopRequest | None = None) -> dict:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns its global statistics
        (loss, ce, kd, lr, grad_norm, tokens, and whether any rank was asked to stop)."""
        started = time.perf_counter()
        self.model.train()
        batches = [self._to_device(next(self._batches)) for _ in range(self.config.grad_accum_steps)]
        local_items = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches)
        num_items = self._sum_over_ranks(local_items.double()).clamp(min=1)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, ce * n, kd * n, stop
        for i, batch in enumerate(batches):
            with self._gradient_sync(i == len(batches) - 1):
                loss, parts = self.model(batch, num_items=num_items)
                (loss * self.world_size).backward()
            n_active = (batch["labels"] != IGNORE_INDEX).sum()
            sums[:3] += torch.stack([loss.detach(), parts.ce * n_active, parts.kd * n_active]).double()
        max_norm = self.config.max_grad_norm or math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums[3] = float(stop is not None and stop.requested)
        loss_sum, ce_sum, kd_sum, stops = self._sum_over_ranks(sums).tolist()
        tokens = int(num_items.item())
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"step {self.step + 1}: the loss is {loss_sum}; resume from the last checkpoint "
                                     "with a lower lr or a stronger max_grad_norm")
        self.step += 1
        self.consumed += self.global_batch
        self.tokens += tokens
        self.elapsed += time.perf_counter() - started
        return {"loss": loss_sum, "ce": ce_sum / tokens, "kd": kd_sum / tokens, "lr": lr,
                "grad_norm": float(grad_norm), "tokens": tokens, "stop": stops > 0}

    def train(self) -> dict:
        """Train to ``max_steps`` (or to SIGINT / SIGTERM); returns the summary written to summary.json."""
        config = self.config
        bar = tqdm(total=config.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (config.progress and self.rank == 0))
        if self.eval_data is not None and self.step == 0:
            self._evaluate_and_log()
        window = {"steps": 0, "loss": 0.0, "ce": 0.0, "kd": 0.0, "tokens": 0, "start": time.perf_counter()}
        status = "completed"
        with StopRequest() as stop, bar:
            while self.step < config.max_steps:
                stats = self.train_step(stop)
                _accumulate(window, stats)
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == config.max_steps or stats["stop"]:
                    record = self._log_window(window, stats)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if stats["stop"] and self.step < config.max_steps:
                    status = "interrupted"
                    break
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.max_steps:
                    self._evaluate_and_log()
                if config.save_every and self.step % config.save_every == 0:
                    self.save_checkpoint()
        if status == "completed" and self.eval_data is not None:
            self._evaluate_and_log()
        self.save_checkpoint()
        if status == "completed" and config.save_final:
            self.save_final()
        return self._finish(status)

    def _log_window(self, window: dict, stats: dict) -> dict:
        seconds = max(time.perf_counter() - window["start"], 1e-9)
        steps = window["steps"]
        record = {"step": self.step, "epoch": self._epoch(), "loss": window["loss"] / steps,
                  "ce": window["ce"] / steps, "kd": window["kd"] / steps, "lr": stats["lr"],
                  "grad_norm": stats["grad_norm"], "tokens": self.tokens, "tokens_per_s": window["tokens"] / seconds}
        self._write_metrics(record)
        window.update(steps=0, loss=0.0, ce=0.0, kd=0.0, tokens=0, start=time.perf_counter())
        return record

    def _epoch(self) -> int:
        return (self.consumed // self.world_size) // self.train_data.sampler.per_rank

    def _write_metrics(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Held-out CE, divergence D (unscaled, at the training T) and top-1 agreement, means over tokens.

        Every rank evaluates the same number of sequences (its slice of the first ``eval_sequences``),
        so that FSDP's collectives stay matched.
        """
        if self.eval_data is None:
            raise ValueError("evaluate() needs eval_shards in the config")
        config = self.config
        total = min(config.eval_sequences or len(self.eval_data), len(self.eval_data))
        ids = self.eval_data.sampler.order(0)[: total // self.world_size].tolist()
        size = config.eval_batch_size or config.micro_batch_size
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(ids), size):
                batch = self._to_device(collate([self.eval_data[i] for i in ids[start:start + size]]))
                sums += self.model(batch, evaluate=True)
        ce, kd, active, matches, scored = self._sum_over_ranks(sums).tolist()
        return {"eval_ce": ce / max(active, 1), "eval_kd": kd / max(active, 1),
                "eval_top1": matches / max(scored, 1), "eval_tokens": int(active)}

    def _evaluate_and_log(self) -> None:
        self.last_eval = self.evaluate()
        self._write_metrics({"step": self.step, **self.last_eval})
        log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in self.last_eval.items()))

    # --- checkpoints -----------------------------------------------------------------------------

    def _state_dict_options(self, **extra):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **extra)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_<step>`` atomically (every rank takes part); keep the newest N."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        final = self.run_dir / CHECKPOINTS / f"step_{self.step:08d}"
        if self.last_checkpoint == final:
            return final
        options = self._state_dict_options(cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        tmp = final.with_name(f".tmp-{final.name}")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save(_rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            torch.save(model_state, tmp / "model.pt")
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        self._barrier()
        if self.rank == 0:
            state = {"step": self.step, "epoch": self._epoch(), "consumed_samples": self.consumed,
                     "world_size": self.world_size, "tokens": self.tokens, "elapsed_s": self.elapsed,
                     "config": self.config.to_dict()}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
            _publish_dir(tmp, final)
            for old in list_checkpoints(self.run_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
        self._barrier()
        self.last_checkpoint = final
        log.info("saved checkpoint %s", final)
        return final

    def _load_checkpoint(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = json.loads((path / "trainer_state.json").read_text())
        self._warn_config_changes(state["config"], path)
        if state["consumed_samples"] % self.world_size:
            raise ValueError(f"{path}: {state['consumed_samples']} consumed samples cannot be split over "
                             f"world_size={self.world_size}")
        options = self._state_dict_options()
        set_model_state_dict(self.model, _load(path / "model.pt"), options=options)
        set_optimizer_state_dict(self.model, self.optimizer, _load(path / "optimizer.pt"), options=options)
        self.scheduler.load_state_dict(_load(path / "scheduler.pt"))
        rng_file = path / f"rng_rank{self.rank}.pt"
        _set_rng_state(_load(rng_file if rng_file.exists() else path / "rng_rank0.pt"))
        self.step, self.consumed = state["step"], state["consumed_samples"]
        self.tokens, self.elapsed = state["tokens"], state["elapsed_s"]
        self.last_checkpoint = path
        log.info("resumed from %s (step %d, epoch %d)", path, self.step, state["epoch"])

    def _warn_config_changes(self, saved: dict, path: Path) -> None:
        changed = {k: (saved.get(k), v) for k, v in self.config.to_dict().items()
                   if k not in _OPERATIONAL_KEYS and saved.get(k) != v}
        if changed:
            log.warning("resuming %s with changed settings (the run is no longer an exact continuation): %s", path,
                        ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()))

    def save_final(self) -> Path:
        """The student into ``run_dir/final``: ``save_pretrained`` (HF) or ``model.pt`` (state dict)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.model, options=self._state_dict_options(cpu_offload=True))
        final = self.run_dir / "final"
        if self.rank == 0:
            student_state = {k.removeprefix("student."): v for k, v in full.items()}
            tmp = final.with_name(".tmp-final")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if is_hf_causal_lm(self.student):
                self.student.save_pretrained(tmp, state_dict=student_state)
            else:
                torch.save(student_state, tmp / "model.pt")
            _publish_dir(tmp, final)
        self._barrier()
        return final

    # --- end of run ------------------------------------------------------------------------------

    def _finish(self, status: str) -> dict:
        last = next((r for r in reversed(read_metrics(self.metrics_path)) if "loss" in r), {}) if self.rank == 0 else {}
        summary = {
            "status": status, "step": self.step, "max_steps": self.config.max_steps, "epoch": self._epoch(),
            "train_loss": last.get("loss"), "train_ce": last.get("ce"), "train_kd": last.get("kd"), **self.last_eval,
            "tokens": self.tokens, "train_seconds": self.elapsed, "tokens_per_s": self.tokens / max(self.elapsed, 1e-9),
            "world_size": self.world_size, "global_batch": self.global_batch,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "final_model": str(self.run_dir / "final") if status == "completed" and self.config.save_final else None,
        }
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            plot_curves(self.metrics_path, self.run_dir / "loss_curves.png")
            print(json.dumps(summary, indent=1))
            if status == "interrupted":
                print(f"interrupted at step {self.step}; continue with the same command plus --resume")
        return summary

    def close(self, synchronize: bool = True) -> None:
        """Leave the process group if this trainer created it (the trainer cannot train afterwards).

        Everything that references the group (the DDP / FSDP-wrapped model, the optimizer, the data
        iterator) is released first: a gloo group still referenced at interpreter exit intermittently
        aborts the process ("terminate called without an active exception") after a successful run.
        ``synchronize=False`` skips the final barrier (leaving on an error that other ranks may not share).
        """
        if not (self._owns_process_group and dist.is_initialized()):
            return
        self.model = self.optimizer = self.scheduler = self.student = self._batches = None
        gc.collect()
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
        self._owns_process_group = False

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(synchronize=exc_type is None)


def _accumulate(window: dict, stats: dict) -> None:
    window["steps"] += 1
    window["tokens"] += stats["tokens"]
    for key in ("loss", "ce", "kd"):
        window[key] += stats[key]


def _init_distributed(config: TrainConfig) -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1; True if this call created it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available() and config.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _student_vocab(student: nn.Module) -> int:
    if is_hf_causal_lm(student):
        hf.check_plain_head(student)
        return student.get_output_embeddings().weight.shape[0]
    return output_head(student)[0].shape[0]


def _check_teacher_targets(config: TrainConfig, train: ShardDataset, held_out: ShardDataset | None) -> float:
    """Loss options against the shard manifests; returns the factor applied to the teacher values."""
    same_targets = held_out is None or (held_out.kind, held_out.capture_temperature) == (train.kind,
                                                                                        train.capture_temperature)
    if not same_targets:
        raise ValueError(f"eval_shards ({held_out.kind}, T={held_out.capture_temperature}) and train_shards "
                         f"({train.kind}, T={train.capture_temperature}) hold different kinds of targets")
    if config.divergence != "forward_kl":
        raise ValueError(f"divergence={config.divergence!r} needs dense teacher logits; shard targets are sparse "
                         "(top-k or sampled): use divergence='forward_kl'")
    capture_t = train.capture_temperature
    if config.tail:
        if train.kind != "logprobs":
            raise ValueError(f"tail=true needs 'logprobs' shards; {config.train_shards} holds {train.kind!r}")
        if not math.isclose(config.temperature, capture_t, rel_tol=1e-6):
            raise ValueError(
                f"tail=true is exact only when the training temperature equals the capture temperature: "
                f"temperature={config.temperature}, but {config.train_shards} was captured at T={capture_t}. "
                f"Train at temperature={capture_t}, recapture at T={config.temperature}, or set tail=false"
            )
        return 1.0
    if train.kind == "logprobs" and capture_t != 1.0:
        log.info("logprobs captured at T=%g: values are rescaled by %g (teacher logits up to a constant)",
                 capture_t, capture_t)
        return float(capture_t)
    if train.kind == "probs" and not math.isclose(config.temperature, capture_t, rel_tol=1e-6):
        log.warning("sampled targets were drawn at T=%g; training at temperature=%g", capture_t, config.temperature)
    return 1.0


def _build_optimizer(module: DistillationModule, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; 1-D parameters (norm weights, biases) get no weight decay."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)


def _schedule(config: TrainConfig):
    """Multiplier of lr after ``step`` optimizer steps: linear warmup, then cosine to min_lr_ratio."""
    warmup, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
