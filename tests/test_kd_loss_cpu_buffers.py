"""The cpu backend's speed paths (issue 16) keep their answers: reused gradient buffers are never
handed out while anyone holds them, non-temporal stores of large gradients write what the cached
path writes, and the T = 2 hard softmax (the square of the tempered one) matches float64 per element.
"""
from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import reference

pytestmark = pytest.mark.skipif("cpu" not in kdfast.available_backends(), reason="kdfast._C is not built")

OPTIONS = dict(temperature=2.0, hard_weight=0.5, soft_weight=0.5, backend="cpu")


def _problem(n, vocab, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(n, vocab, generator=gen)).to(dtype)  # [N, V]
    teacher = (2 * torch.randn(n, vocab, generator=gen)).to(dtype)  # [N, V]
    labels = torch.randint(0, vocab, (n,), generator=gen)  # [N]
    return logits, labels, teacher


def _grad(logits, labels, **kwargs):
    z = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(kdfast.kd_loss(z, labels, **{**OPTIONS, **kwargs}), z)
    return grad


def test_a_kept_gradient_is_never_overwritten_and_a_released_one_is_reused():
    logits, labels, teacher = _problem(16, 1000)
    first = _grad(logits, labels, teacher_logits=teacher)
    kept = first.clone()
    second = _grad(logits, labels, teacher_logits=2 * teacher)
    assert second.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept)  # still the first call's gradient
    address = second.data_ptr()
    del second
    third = _grad(logits, labels, teacher_logits=teacher)
    assert third.data_ptr() == address  # the released buffer came back
    torch.testing.assert_close(third, kept, rtol=0, atol=0)


@pytest.mark.parametrize("holder", ["view", "storage"])
def test_a_view_or_the_storage_of_a_gradient_keeps_its_buffer(holder):
    logits, labels, teacher = _problem(16, 1000)
    grad = _grad(logits, labels, teacher_logits=teacher)
    kept = grad.clone()
    handle = grad[3:] if holder == "view" else grad.untyped_storage()
    del grad
    others = [_grad(logits, labels, teacher_logits=-teacher) for _ in range(3)]  # more calls than pool slots
    rebuilt = handle if holder == "view" else torch.empty(0).set_(handle, 0, kept.shape)
    torch.testing.assert_close(rebuilt, kept[3:] if holder == "view" else kept, rtol=0, atol=0)
    assert len(others) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_streamed_large_gradient_equals_the_cached_small_calls(dtype, teacher_kind):
    """Above 32 MiB of gradient the kernel writes with non-temporal stores; an odd vocabulary makes
    every row start off the 16-byte alignment. Calls of 64 rows (below the threshold) are the
    cached-store path; both must give the same bits (reduction "sum": the same factor in both)."""
    vocab = 40961
    rows = (2**25 // (vocab * torch.empty((), dtype=dtype).element_size())) + 3
    logits, labels, teacher = _problem(rows, vocab, dtype)
    if teacher_kind == "dense":
        kwargs = {"teacher_logits": teacher}
    else:
        values, indices = teacher.topk(16, -1)
        kwargs = {"teacher_indices": indices, "teacher_values": values, "teacher_kind": "logits"}
    whole = _grad(logits, labels, **kwargs, reduction="sum")
    for start in range(0, rows, 64):
        part = {k: (v[start:start + 64] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        piece = _grad(logits[start:start + 64], labels[start:start + 64], **part, reduction="sum")
        assert torch.equal(whole[start:start + 64], piece), start


@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_temperature_two_hard_and_soft_gradient_per_element(teacher_kind):
    logits, labels, teacher = _problem(8, 5003, seed=1)
    if teacher_kind == "dense":
        kwargs = {"teacher_logits": teacher}
    else:
        values, indices = teacher.topk(64, -1)
        kwargs = {"teacher_indices": indices, "teacher_values": values, "teacher_kind": "logits"}
    grad = _grad(logits, labels, **kwargs).double()
    z64 = logits.double().requires_grad_(True)
    kwargs64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
    options = {k: v for k, v in OPTIONS.items() if k != "backend"}
    (expected,) = torch.autograd.grad(reference.kd_loss(z64, labels, **kwargs64, **options), z64)
    softmax = torch.softmax(z64.detach(), -1) + torch.softmax(z64.detach() / 2, -1)
    bound = 1e-4 * expected.abs() + 1e-6 * softmax / logits.shape[0]  # per entry: its own scale
    assert bool(((grad - expected).abs() <= bound).all()), ((grad - expected).abs() / bound).max()
