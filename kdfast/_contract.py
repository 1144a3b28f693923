"""What ``kdfast.api`` hands to a backend after validation: flattened tensors plus ``LossOptions``.

Every backend module (``kdfast.ops.cpu.kd_loss``, ``kdfast.ops.triton.kd_loss``) exposes

    kd_loss(logits,           # [N, V] fp32/bf16/fp16, contiguous; overwritten by the gradient if opts.inplace
            labels,           # [N] int64 or None (None: every row active, hard_weight == 0)
            teacher_logits,   # [N, V] contiguous, or None
            teacher_indices,  # [N, k] int32/int64 contiguous, -1 = empty slot, or None
            teacher_values,   # [N, k] contiguous, or None
            divisor,          # 0-dim float32 on the logits' device: the "mean" denominator, or None
            opts: LossOptions,
    ) -> (loss, ce_rows, div_rows)

``loss`` is a 0-dim float32 tensor ("mean", "sum") or [N] float32 ("none") that is differentiable
with respect to ``logits``; ``ce_rows`` and ``div_rows`` are detached [N] float32 per-row CE_r and
unscaled D_r, zero on inactive rows. Exactly one of the dense / sparse teachers is given. Values
of labels and indices are already range-checked.
"""
from __future__ import annotations

from dataclasses import dataclass

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TEACHER_KINDS = ("logits", "logprobs", "probs")
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class LossOptions:
    """Static options of one loss call; hashable so that compiled graphs can key on it."""

    temperature: float = 1.0
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    teacher_kind: str = "logits"
    tail: bool = False
    ignore_index: int = -100
    reduction: str = "mean"
    scale_t2: bool = True
    inplace: bool = False
    compute_grad: bool = True

    @property
    def soft_scale(self) -> float:
        """soft_weight * s, the factor in front of D_r in the row loss."""
        return self.soft_weight * (self.temperature**2 if self.scale_t2 else 1.0)
