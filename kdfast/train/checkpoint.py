"""Checkpoints: model and optimizer through ``torch.distributed.checkpoint`` (DCP), RNG states, atomic
directory publish; and the final student.

A checkpoint is ``run_dir/checkpoints/step_NNNNNNNN/``:

    dcp/                    model and optimizer-state tensors (DCP: one file per rank plus .metadata),
                            keyed by parameter name; sharded under FSDP2, written once under DDP, and
                            loadable on any number of ranks (DCP reshards on load)
    scheduler.pt            the LambdaLR state
    rng_rank<R>.pt          torch / numpy / python (/ CUDA) RNG states of rank R
    trainer_state.json      format, step, epoch, consumed samples, tokens, damaged sequences, config

DCP holds tensors only (it unpickles non-tensor entries on load); everything else is JSON or tensors
loaded with ``weights_only=True``. The optimizer's hyper-parameters come from the config, its
learning rate from the scheduler. Every rank writes into ``.tmp-step_NNNNNNNN``; rank 0 then fsyncs
it and renames it into place, so a checkpoint directory is complete or absent (``list_checkpoints``
lists only directories with their ``trainer_state.json``, written last). An I/O error while saving
(disk full, read-only) raises ``OSError`` naming the path and what to do, after removing the
temporary directory, on every rank (the ranks agree after each phase, so none waits for one that
failed); the checkpoints already published stay valid.

Format 1 (kdfast 0.1: ``model.pt`` / ``optimizer.pt`` full state dicts) still loads.

The final student (``save_student``) is published the same way, with the student directory's
tokenizer beside it when there is one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from kdfast._io import fsync_path
from kdfast.train.student import is_hf_causal_lm

log = logging.getLogger("kdfast.train")

CHECKPOINTS = "checkpoints"
FORMAT = 2
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: dict,
                    keep: int) -> None:
    """Write checkpoint ``path`` atomically (every rank calls this), then keep the newest ``keep``."""
    tmp, rank = path.with_name(f".tmp-{path.name}"), _rank()

    def prepare():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def publish():
        if rank == 0:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"format": FORMAT, **state}, indent=1) + "\n")
            publish_dir(tmp, path)
            for old in list_checkpoints(path.parent.parent)[:-keep]:
                shutil.rmtree(old)

    try:
        _on_every_rank(prepare)
        tensors = {"model": get_model_state_dict(model),
                   "optimizer": get_optimizer_state_dict(model, optimizer)["state"]}
        _on_every_rank(lambda: torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt"))
        with _quiet_single_process():  # DCP gathers every rank's failure into a CheckpointException
            dcp.save(tensors, checkpoint_id=tmp / "dcp", no_dist=not dist.is_initialized())
        _on_every_rank(publish)
    except (OSError, CheckpointException) as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(f"checkpoint {path}", path.parent, e) from e
    log.info("saved checkpoint %s", path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns trainer_state.json."""
    state = json.loads((path / "trainer_state.json").read_text())
    version = state.get("format", 1)
    if version == FORMAT:
        template = get_optimizer_state_dict(model, optimizer)  # creates the state tensors DCP loads into
        tensors = {"model": get_model_state_dict(model), "optimizer": template["state"]}
        with _quiet_single_process():
            dcp.load(tensors, checkpoint_id=path / "dcp", no_dist=not dist.is_initialized())
        set_model_state_dict(model, tensors["model"])
        set_optimizer_state_dict(model, optimizer, {"state": tensors["optimizer"],
                                                    "param_groups": template["param_groups"]})
    elif version == 1 and (path / "model.pt").exists():  # full state dicts, the same on every rank
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, _load(path / "model.pt"), options=options)
        set_optimizer_state_dict(model, optimizer, _load(path / "optimizer.pt"), options=options)
    else:
        raise ValueError(f"checkpoint {path}: format {version!r} is not one this kdfast reads ({FORMAT} or 1); "
                         "resume it with the kdfast that wrote it, or start a new run_dir")
    scheduler.load_state_dict(_load(path / "scheduler.pt"))
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    rng_file = path / f"rng_rank{_rank()}.pt"
    _set_rng_state(_load(rng_file if rng_file.exists() else path / "rng_rank0.pt"))
    return state


def save_student(path: Path, model: nn.Module, student: nn.Module, tokenizer=None) -> Path:
    """The student into ``path`` (every rank calls this): ``save_pretrained`` for Hugging Face models,
    else ``model.pt`` (state dict), plus ``tokenizer.save_pretrained`` when given, plus the trained
    module's other parameters (the hidden-state projections, training only) in
    ``hidden_projections.pt``; written to a temporary directory and renamed, like checkpoints."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tmp = path.with_name(f".tmp-{path.name}")

    def write():
        if _rank() == 0:
            student_state = {k.removeprefix("student."): v for k, v in full.items() if k.startswith("student.")}
            training_only = {k: v for k, v in full.items() if not k.startswith("student.")}
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if training_only:  # the hidden-state loss's projections (kdfast.train.teachers)
                torch.save(training_only, tmp / "hidden_projections.pt")
            if is_hf_causal_lm(student):
                student.save_pretrained(tmp, state_dict=student_state)
            else:
                torch.save(student_state, tmp / "model.pt")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            publish_dir(tmp, path)

    try:
        _on_every_rank(write)
    except OSError as e:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(f"the final model {path}", path.parent, e) from e
    return path


def write_error(what: str, directory: Path, error: BaseException) -> OSError:
    """A clear OSError for a failed write: what, why (errno), and what to do."""
    if isinstance(error, CheckpointException):  # DCP gathers every rank's failure
        error = next((e for e, _ in error.failures.values() if isinstance(e, OSError)), error)
    code = getattr(error, "errno", None)
    reason = os.strerror(code) if code else str(error)
    return OSError(code, f"cannot write {what}: {reason}. Free space on (or make writable) {directory}, then "
                         "run the same command with --resume: it continues from the newest complete checkpoint "
                         "(nothing half-written is taken for one)")


def publish_dir(tmp: Path, final: Path) -> None:
    """fsync every file in ``tmp`` and rename it to ``final`` (replacing an older ``final``)."""
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(tmp)
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    """Every RNG state as tensors and numbers, so that checkpoints load with ``weights_only=True``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": python_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load(path: Path):
    """A checkpoint file: tensors and plain containers only (``weights_only``: never arbitrary pickles)."""
    return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it is "assuming the intent is to save/load in a single process": it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*in a single process")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _on_every_rank(step) -> None:
    """Run ``step`` on this rank, then agree (one collective, also a barrier): if it raised OSError on any
    rank, every rank raises it, so that none waits forever for a rank that gave up."""
    try:
        step()
        error = None
    except OSError as e:
        error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else (error.errno, f"rank {_rank()}: {error}"))
        failed = next((e for e in errors if e is not None), None)
        error = error or (failed and OSError(*failed))
    if error is not None:
        raise error
