"""CPU backend of ``kd_loss``: tensors -> raw buffers -> ``kdfast._C`` (csrc/kd_loss.cpp) -> autograd.Function.

Math (per active row; docs/loss.md has the contract, csrc/kd_loss.cpp the derivations):
    q = softmax(z / T), CE = logsumexp(z) - z_y, loss_r = hard_weight * CE + s * D,  s = soft_weight * T^2
    dCE/dz = softmax(z) - onehot(y)
    forward KL:  dD/dz = (q - p) / T                 (sparse: (q * sum_I p - p 1_I) / T)
    reverse KL:  dD/dz = q ((log q - log p) - D) / T
    JSD(beta):   dD/dz = q (g - sum q g) / T,  g = (1 - beta) log(q / M),  M = beta p + (1 - beta) q
    skew KL(alpha), D = KL(p || M), M = alpha p + (1 - alpha) q:
                 dD/dz = (q S - p w) / T,  w = (1 - alpha) q / M,  S = sum p w
    skew reverse KL(alpha), D = KL(q || M), M = alpha q + (1 - alpha) p:
                 dD/dz = q ((log(q / M) + v) - (D + V)) / T,  v = (1 - alpha) p / M,  V = sum q v
    tail bucket: dD/dz = ((P + R q_rest) q - p) / T on slots, q (P - R (1 - q_rest)) / T elsewhere,
                 R = p_rest / q_rest; p_rest = exp(teacher_tail) when given, else max(1 - P, 0);
                 q_rest (the student's mass outside the slots) is summed directly, never 1 - Q, and
                 floored at FLT_MIN (smallest normal float32; R = 0 below it), as on Triton.

The kernel computes the loss and the gradient (already scaled by the reduction: 1/divisor for "mean")
in one call, so backward only multiplies by grad_output: not at all when it is the scalar 1.0 (the
stored gradient is returned as is), else in C++ into a new buffer, per row for ``reduction="none"``
(the stored gradient keeps its value, so a 16-bit gradient is rounded a second time there).
float16 is the exception: its 5-bit exponent cannot hold the gradient of a mean over many tokens
(1/16384 of entries of 1e-5 underflows, and loss scaling in backward comes too late), so under
autograd the kernel stores the float16 gradient of the *sum* and backward applies
grad_output / divisor in float32, rounding once (into a new buffer unless that factor is 1). bfloat16
has float32's range and keeps the one-rounding fast path. Without autograd recording (no_grad, as
kdfast/fused_linear.py calls it) the kernel folds 1/divisor in for every dtype, so with
``opts.inplace`` the logits hold d loss / d logits for grad_output = 1.
Gradient buffers ([N, V], from forward, and the scaled one of backward) come from ``_BufferPool``:
a buffer nobody holds any more is handed out again instead of a fresh allocation, which the OS
page-faults and zeroes on first write (that cost about as much as the kernel: see the class). The kernel
writes gradients above 32 MiB with non-temporal stores. ``release_buffers()`` frees the pool.
16-bit inputs are handed over as 16-bit buffers and widened in C++; strided, expanded or sliced
inputs are copied contiguous first. ``opts.compute_grad=False`` writes no gradient. The kernel runs
with ``torch.get_num_threads()`` OpenMP threads and without the GIL.

``opts.inplace`` writes the gradient into the logits buffer and bumps its version counter, as any
in-place op does: an op that saved those logits for its own backward (``tanh``, ``softmax``) then
raises in backward instead of using the overwritten values. Backward returns the buffer itself only
when it is not (a view of) a leaf that requires grad; a leaf gets a copy, so its .grad never
aliases its data.

Bad rows follow ``kdfast._contract``: out-of-range labels / indices raise ValueError before anything
is written; duplicate indices and non-finite teacher values give NaN rows with a zero gradient.

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

import sys
import threading
from dataclasses import replace

import torch

from kdfast import _backend
from kdfast._contract import LossOptions, effective_divergence

__all__ = ["kd_loss", "release_buffers"]


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


def _holders(tensor: torch.Tensor) -> tuple[int, int]:
    """(references to the storage from tensors, references to its Python storage object): a
    storage object held on its own does not count in the first."""
    storage = tensor.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)


class _BufferPool:
    """A few reusable [N, V] output buffers (the gradient of forward, the scaled gradient of backward).

    A fresh [N, V] buffer is page-faulted and zeroed by the OS on its first write, on every call: at
    N=1024, V=128256 float32 top-64 (525 MB) that added 0.11 s to the kernel's 0.12 s on one thread
    (measured on a 2-core KVM guest, transparent huge pages requested). A buffer here is handed out
    again only when nothing outside the pool holds its storage (no tensor, view or storage object:
    both reference counts are back to what they were when the pool alone held it), so a gradient
    the caller keeps is never overwritten; autograd stealing it as a leaf's .grad holds it too. A
    buffer is reused for a request of at least half its size. At most `slots` buffers are kept
    (beyond that, plain allocations); they hold their memory until ``release_buffers()``.
    """

    def __init__(self, slots: int = 2):
        self._lock = threading.Lock()
        self._slots = slots
        self._buffers: list[tuple[torch.Tensor, tuple[int, int]]] = []  # (uint8 [bytes] buffer, holders when idle)

    def empty_like(self, like: torch.Tensor) -> torch.Tensor:  # [N, V] like `like`, uninitialized
        nbytes = like.numel() * like.element_size()
        if nbytes == 0:
            return torch.empty_like(like)
        with self._lock:
            idle = [i for i, (buf, count) in enumerate(self._buffers) if _holders(buf) == count]
            fits = [i for i in idle if nbytes <= self._buffers[i][0].numel() <= 2 * nbytes]
            if fits:
                buf = self._buffers[fits[0]][0]
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8)  # [bytes]
                entry = (buf, _holders(buf))
                if idle:
                    self._buffers[idle[0]] = entry  # an idle buffer of the wrong size makes room
                elif len(self._buffers) < self._slots:
                    self._buffers.append(entry)
            return torch.empty(0, dtype=like.dtype).set_(buf.untyped_storage(), 0, like.shape)

    def release(self) -> None:
        with self._lock:
            self._buffers.clear()


_BUFFERS = _BufferPool()


def release_buffers() -> None:
    """Drops the cached [N, V] gradient buffers (their memory returns once no gradient uses it)."""
    _BUFFERS.release()


# ----------------------------------------------------------------------------------------------
# Launcher: check, allocate, launch.
# ----------------------------------------------------------------------------------------------


def _cpu(name: str, tensor: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The tensor as a contiguous CPU buffer (a copy if it is strided, expanded or sliced)."""
    if tensor is None:
        return None
    if tensor.device.type != "cpu":
        raise ValueError(f"kd_loss(cpu): {name} must be a CPU tensor, got {tensor.device}")
    return tensor.to(dtype or tensor.dtype).contiguous()


