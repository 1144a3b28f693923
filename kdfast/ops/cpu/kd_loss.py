"""CPU backend of ``kd_loss``: tensors -> raw buffers -> ``kdfast._C`` (csrc/kd_loss.cpp) -> autograd.Function.

Math (per active row; design.md has the contract, csrc/kd_loss.cpp the derivations):
    q = softmax(z / T), CE = logsumexp(z) - z_y, loss_r = hard_weight * CE + s * D,  s = soft_weight * T^2
    dCE/dz = softmax(z) - onehot(y)
    forward KL:  dD/dz = (q - p) / T                 (sparse: (q * sum_I p - p 1_I) / T)
    reverse KL:  dD/dz = q ((log q - log p) - D) / T
    JSD(beta):   dD/dz = q (g - sum q g) / T,  g = (1 - beta) log(q / M),  M = beta p + (1 - beta) q
    tail bucket: dD/dz = (q - p) / T on slots, q (1 - p_rest / q_rest) / T elsewhere

The kernel computes the loss and the gradient (already scaled by the reduction: 1/divisor for "mean")
in one call, so backward only multiplies by grad_output: not at all when it is the scalar 1.0 (the
stored gradient is returned as is), else in C++ into a new buffer, per row for ``reduction="none"``
(the stored gradient keeps its value, so a 16-bit gradient is rounded a second time there).
16-bit inputs are handed over as 16-bit buffers and widened in C++. ``opts.inplace`` writes the
gradient into the logits buffer; ``opts.compute_grad=False`` writes no gradient. The kernel runs
with ``torch.get_num_threads()`` OpenMP threads and without the GIL.

OpenMP runtimes: the extension links ``libgomp.so.1``. The torch wheel ships its own copy under that
same soname (``torch/lib/libgomp.so.1``, loaded RTLD_GLOBAL through ``libtorch_global_deps.so``) and
torch is always imported before ``kdfast._C`` (``kdfast._backend`` imports it first), so the loader
resolves our dependency to the runtime already in the process, and even a second copy would lose the
symbol lookup to the global one. One runtime, one thread pool: torch's OpenMP workers run kdfast's
rows, nothing spins against anything (tests/test_kd_loss_cpu.py checks that alternating torch and
kdfast adds no thread). Measured for contrast with a build forced onto a second libgomp
(RTLD_DEEPBIND): 4 threads instead of 3, and alternating the two ops cost about twice the CPU time of
running them separately.
"""
from __future__ import annotations

import torch

from kdfast import _backend
from kdfast._contract import LossOptions

__all__ = ["kd_loss"]


def _ext():
    ext = _backend.cpu_extension()
    if ext is None:
        raise RuntimeError(_backend.unavailable_reason("cpu"))
    return ext


