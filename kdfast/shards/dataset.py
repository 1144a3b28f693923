"""ShardDataset: teacher targets as ready-to-train tensors, in a reproducible, rank-sliced order.

Alignment (the same convention as Hugging Face causal-LM labels, shifted here once): a stored
sequence x[0..L-1] with loss mask m[0..L-1] (version-1 shards: every m[i] is true) yields

    input_ids[i]       = x[i]                                   [L] int64
    labels[i]          = x[i + 1] where m[i] and i < L - 1, else -100   [L] int64
    teacher_indices[i] = the teacher's top-k / sampled ids for the token after x[0..i]   [L, k]
    teacher_values[i]  = their log-probs (kind "logprobs") or probabilities ("probs")   [L, k]
    teacher_tail[i]    = log of the teacher mass outside those slots (-inf: none)       [L] float32

so row i of the student's logits (computed from x[0..i]) is compared with labels[i] and with the
teacher targets of row i, exactly what ``kdfast.kd_loss(logits, labels, teacher_indices=...,
teacher_values=..., teacher_kind=dataset.kind)`` expects. A position that is not learned has no
stored targets: its slots are empty (-1, value -inf for logprobs / 0 for probs, tail -inf) and its
label is -100, so kd_loss ignores it. The last position keeps the teacher's prediction after the
whole sequence, but its label is -100 too; it is kept so that every tensor has L rows.

Compact samples (``ShardDataset(..., compact=True)``, what ``kdfast train`` reads): the same
``input_ids`` [L] and ``labels`` [L], and teacher rows for the R labelled positions only, in order,
where R = ``(labels != -100).sum()``:

    teacher_indices [R, k], teacher_values [R, k], teacher_tail [R]

so row r is the row of the r-th position whose label is not -100: ``logits[labels != -100]`` lines
up with them. They are the stored rows themselves (no empty rows are built), except that a learned
last position's row, which has no label, is left out (the last position of every version-1
sequence is learned). Per element they equal the full-length sample's rows at the labelled positions.

Damage: ``dataset[i]`` verifies what it reads (see ``kdfast.shards.reader``) and raises ShardError
with ``path`` (the shard file), ``sequence`` (= i) and ``section`` (when known) set, so a training
loop can stop or skip and count.

Indices are int32 by default (the stored type; kd_loss accepts int32 and it halves host-to-device
bytes); pass ``index_dtype=torch.int64`` for code that needs int64. Values are float32 by default;
``values_dtype=torch.float16`` on float16 shards (bfloat16 on bfloat16 shards) returns the stored
values bit-exactly. Every tensor is a fresh contiguous CPU tensor, so ``DataLoader(pin_memory=True)``
pins them without extra copies beyond its own; the default collate stacks equal-length sequences only
(``kdfast capture --tokens`` writes one length per dataset), variable lengths need a padding collate,
and compact samples, whose R varies with the mask, ``kdfast.train.data.collate`` or ``pack``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kdfast.shards.reader import open_shards

__all__ = ["ShardDataset", "ShardSampler", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _inputs_and_labels(tokens: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` [L] int64 (the tokens) and ``labels`` [L] int64: the next token where the position
    is learned, -100 elsewhere and at the last position."""
    input_ids = tokens.astype(np.int64)
    labels = np.empty_like(input_ids)
    labels.fill(IGNORE_INDEX)
    np.copyto(labels[:-1], input_ids[1:], where=mask[:-1])
    return torch.from_numpy(input_ids), torch.from_numpy(labels)


