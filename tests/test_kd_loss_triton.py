"""Triton-specific tests of kd_loss: rows spanning many vocabulary blocks, the sparse slot fix-up,
inplace, backward scaling, 64-bit row offsets, torch.compile, and (on a GPU) host-sync freedom and
CUDA-graph capture. The backend x dtype x shape grid lives in test_kd_loss.py.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (set by conftest.py), so shapes
stay small; the ``small_blocks`` fixture shrinks BLOCK_V so that a 1000-wide row spans 8 blocks.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import kdfast
from kdfast import reference
from tests.conftest import assert_close_to_oracle, backend_device, require_backend

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy under the interpreter

triton_kd = pytest.importorskip("kdfast.ops.triton.kd_loss")
VOCAB = 1000
SMALL_BLOCK = 128

CASES = {
    "forward_kl": dict(divergence="forward_kl"),
    "reverse_kl": dict(divergence="reverse_kl"),
    "jsd": dict(divergence="jsd", beta=0.3),
    "logits": dict(teacher_kind="logits"),
    "logprobs": dict(teacher_kind="logprobs"),
    "logprobs-tail": dict(teacher_kind="logprobs", tail=True),
    "probs": dict(teacher_kind="probs"),
}


@pytest.fixture(autouse=True)
def _triton_available():
    require_backend("triton")


@pytest.fixture
def small_blocks(monkeypatch):
    """Every shape class at BLOCK_V = SMALL_BLOCK (compiled on a GPU too, not only the interpreter)."""
    monkeypatch.setattr(triton_kd, "_INTERPRET_BLOCK_V", SMALL_BLOCK)
    for kind, params in list(triton_kd._LAUNCH.items()):
        monkeypatch.setitem(triton_kd._LAUNCH, kind, dataclasses.replace(params, block_v=SMALL_BLOCK))


@pytest.fixture
def device():
    return backend_device("triton")


def make_problem(case: str, n: int = 5, vocab: int = VOCAB, k: int = 12, seed: int = 0):
    """float64 student, labels (row 3 ignored, row 0's label is one of its slots), teacher arguments.

    Sparse slots are scattered over the whole row (so over every block); row 1 is half empty and row 2
    has no slot at all. Dense teachers have -inf over the first two blocks of row 0.
    """
    gen = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    teacher = 0.6 * student + 2 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[3] = -100
    options = CASES[case]
    if "divergence" in options:
        if case != "reverse_kl":  # -inf teacher entries make reverse KL infinite
            teacher[0, : 2 * SMALL_BLOCK] = -math.inf
        return student, labels, dict(teacher_logits=teacher, **options)
    indices = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    indices[1, k // 2 :] = -1
    indices[2] = -1
    labels[0] = indices[0, 2]
    log_p = torch.log_softmax(teacher, -1).gather(1, indices.clamp(min=0))
    values = {"logits": teacher.gather(1, indices.clamp(min=0)), "logprobs": log_p, "probs": None}[options["teacher_kind"]]
    if values is None:
        values = torch.where(indices >= 0, torch.rand(n, k, generator=gen, dtype=torch.float64) + 0.1, 0)
        values = values / values.sum(-1, keepdim=True).clamp(min=1e-30)
    return student, labels, dict(teacher_indices=indices.int(), teacher_values=values, **options)


def to(teacher: dict, dtype, device) -> dict:
    """The teacher's tensors on ``device``, floating ones in ``dtype`` (None: unchanged)."""
    def cast(value):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)

    return {key: cast(value) if isinstance(value, torch.Tensor) else value for key, value in teacher.items()}


def loss_and_grad(fn, logits, labels, teacher, grad_output, **options):
    logits = logits.detach().clone().requires_grad_(True)
    loss = fn(logits, labels, **teacher, **options)
    loss.backward(grad_output.to(loss.device, loss.dtype).reshape(loss.shape))
    return loss.detach(), logits.grad


def triton_loss_and_grad(student, labels, teacher, grad_output, dtype=torch.float32, **options):
    """loss_and_grad through kdfast.kd_loss(backend="triton") on the Triton device, inputs in ``dtype``."""
    device = backend_device("triton")
    if teacher.get("tail") and options.get("temperature", 1.0) != 1.0:
        options = dict(options, allow_tail_temperature=True)
    return loss_and_grad(kdfast.kd_loss, student.to(device, dtype), labels.to(device), to(teacher, dtype, device),
                         grad_output, backend="triton", **options)


