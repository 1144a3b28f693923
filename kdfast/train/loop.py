"""``Trainer``: distils a student from teacher shards, one optimizer step at a time.

Data position. A step consumes ``micro_batch_size * grad_accum_steps`` samples per rank and the data
position is one number: the samples consumed by all ranks together (each rank resumes at that count
/ W, so a resumption on another number of ranks keeps its place when the global batch is unchanged).
Micro-batch m of a step holds, over all ranks together, the entries [m * W * b, (m + 1) * W * b) of
the step's slice of the permutation: a single process with ``micro_batch_size = W * b`` (same
accumulation) trains on exactly the same samples in every step and micro-batch, so its losses equal
the W-rank run's up to float rounding. That equality spans epochs when the number of sequences is a
multiple of W (otherwise the < W left-over sequences of each epoch, which ranks skip, differ).

Packing (``packing = true``) changes the layout of a micro-batch, not its sequences (see
``kdfast.train.data``): the order, the data position and the loss normalisation are those of the
padded batches, so the losses and gradients equal theirs up to float rounding.

Compact rows. Training and held-out data are read as compact samples (teacher rows of the labelled
positions only) and the LM head and the loss run on the labelled positions' hidden states only
(``kdfast.train.student.DistillationModule``), in both layouts.

Loss normalisation. Before the first micro-batch of a step the trainer counts the active tokens
(label != -100) of all its micro-batches, sums that count over ranks with one all_reduce and gives it
to every micro-batch as ``num_items``; each micro-batch's loss is then its share of the mean over the
whole global batch. DDP and FSDP average gradients over ranks, so the loss is multiplied by the world
size before backward: the gradient equals the single-process one. The logged loss is the all-reduced
sum of these shares, i.e. the global batch mean.

Non-finite values. A NaN or inf loss or gradient norm (a non-finite teacher value makes its row's
loss NaN) stops the run with FloatingPointError before the optimizer step: the weights stay those
of the previous step, and the newest checkpoint is intact.

Evaluation (``eval_shards``): over the first ``eval_sequences`` held-out sequences, the hard
cross-entropy, the divergence D at the training temperature (unscaled by T^2) and the top-1 agreement
(student argmax == the teacher's most likely slot), means over active tokens, computed ``chunk_size``
rows at a time from the hidden states: at most one chunk of logits exists at once.

Signals. SIGINT / SIGTERM set a flag; the trainer finishes the current step, saves a checkpoint and
returns (status "interrupted"). A second signal stops at once.

A finished run (summary.json "completed" at the newest checkpoint's step, which is >= max_steps) is
left as it is by ``train()`` with ``resume``: it says so and returns that summary.
"""
from __future__ import annotations

import functools
import gc
import json
import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kdfast.report import plot_curves, read_metrics
from kdfast.shards import IGNORE_INDEX, ShardDataset
from kdfast.train import checkpoint
from kdfast.train.config import OPERATIONAL_KEYS, TrainConfig
from kdfast.train.data import (CatchDamaged, MicroBatchSampler, apply_damage_policy, check_teacher_targets, collate,
                               open_train_data, pack)
from kdfast.train.optim import build_optimizer
from kdfast._backend import resolve_device
from kdfast.train.parallel import barrier, gradient_sync, init_distributed, sum_over_ranks, wrap
from kdfast.train.student import (DistillationModule, build_student, check_packing_isolates, student_tokenizer,
                                  student_vocab)
from kdfast.train.teachers import HiddenStateLoss, LiveTeacher, is_on_policy, model_widths, student_continuations

log = logging.getLogger("kdfast.train")