def _dtype_code(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    return _ext().DTYPE_CODES[str(tensor.dtype).removeprefix("torch.")]


def _address(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


# ----------------------------------------------------------------------------------------------
# Launcher: check, allocate, launch.
# ----------------------------------------------------------------------------------------------


def _launch(
    logits: torch.Tensor,  # [N, V] fp32/bf16/fp16
    labels: torch.Tensor | None,  # [N] int64
    teacher_logits: torch.Tensor | None,  # [N, V]
    teacher_indices: torch.Tensor | None,  # [N, k] int32/int64
    teacher_values: torch.Tensor | None,  # [N, k]
    divisor: torch.Tensor | None,  # 0-dim float32
    opts: LossOptions,
):
    """Runs the kernel; returns (loss, ce_rows, div_rows, grad or None)."""
    ext = _ext()
    rows, vocab = logits.shape
    for name, tensor in (("logits", logits), ("teacher_logits", teacher_logits),
                         ("teacher_indices", teacher_indices), ("teacher_values", teacher_values)):
        if tensor is not None and (tensor.device.type != "cpu" or not tensor.is_contiguous()):
            raise ValueError(f"kd_loss(cpu): {name} must be a contiguous CPU tensor, got {tensor.device} "
                             f"contiguous={tensor.is_contiguous()} shape {tuple(tensor.shape)}")
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()  # [N]
    divergence = opts.divergence
    if divergence == "jsd" and opts.beta in (0.0, 1.0):
        divergence = "forward_kl" if opts.beta == 0.0 else "reverse_kl"
    # 1 / divisor, with IEEE semantics for a zero divisor (a num_items tensor is not value-checked)
    grad_scale = float(torch.reciprocal(divisor.double())) if opts.reduction == "mean" else 1.0

    if not opts.compute_grad:
        grad = None
    elif opts.inplace:
        grad = logits  # [N, V] the logits are overwritten by their gradient
    else:
        grad = torch.empty_like(logits)  # [N, V]
    loss_rows = torch.empty(rows, dtype=torch.float32)  # [N]
    ce_rows = torch.empty(rows, dtype=torch.float32)  # [N]
    div_rows = torch.empty(rows, dtype=torch.float32)  # [N]
    k = 0 if teacher_indices is None else teacher_indices.shape[1]

    total = ext.kd_loss_forward(
        rows=rows, vocab=vocab,
        logits=_address(logits), logits_dtype=_dtype_code(logits),
        labels=_address(labels), ignore_index=opts.ignore_index,
        teacher_logits=_address(teacher_logits), teacher_dtype=_dtype_code(teacher_logits),
        teacher_indices=_address(teacher_indices), index_dtype=_dtype_code(teacher_indices),
        teacher_values=_address(teacher_values), values_dtype=_dtype_code(teacher_values), k=k,
        teacher_kind=ext.TEACHER_KIND_CODES[opts.teacher_kind], tail=opts.tail,
        divergence=ext.DIVERGENCE_CODES[divergence], beta=opts.beta,
        temperature=opts.temperature, hard_weight=opts.hard_weight, soft_scale=opts.soft_scale,
        grad_scale=grad_scale,
        grad=_address(grad),
        loss_rows=_address(loss_rows), ce_rows=_address(ce_rows), div_rows=_address(div_rows),
        num_threads=torch.get_num_threads(),
    )
    if opts.reduction == "none":
        loss = loss_rows
    elif opts.reduction == "sum":
        loss = torch.tensor(total, dtype=torch.float32)
    else:
        loss = (torch.tensor(total, dtype=torch.float64) / divisor.double()).float()
    return loss, ce_rows, div_rows, grad


def _scaled_grad(
    grad: torch.Tensor,  # [N, V]
    grad_output: torch.Tensor,  # 0-dim or [N]
) -> torch.Tensor:  # [N, V]
    """grad * grad_output, in fp32 and rounded once, into a new buffer: the stored gradient (the
    logits themselves with inplace=True) keeps its unscaled value, so backward can run twice."""
    if grad_output.dim() == 0:
        scale, row_scale = float(grad_output.item()), None
        if scale == 1.0:
            return grad
    else:
        scale, row_scale = 1.0, grad_output.to(torch.float32).contiguous()  # [N]
    out = torch.empty_like(grad)  # [N, V]
    _ext().kd_loss_scale_grad(
        out=out.data_ptr(), grad=grad.data_ptr(), dtype=_dtype_code(grad), rows=grad.shape[0],
        vocab=grad.shape[1], row_scale=_address(row_scale), scale=scale, num_threads=torch.get_num_threads(),
    )
    return out


# ----------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------


class _KDLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, teacher_logits, teacher_indices, teacher_values, divisor, opts):
        loss, ce_rows, div_rows, grad = _launch(logits, labels, teacher_logits, teacher_indices, teacher_values,
                                                divisor, opts)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_rows, div_rows)
        return loss, ce_rows, div_rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_div):
        (grad,) = ctx.saved_tensors
        return _scaled_grad(grad, grad_loss), None, None, None, None, None, None


def kd_loss(
    logits: torch.Tensor,  # [N, V] fp32/bf16/fp16, contiguous
    labels: torch.Tensor | None,  # [N] int64
    teacher_logits: torch.Tensor | None,  # [N, V]
    teacher_indices: torch.Tensor | None,  # [N, k] int32/int64
    teacher_values: torch.Tensor | None,  # [N, k]
    divisor: torch.Tensor | None,  # 0-dim float32, reduction="mean" only
    opts: LossOptions,
):
    """Backend entry point (see ``kdfast._contract``): returns (loss, ce_rows [N], div_rows [N])."""
    if not opts.compute_grad:
        loss, ce_rows, div_rows, _ = _launch(logits, labels, teacher_logits, teacher_indices, teacher_values,
                                             divisor, opts)
        return loss, ce_rows, div_rows
    return _KDLossFunction.apply(logits, labels, teacher_logits, teacher_indices, teacher_values, divisor, opts)