def _as(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``array`` as a tensor of ``dtype``: the array itself when it has that type, else a converted copy."""
    tensor = torch.from_numpy(array)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class ShardSampler(Sampler[int]):
    """This rank's sequence ids, epoch after epoch, resumable from a consumed count.

    Order: epoch e is ``numpy.random.default_rng([seed, e]).permutation(num_sequences)`` (identity
    when ``shuffle=False``), a pure function of (seed, epoch). It is cut to ``per_rank * world_size``
    entries and rank r takes entries r, r + world_size, ...: no sequence is read by two ranks in an
    epoch and all ranks take the same number of steps (the < world_size left-over sequences differ
    from epoch to epoch).

    ``consumed`` counts the samples this rank has already trained on over the whole run; the epoch is
    ``consumed // per_rank`` and iteration resumes inside it. Iterating to the end of an epoch moves
    ``consumed`` to the start of the next, so ``for epoch ...: for batch in loader`` walks the epochs.
    """

    def __init__(self, num_sequences: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, consumed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got rank={rank}")
        if num_sequences < world_size:
            raise ValueError(f"{num_sequences} sequences cannot be split over world_size={world_size} ranks")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_sequences, self.seed, self.shuffle = num_sequences, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.per_rank = num_sequences // world_size
        self.set_consumed(consumed)

    def set_consumed(self, consumed: int) -> None:
        """Resume point: the number of samples this rank has consumed so far (across epochs)."""
        if consumed < 0:
            raise ValueError(f"consumed must be >= 0, got {consumed}")
        self.consumed = consumed

    @property
    def epoch(self) -> int:
        return self.consumed // self.per_rank

    def order(self, epoch: int) -> np.ndarray:
        """[per_rank] int64: the sequence ids this rank reads in ``epoch``, in order."""
        ids = (np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences) if self.shuffle
               else np.arange(self.num_sequences))
        return ids[self.rank:self.per_rank * self.world_size:self.world_size]

    def __len__(self) -> int:
        """Samples left in the current epoch."""
        return self.per_rank - self.consumed % self.per_rank

    def __iter__(self):
        epoch, start = divmod(self.consumed, self.per_rank)
        for index in self.order(epoch)[start:].tolist():
            yield index
        self.consumed = (epoch + 1) * self.per_rank


class ShardDataset(Dataset):
    """A shard directory as a map-style dataset plus the sampler that orders it (see module doc).

    ``dataset[i]`` is sequence i as a dict of tensors; ``dataset.sampler`` (a ShardSampler built from
    seed / shuffle / rank / world_size / consumed) gives this rank's order. Use
    ``DataLoader(dataset, sampler=dataset.sampler, batch_size=..., num_workers=..., pin_memory=True)``,
    or iterate the dataset itself (same order, in-process). Workers map the shard files themselves.
    ``vocab_size`` (the student's) must equal the teacher's, else ShardError. ``verify=True`` checks
    every byte at construction; ``verify_reads`` (default True) checks each read's checksums (see
    ``open_shards``). ``compact=True``: teacher rows of the labelled positions only (module doc).
    """

    def __init__(self, path: str | Path, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 consumed: int = 0, vocab_size: int | None = None, index_dtype: torch.dtype = torch.int32,
                 values_dtype: torch.dtype = torch.float32, verify: bool = False, verify_reads: bool = True,
                 compact: bool = False):
        if index_dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
        if not values_dtype.is_floating_point:
            raise ValueError(f"values_dtype must be a floating-point dtype, got {values_dtype}")
        self.shards = open_shards(path, vocab_size=vocab_size, verify=verify, verify_reads=verify_reads)
        self.index_dtype, self.values_dtype, self.compact = index_dtype, values_dtype, compact
        self.sampler = ShardSampler(len(self.shards), seed=seed, shuffle=shuffle, rank=rank, world_size=world_size,
                                    consumed=consumed)

    kind = property(lambda self: self.shards.kind)
    k = property(lambda self: self.shards.k)
    vocab_size = property(lambda self: self.shards.vocab_size)
    capture_temperature = property(lambda self: self.shards.capture_temperature)
    manifest = property(lambda self: self.shards.manifest)
    learned_tokens = property(lambda self: self.shards.learned_tokens)
    total_tokens = property(lambda self: self.shards.total_tokens)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.compact:
            return self._compact_sample(int(index))
        seq = self.shards.read(int(index))
        input_ids, labels = _inputs_and_labels(seq.tokens, seq.mask)
        return {
            "input_ids": input_ids,  # [L] int64
            "labels": labels,  # [L] int64
            "teacher_indices": _as(seq.indices, self.index_dtype),  # [L, k]
            "teacher_values": _as(seq.values, self.values_dtype),  # [L, k]
            "teacher_tail": torch.from_numpy(seq.tail),  # [L] float32
        }

    def _compact_sample(self, index: int) -> dict[str, torch.Tensor]:
        """Sequence ``index`` with the teacher rows of its labelled positions only."""
        tokens, indices, values, tail, mask = self.shards.read_learned(index)
        input_ids, labels = _inputs_and_labels(tokens, mask)
        if mask[-1]:  # a learned last position's row has no label
            indices, values, tail = indices[:-1], values[:-1], tail[:-1]
        return {
            "input_ids": input_ids,  # [L] int64
            "labels": labels,  # [L] int64
            "teacher_indices": _as(indices, self.index_dtype),  # [R, k]
            "teacher_values": _as(values, self.values_dtype),  # [R, k]
            "teacher_tail": torch.from_numpy(tail),  # [R] float32
        }

    def __iter__(self):
        """This rank's samples from the sampler's resume point to the end of its epoch."""
        for index in self.sampler:
            yield self[index]
