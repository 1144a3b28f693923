"""Distill a Hugging Face causal LM with ``fused_linear_kd_loss``: no [B, L, V] logits, ever.

A causal LM computes ``logits = lm_head(base_model(input_ids).last_hidden_state)``. These helpers run
``model.base_model`` (``LlamaModel`` in ``LlamaForCausalLM``, ``GPT2Model`` in ``GPT2LMHeadModel``:
transformers' own name for "the model under the head", whatever attribute holds it), take the head
from ``model.get_output_embeddings()`` (weight and bias; tied embeddings stay tied because the same
Parameter is used) and hand both to the fused loss.

Alignment (next-token prediction, as transformers' own loss does): position i predicts token i+1, so
the student uses ``hidden[:, :-1]`` against ``labels[:, 1:]``. Teacher targets are given for all L
positions, aligned with the student's logits: ``teacher_logits[:, i]`` (or the sparse
``teacher_indices/values/tail[:, i]``) is the teacher's prediction of token i+1, i.e. exactly what
``teacher(input_ids).logits`` or a capture of it holds; the helper slices ``[:, :-1]`` itself.
Labels default to ``input_ids`` with ``ignore_index`` wherever ``attention_mask`` is 0; labels given
explicitly are used as is (unshifted, HF convention).

Under ``torch.autocast`` the head runs in the autocast dtype, as the model's own ``lm_head`` would.

Only plain heads are supported. A model whose forward changes the logits after the head
(Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's ``logits_scaling``, ...)
would be trained against different logits than it predicts, so such configs raise ``ValueError``.
The check reads the config fields of the models that do this in transformers 5.x.
"""

from __future__ import annotations

import torch

from kdfast.api import fused_linear_kd_loss

__all__ = ["causal_lm_kd_loss", "check_plain_head", "hidden_and_head", "shift_labels"]

# Config fields that mean "the forward post-processes the logits", each with its no-op values.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None, 0, 0.0),
    "logit_softcapping": (None, 0, 0.0),
    "output_logit_soft_cap": (None, 0, 0.0),
    "logits_soft_cap": (None, 0, 0.0),
    "logit_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
    "output_multiplier": (None, 1, 1.0),
    "lm_head_multiplier": (None, 1, 1.0),
    "logits_mup_width_multiplier": (None, 1, 1.0),
    "mup_enabled": (None, False),
}


def check_plain_head(model) -> None:
    """Raises ValueError when ``model``'s forward does more to the logits than its output embedding."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model must be a Hugging Face PreTrainedModel with a config, got {type(model).__name__}")
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for cfg in configs:
        for field, no_ops in _LOGIT_TRANSFORMS.items():
            value = getattr(cfg, field, None)
            if not any(value is no_op or (no_op is not None and value == no_op) for no_op in no_ops):
                raise ValueError(
                    f"{type(model).__name__} applies {field}={value!r} to its logits after the LM head; "
                    "kdfast.hf computes logits as hidden @ lm_head.weight.T + bias only, so this model is unsupported"
                )
    if getattr(model, "final_logits_bias", None) is not None:
        raise ValueError(f"{type(model).__name__} adds final_logits_bias to its logits; unsupported by kdfast.hf")


def hidden_and_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    return_outputs: bool = False, **model_kwargs):
    """(last hidden state [B, L, H], head weight [V, H], head bias [V] or None) of a causal LM;
    ``return_outputs``: the base model's outputs (e.g. with ``output_hidden_states=True``) instead of
    the last hidden state."""
    check_plain_head(model)
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        raise ValueError(
            f"model must be a causal LM with a head (e.g. LlamaForCausalLM, GPT2LMHeadModel), got {type(model).__name__}"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"model.get_output_embeddings() must hold a [V, H] weight, got {type(head).__name__}")
    outputs = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    if return_outputs:
        return outputs, weight, getattr(head, "bias", None)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden, weight, getattr(head, "bias", None)


def left_padded(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [B, P] (P = the longest prompt, at least 1) of 1-D int64
    ``prompts`` right-aligned (left-padded with ``pad_id``), as ``model.generate`` takes a batch."""
    longest = max(1, *(len(ids) for ids in prompts))
    device = prompts[0].device
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.int64, device=device)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.int64, device=device)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids):] = ids
        attention_mask[row, longest - len(ids):] = 1
    return input_ids, attention_mask


