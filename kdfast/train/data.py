"""Training data: shard datasets checked against the loss options, the policy on damaged sequences,
batching and the endless micro-batch order.

Order. Each rank reads ``ShardDataset(rank, world_size)``: epoch e is a permutation of the sequences
that is a pure function of (seed, e), and rank r takes its entries r, r + W, r + 2W, ...
``MicroBatchSampler`` cuts that order into micro-batches that run across epoch boundaries.

Damaged data. ``ShardDataset`` verifies what it reads and raises ``ShardError`` naming the file, the
section and the sequence. ``CatchDamaged`` catches it where the read happens (a DataLoader worker,
too) and returns an empty sample (a single padded row: no tokens, no loss) that carries the error;
``collate`` lists the errors in the batch's ``damaged`` entry and the trainer applies the policy:
re-raise the first one (default), or with ``skip_damaged = true`` log and count them. Catching in
the worker keeps the ShardError itself: the DataLoader would re-raise a worker's exception as a
RuntimeError. The data position does not change: a resumed run meets the same sequences.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from kdfast.shards import IGNORE_INDEX, ShardDataset, ShardError, ShardSampler
from kdfast.train.config import TrainConfig

log = logging.getLogger("kdfast.train")

# Right-padding of each batched key: inputs 0, labels ignored, teacher slots empty, tail: no mass.
PAD = {"input_ids": 0, "labels": IGNORE_INDEX, "teacher_indices": -1, "teacher_values": 0.0,
       "teacher_tail": -math.inf}


def collate(samples: list[dict]) -> dict:
    """Right-pad ShardDataset samples into [B, L] / [B, L, k] tensors; ``damaged`` lists the ShardErrors
    of the samples ``CatchDamaged`` replaced."""
    batch = {name: nn.utils.rnn.pad_sequence([s[name] for s in samples], batch_first=True, padding_value=pad)
             for name, pad in PAD.items()}
    batch["damaged"] = [s["damaged"] for s in samples if "damaged" in s]
    return batch


class CatchDamaged(torch.utils.data.Dataset):
    """``dataset[i]``, or an empty sample whose ``damaged`` entry is the ShardError reading sequence i raised."""

    def __init__(self, dataset: ShardDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        try:
            return self.dataset[index]
        except ShardError as e:
            return {**self.empty_sample(), "damaged": e}

    def empty_sample(self) -> dict[str, torch.Tensor]:
        """One padded row: no active token, empty teacher slots."""
        k = self.dataset.k
        return {"input_ids": torch.zeros(1, dtype=torch.long), "labels": torch.full((1,), IGNORE_INDEX),
                "teacher_indices": torch.full((1, k), -1, dtype=self.dataset.index_dtype),
                "teacher_values": torch.zeros(1, k, dtype=self.dataset.values_dtype),
                "teacher_tail": torch.full((1,), -math.inf)}


def apply_damage_policy(errors: list[ShardError], skip: bool) -> int:
    """Re-raise the first damaged read unless ``skip``; else log each and return how many there were."""
    if errors and not skip:
        raise errors[0]
    for error in errors:
        log.warning("skipping damaged sequence %s (skip_damaged = true): %s", error.sequence, error)
    return len(errors)


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


def check_teacher_targets(config: TrainConfig, train: ShardDataset, held_out: ShardDataset | None) -> float:
    """Loss options against the shard manifests; returns the factor applied to the teacher values.

    ``tail = true`` (the missing-mass bucket, from the shards' exact tail) is exact only when the
    training temperature equals the capture temperature T_c, so anything else raises ValueError.
    Without the tail, log-probs captured at T_c != 1 are multiplied by T_c, which turns them into
    teacher logits up to a per-row constant: the renormalised top-k target is then
    softmax(teacher_logits / T) at the training T.
    """
    same_targets = held_out is None or (held_out.kind, held_out.capture_temperature) == (train.kind,
                                                                                        train.capture_temperature)
    if not same_targets:
        raise ValueError(f"eval_shards ({held_out.kind}, T={held_out.capture_temperature}) and train_shards "
                         f"({train.kind}, T={train.capture_temperature}) hold different kinds of targets")
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
