"""Validation of the public loss ops: shapes, dtypes, devices, options and (one host sync) values.

Every check works on the arguments themselves (no stand-in tensors) and every message starts with
the op's name and names the argument and what it got. ``Logits`` describes the logits a loss is
computed on: the student's for ``kd_loss``, ``hidden @ weight.T`` (never materialized) for
``fused_linear_kd_loss``.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch

from kdfast._contract import (
    DIVERGENCES,
    REDUCTIONS,
    SKEW_ALPHA_DEFAULT,
    SKEW_DIVERGENCES,
    TEACHER_KINDS,
    TEMPERATURE_RANGE,
    LossOptions,
)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int32, torch.int64)
_INT64_RANGE = (-(2**63), 2**63 - 1)


class Logits(NamedTuple):
    """What the loss's logits look like: [*lead, vocab] on ``device``, called ``name`` in messages."""

    op: str
    name: str
    lead: tuple[int, ...]
    vocab: int
    device: torch.device


def _type_name(value) -> str:
    return type(value).__name__


def _tensor(op: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {_type_name(value)}")


def _same_device(target: Logits, name: str, tensor: torch.Tensor) -> None:
    if tensor.device != target.device:
        raise ValueError(f"{target.op}: {name} is on {tensor.device} but {target.name} is on {target.device}")


def _finite(op: str, name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def _int64(op: str, name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{op}: {name} must be an int, got {value!r}") from None
    if not _INT64_RANGE[0] <= value <= _INT64_RANGE[1]:
        raise ValueError(f"{op}: {name} must fit in int64 [-2**63, 2**63), got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# Options: the one place that builds LossOptions.
# ----------------------------------------------------------------------------------------------


def loss_options(
    op: str,
    *,
    temperature,
    hard_weight,
    soft_weight,
    divergence,
    beta,
    alpha,
    teacher_kind,
    tail,
    allow_tail_temperature,
    ignore_index,
    reduction,
    scale_t2,
    inplace: bool,
    compute_grad: bool,
) -> LossOptions:
    """Checks every option that does not depend on a tensor and returns the backends' LossOptions."""
    temperature = _finite(op, "temperature", temperature)
    low, high = TEMPERATURE_RANGE
    if not low <= temperature <= high:
        raise ValueError(
            f"{op}: temperature must be in [{low}, {high}] (float32 kernels are accurate there), got {temperature}"
        )
    if divergence not in DIVERGENCES:
        raise ValueError(f"{op}: divergence must be one of {DIVERGENCES}, got {divergence!r}")
    beta = _finite(op, "beta", beta)
    if divergence == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"{op}: beta must be in [0, 1], got {beta}")
    alpha = _skew_alpha(op, divergence, alpha)
    if teacher_kind not in TEACHER_KINDS:
        raise ValueError(f"{op}: teacher_kind must be one of {TEACHER_KINDS}, got {teacher_kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    ignore_index = _int64(op, "ignore_index", ignore_index)
    if tail and temperature != 1.0 and not allow_tail_temperature:
        raise ValueError(
            f"{op}: tail=True is exact only at the capture temperature (the logprobs are at T=1), got "
            f"temperature={temperature}; pass allow_tail_temperature=True to use the bucket at another temperature"
        )
    return LossOptions(
        temperature=temperature,
        hard_weight=_finite(op, "hard_weight", hard_weight),
        soft_weight=_finite(op, "soft_weight", soft_weight),
        divergence=divergence,
        beta=beta,
        alpha=alpha,
        teacher_kind=teacher_kind,
        tail=bool(tail),
        ignore_index=ignore_index,
        reduction=reduction,
        scale_t2=bool(scale_t2),
        inplace=bool(inplace),
        compute_grad=bool(compute_grad),
    )


def _skew_alpha(op: str, divergence: str, alpha) -> float:
    """The skew divergences' mixture weight: in [0, 1) (alpha = 1 would make the divergence 0),
    SKEW_ALPHA_DEFAULT when None; any other divergence takes no alpha."""
    if divergence not in SKEW_DIVERGENCES:
        if alpha is not None:
            raise ValueError(
                f"{op}: alpha only applies to divergence in {SKEW_DIVERGENCES}, got alpha={alpha!r} with "
                f"divergence={divergence!r}"
            )
        return SKEW_ALPHA_DEFAULT
    if alpha is None:
        return SKEW_ALPHA_DEFAULT
    alpha = _finite(op, "alpha", alpha)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"{op}: alpha must be in [0, 1) for divergence={divergence!r}, got {alpha}")
    return alpha


# ----------------------------------------------------------------------------------------------
# Tensors: shapes, dtypes, devices.
# ----------------------------------------------------------------------------------------------


def student_logits(op: str, logits) -> Logits:
    _tensor(op, "student_logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{op}: student_logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: student_logits must be float32/bfloat16/float16/float64, got {logits.dtype}")
    return Logits(op, "student_logits", tuple(logits.shape[:-1]), logits.shape[-1], logits.device)


def linear(op: str, hidden, weight, bias, chunk_size) -> Logits:
    """hidden [..., H], weight [V, H], bias [V]: one dtype, one device."""
    for name, tensor in (("hidden", hidden), ("weight", weight)):
        _tensor(op, name, tensor)
    if bias is not None:
        _tensor(op, "bias", bias)
    if hidden.dim() < 1 or hidden.shape[-1] < 1 or hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{op}: hidden must be a floating [..., H] tensor with H >= 1, got shape {tuple(hidden.shape)} {hidden.dtype}"
        )
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{op}: bias must be [V] = [{weight.shape[0]}] (weight {tuple(weight.shape)}), got {tuple(bias.shape)}"
        )
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype != hidden.dtype:
            raise ValueError(f"{op}: {name} dtype {tensor.dtype} != hidden dtype {hidden.dtype}; the matmul needs one dtype")
        if tensor.device != hidden.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but hidden is on {hidden.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"{op}: chunk_size must be an int > 0 or None, got {chunk_size!r}")
    return Logits(op, "logits (hidden @ weight.T)", tuple(hidden.shape[:-1]), weight.shape[0], hidden.device)


def online_teacher(target: Logits, hidden, teacher_hidden, teacher_weight, teacher_bias) -> None:
    """teacher_hidden [..., Ht] + teacher_weight [V, Ht] (+ teacher_bias [V]): one dtype, hidden's device."""
    op = target.op
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError(f"{op}: an online teacher needs both teacher_hidden and teacher_weight (teacher_bias is optional)")
    trio = (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias))
    for name, tensor in trio:
        if tensor is None:
            continue
        _tensor(op, name, tensor)
        if tensor.dtype != teacher_hidden.dtype or tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{op}: {name} must be floating, one dtype for teacher_hidden/weight/bias, got {tensor.dtype} "
                f"(teacher_hidden {teacher_hidden.dtype})"
            )
        if tensor.device != hidden.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but hidden is on {hidden.device}")
    if teacher_hidden.dim() < 1 or tuple(teacher_hidden.shape[:-1]) != target.lead:
        raise ValueError(
            f"{op}: teacher_hidden must be [..., Ht] with the rows of hidden {tuple(hidden.shape)}, "
            f"got {tuple(teacher_hidden.shape)}"
        )
    vocab, ht = target.vocab, teacher_hidden.shape[-1]
    if teacher_weight.dim() != 2 or tuple(teacher_weight.shape) != (vocab, ht):
        raise ValueError(
            f"{op}: teacher_weight must be [V, Ht] = [{vocab}, {ht}] (V of weight, Ht of teacher_hidden "
            f"{tuple(teacher_hidden.shape)}), got {tuple(teacher_weight.shape)}"
        )
    if teacher_bias is not None and tuple(teacher_bias.shape) != (vocab,):
        raise ValueError(f"{op}: teacher_bias must be [V] = [{vocab}], got {tuple(teacher_bias.shape)}")


