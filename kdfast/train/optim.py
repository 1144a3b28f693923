"""The optimizer and its learning-rate schedule: AdamW (no decay on 1-D parameters), warmup + cosine."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from kdfast.train.config import TrainConfig


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak learning rate after ``step`` optimizer steps: linear warmup over ``warmup``
    steps, then cosine decay to ``floor`` at ``total`` (and ``floor`` after it)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, config: TrainConfig) -> tuple[torch.optim.AdamW, LambdaLR]:
    """AdamW over ``module``'s trainable parameters (1-D ones: norm weights, biases, get no weight decay)
    and the warmup-cosine schedule of ``config``."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    schedule = LambdaLR(optimizer, lambda step: warmup_cosine(
        step, warmup=config.warmup_steps, total=config.max_steps, floor=config.min_lr_ratio))
    return optimizer, schedule
