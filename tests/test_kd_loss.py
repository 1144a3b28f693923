"""kd_loss of every kernel backend against the float64 reference, value and gradient, plus bad input.

The grid follows docs/loss.md: backend x dtype x shape (N=1, odd V, V over one block, 128256) x T x
ignore_index x reduction x teacher kind. Triton runs under the interpreter without a GPU, so its
shapes stay small there.
"""
from __future__ import annotations

import math

import pytest
import torch

import kdfast
from kdfast import reference
from tests.conftest import DTYPES, assert_close_to_oracle, backend_device, require_backend

TEACHER_CASES = {
    "dense-forward_kl": dict(dense=True, divergence="forward_kl"),
    "dense-reverse_kl": dict(dense=True, divergence="reverse_kl"),
    "dense-jsd-0": dict(dense=True, divergence="jsd", beta=0.0),
    "dense-jsd-0.3": dict(dense=True, divergence="jsd", beta=0.3),
    "dense-jsd-1": dict(dense=True, divergence="jsd", beta=1.0),
    "sparse-logits": dict(dense=False, teacher_kind="logits"),
    "sparse-logprobs": dict(dense=False, teacher_kind="logprobs"),
    "sparse-logprobs-tail": dict(dense=False, teacher_kind="logprobs", tail=True),
    "sparse-probs": dict(dense=False, teacher_kind="probs"),
}


def make_problem(n, vocab, *, dense, teacher_kind="logits", k=8, ignored=True, seed=0, **_):
    """Random student/teacher/labels in float64 (never zeros); sparse rows have some empty slots."""
    gen = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    teacher = 0.7 * student + 2 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if ignored and n > 1:
        labels[:: 3] = -100
    if dense:
        return student, labels, dict(teacher_logits=teacher)
    k = min(k, vocab)
    top_values, indices = teacher.topk(k, dim=-1)
    if teacher_kind == "logprobs":
        values = torch.log_softmax(teacher, -1).gather(1, indices)
    elif teacher_kind == "probs":
        values = torch.softmax(top_values, -1)
    else:
        values = top_values
    if n > 1 and k > 1:
        indices[1, k // 2 :] = -1  # a partly filled row
        if teacher_kind == "probs":
            values[1] = torch.where(indices[1] >= 0, values[1], 0) / values[1][indices[1] >= 0].sum()
    if n > 2:
        indices[2, :] = -1  # a row without any target
    return student, labels, dict(teacher_indices=indices, teacher_values=values, teacher_kind=teacher_kind)


def loss_and_grad(logits, labels, teacher, grad_weights, **options):
    """Loss and d(sum(loss * grad_weights))/d(logits) through kdfast.kd_loss or the reference."""
    logits = logits.detach().clone().requires_grad_(True)
    fn = options.pop("fn", kdfast.kd_loss)
    if fn is kdfast.kd_loss and options.get("tail"):
        options["allow_tail_temperature"] = True  # the grid also covers the bucket at T != 1
    loss = fn(logits, labels, **teacher, **options)
    weights = grad_weights.to(loss.dtype) if loss.dim() else torch.tensor(1.7, dtype=loss.dtype)
    (loss * weights.to(loss.device)).sum().backward()
    return loss.detach(), logits.grad


def check_against_oracle(backend, n, vocab, dtype, case, **options):
    require_backend(backend)
    device = backend_device(backend)
    student, labels, teacher = make_problem(n, vocab, **case, seed=n * 7 + vocab)
    options.update({k: v for k, v in case.items() if k in ("divergence", "beta", "tail")})
    student = student.to(dtype)
    teacher = _cast(teacher, dtype)
    grad_weights = torch.rand(n, dtype=torch.float64) + 0.5

    oracle = loss_and_grad(student.double(), labels, _cast(teacher, torch.float64), grad_weights, fn=reference.kd_loss, **options)
    same_dtype = loss_and_grad(student, labels, teacher, grad_weights, fn=reference.kd_loss, **options)
    on_device = _cast(teacher, None, device)
    actual = loss_and_grad(student.to(device), labels.to(device), on_device, grad_weights, backend=backend, **options)

    assert kdfast.last_backend() == backend
    assert actual[1].dtype == dtype
    assert_close_to_oracle(actual[0], same_dtype[0], oracle[0], dtype, "loss")
    assert_close_to_oracle(actual[1], same_dtype[1], oracle[1], dtype, "grad")


def _cast(teacher, dtype, device=None):
    return {
        k: (v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor) else v)
        for k, v in teacher.items()
    }


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("case", list(TEACHER_CASES))
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_teacher_kinds_temperatures_reductions(backend, case, temperature, reduction):
    check_against_oracle(
        backend, 6, 1500, torch.float32, TEACHER_CASES[case],
        temperature=temperature, reduction=reduction, hard_weight=0.5, soft_weight=0.8,
    )