def teacher(
    target: Logits, opts: LossOptions, teacher_logits, teacher_indices, teacher_values, teacher_tail, online: bool = False
) -> bool:
    """Validates the teacher (``online``: the fused op's teacher head, already checked); True when sparse."""
    op = target.op
    sparse = teacher_indices is not None or teacher_values is not None
    forms = (teacher_logits is not None) + sparse + online
    if forms != 1:
        online_form = ", or teacher_hidden + teacher_weight" if target.name != "student_logits" else ""
        raise ValueError(
            f"{op}: give exactly one teacher: teacher_logits (dense), teacher_indices + teacher_values (sparse)"
            f"{online_form}; got teacher_logits={_given(teacher_logits)}, teacher_indices={_given(teacher_indices)}, "
            f"teacher_values={_given(teacher_values)}" + (", and an online teacher" if online else "")
        )
    if opts.tail and not (sparse and opts.teacher_kind == "logprobs"):
        raise ValueError(f"{op}: tail=True needs a sparse teacher with teacher_kind='logprobs'")
    if teacher_tail is not None:
        _teacher_tail(target, opts, teacher_tail)
    if sparse:
        _sparse_teacher(target, opts, teacher_indices, teacher_values)
    elif opts.teacher_kind != "logits":
        raise ValueError(f"{op}: dense teacher_logits take teacher_kind='logits', got {opts.teacher_kind!r}")
    elif not online:
        _tensor(op, "teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != (*target.lead, target.vocab):
            raise ValueError(
                f"{op}: teacher_logits shape {tuple(teacher_logits.shape)} != {target.name} shape "
                f"{(*target.lead, target.vocab)} (vocabulary sizes must match)"
            )
        if teacher_logits.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: teacher_logits must be a floating tensor, got {teacher_logits.dtype}")
        _same_device(target, "teacher_logits", teacher_logits)
    return sparse


def _given(tensor) -> str:
    return "None" if tensor is None else "set"


def _teacher_tail(target: Logits, opts: LossOptions, teacher_tail) -> None:
    op = target.op
    if not opts.tail or opts.teacher_kind != "logprobs":
        raise ValueError(
            f"{op}: teacher_tail is only used with teacher_kind='logprobs' and tail=True, got "
            f"teacher_kind={opts.teacher_kind!r}, tail={opts.tail}"
        )
    _tensor(op, "teacher_tail", teacher_tail)
    if tuple(teacher_tail.shape) != target.lead:
        raise ValueError(
            f"{op}: teacher_tail must be [...] = {target.lead}, the leading shape of {target.name}, "
            f"got {tuple(teacher_tail.shape)}"
        )
    if teacher_tail.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: teacher_tail must be a floating tensor (log of the missing mass), got {teacher_tail.dtype}")
    _same_device(target, "teacher_tail", teacher_tail)


def _sparse_teacher(target: Logits, opts: LossOptions, teacher_indices, teacher_values) -> None:
    op = target.op
    if teacher_indices is None or teacher_values is None:
        raise ValueError(f"{op}: a sparse teacher needs both teacher_indices and teacher_values")
    for name, tensor in (("teacher_indices", teacher_indices), ("teacher_values", teacher_values)):
        _tensor(op, name, tensor)
        _same_device(target, name, tensor)
    if teacher_indices.shape != teacher_values.shape:
        raise ValueError(
            f"{op}: teacher_indices shape {tuple(teacher_indices.shape)} != teacher_values shape "
            f"{tuple(teacher_values.shape)}"
        )
    if teacher_indices.dim() < 1 or tuple(teacher_indices.shape[:-1]) != target.lead or teacher_indices.shape[-1] < 1:
        raise ValueError(
            f"{op}: teacher_indices must be [..., k] with k >= 1 and leading shape {target.lead} "
            f"({target.name} {(*target.lead, target.vocab)}), got {tuple(teacher_indices.shape)}"
        )
    if teacher_indices.dtype not in INDEX_DTYPES:
        raise ValueError(f"{op}: teacher_indices must be int32 or int64, got {teacher_indices.dtype}")
    if teacher_values.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: teacher_values must be a floating tensor, got {teacher_values.dtype}")
    if opts.divergence != "forward_kl":
        raise ValueError(f"{op}: divergence={opts.divergence!r} needs dense teacher_logits; sparse teachers take 'forward_kl'")


def labels(target: Logits, opts: LossOptions, labels) -> None:
    op = target.op
    if labels is None:
        if opts.hard_weight != 0.0:
            raise ValueError(f"{op}: hard_weight={opts.hard_weight} needs labels, got labels=None")
        return
    _tensor(op, "labels", labels)
    if tuple(labels.shape) != target.lead:
        raise ValueError(
            f"{op}: labels shape {tuple(labels.shape)} != {target.name} leading shape {target.lead} "
            f"({target.name} {(*target.lead, target.vocab)})"
        )
    if labels.dtype not in INDEX_DTYPES:
        raise ValueError(f"{op}: labels must be int64 (or int32), got {labels.dtype}")
    _same_device(target, "labels", labels)


def num_items(op: str, opts: LossOptions, num_items):
    """Returns num_items as given (a number) or as a 0-dim tensor (from any one-element tensor)."""
    if num_items is None:
        return None
    if opts.reduction != "mean":
        raise ValueError(f"{op}: num_items only applies to reduction='mean', got reduction={opts.reduction!r}")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"{op}: num_items must be a number or a one-element tensor, got shape {tuple(num_items.shape)}")
        return num_items.reshape(())
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real) or not (
        math.isfinite(num_items) and num_items > 0
    ):
        raise ValueError(f"{op}: num_items must be a finite number > 0, got {num_items!r}")
    return num_items


