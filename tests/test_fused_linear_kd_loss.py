"""fused_linear_kd_loss against the unfused float64 reference: values and hidden/weight/bias gradients.

Every comparison follows conftest's rule: the fused error must not exceed the unfused path's own error
in the input dtype (logits materialized in that dtype, then the reference loss) plus a small atol.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import fused_linear, reference
from tests.conftest import assert_close_to_oracle, require_backend

LEAD, H, V, K = (3, 13), 24, 131, 7  # 39 rows: odd, and not divisible by the chunk sizes below
IGNORE = -100


def make_inputs(teacher: str, bias: bool, dtype=torch.float32, lead=LEAD, seed=0, teacher_kind="logits"):
    """Random student head, labels with ignored rows, and one teacher form (all leaves on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype)
    inputs = {
        "hidden": randn(*lead, H),
        "weight": randn(V, H, scale=0.4),
        "bias": randn(V, scale=0.5) if bias else None,
        "labels": torch.randint(0, V, lead, generator=gen),
    }
    inputs["labels"].view(-1)[::4] = IGNORE
    if teacher == "dense":
        inputs["teacher_logits"] = randn(*lead, V, scale=2.0)
    elif teacher == "sparse":
        scores = torch.rand(*lead, V, generator=gen)
        indices = scores.topk(K, dim=-1).indices
        indices.view(-1, K)[::3, -2:] = -1  # some rows with empty slots
        values = torch.randn(*lead, K, generator=gen)
        if teacher_kind == "logprobs":
            values = torch.log_softmax(values, -1) - 0.3  # 26% of the mass left for the tail bucket
        elif teacher_kind == "probs":
            values = torch.softmax(values.masked_fill(indices < 0, -torch.inf), -1)
        inputs["teacher_indices"], inputs["teacher_values"] = indices, values.to(dtype)
    else:
        inputs["teacher_hidden"] = randn(*lead, H + 5)
        inputs["teacher_weight"] = randn(V, H + 5, scale=0.4)
        inputs["teacher_bias"] = randn(V, scale=0.5)
    return inputs


def grad_leaves(inputs) -> list[str]:
    return [name for name in ("hidden", "weight", "bias") if inputs[name] is not None]


def run(loss_fn, inputs, convert=lambda t: t, grad_output=None, **options):
    """(loss, {name: grad}) of loss_fn(hidden, weight, labels, **rest, **options) on converted copies."""
    leaves = {name: convert(inputs[name]).detach().requires_grad_() for name in grad_leaves(inputs)}
    rest = {name: convert(t) if t.is_floating_point() else t for name, t in inputs.items() if t is not None}
    rest.update(leaves)
    hidden, weight, labels = rest.pop("hidden"), rest.pop("weight"), rest.pop("labels", None)
    loss = loss_fn(hidden, weight, labels, **rest, **options)
    grad_output = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    grads = torch.autograd.grad(loss, list(leaves.values()), grad_output)
    return loss.detach(), dict(zip(leaves, grads))


def unfused(
    hidden, weight, labels, *, bias=None, teacher_hidden=None, teacher_weight=None, teacher_bias=None, **options
):
    """The eager path in the inputs' dtype: materialized logits, then the reference loss."""
    if teacher_hidden is not None:
        options["teacher_logits"] = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    return reference.kd_loss(F.linear(hidden, weight, bias), labels, **options)


def oracle(inputs, grad_output=None, **options):
    """The unfused reference in float64 (of the possibly 16-bit-rounded inputs)."""
    return run(reference.fused_linear_kd_loss, inputs, lambda t: t.double(), grad_output, **options)


def assert_close(actual, expected, rtol: float):
    """|a - e| <= rtol * max|e|, for checks without an unfused counterpart."""
    scale = max(expected.abs().max().item(), 1e-3)
    err = (actual.double() - expected).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * {scale:.3g}"


def use_backend(backend: str) -> None:
    require_backend(backend)
    if backend != "torch":
        pytest.importorskip(f"kdfast.ops.{backend}.kd_loss")


