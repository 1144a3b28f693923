"""DistiLLM's skew divergences (issue #14) on every backend and through the fused linear loss.

    skew_kl          D = KL(p || alpha p + (1 - alpha) q)
    skew_reverse_kl  D = KL(q || alpha q + (1 - alpha) p)

The grid follows test_kd_loss.py: backend (torch, cpu, triton; triton under TRITON_INTERPRET=1 without
a GPU, with BLOCK_V = 128 so that a 700-wide row spans six blocks) x dtype x shape x temperature x alpha,
rows with ignore_index in every problem, loss and gradient per element against the float64 reference
(conftest.assert_close_to_oracle). The reference itself is checked against finite differences and
against the closed-form gradient of docs/loss.md.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import reference
from tests.conftest import assert_close_to_oracle, backend_device, require_backend

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy under the interpreter

SKEW = ("skew_kl", "skew_reverse_kl")
BACKENDS = ("torch", "cpu", "triton")
ALPHAS = (0.0, 0.1, 0.5, 0.9)
SMALL_BLOCK = 128  # Triton's BLOCK_V in these tests
# (rows, V) per backend: one block, and a vocabulary over several blocks (cpu: 2048-element chunks).
SHAPES = {"torch": [(5, 33), (4, 5000)], "cpu": [(5, 33), (4, 5000)], "triton": [(5, 33), (4, 700)]}
IGNORE = -100


@pytest.fixture
def small_triton_blocks(monkeypatch):
    """BLOCK_V = SMALL_BLOCK for every Triton shape class, so that rows span several blocks."""
    triton_kd = pytest.importorskip("kdfast.ops.triton.kd_loss")
    monkeypatch.setattr(triton_kd, "_INTERPRET_BLOCK_V", SMALL_BLOCK)
    for kind, params in list(triton_kd._LAUNCH.items()):
        monkeypatch.setitem(triton_kd._LAUNCH, kind, dataclasses.replace(params, block_v=SMALL_BLOCK))


def use_backend(backend: str, request) -> torch.device:
    require_backend(backend)
    if backend == "triton":
        request.getfixturevalue("small_triton_blocks")
    return backend_device(backend)


def dense_problem(n: int, vocab: int, seed: int = 0):
    """float64 student [n, V], correlated teacher [n, V], labels with rows 0 and 3 (every third) ignored."""
    gen = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    teacher = 0.7 * student + 2 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::3] = IGNORE
    return student, teacher, labels


def loss_and_grad(fn, logits, labels, teacher, grad_weights, **options):
    """(loss, d sum(loss * grad_weights) / d logits) of fn(logits, labels, teacher_logits=teacher)."""
    logits = logits.detach().clone().requires_grad_(True)
    loss = fn(logits, labels, teacher_logits=teacher, **options)
    weights = grad_weights.to(loss.dtype).to(loss.device) if loss.dim() else torch.tensor(1.7, dtype=loss.dtype)
    (loss * weights.to(loss.device)).sum().backward()
    return loss.detach(), logits.grad


def check_against_oracle(backend, device, n, vocab, dtype, **options):
    """Backend vs the float64 reference (of the dtype-rounded inputs), per element, loss and gradient,
    within twice the same-dtype reference's own error (conftest)."""
    student, teacher, labels = dense_problem(n, vocab, seed=n * 7 + vocab)
    student, teacher = student.to(dtype), teacher.to(dtype)
    grad_weights = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    oracle = loss_and_grad(reference.kd_loss, student.double(), labels, teacher.double(), grad_weights, **options)
    same_dtype = loss_and_grad(reference.kd_loss, student, labels, teacher, grad_weights, **options)
    actual = loss_and_grad(kdfast.kd_loss, student.to(device), labels.to(device), teacher.to(device), grad_weights,
                           backend=backend, **options)
    assert kdfast.last_backend() == backend
    assert actual[1].dtype == dtype
    assert_close_to_oracle(actual[0], same_dtype[0], oracle[0], dtype, "loss")
    assert_close_to_oracle(actual[1], same_dtype[1], oracle[1], dtype, "grad")
    return actual


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("divergence", SKEW)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [0, 1], ids=["one-block", "several-blocks"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(request, backend, shape, dtype, divergence, temperature, alpha):
    device = use_backend(backend, request)
    n, vocab = SHAPES[backend][shape]
    loss, grad = check_against_oracle(backend, device, n, vocab, dtype, divergence=divergence, alpha=alpha,
                                      temperature=temperature, hard_weight=0.3, soft_weight=0.8, reduction="none")
    ignored = dense_problem(n, vocab, seed=n * 7 + vocab)[2].to(device) == IGNORE
    assert bool((loss[ignored] == 0).all()) and bool((grad[ignored] == 0).all()), "ignored rows must give 0"
    assert bool((grad[~ignored] != 0).any())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("divergence", SKEW)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_scale_t2(request, backend, divergence, reduction):
    device = use_backend(backend, request)
    for scale_t2 in (True, False):
        check_against_oracle(backend, device, 6, 300, torch.float32, divergence=divergence, alpha=0.3,
                             temperature=1.5, hard_weight=0.5, reduction=reduction, scale_t2=scale_t2)


@pytest.mark.parametrize("divergence", SKEW)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_float16_gradient_under_autograd(request, backend, divergence):
    """fp16 defers the "mean" divisor to backward on both kernels; the skew paths go through it too."""
    device = use_backend(backend, request)
    check_against_oracle(backend, device, 5, 300, torch.float16, divergence=divergence, alpha=0.2, temperature=2.0,
                         hard_weight=0.5)


# --------------------------------------------------------------------------------------------
# alpha = 0 is forward / reverse KL, exactly
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence, plain", [("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_is_the_plain_kl(request, backend, divergence, plain):
    device = use_backend(backend, request)
    student, teacher, labels = dense_problem(5, 700)
    z, t, y = student.float().to(device), teacher.float().to(device), labels.to(device)
    weights = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    options = dict(temperature=2.0, hard_weight=0.4, reduction="none", backend=backend)
    skewed = loss_and_grad(kdfast.kd_loss, z, y, t, weights, divergence=divergence, alpha=0.0, **options)
    expected = loss_and_grad(kdfast.kd_loss, z, y, t, weights, divergence=plain, **options)
    assert torch.equal(skewed[0], expected[0]) and torch.equal(skewed[1], expected[1])
    slightly = kdfast.kd_loss(z, y, teacher_logits=t, divergence=divergence, alpha=0.1, **options)
    assert (slightly - expected[0]).abs().max() > 1e-3, "alpha = 0.1 must differ from the plain KL"


@pytest.mark.parametrize("divergence, plain", [("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")])
def test_reference_alpha_zero_is_the_plain_kl(divergence, plain):
    student, teacher, labels = dense_problem(4, 50)
    skewed = reference.kd_loss_rows(student, labels, teacher_logits=teacher, divergence=divergence, alpha=0.0)
    expected = reference.kd_loss_rows(student, labels, teacher_logits=teacher, divergence=plain)
    assert torch.equal(skewed[1], expected[1])


# --------------------------------------------------------------------------------------------
# The float64 reference: finite differences, and the closed form of docs/loss.md
# --------------------------------------------------------------------------------------------


def skew_by_hand(student, teacher, divergence, alpha, temperature):
    """Per-row D and dD/dz in float64 with the mixture formed in linear space, and the gradient of
    docs/loss.md: skew_kl (1/T)(q S - p w), w = (1 - alpha) q / M, S = sum p w; skew_reverse_kl
    (1/T) q ((log(q / M) + v) - (D + V)), v = (1 - alpha) p / M, V = sum q v."""
    q = torch.softmax(student / temperature, -1)
    p = torch.softmax(teacher / temperature, -1)
    if divergence == "skew_kl":
        m = alpha * p + (1 - alpha) * q
        div = (p * (p / m).log()).sum(-1)
        w = (1 - alpha) * q / m
        grad = q * (p * w).sum(-1, keepdim=True) - p * w
    else:
        m = alpha * q + (1 - alpha) * p
        div = (q * (q / m).log()).sum(-1)
        v = (1 - alpha) * p / m
        grad = q * (((q / m).log() + v) - (div + (q * v).sum(-1))[:, None])
    return div, grad / temperature


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("divergence", SKEW)
def test_reference_matches_the_formula_and_its_gradient(divergence, alpha, temperature):
    student, teacher, _ = dense_problem(4, 60)
    z = student.clone().requires_grad_(True)
    _, div, _ = reference.kd_loss_rows(z, teacher_logits=teacher, divergence=divergence, alpha=alpha,
                                       temperature=temperature)
    (autograd,) = torch.autograd.grad(div.sum(), z)
    expected_div, expected_grad = skew_by_hand(student, teacher, divergence, alpha, temperature)
    torch.testing.assert_close(div.detach(), expected_div, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(autograd, expected_grad, rtol=1e-10, atol=1e-14)
    assert bool((div <= -math.log(alpha) + 1e-12).all()), "D is at most -log(alpha)"


@pytest.mark.parametrize("divergence", SKEW)
def test_reference_gradient_passes_gradcheck(divergence):
    student, teacher, labels = dense_problem(4, 9)
    z = student.clone().requires_grad_(True)

    def loss(logits):
        return reference.kd_loss(logits, labels, teacher_logits=teacher, divergence=divergence, alpha=0.3,
                                 temperature=1.5, hard_weight=0.5, reduction="none")

    assert torch.autograd.gradcheck(loss, (z,))


# --------------------------------------------------------------------------------------------
# Numerical edges: zero-mass teacher entries, a masked vocabulary, an underflowing student,
# extreme temperatures, bad rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", SKEW)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_mass_teacher_entries_stay_finite(request, backend, divergence):
    """-inf teacher logits (p = 0): finite for both skew divergences (reverse KL would be infinite)."""
    device = use_backend(backend, request)
    student, teacher, labels = dense_problem(4, 700)
    teacher[:, 100:400] = -math.inf
    options = dict(divergence=divergence, alpha=0.2, temperature=1.3, hard_weight=0.2, reduction="none")
    weights = torch.ones(4, dtype=torch.float64)
    oracle = loss_and_grad(reference.kd_loss, student, labels, teacher, weights, **options)
    same = loss_and_grad(reference.kd_loss, student.float(), labels, teacher.float(), weights, **options)
    actual = loss_and_grad(kdfast.kd_loss, student.float().to(device), labels.to(device), teacher.float().to(device),
                           weights, backend=backend, **options)
    assert torch.isfinite(oracle[0]).all()
    assert_close_to_oracle(actual[0], same[0], oracle[0], torch.float32, "loss")
    assert_close_to_oracle(actual[1], same[1], oracle[1], torch.float32, "grad")


@pytest.mark.parametrize("divergence", SKEW)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_masked_vocabulary_adds_nothing(request, backend, divergence):
    """Student and teacher both -inf on padded columns: the loss of the unpadded vocabulary and a zero
    gradient on the padding (autograd through the reference would give NaN there)."""
    device = use_backend(backend, request)
    student, teacher, labels = dense_problem(4, 700)
    options = dict(divergence=divergence, alpha=0.3, temperature=1.3, hard_weight=0.2, reduction="none")
    weights = torch.ones(4, dtype=torch.float64)
    oracle = loss_and_grad(reference.kd_loss, student[:, :500], labels, teacher[:, :500], weights, **options)
    student[:, 500:] = -math.inf
    teacher[:, 500:] = -math.inf
    actual = loss_and_grad(kdfast.kd_loss, student.float().to(device), labels.to(device), teacher.float().to(device),
                           weights, backend=backend, **options)
    torch.testing.assert_close(actual[0].double().cpu(), oracle[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual[1][:, :500].double().cpu(), oracle[1], rtol=1e-4, atol=1e-7)
    assert bool((actual[1][:, 500:] == 0).all())


@pytest.mark.parametrize("peak", [60.0, 120.0])
@pytest.mark.parametrize("divergence", SKEW)
@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_student_far_from_the_teacher(request, backend, divergence, peak):
    """Student logit `peak` on the teacher's least likely entry: every other q_j is ~e^-peak (60: 1e-27,
    tiny but normal in float32; 120: below float32's range) while p_j is not; log M is then
    log(alpha p) (skew_kl), resp. log((1 - alpha) p), and D ~ -log alpha. Every gradient term carries a
    factor q_j, so the row's exact gradient is tiny (peak 60: ~1e-23; 120: ~1e-47, where the kernels
    must give 0, not a 0/0 NaN). Besides conftest's rule, each entry must be within 1e-6 of its own
    scale q_j + p_j: skew_kl's q_j S - p_j w_j at the mode cancels (S ~ p_j w_j) to float32's ulp of
    p_j w_j, the float32 reference's own error there."""
    device = use_backend(backend, request)
    student, teacher, labels = (t.float().double() if t.is_floating_point() else t for t in dense_problem(4, 700))
    student[torch.arange(4), teacher.argmin(-1)] = peak
    options = dict(divergence=divergence, alpha=0.1, reduction="none")
    weights = torch.ones(4, dtype=torch.float64)
    oracle = loss_and_grad(reference.kd_loss, student, labels, teacher, weights, **options)
    same = loss_and_grad(reference.kd_loss, student.float(), labels, teacher.float(), weights, **options)
    actual = loss_and_grad(kdfast.kd_loss, student.float().to(device), labels.to(device), teacher.float().to(device),
                           weights, backend=backend, **options)
    active = labels != IGNORE
    assert bool((oracle[0][active] > 0.5 * -math.log(0.1)).all()), "the student is far from the teacher"
    assert_close_to_oracle(actual[0], same[0], oracle[0], torch.float32, "loss")
    assert_close_to_oracle(actual[1], same[1], oracle[1], torch.float32, "grad")
    own_scale = torch.softmax(student, -1) + torch.softmax(teacher, -1)
    err = (actual[1].double().cpu() - oracle[1]).abs()
    assert bool((err <= 1e-6 * own_scale + 1e-4 * oracle[1].abs()).all()), f"worst {(err / own_scale).max():.2e}"


@pytest.mark.parametrize("temperature", [0.01, 100.0])
@pytest.mark.parametrize("divergence", SKEW)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_extreme_temperatures_and_large_logits(request, backend, divergence, temperature):
    """The ends of TEMPERATURE_RANGE with logits around -+5000 that vary by a few T within a row: D per row
    and the gradient per element (row scale: c / T = T, the bound of an entry). The kernels only: the
    torch backend is the reference in float32, which divides 5000 by T before subtracting the maximum."""
    device = use_backend(backend, request)
    gen = torch.Generator().manual_seed(7)
    n, vocab = 4, 500
    base = 3 * temperature * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    teacher = (5000 + base).float().double()
    student = (base - 5000 + temperature * torch.randn(n, vocab, generator=gen, dtype=torch.float64)).float().double()
    labels = torch.zeros(n, dtype=torch.long)
    options = dict(divergence=divergence, alpha=0.2, temperature=temperature, reduction="none")
    weights = torch.ones(n, dtype=torch.float64)
    oracle = loss_and_grad(reference.kd_loss, student, labels, teacher, weights, **options)
    same = loss_and_grad(reference.kd_loss, student.float(), labels, teacher.float(), weights, **options)
    actual = loss_and_grad(kdfast.kd_loss, student.float().to(device), labels.to(device), teacher.float().to(device),
                           weights, backend=backend, **options)
    torch.testing.assert_close(actual[0].double().cpu() / temperature**2, oracle[0] / temperature**2, rtol=1e-4,
                               atol=1e-5)
    assert_close_to_oracle(actual[1], same[1], oracle[1], torch.float32, "grad", scale=temperature)


@pytest.mark.parametrize("divergence", SKEW)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_teacher_row_gives_nan_loss_and_zero_gradient(request, backend, divergence):
    device = use_backend(backend, request)
    student, teacher, _ = dense_problem(4, 300)
    labels = torch.tensor([1, 2, 3, 4])
    teacher[1, 7] = math.nan
    teacher[2, 250] = math.inf
    options = dict(divergence=divergence, alpha=0.4, hard_weight=0.5, reduction="none")
    loss, grad = loss_and_grad(kdfast.kd_loss, student.float().to(device), labels.to(device),
                               teacher.float().to(device), torch.ones(4), backend=backend, **options)
    loss, grad = loss.cpu(), grad.cpu()
    bad = torch.tensor([False, True, True, False])
    assert torch.isnan(loss[bad]).all() and bool((grad[bad] == 0).all())
    good = ~bad
    expected = loss_and_grad(reference.kd_loss, student[good], labels[good], teacher[good], torch.ones(2), **options)
    torch.testing.assert_close(loss[good].double(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[good].double(), expected[1], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------
# The fused linear loss and the Hugging Face helper
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher_form", ["dense", "online"])
@pytest.mark.parametrize("divergence", SKEW)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_equals_kd_loss_on_the_full_logits(request, backend, divergence, teacher_form):
    """fused_linear_kd_loss in chunks of 7 rows (not dividing 30) vs kd_loss on hidden @ W.T + b, same
    backend: loss and the hidden / weight / bias gradients."""
    device = use_backend(backend, request)
    gen = torch.Generator().manual_seed(3)
    n, h, vocab = 30, 16, 300
    hidden = torch.randn(n, h, generator=gen).to(device)
    weight = (0.4 * torch.randn(vocab, h, generator=gen)).to(device)
    bias = (0.5 * torch.randn(vocab, generator=gen)).to(device)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    labels[::4] = IGNORE
    teacher_hidden = torch.randn(n, h + 3, generator=gen).to(device)
    teacher_weight = (0.5 * torch.randn(vocab, h + 3, generator=gen)).to(device)
    teacher_logits = teacher_hidden @ teacher_weight.T
    teacher = (dict(teacher_logits=teacher_logits) if teacher_form == "dense"
               else dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight))
    options = dict(divergence=divergence, alpha=0.25, temperature=1.5, hard_weight=0.5, backend=backend)

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    fused = kdfast.fused_linear_kd_loss(leaves[0], leaves[1], labels, bias=leaves[2], chunk_size=7, **teacher,
                                        **options)
    fused_grads = torch.autograd.grad(fused, leaves)
    plain_leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = F.linear(plain_leaves[0], plain_leaves[1], plain_leaves[2])
    plain = kdfast.kd_loss(logits, labels, teacher_logits=teacher_logits, **options)
    plain_grads = torch.autograd.grad(plain, plain_leaves)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for name, got, expected in zip(("hidden", "weight", "bias"), fused_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"grad {name}: {m}")
    assert float(fused_grads[0].abs().max()) > 1e-3


def test_hf_helper_passes_the_skew_divergence_through():
    """causal_lm_kd_loss(divergence="skew_reverse_kl", alpha=...) equals kd_loss on the model's shifted logits."""
    transformers = pytest.importorskip("transformers")
    from kdfast import hf

    torch.manual_seed(0)
    vocab, batch, length = 97, 2, 9
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    input_ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    teacher_logits = 2 * torch.randn(batch, length, vocab, generator=torch.Generator().manual_seed(2))
    options = dict(divergence="skew_reverse_kl", alpha=0.3, temperature=2.0, hard_weight=0.5)
    loss = hf.causal_lm_kd_loss(model, input_ids, teacher_logits=teacher_logits, **options)
    logits = model(input_ids).logits
    expected = kdfast.kd_loss(logits[:, :-1], input_ids[:, 1:], teacher_logits=teacher_logits[:, :-1], **options)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    other_alpha = hf.causal_lm_kd_loss(model, input_ids, teacher_logits=teacher_logits, **dict(options, alpha=0.6))
    assert abs((other_alpha - loss).item()) > 1e-4, "alpha must reach the loss"


# --------------------------------------------------------------------------------------------
# Options: alpha in [0, 1), only with a skew divergence, dense teachers only
# --------------------------------------------------------------------------------------------


def small_inputs():
    student, teacher, labels = dense_problem(4, 30)
    return student.float(), labels, teacher.float()


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5, math.nan, math.inf, "half"])
@pytest.mark.parametrize("divergence", SKEW)
def test_alpha_outside_its_range_raises_naming_alpha(divergence, alpha):
    z, y, t = small_inputs()
    message = r"alpha must be in \[0, 1\)" if isinstance(alpha, float) and math.isfinite(alpha) else "alpha must be"
    with pytest.raises(ValueError, match=message):
        kdfast.kd_loss(z, y, teacher_logits=t, divergence=divergence, alpha=alpha)
    with pytest.raises(ValueError, match=message):
        kdfast.fused_linear_kd_loss(z, torch.eye(30), y, teacher_logits=t, divergence=divergence, alpha=alpha)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_alpha_with_another_divergence_raises(divergence):
    z, y, t = small_inputs()
    with pytest.raises(ValueError, match=f"alpha only applies to divergence in .*divergence='{divergence}'"):
        kdfast.kd_loss(z, y, teacher_logits=t, divergence=divergence, alpha=0.1)


@pytest.mark.parametrize("divergence", SKEW)
def test_sparse_teacher_takes_forward_kl_only(divergence):
    z, y, t = small_inputs()
    values, indices = t.topk(5, dim=-1)
    with pytest.raises(ValueError, match=f"divergence='{divergence}' needs dense teacher_logits; sparse teachers "
                                         "take 'forward_kl'"):
        kdfast.kd_loss(z, y, teacher_indices=indices, teacher_values=values, divergence=divergence, alpha=0.1)


@pytest.mark.parametrize("divergence", SKEW)
def test_alpha_defaults_to_distillms_value(divergence):
    z, y, t = small_inputs()
    default = kdfast.kd_loss(z, y, teacher_logits=t, divergence=divergence)
    assert torch.equal(default, kdfast.kd_loss(z, y, teacher_logits=t, divergence=divergence, alpha=0.1))
    assert not torch.equal(default, kdfast.kd_loss(z, y, teacher_logits=t, divergence=divergence, alpha=0.2))


def test_module_takes_alpha():
    z, y, t = small_inputs()
    module = kdfast.KDLoss(divergence="skew_kl", alpha=0.3, temperature=2.0)
    torch.testing.assert_close(module(z, y, teacher_logits=t),
                               kdfast.kd_loss(z, y, teacher_logits=t, divergence="skew_kl", alpha=0.3, temperature=2.0))
    assert "alpha=0.3" in repr(module)
