"""CPU-backend specifics of kd_loss: threads, the OpenMP runtime, the GIL, in-place aliasing, kernel guards.

Numerical agreement with the float64 reference lives in tests/test_kd_loss.py (backend "cpu").
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import kdfast

pytestmark = pytest.mark.skipif("cpu" not in kdfast.available_backends(), reason="kdfast._C is not built")


def _problem(n=6, vocab=3001, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(n, vocab, generator=gen)).to(dtype)  # [N, V]
    teacher = (3 * torch.randn(n, vocab, generator=gen)).to(dtype)  # [N, V]
    labels = torch.randint(0, vocab, (n,), generator=gen)  # [N]
    labels[1] = -100
    indices = torch.stack([torch.randperm(vocab, generator=gen)[:16] for _ in range(n)])  # [N, 16]
    values = torch.log_softmax(torch.randn(n, 16, generator=gen), -1).to(dtype)  # [N, 16]
    return student, teacher, labels, indices, values


def _loss_and_grad(student, labels, grad_output=None, **options):
    logits = student.clone().requires_grad_(True)
    loss = kdfast.kd_loss(logits, labels, backend="cpu", **options)
    (grad,) = torch.autograd.grad(loss, logits, grad_output)
    return loss.detach(), grad


TEACHERS = {
    "dense-forward_kl": lambda t, i, v: {"teacher_logits": t},
    "dense-jsd": lambda t, i, v: {"teacher_logits": t, "divergence": "jsd", "beta": 0.3},
    "sparse-tail": lambda t, i, v: {"teacher_indices": i, "teacher_values": v, "teacher_kind": "logprobs", "tail": True,
                                 "allow_tail_temperature": True},
}


@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_thread_count_does_not_change_the_result(teacher):
    """Rows are independent and each row runs on one thread, so the gradient is bitwise identical."""
    student, t, labels, i, v = _problem(n=9)
    options = dict(TEACHERS[teacher](t, i, v), temperature=2.0, hard_weight=0.5, reduction="sum")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _loss_and_grad(student, labels, **options)
        torch.set_num_threads(2)
        two = _loss_and_grad(student, labels, **options)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[1], two[1])
    torch.testing.assert_close(one[0], two[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_inplace_gradient_is_the_logits_buffer_and_matches(teacher, dtype):
    student, t, labels, i, v = _problem(dtype=dtype)
    options = dict(TEACHERS[teacher](t, i, v), temperature=0.7, hard_weight=0.4)
    expected_loss, expected_grad = _loss_and_grad(student, labels, **options)

    logits = student.clone().requires_grad_(True) * 1  # a non-leaf buffer, as a model's output
    address = logits.data_ptr()
    loss = kdfast.kd_loss(logits, labels, backend="cpu", inplace=True, **options)
    (grad,) = torch.autograd.grad(loss, logits)
    if dtype != torch.float16:  # float16 applies 1/divisor in backward, into a new buffer
        assert grad.data_ptr() == address  # grad_output 1.0: the logits buffer itself, no new [N, V] buffer
    assert torch.equal(grad, expected_grad)  # reading z and writing g in one buffer changes nothing
    assert torch.equal(loss, expected_loss)


def test_backward_scales_a_copy_per_row_for_reduction_none():
    student, t, labels, _, _ = _problem(dtype=torch.bfloat16)
    weights = torch.linspace(0.5, 2.0, student.shape[0])  # [N]
    _, unscaled = _loss_and_grad(student, labels, teacher_logits=t, reduction="none", grad_output=torch.ones(6))
    _, scaled = _loss_and_grad(student, labels, teacher_logits=t, reduction="none", grad_output=weights)
    expected = (unscaled.float() * weights[:, None]).to(torch.bfloat16)  # one rounding of an exact bf16 product
    assert torch.equal(scaled, expected)


def test_kernel_rejects_out_of_range_labels_and_indices_without_python_checks(monkeypatch):
    """With KDFAST_CHECK_VALUES=0 the Python range checks are skipped; the kernel still refuses to read out of bounds."""
    monkeypatch.setenv("KDFAST_CHECK_VALUES", "0")
    student, t, labels, i, v = _problem()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3001\)"):
        kdfast.kd_loss(student, labels.clone().fill_(5000), teacher_logits=t, backend="cpu")
    bad = i.clone()
    bad[3, 2] = -7
    with pytest.raises(ValueError, match=r"teacher_indices must be in \[0, 3001\)"):
        kdfast.kd_loss(student, labels, teacher_indices=bad, teacher_values=v, teacher_kind="logprobs", backend="cpu")


def test_gil_is_released_while_the_kernel_runs():
    """A Python thread keeps running during the middle of a kernel call only if the call dropped the GIL."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(256, 128256, generator=gen)  # [N, V]
    t = torch.randn(256, 128256, generator=gen)  # [N, V]
    labels = torch.randint(0, 128256, (256,), generator=gen)  # [N]
    ticks, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        start = time.perf_counter()
        with torch.no_grad():
            kdfast.kd_loss(student, labels, teacher_logits=t, backend="cpu")
        end = time.perf_counter()
    finally:
        stop.set()
        ticker.join()
    # Without the release the ticker could only run before the call starts or after it returns.
    middle = [x for x in ticks if start + 0.25 * (end - start) < x < start + 0.75 * (end - start)]
    assert end - start > 0.02, "problem too small to tell"
    assert middle, f"no Python progress during the {end - start:.3f}s kernel call"


ALTERNATE = textwrap.dedent(
    """
    import os, torch, kdfast
    torch.set_num_threads(2)
    count = lambda: len(os.listdir("/proc/self/task"))
    a = torch.randn(384, 384)
    (a @ a).sum()
    after_torch = count()
    z = torch.randn(32, 8000, requires_grad=True)
    t = torch.randn(32, 8000)
    most = 0
    for _ in range(20):
        (a @ a).sum()
        torch.autograd.grad(kdfast.kd_loss(z, teacher_logits=t, backend="cpu"), z)
        most = max(most, count())
    print(after_torch, most)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_torch_and_kdfast_share_one_openmp_thread_pool():
    """The extension links libgomp.so.1, which resolves to the copy torch loaded (same soname, and torch
    loads it RTLD_GLOBAL), so kdfast's parallel regions reuse torch's OpenMP workers: alternating the two
    adds no thread (a second pool would, and two spinning pools on 2 cores would oversubscribe them).
    A runtime clash would show up as a hang, hence the timeout."""
    result = subprocess.run([sys.executable, "-c", ALTERNATE], capture_output=True, text=True, timeout=120,
                            check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    after_torch, most = map(int, result.stdout.split())
    assert most == after_torch, f"kdfast added OpenMP threads: {after_torch} after torch, {most} with kdfast"


def test_isa_is_reported():
    from kdfast import _backend

    assert _backend.cpu_extension().isa() in ("avx512", "avx2", "baseline")
