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
# Relative slack (times the largest oracle magnitude) added to the reference's own error.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}


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


def assert_close_to_oracle(actual, same_dtype_ref, oracle, dtype, what: str) -> None:
    """Kernel error must not exceed the input-dtype reference's own error plus a small atol."""
    actual, same_dtype_ref, oracle = (t.detach().cpu().double() for t in (actual, same_dtype_ref, oracle))
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    kernel_err = (actual - oracle).abs().max().item() if oracle.numel() else 0.0
    ref_err = (same_dtype_ref - oracle).abs().max().item() if oracle.numel() else 0.0
    bound = 2 * ref_err + ATOL[dtype] * max(scale, 1e-6)
    assert kernel_err <= bound, f"{what}: error {kernel_err:.3e} > bound {bound:.3e} (reference's own {ref_err:.3e}, scale {scale:.3e})"
