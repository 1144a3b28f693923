"""fused_linear_kd_loss with several weighted teachers (issue 14): the loss, its components and the
hidden/weight/bias gradients equal the weighted sum of single-teacher calls, the student's logits are
computed once per chunk for all teachers, and bad weights or teacher sequences raise ValueError
naming the argument.

The expected values come from single-teacher ``fused_linear_kd_loss`` calls (themselves checked
against the float64 reference in test_fused_linear_kd_loss.py): teacher 0 with ``hard_weight`` and
``soft_weight * w_0``, teacher j > 0 with ``hard_weight=0`` and ``soft_weight * w_j``; ce from the
first call, kd = sum_j w_j kd_j. Both paths run the backend on the same chunk logits, so they differ
only by the rounding of the sums (per element: |actual - expected| <= ATOL + RTOL * sum_j |expected_j|,
the magnitudes the sums round against).
"""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import fused_linear
from tests.conftest import require_backend

LEAD, H, V = (3, 13), 24, 131  # 39 rows: 4 chunks of CHUNK, the last one short
CHUNK = 10
KS = (7, 5, 9)  # each teacher its own number of slots
IGNORE = -100
WEIGHTS = {2: (0.7, 0.5), 3: (0.2, 0.5, 1.1)}  # sums 1.2 and 1.8: used as given, not renormalised
# reduction="none": a per-row grad_output of about the size of a mean's 1 / n_active, so that the
# gradients are as large as with "mean" (median entry ~2e-3) and one ATOL per dtype fits both.
# Measured worst errors beyond RTOL: float32 4e-9, bfloat16 1.4e-4 (the sum of the teachers'
# bf16 chunk gradients rounds once more), float64 none.
NONE_GRAD_OUTPUT_SCALE = 0.04
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}
ATOL = {torch.float64: 1e-15, torch.float32: 2e-8, torch.bfloat16: 5e-4}
# (teacher form, options): the forms every teacher of a case takes ("mixed": teacher 0 dense, the
# others sparse; forward_kl as for every sparse teacher)
CASES = {
    "sparse": ("sparse", {"temperature": 2.0}),
    "tail": ("tail", {"teacher_kind": "logprobs", "tail": True}),
    "dense-jsd": ("dense", {"divergence": "jsd", "beta": 0.3, "temperature": 1.5}),
    "mixed": ("mixed", {"temperature": 2.0}),
}
BACKEND_DTYPES = [("torch", torch.float64), ("torch", torch.float32), ("cpu", torch.float32), ("cpu", torch.bfloat16)]


