"""The Triton backend at the edges of the loss contract (issue "the loss contract holds at its edges").

Each test calls the backend entry point ``kdfast.ops.triton.kd_loss.kd_loss`` directly, as kdfast.api
does after validation, so that the kernels see what the API would refuse (value checks off, torch.compile)
and compares PER ELEMENT against a float64 oracle: ``kdfast.reference`` in float64, or the formula
written out here where the reference itself cancels (the tail bucket of a confident student).
Rows span several vocabulary blocks (BLOCK_V = 128, autouse fixture) under TRITON_INTERPRET=1.
The last test needs CUDA: V = 128256 with N * V > 2^31 against a row-chunked float64 reference.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kdfast import reference
from kdfast._contract import TEMPERATURE_RANGE, LossOptions
from tests.conftest import assert_close_to_oracle, backend_device, require_backend

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy under the interpreter

triton_kd = pytest.importorskip("kdfast.ops.triton.kd_loss")
SMALL_BLOCK = 128
FLT_MIN = torch.finfo(torch.float32).tiny


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    require_backend("triton")
    monkeypatch.setattr(triton_kd, "_INTERPRET_BLOCK_V", SMALL_BLOCK)
    for kind, params in list(triton_kd._LAUNCH.items()):
        monkeypatch.setitem(triton_kd._LAUNCH, kind, dataclasses.replace(params, block_v=SMALL_BLOCK))


DEVICE = backend_device("triton")


def backend(logits, labels=None, *, teacher_logits=None, teacher_indices=None, teacher_values=None, teacher_tail=None,
            num_items=None, compute_grad=None, **options):
    """(loss, ce_rows, div_rows) of the Triton backend on ``DEVICE`` with api.py's divisor; compute_grad
    defaults to what api.py passes (the logits need a gradient)."""
    def dev(tensor):
        return None if tensor is None else tensor.to(DEVICE)

    if compute_grad is None:
        compute_grad = logits.requires_grad and torch.is_grad_enabled()
    opts = LossOptions(**options, compute_grad=compute_grad)
    divisor = None
    if opts.reduction == "mean":
        active = torch.ones(logits.shape[0], dtype=torch.bool) if labels is None else labels.cpu() != opts.ignore_index
        divisor = reference.mean_divisor(active, num_items, torch.float32).to(DEVICE)
    return triton_kd.kd_loss(logits, dev(labels), dev(teacher_logits), dev(teacher_indices), dev(teacher_values),
                             dev(teacher_tail), divisor, opts)


def rows_and_grad(student, labels=None, **kwargs):
    """Per-row loss (reduction="none"), div_rows and d sum(loss) / d student of the backend on float32
    logits, returned on the CPU in float64."""
    logits = student.detach().to(DEVICE, torch.float32).requires_grad_(True)
    loss, _, div_rows = backend(logits, labels, reduction="none", **kwargs)
    loss.backward(torch.ones_like(loss))
    return loss.detach().cpu().double(), div_rows.cpu().double(), logits.grad.cpu().double()


def oracle_rows_and_grad(student, labels=None, **kwargs):
    """float64 kdfast.reference: per-row loss and d sum(loss) / d student."""
    z = student.detach().double().requires_grad_(True)
    float64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    loss = reference.kd_loss(z, labels, reduction="none", **float64)
    loss.sum().backward()
    return loss.detach(), z.grad


def assert_per_element(actual, expected, what, rtol, atol=0.0):
    """|actual - expected| <= atol + rtol |expected| on every entry (NaN fails)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = ~(err <= bound)
    if bad.any():
        worst = int(torch.where(bad, err - bound, torch.zeros_like(err)).nan_to_num(math.inf).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {expected.numel()} entries out of tolerance; worst flat index {worst}: got "
            f"{actual.reshape(-1)[worst].item():.6e}, expected {expected.reshape(-1)[worst].item():.6e}"
        )