def shift_labels(
    input_ids: torch.Tensor,  # [B, L]
    attention_mask: torch.Tensor | None = None,  # [B, L]
    labels: torch.Tensor | None = None,  # [B, L]
    ignore_index: int = -100,
) -> torch.Tensor:  # [B, L-1]
    """Targets of positions 0..L-2: ``labels[:, 1:]``, where labels default to the unpadded input_ids."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, L] with L >= 2, got {tuple(input_ids.shape)}")
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is not None and tensor.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    return labels[:, 1:]


def causal_lm_kd_loss(
    model,
    input_ids: torch.Tensor,  # [B, L]
    attention_mask: torch.Tensor | None = None,  # [B, L]
    labels: torch.Tensor | None = None,  # [B, L], unshifted
    *,
    teacher_logits: torch.Tensor | None = None,  # [B, L, V]
    teacher_indices: torch.Tensor | None = None,  # [B, L, k]
    teacher_values: torch.Tensor | None = None,  # [B, L, k]
    teacher_tail: torch.Tensor | None = None,  # [B, L]
    teacher_model=None,
    model_kwargs: dict | None = None,
    **loss_options,
):
    """Distillation loss of a causal LM on ``input_ids``, as ``kd_loss`` on its shifted logits.

    Equal to ``kd_loss(model(input_ids).logits[:, :-1], shift_labels(...), teacher_logits=t[:, :-1], ...)``
    with the same gradients, but through ``fused_linear_kd_loss``. The teacher is one of dense
    ``teacher_logits``, sparse ``teacher_indices`` + ``teacher_values`` (all [B, L, ...], aligned as in
    the module docstring; with ``teacher_kind="logprobs", tail=True`` also ``teacher_tail`` [B, L], the
    captured log of the teacher's mass outside the slots) or ``teacher_model``, a causal LM with the same vocabulary run on the same
    inputs under no_grad (put it in eval mode yourself). ``model_kwargs`` go to both models'
    decoders (e.g. ``position_ids``); ``loss_options`` to ``fused_linear_kd_loss`` (``temperature``,
    ``hard_weight``, ``divergence`` with ``beta`` or ``alpha``, ``chunk_size``, ``return_components``, ...).
    """
    model_kwargs = model_kwargs or {}
    ignore_index = loss_options.get("ignore_index", -100)
    targets = shift_labels(input_ids, attention_mask, labels, ignore_index)
    teacher = _teacher_targets(
        input_ids,
        attention_mask,
        teacher_logits,
        teacher_indices,
        teacher_values,
        teacher_tail,
        teacher_model,
        model_kwargs,
    )
    hidden, weight, bias = hidden_and_head(model, input_ids, attention_mask, **model_kwargs)
    return fused_linear_kd_loss(hidden[:, :-1], weight, targets, bias=bias, **teacher, **loss_options)


def _teacher_targets(
    input_ids, attention_mask, teacher_logits, teacher_indices, teacher_values, teacher_tail, teacher_model, model_kwargs
) -> dict:
    """The teacher arguments of fused_linear_kd_loss, sliced to positions 0..L-2."""
    given = {
        "teacher_logits": teacher_logits,
        "teacher_indices": teacher_indices,
        "teacher_values": teacher_values,
        "teacher_tail": teacher_tail,
    }
    if teacher_model is not None:
        if any(t is not None for t in given.values()):
            raise ValueError(
                "give exactly one teacher: teacher_model, teacher_logits, or teacher_indices + teacher_values"
            )
        with torch.no_grad():
            hidden, weight, bias = hidden_and_head(teacher_model, input_ids, attention_mask, **model_kwargs)
        return {"teacher_hidden": hidden[:, :-1], "teacher_weight": weight, "teacher_bias": bias}
    batch, length = input_ids.shape
    for name, tensor in given.items():
        dims = 2 if name == "teacher_tail" else 3
        if tensor is not None and (tensor.dim() != dims or tuple(tensor.shape[:2]) != (batch, length)):
            shape = f"[{batch}, {length}]" if dims == 2 else f"[B, L, ...] = [{batch}, {length}, ...]"
            raise ValueError(
                f"{name} must be {shape} like input_ids (position i predicts token i+1), got {tuple(tensor.shape)}"
            )
    return {name: tensor[:, :-1] for name, tensor in given.items() if tensor is not None}
