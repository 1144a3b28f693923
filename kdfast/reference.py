"""Plain-PyTorch reference of every kdfast op: the contract of docs/loss.md, written for clarity.

It runs in any floating dtype. Low-precision inputs are upcast to float32 (float64 stays float64),
so the reference is both the ``"torch"`` backend (``kdfast/ops/torch/kd_loss.py`` adapts it to the
backend contract) and, run in float64, the oracle of every test and benchmark. Gradients come from
autograd: nothing here is hand-derived, which is the point.

Notation (per row r, vocabulary V, temperature T):
    q = softmax(z / T)                       student, full vocabulary
    p                                        teacher target (dense, or sparse over slots I)
    CE_r = logsumexp(z) - z_y                untempered hard loss
    D_r  = divergence(p, q)                  forward_kl | reverse_kl | jsd(beta) | skew_kl(alpha)
                                             | skew_reverse_kl(alpha)
    l_r  = hard_weight * CE_r + soft_weight * s * D_r,   s = T**2 if scale_t2 else 1
Rows whose label is ``ignore_index`` contribute nothing. Tail bucket (sparse "logprobs", tail=True):
the teacher's mass outside the slots, ``exp(teacher_tail)`` or ``1 - sum_I p``, is matched against the
student's, ``q_rest = sum over the non-slot entries of q`` (summed directly, floored at FLT_MIN). Bad
rows (``bad_rows``: non-finite teacher values, duplicate indices) get NaN CE and D and a zero gradient.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kdfast._contract import SKEW_ALPHA_DEFAULT, effective_divergence

__all__ = ["kd_loss", "kd_loss_rows", "fused_linear_kd_loss", "LossComponents"]


class LossComponents(NamedTuple):
    """Detached means over the active rows, for logging: hard CE and the unscaled divergence D."""

    ce: torch.Tensor
    kd: torch.Tensor


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _xlogy_diff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise p * (log p - log q) with the convention 0 * log 0 = 0 (also where log_p = -inf)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def _log_mixture(
    log_p: torch.Tensor,  # [N, V]
    log_q: torch.Tensor,  # [N, V]
    weight_p: float,  # in (0, 1)
) -> torch.Tensor:  # [N, V]
    """log M with M = weight_p p + (1 - weight_p) q, in log space (exact where p or q underflows)."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def _dense_divergence(
    log_q: torch.Tensor,  # [N, V]
    log_p: torch.Tensor,  # [N, V]
    divergence: str,
    beta: float,
    alpha: float,
) -> torch.Tensor:  # [N]
    p, q = log_p.exp(), log_q.exp()
    divergence = effective_divergence(divergence, beta, alpha)
    if divergence == "forward_kl":
        return _xlogy_diff(p, log_p, log_q).sum(-1)
    if divergence == "reverse_kl":
        return _xlogy_diff(q, log_q, log_p).sum(-1)
    if divergence == "skew_kl":  # DistiLLM: KL(p || alpha p + (1 - alpha) q)
        return _xlogy_diff(p, log_p, _log_mixture(log_p, log_q, alpha)).sum(-1)
    if divergence == "skew_reverse_kl":  # DistiLLM: KL(q || alpha q + (1 - alpha) p)
        return _xlogy_diff(q, log_q, _log_mixture(log_p, log_q, 1.0 - alpha)).sum(-1)
    # TRL's generalized_jsd_loss: M = beta p + (1 - beta) q, beta KL(p||M) + (1 - beta) KL(q||M).
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _xlogy_diff(p, log_p, log_m).sum(-1) + (1 - beta) * _xlogy_diff(q, log_q, log_m).sum(-1)


# Floor of the student's mass outside the slots, as in the kernels: float32's smallest normal.
FLT_MIN = torch.finfo(torch.float32).tiny


def _log_rest(
    log_q: torch.Tensor,  # [N, V]
    indices: torch.Tensor,  # [N, k], -1 = empty slot
) -> torch.Tensor:  # [N]
    """log of the student's mass outside the valid slots, summed directly (no 1 - sum cancellation),
    floored at log(FLT_MIN) (a row whose slots cover the whole vocabulary gets the floor)."""
    n, vocab = log_q.shape
    columns = torch.where(indices >= 0, indices, vocab).long()  # empty slots go to a spare column
    in_slots = torch.zeros(n, vocab + 1, dtype=torch.bool, device=log_q.device).scatter_(1, columns, True)[:, :vocab]
    covered = in_slots.all(-1, keepdim=True)  # [N, 1]
    # Rows with nothing outside the slots sum zeros instead of -inf: logsumexp's gradient stays finite.
    rest = torch.where(covered, torch.zeros_like(log_q), log_q.masked_fill(in_slots, -math.inf))
    log_rest = torch.logsumexp(rest, dim=-1).clamp(min=math.log(FLT_MIN))
    return torch.where(covered.squeeze(1), torch.full_like(log_rest, math.log(FLT_MIN)), log_rest)


