"""kdfast.hf on tiny Llama- and GPT-2-style models built offline: equal to kd_loss on the model's own logits."""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import hf

transformers = pytest.importorskip("transformers")

V, B, L = 97, 3, 11


def tiny_model(kind: str, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=V,
            n_embd=hidden,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config)
    return model.eval()  # no dropout: both paths must see the same hidden states


def batch(seed: int = 0):
    """input_ids with right padding in row 1 and left padding in row 2."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, L), generator=gen)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, :3] = 0
    return input_ids, attention_mask


def teacher_targets(kind: str, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(B, L, V, generator=gen)
    if kind == "dense":
        return {"teacher_logits": logits}
    values, indices = logits.topk(8, dim=-1)
    return {"teacher_indices": indices, "teacher_values": values}


def unfused(model, input_ids, attention_mask, teacher: dict, **options):
    """The model's own logits, shifted like transformers' loss, then kd_loss."""
    logits = model(input_ids, attention_mask=attention_mask).logits
    labels = input_ids.masked_fill(attention_mask == 0, -100)[:, 1:]
    return kdfast.kd_loss(logits[:, :-1], labels, **{k: v[:, :-1] for k, v in teacher.items()}, **options)


def loss_and_grads(fn, model, *args, **kwargs):
    model.zero_grad()
    loss = fn(model, *args, **kwargs)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(expected, actual):
    (ref_loss, ref_grads), (loss, grads) = expected, actual
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("teacher", ["dense", "sparse"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_matches_the_models_own_logits(kind, teacher):
    model = tiny_model(kind)
    input_ids, attention_mask = batch()
    targets = teacher_targets(teacher)
    options = {"hard_weight": 0.5, "temperature": 2.0}
    expected = loss_and_grads(unfused, model, input_ids, attention_mask, targets, **options)
    actual = loss_and_grads(hf.causal_lm_kd_loss, model, input_ids, attention_mask, **targets, chunk_size=7, **options)
    assert_same_loss_and_grads(expected, actual)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_online_teacher_model(kind):
    student, teacher = tiny_model(kind), tiny_model("llama", hidden=48, seed=1)
    input_ids, attention_mask = batch()
    with torch.no_grad():
        teacher_logits = teacher(input_ids, attention_mask=attention_mask).logits
    expected = loss_and_grads(
        unfused, student, input_ids, attention_mask, {"teacher_logits": teacher_logits}, temperature=1.5
    )
    actual = loss_and_grads(
        hf.causal_lm_kd_loss, student, input_ids, attention_mask, teacher_model=teacher, temperature=1.5
    )
    assert_same_loss_and_grads(expected, actual)
    assert all(p.grad is None for p in teacher.parameters())


def test_explicit_labels_are_used_unshifted_and_components():
    model = tiny_model("llama")
    input_ids, _ = batch()
    labels = input_ids.clone()
    labels[:, :4] = -100  # e.g. a prompt that is not trained on
    targets = teacher_targets("dense")
    loss, parts = hf.causal_lm_kd_loss(
        model, input_ids, labels=labels, **targets, hard_weight=1.0, return_components=True
    )
    logits = model(input_ids).logits[:, :-1]
    ref, ref_parts = kdfast.kd_loss(
        logits, labels[:, 1:], teacher_logits=targets["teacher_logits"][:, :-1], hard_weight=1.0, return_components=True
    )
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(parts.ce, ref_parts.ce)
    torch.testing.assert_close(parts.kd, ref_parts.kd)


def test_shift_labels_masks_padding():
    input_ids, attention_mask = batch()
    shifted = hf.shift_labels(input_ids, attention_mask)
    assert shifted.shape == (B, L - 1)
    assert (shifted[1, 6:] == -100).all() and (shifted[1, :6] == input_ids[1, 1:7]).all()
    assert (shifted[2, :2] == -100).all() and (shifted[2, 2:] == input_ids[2, 3:]).all()


def test_logit_softcapping_model_is_rejected():
    config = transformers.Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=30.0,
    )
    model = transformers.Gemma2ForCausalLM(config)
    input_ids, _ = batch()
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0 .* unsupported"):
        hf.causal_lm_kd_loss(model, input_ids, **teacher_targets("dense"))


@pytest.mark.parametrize(
    "targets, message",
    [
        ({"teacher_logits": torch.randn(B, L - 1, V)}, r"teacher_logits must be \[B, L, ...\] = \[3, 11, ...\]"),
        ({}, "give exactly one teacher"),
    ],
)
def test_bad_teacher_raises(targets, message):
    model = tiny_model("gpt2")
    input_ids, attention_mask = batch()
    with pytest.raises(ValueError, match=message):
        hf.causal_lm_kd_loss(model, input_ids, attention_mask, **targets)


def test_teacher_model_and_targets_together_raise():
    model = tiny_model("gpt2")
    input_ids, _ = batch()
    with pytest.raises(ValueError, match="give exactly one teacher"):
        hf.causal_lm_kd_loss(model, input_ids, teacher_model=model, **teacher_targets("dense"))


def test_teacher_tail_passes_through():
    """Sparse logprobs with the captured tail: same as kd_loss with teacher_tail on the shifted logits."""
    model = tiny_model("llama")
    input_ids, attention_mask = batch()
    gen = torch.Generator().manual_seed(2)
    log_p = torch.log_softmax(2 * torch.randn(B, L, V, generator=gen), -1)
    values, indices = log_p.topk(8, dim=-1)
    tail = torch.log1p(-values.exp().sum(-1)) - 0.5  # differs from 1 - sum(exp(values)): must be the one used
    targets = {"teacher_indices": indices, "teacher_values": values, "teacher_tail": tail}
    options = {"teacher_kind": "logprobs", "tail": True, "hard_weight": 0.5}
    expected = loss_and_grads(unfused, model, input_ids, attention_mask, targets, **options)
    actual = loss_and_grads(hf.causal_lm_kd_loss, model, input_ids, attention_mask, **targets, chunk_size=7, **options)
    assert_same_loss_and_grads(expected, actual)
    without = hf.causal_lm_kd_loss(model, input_ids, attention_mask, teacher_indices=indices, teacher_values=values,
                                   **options)
    assert abs(without.item() - actual[0].item()) > 1e-3


def test_teacher_tail_shape_is_checked():
    model = tiny_model("gpt2")
    input_ids, attention_mask = batch()
    values, indices = torch.log_softmax(torch.randn(B, L, V), -1).topk(8, dim=-1)
    with pytest.raises(ValueError, match=r"teacher_tail must be \[3, 11\]"):
        hf.causal_lm_kd_loss(model, input_ids, attention_mask, teacher_indices=indices, teacher_values=values,
                             teacher_tail=torch.zeros(B, L, 1), teacher_kind="logprobs", tail=True)
