"""Public loss functions and modules: the single point where kdfast validates input and picks a backend.

Everything below the public functions works on flattened, checked tensors (see ``_contract.py``).
Automatic dispatch: CUDA tensors go to Triton, CPU tensors in fp32/bf16/fp16 to the C++ backend,
anything else (float64, a missing extension) to the plain-PyTorch reference. An explicitly requested
backend (argument or ``KDFAST_BACKEND``) that cannot run raises; ``last_backend()`` says what ran.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import replace

import torch

from kdfast import _backend, fused_linear, reference
from kdfast._contract import DIVERGENCES, REDUCTIONS, TEACHER_KINDS, LossOptions

__all__ = ["kd_loss", "KDLoss", "fused_linear_kd_loss", "FusedLinearKDLoss", "available_backends", "last_backend"]

log = logging.getLogger("kdfast")

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_INDEX_DTYPES = (torch.int32, torch.int64)
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
    teacher_kind: str = "logits",
    tail: bool = False,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    scale_t2: bool = True,
    inplace: bool = False,
    backend: str | None = None,
    return_components: bool = False,
):
    """Fused distillation loss ``hard_weight * CE + soft_weight * T^2 * D(p || q)`` (design.md).

    Args:
        student_logits: student logits; leading dimensions are flattened into rows.
        labels: next-token ids, ``ignore_index`` marks rows that contribute nothing. None: every row
            is active and ``hard_weight`` must be 0.
        teacher_logits: dense teacher logits, same shape as ``student_logits`` (``-inf`` allowed).
        teacher_indices, teacher_values: sparse teacher targets, ``[..., k]``; ``-1`` marks an empty
            slot; indices must be unique within a row. ``teacher_kind`` says what the values are:
            ``"logits"`` (renormalized softmax over the slots), ``"logprobs"`` (full-vocabulary
            log-probabilities at temperature 1; with ``tail=True`` the missing mass is one extra
            bucket) or ``"probs"`` (targets that already sum to 1, used as is).
        temperature: T > 0 applied to the student (and to teacher logits / tail-less logprobs).
        divergence: ``"forward_kl"``, or for dense teachers ``"reverse_kl"`` and ``"jsd"`` with
            ``beta`` (TRL's generalized JSD: beta=0 is forward KL, beta=1 is reverse KL).
        reduction: ``"mean"`` over active rows (or over ``num_items`` for gradient accumulation),
            ``"sum"``, or ``"none"`` (per row, shaped like the leading dimensions).
        scale_t2: multiply the divergence by T^2 so that gradients keep their size across T.
        inplace: write the gradient into ``student_logits`` (the caller's logits are overwritten);
            saves one [N, V] buffer. Ignored by the ``"torch"`` backend.
        backend: ``"triton"``, ``"cpu"``, ``"torch"`` or None for automatic.
        return_components: also return ``LossComponents(ce, kd)``: detached means over active rows
            of the hard CE and of the unscaled divergence.

    Raises:
        ValueError: on any shape, dtype, device, value or option mistake, naming the argument.
        RuntimeError: when the requested backend cannot run here.
    """
    vocab = _check_student(student_logits)
    opts = LossOptions(
        temperature=_check_temperature(temperature),
        hard_weight=_check_finite("hard_weight", hard_weight),
        soft_weight=_check_finite("soft_weight", soft_weight),
        divergence=divergence,
        beta=float(beta),
        teacher_kind=teacher_kind,
        tail=bool(tail),
        ignore_index=int(ignore_index),
        reduction=reduction,
        scale_t2=bool(scale_t2),
        inplace=bool(inplace),
        compute_grad=student_logits.requires_grad and torch.is_grad_enabled(),
    )
    sparse = _check_teacher(student_logits, teacher_logits, teacher_indices, teacher_values, opts)
    _check_labels(student_logits, labels, opts)
    _check_reduction(opts, num_items)
    if inplace and not student_logits.is_contiguous():
        raise ValueError("kd_loss: inplace=True needs contiguous student_logits")
    if _value_checks_enabled():
        _check_values(vocab, labels, teacher_indices, opts.ignore_index)

    name = _choose_backend(backend, student_logits)
    global _last_backend
    _last_backend = name
    rows = student_logits.reshape(-1, vocab)
    flat_labels = None if labels is None else labels.reshape(-1).long()
    if sparse:
        k = teacher_indices.shape[-1]
        teacher = (None, teacher_indices.reshape(-1, k).contiguous(), teacher_values.reshape(-1, k).contiguous())
    else:
        teacher = (teacher_logits.reshape(-1, vocab).contiguous(), None, None)

    if rows.shape[0] == 0:
        loss, ce_rows, div_rows = _empty_batch(rows, opts)
    elif name == "torch":
        loss, ce_rows, div_rows = _torch_backend(rows, flat_labels, *teacher, num_items, opts)
    else:
        divisor = _mean_divisor(flat_labels, rows, num_items, opts)
        impl = _backend.op_module(name, "kd_loss")
        loss, ce_rows, div_rows = impl.kd_loss(rows.contiguous(), flat_labels, *teacher, divisor, opts)

    if opts.reduction == "none":
        loss = loss.reshape(student_logits.shape[:-1])
    if not return_components:
        return loss
    active = _active_rows(flat_labels, rows, opts.ignore_index)
    return loss, reference.components(ce_rows, div_rows, active)


class KDLoss(torch.nn.Module):
    """``kd_loss`` as a module: options fixed at construction, tensors given to ``forward``."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(
        self,
        student_logits: torch.Tensor,  # [..., V]
        labels: torch.Tensor | None = None,  # [...]
        **teacher,
    ):
        return kd_loss(student_logits, labels, **teacher, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _choose_backend(backend: str | None, student_logits: torch.Tensor) -> str:
    requested = backend if backend is not None else _backend.requested_backend()
    available = _backend.available_backends()
    if requested is not None:
        if requested not in _backend.BACKENDS:
            raise ValueError(f"kd_loss: backend must be one of {_backend.BACKENDS} or None, got {requested!r}")
        if requested not in available:
            raise RuntimeError(f"kd_loss: backend {requested!r} is unavailable: {_backend.unavailable_reason(requested)}")
        if requested != "torch" and student_logits.dtype not in _KERNEL_DTYPES:
            raise ValueError(
                f"kd_loss: backend {requested!r} takes float32/bfloat16/float16 student_logits, "
                f"got {student_logits.dtype}; use backend='torch' for {student_logits.dtype}"
            )
        return requested
    if student_logits.dtype in _KERNEL_DTYPES:
        preferred = "triton" if student_logits.is_cuda else "cpu"
        if preferred in available:
            return preferred
        log.debug("kd_loss: %s backend unavailable (%s); using torch", preferred, _backend.unavailable_reason(preferred))
    return "torch"


def _torch_backend(logits, labels, teacher_logits, teacher_indices, teacher_values, num_items, opts: LossOptions):
    ce, div, active = reference.kd_loss_rows(
        logits,
        labels,
        teacher_logits=teacher_logits,
        teacher_indices=teacher_indices,
        teacher_values=teacher_values,
        teacher_kind=opts.teacher_kind,
        tail=opts.tail,
        temperature=opts.temperature,
        divergence=opts.divergence,
        beta=opts.beta,
        ignore_index=opts.ignore_index,
    )
    rows = opts.hard_weight * ce + opts.soft_scale * div
    loss = reference.reduce_rows(rows, active, opts.reduction, num_items)
    return loss, ce.detach(), div.detach()


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
    if opts.reduction != "mean":
        return None
    active = _active_rows(labels, rows, opts.ignore_index)
    return reference.mean_divisor(active, num_items, torch.float32)


# ----------------------------------------------------------------------------------------------
# Validation: every message names the argument and what it got.
# ----------------------------------------------------------------------------------------------


def _check_student(student_logits) -> int:
    if not isinstance(student_logits, torch.Tensor):
        raise ValueError(f"kd_loss: student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"kd_loss: student_logits must be [..., V] with V >= 1, got shape {tuple(student_logits.shape)}")
    if student_logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"kd_loss: student_logits must be float32/bfloat16/float16/float64, got {student_logits.dtype}")
    return student_logits.shape[-1]


def _check_finite(name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"kd_loss: {name} must be finite, got {value}")
    return value


def _check_temperature(temperature) -> float:
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kd_loss: temperature must be a finite number > 0, got {temperature}")
    return temperature


def _check_same_device(name: str, tensor: torch.Tensor, student_logits: torch.Tensor) -> None:
    if tensor.device != student_logits.device:
        raise ValueError(f"kd_loss: {name} is on {tensor.device} but student_logits is on {student_logits.device}")


def _check_teacher(student_logits, teacher_logits, teacher_indices, teacher_values, opts: LossOptions) -> bool:
    """Validates the teacher arguments; returns True for a sparse teacher."""
    has_sparse = teacher_indices is not None or teacher_values is not None
    if (teacher_logits is None) == (not has_sparse):
        raise ValueError(
            "kd_loss: give exactly one teacher: teacher_logits (dense) or teacher_indices + teacher_values (sparse); "
            f"got teacher_logits={'set' if teacher_logits is not None else 'None'}, "
            f"teacher_indices={'set' if teacher_indices is not None else 'None'}, "
            f"teacher_values={'set' if teacher_values is not None else 'None'}"
        )
    if opts.divergence not in DIVERGENCES:
        raise ValueError(f"kd_loss: divergence must be one of {DIVERGENCES}, got {opts.divergence!r}")
    if opts.divergence == "jsd" and not 0.0 <= opts.beta <= 1.0:
        raise ValueError(f"kd_loss: beta must be in [0, 1], got {opts.beta}")
    if opts.teacher_kind not in TEACHER_KINDS:
        raise ValueError(f"kd_loss: teacher_kind must be one of {TEACHER_KINDS}, got {opts.teacher_kind!r}")
    if opts.tail and not (has_sparse and opts.teacher_kind == "logprobs"):
        raise ValueError("kd_loss: tail=True needs a sparse teacher with teacher_kind='logprobs'")
    if has_sparse:
        _check_sparse_teacher(student_logits, teacher_indices, teacher_values, opts)
    else:
        _check_dense_teacher(student_logits, teacher_logits, opts)
    return has_sparse


def _check_dense_teacher(student_logits, teacher_logits, opts: LossOptions) -> None:
    if not isinstance(teacher_logits, torch.Tensor):
        raise ValueError(f"kd_loss: teacher_logits must be a torch.Tensor, got {type(teacher_logits).__name__}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"kd_loss: teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
            f"{tuple(student_logits.shape)} (vocabulary sizes must match)"
        )
    if teacher_logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"kd_loss: teacher_logits must be a floating tensor, got {teacher_logits.dtype}")
    if opts.teacher_kind != "logits":
        raise ValueError(f"kd_loss: dense teacher_logits take teacher_kind='logits', got {opts.teacher_kind!r}")
    _check_same_device("teacher_logits", teacher_logits, student_logits)


def _check_sparse_teacher(student_logits, teacher_indices, teacher_values, opts: LossOptions) -> None:
    if teacher_indices is None or teacher_values is None:
        raise ValueError("kd_loss: a sparse teacher needs both teacher_indices and teacher_values")
    for name, tensor in (("teacher_indices", teacher_indices), ("teacher_values", teacher_values)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"kd_loss: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        _check_same_device(name, tensor, student_logits)
    if teacher_indices.shape != teacher_values.shape:
        raise ValueError(
            f"kd_loss: teacher_indices shape {tuple(teacher_indices.shape)} != teacher_values shape "
            f"{tuple(teacher_values.shape)}"
        )
    if teacher_indices.dim() < 1 or teacher_indices.shape[:-1] != student_logits.shape[:-1] or teacher_indices.shape[-1] < 1:
        raise ValueError(
            f"kd_loss: teacher_indices must be [..., k] with k >= 1 and leading shape {tuple(student_logits.shape[:-1])} "
            f"(student_logits {tuple(student_logits.shape)}), got {tuple(teacher_indices.shape)}"
        )
    if teacher_indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"kd_loss: teacher_indices must be int32 or int64, got {teacher_indices.dtype}")
    if teacher_values.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"kd_loss: teacher_values must be a floating tensor, got {teacher_values.dtype}")
    if opts.divergence != "forward_kl":
        raise ValueError(f"kd_loss: divergence={opts.divergence!r} needs dense teacher_logits; sparse teachers take 'forward_kl'")