def _sparse_divergence(
    log_q: torch.Tensor,  # [N, V]
    indices: torch.Tensor,  # [N, k], -1 = empty slot
    values: torch.Tensor,  # [N, k]
    tail_log_mass: torch.Tensor | None,  # [N] log of the teacher's mass outside the slots, or None
    teacher_kind: str,
    tail: bool,
    temperature: float,
) -> torch.Tensor:  # [N]
    valid = indices >= 0
    log_q_slots = log_q.gather(1, indices.clamp(min=0).long())
    values = values.to(log_q.dtype)
    if teacher_kind == "probs":
        p = torch.where(valid, values, torch.zeros_like(values))
        return _xlogy_diff(p, p.log(), log_q_slots).sum(-1)
    if teacher_kind == "logprobs" and tail:
        log_p = torch.where(valid, values, torch.full_like(values, -math.inf))
        slot_div = _xlogy_diff(log_p.exp(), log_p, log_q_slots).sum(-1)
        if tail_log_mass is None:
            tail_log_mass = (1 - log_p.exp().sum(-1)).clamp(min=0).log()
        tail_log_mass = tail_log_mass.to(log_q.dtype)
        return slot_div + _xlogy_diff(tail_log_mass.exp(), tail_log_mass, _log_rest(log_q, indices))
    # "logits", and "logprobs" without the tail bucket: renormalized softmax over the valid slots.
    scaled = torch.where(valid, values / temperature, torch.full_like(values, -math.inf))
    any_valid = valid.any(-1, keepdim=True)
    log_p = torch.log_softmax(torch.where(any_valid, scaled, torch.zeros_like(scaled)), dim=-1)
    p = torch.where(valid, log_p.exp(), torch.zeros_like(values))
    return _xlogy_diff(p, log_p, log_q_slots).sum(-1)


def bad_rows(
    teacher_logits: torch.Tensor | None,  # [N, V]
    teacher_indices: torch.Tensor | None,  # [N, k]
    teacher_values: torch.Tensor | None,  # [N, k]
    teacher_tail: torch.Tensor | None,  # [N]
    teacher_kind: str,
) -> torch.Tensor:  # [N] bool
    """Rows the contract makes NaN: a NaN or +inf teacher value (-inf too for "probs"; -inf means zero
    mass elsewhere), a NaN or +inf teacher_tail, or a valid index twice in one row."""
    if teacher_logits is not None:
        return (torch.isnan(teacher_logits) | (teacher_logits == math.inf)).any(-1)
    valid = teacher_indices >= 0
    finite_enough = torch.isfinite(teacher_values) if teacher_kind == "probs" else ~(
        torch.isnan(teacher_values) | (teacher_values == math.inf)
    )
    bad = (valid & ~finite_enough).any(-1)
    if teacher_indices.shape[-1] > 1:
        ordered = teacher_indices.sort(dim=-1).values
        bad |= ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(-1)
    if teacher_tail is not None:
        bad |= torch.isnan(teacher_tail) | (teacher_tail == math.inf)
    return bad