# --------------------------------------------------------------------------------------------
# Rows longer than one block, against the float64 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_rows_spanning_many_blocks_match_the_oracle(small_blocks, case, reduction):
    student, labels, teacher = make_problem(case)
    grad_output = torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0]) if reduction == "none" else torch.tensor(1.0)
    options = dict(temperature=1.7, hard_weight=0.4, soft_weight=0.9, reduction=reduction)
    oracle = loss_and_grad(reference.kd_loss, student, labels, teacher, grad_output.double(), **options)
    same_dtype = loss_and_grad(reference.kd_loss, student.float(), labels, to(teacher, torch.float32, None), grad_output,
                               **options)
    actual = triton_loss_and_grad(student, labels, teacher, grad_output, **options)
    assert_close_to_oracle(actual[0], same_dtype[0], oracle[0], torch.float32, "loss")
    assert_close_to_oracle(actual[1], same_dtype[1], oracle[1], torch.float32, "grad")
    assert float(actual[1][3].abs().max()) == 0.0  # the ignored row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["jsd", "logprobs-tail"])
def test_half_precision_rows_spanning_many_blocks(small_blocks, case, dtype):
    student, labels, teacher = make_problem(case)
    student = student.to(dtype)  # the oracle sees the same rounded inputs
    teacher = to(teacher, dtype, None)
    options = dict(temperature=0.8, hard_weight=0.3)
    one = torch.tensor(1.0)
    oracle = loss_and_grad(reference.kd_loss, student.double(), labels, to(teacher, torch.float64, None), one, **options)
    same_dtype = loss_and_grad(reference.kd_loss, student, labels, teacher, one, **options)
    actual = triton_loss_and_grad(student, labels, teacher, one, dtype, **options)
    assert actual[1].dtype == dtype
    assert_close_to_oracle(actual[0], same_dtype[0], oracle[0], dtype, "loss")
    assert_close_to_oracle(actual[1], same_dtype[1], oracle[1], dtype, "grad")


@pytest.mark.parametrize("temperature", [0.05, 100.0])
@pytest.mark.parametrize("case", ["forward_kl", "reverse_kl", "jsd", "logprobs-tail"])
def test_extreme_logits_over_many_blocks_stay_finite(small_blocks, case, temperature):
    student, labels, teacher = make_problem(case, n=4)
    student = student / student.abs().max() * 1e4
    if "teacher_logits" in teacher:
        t = teacher["teacher_logits"]
        teacher["teacher_logits"] = t / t[t.isfinite()].abs().max() * 1e4
    options = dict(temperature=temperature, hard_weight=0.5)
    loss, grad = triton_loss_and_grad(student, labels, teacher, torch.tensor(1.0), **options)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    expected = reference.kd_loss(student, labels, **teacher, **options)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-4, abs_tol=1e-3)


# --------------------------------------------------------------------------------------------
# inplace, compute_grad=False, backward scaling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["jsd", "logits"])
def test_inplace_writes_the_gradient_over_the_logits(small_blocks, device, case):
    student, labels, teacher = make_problem(case)
    expected_loss, expected_grad = triton_loss_and_grad(student, labels, teacher, torch.tensor(1.0), hard_weight=0.5)
    logits = student.float().to(device).requires_grad_(True)
    loss = kdfast.kd_loss(logits, labels.to(device), **to(teacher, torch.float32, device), hard_weight=0.5, inplace=True,
                          backend="triton")
    torch.testing.assert_close(logits.detach(), expected_grad)  # before backward: the unscaled gradient
    loss.backward(torch.tensor(3.0, device=device))
    torch.testing.assert_close(loss.detach(), expected_loss)
    torch.testing.assert_close(logits.grad, 3.0 * expected_grad)
    torch.testing.assert_close(logits.detach(), expected_grad)  # backward returned a scaled copy


@pytest.mark.parametrize("case", ["jsd", "logprobs-tail"])
def test_without_grad_the_logits_stay_untouched(small_blocks, device, case):
    student, labels, teacher = make_problem(case)
    logits = student.float().to(device)
    before = logits.clone()
    with torch.no_grad():
        loss = kdfast.kd_loss(logits, labels.to(device), **to(teacher, torch.float32, device), inplace=True,
                              backend="triton")
    assert torch.equal(logits, before)
    expected = reference.kd_loss(student, labels, **teacher)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5, abs_tol=1e-6)


def test_backward_skips_rows_with_unit_grad_output_and_scales_the_others():
    student, labels, teacher = make_problem("forward_kl", vocab=300)
    unit = triton_loss_and_grad(student, labels, teacher, torch.ones(5), reduction="none")
    weights = torch.tensor([1.0, -2.0, 1.0, 0.25, 0.0])
    scaled = triton_loss_and_grad(student, labels, teacher, weights, reduction="none")
    torch.testing.assert_close(scaled[1], unit[1] * weights.to(unit[1].device)[:, None])
    assert float(unit[1].abs().sum()) > 0


