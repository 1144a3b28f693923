"""Distill a student from teacher shards: ``TrainConfig``, ``Trainer`` and ``kdfast train``.

    kdfast train --config run.toml [--key value ...]                       # one process
    torchrun --nproc_per_node=8 -m kdfast train --config run.toml          # DDP (or FSDP2: --fsdp true)
    Trainer(TrainConfig(train_shards=..., student=...)).train()            # the same in Python

One file per job, read in this order:

    config.py      TrainConfig: every key, TOML + command line (imports no torch)
    data.py        shard datasets against the loss options, mixtures, several teachers' shard sets,
                   damaged sequences, padded or packed batches, micro-batches
    student.py     the student (Hugging Face or the nn.Module protocol) + the fused loss: DistillationModule
    teachers.py    a live teacher beside the student, the hidden-state loss, on-policy micro-batches
    optim.py       AdamW and the warmup-cosine schedule
    parallel.py    torchrun process group, device, DDP / FSDP2, gradient sync
    checkpoint.py  torch.distributed.checkpoint save / load, RNG states, atomic publish, the final model
    loop.py        Trainer: the step, logging, evaluation, signals, the summary

docs/train.md lists every key and output. Importing this package imports no torch: the names that
need it load on first use.
"""
from __future__ import annotations

import argparse
import importlib

from kdfast.report import read_metrics
from kdfast.train.config import TrainConfig, add_train_arguments, config_from_args, load_config

__all__ = ["TrainConfig", "load_config", "add_train_arguments", "config_from_args", "run_train", "Trainer",
           "StopRequest", "DistillationModule", "build_student", "collate", "MicroBatchSampler", "CatchDamaged",
           "list_checkpoints", "read_metrics", "warmup_cosine", "build_optimizer"]

# name -> module that defines it, imported on first access (they import torch)
_LAZY = {"Trainer": "loop", "StopRequest": "loop", "DistillationModule": "student", "build_student": "student",
         "collate": "data", "MicroBatchSampler": "data", "CatchDamaged": "data", "list_checkpoints": "checkpoint",
         "warmup_cosine": "optim", "build_optimizer": "optim"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"kdfast.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kdfast.train' has no attribute {name!r}")


def run_train(args: argparse.Namespace) -> int:
    """The ``kdfast train`` command (``add_train_arguments`` built its options): train; exit code 0."""
    from kdfast.train.loop import run

    return run(config_from_args(args))
