"""Compact teacher rows end to end: ``ShardDataset(compact=True)`` samples equal the full-length samples
at the labelled positions (masked version-2 chat shards, version-1 fixtures, a learned last position),
reads stay verified, ``collate`` / ``pack`` line the concatenated rows up with ``labels[labels != -100]``,
and the trainer's first-step loss, every gradient element and the held-out metrics equal those of the
fused loss over every row of full-length batches."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfast import fused_linear_kd_loss, kd_loss
from kdfast.shards import IGNORE_INDEX, ShardDataset, ShardError, ShardWriter, open_shards
from kdfast.train import Trainer, collate
from kdfast.train.data import CatchDamaged, pack
from tests.chat_support import chat_config, chat_shards  # noqa: F401

DATA = Path(__file__).parent / "data"
TEACHER = ("teacher_indices", "teacher_values", "teacher_tail")


def assert_compact_equals_full(directory: Path) -> int:
    """Every sequence: compact and full-length samples agree per element; returns the labelled rows seen."""
    full, compact = ShardDataset(directory, shuffle=False), ShardDataset(directory, shuffle=False, compact=True)
    rows = 0
    for i in range(len(full)):
        a, b = full[i], compact[i]
        labelled = a["labels"] != IGNORE_INDEX
        for name in ("input_ids", "labels"):
            assert torch.equal(b[name], a[name]), (i, name)
        for name in TEACHER:
            assert b[name].dtype == a[name].dtype and b[name].is_contiguous(), (i, name)
            torch.testing.assert_close(b[name], a[name][labelled], rtol=0, atol=0, msg=f"sequence {i} {name}")
        rows += int(labelled.sum())
    return rows


def test_compact_samples_equal_full_ones_on_masked_chat_shards(chat_shards):
    rows = assert_compact_equals_full(chat_shards["train"])
    dataset = ShardDataset(chat_shards["train"])
    assert 0 < rows < 0.6 * dataset.total_tokens  # the prompts are not learned


@pytest.mark.parametrize("name", ["uint8-packed", "float16-int32-probs"])
def test_compact_samples_equal_full_ones_on_version_1_shards(name):
    directory = DATA / f"shards-v1-{name}"
    dataset = ShardDataset(directory)
    assert open_shards(directory).format_version == 1
    assert assert_compact_equals_full(directory) == dataset.total_tokens - len(dataset)  # all but each last row


def learned_last_positions(directory: Path) -> Path:
    """Version-2 shards whose sequences learn their last position (whose target has no label); the
    second learns nothing else, so its compact sample has no teacher row."""
    rng = np.random.default_rng(3)
    masks = [np.array([0, 1, 1, 0, 1], bool), np.array([0, 0, 0, 1], bool), np.array([1, 0, 1, 1, 0, 1], bool)]
    with ShardWriter(directory, vocab_size=50, k=3, shard_tokens=8) as writer:
        for mask in masks:
            learned = int(mask.sum())
            indices = np.stack([rng.choice(50, 3, replace=False) for _ in range(learned)]).astype(np.int32)
            values = np.sort(np.log(rng.dirichlet(np.ones(4), learned)[:, :3]), axis=1)[:, ::-1]
            tail = np.log1p(-np.exp(values).sum(1))
            writer.add(rng.integers(0, 50, len(mask)), indices, values.astype(np.float32), tail.astype(np.float32),
                       mask=mask)
    return directory


def test_a_learned_last_position_has_no_compact_row(tmp_path):
    directory = learned_last_positions(tmp_path / "shards")
    assert assert_compact_equals_full(directory) == 2 + 0 + 3
    compact = ShardDataset(directory, shuffle=False, compact=True)
    assert [len(compact[i]["teacher_tail"]) for i in range(3)] == [2, 0, 3]
    batch = collate([compact[i] for i in range(3)])
    assert batch["teacher_indices"].shape == (5, 3) and batch["labels"].shape == (3, 6)


def test_compact_reads_are_verified(chat_shards, tmp_path):
    """One flipped bit in a stored teacher value fails the compact read of exactly its sequence."""
    copy = tmp_path / "damaged"
    shutil.copytree(chat_shards["train"], copy)
    shard = open_shards(copy).shards[0]
    offset, length, _ = shard.header.sections["values"]
    with open(shard.path, "r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)[0]
        f.seek(offset + length // 2)
        f.write(bytes([byte ^ 0x10]))
    compact = ShardDataset(copy, shuffle=False, compact=True)
    failed = []
    for i in range(shard.header.num_sequences):
        try:
            compact[i]
        except ShardError as e:
            failed.append((i, e.sequence, e.section))
    assert len(failed) == 1 and failed[0][1] == failed[0][0] and failed[0][2] == "values", failed
    with pytest.raises(ShardError, match="values section checksum mismatch"):
        ShardDataset(copy, shuffle=False)[failed[0][0]]  # the full-length read fails the same way


# --- batches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [collate, pack])
def test_batched_compact_rows_line_up_with_the_labels(chat_shards, layout):
    """Compact batch rows = the full-length batch's teacher rows at ``labels != -100``, in row-major order."""
    full, compact = (ShardDataset(chat_shards["train"], shuffle=False, compact=c) for c in (False, True))
    samples = [compact[i] for i in range(8)]
    expected = layout([full[i] for i in range(8)])
    batch = layout(samples)
    assert batch.keys() == expected.keys()
    for name in ("input_ids", "labels") + (("position_ids",) if layout is pack else ()):
        assert torch.equal(batch[name], expected[name]), name
    labelled = expected["labels"] != IGNORE_INDEX
    assert batch["teacher_indices"].shape == (int(labelled.sum()), full.k)
    for name in TEACHER:
        torch.testing.assert_close(batch[name], expected[name][labelled], rtol=0, atol=0, msg=name)


