"""Chunked fused linear + distillation loss: ``kd_loss(hidden @ weight.T + bias)`` without [N, V] logits.

Math. Rows r = 1..N, logits ``z_r = W h_r + b`` (W [V, H], b [V]), loss ``L = reduce_r l_r(z_r)``
exactly as in docs/loss.md. With ``G = dL/dz`` [N, V] (row r: ``g_r * dl_r/dz_r``, divided by the "mean"
divisor; ``g`` is grad_output):

    dL/dh_r = G_r W              rows of G @ W
    dL/dW   = sum_r G_r^T h_r    G^T @ hidden
    dL/db   = sum_r G_r

Every term is linear in G and row r of G depends only on row r, so rows can be processed in chunks
[s, e): ``z = h W^T + b`` into one reused [chunk, V] buffer, the backend's fused loss overwrites the
buffer with ``G`` in the same pass that computes the loss (``opts.inplace``), then ``G @ W`` goes to
grad_hidden[s:e], ``G^T h`` and ``sum_r G_r`` are accumulated into grad_weight and grad_bias. At most
one chunk of student logits (plus one chunk of teacher logits for an online teacher, or the copies of
several teachers below) is ever alive. "mean" divides by one divisor computed once over all N rows
(n_active, or num_items) and given to every chunk, so chunk losses and gradients add up to the
unchunked ones.

Several teachers. ``l_r = hard_weight CE_r + soft_weight s sum_j w_j D_j,r`` is a sum of per-teacher
shares ``l_r^(j)`` (the first one carrying the CE, share j built by ``kdfast.api`` with
``soft_weight * w_j``), so ``G = sum_j G^(j)``: each chunk's logits are computed once (one ``h W^T``),
the backend runs once per teacher, and the gradients are added before the two gradient GEMMs. The
backends overwrite their logits with the gradient, so a pristine copy of the chunk logits is kept for
the teachers after the first; with three or more teachers each one but the last works on a scratch
copy of it (``logits_buffers``: 1, 2 or 3 [chunk, V] buffers). Losses and div_rows (already weighted by
``w_j``) add up across the teachers; ce_rows come from the first. With a 16-bit head and 16-bit logits
(CPU) each teacher's gradient is rounded to 16 bits by the backend and their sum once more; with
float32 logits the sum is float32 and rounded once.

Backward. For "mean" and "sum", grad_output is a scalar: the gradients were computed in the forward
pass for grad_output = 1 (as Liger's fused linear cross-entropy does) and backward only scales them.
For "none", grad_output ``g`` is per row: dL/dh would still scale row by row, but
``dL/dW = sum_r g_r G_r^T h_r`` cannot be recovered from the unscaled ``sum_r G_r^T h_r``. So with
"none" the forward pass computes the losses only, and backward recomputes each chunk (one more
``h W^T`` matmul per chunk) and scales the rows of G by ``g_r`` before the two gradient matmuls.

Precision. With float32 heads everything is float32. With bf16/fp16 heads, where the device has
float32-output GEMMs for 16-bit operands (``fp32_gemm``: ``mm``/``addmm`` with ``out_dtype``, CUDA;
``kdfast.api`` decides it once per device) the chunk logits are written in float32, so the loss never
sees logits rounded to 16 bits; the chunk gradient is then rounded once to the head's dtype for the
two gradient GEMMs (which accumulate in fp32). Measured for JSD (beta 0.5, N=128, H=64, V=4000, bf16,
the float32 GEMM emulated on CPU): relative L1 error of d/hidden 1.0% with bf16 logits, 0.2% with
float32 logits, which is the rounding of d/hidden itself to bf16.
Without such GEMMs (CPU in torch 2.13) the logits are in the head's dtype, as ``F.linear`` gives them.
Under ``torch.autocast`` the student and teacher heads' operands are first cast to the autocast dtype,
as ``F.linear`` would be, and autocast is off inside the chunk loop; the backend computes the loss from
fp32 copies. grad_weight and grad_bias are accumulated across chunks in fp32 when the weight is
bf16/fp16 and cast once at the end: adding per-chunk partials in bf16 would round once per chunk. With
``fp32_gemm`` the fp32 accumulation happens inside the GEMM; otherwise the chunk's operands are upcast.

Chunk size. ``chunk_size=None`` picks the fewest chunks whose logits buffers stay within
``CHUNK_BYTES`` together (256 MiB: 523 rows at V=128256 in fp32, 1046 in bf16; half that with two
teachers, a third with more), then balances the rows across them (float32 logits of a 16-bit head add
a half-size 16-bit copy of the chunk gradient). The backend adds little to that: the C++ and Triton
kernels work in place, while the "torch" backend, which computes the chunk gradient with autograd,
holds a few fp32 chunk-sized temporaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch.autograd.function import once_differentiable

CHUNK_BYTES = 256 * 2**20
_LOW_PRECISION = (torch.bfloat16, torch.float16)

# One teacher's share of one chunk's loss:
# (logits [c, V], labels [c] | None, teacher_logits [c, V] | None, teacher_indices [c, k] | None,
#  teacher_values [c, k] | None, teacher_tail [c] | None, compute_grad)
#  -> (loss, ce_rows [c], div_rows [c] (weighted by the teacher's weight), grad [c, V] | None);
# the gradient is for grad_output = 1 (per row for "none") and may be the logits buffer itself.
ChunkLoss = Callable[..., tuple]


@dataclass(frozen=True)
class ChunkTeacher:
    """The teacher in one of its three forms, flattened to rows; ``rows`` yields one chunk of it."""

    logits: torch.Tensor | None = None  # [N, V] dense teacher logits
    indices: torch.Tensor | None = None  # [N, k] sparse teacher
    values: torch.Tensor | None = None  # [N, k]
    tail: torch.Tensor | None = None  # [N] log of the teacher's mass outside the slots
    hidden: torch.Tensor | None = None  # [N, Ht] online teacher: logits = hidden @ weight.T + bias
    weight: torch.Tensor | None = None  # [V, Ht]
    bias: torch.Tensor | None = None  # [V]

    def rows(self, start: int, end: int, buffer: torch.Tensor | None):
        """(teacher_logits, teacher_indices, teacher_values, teacher_tail) of rows [start, end)."""
        if self.hidden is not None:
            return _linear_into(buffer[: end - start], self.hidden[start:end], self.weight, self.bias), None, None, None
        if self.logits is not None:
            return self.logits[start:end], None, None, None
        tail = None if self.tail is None else self.tail[start:end]
        return None, self.indices[start:end], self.values[start:end], tail

    def tensors(self) -> tuple:
        """Every field, in order (None included): what backward must find unmodified."""
        return tuple(getattr(self, field.name) for field in fields(self))


def autocast_operands(device_type: str, *tensors):
    """The LM heads' operands as ``F.linear`` sees them under ``torch.autocast``: floating tensors
    other than float64 in the autocast dtype (the casts are differentiable); unchanged otherwise."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def logits_dtype(dtype: torch.dtype, fp32_gemm: bool) -> torch.dtype:
    """dtype of the chunk logits of a head in ``dtype``: float32 for 16-bit heads when ``fp32_gemm``."""
    return torch.float32 if fp32_gemm and dtype in _LOW_PRECISION else dtype