def make_student(dtype) -> dict:
    """hidden [*LEAD, H], weight [V, H], bias [V] and labels [*LEAD] with ignored rows."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, LEAD, generator=gen)
    labels.view(-1)[::4] = IGNORE
    return {
        "hidden": torch.randn(*LEAD, H, generator=gen).to(dtype),
        "weight": (torch.randn(V, H, generator=gen) * 0.4).to(dtype),
        "bias": (torch.randn(V, generator=gen) * 0.5).to(dtype),
        "labels": labels,
    }


def make_teacher(form: str, j: int, dtype) -> dict:
    """Teacher j's tensors in ``form``: dense, sparse logits, or sparse logprobs with a captured tail
    (the third teacher without one: its tail is recomputed from its values)."""
    gen = torch.Generator().manual_seed(100 + j)
    if form == "dense" or (form == "mixed" and j == 0):
        return {"teacher_logits": (torch.randn(*LEAD, V, generator=gen) * 2).to(dtype)}
    k = KS[j]
    indices = torch.rand(*LEAD, V, generator=gen).topk(k, dim=-1).indices
    indices.view(-1, k)[j::3, -2:] = -1  # some rows with empty slots
    values = torch.randn(*LEAD, k, generator=gen)
    teacher = {"teacher_indices": indices, "teacher_values": values.to(dtype)}
    if form == "tail":
        values = torch.log_softmax(values, -1) - 0.3  # 26% of the mass outside the slots
        teacher["teacher_values"] = values.to(dtype)
        mass = torch.where(indices >= 0, values.double().exp(), 0).sum(-1)
        teacher["teacher_tail"] = torch.log1p(-mass * 1.01).float() if j < 2 else None  # not 1 - sum: it is used
    return teacher


def stacked(teachers: list[dict]) -> dict:
    """The teachers as fused_linear_kd_loss's sequence arguments: one tuple per argument, None entries
    where a teacher lacks the tensor."""
    names = sorted({name for teacher in teachers for name in teacher})
    return {name: tuple(teacher.get(name) for teacher in teachers) for name in names}


def run(student: dict, grad_output, **options):
    """(loss, LossComponents, {leaf: grad}) of fused_linear_kd_loss on fresh leaves, all float64."""
    leaves = {name: student[name].detach().clone().requires_grad_() for name in ("hidden", "weight", "bias")}
    loss, parts = kdfast.fused_linear_kd_loss(
        leaves["hidden"], leaves["weight"], student["labels"], bias=leaves["bias"], return_components=True, **options
    )
    grad_output = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    grads = torch.autograd.grad(loss, list(leaves.values()), grad_output)
    return loss.detach().double(), parts, {name: g.double() for name, g in zip(leaves, grads)}


def weighted_singles(student, teachers, weights, grad_output, options):
    """{what: [term_j]}: per teacher j, its single-teacher call's share of the loss, ce (teacher 0
    only), kd and gradients; their sums are the expected values, their magnitudes the rounding bound."""
    terms: dict[str, list[torch.Tensor]] = {}
    for j, (teacher, weight) in enumerate(zip(teachers, weights)):
        share = {**options, "hard_weight": options["hard_weight"] if j == 0 else 0.0}
        share["soft_weight"] = options["soft_weight"] * weight
        loss, parts, grads = run(student, grad_output, **{k: v for k, v in teacher.items() if v is not None}, **share)
        terms.setdefault("loss", []).append(loss)
        terms.setdefault("kd", []).append(weight * parts.kd.double())
        if j == 0:
            terms["ce"] = [parts.ce.double()]
        for name, grad in grads.items():
            terms.setdefault(f"grad {name}", []).append(grad)
    return terms


def assert_sum_of_terms(actual: torch.Tensor, terms: list[torch.Tensor], dtype, what: str) -> None:
    """Per element |actual - sum_j term_j| <= ATOL + RTOL * sum_j |term_j|."""
    expected = torch.stack(terms).sum(0)
    magnitude = torch.stack(terms).abs().sum(0)
    actual = actual.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bound = ATOL[dtype] + RTOL[dtype] * magnitude
    bad = err > bound
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {err.numel()} entries out of tolerance, worst excess "
        f"{(err - bound).max().item():.3g} (error {err.max().item():.3g})"
    )


def assert_matches_weighted_singles(backend, dtype, case, n_teachers, reduction, chunk_size=CHUNK):
    form, case_options = CASES[case]
    student = make_student(dtype)
    teachers = [make_teacher(form, j, dtype) for j in range(n_teachers)]
    weights = WEIGHTS[n_teachers]
    grad_output = None
    if reduction == "none":
        grad_output = torch.randn(LEAD, generator=torch.Generator().manual_seed(1)) * NONE_GRAD_OUTPUT_SCALE
    options = dict(
        backend=backend, chunk_size=chunk_size, reduction=reduction, hard_weight=0.5, soft_weight=0.8,
        ignore_index=IGNORE, **case_options,
    )
    loss, parts, grads = run(student, grad_output, **stacked(teachers), teacher_weights=weights, **options)
    assert kdfast.last_backend() == backend
    expected = weighted_singles(student, teachers, weights, grad_output, options)
    assert_sum_of_terms(loss, expected["loss"], dtype, "loss")
    components_dtype = torch.float32 if dtype == torch.float64 else dtype  # LossComponents are float32
    assert_sum_of_terms(parts.ce, expected["ce"], components_dtype, "ce")
    assert_sum_of_terms(parts.kd, expected["kd"], components_dtype, "kd")
    for name, grad in grads.items():
        assert_sum_of_terms(grad, expected[f"grad {name}"], dtype, f"grad {name}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n_teachers", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=lambda x: str(x).removeprefix("torch."))
def test_equals_weighted_single_teacher_calls(backend, dtype, case, n_teachers, reduction):
    require_backend(backend)
    assert_matches_weighted_singles(backend, dtype, case, n_teachers, reduction)


@pytest.mark.parametrize("case, n_teachers, reduction", [("tail", 2, "mean"), ("dense-jsd", 3, "none")])
def test_triton_equals_weighted_single_teacher_calls(case, n_teachers, reduction):
    """Triton (under the interpreter without a GPU) is slow: two cases, float32."""
    require_backend("triton")
    assert_matches_weighted_singles("triton", torch.float32, case, n_teachers, reduction)


def test_one_chunk_by_default():
    """chunk_size=None: the 39 rows in one chunk, three logits buffers of 39 rows."""
    assert_matches_weighted_singles("torch", torch.float64, "sparse", 3, "mean", chunk_size=None)


def test_one_weighted_teacher_equals_the_plain_call():
    student = make_student(torch.float32)
    teacher = make_teacher("tail", 0, torch.float32)
    options = dict(teacher_kind="logprobs", tail=True, hard_weight=0.5, chunk_size=CHUNK)
    plain = run(student, None, **teacher, **options)
    weighted = run(student, None, **stacked([teacher]), teacher_weights=[1.0], **options)
    torch.testing.assert_close(weighted[0], plain[0], rtol=0, atol=0)
    assert all(torch.equal(got, want) for got, want in zip(weighted[1], plain[1]))  # ce, kd
    for name, grad in plain[2].items():
        torch.testing.assert_close(weighted[2][name], grad, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_size, n_teachers, chunks", [(CHUNK, 3, 4), (None, 2, 5), (None, 3, 7)])
def test_one_student_matmul_per_chunk(monkeypatch, chunk_size, n_teachers, chunks, reduction):
    """All teachers share each chunk's ``hidden @ weight.T`` (computed again in backward for "none"),
    and ``chunk_size=None`` sizes the chunks for all the logits buffers: 2 with two teachers, 3 with
    more. CHUNK_BYTES is set to 6 rows of three float32 buffers: 9 rows fit with two teachers
    (39 rows: 5 chunks of 8), 6 with three (7 chunks of 6)."""
    monkeypatch.setattr(fused_linear, "CHUNK_BYTES", 6 * 3 * V * 4)
    chunk_rows = []
    linear_into = fused_linear._linear_into

    def counting_linear_into(out, hidden, weight, bias):
        chunk_rows.append(hidden.shape[0])
        return linear_into(out, hidden, weight, bias)

    monkeypatch.setattr(fused_linear, "_linear_into", counting_linear_into)
    student = make_student(torch.float32)
    teachers = stacked([make_teacher("sparse", j, torch.float32) for j in range(n_teachers)])
    grad_output = torch.ones(LEAD) if reduction == "none" else None
    weights = WEIGHTS[n_teachers]
    run(student, grad_output, **teachers, teacher_weights=weights, chunk_size=chunk_size, reduction=reduction)
    passes = 2 if reduction == "none" else 1
    assert len(chunk_rows) == passes * chunks
    assert sum(chunk_rows) == passes * 39


@pytest.mark.parametrize("teachers, buffers", [(1, 1), (2, 2), (3, 3), (8, 3)])
def test_default_chunk_rows_counts_every_logits_buffer(teachers, buffers):
    rows, vocab, dtype = 4096, 128256, torch.float32
    assert fused_linear.logits_buffers(teachers) == buffers
    chunk = fused_linear.default_chunk_rows(rows, vocab, dtype, teachers)
    assert buffers * chunk * vocab * 4 <= fused_linear.CHUNK_BYTES
    assert buffers * (chunk + 1) * vocab * 4 > fused_linear.CHUNK_BYTES / 1.1  # not far below the budget


def test_reduction_none_detects_a_later_teacher_modified_before_backward():
    student = make_student(torch.float32)
    teachers = [make_teacher("sparse", j, torch.float32) for j in range(2)]
    hidden = student["hidden"].requires_grad_()
    loss = kdfast.fused_linear_kd_loss(
        hidden, student["weight"], student["labels"], **stacked(teachers), teacher_weights=(0.5, 0.5),
        reduction="none", chunk_size=CHUNK,
    )
    teachers[1]["teacher_values"].mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def test_bad_row_of_one_teacher_keeps_the_others_gradient():
    """A NaN teacher value makes the row's loss NaN; that teacher adds no gradient to the row, the
    other teachers' shares stay (docs/loss.md, "Several teachers")."""
    student = make_student(torch.float64)
    teachers = [make_teacher("sparse", j, torch.float64) for j in range(2)]
    teachers[1]["teacher_values"][0, 1, 0] = torch.nan  # row 1, a valid slot
    options = dict(backend="torch", reduction="none", hard_weight=0.5, chunk_size=CHUNK)
    loss, _, grads = run(student, None, **stacked(teachers), teacher_weights=(0.7, 0.5), **options)
    first, _, first_grads = run(student, None, **teachers[0], soft_weight=0.7, **options)
    assert torch.isnan(loss[0, 1]) and bool(torch.isfinite(loss.view(-1)[2:]).all())
    torch.testing.assert_close(grads["hidden"][0, 1], first_grads["hidden"][0, 1], rtol=1e-12, atol=1e-15)
    assert first_grads["hidden"][0, 1].abs().max() > 1e-3  # teacher 0's share of the row is not zero


