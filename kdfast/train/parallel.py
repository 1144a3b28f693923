"""Processes and devices: the torchrun process group, the device of a rank, DDP or FSDP2 wrapping,
gradient synchronisation only on a step's last micro-batch, and the two collectives the trainer uses.

FSDP2 (``fsdp = true``): ``fully_shard`` on each transformer block (the model's ``_no_split_modules``
classes), then on the whole student + loss module; the head is unsharded by the root's forward, so the
fused loss sees the full weight. DDP and FSDP average gradients over ranks.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn


def init_distributed(device: str) -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, else gloo); True if this
    call created it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def wrap(module: nn.Module, device: torch.device, fsdp: bool) -> nn.Module:
    """``module`` as is on one process, else under FSDP2 (``fsdp``) or DDP."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(module.student, "_no_split_modules", None) or ())
        for sub in module.student.modules():
            if type(sub).__name__ in blocks:
                fully_shard(sub)
        return fully_shard(module)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Reduce gradients across ranks only when ``enabled`` (the last micro-batch of a step)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor
