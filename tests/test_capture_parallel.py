"""Parallel capture (torchrun / RANK + WORLD_SIZE): the merged dataset equals a single-process capture."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kdfast
from kdfast.capture import capture
from kdfast.shards import ShardDataset, load_manifest

REPO = Path(kdfast.__file__).resolve().parent.parent
TEACHER = """import torch
TABLE = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 3


def teacher(input_ids):  # [B, L] -> [B, L, 64]
    return TABLE[input_ids]
"""
TABLE = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 3


def table_teacher(input_ids):  # [B, L] -> [B, L, 64], the same table as TEACHER's
    return TABLE[input_ids]


def capture_args(mode: str, k: int = 8) -> list[str]:
    return ["capture", "--teacher", "toy_teacher:teacher", "--tokens", "tokens.npy", "--out", "out", "--k", str(k),
            "--mode", mode, "--shard-tokens", "20", "--batch-size", "2", "--seed", "3", "--no-progress"]


def environment(tmp_path: Path) -> dict:
    (tmp_path / "toy_teacher.py").write_text(TEACHER)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]), "OMP_NUM_THREADS": "1"}


def read_all(directory: Path) -> list[dict]:
    return list(ShardDataset(directory, shuffle=False))


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_torchrun_capture_with_two_processes_equals_one_process(tmp_path, mode):
    tokens = np.random.default_rng(0).integers(0, 64, (23, 6))  # 23 sequences, 4 per shard: 6 shards, last short
    np.save(tmp_path / "tokens.npy", tokens)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdfast",
               *capture_args(mode)]
    done = subprocess.run(command, cwd=tmp_path, env=environment(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard-{i:05d}.kds" for i in range(6)]

    single = tmp_path / "single"
    capture(table_teacher, tokens, single, k=8, mode=mode, shard_tokens=20, batch_size=2, seed=3,
            teacher_name="toy_teacher:teacher", progress=False)
    merged, reference = read_all(out), read_all(single)
    assert len(merged) == len(reference) == 23
    for got, expected in zip(merged, reference):
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    assert load_manifest(out) == load_manifest(single)  # every field, shard entries and checksums included
    assert json.loads((out / "manifest.json").read_text()) == json.loads((single / "manifest.json").read_text())


def test_more_processes_than_shards(tmp_path):
    """3 ranks, 2 shards: rank 2 has nothing to capture and must neither fail nor write a directory."""
    tokens = np.random.default_rng(2).integers(0, 64, (5, 6))  # 30 tokens, 20 per shard: 2 shards
    np.save(tmp_path / "tokens.npy", tokens)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m", "kdfast",
               *capture_args("topk")]
    done = subprocess.run(command, cwd=tmp_path, env=environment(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    capture(table_teacher, tokens, tmp_path / "single", k=8, shard_tokens=20, batch_size=2, seed=3,
            teacher_name="toy_teacher:teacher", progress=False)
    assert load_manifest(tmp_path / "out") == load_manifest(tmp_path / "single")
    assert not list((tmp_path / "out").glob(".rank-*"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_started_with_different_arguments_are_refused(tmp_path):
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 64, (8, 6)))
    env = {**environment(tmp_path), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    processes = [subprocess.Popen([sys.executable, "-m", "kdfast", *capture_args("topk", k=8 + rank)], cwd=tmp_path,
                                  env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for rank in range(2)]
    results = [process.communicate(timeout=120) for process in processes]
    for process, (_, err) in zip(processes, results):
        assert process.returncode != 0
        assert "rank 1 was started with different arguments than rank 0" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()


FLAKY_TEACHER = TEACHER + """

import os
calls = 0


def flaky(input_ids):  # rank 1 dies at its third batch (call 1 probes the vocabulary) while ./fail exists
    global calls
    calls += 1
    if os.path.exists("fail") and os.environ["RANK"] == "1" and calls > 3:
        raise RuntimeError("teacher died")
    return TABLE[input_ids]
"""


def test_a_failed_rank_resumes_from_its_own_shards(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 64, (23, 6))
    np.save(tmp_path / "tokens.npy", tokens)
    env = environment(tmp_path)
    (tmp_path / "toy_teacher.py").write_text(FLAKY_TEACHER)
    (tmp_path / "fail").touch()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdfast",
               *capture_args("topk"), "--teacher", "toy_teacher:flaky"]
    failed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "teacher died" in failed.stderr
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()
    assert [p.name for p in (out / ".rank-1").glob("*.kds")] == ["shard-00000.kds"]  # its first shard (4 sequences)
    (tmp_path / "fail").unlink()
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after 4 sequences" in resumed.stderr
    assert not list(out.glob(".rank-*"))
    capture(table_teacher, tokens, tmp_path / "single", k=8, shard_tokens=20, batch_size=2, seed=3,
            teacher_name="toy_teacher:flaky", progress=False)
    for got, expected in zip(read_all(out), read_all(tmp_path / "single"), strict=True):
        assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert load_manifest(out) == load_manifest(tmp_path / "single")
