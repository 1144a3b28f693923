"""Training data: shard datasets checked against the loss options, mixtures of several directories,
the policy on damaged sequences, batching (padded or packed) and the endless micro-batch order.

Order. Each rank reads ``ShardDataset(rank, world_size)``: epoch e is a permutation of the sequences
that is a pure function of (seed, e), and rank r takes its entries r, r + W, r + 2W, ...
``MicroBatchSampler`` cuts that order into micro-batches that run across epoch boundaries.

Mixtures (``train_shards = [a, b, ...]`` with ``train_weights``). ``ShardMixture`` numbers the
sequences of all directories one after the other, and ``MixtureSampler`` orders them. An epoch has
E = N_0 + N_1 + ... samples (N_i: the sequences of directory i), of which directory i supplies
exactly c_i, its weight's share of E rounded by largest remainder (without weights c_i = N_i, so an
epoch reads every sequence once). Which directory each of the E slots of epoch e reads is
``default_rng([seed, e]).permutation`` of the c_0 zeros, c_1 ones, ...; directory i's slots read, in
order, the entries [e * c_i, (e + 1) * c_i) of its own endless stream, whose pass q is
``default_rng([seed, q, i + 1]).permutation(N_i)``: a directory whose share exceeds its size repeats
its sequences, one below it reaches every sequence over several epochs. The order is a pure function
of (seed, epoch), cut and dealt out to the ranks like a single directory's, so the consumed count is
still the whole data position.

Batches. ``collate`` right-pads each sequence into its own row. ``pack`` lays the same sequences
into as few rows as fit ``max(pack_length, longest sequence)`` positions (first-fit decreasing),
with ``position_ids`` restarting at 0 for each sequence: a Hugging Face model isolates the sequences
of a row by them (``kdfast.train.student.check_packing_isolates``). Each sequence's labels end with
-100 (its last position has no next token in the sequence), so no position learns the first token
of the sequence after it, and the loss is the padded batch's up to float rounding. Both record the
sequences' own tokens (``num_tokens``) next to the tensors, for the padding fraction.

Teacher rows. The trainer reads compact samples (``ShardDataset(compact=True)``: teacher rows of the
labelled positions only), and both layouts concatenate them in row-major order of the batch's
labelled positions: ``teacher_indices`` [N, k], ``teacher_values`` [N, k], ``teacher_tail`` [N] with
N = ``(labels != -100).sum()``, row n belonging to the n-th entry of ``labels[labels != -100]``. The
invariant rests on each sample holding exactly one row per label, which ``compact_layout`` checks
per sample (a count, ValueError otherwise). Full-length samples (one teacher row per position, as
``ShardDataset`` gives them by default) are padded like the positions instead: [B, L, k], [B, L].

Several teachers (``teacher_shards``). ``TeacherStack`` reads sequence i of every directory into
one sample (teacher j's rows under ``teacher_key(name, j)``); the batches concatenate every
teacher's rows the same way.

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

import numpy as np
import torch
from torch import nn

from kdfast.shards import IGNORE_INDEX, ShardDataset, ShardError, ShardSampler
from kdfast.train.config import TrainConfig

log = logging.getLogger("kdfast.train")

# Right-padding of the per-position keys: inputs 0, labels ignored.
POSITION_PAD = {"input_ids": 0, "labels": IGNORE_INDEX}
# Right-padding of full-length teacher rows: slots empty, tail: no mass (compact rows are not padded).
TEACHER_PAD = {"teacher_indices": -1, "teacher_values": 0.0, "teacher_tail": -math.inf}
PAD = {**POSITION_PAD, **TEACHER_PAD}


def teacher_key(name: str, teacher: int) -> str:
    """The batch key of teacher ``teacher``'s ``name`` rows in a TeacherStack sample (teacher 0: ``name``)."""
    return name if teacher == 0 else f"{name}_{teacher}"


def collate(samples: list[dict]) -> dict:
    """ShardDataset samples, one sequence per row, right-padded into ``input_ids`` / ``labels`` [B, L];
    teacher rows as ``batch_rows`` lays them out. ``damaged`` lists the ShardErrors of the samples
    ``CatchDamaged`` replaced, ``num_tokens`` counts the others' tokens."""
    return {**batch_rows([[sample] for sample in samples], compact_layout(samples)), **_batch_info(samples)}