def _launch(
    logits: torch.Tensor,  # [N, V] fp32/bf16/fp16
    labels: torch.Tensor | None,  # [N] int64
    teacher_logits: torch.Tensor | None,  # [N, V]
    teacher_indices: torch.Tensor | None,  # [N, k] int32/int64
    teacher_values: torch.Tensor | None,  # [N, k]
    teacher_tail: torch.Tensor | None,  # [N] float32
    divisor: torch.Tensor | None,  # 0-dim float32
    opts: LossOptions,
    fold_divisor: bool = True,
):
    """Runs the kernel; returns (loss, ce_rows, div_rows, grad or None). The gradient is for
    grad_output = 1, with the "mean" factor 1/divisor folded in unless fold_divisor is False."""
    ext = _ext()
    rows, vocab = logits.shape
    if opts.inplace and opts.compute_grad and not logits.is_contiguous():
        raise ValueError(f"kd_loss(cpu): inplace=True needs contiguous logits, got strides {logits.stride()}")
    logits = _cpu("logits", logits)
    labels = _cpu("labels", labels, torch.int64)  # [N]
    teacher_logits = _cpu("teacher_logits", teacher_logits)  # [N, V]
    teacher_indices = _cpu("teacher_indices", teacher_indices)  # [N, k]
    teacher_values = _cpu("teacher_values", teacher_values)  # [N, k]
    teacher_tail = _cpu("teacher_tail", teacher_tail, torch.float32)  # [N]
    divergence = effective_divergence(opts.divergence, opts.beta, opts.alpha)
    # 1 / divisor, with IEEE semantics for a zero divisor
    mean_scale = float(torch.reciprocal(divisor.double())) if opts.reduction == "mean" else 1.0

    if not opts.compute_grad:
        grad = None
    elif opts.inplace:
        grad = logits  # [N, V] the logits are overwritten by their gradient
    else:
        grad = _BUFFERS.empty_like(logits)  # [N, V]
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
        teacher_values=_address(teacher_values), values_dtype=_dtype_code(teacher_values),
        teacher_tail=_address(teacher_tail), k=k,
        teacher_kind=ext.TEACHER_KIND_CODES[opts.teacher_kind], tail=opts.tail,
        divergence=ext.DIVERGENCE_CODES[divergence], beta=opts.beta, alpha=opts.alpha,
        temperature=opts.temperature, hard_weight=opts.hard_weight, soft_scale=opts.soft_scale,
        grad_scale=mean_scale if fold_divisor else 1.0,
        grad=_address(grad),
        loss_rows=_address(loss_rows), ce_rows=_address(ce_rows), div_rows=_address(div_rows),
        num_threads=torch.get_num_threads(),
    )
    if grad is not None and grad is logits and not logits.is_inference():
        torch.autograd.graph.increment_version(logits)  # as any in-place op: stale saved copies raise
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
    scale: float,
    copy: bool,
) -> torch.Tensor:  # [N, V]
    """grad * grad_output * scale, in fp32 and rounded once, into another buffer: the stored gradient
    (the logits themselves with inplace=True) keeps its value, so backward can run twice. The stored
    gradient itself is returned when the factor is exactly 1 and copy is False."""
    if grad_output.dim() == 0:
        scale, row_scale = float(grad_output.item()) * scale, None
        if scale == 1.0 and not copy:
            return grad
    else:
        row_scale = grad_output.to(torch.float32).contiguous()  # [N]
    out = _BUFFERS.empty_like(grad)  # [N, V]
    _ext().kd_loss_scale_grad(
        out=out.data_ptr(), grad=grad.data_ptr(), dtype=_dtype_code(grad), rows=grad.shape[0],
        vocab=grad.shape[1], row_scale=_address(row_scale), scale=scale, num_threads=torch.get_num_threads(),
    )
    return out


