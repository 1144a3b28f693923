"""The cpu backend at the edges of the loss contract (issue 17): the tail bucket with a confident
student and an exact teacher tail, bad rows, in-place autograd, fp16 loss scaling, extreme
temperatures, masked vocabularies and strided inputs.

The backend entry point (``kdfast.ops.cpu.kd_loss.kd_loss``, see ``kdfast._contract``) is called
directly, so these tests see what the kernel does with value checks off. Every comparison is per
element against float64 (``kdfast.reference`` or the formula written out here).
"""
from __future__ import annotations

import math

import pytest
import torch

import kdfast
from kdfast import reference
from kdfast._contract import LossOptions

pytestmark = pytest.mark.skipif("cpu" not in kdfast.available_backends(), reason="kdfast._C is not built")

FLT_MIN = torch.finfo(torch.float32).tiny  # the q_rest floor of the tail bucket


def _cpu(logits, labels=None, teacher_logits=None, teacher_indices=None, teacher_values=None, teacher_tail=None,
         divisor=None, **options):
    from kdfast.ops.cpu import kd_loss as cpu

    return cpu.kd_loss(logits, labels, teacher_logits, teacher_indices, teacher_values, teacher_tail, divisor,
                       LossOptions(**options))


def _loss_and_grad(student, grad_output=None, **kwargs):
    """(loss, ce_rows, div_rows, d loss / d student) from the cpu backend."""
    z = student.clone().requires_grad_(True)
    loss, ce_rows, div_rows = _cpu(z, **kwargs)
    (grad,) = torch.autograd.grad(loss, z, torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), ce_rows, div_rows, grad