# ----------------------------------------------------------------------------------------------
# Several teachers (fused op): teacher_weights, and one tensor per teacher in each teacher argument.
# ----------------------------------------------------------------------------------------------


class Teacher(NamedTuple):
    """One stored teacher's tensors as the caller gave them (None where not given)."""

    logits: torch.Tensor | None  # [..., V]
    indices: torch.Tensor | None  # [..., k]
    values: torch.Tensor | None  # [..., k]
    tail: torch.Tensor | None  # [...]


_TEACHER_ARGUMENTS = ("teacher_logits", "teacher_indices", "teacher_values", "teacher_tail")


def weighted_teachers(
    target: Logits,
    opts: LossOptions,
    teacher_weights,
    teacher_logits,  # [..., V], or one per teacher
    teacher_indices,  # [..., k], or one per teacher
    teacher_values,  # [..., k], or one per teacher
    teacher_tail,  # [...], or one per teacher
    online: bool,
) -> tuple[tuple[float, ...], list[Teacher]]:
    """(weights, teachers) of the fused op, each teacher validated as ``teacher`` does.

    ``teacher_weights=None``: the arguments are one teacher's tensors (weight 1; a list or tuple among
    them is a mistake). Otherwise each given argument is a sequence with one tensor (or None) per weight,
    and messages about teacher j start with ``"<op>: teacher j: "``.
    """
    op = target.op
    given = dict(zip(_TEACHER_ARGUMENTS, (teacher_logits, teacher_indices, teacher_values, teacher_tail)))
    if teacher_weights is None:
        _one_teacher_each(op, given)
        teacher(target, opts, *given.values(), online=online)
        return (1.0,), [Teacher(*given.values())]
    if online:
        raise ValueError(
            f"{op}: teacher_weights combines stored teachers (teacher_logits, or teacher_indices + teacher_values), "
            "not an online teacher; got teacher_hidden/teacher_weight with teacher_weights"
        )
    weights = _teacher_weights(op, teacher_weights)
    columns = [_one_per_teacher(op, name, value, len(weights)) for name, value in given.items()]
    teachers = [Teacher(*tensors) for tensors in zip(*columns)]
    for j, tensors in enumerate(teachers):
        teacher(target._replace(op=f"{op}: teacher {j}"), opts, *tensors)
    return weights, teachers


