"""Shared test parameters: backends, devices, tolerances and random loss problems.

Without a GPU, Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET must be set
before triton decorates any kernel, hence here, at collection time.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kdfast  # noqa: E402

KERNEL_BACKENDS = ("cpu", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Per-element tolerance, added to twice the input-dtype reference's own error at that element:
#   RTOL * |oracle|            the output's own rounding (one 16-bit rounding of a gradient entry);
#   ROW_ATOL * row scale       float32 arithmetic error, relative to the largest |oracle| of the
#                              element's row (last dim; a 0-d or 1-d tensor: the element itself);
#   FLOOR                      fp16's subnormal spacing (entries below it cannot be represented).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}
ROW_ATOL = {torch.float32: 2e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}
FLOOR = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-23}


def backend_device(backend: str) -> torch.device:
    """Triton runs on CUDA when there is one, else on CPU tensors under the interpreter."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def require_backend(backend: str) -> None:
    if backend not in kdfast.available_backends():
        pytest.skip(f"backend {backend!r} unavailable here")


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request) -> str:
    require_backend(request.param)
    return request.param


def row_scale(oracle: torch.Tensor) -> torch.Tensor:
    """The largest |entry| of each element's row (last dim), broadcast to the oracle's shape."""
    if oracle.dim() <= 1:
        return oracle.abs()
    return oracle.abs().amax(dim=-1, keepdim=True).expand_as(oracle)


def assert_close_to_oracle(actual, same_dtype_ref, oracle, dtype, what: str, scale=None) -> None:
    """Per element: kernel error <= 2 x the input-dtype reference's own error + RTOL |oracle|
    + ROW_ATOL x scale + FLOOR (see the constants above). ``scale`` (broadcastable to the oracle)
    defaults to ``row_scale(oracle)``; a tensor that is one vector (a bias gradient) passes its max."""
    actual, same_dtype_ref, oracle = (t.detach().cpu().double() for t in (actual, same_dtype_ref, oracle))
    scale = row_scale(oracle) if scale is None else torch.as_tensor(scale, dtype=torch.float64).cpu()
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if not oracle.numel():
        return
    err = (actual - oracle).abs()
    bound = 2 * (same_dtype_ref - oracle).abs() + RTOL[dtype] * oracle.abs() + ROW_ATOL[dtype] * scale + FLOOR[dtype]
    excess = err - bound
    worst = int(excess.argmax())
    if excess.reshape(-1)[worst] > 0:
        at = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), oracle.shape)) if oracle.dim() else ()
        bad = int((excess > 0).sum())
        raise AssertionError(
            f"{what}: {bad} of {oracle.numel()} entries out of tolerance; worst at {at}: got "
            f"{actual.reshape(-1)[worst].item():.6e}, oracle {oracle.reshape(-1)[worst].item():.6e}, error "
            f"{err.reshape(-1)[worst].item():.3e} > bound {bound.reshape(-1)[worst].item():.3e} "
            f"(input-dtype reference {same_dtype_ref.reshape(-1)[worst].item():.6e})"
        )