CPU_SHAPES = [(1, 7), (5, 33), (4, 1029), (3, 5000), (2, 128256)]
TRITON_SHAPES = [(1, 7), (5, 33), (3, 2500)]


@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("case", ["dense-forward_kl", "dense-jsd-0.3", "sparse-logprobs-tail", "sparse-logits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "backend,shape",
    [("cpu", s) for s in CPU_SHAPES] + [("triton", s) for s in TRITON_SHAPES],
    ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x,
)
def test_dtypes_and_shapes(backend, shape, dtype, case, ignored):
    n, vocab = shape
    case_options = dict(TEACHER_CASES[case], ignored=ignored)
    check_against_oracle(backend, n, vocab, dtype, case_options, temperature=2.0, hard_weight=0.3)


@pytest.mark.parametrize("num_items", [None, 11, "tensor"])
def test_num_items_and_scale_t2(kernel_backend, num_items):
    if num_items == "tensor":
        num_items = torch.tensor(13.0, device=backend_device(kernel_backend))
    check_against_oracle(
        kernel_backend, 5, 300, torch.float32, TEACHER_CASES["dense-forward_kl"],
        temperature=3.0, num_items=num_items, scale_t2=False, hard_weight=1.0,
    )


def test_leading_dims_are_flattened(kernel_backend):
    device = backend_device(kernel_backend)
    student, labels, teacher = make_problem(6, 50, dense=True)
    shaped = dict(teacher_logits=teacher["teacher_logits"].float().reshape(2, 3, 50).to(device))
    flat = kdfast.kd_loss(student.float().to(device), labels.to(device), teacher_logits=shaped["teacher_logits"].reshape(6, 50), reduction="none", backend=kernel_backend)
    batched = kdfast.kd_loss(student.float().reshape(2, 3, 50).to(device), labels.reshape(2, 3).to(device), **shaped, reduction="none", backend=kernel_backend)
    assert batched.shape == (2, 3)
    torch.testing.assert_close(batched.reshape(6), flat)


# --------------------------------------------------------------------------------------------
# Options and edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_overwrites_logits_with_the_gradient(kernel_backend, dtype):
    device = backend_device(kernel_backend)
    student, labels, teacher = make_problem(4, 300, dense=True)
    teacher = _cast(teacher, dtype, device)
    expected = loss_and_grad(student.to(dtype).to(device), labels.to(device), teacher, torch.ones(4), backend=kernel_backend)

    logits = student.to(dtype).to(device).requires_grad_(True)
    loss = kdfast.kd_loss(logits, labels.to(device), **teacher, inplace=True, backend=kernel_backend)
    loss.backward(torch.tensor(1.7, device=device))
    torch.testing.assert_close(loss.detach(), expected[0])
    torch.testing.assert_close(logits.grad, expected[1])
    if dtype == torch.float16:  # under autograd the fp16 buffer holds the gradient before its deferred scaling
        assert not torch.equal(logits.detach(), student.to(dtype).to(device))
    else:
        torch.testing.assert_close(logits.detach() * 1.7, expected[1])  # the buffer now holds the unscaled gradient


def test_no_grad_leaves_logits_untouched(kernel_backend):
    device = backend_device(kernel_backend)
    student, labels, teacher = make_problem(4, 300, dense=True)
    logits = student.float().to(device)
    before = logits.clone()
    with torch.no_grad():
        loss = kdfast.kd_loss(logits, labels.to(device), **_cast(teacher, torch.float32, device), inplace=True, backend=kernel_backend)
    expected = reference.kd_loss(student, labels, teacher_logits=teacher["teacher_logits"])
    assert torch.equal(logits, before)
    assert abs(loss.item() - expected.item()) < 1e-4 * max(1.0, abs(expected.item()))


def test_labels_none_makes_every_row_active(kernel_backend):
    check_against_oracle(kernel_backend, 4, 200, torch.float32, dict(TEACHER_CASES["sparse-probs"], ignored=False), temperature=1.5)
    device = backend_device(kernel_backend)
    student, _, teacher = make_problem(4, 200, dense=True)
    loss = kdfast.kd_loss(student.float().to(device), None, **_cast(teacher, torch.float32, device), backend=kernel_backend)
    expected = reference.kd_loss(student, None, **teacher)
    assert abs(loss.item() - expected.item()) < 1e-5 * max(1.0, abs(expected.item()))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_and_empty_batches_give_zero(kernel_backend, reduction):
    device = backend_device(kernel_backend)
    for n in (0, 3):
        student, _, teacher = make_problem(n, 40, dense=True, ignored=False) if n else (
            torch.randn(0, 40, dtype=torch.float64), None, dict(teacher_logits=torch.randn(0, 40, dtype=torch.float64)))
        labels = torch.full((n,), -100)
        logits = student.float().to(device).requires_grad_(True)
        loss, parts = kdfast.kd_loss(logits, labels.to(device), **_cast(teacher, torch.float32, device),
                                     hard_weight=1.0, reduction=reduction, backend=kernel_backend, return_components=True)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and float(loss.abs().sum()) == 0.0
        assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0
        assert float(parts.ce) == 0.0 and float(parts.kd) == 0.0


def test_return_components_are_active_means(kernel_backend):
    device = backend_device(kernel_backend)
    student, labels, teacher = make_problem(6, 120, dense=True)
    loss, parts = kdfast.kd_loss(student.float().to(device), labels.to(device), **_cast(teacher, torch.float32, device),
                                 hard_weight=0.4, temperature=2.0, backend=kernel_backend, return_components=True)
    ce, div, active = reference.kd_loss_rows(student, labels, **teacher, temperature=2.0)
    n = active.sum()
    assert abs(parts.ce.item() - (ce.sum() / n).item()) < 1e-4
    assert abs(parts.kd.item() - (div.sum() / n).item()) < 1e-4
    assert abs(loss.item() - (0.4 * parts.ce + 4.0 * parts.kd).item()) < 1e-4


def test_int32_indices_match_int64(kernel_backend):
    device = backend_device(kernel_backend)
    student, labels, teacher = make_problem(5, 90, dense=False, teacher_kind="logprobs")
    teacher = _cast(teacher, torch.float32, device)
    as_int64 = kdfast.kd_loss(student.float().to(device), labels.to(device), **teacher, tail=True, backend=kernel_backend)
    teacher["teacher_indices"] = teacher["teacher_indices"].int()
    as_int32 = kdfast.kd_loss(student.float().to(device), labels.to(device), **teacher, tail=True, backend=kernel_backend)
    torch.testing.assert_close(as_int32, as_int64)


@pytest.mark.parametrize("temperature", [0.01, 0.05, 100.0])
@pytest.mark.parametrize("case", ["dense-forward_kl", "dense-reverse_kl", "dense-jsd-0.3", "sparse-logprobs-tail"])
def test_extreme_logits_and_temperatures_stay_finite(kernel_backend, case, temperature):
    """Logits up to 1e4 at both ends of TEMPERATURE_RANGE: finite with a 1e4 CE term, and the divergence
    term compared on its own (hard_weight=0), per row and per gradient entry."""
    device = backend_device(kernel_backend)
    student, labels, teacher = make_problem(4, 257, **TEACHER_CASES[case])
    student = (student / student.abs().max() * 1e4).float()
    if "teacher_logits" in teacher:
        teacher["teacher_logits"] = teacher["teacher_logits"] / teacher["teacher_logits"].abs().max() * 1e4
    options = {k: v for k, v in TEACHER_CASES[case].items() if k in ("divergence", "beta", "tail")}
    on_device = _cast(teacher, torch.float32, device)
    loss, grad = loss_and_grad(student.to(device), labels.to(device), on_device, torch.ones(4),
                               temperature=temperature, hard_weight=0.5, backend=kernel_backend, **options)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    weights = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    soft = dict(temperature=temperature, reduction="none", **options)
    div, div_grad = loss_and_grad(student.to(device), labels.to(device), on_device, weights, backend=kernel_backend, **soft)
    oracle, oracle_grad = loss_and_grad(student.double(), labels, teacher, weights, fn=reference.kd_loss, **soft)
    same, same_grad = loss_and_grad(student, labels, _cast(teacher, torch.float32), weights, fn=reference.kd_loss, **soft)
    torch.testing.assert_close(div.double().cpu(), oracle, rtol=1e-5, atol=1e-9)
    # Scale: c / T = T (soft_weight 1, s = T^2) times the row's weight, the bound on an entry of the
    # row's divergence gradient; rows whose exact gradient is ~0 (one-hot q at T = 0.01) have no other.
    bound = temperature * weights[:, None]
    assert_close_to_oracle(div_grad, same_grad, oracle_grad, torch.float32, "divergence gradient", scale=bound)


def test_minus_inf_teacher_logits(kernel_backend):
    device = backend_device(kernel_backend)
    student, labels, teacher = make_problem(4, 100, dense=True)
    teacher["teacher_logits"][:, 50:] = -math.inf
    for divergence in ("forward_kl", "jsd"):
        check = loss_and_grad(student.float().to(device), labels.to(device), _cast(teacher, torch.float32, device), torch.ones(4),
                              divergence=divergence, backend=kernel_backend)
        oracle = loss_and_grad(student, labels, teacher, torch.ones(4), divergence=divergence, fn=reference.kd_loss)
        assert torch.isfinite(check[0]).all() and torch.isfinite(check[1]).all()
        torch.testing.assert_close(check[0].double().cpu(), oracle[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(check[1].double().cpu(), oracle[1], rtol=1e-3, atol=1e-6)


def test_module_matches_function(kernel_backend):
    device = backend_device(kernel_backend)
    student, labels, teacher = make_problem(5, 64, dense=True)
    teacher = _cast(teacher, torch.float32, device)
    module = kdfast.KDLoss(temperature=2.0, hard_weight=0.5, backend=kernel_backend)
    torch.testing.assert_close(
        module(student.float().to(device), labels.to(device), **teacher),
        kdfast.kd_loss(student.float().to(device), labels.to(device), **teacher, temperature=2.0, hard_weight=0.5, backend=kernel_backend),
    )
    assert "temperature=2.0" in repr(module)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def test_available_backends_lists_cpu_and_torch():
    assert {"cpu", "torch"} <= set(kdfast.available_backends())


def test_automatic_dispatch_picks_cpu_for_cpu_tensors_and_torch_for_float64():
    require_backend("cpu")
    student, labels, teacher = make_problem(3, 20, dense=True)
    kdfast.kd_loss(student.float(), labels, teacher_logits=teacher["teacher_logits"].float())
    assert kdfast.last_backend() == "cpu"
    kdfast.kd_loss(student, labels, **teacher)
    assert kdfast.last_backend() == "torch"


def test_kdfast_backend_environment_variable(monkeypatch):
    student, labels, teacher = make_problem(3, 20, dense=True)
    monkeypatch.setenv("KDFAST_BACKEND", "torch")
    kdfast.kd_loss(student.float(), labels, teacher_logits=teacher["teacher_logits"].float())
    assert kdfast.last_backend() == "torch"
    monkeypatch.setenv("KDFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        kdfast.kd_loss(student.float(), labels, teacher_logits=teacher["teacher_logits"].float())


def test_unavailable_backend_raises(monkeypatch):
    from kdfast import _backend

    monkeypatch.setattr(_backend, "available_backends", lambda: ["torch"])
    student, labels, teacher = make_problem(3, 20, dense=True)
    with pytest.raises(RuntimeError, match="unavailable"):
        kdfast.kd_loss(student.float(), labels, teacher_logits=teacher["teacher_logits"].float(), backend="cpu")


# --------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument
# --------------------------------------------------------------------------------------------


def _good():
    student, labels, teacher = make_problem(4, 30, dense=True)
    return student.float(), labels, teacher["teacher_logits"].float()


def _sparse_good():
    student, labels, teacher = make_problem(4, 30, dense=False, teacher_kind="logprobs")
    return student.float(), labels, teacher["teacher_indices"], teacher["teacher_values"].float()


BAD_DENSE = {
    "no teacher": (lambda z, y, t: dict(student_logits=z, labels=y), "exactly one teacher"),
    "two teachers": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t, teacher_indices=torch.zeros(4, 2, dtype=torch.long), teacher_values=torch.zeros(4, 2)), "exactly one teacher"),
    "vocab mismatch": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t[:, :29]), "teacher_logits shape"),
    "labels shape": (lambda z, y, t: dict(student_logits=z, labels=y[:3], teacher_logits=t), "labels shape"),
    "labels dtype": (lambda z, y, t: dict(student_logits=z, labels=y.float(), teacher_logits=t), "labels must be int64"),
    "label out of range": (lambda z, y, t: dict(student_logits=z, labels=y.clone().fill_(30), teacher_logits=t), r"labels must be in \[0, 30\)"),
    "negative label": (lambda z, y, t: dict(student_logits=z, labels=y.clone().fill_(-5), teacher_logits=t), "labels must be in"),
    "student dtype": (lambda z, y, t: dict(student_logits=z.long(), labels=y, teacher_logits=t), "student_logits must be"),
    "student not tensor": (lambda z, y, t: dict(student_logits=z.tolist(), labels=y, teacher_logits=t), "student_logits must be a torch.Tensor"),
    "zero temperature": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t, temperature=0.0), "temperature"),
    "negative temperature": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t, temperature=-1.0), "temperature"),
    "nan temperature": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t, temperature=float("nan")), "temperature"),
    "hard weight without labels": (lambda z, y, t: dict(student_logits=z, labels=None, teacher_logits=t, hard_weight=1.0), "hard_weight"),
    "bad divergence": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t, divergence="kl"), "divergence"),
    "bad beta": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t, divergence="jsd", beta=1.5), "beta"),
    "bad reduction": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t, reduction="avg"), "reduction"),
    "num_items with sum": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t, reduction="sum", num_items=3), "num_items"),
    "num_items zero": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t, num_items=0), "num_items"),
    "tail with dense": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t, tail=True), "tail"),
    "dense with probs kind": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t, teacher_kind="probs"), "teacher_kind"),
    "inplace non-contiguous": (lambda z, y, t: dict(student_logits=z.t().contiguous().t(), labels=y, teacher_logits=t, inplace=True), "contiguous"),
    "device mismatch": (lambda z, y, t: dict(student_logits=z, labels=y, teacher_logits=t.to("meta")), "teacher_logits is on meta"),
}