def test_second_backward_through_a_retained_graph_raises(device):
    student, labels, teacher = make_problem("logits", vocab=200)
    logits = student.float().to(device).requires_grad_(True)
    loss = kdfast.kd_loss(logits, labels.to(device), **to(teacher, torch.float32, device), backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --------------------------------------------------------------------------------------------
# 64-bit row offsets
# --------------------------------------------------------------------------------------------


def test_row_offsets_are_64_bit(device):
    import triton
    import triton.language as tl

    @triton.jit
    def offset_kernel(out_ptr, row_id, row_stride):
        tl.store(out_ptr, triton_kd._row_offset(row_id, row_stride))

    row, vocab = 131071, 262144  # row * vocab = 2^35 - 2^18 > 2^31: wraps in int32
    out = torch.zeros(1, dtype=torch.int64, device=device)
    offset_kernel[(1,)](out, row, vocab)
    assert int(out.item()) == row * vocab


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _loss_and_grad_of(step, hidden, grad_output):
    hidden = hidden.detach().clone().requires_grad_(True)
    loss = step(hidden)
    loss.backward(torch.tensor(grad_output, device=loss.device))
    return loss.detach(), hidden.grad


def test_torch_compile_over_kd_loss(device):
    """A compiled training-step fragment calling kdfast.kd_loss matches eager, value and gradient."""
    student, labels, teacher = make_problem("forward_kl", n=4, vocab=300)
    teacher = to(teacher, torch.float32, device)
    labels = labels.to(device)
    scale = torch.tensor(1.3, device=device)

    def step(hidden):
        logits = hidden * scale  # ops before and after the loss: the graph is more than the loss
        return 2.0 * kdfast.kd_loss(logits, labels, **teacher, temperature=2.0, hard_weight=0.5, backend="triton")

    eager = _loss_and_grad_of(step, student.float().to(device), 1.0)
    compiled = _loss_and_grad_of(torch.compile(step), student.float().to(device), 1.0)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


@pytest.mark.parametrize("inplace", [False, True])
def test_backend_op_compiles_without_graph_breaks(device, inplace):
    """fullgraph=True: the custom ops and the autograd.Function trace through Dynamo and AOTAutograd."""
    from kdfast._contract import LossOptions

    student, labels, teacher = make_problem("logprobs-tail", n=4, vocab=300)
    teacher = to(teacher, torch.float32, device)
    labels = labels.to(device)
    opts = LossOptions(teacher_kind="logprobs", tail=True, hard_weight=0.5, reduction="sum", inplace=inplace, compute_grad=True)

    indices, values = teacher["teacher_indices"], teacher["teacher_values"]
    tail = torch.log1p(-torch.where(indices >= 0, values.exp(), 0.0).sum(-1))  # [N] the optional tensor argument

    def step(hidden):
        logits = hidden * 1.0  # inplace=True overwrites this intermediate, not the leaf
        return triton_kd.kd_loss(logits, labels, None, indices, values, tail, None, opts)[0]

    eager = _loss_and_grad_of(step, student.float().to(device), 0.7)
    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled = _loss_and_grad_of(compiled_step, student.float().to(device), 0.7)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


# --------------------------------------------------------------------------------------------
# GPU only: no host synchronization, CUDA-graph capture
# --------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("case", ["jsd", "logprobs-tail"])
def test_forward_and_backward_do_not_synchronize(monkeypatch, case):
    monkeypatch.setenv("KDFAST_CHECK_VALUES", "0")  # the API's range check is the one deliberate sync
    student, labels, teacher = make_problem(case)
    logits = student.float().cuda().requires_grad_(True)
    teacher = to(teacher, torch.float32, "cuda")
    labels = labels.cuda()
    options = dict(hard_weight=0.5, temperature=2.0, backend="triton")
    kdfast.kd_loss(logits, labels, **teacher, **options).backward()  # compiles the kernels outside the check
    logits.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        kdfast.kd_loss(logits, labels, **teacher, **options).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits.grad).all()


@cuda_only
def test_cuda_graph_capture_of_forward_and_backward(monkeypatch):
    monkeypatch.setenv("KDFAST_CHECK_VALUES", "0")
    student, labels, teacher = make_problem("forward_kl")
    teacher = to(teacher, torch.float32, "cuda")
    labels = labels.cuda()
    static_logits = student.float().cuda().requires_grad_(True)

    def step():
        return kdfast.kd_loss(static_logits, labels, **teacher, temperature=2.0, hard_weight=0.5, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            static_logits.grad = None
            step().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_logits.grad = None
    with torch.cuda.graph(graph):
        static_loss = step()
        static_loss.backward()

    fresh = 2 * torch.randn_like(static_logits)
    with torch.no_grad():
        static_logits.copy_(fresh)
    graph.replay()
    expected = loss_and_grad(kdfast.kd_loss, fresh, labels, teacher, torch.tensor(1.0), temperature=2.0, hard_weight=0.5,
                             backend="triton")
    torch.testing.assert_close(static_loss, expected[0])
    torch.testing.assert_close(static_logits.grad, expected[1])