def _call(student, **arguments):
    return kdfast.fused_linear_kd_loss(student["hidden"], student["weight"], student["labels"], **arguments)


def _sparse(n: int) -> dict:
    return stacked([make_teacher("sparse", j, torch.float32) for j in range(n)])


def _tail(n: int) -> dict:
    return stacked([make_teacher("tail", j, torch.float32) for j in range(n)])


def _with(arguments: dict, name: str, j: int, tensor) -> dict:
    """``arguments`` with teacher j's ``name`` replaced."""
    entries = list(arguments[name])
    entries[j] = tensor
    return {**arguments, name: tuple(entries)}


def _duplicate_slot(arguments: dict, j: int) -> dict:
    indices = arguments["teacher_indices"][j].clone()
    indices[0, 0, 1] = indices[0, 0, 0]
    return _with(arguments, "teacher_indices", j, indices)


_ONLINE = {"teacher_hidden": torch.randn(*LEAD, 8), "teacher_weight": torch.randn(V, 8)}
_TAIL = {"teacher_kind": "logprobs", "tail": True}


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({**_sparse(3), "teacher_weights": (0.5, 0.5)}, "teacher_indices holds 3 tensors but teacher_weights holds 2"),
        (
            {**_sparse(2), "teacher_values": _sparse(3)["teacher_values"], "teacher_weights": (0.5, 0.5)},
            "teacher_values holds 3 tensors but teacher_weights holds 2",
        ),
        (
            {**_tail(2), "teacher_tail": _tail(3)["teacher_tail"][:1], "teacher_weights": (0.5, 0.5), **_TAIL},
            "teacher_tail holds 1 tensors but teacher_weights holds 2",
        ),
        (
            {"teacher_logits": torch.randn(*LEAD, V), "teacher_weights": (1.0,)},
            "with teacher_weights, teacher_logits must be a list or tuple with one tensor per teacher, got Tensor",
        ),
        (
            {**_sparse(1), "teacher_values": _sparse(1)["teacher_values"][0], "teacher_weights": [1.0]},
            "with teacher_weights, teacher_values must be a list or tuple",
        ),
        ({**_sparse(2), "teacher_weights": 0.5}, "teacher_weights must be a non-empty list or tuple of numbers"),
        ({**_sparse(2), "teacher_weights": ()}, "teacher_weights must be a non-empty list or tuple of numbers"),
        ({**_sparse(2), "teacher_weights": torch.ones(2)}, "teacher_weights must be a non-empty list or tuple"),
        ({**_sparse(2), "teacher_weights": (0.5, -0.1)}, r"teacher_weights\[1\] must be >= 0, got -0.1"),
        ({**_sparse(2), "teacher_weights": (0.5, float("nan"))}, r"teacher_weights\[1\] must be finite, got nan"),
        ({**_sparse(2), "teacher_weights": (float("inf"), 1.0)}, r"teacher_weights\[0\] must be finite, got inf"),
        ({**_sparse(2), "teacher_weights": (0.5, "x")}, r"teacher_weights\[1\] must be a number, got 'x'"),
        ({**_sparse(2), "teacher_weights": (0.0, 0.0)}, r"teacher_weights must have a positive sum, got \(0.0, 0.0\)"),
        ({**_ONLINE, "teacher_weights": (1.0,)}, "not an online teacher; got teacher_hidden"),
        (_sparse(2), "teacher_indices is a tuple, as for several teachers, but teacher_weights is None"),
        ({"teacher_logits": [torch.randn(*LEAD, V)]}, "teacher_logits is a list, as for several teachers"),
        (
            {**_sparse(2), "teacher_weights": (1.0, 1.0), "teacher_values": (_sparse(1)["teacher_values"][0], None)},
            "teacher 1: a sparse teacher needs both teacher_indices and teacher_values",
        ),
        (
            _with({**_sparse(2), "teacher_weights": (1.0, 1.0)}, "teacher_values", 1, torch.randn(*LEAD, 4)),
            r"teacher 1: teacher_indices shape \(3, 13, 5\) != teacher_values shape \(3, 13, 4\)",
        ),
        (
            {**_sparse(2), "teacher_weights": (1.0, 1.0), "teacher_logits": (torch.randn(*LEAD, V), None)},
            "teacher 0: give exactly one teacher",
        ),
        (
            {**_sparse(2), "teacher_weights": (1.0, 1.0), "teacher_logits": (None, None), "divergence": "jsd"},
            "teacher 0: divergence='jsd' needs dense teacher_logits",
        ),
        (
            {**_sparse(2), "teacher_weights": (1.0, 1.0), "teacher_tail": (None, torch.zeros(LEAD))},
            "teacher 1: teacher_tail is only used with teacher_kind='logprobs' and tail=True",
        ),
        (_duplicate_slot({**_sparse(3), "teacher_weights": (1, 1, 1)}, 2), r"teacher_indices\[2\] must be unique"),
        (
            _with({**_sparse(2), "teacher_weights": (1, 1)}, "teacher_indices", 1, torch.full((*LEAD, 5), V)),
            r"teacher_indices\[1\] must be in \[0, 131\) or -1",
        ),
    ],
)
def test_bad_teachers_raise_value_error(arguments, message):
    with pytest.raises(ValueError, match=f"^fused_linear_kd_loss: .*{message}"):
        _call(make_student(torch.float32), **arguments)