def _aliases_leaf(tensor: torch.Tensor, max_depth: int = 32) -> bool:
    """True when the tensor shares storage with a leaf that requires grad, that is, when it is such a
    leaf or a view of one (its .grad must not be the buffer). Views have one input, so the leaf is at
    the end of the chain of first inputs (a few nodes long: the walk stops after max_depth); a leaf
    reached through any other op has its own storage."""
    node = tensor.grad_fn
    if node is None:
        return tensor.requires_grad
    for _ in range(max_depth):
        if hasattr(node, "variable"):  # AccumulateGrad: the leaf
            return node.variable.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        node = node.next_functions[0][0] if node.next_functions else None
        if node is None:
            return False
    return False


# ----------------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------------


class _KDLossFunction(torch.autograd.Function):
    """Forward runs the kernel and keeps its gradient; backward scales it by grad_output (and, for
    float16, by 1/divisor: the kernel stores the float16 gradient without it, see the module docstring)."""

    @staticmethod
    def forward(ctx, logits, labels, teacher_logits, teacher_indices, teacher_values, teacher_tail, divisor, opts):
        ctx.copy = opts.inplace and _aliases_leaf(logits)  # before the write, which rebuilds a view's grad_fn
        fold_divisor = logits.dtype != torch.float16
        loss, ce_rows, div_rows, grad = _launch(logits, labels, teacher_logits, teacher_indices, teacher_values,
                                                teacher_tail, divisor, opts, fold_divisor)
        ctx.scale = 1.0 if fold_divisor or opts.reduction != "mean" else float(torch.reciprocal(divisor.double()))
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_rows, div_rows)
        return loss, ce_rows, div_rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_div):
        (grad,) = ctx.saved_tensors
        return _scaled_grad(grad, grad_loss, ctx.scale, ctx.copy), None, None, None, None, None, None, None


def kd_loss(
    logits: torch.Tensor,  # [N, V] fp32/bf16/fp16; overwritten by the gradient if opts.inplace
    labels: torch.Tensor | None,  # [N] int64
    teacher_logits: torch.Tensor | None,  # [N, V]
    teacher_indices: torch.Tensor | None,  # [N, k] int32/int64
    teacher_values: torch.Tensor | None,  # [N, k]
    teacher_tail: torch.Tensor | None,  # [N] float32 log p_rest, logprobs + tail only
    divisor: torch.Tensor | None,  # 0-dim float32, reduction="mean" only
    opts: LossOptions,
):
    """Backend entry point (see ``kdfast._contract``): returns (loss, ce_rows [N], div_rows [N]).

    Without autograd recording (no_grad, or logits that do not require grad) the kernel runs directly,
    and with opts.compute_grad and opts.inplace the logits hold d loss / d logits for grad_output = 1,
    1/divisor included, in every dtype (kdfast/fused_linear.py relies on it).
    """
    if not (opts.compute_grad and torch.is_grad_enabled() and logits.requires_grad):
        direct = opts if opts.inplace else replace(opts, compute_grad=False)  # nobody would read a new buffer
        loss, ce_rows, div_rows, _ = _launch(logits, labels, teacher_logits, teacher_indices, teacher_values,
                                             teacher_tail, divisor, direct)
        return loss, ce_rows, div_rows
    return _KDLossFunction.apply(logits, labels, teacher_logits, teacher_indices, teacher_values, teacher_tail,
                                 divisor, opts)