def _check_labels(student_logits, labels, opts: LossOptions) -> None:
    if labels is None:
        if opts.hard_weight != 0.0:
            raise ValueError(f"kd_loss: hard_weight={opts.hard_weight} needs labels, got labels=None")
        return
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"kd_loss: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"kd_loss: labels shape {tuple(labels.shape)} != student_logits leading shape "
            f"{tuple(student_logits.shape[:-1])} (student_logits {tuple(student_logits.shape)})"
        )
    if labels.dtype not in _INDEX_DTYPES:
        raise ValueError(f"kd_loss: labels must be int64 (or int32), got {labels.dtype}")
    _check_same_device("labels", labels, student_logits)


def _check_reduction(opts: LossOptions, num_items) -> None:
    if opts.reduction not in REDUCTIONS:
        raise ValueError(f"kd_loss: reduction must be one of {REDUCTIONS}, got {opts.reduction!r}")
    if num_items is None:
        return
    if opts.reduction != "mean":
        raise ValueError(f"kd_loss: num_items only applies to reduction='mean', got reduction={opts.reduction!r}")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"kd_loss: num_items must be a scalar, got shape {tuple(num_items.shape)}")
    elif not (isinstance(num_items, (int, float)) and num_items > 0):
        raise ValueError(f"kd_loss: num_items must be a number > 0, got {num_items!r}")


