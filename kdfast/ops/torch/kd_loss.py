"""The ``"torch"`` backend of ``kd_loss``: ``kdfast.reference`` adapted to ``kdfast._contract``.

Math: the reference's, in float32 for fp32/bf16/fp16 logits and float64 for float64 ones; the
gradient comes from autograd. It takes every dtype and device, which is why it is the fallback.

In-place contract. Under ``torch.no_grad`` with ``opts.inplace`` and ``opts.compute_grad`` (how the
fused linear op calls every backend on its chunk buffer) the gradient for grad_output = 1 (per row
for ``reduction="none"``) is computed with autograd on a detached copy and written into ``logits``,
as the cpu and triton kernels write theirs. With grad enabled the loss is an ordinary autograd graph
and ``opts.inplace`` is ignored (the logits are never overwritten).
"""
from __future__ import annotations

import torch

from kdfast import reference
from kdfast._contract import LossOptions

__all__ = ["kd_loss"]


def _loss(
    logits: torch.Tensor,  # [N, V]
    labels: torch.Tensor | None,  # [N] int64
    teacher_logits: torch.Tensor | None,  # [N, V]
    teacher_indices: torch.Tensor | None,  # [N, k]
    teacher_values: torch.Tensor | None,  # [N, k]
    teacher_tail: torch.Tensor | None,  # [N]
    divisor: torch.Tensor | None,  # 0-dim, reduction="mean" only
    opts: LossOptions,
):
    ce, div, _ = reference.kd_loss_rows(
        logits,
        labels,
        teacher_logits=teacher_logits,
        teacher_indices=teacher_indices,
        teacher_values=teacher_values,
        teacher_tail=teacher_tail,
        teacher_kind=opts.teacher_kind,
        tail=opts.tail,
        temperature=opts.temperature,
        divergence=opts.divergence,
        beta=opts.beta,
        alpha=opts.alpha,
        ignore_index=opts.ignore_index,
    )
    rows = opts.hard_weight * ce + opts.soft_scale * div  # [N]
    if opts.reduction == "none":
        loss = rows
    elif opts.reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / divisor.to(rows.dtype)
    return loss, ce.detach(), div.detach()


def kd_loss(
    logits: torch.Tensor,  # [N, V] any floating dtype; receives the gradient in the in-place contract
    labels: torch.Tensor | None,  # [N] int64, or None
    teacher_logits: torch.Tensor | None,  # [N, V], or None
    teacher_indices: torch.Tensor | None,  # [N, k] int32/int64, or None
    teacher_values: torch.Tensor | None,  # [N, k], or None
    teacher_tail: torch.Tensor | None,  # [N], or None
    divisor: torch.Tensor | None,  # 0-dim, reduction="mean" only
    opts: LossOptions,
):
    """The backend entry point of ``_contract.py``: (loss, ce_rows, div_rows)."""
    args = (labels, teacher_logits, teacher_indices, teacher_values, teacher_tail, divisor, opts)
    if torch.is_grad_enabled() or not (opts.inplace and opts.compute_grad):
        return _loss(logits, *args)
    with torch.enable_grad():
        leaf = logits.detach().clone().requires_grad_(True)
        loss, ce_rows, div_rows = _loss(leaf, *args)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    logits.copy_(grad)
    return loss.detach(), ce_rows, div_rows
