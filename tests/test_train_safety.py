"""kdfast.train when things go wrong or precision matters: the exact tail of the labelled positions
reaches the loss (with one hidden row per label), the LM head runs in the autocast dtype, a
non-finite loss stops the run before the step, damaged shard data stops the run or is skipped and
counted, a full disk while saving is a clear error that leaves no half-written checkpoint (on every
rank when one rank fails), and checkpoints of the previous format still resume exactly."""
from __future__ import annotations

import errno
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem

import kdfast.train.student as student_module
from kdfast.shards import IGNORE_INDEX, ShardDataset, ShardError, open_shards
from kdfast.train import DistillationModule, Trainer, build_student, collate, list_checkpoints
from kdfast.train.checkpoint import checkpoint_path
from tests.train_support import (K, REPO, SEQ, VOCAB, free_port, make_config, shards, subprocess_env,  # noqa: F401
                                 train_losses, write_toml)


def record_loss_calls(monkeypatch) -> list[dict]:
    """Every fused_linear_kd_loss call of the trainer: the keyword arguments, the labels, the operands'
    dtypes and the number of hidden rows."""
    calls, real = [], student_module.fused_linear_kd_loss

    def recording(hidden, weight, labels, **kwargs):
        calls.append({"hidden": hidden.dtype, "weight": weight.dtype, "rows": hidden.shape[0], "labels": labels,
                      **kwargs})
        return real(hidden, weight, labels, **kwargs)

    monkeypatch.setattr(student_module, "fused_linear_kd_loss", recording)
    return calls


# --- the exact tail and the head's precision --------------------------------------------------------


def test_the_shards_exact_tail_reaches_the_loss(shards, tmp_path, monkeypatch):
    """The loss gets one hidden row per labelled position, those positions' labels and the stored tail
    of exactly those positions, in row-major order of the micro-batch."""
    config = make_config(shards, tmp_path / "run", eval_shards="", tail=True, micro_batch_size=2)
    with Trainer(config) as trainer:
        ids = trainer.train_data.sampler.order(0)[:2].tolist()  # the first micro-batch
        calls = record_loss_calls(monkeypatch)
        trainer.train_step()
    full = ShardDataset(shards["train"])
    samples = [full[i] for i in ids]  # one teacher row per position
    labelled = [s["labels"] != IGNORE_INDEX for s in samples]
    stored = torch.cat([s["teacher_tail"][m] for s, m in zip(samples, labelled)])  # exact log-mass outside the slots
    assert len(calls) == 1 and calls[0]["tail"] and calls[0]["allow_tail_temperature"]
    assert calls[0]["rows"] == len(stored) == sum(int(m.sum()) for m in labelled) > 0
    torch.testing.assert_close(calls[0]["teacher_tail"], stored, rtol=0, atol=0)
    torch.testing.assert_close(calls[0]["labels"], torch.cat([s["labels"][m] for s, m in zip(samples, labelled)]),
                               rtol=0, atol=0)
    assert bool((stored < 0).all())

    ragged = collate([{**samples[0]}, {name: t[:5] for name, t in samples[1].items()}])  # full-length samples
    assert ragged["teacher_tail"].shape == (2, samples[0]["teacher_tail"].shape[0])
    assert bool((ragged["teacher_tail"][1, 5:] == -math.inf).all())


def test_the_tail_at_a_capture_temperature_other_than_one(shards, tmp_path, monkeypatch):
    """Shards captured at T = 2, trained at T = 2 with the tail: the trainer opts in to the tail at
    T != 1 (allow_tail_temperature; the bucket is exact because T equals the capture temperature)."""
    from kdfast.capture import capture

    torch.manual_seed(0)
    logits = torch.randn(VOCAB) * 3  # a fixed teacher: one distribution at every position
    capture(lambda ids: logits.expand(*ids.shape, VOCAB), np.random.default_rng(0).integers(0, VOCAB, (8, SEQ)),
            tmp_path / "t2", k=K, temperature=2.0, progress=False, teacher_name="fixed")
    config = make_config(shards, tmp_path / "run", train_shards=str(tmp_path / "t2"), eval_shards="", tail=True,
                         temperature=2.0)
    with Trainer(config) as trainer:
        calls = record_loss_calls(monkeypatch)
        assert np.isfinite(trainer.train_step()["loss"])
    assert calls[0]["temperature"] == 2.0 and calls[0]["allow_tail_temperature"] and "teacher_tail" in calls[0]