def assert_matches_oracle(inputs, grad_output=None, **options):
    """Fused value and gradients vs the float64 oracle, within the unfused same-dtype path's own error."""
    loss, grads = run(kdfast.fused_linear_kd_loss, inputs, grad_output=grad_output, **options)
    options.pop("chunk_size", None)
    options.pop("backend", None)
    ref_loss, ref_grads = oracle(inputs, grad_output, **options)
    same_loss, same_grads = run(unfused, inputs, grad_output=grad_output, **options)
    dtype = inputs["hidden"].dtype
    assert loss.shape == ref_loss.shape
    assert_close_to_oracle(loss, same_loss, ref_loss, dtype, "loss")
    for name, ref in ref_grads.items():
        assert grads[name].dtype == dtype, name
        assert_close_to_oracle(grads[name], same_grads[name], ref, dtype, f"grad {name}")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, None])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("teacher", ["dense", "sparse", "online"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_reference(backend, teacher, bias, reduction, chunk_size):
    use_backend(backend)
    inputs = make_inputs(teacher, bias)
    grad_output = torch.randn(LEAD, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    assert_matches_oracle(
        inputs,
        grad_output,
        backend=backend,
        chunk_size=chunk_size,
        reduction=reduction,
        temperature=2.0,
        hard_weight=0.5,
        ignore_index=IGNORE,
    )
    assert kdfast.last_backend() == backend


@pytest.mark.parametrize("teacher, reduction", [("dense", "mean"), ("sparse", "none"), ("online", "sum")])
def test_triton_interpreter_matches_reference(teacher, reduction):
    """Triton under the interpreter is slow: each teacher once, a chunk size that does not divide the rows."""
    use_backend("triton")
    inputs = make_inputs(teacher, bias=True)
    grad_output = torch.randn(LEAD, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    assert_matches_oracle(inputs, grad_output, backend="triton", chunk_size=16, reduction=reduction, hard_weight=0.5)


@pytest.mark.parametrize(
    "teacher, options",
    [
        ("sparse", {"teacher_kind": "logprobs", "tail": True}),
        ("sparse", {"teacher_kind": "logprobs", "temperature": 0.7}),
        ("sparse", {"teacher_kind": "probs", "scale_t2": False, "temperature": 3.0}),
        ("dense", {"divergence": "reverse_kl", "temperature": 1.5}),
        ("dense", {"divergence": "jsd", "beta": 0.3, "soft_weight": 0.7}),
        ("online", {"divergence": "jsd", "beta": 0.5, "temperature": 0.5}),
        ("online", {"hard_weight": 1.0, "soft_weight": 0.0}),
    ],
)
def test_loss_options(teacher, options):
    inputs = make_inputs(teacher, bias=True, teacher_kind=options.get("teacher_kind", "logits"))
    assert_matches_oracle(inputs, chunk_size=7, **{"hard_weight": 0.25, **options})


@pytest.mark.parametrize("num_items", [10, 57.0, torch.tensor(23)])
def test_num_items_divides_every_chunk(num_items):
    inputs = make_inputs("sparse", bias=True)
    assert_matches_oracle(inputs, chunk_size=4, hard_weight=1.0, num_items=num_items)


def test_labels_none_every_row_active():
    inputs = make_inputs("dense", bias=False)
    inputs["labels"] = None
    assert_matches_oracle(inputs, chunk_size=8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("teacher", ["dense", "sparse", "online"])
def test_16bit_head(teacher, dtype):
    """16-bit logits round like the unfused path; the fp32 weight-gradient accumulation adds no error."""
    inputs = make_inputs(teacher, bias=True, dtype=dtype, lead=(75,))
    assert_matches_oracle(inputs, chunk_size=9, hard_weight=0.5, temperature=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_weight_gradient_accumulates_in_fp32(dtype):
    """256 chunks: adding the per-chunk partials in 16 bits would triple the unfused path's error."""
    inputs = make_inputs("sparse", bias=True, dtype=dtype, lead=(512,))
    assert_matches_oracle(inputs, chunk_size=2, reduction="sum")


def test_scalar_grad_output_scales_the_stored_gradients():
    inputs = make_inputs("sparse", bias=True)
    assert_matches_oracle(inputs, grad_output=torch.tensor(-3.5), chunk_size=10, hard_weight=0.5)


def test_all_rows_ignored_gives_zero_loss_and_gradients():
    inputs = make_inputs("dense", bias=True)
    inputs["labels"].fill_(IGNORE)
    loss, grads = run(kdfast.fused_linear_kd_loss, inputs, chunk_size=8, hard_weight=1.0)
    assert loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads.values())


def test_empty_batch():
    inputs = make_inputs("sparse", bias=True, lead=(0,))
    loss, grads = run(kdfast.fused_linear_kd_loss, inputs, hard_weight=1.0)
    assert loss.item() == 0.0
    assert grads["hidden"].shape == (0, H) and bool((grads["weight"] == 0).all())


def test_frozen_inputs_and_no_grad():
    inputs = make_inputs("online", bias=True)
    hidden, weight, bias = inputs.pop("hidden"), inputs.pop("weight").requires_grad_(), inputs.pop("bias")
    labels = inputs.pop("labels")
    loss = kdfast.fused_linear_kd_loss(hidden, weight, labels, bias=bias, chunk_size=6, **inputs)
    (grad_weight,) = torch.autograd.grad(loss, weight)
    ref_weight = weight.detach().double().requires_grad_()
    ref = reference.fused_linear_kd_loss(
        hidden.double(), ref_weight, labels, bias=bias.double(), **{k: v.double() for k, v in inputs.items()}
    )
    ref.backward()
    assert_close(grad_weight, ref_weight.grad, 2e-5)
    with torch.no_grad():
        assert_close(kdfast.fused_linear_kd_loss(hidden, weight, labels, bias=bias, **inputs), ref.detach(), 2e-5)


def test_return_components_and_module():
    inputs = make_inputs("dense", bias=False)
    options = {"hard_weight": 0.5, "temperature": 2.0, "chunk_size": 11}
    module = kdfast.FusedLinearKDLoss(return_components=True, **options)
    tensors = {k: v for k, v in inputs.items() if k not in ("hidden", "weight", "labels") and v is not None}
    loss, parts = module(inputs["hidden"], inputs["weight"], inputs["labels"], **tensors)
    del options["chunk_size"]
    ref_loss, ref_parts = reference.fused_linear_kd_loss(
        inputs["hidden"].double(),
        inputs["weight"].double(),
        inputs["labels"],
        teacher_logits=inputs["teacher_logits"].double(),
        return_components=True,
        **options,
    )
    assert_close(loss, ref_loss, 2e-5)
    assert_close(parts.ce, ref_parts.ce, 2e-5)
    assert_close(parts.kd, ref_parts.kd, 2e-5)
    assert "chunk_size=11" in repr(module)


def test_backward_twice_raises():
    inputs = make_inputs("sparse", bias=False)
    hidden = inputs["hidden"].requires_grad_()
    loss = kdfast.fused_linear_kd_loss(
        hidden,
        inputs["weight"],
        inputs["labels"],
        teacher_indices=inputs["teacher_indices"],
        teacher_values=inputs["teacher_values"],
    )
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize(
    "vocab, dtype, rows", [(128256, torch.float32, 4096), (128256, torch.bfloat16, 5000), (32000, torch.float32, 7)]
)
def test_default_chunk_rows_fits_the_budget(vocab, dtype, rows):
    chunk = fused_linear.default_chunk_rows(rows, vocab, dtype)
    chunks = -(-rows // chunk)
    assert 1 <= chunk <= rows
    assert chunk * vocab * torch.empty((), dtype=dtype).element_size() <= fused_linear.CHUNK_BYTES
    assert chunks * chunk - rows < chunks  # balanced: the last chunk is short by less than one row per chunk


def _bad(**changes):
    inputs = make_inputs("dense", bias=True)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize(
    "inputs, options, message",
    [
        (_bad(weight=None), {}, "weight must be a torch.Tensor, got NoneType"),
        (
            _bad(weight=torch.randn(V, H + 1)),
            {},
            r"weight must be \[V, H\] with H = hidden.shape\[-1\] = 24, got \(131, 25\)",
        ),
        (
            _bad(weight=torch.randn(V, H, dtype=torch.float64)),
            {},
            "weight dtype torch.float64 != hidden dtype torch.float32",
        ),
        (_bad(bias=torch.randn(V + 1)), {}, r"bias must be \[V\] = \[131\]"),
        (
            _bad(teacher_logits=torch.randn(*LEAD, V + 2)),
            {},
            r"teacher_logits shape \(3, 13, 133\) != logits \(hidden @ weight.T\) shape \(3, 13, 131\)",
        ),
        (
            _bad(labels=torch.zeros(3, 12, dtype=torch.long)),
            {},
            r"labels shape \(3, 12\) != logits \(hidden @ weight.T\) leading shape",
        ),
        (_bad(labels=torch.full(LEAD, V)), {}, r"labels must be in \[0, 131\)"),
        (_bad(teacher_logits=None), {}, "give exactly one teacher"),
        (_bad(teacher_hidden=torch.randn(*LEAD, 8), teacher_weight=torch.randn(V, 8)), {}, "give exactly one teacher"),
        (
            _bad(teacher_logits=None, teacher_hidden=torch.randn(3, 12, 8), teacher_weight=torch.randn(V, 8)),
            {},
            r"teacher_hidden must be \[..., Ht\] with the rows of hidden \(3, 13, 24\), got \(3, 12, 8\)",
        ),
        (
            _bad(teacher_logits=None, teacher_hidden=torch.randn(*LEAD, 8), teacher_weight=torch.randn(V - 1, 8)),
            {},
            r"teacher_weight must be \[V, Ht\] = \[131, 8\]",
        ),
        (
            _bad(teacher_logits=None, teacher_bias=torch.randn(V)),
            {},
            "online teacher needs both teacher_hidden and teacher_weight",
        ),
        (
            _bad(teacher_logits=None, teacher_hidden=torch.randn(*LEAD, 8), teacher_weight=torch.randn(V, 8).double()),
            {},
            "teacher_weight must be floating, one dtype for teacher_hidden/weight/bias, got torch.float64",
        ),
        (_bad(), {"chunk_size": 0}, "chunk_size must be an int > 0 or None, got 0"),
        (_bad(), {"chunk_size": 2.5}, "chunk_size must be an int > 0 or None, got 2.5"),
        (_bad(), {"temperature": 0.0}, "temperature must be a finite number > 0"),
        (_bad(), {"reduction": "avg"}, "reduction must be one of"),
        (_bad(), {"num_items": 5, "reduction": "sum"}, "num_items only applies to reduction='mean'"),
        (_bad(labels=None), {"hard_weight": 1.0}, "hard_weight=1.0 needs labels"),
    ],
)
def test_bad_input_raises_value_error(inputs, options, message):
    hidden, weight, labels = inputs.pop("hidden"), inputs.pop("weight"), inputs.pop("labels")
    with pytest.raises(ValueError, match=f"^fused_linear_kd_loss: .*{message}"):
        kdfast.fused_linear_kd_loss(
            hidden, weight, labels, **{k: v for k, v in inputs.items() if v is not None}, **options
        )


@pytest.mark.parametrize("teacher", ["sparse", "online"])
def test_autocast_computes_the_head_like_f_linear(teacher):
    """fp32 leaves under autocast: bf16 logits as F.linear gives them, fp32 gradients for the leaves."""
    inputs = make_inputs(teacher, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = run(kdfast.fused_linear_kd_loss, inputs, chunk_size=10, hard_weight=0.5)
        same_loss, same_grads = run(unfused, inputs, hard_weight=0.5)
    bf16_inputs = {k: v.to(torch.bfloat16) if v is not None and v.is_floating_point() else v for k, v in inputs.items()}
    ref_loss, ref_grads = oracle(bf16_inputs, hard_weight=0.5)
    assert_close_to_oracle(loss, same_loss, ref_loss, torch.bfloat16, "loss")
    for name, ref in ref_grads.items():
        assert grads[name].dtype == torch.float32
        assert_close_to_oracle(grads[name], same_grads[name], ref, torch.bfloat16, f"grad {name}")