def logits_buffers(teachers: int) -> int:
    """[chunk, V] logits buffers of a pass: the chunk's logits (turned into the summed gradient), with
    two or more teachers a pristine copy of them, with three or more a scratch copy per teacher."""
    return min(teachers, 3)


def default_chunk_rows(rows: int, vocab: int, dtype: torch.dtype, teachers: int = 1) -> int:
    """Rows per chunk for ``chunk_size=None``: the fewest chunks whose logits buffers (``logits_buffers``)
    fit in CHUNK_BYTES together, rows balanced."""
    row_bytes = logits_buffers(teachers) * vocab * torch.empty((), dtype=dtype).element_size()
    max_rows = max(1, CHUNK_BYTES // row_bytes)
    chunks = max(1, -(-rows // max_rows))
    return max(1, -(-rows // chunks))


def _linear_into(
    out: torch.Tensor,  # [c, V] the operands' dtype, or float32 (fp32_gemm)
    hidden: torch.Tensor,  # [c, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
) -> torch.Tensor:
    if out.dtype != hidden.dtype:  # float32 logits from 16-bit operands
        torch.mm(hidden, weight.T, out_dtype=out.dtype, out=out)
        return out if bias is None else out.add_(bias)
    if bias is None:
        return torch.mm(hidden, weight.T, out=out)
    return torch.addmm(bias, hidden, weight.T, out=out)


def _accumulate_weight_grad(
    acc: torch.Tensor,  # [V, H], weight dtype or fp32
    grad: torch.Tensor,  # [c, V] weight dtype
    hidden: torch.Tensor,  # [c, H]
    first: bool,
    fp32_gemm: bool,
) -> None:
    """acc += grad.T @ hidden; the first chunk overwrites (beta=0), so acc needs no zero-filling pass."""
    beta = 0 if first else 1
    if acc.dtype == grad.dtype:
        acc.addmm_(grad.T, hidden, beta=beta)
    elif fp32_gemm:
        torch.addmm(acc, grad.T, hidden, out_dtype=torch.float32, beta=beta, out=acc)
    else:
        acc.addmm_(grad.T.float(), hidden.float(), beta=beta)


@dataclass
class _Grads:
    hidden: torch.Tensor | None  # [N, H]
    weight: torch.Tensor | None  # [V, H], fp32 while accumulating a 16-bit weight
    bias: torch.Tensor | None  # [V] fp32 (fp64 for a float64 head)

    def finish(self, weight: torch.Tensor, bias: torch.Tensor | None) -> _Grads:
        """Casts the accumulators back to the parameters' dtypes."""
        grad_weight = None if self.weight is None else self.weight.to(weight.dtype)
        grad_bias = None if self.bias is None else self.bias.to(bias.dtype)
        return _Grads(self.hidden, grad_weight, grad_bias)


def _chunked_pass(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    labels: torch.Tensor | None,  # [N]
    teachers: tuple[ChunkTeacher, ...],  # one per plan.chunk_losses
    plan: _Plan,
    needs: tuple[bool, bool, bool],
    row_scale: torch.Tensor | None = None,  # [N] per-row grad_output of reduction="none"
):
    """One sweep over the row chunks: (chunk losses, ce_rows [N], div_rows [N], _Grads)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk_rows = plan.chunk_rows
    need_hidden, need_weight, need_bias = needs
    compute_grad = any(needs)
    logits_buffer, spare_buffers, teacher_buffer = _chunk_buffers(hidden, vocab, teachers, plan)
    accumulate_fp32 = weight.dtype in _LOW_PRECISION and n > chunk_rows
    weight_grad_dtype = torch.float32 if accumulate_fp32 else weight.dtype
    grads = _Grads(
        hidden=torch.empty_like(hidden) if need_hidden else None,
        weight=(torch.empty if n else torch.zeros)(weight.shape, dtype=weight_grad_dtype, device=weight.device)
        if need_weight
        else None,
        bias=torch.zeros(vocab, dtype=_loss_dtype(hidden), device=weight.device) if need_bias else None,  # fp32/fp64
    )
    losses, ce_rows, div_rows = [], [], []
    for start in range(0, n, chunk_rows):
        end = min(n, start + chunk_rows)
        h = hidden[start:end]
        logits = _linear_into(logits_buffer[: end - start], h, weight, bias)
        chunk_labels = None if labels is None else labels[start:end]
        loss, ce, div, grad = _teachers_chunk_loss(
            logits, spare_buffers, teacher_buffer, chunk_labels, teachers, plan.chunk_losses, start, compute_grad
        )
        losses.append(loss)
        ce_rows.append(ce)
        div_rows.append(div)
        if grad is None:
            continue
        if row_scale is not None:
            grad.mul_(row_scale[start:end, None])
        if need_bias:
            grads.bias.add_(grad.sum(0, dtype=grads.bias.dtype))
        grad = grad.to(weight.dtype)  # float32 logits of a 16-bit head: one rounding for the GEMMs
        if need_hidden:
            torch.mm(grad, weight, out=grads.hidden[start:end])
        if need_weight:
            _accumulate_weight_grad(grads.weight, grad, h, start == 0, plan.fp32_gemm)
    return losses, _cat_rows(ce_rows, hidden), _cat_rows(div_rows, hidden), grads.finish(weight, bias)


def _chunk_buffers(
    hidden: torch.Tensor,  # [N, H]
    vocab: int,
    teachers: tuple[ChunkTeacher, ...],
    plan: _Plan,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """[chunk, V] buffers of one pass: the student logits, the spare copies several teachers need
    (``logits_buffers``), and an online teacher's logits (else None)."""
    size = min(plan.chunk_rows, hidden.shape[0])
    dtype = logits_dtype(hidden.dtype, plan.fp32_gemm)
    logits_buffer, *spare_buffers = (
        hidden.new_empty(size, vocab, dtype=dtype) for _ in range(logits_buffers(len(teachers)))
    )
    online = teachers[0].hidden
    teacher_buffer = None
    if online is not None:
        teacher_buffer = online.new_empty(size, vocab, dtype=logits_dtype(online.dtype, plan.fp32_gemm))
    return logits_buffer, spare_buffers, teacher_buffer


def _teachers_chunk_loss(
    logits: torch.Tensor,  # [c, V] the chunk's logits; overwritten with the summed gradient
    spare_buffers: list[torch.Tensor],  # [chunk_rows, V] each: none for one teacher, 1 for two, 2 for more
    teacher_buffer: torch.Tensor | None,  # [chunk_rows, V] an online teacher's logits
    labels: torch.Tensor | None,  # [c]
    teachers: tuple[ChunkTeacher, ...],
    chunk_losses: tuple[ChunkLoss, ...],  # one per teacher; only the first adds the hard CE
    start: int,
    compute_grad: bool,
):
    """Every teacher's share of one chunk, added: (loss, ce_rows [c], div_rows [c], grad [c, V] | None).

    The backends overwrite the logits they get with the gradient, so every teacher after the first
    works on a copy of the pristine logits (the last one on the pristine copy itself), and its gradient
    is added into ``logits``. ce_rows are the first teacher's (the CE does not depend on the teacher).
    """
    end = start + logits.shape[0]
    first_rows = teachers[0].rows(start, end, teacher_buffer)
    if len(teachers) == 1:
        return chunk_losses[0](logits, labels, *first_rows, compute_grad)
    pristine = spare_buffers[0][: end - start].copy_(logits)
    loss, ce, div, grad = chunk_losses[0](logits, labels, *first_rows, compute_grad)
    last = len(teachers) - 1
    for j in range(1, len(teachers)):
        work = pristine if j == last else spare_buffers[1][: end - start].copy_(pristine)
        loss_j, _, div_j, grad_j = chunk_losses[j](work, labels, *teachers[j].rows(start, end, None), compute_grad)
        loss, div = loss + loss_j, div + div_j
        if grad is not None:
            grad.add_(grad_j)
    return loss, ce, div, grad


def _cat_rows(rows: list[torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:  # [N]
    if rows:
        return torch.cat(rows)
    return torch.zeros(0, dtype=_loss_dtype(hidden), device=hidden.device)


def _loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _total(losses: list[torch.Tensor], reduction: str, hidden: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return _cat_rows(losses, hidden)
    if not losses:
        return torch.zeros((), dtype=_loss_dtype(hidden), device=hidden.device)
    return torch.stack(losses).sum()


def _no_autocast(hidden: torch.Tensor):
    """The chunk matmuls write into buffers of the inputs' dtype: autocast must not recast them."""
    return torch.autocast(hidden.device.type, enabled=False)


@dataclass(frozen=True)
class _Plan:
    chunk_rows: int
    chunk_losses: tuple[ChunkLoss, ...]  # one per teacher
    reduction: str
    fp32_gemm: bool  # the device has float32-output GEMMs for 16-bit operands


class FusedLinearKDFunction(torch.autograd.Function):
    """(hidden, weight, bias) -> (loss, ce_rows, div_rows); gradients as in the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teachers: tuple[ChunkTeacher, ...], plan: _Plan):
        needs = tuple(ctx.needs_input_grad[:3])
        recompute = plan.reduction == "none"
        with _no_autocast(hidden):
            losses, ce_rows, div_rows, grads = _chunked_pass(
                hidden, weight, bias, labels, teachers, plan, (False,) * 3 if recompute else needs
            )
        ctx.mark_non_differentiable(ce_rows, div_rows)
        ctx.plan, ctx.needs = plan, needs
        if recompute:
            # Saved (not held by reference): a teacher modified in place before backward raises, as
            # autograd does for any saved tensor, instead of giving a silently different gradient.
            teacher_tensors = (tensor for teacher in teachers for tensor in teacher.tensors())
            ctx.save_for_backward(hidden, weight, bias, labels, *teacher_tensors)
        else:
            ctx.grads = grads
        return _total(losses, plan.reduction, hidden), ce_rows, div_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_div):
        if ctx.plan.reduction == "none":
            grads = _recompute_grads(ctx, grad_loss)
        else:
            grads = _scale_stored_grads(ctx, grad_loss)
        return grads.hidden, grads.weight, grads.bias, None, None, None


def _scale_stored_grads(ctx, grad_loss: torch.Tensor) -> _Grads:
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(
            "fused_linear_kd_loss: backward ran twice through the same loss; its gradients are computed in the "
            "forward pass and released after the first backward (call the loss again instead of retain_graph=True)"
        )
    ctx.grads = None
    for grad in (grads.hidden, grads.weight, grads.bias):
        if grad is not None:
            grad.mul_(grad_loss)
    return grads


def _recompute_grads(ctx, grad_loss: torch.Tensor) -> _Grads:
    hidden, weight, bias, labels, *teacher_tensors = ctx.saved_tensors
    teachers = _saved_teachers(teacher_tensors)
    with _no_autocast(hidden):
        *_, grads = _chunked_pass(hidden, weight, bias, labels, teachers, ctx.plan, ctx.needs, row_scale=grad_loss)
    return grads


def _saved_teachers(tensors: list) -> tuple[ChunkTeacher, ...]:
    """The teachers back from their saved ``ChunkTeacher.tensors()``, concatenated in order."""
    width = len(fields(ChunkTeacher))
    return tuple(ChunkTeacher(*tensors[start : start + width]) for start in range(0, len(tensors), width))


def fused_linear_kd(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    labels: torch.Tensor | None,  # [N] int64
    teachers: tuple[ChunkTeacher, ...],  # one online teacher, or one or more stored ones
    chunk_size: int | None,
    reduction: str,
    chunk_losses: tuple[ChunkLoss, ...],  # one per teacher: that teacher's share of the loss
    fp32_gemm: bool,
):
    """(loss, ce_rows [N], div_rows [N]) on validated, flattened inputs; called by ``kdfast.api`` only.

    The loss and div_rows are the sums of the teachers' shares; ce_rows are the first teacher's.
    ``fp32_gemm``: the device's GEMMs can write float32 from 16-bit operands (``kdfast.api`` probes it).
    """
    dtype = logits_dtype(hidden.dtype, fp32_gemm)
    chunk_rows = chunk_size or default_chunk_rows(hidden.shape[0], weight.shape[0], dtype, len(teachers))
    plan = _Plan(chunk_rows=chunk_rows, chunk_losses=chunk_losses, reduction=reduction, fp32_gemm=fp32_gemm)
    return FusedLinearKDFunction.apply(hidden, weight, bias, labels, teachers, plan)