def test_without_the_tail_no_tail_is_passed(shards, tmp_path, monkeypatch):
    with Trainer(make_config(shards, tmp_path / "run", eval_shards="")) as trainer:
        calls = record_loss_calls(monkeypatch)
        trainer.train_step()
    assert "teacher_tail" not in calls[0] and not calls[0]["tail"]


def test_the_head_runs_in_the_autocast_dtype(shards, tmp_path, monkeypatch):
    """bf16 autocast: a Hugging Face model's final norm returns float32, yet the head GEMMs must run
    in bf16 (CPU autocast here; the trainer enables it on CUDA)."""
    student = build_student(make_config(shards, tmp_path / "run"))
    options = dict(teacher_kind="logprobs", tail=False, temperature=1.0, chunk_size=None, backend=None)
    module = DistillationModule(student, options, autocast_dtype=torch.bfloat16)
    dataset = ShardDataset(shards["train"], compact=True)
    batch = collate([dataset[0], dataset[1]])
    calls = record_loss_calls(monkeypatch)
    loss, *_ = module(batch)
    loss.backward()
    assert (calls[0]["hidden"], calls[0]["weight"]) == (torch.bfloat16, torch.bfloat16)
    head = student.get_output_embeddings().weight
    assert head.dtype == torch.float32 and head.grad is not None and bool(head.grad.abs().sum() > 0)
    hidden, weight, _ = module.loss_inputs(batch["input_ids"])
    assert (hidden.dtype, weight.dtype) == (torch.bfloat16, torch.bfloat16)


# --- non-finite values -----------------------------------------------------------------------------


def test_a_non_finite_loss_stops_before_the_optimizer_step(shards, tmp_path):
    with Trainer(make_config(shards, tmp_path / "run", eval_shards="")) as trainer:
        batch = collate([trainer.train_data[i] for i in range(4)])
        batch["teacher_values"][3, 0] = math.nan  # a damaged teacher value (every compact row has a label)
        trainer._batches = iter([batch])
        before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        with pytest.raises(FloatingPointError, match="step 1: the loss is nan.*not taken"):
            trainer.train_step()
        assert trainer.step == 0
        for name, p in trainer.model.named_parameters():
            torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, msg=name)


# --- damaged shard data ----------------------------------------------------------------------------