def _value_checks_enabled() -> bool:
    """Range checks need one host sync on CUDA; skipped while compiling or with KDFAST_CHECK_VALUES=0."""
    if os.environ.get("KDFAST_CHECK_VALUES", "1") == "0":
        return False
    return not torch.compiler.is_compiling()


def _check_values(vocab: int, labels, teacher_indices, ignore_index: int) -> None:
    """One combined reduction (one host sync) over labels and indices, then a precise message."""
    checks = []
    if labels is not None and labels.numel():
        checks.append(((labels < 0) | (labels >= vocab)) & (labels != ignore_index))
    if teacher_indices is not None and teacher_indices.numel():
        checks.append((teacher_indices < -1) | (teacher_indices >= vocab))
    if not checks or not bool(torch.stack([c.any() for c in checks]).any()):
        return
    if labels is not None and labels.numel() and bool(checks[0].any()):
        bad = labels[checks[0]][:5].tolist()
        raise ValueError(
            f"kd_loss: labels must be in [0, {vocab}) or ignore_index={ignore_index}; got values {bad} "
            f"(labels shape {tuple(labels.shape)}, V={vocab})"
        )
    bad = teacher_indices[(teacher_indices < -1) | (teacher_indices >= vocab)][:5].tolist()
    raise ValueError(
        f"kd_loss: teacher_indices must be in [0, {vocab}) or -1 for an empty slot; got values {bad} "
        f"(teacher_indices shape {tuple(teacher_indices.shape)}, V={vocab})"
    )