def _one_teacher_each(op: str, given: dict) -> None:
    for name, value in given.items():
        if isinstance(value, Sequence):
            raise ValueError(
                f"{op}: {name} is a {_type_name(value)}, as for several teachers, but teacher_weights is None; "
                "pass teacher_weights (one weight per teacher) or one tensor"
            )


def _teacher_weights(op: str, teacher_weights) -> tuple[float, ...]:
    """Finite weights >= 0 with a positive sum, used as given (never renormalised)."""
    if not isinstance(teacher_weights, Sequence) or isinstance(teacher_weights, str) or not teacher_weights:
        raise ValueError(
            f"{op}: teacher_weights must be a non-empty list or tuple of numbers (one per teacher), "
            f"got {teacher_weights!r}"
        )
    weights = tuple(_finite(op, f"teacher_weights[{j}]", w) for j, w in enumerate(teacher_weights))
    for j, w in enumerate(weights):
        if w < 0:
            raise ValueError(f"{op}: teacher_weights[{j}] must be >= 0, got {w}")
    if sum(weights) <= 0:
        raise ValueError(f"{op}: teacher_weights must have a positive sum, got {weights}")
    return weights


def _one_per_teacher(op: str, name: str, value, count: int) -> tuple:
    """One entry per teacher: ``value`` itself (a sequence of ``count``), or None for each."""
    if value is None:
        return (None,) * count
    if not isinstance(value, Sequence):
        raise ValueError(
            f"{op}: with teacher_weights, {name} must be a list or tuple with one tensor per teacher, "
            f"got {_type_name(value)}"
        )
    if len(value) != count:
        raise ValueError(f"{op}: {name} holds {len(value)} tensors but teacher_weights holds {count} weights")
    return tuple(value)