def pack(samples: list[dict], pack_length: int = 0) -> dict:
    """The samples laid into rows of at most ``max(pack_length, longest sample)`` positions (first-fit
    decreasing), right-padded to the fullest row; ``position_ids`` [B, L] restart at 0 for each sample
    (and for the padding). Teacher rows, ``damaged`` and ``num_tokens`` as in ``collate``."""
    lengths = [len(s["input_ids"]) for s in samples]
    rows = pack_rows(lengths, max(pack_length, *lengths))
    batch = batch_rows([[samples[i] for i in row] for row in rows], compact_layout(samples))
    positions = [torch.cat([torch.arange(lengths[i]) for i in row]) for row in rows]
    batch["position_ids"] = nn.utils.rnn.pad_sequence(positions, batch_first=True, padding_value=0)
    return {**batch, **_batch_info(samples)}


def batch_rows(rows: list[list[dict]], compact: bool) -> dict:
    """Each row's samples joined in order, right-padded to the longest row: ``input_ids`` / ``labels``
    [B, L]. Full-length samples' teacher tensors are padded the same way ([B, L, k], [B, L]); ``compact``
    samples' (``ShardDataset(compact=True)``) are concatenated in row-major order of the batch's labelled
    positions ([N, k], [N]), so that row n of them belongs to the n-th entry of ``labels[labels != -100]``."""
    samples = [sample for row in rows for sample in row]
    names = POSITION_PAD if compact else PAD
    joined = [{name: _join([sample[name] for sample in row]) for name in names} for row in rows]
    batch = {name: nn.utils.rnn.pad_sequence([r[name] for r in joined], batch_first=True, padding_value=pad)
             for name, pad in names.items()}
    if compact:  # every teacher's rows: TEACHER_PAD's names, and teacher j's (TeacherStack) under name_j
        teacher_names = [name for name in samples[0] if name.startswith(tuple(TEACHER_PAD))]
        batch.update({name: torch.cat([sample[name] for sample in samples]) for name in teacher_names})
    return batch