BAD_SPARSE = {
    "index out of range": (lambda z, y, i, v: dict(student_logits=z, labels=y, teacher_indices=i.clone().fill_(30), teacher_values=v), r"teacher_indices must be in \[0, 30\)"),
    "index below -1": (lambda z, y, i, v: dict(student_logits=z, labels=y, teacher_indices=i.clone().fill_(-2), teacher_values=v), "teacher_indices must be in"),
    "indices float": (lambda z, y, i, v: dict(student_logits=z, labels=y, teacher_indices=i.float(), teacher_values=v), "teacher_indices must be int32 or int64"),
    "values int": (lambda z, y, i, v: dict(student_logits=z, labels=y, teacher_indices=i, teacher_values=i), "teacher_values must be a floating"),
    "shape mismatch": (lambda z, y, i, v: dict(student_logits=z, labels=y, teacher_indices=i, teacher_values=v[:, :3]), "teacher_indices shape"),
    "rows mismatch": (lambda z, y, i, v: dict(student_logits=z, labels=y, teacher_indices=i[:3], teacher_values=v[:3]), "leading shape"),
    "values missing": (lambda z, y, i, v: dict(student_logits=z, labels=y, teacher_indices=i), "both teacher_indices and teacher_values"),
    "reverse kl sparse": (lambda z, y, i, v: dict(student_logits=z, labels=y, teacher_indices=i, teacher_values=v, divergence="reverse_kl"), "dense"),
    "bad kind": (lambda z, y, i, v: dict(student_logits=z, labels=y, teacher_indices=i, teacher_values=v, teacher_kind="scores"), "teacher_kind"),
    "tail with logits": (lambda z, y, i, v: dict(student_logits=z, labels=y, teacher_indices=i, teacher_values=v, tail=True), "tail"),
}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("case", list(BAD_DENSE))
def test_bad_dense_input_raises_value_error(case, backend):
    build, message = BAD_DENSE[case]
    kwargs = build(*_good())
    with pytest.raises(ValueError, match=message):
        kdfast.kd_loss(kwargs.pop("student_logits"), kwargs.pop("labels"), backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("case", list(BAD_SPARSE))
def test_bad_sparse_input_raises_value_error(case, backend):
    build, message = BAD_SPARSE[case]
    kwargs = build(*_sparse_good())
    kwargs.setdefault("teacher_kind", "logits")
    with pytest.raises(ValueError, match=message):
        kdfast.kd_loss(kwargs.pop("student_logits"), kwargs.pop("labels"), backend=backend, **kwargs)


def test_float64_on_kernel_backend_names_the_dtype():
    require_backend("cpu")
    z, y, t = _good()
    with pytest.raises(ValueError, match="float64"):
        kdfast.kd_loss(z.double(), y, teacher_logits=t.double(), backend="cpu")


# --------------------------------------------------------------------------------------------
# The contract at its edges (issue 17): tail bucket, teacher_tail, bad rows, strides, options
# --------------------------------------------------------------------------------------------

ALL_BACKENDS = ["torch", "cpu", "triton"]


def confident_tail_problem(n=4, vocab=2500, k=8, seed=3):
    """Student logit 40 on the teacher's top-1 slot (q_rest ~ 1e-16): the regime late in training.
    V = 2500 spans three 1024-wide Triton blocks under the interpreter; 4 rows > its 3 programs."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    teacher = 2 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    log_p = torch.log_softmax(teacher, -1)
    values, indices = log_p.topk(k, dim=-1)
    student.scatter_(1, indices[:, :1], 40.0)
    tail = torch.log1p(-values.exp().sum(-1))  # the exact captured tail log-mass
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return student, labels, dict(teacher_indices=indices, teacher_values=values, teacher_tail=tail,
                                 teacher_kind="logprobs", tail=True)


def assert_relative_per_element(actual, expected, rtol, what, floor=1e-30):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    big = expected.abs() > floor
    err = ((actual - expected).abs() / expected.abs().clamp(min=floor))[big]
    assert torch.isfinite(actual).all(), f"{what}: non-finite"
    assert err.numel() == 0 or err.max() <= rtol, f"{what}: worst relative error {err.max():.3e} > {rtol}"
    assert ((actual - expected).abs()[~big] <= floor).all(), f"{what}: entries the oracle holds below {floor} are not"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tail_bucket_with_teacher_tail_when_the_student_is_confident(backend):
    """Acceptance 2: loss and gradient within 1e-3 relative per element of float64, logit 40 on a slot."""
    require_backend(backend)
    device = backend_device(backend)
    student, labels, teacher = confident_tail_problem()
    oracle = loss_and_grad(student, labels, teacher, torch.ones(4), fn=reference.kd_loss, reduction="none")
    on_device = _cast(teacher, torch.float32, device)
    actual = loss_and_grad(student.float().to(device), labels.to(device), on_device, torch.ones(4),
                           backend=backend, reduction="none")
    assert_relative_per_element(actual[0], oracle[0], 1e-3, "loss")
    assert_relative_per_element(actual[1], oracle[1], 1e-3, "grad")


def test_reference_tail_bucket_matches_a_direct_float64_sum():
    """The oracle's own q_rest: summed over the non-slot entries, not 1 - sum(q_slots) (cancels at 1e-16)."""
    student, labels, teacher = confident_tail_problem(n=2, vocab=50)
    div = reference.kd_loss_rows(student, labels, **teacher)[1]
    for r in range(2):
        z = student[r].tolist()
        lse = max(z) + math.log(math.fsum(math.exp(v - max(z)) for v in z))
        slots = teacher["teacher_indices"][r].tolist()
        q_rest = math.fsum(math.exp(z[j] - lse) for j in range(50) if j not in slots)
        p = [math.exp(v) for v in teacher["teacher_values"][r].tolist()]
        p_rest = math.exp(teacher["teacher_tail"][r].item())
        expected = math.fsum(pi * (math.log(pi) - (z[j] - lse)) for pi, j in zip(p, slots))
        expected += p_rest * (math.log(p_rest) - math.log(q_rest))
        assert math.isclose(div[r].item(), expected, rel_tol=1e-12), (div[r].item(), expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_teacher_tail_replaces_the_recomputed_mass(backend):
    """bf16 values: 1 - sum(exp(values)) is off by percents; the captured tail is used instead."""
    require_backend(backend)
    device = backend_device(backend)
    student, labels, teacher = make_problem(6, 200, dense=False, teacher_kind="logprobs", k=16)
    valid = teacher["teacher_indices"] >= 0
    exact_tail = torch.log1p(-torch.where(valid, teacher["teacher_values"].exp(), 0).sum(-1))
    rounded = dict(teacher, teacher_values=teacher["teacher_values"].to(torch.bfloat16))
    with_tail = dict(rounded, teacher_tail=exact_tail)
    oracle = loss_and_grad(student, labels, _cast(with_tail, torch.float64), torch.ones(6), fn=reference.kd_loss,
                           tail=True, reduction="none")
    without = loss_and_grad(student, labels, _cast(rounded, torch.float64), torch.ones(6), fn=reference.kd_loss,
                            tail=True, reduction="none")
    actual = loss_and_grad(student.float().to(device), labels.to(device), _cast(with_tail, None, device), torch.ones(6),
                           backend=backend, tail=True, reduction="none")
    torch.testing.assert_close(actual[0].double().cpu(), oracle[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual[1].double().cpu(), oracle[1], rtol=1e-4, atol=1e-6)
    assert (oracle[0] - without[0]).abs().max() > 1e-4  # 5x the tolerance above: the test tells them apart


def test_full_coverage_tail_bucket_uses_the_floor():
    """k == V: nothing is outside the slots; q_rest is floored at FLT_MIN, loss and gradient stay finite."""
    student, labels, teacher = make_problem(3, 8, dense=False, teacher_kind="logprobs", k=8)
    loss, grad = loss_and_grad(student, labels, teacher, torch.ones(3), fn=reference.kd_loss, tail=True)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_tail_at_another_temperature_needs_an_explicit_opt_in(backend):
    require_backend(backend)
    z, y, i, v = _sparse_good()
    kwargs = dict(teacher_indices=i, teacher_values=v, teacher_kind="logprobs", tail=True, backend=backend)
    with pytest.raises(ValueError, match="allow_tail_temperature"):
        kdfast.kd_loss(z, y, **kwargs, temperature=2.0)
    opted_in = kdfast.kd_loss(z, y, **kwargs, temperature=2.0, allow_tail_temperature=True)
    expected = reference.kd_loss(z.double(), y, teacher_indices=i, teacher_values=v.double(), teacher_kind="logprobs",
                                 tail=True, temperature=2.0)
    assert math.isclose(opted_in.item(), expected.item(), rel_tol=1e-5)


@pytest.mark.parametrize("temperature", [1e-3, 5e-3, 1e3, 1e6])
def test_temperature_outside_the_range_raises_naming_it(temperature):
    z, y, t = _good()
    with pytest.raises(ValueError, match=r"temperature must be in \[0.01, 100.0\]"):
        kdfast.kd_loss(z, y, teacher_logits=t, temperature=temperature)


@pytest.mark.parametrize("temperature", [0.01, 100.0])
def test_temperature_range_ends_are_accepted(temperature):
    z, y, t = _good()
    kdfast.kd_loss(z, y, teacher_logits=t, temperature=temperature, backend="torch")


def _with_duplicates():
    z, y, i, v = _sparse_good()
    i = i.clone()
    i[1, 1] = i[1, 0]
    return z, y, i, v


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_duplicate_indices_raise_when_checks_are_on(backend):
    z, y, i, v = _with_duplicates()
    with pytest.raises(ValueError, match=r"teacher_indices must be unique within a row .* row 1"):
        kdfast.kd_loss(z, y, teacher_indices=i, teacher_values=v, teacher_kind="logprobs", backend=backend)


def test_empty_slots_may_repeat():
    z, y, i, v = _sparse_good()
    i = i.clone()
    i[0, 2:] = -1
    assert torch.isfinite(kdfast.kd_loss(z, y, teacher_indices=i, teacher_values=v, teacher_kind="logprobs"))


def _bad_row_cases():
    """(name, teacher kwargs) with row 1 bad and every other row fine."""
    z, y, t = _good()
    _, _, i, v = _sparse_good()
    nan_dense, inf_dense = t.clone(), t.clone()
    nan_dense[1, 3], inf_dense[1, 5] = math.nan, math.inf
    _, _, i_dup, _ = _with_duplicates()
    nan_values, inf_values = v.clone(), v.clone()
    nan_values[1, 0], inf_values[1, 2] = math.nan, math.inf
    probs = torch.softmax(v, -1)
    neg_inf_probs = probs.clone()
    neg_inf_probs[1, 0] = -math.inf
    tail = torch.log1p(-v.exp().sum(-1))
    nan_tail = tail.clone()
    nan_tail[1] = math.nan
    sparse = lambda **kw: dict(dict(teacher_indices=i, teacher_values=v, teacher_kind="logprobs"), **kw)  # noqa: E731
    return {
        "dense-nan": dict(teacher_logits=nan_dense),
        "dense-inf": dict(teacher_logits=inf_dense),
        "logits-nan": sparse(teacher_values=nan_values, teacher_kind="logits"),
        "logprobs-inf": sparse(teacher_values=inf_values),
        "logprobs-tail-nan": sparse(teacher_values=nan_values, tail=True),
        "probs-nan": sparse(teacher_values=torch.where(nan_values.isnan(), nan_values, probs), teacher_kind="probs"),
        "probs-minus-inf": sparse(teacher_values=neg_inf_probs, teacher_kind="probs"),
        "teacher-tail-nan": sparse(teacher_tail=nan_tail, tail=True),
        "duplicates-unchecked": sparse(teacher_indices=i_dup),
    }


@pytest.mark.parametrize("case", list(_bad_row_cases()))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_teacher_row_gives_nan_loss_and_zero_gradient(backend, case, monkeypatch):
    """One rule on every backend: the bad row's loss is NaN, its gradient 0; other rows are untouched."""
    require_backend(backend)
    monkeypatch.setenv("KDFAST_CHECK_VALUES", "0")  # duplicates are otherwise refused up front
    device = backend_device(backend)
    z, y, _ = _good()
    teacher = _bad_row_cases()[case]
    options = dict(hard_weight=0.5, reduction="none", backend=backend)
    loss, grad = loss_and_grad(z.to(device), y.to(device), _cast(teacher, None, device), torch.ones(4), **options)
    loss, grad = loss.cpu(), grad.cpu()
    good = torch.tensor([0, 2, 3])
    if y[1] != -100:
        assert torch.isnan(loss[1]), loss
    assert bool((grad[1] == 0).all()), grad[1]
    assert torch.isfinite(loss[good]).all() and torch.isfinite(grad[good]).all()
    clean = {name: t[good] if isinstance(t, torch.Tensor) else t for name, t in teacher.items()}
    expected = loss_and_grad(z[good], y[good], clean, torch.ones(3), fn=reference.kd_loss, hard_weight=0.5, reduction="none")
    torch.testing.assert_close(loss[good], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad[good], expected[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_and_expanded_inputs_match_contiguous_ones(backend):
    require_backend(backend)
    device = backend_device(backend)
    student, labels, teacher = make_problem(6, 70, dense=True)
    z = student.float().to(device)
    t = teacher["teacher_logits"].float().to(device)
    wide_labels = torch.stack([labels, labels], 1).to(device)  # labels[:, 0] has stride 2
    expected = kdfast.kd_loss(z, labels.to(device), teacher_logits=t, hard_weight=0.5, reduction="none", backend=backend)
    z_t = z.t().contiguous().t()  # column-major logits
    t_sliced = torch.cat([t, t], 1)[:, :70]  # rows of stride 140
    strided = kdfast.kd_loss(z_t, wide_labels[:, 0], teacher_logits=t_sliced, hard_weight=0.5, reduction="none",
                             backend=backend)
    torch.testing.assert_close(strided, expected)
    seven = torch.tensor(7, device=device).expand(6)
    one_row = z[:1].expand(6, 70)
    expanded = kdfast.kd_loss(one_row, seven, teacher_logits=t[:1].expand(6, 70), hard_weight=0.5, reduction="none",
                              backend=backend)
    single = kdfast.kd_loss(z[:1], seven[:1], teacher_logits=t[:1], hard_weight=0.5, reduction="none", backend=backend)
    torch.testing.assert_close(expanded, single.expand(6))
    _, _, sparse = make_problem(6, 70, dense=False, teacher_kind="logprobs")
    i, v = sparse["teacher_indices"].to(device), sparse["teacher_values"].float().to(device)
    dense_rows = kdfast.kd_loss(z, labels.to(device), teacher_indices=i, teacher_values=v, teacher_kind="logprobs",
                                tail=True, reduction="none", backend=backend)
    strided_rows = kdfast.kd_loss(z_t, wide_labels[:, 1], teacher_indices=i.t().contiguous().t(),
                                  teacher_values=torch.stack([v, v], -1).flatten(1)[:, 1::2], teacher_kind="logprobs", tail=True,
                                  reduction="none", backend=backend)
    torch.testing.assert_close(strided_rows, dense_rows)


@pytest.mark.parametrize("bad", [0.0, -3.0, math.inf, math.nan])
def test_num_items_tensor_values_are_checked(bad):
    z, y, t = _good()
    with pytest.raises(ValueError, match="num_items must be finite and > 0"):
        kdfast.kd_loss(z, y, teacher_logits=t, num_items=torch.tensor(bad))


def test_num_items_of_shape_one_gives_a_scalar_loss():
    z, y, t = _good()
    loss = kdfast.kd_loss(z, y, teacher_logits=t, num_items=torch.tensor([5.0]))
    assert loss.shape == ()
    torch.testing.assert_close(loss, kdfast.kd_loss(z, y, teacher_logits=t, num_items=5))


@pytest.mark.parametrize("ignore_index", [2**70, -(2**64), 1.5])
def test_ignore_index_outside_int64_is_a_value_error(ignore_index):
    z, y, t = _good()
    with pytest.raises(ValueError, match="ignore_index must"):
        kdfast.kd_loss(z, y, teacher_logits=t, ignore_index=ignore_index)


BAD_TAIL = {
    "tail without tail=True": (dict(teacher_kind="logprobs"), "teacher_tail is only used with"),
    "tail with logits kind": (dict(teacher_kind="logits"), "teacher_tail is only used with"),
    "tail shape": (dict(teacher_kind="logprobs", tail=True, shape=(3,)), r"teacher_tail must be \[...\] = \(4,\)"),
    "tail dtype": (dict(teacher_kind="logprobs", tail=True, dtype=torch.int64), "teacher_tail must be a floating"),
    "tail not tensor": (dict(teacher_kind="logprobs", tail=True, as_list=True), "teacher_tail must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_TAIL))
def test_bad_teacher_tail_raises(case):
    options, message = BAD_TAIL[case]
    options = dict(options)
    z, y, i, v = _sparse_good()
    tail = torch.zeros(options.pop("shape", (4,)), dtype=options.pop("dtype", torch.float32)) - 1
    if options.pop("as_list", False):
        tail = tail.tolist()
    with pytest.raises(ValueError, match=message):
        kdfast.kd_loss(z, y, teacher_indices=i, teacher_values=v, teacher_tail=tail, **options)


def test_dense_teacher_tail_raises():
    z, y, t = _good()
    with pytest.raises(ValueError, match="tail"):
        kdfast.kd_loss(z, y, teacher_logits=t, teacher_tail=torch.zeros(4), tail=True, teacher_kind="logprobs")


def test_per_element_tolerance_sees_small_entries_zeroed():
    """Zeroing every entry below 1e-3 x max passed the old tensor-max tolerance (issue 17); it must fail."""
    student, labels, teacher = make_problem(4, 2000, dense=True)
    oracle = loss_and_grad(student, labels, teacher, torch.ones(4), fn=reference.kd_loss, hard_weight=1.0)[1]
    same = loss_and_grad(student.to(torch.bfloat16), labels, _cast(teacher, torch.bfloat16), torch.ones(4),
                         fn=reference.kd_loss, hard_weight=1.0)[1]
    assert_close_to_oracle(same, same, oracle, torch.bfloat16, "the reference itself")
    damaged = torch.where(oracle.abs() < 1e-3 * oracle.abs().max(), 0, same.double()).to(torch.bfloat16)
    with pytest.raises(AssertionError, match="entries out of tolerance"):
        assert_close_to_oracle(damaged, same, oracle, torch.bfloat16, "damaged")