@pytest.fixture
def flipped_byte(shards, tmp_path) -> tuple[Path, int]:
    """A copy of the training shards with one byte flipped in the middle of the values section; returns
    the directory and the one sequence whose verified read now raises ShardError."""
    copy = tmp_path / "damaged"
    shutil.copytree(shards["train"], copy)
    shard = open_shards(copy).shards[0]
    offset, length, _ = shard.header.sections["values"]
    with open(shard.path, "r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)[0]
        f.seek(offset + length // 2)
        f.write(bytes([byte ^ 0x10]))
    dataset = ShardDataset(copy)
    damaged = []
    for i in range(len(dataset)):
        try:
            dataset[i]
        except ShardError as e:
            damaged.append(e.sequence)
    assert len(damaged) == 1, damaged
    return copy, damaged[0]


def test_damaged_data_stops_the_run_by_default(shards, tmp_path, flipped_byte):
    copy, sequence = flipped_byte
    config = make_config(shards, tmp_path / "run", train_shards=str(copy), eval_shards="", micro_batch_size=8,
                         num_workers=1)  # the error crosses from the DataLoader worker as itself
    with Trainer(config) as trainer:
        with pytest.raises(ShardError, match=f"shard-00000.kds: sequence {sequence} ") as raised:
            trainer.train()
    assert raised.value.sequence == sequence and raised.value.path == str(copy / "shard-00000.kds")


def test_skip_damaged_skips_counts_and_reports(shards, tmp_path, flipped_byte):
    """One epoch (64 sequences: 8 steps of 8) reads the damaged sequence once."""
    copy, _ = flipped_byte
    run = tmp_path / "run"
    config = make_config(shards, run, train_shards=str(copy), eval_shards="", micro_batch_size=8, skip_damaged=True)
    with Trainer(config) as trainer:
        summary = trainer.train()
    assert summary["status"] == "completed" and summary["damaged_sequences"] == 1
    assert json.loads((run / "summary.json").read_text())["damaged_sequences"] == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["damaged_sequences"] == 1 and records[0]["damaged_sequences"] in (0, 1)
    assert summary["tokens"] == (64 - 1) * (SEQ - 1)  # every sequence but the damaged one
    assert all(np.isfinite(list(train_losses(run).values())))


# --- writing checkpoints ---------------------------------------------------------------------------


def test_a_full_disk_while_saving_is_a_clear_error(shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with Trainer(make_config(shards, run, eval_shards="")) as trainer:
        trainer.train_step()
        trainer.save_checkpoint()
        trainer.train_step()

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(dcp_filesystem, "_write_item", disk_full)
        with pytest.raises(OSError, match="cannot write checkpoint .*step_00000002: No space left on device. "
                                          "Free space on") as raised:
            trainer.save_checkpoint()
        assert raised.value.errno == errno.ENOSPC and str(run / "checkpoints") in str(raised.value)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]  # no temporary left


FAIL_ON_RANK_1 = """
import errno, sys
import kdfast.train.checkpoint as checkpoint
from kdfast.train import Trainer, load_config

def disk_full():
    raise OSError(errno.ENOSPC, "No space left on device")

code = 0
with Trainer(load_config(sys.argv[1])) as trainer:
    trainer.train_step()
    if trainer.rank == 1:
        checkpoint._rng_state = disk_full  # only rank 1's own file fails
    try:
        trainer.save_checkpoint()
    except OSError as e:
        print(f"rank {trainer.rank} raised: {e}", flush=True)
        code = 3
sys.exit(code)
"""


@pytest.mark.slow
def test_a_write_error_on_one_rank_is_raised_on_every_rank(shards, tmp_path):
    """No rank waits forever for one that failed, and no checkpoint is published."""
    run = tmp_path / "run"
    config = make_config(shards, run, eval_shards="", micro_batch_size=2)
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script), str(write_toml(tmp_path / "run.toml", config))]
    result = subprocess.run(command, check=False, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} raised: [Errno 28] cannot write checkpoint {run / 'checkpoints' / 'step_00000001'}" \
               f": No space left on device" in output, output[-3000:]
    assert list_checkpoints(run) == [] and not list((run / "checkpoints").iterdir())


def test_a_checkpoint_of_the_previous_format_resumes_exactly(shards, tmp_path):
    """Format 1 (kdfast 0.1): full model / optimizer state dicts in model.pt / optimizer.pt."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    config = make_config(shards, tmp_path / "run", eval_shards="")
    with Trainer(config) as trainer:
        trainer.train_step()
        trainer.train_step()
        path = trainer.save_checkpoint()
        expected = [trainer.train_step()["loss"] for _ in range(2)]
        old = checkpoint_path(tmp_path / "old", 2)
        old.mkdir(parents=True)
        for name in ("scheduler.pt", "rng_rank0.pt"):
            (old / name).write_bytes((path / name).read_bytes())
        state = json.loads((path / "trainer_state.json").read_text())
        (old / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "format"}))
    with Trainer(replace(config, run_dir=str(tmp_path / "fresh"))) as reference:
        reference.train_step()
        reference.train_step()
        options = StateDictOptions(full_state_dict=True)
        torch.save(get_model_state_dict(reference.model, options=options), old / "model.pt")
        optimizer_state = get_optimizer_state_dict(reference.model, reference.optimizer, options=options)
        torch.save(optimizer_state, old / "optimizer.pt")
    with Trainer(replace(config, run_dir=str(tmp_path / "old"), resume=True)) as resumed:
        assert resumed.step == 2
        assert [resumed.train_step()["loss"] for _ in range(2)] == expected

    state["format"] = 99
    (old / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="format 99 is not one this kdfast reads"):
        Trainer(replace(config, run_dir=str(tmp_path / "old"), resume=True))