# ----------------------------------------------------------------------------------------------
# Fused linear variant: kd_loss(hidden @ weight.T + bias) chunk by chunk (kdfast/fused_linear.py).
# ----------------------------------------------------------------------------------------------


def fused_linear_kd_loss(
    hidden: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor | None = None,  # [...]
    *,
    bias: torch.Tensor | None = None,  # [V]
    teacher_logits: torch.Tensor | None = None,  # [..., V]
    teacher_indices: torch.Tensor | None = None,  # [..., k]
    teacher_values: torch.Tensor | None = None,  # [..., k]
    teacher_hidden: torch.Tensor | None = None,  # [..., Ht]
    teacher_weight: torch.Tensor | None = None,  # [V, Ht]
    teacher_bias: torch.Tensor | None = None,  # [V]
    teacher_kind: str = "logits",
    tail: bool = False,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
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
    Calling backward twice through one loss (``retain_graph=True``) raises.

    Args:
        hidden: student hidden states (the LM head's input); leading dimensions are rows.
        weight, bias: the LM head, ``[V, H]`` and ``[V]``, same dtype and device as ``hidden``.
        teacher: exactly one of dense ``teacher_logits`` ``[..., V]``; sparse ``teacher_indices`` +
            ``teacher_values`` ``[..., k]``; or an online teacher ``teacher_hidden`` ``[..., Ht]`` +
            ``teacher_weight`` ``[V, Ht]`` (+ ``teacher_bias``), whose logits are computed chunk by
            chunk under no_grad and never receive gradients.
        chunk_size: rows per chunk; None keeps each chunk's logits within 256 MiB.
        labels, teacher_kind, tail, temperature, hard_weight, soft_weight, divergence, beta,
        ignore_index, reduction, num_items, scale_t2, backend, return_components: as in ``kd_loss``.

    Raises:
        ValueError: on any shape, dtype, device, value or option mistake, naming the argument.
        RuntimeError: when the requested backend cannot run here.
    """
    if isinstance(hidden, torch.Tensor):
        hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias = fused_linear.autocast_operands(
            hidden.device.type, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias
        )
    try:
        vocab = _check_linear(hidden, weight, bias, chunk_size)
        online = _check_teacher_form(
            hidden, weight, teacher_logits, teacher_indices, teacher_hidden, teacher_weight, teacher_bias
        )
        # Shape-only stand-ins (0-dim storage, expanded) let kd_loss's checks validate the rest.
        logits = hidden.new_empty(()).expand(*hidden.shape[:-1], vocab)
        dense = teacher_hidden.new_empty(()).expand(logits.shape) if online else teacher_logits
        opts = LossOptions(
            temperature=_check_temperature(temperature),
            hard_weight=_check_finite("hard_weight", hard_weight),
            soft_weight=_check_finite("soft_weight", soft_weight),
            divergence=divergence,
            beta=float(beta),
            teacher_kind=teacher_kind,
            tail=bool(tail),
            ignore_index=int(ignore_index),
            reduction=reduction,
            scale_t2=bool(scale_t2),
            inplace=True,
        )
        _check_teacher(logits, dense, teacher_indices, teacher_values, opts)
        _check_labels(logits, labels, opts)
        _check_reduction(opts, num_items)
        if _value_checks_enabled():
            _check_values(vocab, labels, teacher_indices, opts.ignore_index)
        name = _choose_backend(backend, logits)
    except ValueError as err:
        message = str(err).removeprefix("kd_loss: ").replace("student_logits", "logits (hidden @ weight.T)")
        raise ValueError(f"fused_linear_kd_loss: {message}") from None

    global _last_backend
    _last_backend = name
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1).long().contiguous()
    teacher = _chunk_teacher(
        vocab, teacher_logits, teacher_indices, teacher_values, teacher_hidden, teacher_weight, teacher_bias
    )
    divisor = _mean_divisor(flat_labels, rows, num_items, opts)
    chunk_loss = functools.partial(_fused_chunk_loss, name, divisor, opts)
    loss, ce_rows, div_rows = fused_linear.fused_linear_kd(
        rows, weight, bias, flat_labels, teacher, chunk_size, opts.reduction, chunk_loss
    )
    if opts.reduction == "none":
        loss = loss.reshape(hidden.shape[:-1])
    if not return_components:
        return loss
    return loss, reference.components(ce_rows, div_rows, _active_rows(flat_labels, rows, opts.ignore_index))


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


def _fused_chunk_loss(
    backend: str,
    divisor: torch.Tensor | None,  # 0-dim float32, the whole batch's "mean" denominator
    opts: LossOptions,
    logits: torch.Tensor,  # [c, V] the chunk buffer
    labels: torch.Tensor | None,  # [c]
    teacher_logits: torch.Tensor | None,  # [c, V]
    teacher_indices: torch.Tensor | None,  # [c, k]
    teacher_values: torch.Tensor | None,  # [c, k]
    compute_grad: bool,
):
    """One chunk: (loss, ce_rows, div_rows, d loss / d logits or None) for grad_output = 1.

    In-place backends overwrite ``logits`` [c, V] with the gradient; the "torch" backend cannot, so its
    gradient comes from autograd. The "mean" divisor is the whole batch's, never the chunk's.
    """
    if backend != "torch":
        impl = _backend.op_module(backend, "kd_loss")
        with torch.no_grad():
            chunk_opts = replace(opts, compute_grad=compute_grad)
            loss, ce_rows, div_rows = impl.kd_loss(
                logits, labels, teacher_logits, teacher_indices, teacher_values, divisor, chunk_opts
            )
        return loss.detach(), ce_rows, div_rows, logits if compute_grad else None
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_(compute_grad)
        loss, ce_rows, div_rows = _torch_backend(
            leaf, labels, teacher_logits, teacher_indices, teacher_values, divisor, opts
        )
        grad = torch.autograd.grad(loss.sum(), leaf)[0] if compute_grad else None
    return loss.detach(), ce_rows, div_rows, grad


def _chunk_teacher(
    vocab, teacher_logits, teacher_indices, teacher_values, teacher_hidden, teacher_weight, teacher_bias
) -> fused_linear.ChunkTeacher:
    if teacher_hidden is not None:
        rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        return fused_linear.ChunkTeacher(hidden=rows, weight=teacher_weight, bias=teacher_bias)
    if teacher_logits is not None:
        return fused_linear.ChunkTeacher(logits=teacher_logits.reshape(-1, vocab).contiguous())
    k = teacher_indices.shape[-1]
    return fused_linear.ChunkTeacher(
        indices=teacher_indices.reshape(-1, k).contiguous(), values=teacher_values.reshape(-1, k).contiguous()
    )


def _check_linear(hidden, weight, bias, chunk_size) -> int:
    """hidden [..., H], weight [V, H], bias [V]: one dtype, one device; returns V."""
    for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if not isinstance(tensor, torch.Tensor) and (name != "bias" or tensor is not None):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1 or hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"hidden must be a floating [..., H] tensor with H >= 1, got shape {tuple(hidden.shape)} {hidden.dtype}"
        )
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must be [V] = [{weight.shape[0]}] (weight {tuple(weight.shape)}), got {tuple(bias.shape)}"
        )
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype != hidden.dtype:
            raise ValueError(f"{name} dtype {tensor.dtype} != hidden dtype {hidden.dtype}; the matmul needs one dtype")
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be an int > 0 or None, got {chunk_size!r}")
    return weight.shape[0]


def _check_teacher_form(
    hidden, weight, teacher_logits, teacher_indices, teacher_hidden, teacher_weight, teacher_bias
) -> bool:
    """Validates the online teacher (teacher_hidden + teacher_weight + teacher_bias); True when it is the teacher."""
    if teacher_hidden is None and teacher_weight is None and teacher_bias is None:
        return False
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("an online teacher needs both teacher_hidden and teacher_weight (teacher_bias is optional)")
    if teacher_logits is not None or teacher_indices is not None:
        raise ValueError(
            "give exactly one teacher: teacher_logits, teacher_indices + teacher_values, "
            "or teacher_hidden + teacher_weight"
        )
    trio = (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias))
    for name, tensor in trio:
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    for name, tensor in trio:
        if tensor is None:
            continue
        if tensor.dtype != teacher_hidden.dtype or tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{name} must be floating, one dtype for teacher_hidden/weight/bias, got {tensor.dtype} "
                f"(teacher_hidden {teacher_hidden.dtype})"
            )
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if teacher_hidden.dim() < 1 or teacher_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden must be [..., Ht] with the rows of hidden {tuple(hidden.shape)}, "
            f"got {tuple(teacher_hidden.shape)}"
        )
    vocab = weight.shape[0]
    if teacher_weight.dim() != 2 or tuple(teacher_weight.shape) != (vocab, teacher_hidden.shape[-1]):
        raise ValueError(
            f"teacher_weight must be [V, Ht] = [{vocab}, {teacher_hidden.shape[-1]}] "
            f"(V of weight {tuple(weight.shape)}, Ht of teacher_hidden {tuple(teacher_hidden.shape)}), "
            f"got {tuple(teacher_weight.shape)}"
        )
    if teacher_bias is not None and tuple(teacher_bias.shape) != (vocab,):
        raise ValueError(f"teacher_bias must be [V] = [{vocab}], got {tuple(teacher_bias.shape)}")
    return True