def _join(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along their first dimension (a single one as it is, not copied)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def compact_layout(samples: list[dict]) -> bool:
    """Whether the samples hold compact teacher rows, one per labelled position (a full-length sample has
    one per position, and its last position never has a label, so the two never look alike); ValueError
    when the samples mix the layouts or a compact sample's rows do not match its labels."""
    rows = [len(s["teacher_tail"]) for s in samples]
    positions = [len(s["input_ids"]) for s in samples]
    if all(r == p for r, p in zip(rows, positions)):
        return False
    for i, sample in enumerate(samples):
        labelled = int((sample["labels"] != IGNORE_INDEX).sum())
        counts = (len(sample["teacher_indices"]), len(sample["teacher_values"]), rows[i])
        if counts != (labelled,) * 3:
            raise ValueError(f"sample {i} of the batch has {counts} rows of (teacher_indices, teacher_values, "
                             f"teacher_tail) for {labelled} labelled positions (of {positions[i]}): a batch takes "
                             "compact samples only (one teacher row per label) or full-length ones only (one per "
                             "position)")
    return True


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, longest first, each into the first row with room."""
    rows, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(row_length)
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def _batch_info(samples: list[dict]) -> dict:
    return {"damaged": [s["damaged"] for s in samples if "damaged" in s],
            "num_tokens": sum(len(s["input_ids"]) for s in samples if "damaged" not in s)}


class CatchDamaged(torch.utils.data.Dataset):
    """``dataset[i]``, or an empty sample whose ``damaged`` entry is the ShardError reading sequence i raised."""

    def __init__(self, dataset: ShardDataset | ShardMixture):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        try:
            return self.dataset[index]
        except ShardError as e:
            return {**self.empty_sample(), "damaged": e}

    def empty_sample(self) -> dict[str, torch.Tensor]:
        """One padded position without a label: no teacher row (compact datasets) or one with empty slots
        (for each teacher of a TeacherStack)."""
        rows = 0 if self.dataset.compact else 1
        sample = {"input_ids": torch.zeros(1, dtype=torch.long), "labels": torch.full((1,), IGNORE_INDEX)}
        for j, k in enumerate(getattr(self.dataset, "ks", [self.dataset.k])):
            sample.update({teacher_key("teacher_indices", j): torch.full((rows, k), -1, dtype=self.dataset.index_dtype),
                           teacher_key("teacher_values", j): torch.zeros(rows, k, dtype=self.dataset.values_dtype),
                           teacher_key("teacher_tail", j): torch.full((rows,), -math.inf)})
        return sample


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


class _SeveralDirectories(torch.utils.data.Dataset):
    """A dataset over ``self.parts`` (ShardDatasets agreeing on their targets): the first one's target fields."""

    parts: list[ShardDataset]
    kind = property(lambda self: self.parts[0].kind)
    k = property(lambda self: self.parts[0].k)
    vocab_size = property(lambda self: self.parts[0].vocab_size)
    capture_temperature = property(lambda self: self.parts[0].capture_temperature)
    index_dtype = property(lambda self: self.parts[0].index_dtype)
    values_dtype = property(lambda self: self.parts[0].values_dtype)
    compact = property(lambda self: self.parts[0].compact)


class TeacherStack(_SeveralDirectories):
    """Sequence i of every ``teacher_shards`` directory as one compact sample: the first directory's
    tokens, labels and teacher rows, and teacher j's rows under ``teacher_key(name, j)``.

    The first directory also gives the order (its sampler). The directories must hold the same
    sequences: the same kind of targets, vocabulary, capture temperature, sequence and learned-token
    counts, and equal, recorded manifest ``source`` entries (the capture input's fingerprint);
    each read checks that the tokens and the learned positions agree (ValueError otherwise)."""

    def __init__(self, parts: list[ShardDataset], paths: list[str]):
        _check_same_sequences(parts, paths)
        self.parts, self.paths = parts, paths
        self.sampler = parts[0].sampler

    learned_tokens = property(lambda self: self.parts[0].learned_tokens)
    total_tokens = property(lambda self: self.parts[0].total_tokens)
    ks = property(lambda self: [part.k for part in self.parts])

    def __len__(self) -> int:
        return len(self.parts[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.parts[0][index]
        for j, part in enumerate(self.parts[1:], start=1):
            other = part[index]
            if not (torch.equal(other["input_ids"], sample["input_ids"]) and torch.equal(other["labels"],
                                                                                        sample["labels"])):
                raise ValueError(f"teacher_shards: sequence {index} of {self.paths[j]} differs from that of "
                                 f"{self.paths[0]} (tokens or learned positions); the directories must be captures "
                                 "of the same sequences")
            sample.update({teacher_key(name, j): other[name] for name in TEACHER_PAD})
        return sample


def _check_same_sequences(parts: list[ShardDataset], paths: list[str]) -> None:
    """The teachers' directories hold the same kind of targets (k may differ) over the same sequences."""
    check_same_targets(parts, paths, ("kind", "vocab_size", "capture_temperature"), key="teacher_shards")
    first = parts[0]
    for part, path in zip(parts[1:], paths[1:]):
        for what, mine, theirs in (("sequences", len(part), len(first)),
                                   ("learned tokens", part.learned_tokens, first.learned_tokens)):
            if mine != theirs:
                raise ValueError(f"teacher_shards: {path} has {what} {mine!r} but {paths[0]} has {theirs!r}; the "
                                 "directories must be captures of the same sequences")
        sources = [p.manifest.get("source") for p in (first, part)]
        if None in sources or sources[0] != sources[1]:
            raise ValueError(f"teacher_shards: the manifests of {paths[0]} and {path} do not record the same source "
                             f"({sources[0]!r} vs {sources[1]!r}); capture every teacher from the same input")


def open_teacher_stack(config: TrainConfig, rank: int, world_size: int, vocab_size: int) -> TeacherStack:
    parts = [ShardDataset(path, seed=config.seed, shuffle=i == 0, rank=rank, world_size=world_size,
                          vocab_size=vocab_size, compact=True) for i, path in enumerate(config.teacher_shards)]
    return TeacherStack(parts, list(config.teacher_shards))


# Manifest fields that mixed directories must share: what the loss and the batches depend on.
SHARED_TARGET_FIELDS = ("kind", "vocab_size", "k", "capture_temperature")


def open_train_data(config: TrainConfig, rank: int, world_size: int, vocab_size: int, *,
                    compact: bool = False) -> ShardDataset | ShardMixture:
    """``train_shards``: one directory as a ShardDataset, several as a ShardMixture; ``compact``: their
    samples hold the teacher rows of the labelled positions only (the trainer's), else one per position.
    ``teacher_shards``: a ``kdfast.train.teachers.TeacherStack`` (compact)."""
    if config.teacher_shards:
        return open_teacher_stack(config, rank, world_size, vocab_size)
    if len(config.train_dirs) == 1:
        return ShardDataset(config.train_dirs[0], seed=config.seed, rank=rank, world_size=world_size,
                            vocab_size=vocab_size, compact=compact)
    parts = [ShardDataset(path, shuffle=False, vocab_size=vocab_size, compact=compact) for path in config.train_dirs]
    return ShardMixture(parts, config.train_dirs, config.train_weights, seed=config.seed, rank=rank,
                        world_size=world_size)


class ShardMixture(_SeveralDirectories):
    """Several shard directories as one dataset: sequence ``offset_i + j`` is sequence j of directory i
    (offsets: the running sum of their sizes), ordered by a ``MixtureSampler`` (``.sampler``).

    The directories must agree on ``SHARED_TARGET_FIELDS`` (ValueError naming the field and both
    directories otherwise); ``weights`` are relative sampling weights ([] = in proportion to their sizes).
    """

    def __init__(self, parts: list[ShardDataset], paths: list[str], weights: list[float], *, seed: int,
                 rank: int = 0, world_size: int = 1):
        check_same_targets(parts, paths)
        self.parts, self.paths = parts, paths
        sizes = [len(part) for part in parts]
        self.sampler = MixtureSampler(sizes, epoch_quotas(sizes, weights), seed=seed, rank=rank,
                                      world_size=world_size)
        self.offsets = self.sampler.offsets

    learned_tokens = property(lambda self: sum(part.learned_tokens for part in self.parts))
    total_tokens = property(lambda self: sum(part.total_tokens for part in self.parts))

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][int(index - self.offsets[part])]


def check_same_targets(parts: list[ShardDataset], paths: list[str], fields: tuple[str, ...] = (),
                       key: str = "train_shards") -> None:
    """The directories of ``key`` agree on the manifest ``fields`` (default ``SHARED_TARGET_FIELDS``: the same
    kind of targets for the same vocabulary); different tokenizer files are a warning."""
    fields = fields or SHARED_TARGET_FIELDS
    first = parts[0].manifest
    for part, path in zip(parts[1:], paths[1:]):
        for name in fields:
            if part.manifest[name] != first[name]:
                raise ValueError(f"{key}: {path} has {name} = {part.manifest[name]!r} but {paths[0]} has "
                                 f"{first[name]!r}; the directories must agree on {', '.join(fields)}")
        tokenizers = [(m.get("tokenizer") or {}).get("fingerprint") for m in (first, part.manifest)]
        if None not in tokenizers and tokenizers[0] != tokenizers[1]:
            log.warning("%s: %s and %s were captured with different tokenizer files (same vocabulary size); check "
                        "that they are one tokenizer", key, paths[0], path)


def epoch_quotas(sizes: list[int], weights: list[float]) -> list[int]:
    """Samples of each directory in an epoch of sum(sizes) samples: its weight's share, rounded by largest
    remainder (ties to the earlier directory); without weights, its size."""
    if not weights:
        return list(sizes)
    total = sum(sizes)
    shares = np.asarray(weights, np.float64) / sum(weights) * total
    quotas = np.floor(shares).astype(np.int64)
    quotas[np.argsort(quotas - shares, kind="stable")[: total - int(quotas.sum())]] += 1
    if not quotas.all():
        empty = int(np.argmin(quotas))
        raise ValueError(f"train_weights: weight {weights[empty]} of directory {empty} gives it no sample in an "
                         f"epoch of {total} samples; raise it or leave the directory out")
    return quotas.tolist()


class MixtureSampler(ShardSampler):
    """This rank's ids into a ShardMixture, epoch after epoch (the order is in the module docstring).

    ``quotas[i]`` samples of directory i per epoch; the epoch length is their sum. Cutting, rank
    slicing and resuming from ``consumed`` are ShardSampler's.
    """

    def __init__(self, sizes: list[int], quotas: list[int], *, seed: int, rank: int = 0, world_size: int = 1,
                 consumed: int = 0):
        self.sizes, self.quotas = sizes, quotas
        self.offsets = np.cumsum([0] + sizes[:-1])
        super().__init__(sum(quotas), seed=seed, rank=rank, world_size=world_size, consumed=consumed)

    def order(self, epoch: int) -> np.ndarray:
        """[per_rank] int64: the mixture ids this rank reads in ``epoch``, in order."""
        return self.epoch_ids(epoch)[self.rank:self.per_rank * self.world_size:self.world_size]

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """[E] int64: the mixture ids of the whole epoch (all ranks), before cutting."""
        sources = np.random.default_rng([self.seed, epoch]).permutation(
            np.repeat(np.arange(len(self.sizes)), self.quotas))
        ids = np.empty(len(sources), np.int64)
        for part, quota in enumerate(self.quotas):
            ids[sources == part] = self.offsets[part] + self.stream(part, epoch * quota, quota)
        return ids

    def stream(self, part: int, start: int, count: int) -> np.ndarray:
        """Entries [start, start + count) of directory ``part``'s endless stream of passes."""
        size = self.sizes[part]
        passes = range(start // size, (start + count - 1) // size + 1)
        ids = np.concatenate([np.random.default_rng([self.seed, q, part + 1]).permutation(size) for q in passes])
        begin = start - passes[0] * size
        return ids[begin:begin + count]


def check_teacher_targets(config: TrainConfig, train: ShardDataset | ShardMixture,
                          held_out: ShardDataset | None) -> float:
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