def _assert_per_element(actual, expected, rtol, atol, what):
    """|actual - expected| <= rtol |expected| + atol on every entry (atol may be a tensor of per-entry bounds)."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    bound = rtol * expected.abs() + atol
    worst = torch.argmax(err - bound).item()
    assert bool((err <= bound).all()), (
        f"{what}: entry {worst} is {actual.flatten()[worst].item():.6e}, float64 says "
        f"{expected.flatten()[worst].item():.6e} (bound {torch.as_tensor(bound).flatten()[worst].item():.1e})"
    )


# ----------------------------------------------------------------------------------------------
# Tail bucket (defects 1 and 2)
# ----------------------------------------------------------------------------------------------


def _tail_problem(n=4, vocab=3001, k=8, peak=40.0, seed=0):
    """Student logit `peak` on the teacher's top-1 slot; values are the teacher's top-k log-probs,
    tail the exact log of its mass outside them."""
    gen = torch.Generator().manual_seed(seed)
    log_p = (2 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)).log_softmax(-1)  # [N, V]
    values, indices = log_p.topk(k, -1)  # [N, k]
    tail = torch.log1p(-values.exp().sum(-1))  # [N]
    student = torch.randn(n, vocab, generator=gen)  # [N, V]
    student.scatter_(1, indices[:, :1], peak)
    labels = torch.randint(0, vocab, (n,), generator=gen)  # [N]
    return student, labels, indices, values, tail


def _tail_reference(student, labels, indices, values, tail, temperature, hard_weight):
    """float64 rows and gradient of hard_weight CE + T^2 D with the tail bucket, q_rest summed
    directly over the entries outside the slots (1 - sum q_slots cancels even in float64)."""
    z = student.double().requires_grad_(True)
    log_q = torch.log_softmax(z / temperature, -1)
    p = values.double().exp()
    slots = p * (values.double() - log_q.gather(1, indices)) * (p > 0)
    outside = torch.ones_like(z, dtype=torch.bool).scatter_(1, indices, False)
    log_q_rest = torch.logsumexp(log_q.masked_fill(~outside, -math.inf), -1).clamp(min=math.log(FLT_MIN))
    if tail is None:
        log_p_rest = torch.log((1 - p.sum(-1)).clamp(min=0))
    else:
        log_p_rest = tail.double()
    p_rest = log_p_rest.exp()
    div = slots.sum(-1) + torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest), 0.0)
    ce = torch.logsumexp(z, -1) - z.gather(1, labels[:, None]).squeeze(1)
    rows = hard_weight * ce + temperature**2 * div
    (grad,) = torch.autograd.grad(rows.sum(), z)
    return rows.detach(), div.detach(), grad


@pytest.mark.parametrize("with_tail", [False, True], ids=["recomputed", "teacher_tail"])
@pytest.mark.parametrize("peak,temperature", [(40.0, 1.0), (88.0, 1.0), (40.0, 2.0)])
def test_tail_bucket_with_a_confident_student(peak, temperature, with_tail):
    """1 - sum(q_slots) cancels in float32 once the student puts nearly all its mass on the slots
    (landed: loss 73.7 for a true 31.7, wrong-signed slot gradient). At peak 88 each off-slot q_j is
    below e^-87 (flushed to 0 in float32) while q_rest ~ 5e-35 is above the FLT_MIN floor and the
    off-slot gradient q_j (1 - p_rest / q_rest) is not small."""
    student, labels, indices, values, tail = _tail_problem(peak=peak)
    teacher_tail = tail.float() if with_tail else None
    rows, _, div, grad = _loss_and_grad(
        student, labels=labels, teacher_indices=indices, teacher_values=values.float(), teacher_tail=teacher_tail,
        teacher_kind="logprobs", tail=True, temperature=temperature, hard_weight=0.5, reduction="none")
    ref_rows, ref_div, ref_grad = _tail_reference(student, labels, indices, values.float(), teacher_tail,
                                                  temperature, 0.5)
    _assert_per_element(rows, ref_rows, 1e-3, 0, "loss rows")
    _assert_per_element(div, ref_div, 1e-3, 0, "D rows")
    _assert_per_element(grad, ref_grad, 1e-3, 1e-30, "gradient")


def test_teacher_tail_replaces_the_recomputed_mass():
    """bf16 values recompute p_rest = 1 - sum exp(values) with a few % error; the captured tail is exact."""
    student, labels, indices, values, tail = _tail_problem(peak=5.0)
    values = values.to(torch.bfloat16)
    options = dict(teacher_indices=indices, teacher_values=values, teacher_kind="logprobs", tail=True,
                   reduction="none")
    _, _, div, grad = _loss_and_grad(student, teacher_tail=tail.float(), **options)
    _, ref_div, ref_grad = _tail_reference(student, labels, indices, values.float(), tail.float(), 1.0, 0.0)
    _assert_per_element(div, ref_div, 1e-5, 0, "D rows")
    _assert_per_element(grad, ref_grad, 1e-4, 1e-30, "gradient")
    _, _, recomputed, _ = _loss_and_grad(student, **options)
    assert ((recomputed - div).abs() > 1e-4 * div.abs()).all()  # the tail really is used (10x the tolerance)


# ----------------------------------------------------------------------------------------------
# Bad rows (defects 7 and 12) and out-of-range values
# ----------------------------------------------------------------------------------------------


def _sparse_problem(n=5, vocab=2001, k=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(n, vocab, generator=gen)  # [N, V]
    teacher = 3 * torch.randn(n, vocab, generator=gen)  # [N, V]
    labels = torch.randint(0, vocab, (n,), generator=gen)  # [N]
    indices = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])  # [N, k]
    logprobs = torch.log_softmax(torch.randn(n, k + 1, generator=gen), -1)  # [N, k + 1]: last = tail
    return student, teacher, labels, indices, logprobs[:, :k].contiguous(), logprobs[:, k].contiguous()


SPARSE_KINDS = {
    "logits": lambda v, t: dict(teacher_kind="logits", teacher_values=3 * v),
    "logprobs": lambda v, t: dict(teacher_kind="logprobs", teacher_values=v),
    "logprobs-tail": lambda v, t: dict(teacher_kind="logprobs", teacher_values=v, tail=True),
    "logprobs-teacher_tail": lambda v, t: dict(teacher_kind="logprobs", teacher_values=v, tail=True, teacher_tail=t),
    "probs": lambda v, t: dict(teacher_kind="probs", teacher_values=v.exp()),
}


def _assert_bad_row_only(bad, rows, ce_rows, div_rows, grad, good_rows, good_ce, good_div, good_grad):
    """Row `bad` is NaN with a zero gradient; every other row is what it is without the bad value."""
    for name, got in (("loss", rows), ("ce_rows", ce_rows), ("div_rows", div_rows)):
        assert torch.isnan(got[bad]), f"{name}[{bad}] = {got[bad].item()}, expected NaN"
    assert torch.equal(grad[bad], torch.zeros_like(grad[bad]))
    keep = torch.arange(len(rows)) != bad
    assert torch.equal(rows[keep], good_rows[keep])
    assert torch.equal(ce_rows[keep], good_ce[keep])
    assert torch.equal(div_rows[keep], good_div[keep])
    assert torch.equal(grad[keep], good_grad[keep])


@pytest.mark.parametrize("kind", list(SPARSE_KINDS))
def test_duplicate_indices_make_a_nan_row(kind):
    """Value checks off: a duplicate valid index (landed: a finite loss that differs between backends)."""
    student, _, labels, indices, values, tail = _sparse_problem()
    options = dict(SPARSE_KINDS[kind](values, tail), labels=labels, hard_weight=0.3, reduction="none")
    good = _loss_and_grad(student, teacher_indices=indices, **options)
    dup = indices.clone()
    dup[2, 5] = dup[2, 9]
    got = _loss_and_grad(student, teacher_indices=dup, **options)
    _assert_bad_row_only(2, *got, *good)


NAN, INF = float("nan"), float("inf")
NON_FINITE = [  # (teacher kind or dense divergence, value)
    *((f"dense-{d}", v) for d in ("forward_kl", "reverse_kl", "jsd") for v in (NAN, INF)),
    ("logits", NAN), ("logits", INF), ("logprobs", NAN), ("logprobs", INF), ("logprobs-tail", NAN),
    ("probs", NAN), ("probs", INF), ("probs", -INF), ("logprobs-teacher_tail", NAN), ("logprobs-teacher_tail", INF),
]


@pytest.mark.parametrize("kind,bad_value", NON_FINITE, ids=[f"{k}-{v}" for k, v in NON_FINITE])
def test_non_finite_teacher_value_makes_a_nan_row(kind, bad_value):
    """Landed: a finite loss (sparse), NaN read as 0 ("probs"), a NaN gradient (dense)."""
    student, teacher, labels, indices, values, tail = _sparse_problem()
    if kind.startswith("dense"):
        options = dict(teacher_logits=teacher, divergence=kind.removeprefix("dense-"))
        bad = dict(teacher_logits=teacher.clone().index_put_((torch.tensor([3]), torch.tensor([77])),
                                                              torch.tensor(bad_value)))
    else:
        options = dict(SPARSE_KINDS[kind](values, tail), teacher_indices=indices)
        key = "teacher_tail" if "teacher_tail" in options else "teacher_values"
        bad = {key: options[key].clone()}
        bad[key][3] = bad_value  # the whole row (the tail is one value per row)
    options.update(labels=labels, hard_weight=0.3, reduction="none")
    good = _loss_and_grad(student, **options)
    got = _loss_and_grad(student, **{**options, **bad})
    _assert_bad_row_only(3, *got, *good)


@pytest.mark.parametrize("kind", ["dense", "logits", "logprobs"])
def test_minus_inf_teacher_values_are_zero_mass_not_bad_rows(kind):
    student, teacher, labels, indices, values, _ = _sparse_problem()
    if kind == "dense":
        teacher[:, ::7] = -math.inf
        tensors = dict(teacher_logits=teacher)
    else:
        values = (3 * values if kind == "logits" else values).index_fill(1, torch.tensor([0, 5]), -math.inf)
        tensors = dict(teacher_indices=indices, teacher_values=values, teacher_kind=kind)
    _, _, div, grad = _loss_and_grad(student, temperature=1.5, reduction="none", **tensors)
    z64 = student.double().requires_grad_(True)
    _, ref_div, _ = reference.kd_loss_rows(
        z64, temperature=1.5, **{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                 for k, v in tensors.items()})
    (ref_grad,) = torch.autograd.grad((1.5**2 * ref_div).sum(), z64)
    _assert_per_element(div, ref_div.detach(), 1e-5, 1e-7, "D rows")
    _assert_per_element(grad, ref_grad, 1e-3, 1e-9, "gradient")


def test_teacher_tail_minus_inf_means_no_tail_mass():
    student, _, labels, indices, values, tail = _sparse_problem()
    options = dict(teacher_indices=indices, teacher_values=values, teacher_kind="logprobs", tail=True,
                   reduction="none")
    no_tail = torch.full_like(tail, -math.inf)
    _, _, div, grad = _loss_and_grad(student, teacher_tail=no_tail, **options)
    _, ref_div, ref_grad = _tail_reference(student, labels, indices, values, no_tail, 1.0, 0.0)
    _assert_per_element(div, ref_div, 1e-5, 1e-7, "D rows")
    _assert_per_element(grad, ref_grad, 1e-4, 1e-9, "gradient")


def test_out_of_range_index_raises_before_anything_is_written():
    """Landed: rows before the bad one were already overwritten by their gradient (inplace)."""
    student, _, labels, indices, values, _ = _sparse_problem()
    bad = indices.clone()
    bad[-1, 0] = student.shape[1]
    logits = student.clone()
    with pytest.raises(ValueError, match=r"teacher_indices must be in \[0, 2001\) or -1; got 2001"):
        _cpu(logits, labels, teacher_indices=bad, teacher_values=values, teacher_kind="logprobs", inplace=True,
             reduction="sum")
    assert torch.equal(logits, student)


# ----------------------------------------------------------------------------------------------
# inplace=True under autograd (defect 5)
# ----------------------------------------------------------------------------------------------


def test_inplace_on_logits_another_op_saved_raises():
    """tanh saves its output for backward; overwriting it (landed: x.grad off by 0.0126, silently) must raise."""
    student, teacher, labels, *_ = _sparse_problem()
    x = student.clone().requires_grad_(True)
    loss, _, _ = _cpu(torch.tanh(x), labels, teacher_logits=teacher, hard_weight=0.5, inplace=True, reduction="sum")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_on_a_leaf_gives_a_grad_that_does_not_alias_it():
    """kdfast.kd_loss hands the backend a flattened view of the caller's [..., V] logits; through that
    view AccumulateGrad took the returned buffer (landed: leaf.grad was the leaf's own storage)."""
    student, teacher, labels, *_ = _sparse_problem()
    expected = _loss_and_grad(student, labels=labels, teacher_logits=teacher, reduction="sum")[3]
    leaf = student.clone()[None].requires_grad_(True)  # [1, N, V]
    loss, _, _ = _cpu(leaf.reshape(-1, student.shape[1]), labels, teacher_logits=teacher, inplace=True,
                      reduction="sum")
    loss.backward()
    assert leaf.grad.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr()
    assert torch.equal(leaf.grad[0], expected)
    assert torch.equal(leaf.detach()[0], expected)  # the logits themselves hold the gradient, as documented


# ----------------------------------------------------------------------------------------------
# float16 with loss scaling (defect 6)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_scale", [2.0**10, 2.0**16])
def test_float16_gradient_survives_loss_scaling(loss_scale):
    """N=64, V=32000, num_items=16384: the landed kernel stored grad / 16384 in fp16 (98% zeros, 68% L1
    error at 2^16). Now the fp16 buffer holds the gradient of the sum and backward applies
    loss_scale / 16384 in fp32, rounding once (measured L1: 0.2% at 2^10, 0.02% at 2^16; at scale 1
    the fp16 result itself cannot hold entries of 1e-9, which is what loss scaling is for)."""
    gen = torch.Generator().manual_seed(2)
    student = (3 * torch.randn(64, 32000, generator=gen)).half()  # [N, V]
    teacher = 3 * torch.randn(64, 32000, generator=gen)  # [N, V]
    labels = torch.randint(0, 32000, (64,), generator=gen)  # [N]
    divisor = torch.tensor(16384.0)
    z = student.clone().requires_grad_(True)
    loss, _, _ = _cpu(z, labels, teacher_logits=teacher, divisor=divisor, hard_weight=0.5, temperature=2.0)
    (loss * loss_scale).backward()
    grad = z.grad.double() / loss_scale
    z64 = student.double().requires_grad_(True)
    reference.kd_loss(z64, labels, teacher_logits=teacher.double(), hard_weight=0.5, temperature=2.0,
                      num_items=16384).backward()
    l1 = ((grad - z64.grad).abs().sum() / z64.grad.abs().sum()).item()
    assert l1 < 1e-2, f"L1 error {l1:.3%}"


def test_float16_without_autograd_keeps_the_divisor_in_the_gradient():
    """kdfast/fused_linear.py runs the backend under no_grad with inplace and reads d loss / d logits
    (1/divisor included) from the logits buffer."""
    student, teacher, labels, *_ = _sparse_problem()
    divisor = torch.tensor(4.0)
    options = dict(teacher_logits=teacher, divisor=divisor, hard_weight=0.5)
    expected = _loss_and_grad(student, labels=labels, **options)[3]
    logits = student.half()
    with torch.no_grad():
        _cpu(logits, labels, inplace=True, compute_grad=True, **options)
    z64 = student.half().double().requires_grad_(True)
    reference.kd_loss(z64, labels, teacher_logits=teacher.double(), hard_weight=0.5, num_items=4).backward()
    _assert_per_element(logits, z64.grad, 2e-3, 1e-7, "fp16 gradient")
    assert expected.abs().max() > 1e-3  # a real gradient, not an empty one


# ----------------------------------------------------------------------------------------------
# Extreme temperatures (defect 14), masked JSD (defect 15), shift invariance (defect 8)
# ----------------------------------------------------------------------------------------------

TEMPERATURE_CASES = [  # (T, logit offset, spread): scaled logits (z - offset) / T of order 3
    (1e-2, 1e4, 0.03), (1e-2, 0.0, 0.03), (1e2, 0.0, 300.0), (1e2, 0.0, 3.0), (1e2, 1e4, 3.0),
]


@pytest.mark.parametrize("teacher", ["forward_kl", "reverse_kl", "jsd", "sparse"])
@pytest.mark.parametrize("temperature,offset,spread", TEMPERATURE_CASES)
def test_extreme_temperatures_match_float64(temperature, offset, spread, teacher):
    """The ends of TEMPERATURE_RANGE, with logits around +-1e4 at T = 1e-2: D per row and the
    gradient per element (bound: relative, plus 1e-4 of the entry's own scale T (q_j + p_j))."""
    assert temperature in kdfast._contract.TEMPERATURE_RANGE
    gen = torch.Generator().manual_seed(3)
    n, vocab = 6, 3001
    student = offset + spread * torch.randn(n, vocab, generator=gen)  # [N, V]
    teacher_logits = -offset + spread * torch.randn(n, vocab, generator=gen)  # [N, V]
    if teacher == "sparse":
        indices = torch.stack([torch.randperm(vocab, generator=gen)[:16] for _ in range(n)])  # [N, 16]
        values = -offset + spread * torch.randn(n, 16, generator=gen)  # [N, 16]
        tensors = dict(teacher_indices=indices, teacher_values=values)
        p = torch.zeros(n, vocab, dtype=torch.float64).scatter_(1, indices, (values.double() / temperature).softmax(-1))
        divergence = {}
    else:
        tensors = dict(teacher_logits=teacher_logits)
        p = (teacher_logits.double() / temperature).softmax(-1)
        divergence = dict(divergence=teacher, beta=0.3)
    rows, _, div, grad = _loss_and_grad(student, temperature=temperature, reduction="none", **divergence, **tensors)
    z64 = student.double().requires_grad_(True)
    _, ref_div, _ = reference.kd_loss_rows(
        z64, temperature=temperature, **divergence, **{k: v.double() if v.is_floating_point() else v
                                                      for k, v in tensors.items()})
    (ref_grad,) = torch.autograd.grad((temperature**2 * ref_div).sum(), z64)
    _assert_per_element(div, ref_div.detach(), 1e-4, 1e-6, "D rows")
    q = (student.double() / temperature).softmax(-1)
    _assert_per_element(grad, ref_grad, 1e-3, 1e-4 * temperature * (q + p), "gradient")


def test_jsd_with_a_masked_vocabulary_matches_float64():
    """Student and teacher both -inf on padded entries (landed: NaN where the reference is finite)."""
    gen = torch.Generator().manual_seed(4)
    student = 3 * torch.randn(4, 3000, generator=gen)  # [N, V]
    teacher = 3 * torch.randn(4, 3000, generator=gen)  # [N, V]
    student[:, 2900:] = -math.inf
    teacher[:, 2900:] = -math.inf
    rows, _, div, grad = _loss_and_grad(student, teacher_logits=teacher, divergence="jsd", beta=0.3,
                                        temperature=1.5, reduction="none")
    # float64 on the unpadded entries: the padding carries no mass (and autograd would give NaN there)
    z64 = student[:, :2900].double().requires_grad_(True)
    _, ref_div, _ = reference.kd_loss_rows(z64, teacher_logits=teacher[:, :2900].double(), divergence="jsd",
                                           beta=0.3, temperature=1.5)
    (ref_grad,) = torch.autograd.grad((1.5**2 * ref_div).sum(), z64)
    _assert_per_element(div, ref_div.detach(), 1e-5, 1e-7, "D rows")
    _assert_per_element(grad[:, :2900], ref_grad, 1e-3, 1e-9, "gradient")
    assert torch.equal(grad[:, 2900:], torch.zeros_like(grad[:, 2900:]))


def test_shift_invariance_and_the_reverse_kl_gradient_at_the_mode():
    """The cpu numbers the Triton backend is held to: with teacher +5000 and student -5000 at T = 1, D
    keeps float32 accuracy (vs float64 on the same shifted inputs), and the reverse-KL gradient at a
    one-hot student's mode is exactly 0."""
    gen = torch.Generator().manual_seed(5)
    student = 3 * torch.randn(4, 3001, generator=gen) - 5000  # [N, V]
    teacher = 3 * torch.randn(4, 3001, generator=gen) + 5000  # [N, V]
    for divergence in ("forward_kl", "reverse_kl"):
        shifted = _cpu(student, teacher_logits=teacher, divergence=divergence, reduction="none")[2]
        _, ref_div, _ = reference.kd_loss_rows(student.double(), teacher_logits=teacher.double(),
                                               divergence=divergence)
        _assert_per_element(shifted, ref_div, 1e-5, 0, f"{divergence} D shifted")
    peaked = 1e4 * torch.randn(4, 3001, generator=gen)  # one-hot at T = 0.05
    _, _, _, grad = _loss_and_grad(peaked, teacher_logits=1e4 * torch.randn(4, 3001, generator=gen),
                                   divergence="reverse_kl", temperature=0.05, reduction="sum")
    assert torch.equal(grad.gather(1, peaked.argmax(-1, keepdim=True)), torch.zeros(4, 1))


# ----------------------------------------------------------------------------------------------
# Strided inputs
# ----------------------------------------------------------------------------------------------


def test_strided_expanded_and_sliced_inputs_match_contiguous_ones():
    student, teacher, labels, indices, values, tail = _sparse_problem()
    n = student.shape[0]
    wide = torch.randn(n, 2 * student.shape[1], generator=torch.Generator().manual_seed(6))
    wide[:, ::2] = student
    strided = wide[:, ::2]  # [N, V], stride 2
    pairs = torch.stack([labels, labels], 1)  # [N, 2]: labels[:, 0] has stride 2
    for tensors in (
        dict(teacher_logits=teacher.T.contiguous().T),
        dict(teacher_indices=indices.T.contiguous().T, teacher_values=torch.stack([values, values], -1)[..., 0],
             teacher_tail=torch.stack([tail, tail], -1)[:, 0], teacher_kind="logprobs", tail=True),
    ):
        contiguous = {k: v.contiguous() if torch.is_tensor(v) else v for k, v in tensors.items()}
        expected = _loss_and_grad(student, labels=labels, hard_weight=0.5, reduction="none", **contiguous)
        got = _loss_and_grad(strided, labels=pairs[:, 0], hard_weight=0.5, reduction="none", **tensors)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    seven = torch.tensor(7).expand(n)  # [N], stride 0
    got = _cpu(student, seven, teacher_logits=teacher, hard_weight=1.0, reduction="none")[1]
    assert torch.equal(got, _cpu(student, torch.full((n,), 7), teacher_logits=teacher, hard_weight=1.0,
                                 reduction="none")[1])
