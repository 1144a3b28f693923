"""kdfast.train on CPU: a tiny Llama student distilled from shards of a tiny Llama teacher.

Covers: held-out divergence falls; outputs (metrics, summary, plot, from_pretrained-loadable student);
exact resume; torchrun (gloo) with DDP and with FSDP2 gives the single-process losses for the same
global batch, and its sharded checkpoint loads in one process; SIGTERM saves a checkpoint that resumes
exactly; checks against the shard manifest; the nn.Module protocol. The configuration is in
test_train_config.py, failures (non-finite values, damaged data, full disks, old checkpoints) in
test_train_safety.py.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdfast.shards import ShardError
from kdfast.train import Trainer, list_checkpoints
from tests.train_support import (REPO, SEQ, STUDENT, VOCAB, eval_records, free_port, make_config, shards,  # noqa: F401
                                 subprocess_env, train_losses, transformers, write_toml)


# --- learning and outputs --------------------------------------------------------------------------


def test_distillation_lowers_held_out_divergence(shards, tmp_path):
    run = tmp_path / "run"
    with Trainer(make_config(shards, run, max_steps=30, eval_every=15)) as trainer:
        summary = trainer.train()

    evals = eval_records(run)
    assert sorted(evals) == [0, 15, 30]
    assert evals[30]["eval_kd"] < 0.9 * evals[0]["eval_kd"], evals
    assert evals[30]["eval_top1"] > evals[0]["eval_top1"], evals
    assert sorted(train_losses(run)) == list(range(1, 31))
    assert summary["status"] == "completed" and summary["step"] == 30 and summary["tokens"] == 30 * 4 * (SEQ - 1)
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(run / "final")
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trainer.student(ids).logits)


# --- exact resume ----------------------------------------------------------------------------------


def test_resume_reproduces_an_uninterrupted_run(shards, tmp_path):
    n = 4
    config = make_config(shards, tmp_path / "full", eval_shards="", max_steps=2 * n, micro_batch_size=2,
                         grad_accum_steps=2, save_every=2, keep_checkpoints=2)
    with Trainer(config) as trainer:
        trainer.train()
    expected = train_losses(tmp_path / "full")
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["step_00000006", "step_00000008"]
    assert not [p for p in (tmp_path / "full" / "checkpoints").iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="--resume"):
        Trainer(config)

    cut = replace(config, run_dir=str(tmp_path / "cut"))
    with Trainer(cut) as trainer:
        first_half = [trainer.train_step()["loss"] for _ in range(n)]
        trainer.save_checkpoint()
    with Trainer(replace(cut, resume=True)) as trainer:
        assert trainer.step == n
        trainer.train()
    second_half = train_losses(tmp_path / "cut")
    assert sorted(second_half) == list(range(n + 1, 2 * n + 1))
    resumed = first_half + [second_half[s] for s in range(n + 1, 2 * n + 1)]
    np.testing.assert_allclose(resumed, [expected[s] for s in range(1, 2 * n + 1)], rtol=0, atol=1e-6)


# --- torchrun --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_process_run(shards, tmp_path_factory) -> Path:
    """10 steps (one epoch boundary at step 8) of global batch 8 in one process: micro-batch 4 x 2."""
    run = tmp_path_factory.mktemp("single") / "run"
    with Trainer(make_config(shards, run, max_steps=10, micro_batch_size=4, grad_accum_steps=2, eval_every=5)) as t:
        t.train()
    return run


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_matches_single_process(shards, single_process_run, tmp_path, fsdp):
    run = tmp_path / "run"
    config = make_config(shards, run, max_steps=10, micro_batch_size=2, grad_accum_steps=2, eval_every=5, fsdp=fsdp)
    toml = write_toml(tmp_path / "run.toml", config)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "kdfast", "train", "--config", str(toml)]
    result = subprocess.run(command, check=False, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8 and summary["status"] == "completed"
    single, multi = train_losses(single_process_run), train_losses(run)
    assert sorted(multi) == sorted(single) == list(range(1, 11))
    np.testing.assert_allclose([multi[s] for s in range(1, 11)], [single[s] for s in range(1, 11)], rtol=0, atol=1e-4)
    single_eval, multi_eval = eval_records(single_process_run), eval_records(run)
    assert sorted(multi_eval) == [0, 5, 10]
    for step in (0, 5, 10):
        for key in ("eval_ce", "eval_kd", "eval_top1"):
            assert multi_eval[step][key] == pytest.approx(single_eval[step][key], abs=1e-4), (step, key)
        assert multi_eval[step]["eval_tokens"] == single_eval[step]["eval_tokens"]
    assert (run / "final" / "model.safetensors").exists()

    # the checkpoint (sharded under FSDP2) loads in one process: the weights of the final model
    with Trainer(replace(config, resume=True)) as trainer:
        assert trainer.step == 10 and trainer.consumed == 80
        final = transformers.AutoModelForCausalLM.from_pretrained(run / "final")
        for name, tensor in final.state_dict().items():
            torch.testing.assert_close(trainer.student.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


# --- signals ---------------------------------------------------------------------------------------


def wait_for_steps(process: subprocess.Popen, run: Path, steps: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"training exited early:\n{process.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, "training made no progress"
        try:
            if len(train_losses(run)) >= steps:
                return
        except ValueError:  # a line being written
            pass
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_continues_exactly(shards, tmp_path):
    run = tmp_path / "run"
    config = make_config(shards, run, eval_shards="", max_steps=500)
    command = [sys.executable, "-m", "kdfast", "train", "--config", str(write_toml(tmp_path / "run.toml", config))]
    process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_steps(process, run, 2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]

    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["step"]
    assert summary["status"] == "interrupted" and 2 <= stopped < 500, summary
    assert [p.name for p in list_checkpoints(run)] == [f"step_{stopped:08d}"]
    assert not (run / "final").exists()
    before = train_losses(run)
    assert sorted(before) == list(range(1, stopped + 1))

    with Trainer(replace(config, resume=True)) as trainer:
        assert trainer.step == stopped
        after = [trainer.train_step()["loss"] for _ in range(2)]
    with Trainer(replace(config, run_dir=str(tmp_path / "reference"))) as trainer:
        reference = [trainer.train_step()["loss"] for _ in range(stopped + 2)]
    np.testing.assert_allclose([before[s] for s in range(1, stopped + 1)] + after, reference, rtol=0, atol=1e-6)


# --- configuration and checks ----------------------------------------------------------------------


def test_tail_requires_the_capture_temperature(shards, tmp_path):
    with pytest.raises(ValueError, match="capture temperature"):
        Trainer(make_config(shards, tmp_path / "a", tail=True, temperature=2.0))
    with Trainer(make_config(shards, tmp_path / "b", tail=True, temperature=1.0, eval_shards="")) as trainer:
        assert np.isfinite(trainer.train_step()["loss"])


def test_student_vocabulary_must_match_the_shards(shards, tmp_path):
    with pytest.raises(ShardError, match="vocabulary"):
        Trainer(make_config(shards, tmp_path / "run", student_config={**STUDENT, "vocab_size": VOCAB + 1}))
    with pytest.raises(ValueError, match="exactly one of student"):
        Trainer(make_config(shards, tmp_path / "run", student_config=""))


class PrefixMeanStudent(nn.Module):
    """The nn.Module protocol: causal ``module(input_ids) -> hidden`` (a projection of the mean embedding of
    the prefix) plus ``output_weight`` / ``output_bias``."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.output_weight = nn.Parameter(torch.randn(VOCAB, hidden) * 0.1)
        self.output_bias = nn.Parameter(torch.zeros(VOCAB))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, H]
        counts = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)[:, None]  # [L, 1]
        return torch.tanh(self.proj(self.embed(input_ids).cumsum(1) / counts))


def test_protocol_module_student(shards, tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(0)
    student = PrefixMeanStudent()
    config = make_config(shards, run, student_config="", max_steps=6, hard_weight=0.5, eval_every=3)
    with Trainer(config, model=student) as trainer:
        summary = trainer.train()
    assert summary["status"] == "completed" and np.isfinite(summary["train_loss"])
    evals = eval_records(run)
    assert evals[6]["eval_kd"] < evals[0]["eval_kd"]
    saved = torch.load(run / "final" / "model.pt", weights_only=True)
    torch.testing.assert_close(saved["output_weight"], student.output_weight.detach())
