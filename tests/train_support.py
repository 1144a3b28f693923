"""Shared by the tests/test_train_*.py files: tiny Llama teacher shards, configs, metrics readers.

Import the fixtures into a test module (``from tests.train_support import shards``) to use them.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfast.report import read_metrics
from kdfast.train import TrainConfig

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
VOCAB, SEQ, K = 256, 32, 16
STUDENT = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """Top-k shards (64 training, 16 held-out sequences) of a tiny random Llama with a peaked head."""
    from kdfast.capture import capture

    root = tmp_path_factory.mktemp("shards")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    teacher = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        teacher.lm_head.weight.normal_(0, 0.3)  # logits of std ~2: targets with structure to learn
    rng = np.random.default_rng(0)
    paths = {}
    for name, count in (("train", 64), ("eval", 16)):
        paths[name] = root / name
        capture(lambda ids: teacher(ids).logits, rng.integers(0, VOCAB, (count, SEQ)), paths[name], k=K,
                progress=False, teacher_name="tiny-llama")
    return paths


def make_config(shards, run_dir, **overrides) -> TrainConfig:
    values = dict(train_shards=str(shards["train"]), eval_shards=str(shards["eval"]), run_dir=str(run_dir),
                  student_config=dict(STUDENT), max_steps=8, micro_batch_size=4, lr=1e-2, warmup_steps=2,
                  log_every=1, eval_every=0, eval_sequences=16, save_every=0, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def train_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def eval_records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "eval_kd" in r}


def write_toml(path: Path, config: TrainConfig) -> Path:
    """The config as flat TOML (student_config as an inline table)."""
    def value(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)  # strings, numbers and booleans are spelled the same in TOML

    path.write_text("".join(f"{k} = {value(v)}\n" for k, v in config.to_dict().items()))
    return path


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