# ----------------------------------------------------------------------------------------------
# Values: one combined reduction (one host sync on CUDA), then a precise message.
# ----------------------------------------------------------------------------------------------


def value_checks_enabled() -> bool:
    """Value checks cost one host sync on CUDA; skipped while compiling or with KDFAST_CHECK_VALUES=0."""
    if os.environ.get("KDFAST_CHECK_VALUES", "1") == "0":
        return False
    return not torch.compiler.is_compiling()


def values(target: Logits, labels, teacher_indices, num_items, ignore_index: int) -> None:
    """Labels in [0, V) or ignore_index, indices in [-1, V) and unique per row, num_items > 0 and finite.

    ``teacher_indices``: one [..., k] tensor, None, or one tensor (or None) per teacher (called
    ``teacher_indices[j]`` in messages); every check is one combined reduction.
    """
    vocab, op = target.vocab, target.op
    checks = {}
    if labels is not None and labels.numel():
        checks["labels"] = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    indices = _named_indices(teacher_indices)
    for name, tensor in indices.items():
        checks[name] = (tensor < -1) | (tensor >= vocab)
        if tensor.shape[-1] > 1:
            ordered = tensor.sort(dim=-1).values
            checks[f"{name} duplicates"] = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    if isinstance(num_items, torch.Tensor):
        checks["num_items"] = ~(torch.isfinite(num_items) & (num_items > 0))
    if not checks or not bool(torch.stack([bad.any().to(target.device) for bad in checks.values()]).any()):
        return
    if "labels" in checks and bool(checks["labels"].any()):
        raise ValueError(
            f"{op}: labels must be in [0, {vocab}) or ignore_index={ignore_index}; got values "
            f"{labels[checks['labels']][:5].tolist()} (labels shape {tuple(labels.shape)}, V={vocab})"
        )
    for name, tensor in indices.items():
        _raise_for_bad_indices(op, vocab, name, tensor, checks[name], checks.get(f"{name} duplicates"))
    raise ValueError(f"{op}: num_items must be finite and > 0, got {num_items.item()}")


def _named_indices(teacher_indices) -> dict[str, torch.Tensor]:
    """The non-empty index tensors by their name in messages."""
    if isinstance(teacher_indices, torch.Tensor):
        named = {"teacher_indices": teacher_indices}
    else:
        named = {f"teacher_indices[{j}]": tensor for j, tensor in enumerate(teacher_indices or ())}
    return {name: tensor for name, tensor in named.items() if tensor is not None and tensor.numel()}


def _raise_for_bad_indices(
    op: str,
    vocab: int,
    name: str,
    indices: torch.Tensor,  # [..., k]
    out_of_range: torch.Tensor,  # [..., k] bool
    duplicates: torch.Tensor | None,  # [..., k - 1] bool; None when k == 1
) -> None:
    if bool(out_of_range.any()):
        raise ValueError(
            f"{op}: {name} must be in [0, {vocab}) or -1 for an empty slot; got values "
            f"{indices[out_of_range][:5].tolist()} ({name} shape {tuple(indices.shape)}, V={vocab})"
        )
    if duplicates is not None and bool(duplicates.any()):
        row = duplicates.reshape(-1, indices.shape[-1] - 1).any(-1).nonzero()[0].item()
        raise ValueError(
            f"{op}: {name} must be unique within a row (-1 excepted); row {row} (flattened) holds "
            f"{indices.reshape(-1, indices.shape[-1])[row].tolist()}"
        )