def test_a_damaged_sample_adds_a_position_and_no_teacher_row(chat_shards):
    dataset = ShardDataset(chat_shards["train"], shuffle=False, compact=True)
    empty = {**CatchDamaged(dataset).empty_sample(), "damaged": ShardError("x", "damaged")}
    batch = collate([dataset[0], empty, dataset[1]])
    assert batch["labels"].shape[0] == 3 and (batch["labels"][1] == IGNORE_INDEX).all()
    assert len(batch["teacher_tail"]) == len(dataset[0]["teacher_tail"]) + len(dataset[1]["teacher_tail"])
    assert batch["num_tokens"] == len(dataset[0]["input_ids"]) + len(dataset[1]["input_ids"])
    assert len(batch["damaged"]) == 1


def test_batches_refuse_rows_that_do_not_match_the_labels(chat_shards):
    full, compact = (ShardDataset(chat_shards["train"], shuffle=False, compact=c) for c in (False, True))
    with pytest.raises(ValueError, match="sample 1 of the batch has .* rows of .* compact samples only"):
        collate([compact[0], full[1]])
    short = {**compact[2], "teacher_values": compact[2]["teacher_values"][1:]}
    n = int((short["labels"] != IGNORE_INDEX).sum())
    with pytest.raises(ValueError, match=rf"sample 0 of the batch has \({n}, {n - 1}, {n}\) rows of "
                                         rf"\(teacher_indices, teacher_values, teacher_tail\) for {n} labelled"):
        pack([short, compact[3]])


# --- the trainer -----------------------------------------------------------------------------------


def full_row_step(trainer: Trainer, directory: Path, layout) -> tuple[float, dict[str, torch.Tensor]]:
    """The first step's loss and gradients the way the fused loss ran before compact rows: over every
    row of full-length batches (teacher rows at every position, empty where nothing is learned)."""
    size, accumulation = trainer.config.micro_batch_size, trainer.config.grad_accum_steps
    order = trainer.train_data.sampler.order(0)[:size * accumulation].tolist()
    full = ShardDataset(directory)
    batches = [layout([full[i] for i in order[m * size:(m + 1) * size]]) for m in range(accumulation)]
    num_items = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches).double()
    module, options = trainer.model, trainer.model.loss_options
    module.train()
    total = 0.0
    for batch in batches:
        hidden, weight, bias = module.loss_inputs(batch["input_ids"], batch.get("position_ids"))
        teacher = {name: batch[name] for name in TEACHER if name != "teacher_tail" or options["tail"]}
        loss = fused_linear_kd_loss(hidden, weight, batch["labels"], bias=bias, num_items=num_items, **teacher,
                                    **options)
        loss.backward()
        total += float(loss.detach())
    gradients = {name: p.grad.clone() for name, p in trainer.student.named_parameters()}
    trainer.optimizer.zero_grad(set_to_none=True)
    return total, gradients


@pytest.mark.parametrize("packing,tail", [(False, False), (True, True)])
def test_compact_rows_give_the_full_row_loss_and_gradients(chat_shards, tmp_path, packing, tail):
    config = chat_config(chat_shards, tmp_path / "run", packing=packing, tail=tail, grad_accum_steps=2,
                         hard_weight=0.3)
    with Trainer(config) as trainer:
        expected_loss, expected = full_row_step(trainer, chat_shards["train"], pack if packing else collate)
        num_items, sums = trainer.accumulate_gradients()
        compact = {name: p.grad.clone() for name, p in trainer.student.named_parameters()}
    assert num_items > 100 and sums[6] > 2 * num_items  # most positions carry no label
    assert float(sums[0]) == pytest.approx(expected_loss, rel=1e-5)
    assert compact.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(compact[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_held_out_metrics_equal_the_full_row_ones(chat_shards, tmp_path):
    config = chat_config(chat_shards, tmp_path / "run", eval_shards=str(chat_shards["eval"]), eval_sequences=0,
                         eval_batch_size=8)
    with Trainer(config) as trainer:
        metrics = trainer.evaluate()
        full = ShardDataset(chat_shards["eval"], shuffle=False)
        batch = collate([full[i] for i in range(len(full))])
        with torch.no_grad():
            hidden, weight, bias = trainer.model.loss_inputs(batch["input_ids"])
            logits = hidden @ weight.T  # [B, L, V]: every row, learned or not
    assert bias is None
    labels, indices, values = batch["labels"], batch["teacher_indices"], batch["teacher_values"]
    _, parts = kd_loss(logits, labels, teacher_indices=indices, teacher_values=values, teacher_kind="logprobs",
                       return_components=True)
    active = labels != IGNORE_INDEX
    best = indices.gather(-1, values.masked_fill(indices < 0, -math.inf).argmax(-1, keepdim=True)).squeeze(-1)
    scored = active & (indices >= 0).any(-1)
    assert metrics["eval_tokens"] == int(active.sum()) > 0
    assert metrics["eval_ce"] == pytest.approx(float(parts.ce), rel=1e-5)
    assert metrics["eval_kd"] == pytest.approx(float(parts.kd), rel=1e-5)
    matches = ((logits.argmax(-1) == best) & scored).sum()
    assert metrics["eval_top1"] == pytest.approx(float(matches / scored.sum()), rel=1e-6)
