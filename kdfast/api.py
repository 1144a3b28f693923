"""Public loss functions and modules: the single point where kdfast validates input and picks a backend.

``kd_loss`` and ``fused_linear_kd_loss`` validate through ``kdfast._checks`` (which builds the one
``LossOptions``), flatten, choose a backend and call its ``kd_loss`` as ``kdfast._contract`` defines
it; the fused op gives ``kdfast.fused_linear`` chunk-loss callables built on that same entry point
(one per teacher: each teacher's weighted share of the loss).
Automatic dispatch: CUDA tensors go to Triton, CPU tensors in fp32/bf16/fp16 to the C++ backend,
anything else (float64, a missing extension) to the plain-PyTorch reference (``kdfast.ops.torch``).
An explicitly requested backend (argument or ``KDFAST_BACKEND``) that cannot run raises;
``last_backend()`` says what ran. Device facts (which GEMMs can write float32 from 16-bit operands)
are decided here too, once per device. The contract in words: docs/loss.md.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import replace

import torch

from kdfast import _backend, _checks, fused_linear, reference
from kdfast._contract import LossOptions

__all__ = ["kd_loss", "KDLoss", "fused_linear_kd_loss", "FusedLinearKDLoss", "available_backends", "last_backend"]

log = logging.getLogger("kdfast")

_last_backend: str | None = None


def available_backends() -> list[str]:
    """Backends usable in this process, e.g. ``['cpu', 'torch']``."""
    return _backend.available_backends()


def last_backend() -> str | None:
    """Name of the backend that computed the most recent loss in this process."""
    return _last_backend


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
    allow_tail_temperature: bool = False,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    scale_t2: bool = True,
    inplace: bool = False,
    backend: str | None = None,
    return_components: bool = False,
):
    """Fused distillation loss ``hard_weight * CE + soft_weight * T^2 * D(p || q)`` (docs/loss.md).

    Args:
        student_logits: student logits; leading dimensions are flattened into rows. Any strides.
        labels: next-token ids, ``ignore_index`` marks rows that contribute nothing. None: every row
            is active and ``hard_weight`` must be 0.
        teacher_logits: dense teacher logits, same shape as ``student_logits`` (``-inf`` allowed).
        teacher_indices, teacher_values: sparse teacher targets, ``[..., k]``; ``-1`` marks an empty
            slot; indices must be unique within a row. ``teacher_kind`` says what the values are:
            ``"logits"`` (renormalized softmax over the slots), ``"logprobs"`` (full-vocabulary
            log-probabilities at temperature 1; with ``tail=True`` the missing mass is one extra
            bucket) or ``"probs"`` (targets that already sum to 1, used as is).
        teacher_tail: ``[...]``, only with ``teacher_kind="logprobs"`` and ``tail=True``: natural log
            of the teacher's mass outside the valid slots (``-inf``: none), as captured in the shards.
            Used instead of recomputing ``1 - sum(exp(values))`` from the rounded values.
        temperature: T in ``kdfast._contract.TEMPERATURE_RANGE`` ([0.01, 100]) applied to the student
            (and to teacher logits / tail-less logprobs).
        allow_tail_temperature: ``tail=True`` is exact only at the capture temperature (T = 1), so
            ``tail=True`` with another temperature raises ValueError unless this is True (the bucket
            then compares the T = 1 teacher with the tempered student).
        divergence: ``"forward_kl"``, or for dense teachers ``"reverse_kl"``, ``"jsd"`` with
            ``beta`` (TRL's generalized JSD: beta=0 is forward KL, beta=1 is reverse KL), and
            DistiLLM's ``"skew_kl"`` KL(p || alpha p + (1 - alpha) q) and ``"skew_reverse_kl"``
            KL(q || alpha q + (1 - alpha) p) with ``alpha`` (alpha=0 is forward / reverse KL).
        alpha: the skew divergences' mixture weight in [0, 1); None gives 0.1 (DistiLLM's default).
            Any other divergence raises ValueError when alpha is given.
        reduction: ``"mean"`` over active rows (or over ``num_items`` for gradient accumulation: a
            number or a one-element tensor, > 0), ``"sum"``, or ``"none"`` (per row, shaped like the
            leading dimensions).
        scale_t2: multiply the divergence by T^2 so that gradients keep their size across T.
        inplace: write the gradient into ``student_logits`` (the caller's logits are overwritten);
            saves one [N, V] buffer. Needs contiguous logits. Ignored by the ``"torch"`` backend.
        backend: ``"triton"``, ``"cpu"``, ``"torch"`` or None for automatic.
        return_components: also return ``LossComponents(ce, kd)``: detached means over active rows
            of the hard CE and of the unscaled divergence.

    A row whose teacher holds NaN or +inf (or whose valid indices repeat, when value checks are off)
    gets a NaN loss and a zero gradient, on every backend (docs/loss.md, "Bad rows").

    Raises:
        ValueError: on any shape, dtype, device, value or option mistake, naming the argument.
        RuntimeError: when the requested backend cannot run here.
    """
    op = "kd_loss"
    target = _checks.student_logits(op, student_logits)
    opts = _checks.loss_options(
        op,
        temperature=temperature,
        hard_weight=hard_weight,
        soft_weight=soft_weight,
        divergence=divergence,
        beta=beta,
        alpha=alpha,
        teacher_kind=teacher_kind,
        tail=tail,
        allow_tail_temperature=allow_tail_temperature,
        ignore_index=ignore_index,
        reduction=reduction,
        scale_t2=scale_t2,
        inplace=inplace,
        compute_grad=student_logits.requires_grad and torch.is_grad_enabled(),
    )
    _checks.teacher(target, opts, teacher_logits, teacher_indices, teacher_values, teacher_tail)
    _checks.labels(target, opts, labels)
    num_items = _checks.num_items(op, opts, num_items)
    if opts.inplace and not student_logits.is_contiguous():
        raise ValueError(f"{op}: inplace=True needs contiguous student_logits, got strides {student_logits.stride()}")
    if _checks.value_checks_enabled():
        _checks.values(target, labels, teacher_indices, num_items, opts.ignore_index)
    impl = _dispatch(op, backend, student_logits.dtype, student_logits.device)

    vocab = target.vocab
    rows = student_logits.reshape(-1, vocab)
    flat_labels = _flat_labels(labels)
    teacher = _flat_teacher(vocab, rows.dtype, teacher_logits, teacher_indices, teacher_values, teacher_tail)
    if rows.shape[0] == 0:
        loss, ce_rows, div_rows = _empty_batch(rows, opts)
    else:
        divisor = _mean_divisor(flat_labels, rows, num_items, opts)
        loss, ce_rows, div_rows = impl.kd_loss(rows, flat_labels, *teacher, divisor, opts)

    if opts.reduction == "none":
        loss = loss.reshape(target.lead)
    if not return_components:
        return loss
    return loss, reference.components(ce_rows, div_rows, _active_rows(flat_labels, rows, opts.ignore_index))


class KDLoss(torch.nn.Module):
    """``kd_loss`` as a module: options fixed at construction, tensors given to ``forward``."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(
        self,
        student_logits: torch.Tensor,  # [..., V]
        labels: torch.Tensor | None = None,  # [...]
        **teacher,  # teacher_logits, or teacher_indices + teacher_values (+ teacher_tail)
    ):
        return kd_loss(student_logits, labels, **teacher, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


# ----------------------------------------------------------------------------------------------
# Dispatch: the backend, and what the device's GEMMs can do.
# ----------------------------------------------------------------------------------------------


def _choose_backend(op: str, backend: str | None, logits_dtype: torch.dtype, device: torch.device) -> str:
    requested = backend if backend is not None else _backend.requested_backend()
    available = _backend.available_backends()
    if requested is not None:
        if requested not in _backend.BACKENDS:
            raise ValueError(f"{op}: backend must be one of {_backend.BACKENDS} or None, got {requested!r}")
        if requested not in available:
            raise RuntimeError(f"{op}: backend {requested!r} is unavailable: {_backend.unavailable_reason(requested)}")
        if requested != "torch" and logits_dtype not in _checks.KERNEL_DTYPES:
            raise ValueError(
                f"{op}: backend {requested!r} takes float32/bfloat16/float16 logits, "
                f"got {logits_dtype}; use backend='torch' for {logits_dtype}"
            )
        return requested
    if logits_dtype in _checks.KERNEL_DTYPES:
        preferred = "triton" if device.type == "cuda" else "cpu"
        if preferred in available:
            return preferred
        log.debug("%s: %s backend unavailable (%s); using torch", op, preferred, _backend.unavailable_reason(preferred))
    return "torch"


def _dispatch(op: str, backend: str | None, logits_dtype: torch.dtype, device: torch.device):
    """The chosen backend's module (``kdfast.ops.<name>.kd_loss``); records it for ``last_backend``."""
    global _last_backend
    name = _choose_backend(op, backend, logits_dtype, device)
    _last_backend = name
    return _backend.op_module(name, "kd_loss")


@functools.cache
def _fp32_output_gemm(device: torch.device) -> bool:
    """Whether 16-bit GEMMs on ``device`` can write float32 (``out_dtype``, CUDA): the fused op then
    keeps its logits and weight-gradient accumulator in float32 instead of rounding them to 16 bits.
    torch 2.13 has no such CPU kernel (``aten::mm.dtype_out`` is CUDA/XPU only)."""
    acc = torch.zeros(1, 1, device=device)
    one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    try:
        torch.mm(one, one, out_dtype=torch.float32, out=acc)
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
    except (NotImplementedError, RuntimeError, TypeError):
        return False
    return bool(acc.item() == 2.0)


# ----------------------------------------------------------------------------------------------
# Flattening for the backends (no copies: backends take strided tensors).
# ----------------------------------------------------------------------------------------------


def _flat_labels(labels) -> torch.Tensor | None:  # [N] int64
    return None if labels is None else labels.reshape(-1).long()


def _flat_teacher(vocab, logits_dtype, teacher_logits, teacher_indices, teacher_values, teacher_tail) -> tuple:
    """(teacher_logits [N, V], teacher_indices [N, k], teacher_values [N, k], teacher_tail [N])."""
    tail_dtype = torch.float64 if logits_dtype == torch.float64 else torch.float32
    tail = None if teacher_tail is None else teacher_tail.reshape(-1).to(tail_dtype)
    if teacher_logits is not None:
        return teacher_logits.reshape(-1, vocab), None, None, None
    k = teacher_indices.shape[-1]
    return None, teacher_indices.reshape(-1, k), teacher_values.reshape(-1, k), tail


def _empty_batch(rows: torch.Tensor, opts: LossOptions):
    """Zero loss that still backpropagates (zero gradients) through an empty batch."""
    zero_rows = rows.sum(-1).float() * 0.0  # [0]
    loss = zero_rows if opts.reduction == "none" else zero_rows.sum()
    return loss, zero_rows.detach(), zero_rows.detach()


def _active_rows(labels, rows, ignore_index: int) -> torch.Tensor:
    if labels is None:
        return torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    return labels != ignore_index


def _mean_divisor(labels, rows, num_items, opts: LossOptions) -> torch.Tensor | None:
    """0-dim float32 (float64 for float64 logits) "mean" denominator of the whole batch."""
    if opts.reduction != "mean":
        return None
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    return reference.mean_divisor(_active_rows(labels, rows, opts.ignore_index), num_items, dtype)


# ----------------------------------------------------------------------------------------------
# Fused linear variant: kd_loss(hidden @ weight.T + bias) chunk by chunk (kdfast/fused_linear.py).
# ----------------------------------------------------------------------------------------------


def fused_linear_kd_loss(
    hidden: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor | None = None,  # [...]
    *,
    bias: torch.Tensor | None = None,  # [V]
    teacher_logits: torch.Tensor | Sequence[torch.Tensor] | None = None,  # [..., V], or one per teacher
    teacher_indices: torch.Tensor | Sequence[torch.Tensor] | None = None,  # [..., k], or one per teacher
    teacher_values: torch.Tensor | Sequence[torch.Tensor] | None = None,  # [..., k], or one per teacher
    teacher_tail: torch.Tensor | Sequence[torch.Tensor | None] | None = None,  # [...], or one per teacher
    teacher_hidden: torch.Tensor | None = None,  # [..., Ht]
    teacher_weight: torch.Tensor | None = None,  # [V, Ht]
    teacher_bias: torch.Tensor | None = None,  # [V]
    teacher_weights: Sequence[float] | None = None,
    teacher_kind: str = "logits",
    tail: bool = False,
    temperature: float = 1.0,
    allow_tail_temperature: bool = False,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    scale_t2: bool = True,
    chunk_size: int | None = None,
    backend: str | None = None,
    return_components: bool = False,
):
    """``kd_loss(hidden @ weight.T + bias, labels, ...)`` without ever holding the [N, V] logits.

    Rows are processed ``chunk_size`` at a time: one matmul into a reused chunk buffer, the backend's
    fused loss writes d loss / d logits into that buffer, and two more matmuls turn it into the
    chunk's share of the hidden, weight and bias gradients. The gradients are computed in the forward
    pass; backward only scales them by grad_output (with ``reduction="none"`` backward recomputes the
    chunks instead: see ``kdfast/fused_linear.py`` for why, and for the precision and chunk-size rules).
    Calling backward twice through one loss (``retain_graph=True``) raises, and so does modifying a
    teacher tensor in place between forward and backward with ``reduction="none"``.

    Several teachers: with ``teacher_weights=(w_1, ..., w_n)`` the loss is
    ``hard_weight * CE + soft_weight * s * sum_j w_j * D(p_j, q)`` (s = T^2 or 1, see ``scale_t2``),
    with the student's chunk logits computed once per chunk for all teachers (docs/loss.md, "Several
    teachers").

    Args:
        hidden: student hidden states (the LM head's input); leading dimensions are rows.
        weight, bias: the LM head, ``[V, H]`` and ``[V]``, same dtype and device as ``hidden``.
        teacher: exactly one of dense ``teacher_logits`` ``[..., V]``; sparse ``teacher_indices`` +
            ``teacher_values`` ``[..., k]`` (+ ``teacher_tail`` ``[...]``); or an online teacher
            ``teacher_hidden`` ``[..., Ht]`` + ``teacher_weight`` ``[V, Ht]`` (+ ``teacher_bias``),
            whose logits are computed chunk by chunk under no_grad and never receive gradients.
        teacher_weights: None (one teacher), or one weight per teacher: finite, >= 0, with a positive
            sum, used as given (not renormalised: weights summing to 2 double the soft term). Then each
            given argument among ``teacher_logits``, ``teacher_indices``, ``teacher_values`` and
            ``teacher_tail`` is a list or tuple with one tensor per weight (None where a teacher lacks
            it, e.g. its captured tail; teacher j is checked as a single teacher would be, and may be
            dense while another is sparse). The teachers share every option (``teacher_kind``,
            ``tail``, ``temperature``, ``divergence``, ...); each may have its own k and dtype. Online
            teachers take no weights. ``return_components``' ``kd`` is then ``sum_j w_j D_j``.
        chunk_size: rows per chunk; None keeps each chunk's logits buffers (one, two with two
            teachers, three with more) within 256 MiB together.
        labels, teacher_kind, tail, temperature, allow_tail_temperature, hard_weight, soft_weight,
        divergence, beta, alpha, ignore_index, reduction, num_items, scale_t2, backend, return_components:
            as in ``kd_loss``.

    With 16-bit heads on CUDA the logits are computed in float32 (a float32-output GEMM); on CPU,
    where torch has no such GEMM, they are rounded to the head's dtype as ``F.linear`` would.

    Raises:
        ValueError: on any shape, dtype, device, value or option mistake, naming the argument.
        RuntimeError: when the requested backend cannot run here.
    """
    op = "fused_linear_kd_loss"
    if isinstance(hidden, torch.Tensor):
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias = fused_linear.autocast_operands(
            hidden.device.type, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias
        )
    target = _checks.linear(op, hidden, weight, bias, chunk_size)
    online = any(t is not None for t in (teacher_hidden, teacher_weight, teacher_bias))
    if online:
        _checks.online_teacher(target, hidden, teacher_hidden, teacher_weight, teacher_bias)
    opts = _checks.loss_options(
        op,
        temperature=temperature,
        hard_weight=hard_weight,
        soft_weight=soft_weight,
        divergence=divergence,
        beta=beta,
        alpha=alpha,
        teacher_kind=teacher_kind,
        tail=tail,
        allow_tail_temperature=allow_tail_temperature,
        ignore_index=ignore_index,
        reduction=reduction,
        scale_t2=scale_t2,
        inplace=True,
        compute_grad=True,
    )
    weights, teachers = _checks.weighted_teachers(
        target, opts, teacher_weights, teacher_logits, teacher_indices, teacher_values, teacher_tail, online
    )
    _checks.labels(target, opts, labels)
    num_items = _checks.num_items(op, opts, num_items)
    if _checks.value_checks_enabled():
        _checks.values(target, labels, teacher_indices, num_items, opts.ignore_index)
    fp32_gemm = hidden.dtype in (torch.bfloat16, torch.float16) and _fp32_output_gemm(hidden.device)
    logits_dtype = torch.float32 if fp32_gemm else hidden.dtype
    impl = _dispatch(op, backend, logits_dtype, hidden.device)

    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = _flat_labels(labels)
    if online:
        chunk_teachers = (_online_chunk_teacher(teacher_hidden, teacher_weight, teacher_bias),)
    else:
        chunk_teachers = tuple(_chunk_teacher(target.vocab, hidden.dtype, teacher) for teacher in teachers)
    divisor = _mean_divisor(flat_labels, rows, num_items, opts)
    chunk_losses = tuple(
        functools.partial(_chunk_loss, impl, divisor, _teacher_options(opts, j, w), w) for j, w in enumerate(weights)
    )
    loss, ce_rows, div_rows = fused_linear.fused_linear_kd(
        rows, weight, bias, flat_labels, chunk_teachers, chunk_size, opts.reduction, chunk_losses, fp32_gemm
    )
    if opts.reduction == "none":
        loss = loss.reshape(target.lead)
    if not return_components:
        return loss
    return loss, reference.components(ce_rows, div_rows, _active_rows(flat_labels, rows, opts.ignore_index))


def _online_chunk_teacher(
    teacher_hidden: torch.Tensor,  # [..., Ht]
    teacher_weight: torch.Tensor,  # [V, Ht]
    teacher_bias: torch.Tensor | None,  # [V]
) -> fused_linear.ChunkTeacher:
    """The online teacher's head, its hidden states flattened to rows."""
    hidden_rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    return fused_linear.ChunkTeacher(hidden=hidden_rows, weight=teacher_weight, bias=teacher_bias)


def _chunk_teacher(vocab: int, logits_dtype: torch.dtype, teacher: _checks.Teacher) -> fused_linear.ChunkTeacher:
    """One stored teacher flattened to rows."""
    logits, indices, values, tail_mass = _flat_teacher(vocab, logits_dtype, *teacher)
    return fused_linear.ChunkTeacher(logits=logits, indices=indices, values=values, tail=tail_mass)


def _teacher_options(opts: LossOptions, index: int, weight: float) -> LossOptions:
    """The options of teacher ``index``'s share of the loss: the hard CE once (with teacher 0), the
    soft term weighted by the teacher's ``weight``."""
    hard_weight = opts.hard_weight if index == 0 else 0.0
    return replace(opts, hard_weight=hard_weight, soft_weight=opts.soft_weight * weight)


class FusedLinearKDLoss(torch.nn.Module):
    """``fused_linear_kd_loss`` as a module: options fixed at construction, tensors given to ``forward``."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(
        self,
        hidden: torch.Tensor,  # [..., H]
        weight: torch.Tensor,  # [V, H]
        labels: torch.Tensor | None = None,  # [...]
        **tensors,  # bias and the teacher
    ):
        return fused_linear_kd_loss(hidden, weight, labels, **tensors, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _chunk_loss(
    impl,  # a backend module: kdfast.ops.<name>.kd_loss
    divisor: torch.Tensor | None,  # 0-dim, the whole batch's "mean" denominator
    opts: LossOptions,  # inplace=True; this teacher's share (_teacher_options)
    teacher_weight: float,  # w_j: the divergence rows are returned as w_j * D_j
    logits: torch.Tensor,  # [c, V] the chunk buffer
    labels: torch.Tensor | None,  # [c]
    teacher_logits: torch.Tensor | None,  # [c, V]
    teacher_indices: torch.Tensor | None,  # [c, k]
    teacher_values: torch.Tensor | None,  # [c, k]
    teacher_tail: torch.Tensor | None,  # [c]
    compute_grad: bool,
):
    """One chunk, one teacher: (loss, ce_rows, w_j * div_rows, d loss / d logits or None) for grad_output = 1.

    Every backend, called under no_grad with ``opts.inplace``, overwrites ``logits`` with the gradient
    (the in-place contract); the "mean" divisor is the whole batch's, never the chunk's.
    """
    with torch.no_grad():
        loss, ce_rows, div_rows = impl.kd_loss(
            logits,
            labels,
            teacher_logits,
            teacher_indices,
            teacher_values,
            teacher_tail,
            divisor,
            replace(opts, compute_grad=compute_grad),
        )
    return loss, ce_rows, div_rows * teacher_weight, logits if compute_grad else None