def sparse_problem(n=4, vocab=1000, k=8, seed=0):
    """float64 student [n, V] ~ N(0, 1), teacher logits 2 N(0, 1), its top-k slots and their log-probs."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    teacher = 2 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    indices = teacher.topk(k, dim=-1).indices
    log_p = torch.log_softmax(teacher, -1).gather(1, indices)
    return student, teacher, indices, log_p


# --------------------------------------------------------------------------------------------
# 1, 2. The tail bucket: exact q_rest for a confident student; teacher_tail used when given
# --------------------------------------------------------------------------------------------


def tail_oracle(student, indices, values, p_rest):
    """float64 rows of D = sum_I p_i log(p_i / q_i) + p_rest log(p_rest / q_rest) with q_rest the off-slot
    sum itself (log-sum-exp over the non-slot entries, no 1 - Q), and d sum(D) / d student."""
    z = student.detach().double().clone().requires_grad_(True)
    log_q = torch.log_softmax(z, -1)
    on_slot = torch.zeros_like(z, dtype=torch.bool).scatter_(1, indices, True)
    log_q_rest = torch.logsumexp(log_q.masked_fill(on_slot, -math.inf), -1).clamp(min=math.log(FLT_MIN))
    log_p = values.double()
    p = log_p.exp()
    rest = torch.where(p_rest > 0, p_rest * (p_rest.log() - log_q_rest), torch.zeros_like(p_rest))
    rows = (p * (log_p - log_q.gather(1, indices))).sum(-1) + rest
    rows.sum().backward()
    return rows.detach(), z.grad


@pytest.mark.parametrize("given_tail", [False, True], ids=["recomputed-tail", "teacher_tail"])
def test_tail_bucket_with_a_confident_student_matches_float64(given_tail):
    """k = 8, T = 1, student logit 40 on the teacher's top-1: q_rest ~ 1e-15 is lost in 1 - Q."""
    student, _, indices, log_p = sparse_problem()
    student[torch.arange(4), indices[:, 0]] = 40.0
    values = log_p.float()
    p_rest = (1 - values.double().exp().sum(-1)).clamp(min=0)
    tail = p_rest.log().float() if given_tail else None
    if given_tail:
        p_rest = tail.double().exp()
    expected_rows, expected_grad = tail_oracle(student, indices, values, p_rest)
    rows, div_rows, grad = rows_and_grad(student, teacher_indices=indices, teacher_values=values, teacher_tail=tail,
                                         teacher_kind="logprobs", tail=True)
    assert_per_element(rows, expected_rows, "loss rows", rtol=1e-3)
    assert_per_element(div_rows, expected_rows, "div rows", rtol=1e-3)
    large = expected_grad.abs() > 1e-30
    assert_per_element(grad[large], expected_grad[large], "gradient entries above 1e-30", rtol=1e-3)
    assert_per_element(grad[~large], expected_grad[~large], "gradient entries below 1e-30", rtol=0.0, atol=1e-29)


def test_tail_bucket_gradient_does_not_overflow_for_a_huge_ratio():
    """Student logit 80 on a slot: r = p_rest / q_rest ~ 1e31 times c / T = 1e8 would overflow float32 if
    formed before multiplying by q_j (q_j stays a normal float, so the GPU's flush-to-zero does not matter)."""
    student, _, indices, log_p = sparse_problem(n=3)
    student[torch.arange(3), indices[:, 0]] = 80.0
    values = log_p.float()
    p_rest = (1 - values.double().exp().sum(-1)).clamp(min=0)
    expected_rows, expected_grad = tail_oracle(student, indices, values, p_rest)
    rows, _, grad = rows_and_grad(student, teacher_indices=indices, teacher_values=values, teacher_kind="logprobs",
                                  tail=True, soft_weight=1e8)
    assert_per_element(rows, 1e8 * expected_rows, "loss rows", rtol=1e-3)
    assert_per_element(grad, 1e8 * expected_grad, "gradient", rtol=1e-3, atol=1e-30)