class Trainer:
    """Distils ``config``'s student (or ``model``, an nn.Module following the protocol) from shards.

    Under torchrun (WORLD_SIZE > 1) it joins the process group (gloo on CPU, nccl on CUDA) unless one is
    already initialised. ``train()`` runs to ``max_steps`` or to a signal and returns the summary;
    ``evaluate()`` returns the held-out metrics. Use as a context manager (or call ``close()``) to leave
    the process group it created.
    """

    def __init__(self, config: TrainConfig, model: nn.Module | None = None):
        self.config = config
        self._owns_process_group = init_distributed(config.device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = resolve_device(config.device)
        self.run_dir = Path(config.run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        _seed_everything(config.seed)

        self.student = model if model is not None else build_student(config)
        self.tokenizer = student_tokenizer(config)
        self.num_parameters = sum(p.numel() for p in self.student.parameters())
        vocab = student_vocab(self.student)
        self.live_teacher = (LiveTeacher(config.teacher, config.teacher_dtype, self.device, vocab, self.tokenizer)
                             if config.teacher else None)
        self.train_data = open_train_data(config, self.rank, self.world_size, vocab, compact=True)
        self.eval_data = (ShardDataset(config.eval_shards, shuffle=False, rank=self.rank, world_size=self.world_size,
                                       vocab_size=vocab, compact=True) if config.eval_shards else None)
        self.value_scale = check_teacher_targets(config, self.train_data, self.eval_data)

        self.autocast_dtype = torch.bfloat16 if config.bf16 and self.device.type == "cuda" else None
        module = DistillationModule(self.student, self._loss_options(), autocast_dtype=self.autocast_dtype,
                                    live_teacher=self.live_teacher, hidden_loss=self._hidden_loss(),
                                    teacher_weights=config.teacher_weights or None)
        module.to(self.device)
        if config.packing:
            check_packing_isolates(self.student)
        self.model = wrap(module, self.device, config.fsdp)
        self.optimizer, self.scheduler = build_optimizer(module, config)

        self.step = 0
        self.consumed = 0  # samples of all ranks trained on: the data position
        self.tokens = 0
        self.damaged = 0  # sequences skipped as damaged (skip_damaged), all ranks
        self.elapsed = 0.0
        self.last_eval: dict = {}
        self.last_checkpoint: Path | None = None
        self._prepare_run_dir()
        self.train_data.sampler.set_consumed(self.consumed // self.world_size)
        self._batches = iter(torch.utils.data.DataLoader(
            CatchDamaged(self.train_data), collate_fn=self._batch_layout(), num_workers=config.num_workers,
            batch_sampler=MicroBatchSampler(self.train_data.sampler, config.micro_batch_size),
            pin_memory=self.device.type == "cuda",
        ))

    # --- setup -----------------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.config.micro_batch_size * self.config.grad_accum_steps * self.world_size

    def _batch_layout(self):
        """The collate function of training batches: padded rows, or packed ones (``packing``)."""
        return functools.partial(pack, pack_length=self.config.pack_length) if self.config.packing else collate

    def _loss_options(self) -> dict:
        """``fused_linear_kd_loss`` options (the teacher kind comes from the manifest; a live teacher's are
        logits)."""
        config = self.config
        tail = {"allow_tail_temperature": True} if config.tail else {}  # check_teacher_targets: T == capture T
        kind = "logits" if self.live_teacher is not None else self.train_data.kind
        skew = {"alpha": config.alpha} if config.divergence.startswith("skew") else {}
        return dict(teacher_kind=kind, tail=config.tail, temperature=config.temperature,
                    hard_weight=config.hard_weight, soft_weight=config.soft_weight, scale_t2=config.scale_t2,
                    divergence=config.divergence, beta=config.beta, chunk_size=config.chunk_size or None,
                    backend=config.loss_backend or None, **tail, **skew)

    def _hidden_loss(self) -> HiddenStateLoss | None:
        """``hidden_loss``'s module (with its projections), or None."""
        config = self.config
        if not config.hidden_loss:
            return None
        torch.manual_seed(config.seed)
        return HiddenStateLoss(config.hidden_loss, config.hidden_loss_weight, config.hidden_layer_map,
                               *model_widths(self.student), *model_widths(self.live_teacher.model))

    def _prepare_run_dir(self) -> None:
        """Resume from the newest checkpoint, or start fresh in a directory without checkpoints; a finished
        run's directory is left as it is (``self.finished``: its summary)."""
        checkpoints = checkpoint.list_checkpoints(self.run_dir)
        if checkpoints and not self.config.resume:
            raise ValueError(f"run_dir {self.run_dir} already holds checkpoints (newest {checkpoints[-1].name}); "
                             "pass --resume to continue that run or choose another run_dir")
        if checkpoints:
            self._load_checkpoint(checkpoints[-1])
        elif self.config.resume:
            log.info("resume: no checkpoint in %s, starting a fresh run", self.run_dir)
        self.finished = self._finished_summary()
        if self.rank == 0 and self.finished is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
            kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        barrier()

    # --- training --------------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> tuple[dict, int]:
        """``batch``'s tensors on the device, and how many of its sequences were skipped as damaged."""
        damaged = apply_damage_policy(batch.pop("damaged"), skip=self.config.skip_damaged)
        batch = {name: t.to(self.device, non_blocking=True) for name, t in batch.items() if name != "num_tokens"}
        if self.value_scale != 1.0:
            batch.update({name: t * self.value_scale for name, t in batch.items() if name.startswith("teacher_values")})
        return batch, damaged

    def _next_micro_batch(self, index: int) -> tuple[dict, bool, torch.Tensor]:
        """Micro-batch ``index`` of the next step on the device, whether the student wrote it (on-policy),
        and its [damaged, sequence tokens, positions, written tokens, generation seconds]."""
        config = self.config
        batch = next(self._batches)
        tokens, positions = batch["num_tokens"], batch["input_ids"].numel()
        batch, damaged = self._to_device(batch)
        written, seconds = 0, 0.0
        on_policy = is_on_policy(config.seed, self.step + 1, index, config.on_policy_fraction)
        if on_policy:
            batch, written, seconds = student_continuations(
                self.student, batch, max_new_tokens=config.max_new_tokens,
                temperature=config.generation_temperature, seed=(config.seed, self.step + 1, index, self.rank))
            tokens, positions = batch.pop("num_tokens"), batch["input_ids"].numel()
        return batch, on_policy, torch.tensor([damaged, tokens, positions, written, seconds], dtype=torch.float64)

    def accumulate_gradients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over the next step's ``grad_accum_steps`` micro-batches: the gradients are
        in the parameters' ``.grad`` (the optimizer does not step; ``train_step`` does). Returns the
        global number of learned tokens (the loss divisor) and this rank's float64 sums [loss, ce * n,
        kd * n, hidden-state term, damaged sequences, sequence tokens, positions, written tokens, generation
        seconds]."""
        self.model.train()
        batches, on_policy, counts = zip(*(self._next_micro_batch(i) for i in range(self.config.grad_accum_steps)))
        num_items = sum_over_ranks(sum(_active(b) for b in batches).double()).clamp(min=1)
        sums = torch.zeros(9, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            with gradient_sync(self.model, enabled=i == len(batches) - 1):
                loss, parts, hidden_term = self.model(batch, num_items=num_items, on_policy=on_policy[i])
                (loss * self.world_size).backward()
            sums[:4] += torch.stack([loss.detach(), parts.ce * _active(batch), parts.kd * _active(batch),
                                     hidden_term]).double()
        sums[4:] = sum(counts)
        return num_items, sums

    def train_step(self, stop: StopRequest | None = None) -> dict:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns its global statistics
        (loss, ce, kd, lr, grad_norm, learned tokens, sequence tokens, positions, damaged, and whether any
        rank was asked to stop)."""
        started = time.perf_counter()
        num_items, sums = self.accumulate_gradients()
        sums = torch.cat([sums, torch.tensor([float(stop is not None and stop.requested)], dtype=torch.float64,
                                             device=self.device)])
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm or math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        (loss_sum, ce_sum, kd_sum, hidden_sum, damaged, sequence_tokens, positions, written, generation_s,
         stops) = sum_over_ranks(sums).tolist()
        self._check_finite(loss_sum, grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = int(num_items.item())
        self.step += 1
        self.consumed += self.global_batch
        self.tokens += tokens
        self.damaged += int(damaged)
        self.elapsed += time.perf_counter() - started
        return {"loss": loss_sum, "ce": ce_sum / tokens, "kd": kd_sum / tokens, "hidden": hidden_sum, "lr": lr,
                "grad_norm": grad_norm, "tokens": tokens, "sequence_tokens": int(sequence_tokens),
                "positions": int(positions), "damaged": int(damaged), "generated_tokens": int(written),
                "generation_s": generation_s / self.world_size, "stop": stops > 0}

    def _check_finite(self, loss: float, grad_norm: float) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        self.optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(
            f"step {self.step + 1}: the loss is {loss} and the gradient norm {grad_norm}; the step was not taken "
            f"(the weights are those of step {self.step}). A NaN or inf teacher value makes its row's loss NaN: "
            f"check the shards with `kdfast verify {self.config.train_shards}`; otherwise resume from the last "
            "checkpoint with a lower lr or a smaller max_grad_norm")

    def train(self) -> dict:
        """Train to ``max_steps`` (or to SIGINT / SIGTERM); returns the summary written to summary.json.
        A finished run is left as it is: its summary is returned."""
        config = self.config
        if self.finished is not None:
            self._print(f"run {self.run_dir} is finished (step {self.step} of max_steps {config.max_steps}, "
                        "summary.json: completed); nothing to do. Raise max_steps to train further")
            return self.finished
        self._print(self.start_line())
        bar = tqdm(total=config.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (config.progress and self.rank == 0))
        if self.eval_data is not None and self.step == 0:
            self._evaluate_and_log()
        window = _Window(hidden=bool(config.hidden_loss), on_policy=config.on_policy_fraction > 0)
        status = "completed"
        with StopRequest() as stop, bar:
            while self.step < config.max_steps:
                stats = self.train_step(stop)
                window.add(stats)
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == config.max_steps or stats["stop"]:
                    record = self._log_window(window, stats)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['learned_tokens_per_s']:.0f}")
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

    def _finished_summary(self) -> dict | None:
        """summary.json of a completed run at this (resumed) step >= max_steps, else None."""
        path = self.run_dir / "summary.json"
        if self.step < self.config.max_steps or self.last_checkpoint is None or not path.exists():
            return None
        summary = json.loads(path.read_text())
        return summary if summary.get("status") == "completed" and summary.get("step") == self.step else None

    def start_line(self) -> str:
        """One line: the student, device, dtype, data and steps of this run."""
        config, data = self.config, self.train_data
        precision = str(next(self.student.parameters()).dtype).removeprefix("torch.")
        if self.autocast_dtype is not None:
            precision += f" weights, {str(self.autocast_dtype).removeprefix('torch.')} autocast"
        directories = len(config.train_dirs)
        return (f"kdfast train: student {type(self.student).__name__} with {self.num_parameters:,} parameters, "
                f"device {self.device}, dtype {precision}, data {len(data):,} sequences with "
                f"{data.learned_tokens:,} learned tokens ({directories} director{'y' if directories == 1 else 'ies'}"
                f"{', packed' if config.packing else ''}), teacher {self._teacher_description()}, "
                f"steps {self.step} -> {config.max_steps} of {self.global_batch} sequences")

    def _teacher_description(self) -> str:
        config = self.config
        if self.live_teacher is not None:
            extras = [f"{config.divergence}"] + ([f"on-policy {config.on_policy_fraction:g}"]
                                                 if config.on_policy_fraction else [])
            extras += [f"hidden {config.hidden_loss} x{len(config.hidden_layer_map)}"] if config.hidden_loss else []
            return f"live {config.teacher} ({config.teacher_dtype}, {', '.join(extras)})"
        if config.teacher_shards:
            return f"{len(config.teacher_shards)} shard sets weighted {config.teacher_weights}"
        return "shards"

    def _print(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def _log_window(self, window: _Window, stats: dict) -> dict:
        record = {"step": self.step, "epoch": self._epoch(), **window.means(), "lr": stats["lr"],
                  "grad_norm": stats["grad_norm"], "tokens": self.tokens, "damaged_sequences": self.damaged}
        self._write_metrics(record)
        window.reset()
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
        config, data = self.config, CatchDamaged(self.eval_data)
        total = min(config.eval_sequences or len(data), len(data))
        ids = self.eval_data.sampler.order(0)[: total // self.world_size].tolist()
        size = config.eval_batch_size or config.micro_batch_size
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(ids), size):
                batch, _ = self._to_device(collate([data[i] for i in ids[start:start + size]]))
                sums += self.model(batch, evaluate=True)
        ce, kd, active, matches, scored = sum_over_ranks(sums).tolist()
        return {"eval_ce": ce / max(active, 1), "eval_kd": kd / max(active, 1),
                "eval_top1": matches / max(scored, 1), "eval_tokens": int(active)}

    def _evaluate_and_log(self) -> None:
        self.last_eval = self.evaluate()
        self._write_metrics({"step": self.step, **self.last_eval})
        log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in self.last_eval.items()))

    # --- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_<step>`` atomically (every rank takes part); keep the newest N."""
        path = checkpoint.checkpoint_path(self.run_dir, self.step)
        if self.last_checkpoint != path:
            state = {"step": self.step, "epoch": self._epoch(), "consumed_samples": self.consumed,
                     "world_size": self.world_size, "tokens": self.tokens, "damaged_sequences": self.damaged,
                     "elapsed_s": self.elapsed, "config": self.config.to_dict(),
                     "teacher_identity": self.live_teacher.identity if self.live_teacher is not None else None}
            checkpoint.save_checkpoint(path, self.model, self.optimizer, self.scheduler, state,
                                       keep=self.config.keep_checkpoints)
            self.last_checkpoint = path
        return path

    def _load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "trainer_state.json").read_text())
        self._warn_config_changes(state["config"], path)
        if state["consumed_samples"] % self.world_size:
            raise ValueError(f"{path}: {state['consumed_samples']} consumed samples cannot be split over "
                             f"world_size={self.world_size}")
        self._check_teacher_identity(state.get("teacher_identity"), path)
        checkpoint.load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.step, self.consumed = state["step"], state["consumed_samples"]
        self.tokens, self.elapsed = state["tokens"], state["elapsed_s"]
        self.damaged = state.get("damaged_sequences", 0)
        self.last_checkpoint = path
        log.info("resumed from %s (step %d, epoch %d)", path, self.step, state["epoch"])

    def _check_teacher_identity(self, saved: str | None, path: Path) -> None:
        """The live teacher is not checkpointed: the one given now must be the one the run trained with."""
        if self.live_teacher is None or saved is None:
            return
        if self.live_teacher.identity != saved:
            raise ValueError(f"{path}: the run was trained with another teacher than teacher = "
                             f"{self.config.teacher!r} (its config, tokenizer or weight files differ); resume with the "
                             "same teacher or start a new run_dir")

    def _warn_config_changes(self, saved: dict, path: Path) -> None:
        changed = {k: (saved.get(k), v) for k, v in self.config.to_dict().items()
                   if k not in OPERATIONAL_KEYS and saved.get(k) != v}
        if changed:
            log.warning("resuming %s with changed settings (the run is no longer an exact continuation): %s", path,
                        ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()))

    def save_final(self) -> Path:
        """The student into ``run_dir/final``: ``save_pretrained`` (HF) or ``model.pt`` (state dict), with the
        tokenizer of the ``student`` directory when it has one."""
        return checkpoint.save_student(self.run_dir / "final", self.model, self.student, self.tokenizer)

    # --- end of run ------------------------------------------------------------------------------

    def _finish(self, status: str) -> dict:
        last = next((r for r in reversed(read_metrics(self.metrics_path)) if "loss" in r), {}) if self.rank == 0 else {}
        summary = {
            "status": status, "step": self.step, "max_steps": self.config.max_steps, "epoch": self._epoch(),
            "train_loss": last.get("loss"), "train_ce": last.get("ce"), "train_kd": last.get("kd"), **self.last_eval,
            "tokens": self.tokens, "train_seconds": self.elapsed,
            "learned_tokens_per_s": self.tokens / max(self.elapsed, 1e-9),
            "damaged_sequences": self.damaged, "world_size": self.world_size, "global_batch": self.global_batch,
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


def _active(batch: dict) -> torch.Tensor:
    return (batch["labels"] != IGNORE_INDEX).sum()


class _Window:
    """Sums of the steps since the last metrics line; ``hidden`` / ``on_policy``: also the hidden-state
    term and the student's generation."""

    SUMMED = ("loss", "ce", "kd", "hidden", "tokens", "sequence_tokens", "positions", "generated_tokens",
              "generation_s")

    def __init__(self, hidden: bool = False, on_policy: bool = False):
        self.hidden, self.on_policy = hidden, on_policy
        self.reset()

    def reset(self) -> None:
        self.steps, self.start = 0, time.perf_counter()
        self.sums = dict.fromkeys(self.SUMMED, 0)

    def add(self, stats: dict) -> None:
        self.steps += 1
        for key in self.SUMMED:
            self.sums[key] += stats[key]

    def means(self) -> dict:
        """Mean loss, ce, kd (and hidden) per step; learned tokens per second; padded positions / all
        positions; on-policy: the student's written tokens per second of generation and the share of the
        time spent generating (``learned_tokens_per_s`` counts the whole time)."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        sums = self.sums
        means = {"loss": sums["loss"] / self.steps, "ce": sums["ce"] / self.steps, "kd": sums["kd"] / self.steps,
                 "learned_tokens_per_s": sums["tokens"] / seconds,
                 "padding_fraction": 1 - sums["sequence_tokens"] / max(sums["positions"], 1)}
        if self.hidden:
            means["hidden"] = sums["hidden"] / self.steps
        if self.on_policy:
            means["generation_tokens_per_s"] = sums["generated_tokens"] / max(sums["generation_s"], 1e-9)
            means["generation_fraction"] = sums["generation_s"] / seconds
        return means


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(config: TrainConfig) -> int:
    """The ``kdfast train`` command: train, print the summary; exit code 0."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    with Trainer(config) as trainer:
        trainer.train()
    return 0