def kd_loss_rows(
    student_logits: torch.Tensor,  # [N, V]
    labels: torch.Tensor | None = None,  # [N]
    *,
    teacher_logits: torch.Tensor | None = None,  # [N, V]
    teacher_indices: torch.Tensor | None = None,  # [N, k]
    teacher_values: torch.Tensor | None = None,  # [N, k]
    teacher_tail: torch.Tensor | None = None,  # [N]
    teacher_kind: str = "logits",
    tail: bool = False,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = SKEW_ALPHA_DEFAULT,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (CE_r, D_r, active_r) on 2-D inputs; inactive rows hold 0 in CE and D, bad rows
    (``bad_rows``) NaN in both, with a zero gradient."""
    bad = bad_rows(teacher_logits, teacher_indices, teacher_values, teacher_tail, teacher_kind)
    # Bad rows are computed on a harmless teacher (no slots, zero logits) so that no NaN reaches the gradient.
    if teacher_logits is not None:
        teacher_logits = teacher_logits.masked_fill(bad[:, None], 0.0)
    else:
        teacher_indices = teacher_indices.masked_fill(bad[:, None], -1)
        teacher_values = teacher_values.masked_fill(bad[:, None], 0.0)
        if teacher_tail is not None:
            teacher_tail = teacher_tail.masked_fill(bad, -math.inf)
    dtype = _compute_dtype(student_logits)
    z = student_logits.to(dtype)
    n = z.shape[0]
    if labels is None:
        active = torch.ones(n, dtype=torch.bool, device=z.device)
        ce = torch.zeros(n, dtype=dtype, device=z.device)
    else:
        active = labels != ignore_index
        safe_labels = torch.where(active, labels, torch.zeros_like(labels)).long()
        ce = torch.logsumexp(z, dim=-1) - z.gather(1, safe_labels[:, None]).squeeze(1)
    log_q = torch.log_softmax(z / temperature, dim=-1)
    if teacher_logits is not None:
        log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
        div = _dense_divergence(log_q, log_p, divergence, beta, alpha)
    else:
        div = _sparse_divergence(log_q, teacher_indices, teacher_values, teacher_tail, teacher_kind, tail, temperature)
    zero = torch.zeros((), dtype=dtype, device=z.device)
    nan = torch.full((), math.nan, dtype=dtype, device=z.device)
    mark = lambda x: torch.where(active, torch.where(bad, nan, x), zero)  # noqa: E731
    return mark(ce), mark(div), active


def kd_loss(
    student_logits: torch.Tensor,  # [..., V]
    labels: torch.Tensor | None = None,  # [...]
    *,
    teacher_logits: torch.Tensor | None = None,  # [..., V]
    teacher_indices: torch.Tensor | None = None,  # [..., k]
    teacher_values: torch.Tensor | None = None,  # [..., k]
    teacher_tail: torch.Tensor | None = None,  # [...]
    teacher_kind: str = "logits",
    tail: bool = False,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = SKEW_ALPHA_DEFAULT,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    scale_t2: bool = True,
    return_components: bool = False,
):
    """The loss contract of docs/loss.md in plain PyTorch; see ``kdfast.kd_loss`` for the arguments.

    No input validation happens here (``kdfast.kd_loss`` does it); leading dimensions are flattened.
    """
    lead_shape = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    flat = lambda t, last: None if t is None else t.reshape(-1, last)  # noqa: E731
    ce, div, active = kd_loss_rows(
        student_logits.reshape(-1, vocab),
        None if labels is None else labels.reshape(-1),
        teacher_logits=flat(teacher_logits, vocab),
        teacher_indices=None if teacher_indices is None else teacher_indices.reshape(-1, teacher_indices.shape[-1]),
        teacher_values=None if teacher_values is None else teacher_values.reshape(-1, teacher_values.shape[-1]),
        teacher_tail=None if teacher_tail is None else teacher_tail.reshape(-1),
        teacher_kind=teacher_kind,
        tail=tail,
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        alpha=alpha,
        ignore_index=ignore_index,
    )
    s = temperature**2 if scale_t2 else 1.0
    rows = hard_weight * ce + (soft_weight * s) * div
    loss = reduce_rows(rows, active, reduction, num_items)
    if reduction == "none":
        loss = loss.reshape(lead_shape)
    if not return_components:
        return loss
    return loss, components(ce, div, active)


def reduce_rows(
    rows: torch.Tensor,  # [N]
    active: torch.Tensor,  # [N] bool
    reduction: str,
    num_items: int | torch.Tensor | None,
) -> torch.Tensor:
    """Reduction of the contract: mean over active rows (or over ``num_items``), sum, or per row."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / mean_divisor(active, num_items, rows.dtype)


def mean_divisor(
    active: torch.Tensor,  # [N] bool
    num_items: int | torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:  # 0-dim
    """Denominator of ``reduction="mean"``; at least 1 so that an all-ignored batch gives 0, not NaN."""
    if num_items is None:
        return active.sum().to(dtype).clamp(min=1)
    return torch.as_tensor(num_items, dtype=dtype, device=active.device)


def components(
    ce: torch.Tensor,  # [N]
    div: torch.Tensor,  # [N]
    active: torch.Tensor,  # [N] bool
) -> LossComponents:
    n = active.sum().clamp(min=1).to(torch.float32)
    return LossComponents(ce=(ce.detach().float().sum() / n), kd=(div.detach().float().sum() / n))


def fused_linear_kd_loss(
    hidden: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor | None = None,  # [...]
    *,
    bias: torch.Tensor | None = None,  # [V]
    teacher_hidden: torch.Tensor | None = None,  # [..., Ht]
    teacher_weight: torch.Tensor | None = None,  # [V, Ht]
    teacher_bias: torch.Tensor | None = None,  # [V]
    **loss_options,
):
    """Unfused reference of ``kdfast.fused_linear_kd_loss``: materialize the logits, then ``kd_loss``."""
    dtype = _compute_dtype(hidden)
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if teacher_hidden is not None:
        with torch.no_grad():
            loss_options["teacher_logits"] = F.linear(
                teacher_hidden.to(dtype),
                teacher_weight.to(dtype),
                None if teacher_bias is None else teacher_bias.to(dtype),
            )
    return kd_loss(logits, labels, **loss_options)