def test_teacher_tail_replaces_the_mass_recomputed_from_rounded_values():
    """bf16 slot values with the exact tail: the kernel must use exp(teacher_tail), not 1 - sum exp(values)."""
    student, teacher, indices, log_p = sparse_problem(k=16)
    values = log_p.to(torch.bfloat16).float()
    tail = torch.log1p(-log_p.exp().sum(-1)).float()  # exact, from the float64 teacher
    tail[2] = -math.inf  # no mass outside the slots
    expected_rows, expected_grad = tail_oracle(student, indices, values, tail.double().exp())
    recomputed_rows, _ = tail_oracle(student, indices, values, (1 - values.double().exp().sum(-1)).clamp(min=0))
    assert (recomputed_rows - expected_rows).abs().max() > 1e-3 * expected_rows.abs().max()  # the test can fail
    rows, _, grad = rows_and_grad(student, teacher_indices=indices, teacher_values=values, teacher_tail=tail,
                                  teacher_kind="logprobs", tail=True)
    assert_per_element(rows, expected_rows, "loss rows", rtol=1e-5, atol=1e-6)
    assert_per_element(grad, expected_grad, "gradient", rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------
# 3. Strided, expanded and sliced inputs
# --------------------------------------------------------------------------------------------


def test_strided_expanded_and_sliced_inputs_give_the_reference_answer():
    n, vocab, k = 5, 700, 6
    student, teacher, indices, log_p = sparse_problem(n=n, vocab=vocab, k=k)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    options = dict(temperature=1.5, hard_weight=0.5)
    # labels with stride 2, logits rows with stride V + 3, slot tensors with stride 2 in the last dim.
    strided_labels = torch.stack([labels, torch.zeros_like(labels)], 1)[:, 0]
    wide = torch.zeros(n, vocab + 3, dtype=torch.float32, device=DEVICE)
    wide[:, :vocab] = student.float()
    wide.requires_grad_(True)
    wide_indices = torch.stack([indices, indices], -1).reshape(n, 2 * k)[:, ::2]
    wide_values = torch.stack([log_p, log_p], -1).reshape(n, 2 * k)[:, ::2].float()
    loss, _, _ = backend(wide[:, :vocab], strided_labels, teacher_indices=wide_indices, teacher_values=wide_values,
                         teacher_kind="logprobs", reduction="sum", **options)
    loss.backward()
    z = student.clone().requires_grad_(True)
    expected = reference.kd_loss(z, labels, teacher_indices=indices, teacher_values=log_p, teacher_kind="logprobs",
                                 reduction="sum", **options)
    expected.backward()
    same = student.float().requires_grad_(True)
    same_loss = reference.kd_loss(same, labels, teacher_indices=indices, teacher_values=log_p.float(),
                                  teacher_kind="logprobs", reduction="sum", **options)
    same_loss.backward()
    assert_close_to_oracle(loss, same_loss, expected, torch.float32, "loss")
    assert_close_to_oracle(wide.grad[:, :vocab], same.grad, z.grad, torch.float32, "grad")
    assert float(wide.grad[:, vocab:].abs().max()) == 0.0

    # One label expanded over every row (stride 0) and one teacher row expanded over the batch.
    label = torch.tensor(7).expand(n)
    teacher_row = teacher[:1].float().expand(n, vocab)
    loss, _, _ = backend(student.float().to(DEVICE), label, teacher_logits=teacher_row, reduction="none", **options)
    expected = reference.kd_loss(student, label.clone(), teacher_logits=teacher[:1].expand(n, vocab), reduction="none",
                                 **options)
    assert_per_element(loss, expected, "expanded inputs", rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 4, 7, 12. Bad rows: out-of-range labels / indices, duplicate indices, non-finite teacher values
# --------------------------------------------------------------------------------------------


def assert_bad_rows(rows, grad, bad, expected_rows, expected_grad, what):
    """NaN loss and zero gradient on ``bad`` rows; the reference's answer on the others."""
    assert torch.isnan(rows[bad]).all(), f"{what}: bad rows {rows[bad].tolist()} are not NaN"
    assert float(grad[bad].abs().max()) == 0.0, f"{what}: bad rows have a non-zero gradient"
    good = ~bad
    assert_per_element(rows[good], expected_rows[good], f"{what}: good rows", rtol=1e-5, atol=1e-5)
    assert_per_element(grad[good], expected_grad[good], f"{what}: good rows' gradient", rtol=1e-4, atol=1e-7)


def test_out_of_range_labels_give_nan_rows_zero_gradient_and_no_stray_writes():
    """With the host check off, labels 10**9 and -7 are bad rows; inplace writes stay inside the rows."""
    n, vocab = 6, 500
    student, teacher, _, _ = sparse_problem(n=n, vocab=vocab)
    labels = torch.tensor([10**9, -7, 3, -100, 499, 10**9 + 17])
    bad = torch.tensor([True, True, False, False, False, True])
    safe = torch.where(bad, -100, labels)
    options = dict(hard_weight=0.7, temperature=2.0)
    expected_rows, expected_grad = oracle_rows_and_grad(student, safe, teacher_logits=teacher, **options)
    rows, _, grad = rows_and_grad(student, labels, teacher_logits=teacher.float(), **options)
    assert_bad_rows(rows, grad, bad, expected_rows, expected_grad, "dense")

    # inplace into rows 1..n of a buffer whose first and last rows are canaries.
    buffer = torch.full((n + 2, vocab), 123.0, device=DEVICE)
    buffer[1:-1] = student.float()
    logits = buffer[1:-1]
    opts = LossOptions(hard_weight=0.7, temperature=2.0, reduction="none", inplace=True, compute_grad=True)
    with torch.no_grad():
        loss, _, _ = triton_kd.kd_loss(logits, labels.to(DEVICE), teacher.float().to(DEVICE), None, None, None, None,
                                       opts)
    assert torch.isnan(loss.cpu()[bad]).all()
    assert bool((buffer[0] == 123.0).all()) and bool((buffer[-1] == 123.0).all()), "a write left the logits' rows"
    assert_per_element(buffer[1:-1].cpu(), torch.where(bad[:, None], 0.0, expected_grad), "inplace gradient",
                       rtol=1e-4, atol=1e-7)


def test_out_of_range_indices_give_nan_rows_and_zero_gradient():
    n, vocab, k = 5, 500, 8
    student, _, indices, log_p = sparse_problem(n=n, vocab=vocab, k=k)
    labels = torch.tensor([1, 2, 3, 4, 5])
    bad_indices = indices.clone()
    bad_indices[0, 3] = vocab  # one past the end
    bad_indices[1, 0] = -2
    bad_indices[3, 7] = 10**12
    bad = torch.tensor([True, True, False, True, False])
    options = dict(hard_weight=0.5, teacher_kind="logprobs", tail=True)
    expected_rows, expected_grad = oracle_rows_and_grad(student, labels, teacher_indices=indices, teacher_values=log_p,
                                                        **options)
    rows, _, grad = rows_and_grad(student, labels, teacher_indices=bad_indices, teacher_values=log_p.float(), **options)
    assert_bad_rows(rows, grad, bad, expected_rows, expected_grad, "logprobs-tail")


@pytest.mark.parametrize("kind", ["logits", "probs", "logprobs-tail"])
def test_duplicate_valid_indices_give_a_nan_row_and_zero_gradient(kind):
    student, teacher, indices, log_p = sparse_problem(n=4, k=8)
    values = {"logits": teacher.gather(1, indices), "probs": log_p.exp(), "logprobs-tail": log_p}[kind]
    options = dict(teacher_kind="logprobs", tail=True) if kind == "logprobs-tail" else dict(teacher_kind=kind)
    expected_rows, expected_grad = oracle_rows_and_grad(student, teacher_indices=indices, teacher_values=values,
                                                        **options)
    duplicated = indices.clone()
    duplicated[1, 5] = duplicated[1, 2]
    duplicated[3, 7] = -1  # an empty slot, and a repeated -1, are not duplicates
    duplicated[3, 6] = -1
    values = values.clone()
    values[3, 6:] = 0.0 if kind == "probs" else -math.inf
    expected_rows[3], expected_grad[3] = (t[0] for t in oracle_rows_and_grad(
        student[3:4], teacher_indices=duplicated[3:4], teacher_values=values[3:4], **options))
    rows, _, grad = rows_and_grad(student, teacher_indices=duplicated, teacher_values=values.float(), **options)
    assert_bad_rows(rows, grad, torch.tensor([False, True, False, False]), expected_rows, expected_grad, kind)


def test_duplicates_are_found_across_the_check_blocks_of_a_large_k():
    """k = 40: the duplicate check compares 32 slots at a time; a pair in different blocks is still found."""
    student, teacher, indices, _ = sparse_problem(n=3, k=40)
    values = teacher.gather(1, indices)
    expected_rows, expected_grad = oracle_rows_and_grad(student, teacher_indices=indices, teacher_values=values)
    duplicated = indices.clone()
    duplicated[0, 37] = duplicated[0, 3]
    duplicated[2, 39] = duplicated[2, 38]
    rows, _, grad = rows_and_grad(student, teacher_indices=duplicated, teacher_values=values.float())
    assert_bad_rows(rows, grad, torch.tensor([True, False, True]), expected_rows, expected_grad, "k = 40")


def test_non_finite_dense_teacher_gives_nan_rows():
    student, teacher, _, _ = sparse_problem(n=5, vocab=600)
    teacher = teacher.clone()
    teacher[0, :256] = -math.inf  # allowed: zero mass
    teacher[1, 300] = math.nan
    teacher[2, 599] = math.inf
    teacher[4, 0] = math.nan
    bad = torch.tensor([False, True, True, False, True])
    for divergence in ("forward_kl", "jsd"):
        options = dict(divergence=divergence, hard_weight=0.3)
        clean = torch.where(bad[:, None], 0.0, teacher)
        expected_rows, expected_grad = oracle_rows_and_grad(student, teacher_logits=clean, **options)
        rows, _, grad = rows_and_grad(student, teacher_logits=teacher.float(), **options)
        assert_bad_rows(rows, grad, bad, expected_rows, expected_grad, divergence)


@pytest.mark.parametrize("kind", ["logits", "probs", "logprobs-tail", "teacher_tail"])
def test_non_finite_sparse_teacher_values_give_nan_rows(kind):
    student, teacher, indices, log_p = sparse_problem(n=4, k=8)
    values = {"logits": teacher.gather(1, indices), "probs": log_p.exp()}.get(kind, log_p).clone()
    options = dict(teacher_kind=kind) if kind in ("logits", "probs") else dict(teacher_kind="logprobs", tail=True)
    expected_rows, expected_grad = oracle_rows_and_grad(student, teacher_indices=indices, teacher_values=values,
                                                        **options)
    tail = None
    if kind == "teacher_tail":
        tail = torch.log1p(-log_p.exp().sum(-1)).float()
        tail[2] = math.nan
        bad = torch.tensor([False, False, True, False])
    else:
        values[0, 1] = math.nan
        values[2, 7] = math.inf
        if kind == "probs":
            values[3, 0] = -math.inf
        bad = torch.tensor([True, False, True, kind == "probs"])
    rows, _, grad = rows_and_grad(student, teacher_indices=indices, teacher_values=values.float(), teacher_tail=tail,
                                  **options)
    assert_bad_rows(rows, grad, bad, expected_rows, expected_grad, kind)


# --------------------------------------------------------------------------------------------
# 6. fp16 gradients under loss scaling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_scale", [2.0**12, 2.0**16])
def test_fp16_gradient_under_loss_scaling_matches_fp32_autograd(loss_scale):
    """num_items = 16384 puts the "mean" gradient at ~1e-8 per entry, below fp16's subnormals: it must not be
    stored at grad_output = 1 and scaled afterwards."""
    n, vocab = 16, 4096
    gen = torch.Generator().manual_seed(3)
    student = (2 * torch.randn(n, vocab, generator=gen)).half()
    teacher = (2 * torch.randn(n, vocab, generator=gen)).half()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    options = dict(hard_weight=0.5, temperature=2.0)
    z = student.float().requires_grad_(True)
    (reference.kd_loss(z, labels, teacher_logits=teacher.float(), num_items=16384, **options) * loss_scale).backward()
    logits = student.to(DEVICE).requires_grad_(True)
    loss, _, _ = backend(logits, labels, teacher_logits=teacher, num_items=16384, **options)
    (loss * loss_scale).backward()
    grad = logits.grad.cpu()
    assert grad.dtype == torch.float16 and torch.isfinite(grad).all()
    l1 = float((grad.double() - z.grad.double()).abs().sum() / z.grad.double().abs().sum())
    assert l1 < 0.01, f"L1 error {l1:.4f} of the unscaled fp16 gradient; {float((grad == 0).float().mean()):.1%} zeros"


def test_fp16_buffer_without_autograd_holds_the_divided_gradient():
    """kdfast.fused_linear's contract: under no_grad with inplace=True the buffer is d loss / d logits."""
    n, vocab = 8, 1000
    student, teacher, _, _ = sparse_problem(n=n, vocab=vocab)
    labels = torch.arange(n) * 7
    options = dict(hard_weight=0.5, temperature=2.0)
    z = student.half().double().requires_grad_(True)
    reference.kd_loss(z, labels, teacher_logits=teacher.half().double(), num_items=4, **options).backward()
    logits = student.half().to(DEVICE)
    with torch.no_grad():
        backend(logits, labels, teacher_logits=teacher.half(), num_items=4, inplace=True, compute_grad=True, **options)
    assert_per_element(logits.cpu(), z.grad, "buffer", rtol=2e-3, atol=2.0**-23)


# --------------------------------------------------------------------------------------------
# 8, 14. Shift invariance and extreme temperatures (the divergence term on its own)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_kl_is_shift_invariant(divergence):
    """Teacher + 5000, student - 5000 at T = 1: the same D as unshifted, per row, to float32 precision."""
    student, teacher, _, _ = sparse_problem(n=4, vocab=800)
    student, teacher = (student - 5000).float().double(), (teacher + 5000).float().double()
    expected_rows, expected_grad = oracle_rows_and_grad(student, teacher_logits=teacher, divergence=divergence)
    rows, div_rows, grad = rows_and_grad(student, teacher_logits=teacher.float(), divergence=divergence)
    assert_per_element(div_rows, expected_rows, "D", rtol=1e-5, atol=2e-5)
    assert_close_to_oracle(grad, expected_grad, expected_grad, torch.float32, "gradient")


def test_reverse_kl_gradient_at_the_students_mode_is_exact():
    """T = 0.05, logits ~1e4: q is one-hot at the mode, where the exact gradient is 0; an ulp of D (~1e5)
    left there would be (1/T) x 0.0078."""
    gen = torch.Generator().manual_seed(5)
    n, vocab = 4, 600
    teacher = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 3000).float().double()
    student = (teacher * 0.5 + torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2000).float().double()
    options = dict(divergence="reverse_kl", temperature=0.05)
    expected_rows, expected_grad = oracle_rows_and_grad(student, teacher_logits=teacher, **options)
    rows, div_rows, grad = rows_and_grad(student, teacher_logits=teacher.float(), **options)
    assert_per_element(div_rows, expected_rows / 0.05**2, "D", rtol=1e-5)
    mode = student.argmax(-1, keepdim=True)
    assert_per_element(grad.gather(1, mode), expected_grad.gather(1, mode), "gradient at the mode", rtol=0, atol=1e-6)
    assert_per_element(grad, expected_grad, "gradient", rtol=1e-4, atol=1e-6)


EXTREME_CASES = {
    "forward_kl": dict(divergence="forward_kl"),
    "reverse_kl": dict(divergence="reverse_kl"),
    "jsd": dict(divergence="jsd", beta=0.3),
    "logprobs-tail": dict(teacher_kind="logprobs", tail=True),
}


@pytest.mark.parametrize("temperature", [1e-2, 1e2])
@pytest.mark.parametrize("case", list(EXTREME_CASES))
def test_extreme_temperatures_are_accurate_per_element(case, temperature):
    """The ends of TEMPERATURE_RANGE with logits of +-5000 that vary by a few T within a row (T = 1e-2: scaled
    logits of 5e5): D per row and the gradient per element vs float64."""
    assert temperature in TEMPERATURE_RANGE
    gen = torch.Generator().manual_seed(7)
    n, vocab = 4, 500
    base = 3 * temperature * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    teacher = (5000 + base).float().double()
    student = (base - 5000 + temperature * torch.randn(n, vocab, generator=gen, dtype=torch.float64)).float().double()
    options = dict(EXTREME_CASES[case], temperature=temperature)
    if "teacher_kind" in options:
        indices = teacher.topk(16, dim=-1).indices
        values = torch.log_softmax(teacher / temperature, -1).gather(1, indices).float().double()
        teacher_args = dict(teacher_indices=indices, teacher_values=values)
    else:
        teacher_args = dict(teacher_logits=teacher)
    expected_rows, expected_grad = oracle_rows_and_grad(student, **teacher_args, **options)
    ours = {key: value.float() if value.is_floating_point() else value for key, value in teacher_args.items()}
    _, div_rows, grad = rows_and_grad(student, **ours, **options)
    assert_per_element(div_rows, expected_rows / temperature**2, "D", rtol=1e-4, atol=1e-5)
    assert_close_to_oracle(grad, expected_grad, expected_grad, torch.float32, "gradient")


# --------------------------------------------------------------------------------------------
# 15. JSD over a masked vocabulary
# --------------------------------------------------------------------------------------------


def test_jsd_with_a_masked_vocabulary_is_finite_and_exact():
    """Student and teacher both -inf on padded entries (the last 200 columns): the loss of the unpadded
    vocabulary, and a zero gradient on the padding (autograd through the reference gives NaN there)."""
    student, teacher, _, _ = sparse_problem(n=4, vocab=700)
    options = dict(divergence="jsd", beta=0.4, temperature=1.3, hard_weight=0.2)
    labels = torch.tensor([1, 2, 3, 499])
    expected_rows, expected_grad = oracle_rows_and_grad(student[:, :500], labels, teacher_logits=teacher[:, :500],
                                                        **options)
    expected_grad = torch.cat([expected_grad, torch.zeros(4, 200, dtype=torch.float64)], 1)
    student[:, 500:] = -math.inf
    teacher[:, 500:] = -math.inf
    assert torch.isfinite(reference.kd_loss(student, labels, teacher_logits=teacher, reduction="none", **options)).all()
    rows, _, grad = rows_and_grad(student, labels, teacher_logits=teacher.float(), **options)
    assert_per_element(rows, expected_rows, "loss rows", rtol=1e-5, atol=1e-6)
    assert_per_element(grad, expected_grad, "gradient", rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------
# GPU only: V = 128256 and N * V > 2^31 against a row-chunked float64 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["forward_kl", "logprobs-tail"])
def test_cuda_llama3_vocabulary_beyond_2_31_elements(monkeypatch, case):
    """bf16 [16800, 128256] (2.15e9 elements, > 2^31): every row against float64, 512 rows at a time."""
    monkeypatch.undo()  # the real launch parameters, not the small blocks
    n, vocab, chunk = 16800, 128256, 512
    assert n * vocab > 2**31
    gen = torch.Generator(device="cuda").manual_seed(11)
    student = (2 * torch.randn(n, vocab, generator=gen, device="cuda")).bfloat16()
    labels = torch.randint(0, vocab, (n,), generator=gen, device="cuda")
    options = dict(hard_weight=0.5, temperature=2.0) if case == "forward_kl" else dict(
        hard_weight=0.5, teacher_kind="logprobs", tail=True)
    if case == "forward_kl":
        teacher = (2 * torch.randn(n, vocab, generator=gen, device="cuda")).bfloat16()
        teacher_args = dict(teacher_logits=teacher)
    else:
        teacher_logits = 2 * torch.randn(n, vocab, generator=gen, device="cuda")
        top = teacher_logits.topk(64, dim=-1)
        log_z = torch.logsumexp(teacher_logits, -1, keepdim=True)
        teacher_args = dict(teacher_indices=top.indices, teacher_values=(top.values - log_z).float())
        del teacher_logits
    logits = student.requires_grad_(True)
    loss, _, _ = backend(logits, labels, reduction="none", **teacher_args, **options)
    loss.backward(torch.ones_like(loss))
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        part = {key: value[rows] for key, value in teacher_args.items()}
        z = student[rows].detach().double().requires_grad_(True)
        part64 = {key: value.double() if value.is_floating_point() else value for key, value in part.items()}
        expected = reference.kd_loss(z, labels[rows], reduction="none", **part64, **options)
        expected.sum().backward()
        zs = student[rows].detach().requires_grad_(True)
        same = reference.kd_loss(zs, labels[rows], reduction="none", **part, **options)
        same.sum().backward()
        assert_close_to_oracle(loss[rows], same, expected, torch.bfloat16, f"loss rows {start}+")
        assert_close_to_oracle(logits.grad[rows], zs.grad, z.grad, torch.bfloat16, f"grad rows {start}+")
