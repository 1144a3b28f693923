"""Teachers inside the trainer: a live teacher beside the student, hidden-state distillation against
it, and the student's own continuations scored by it (on-policy).

Live teacher (``teacher = "DIR"``). A Hugging Face causal LM loaded frozen (eval mode, no gradients,
``teacher_dtype``, the trainer's device), never part of the trained module: the optimizer, DDP/FSDP
and the checkpoints do not see it. Each micro-batch it runs on the student's ``input_ids`` (and a
packed batch's ``position_ids``) under no_grad, and ``fused_linear_kd_loss`` takes its hidden states
of the labelled positions and its head (``teacher_hidden``, ``teacher_weight``): the teacher's logits
exist one chunk at a time, like the student's, so every dense divergence works and no [B, L, V]
tensor of either model is built. Its identity (``LiveTeacher.identity``: a fingerprint of its
config, tokenizer and weight files) is stored in each checkpoint and checked on resume.

Hidden-state loss (``hidden_loss``). For each ``[s, t]`` of ``hidden_layer_map``, the student's
``hidden_states[s]`` and the teacher's ``hidden_states[t]`` (0 = the embeddings, l = after layer l;
the last entry of a Hugging Face model is after its final norm) at the labelled positions; the
student's side goes through a learned ``Linear(H_student, H_teacher, bias=False)`` when the widths
differ. Per position: ``1 - cos(P s, t)`` (cosine) or ``mean((P s - t)^2)`` over the features (mse);
the term is ``hidden_loss_weight * sum over pairs and positions / num_items``, the same divisor as the
distillation loss, so accumulation and DDP keep it exact. The projections are trained with the
student, saved in its checkpoints and written to ``final/hidden_projections.pt``: they are for
training only (the exported student does not use them).

On-policy (``on_policy_fraction``). Micro-batch m of step s is on-policy when
``default_rng([seed, s, m]).random() < on_policy_fraction``: a pure function of the data position, so
a resumed run makes the same choices. Its sequences are cut to their prompts (the tokens before the
first learned position; a sequence learned from its start keeps its first half), the student writes
up to ``max_new_tokens`` after each (sampling at ``generation_temperature`` from its full
distribution, 0 = greedy, none of its own generation defaults applied; it stops at its EOS), with
torch's RNG seeded from (seed, step, micro-batch, rank) inside ``fork_rng``, so the run's other
random numbers are untouched. Only the written tokens are
learned; the hard cross-entropy is off on these batches (it would teach the student its own samples).

Several teachers from shards (``teacher_shards``) are data: ``kdfast.train.data.TeacherStack``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdfast import hf
from kdfast.shards import IGNORE_INDEX

log = logging.getLogger("kdfast.train")

# --- live teacher --------------------------------------------------------------------------------


class LiveTeacher:
    """A frozen Hugging Face causal LM beside the student (module docstring). ``student_tokenizer``: the
    student's (None: not known); when the teacher directory holds a tokenizer too, their vocabularies
    must be equal."""

    def __init__(self, path: str, dtype: str, device: torch.device, student_vocab: int, student_tokenizer=None):
        from transformers import AutoModelForCausalLM

        from kdfast.capture import _files_fingerprint

        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise ValueError(f"teacher {path!r}: not a Hugging Face model directory (no config.json)")
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).to(device)
        self.model.eval().requires_grad_(False)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if vocab != student_vocab:
            raise ValueError(f"teacher {path!r} has a vocabulary of {vocab} tokens but the student has {student_vocab}; "
                             "the teacher and the student must share the tokenizer (cross-tokenizer distillation is "
                             "not supported)")
        _check_same_tokenizer(directory, student_tokenizer)
        self.identity = _files_fingerprint(directory)  # config, tokenizer and weight files: checked on resume

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, all_states: bool):
        """(last hidden [B, L, Ht], hidden_states tuple or None, head weight [V, Ht], head bias [V] or None)."""
        with torch.autocast(input_ids.device.type, enabled=False):
            outputs, weight, bias = hf.hidden_and_head(self.model, input_ids, position_ids=position_ids,
                                                       output_hidden_states=all_states, return_outputs=True)
        return outputs.last_hidden_state, (outputs.hidden_states if all_states else None), weight, bias


def _check_same_tokenizer(teacher_dir: Path, student_tokenizer) -> None:
    """The teacher directory's tokenizer (if it holds one) has the student tokenizer's vocabulary."""
    from kdfast.train.student import TOKENIZER_FILES

    if student_tokenizer is None or not any((teacher_dir / f).exists() for f in TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    teacher_vocab = AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()))[:3]
        raise ValueError(f"teacher {teacher_dir} and the student have different tokenizers (e.g. {differing}); "
                         "cross-tokenizer distillation is not supported")


# --- hidden-state loss ---------------------------------------------------------------------------


class HiddenStateLoss(nn.Module):
    """``hidden_loss`` against the live teacher's hidden states (module docstring)."""

    def __init__(self, kind: str, weight: float, layer_map: list[list[int]], student_layers: int,
                 student_width: int, teacher_layers: int, teacher_width: int):
        super().__init__()
        for pair in layer_map:
            if pair[0] > student_layers or pair[1] > teacher_layers:
                raise ValueError(f"hidden_layer_map: pair {pair} is out of range: the student has hidden states "
                                 f"0..{student_layers} and the teacher 0..{teacher_layers}")
        self.kind, self.weight, self.layer_map = kind, weight, [tuple(pair) for pair in layer_map]
        self.projections = nn.ModuleList(
            nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width, bias=False)
            for _ in layer_map)

    def forward(self, student_states: tuple, teacher_states: tuple, labelled: torch.Tensor,
                num_items: torch.Tensor) -> torch.Tensor:
        """0-dim: the weighted sum over pairs and labelled positions ([B, L] mask) divided by ``num_items``."""
        total = 0.0
        for (s, t), projection in zip(self.layer_map, self.projections):
            student = projection(_at_least_float32(student_states[s][labelled]))  # [N, Ht]
            teacher = _at_least_float32(teacher_states[t][labelled])  # [N, Ht]
            total = total + hidden_distance(self.kind, student, teacher).sum()
        return self.weight * total / num_items


def _at_least_float32(states: torch.Tensor) -> torch.Tensor:
    """16-bit hidden states in float32 (the distance is computed in float32 or float64)."""
    return states.to(torch.promote_types(states.dtype, torch.float32))


def hidden_distance(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:  # [N, H] x2 -> [N]
    if kind == "cosine":
        return 1 - nn.functional.cosine_similarity(student, teacher, dim=-1)
    return (student - teacher).pow(2).mean(-1)


def model_widths(model: nn.Module) -> tuple[int, int]:
    """(number of layers, hidden width) of a Hugging Face model."""
    return model.config.num_hidden_layers, model.config.hidden_size


# --- on-policy -----------------------------------------------------------------------------------


def is_on_policy(seed: int, step: int, micro_batch: int, fraction: float) -> bool:
    """Whether micro-batch ``micro_batch`` of step ``step`` (1-based) is on-policy."""
    return fraction > 0 and np.random.default_rng([seed, step, micro_batch]).random() < fraction


def prompts(batch: dict) -> list[torch.Tensor]:
    """Each row's prompt (module docstring); a row without labels (a skipped sequence) gives an empty one."""
    result = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        learned = (labels != IGNORE_INDEX).nonzero().flatten()
        if len(learned) == 0:
            result.append(ids[:0])
            continue
        first, length = int(learned[0]), int(learned[-1]) + 2  # the last position never has a label
        result.append(ids[:first + 1] if first > 0 else ids[:max(1, length // 2)])
    return result


@torch.no_grad()
def student_continuations(student: nn.Module, batch: dict, *, max_new_tokens: int, temperature: float,
                          seed: tuple[int, ...]) -> tuple[dict, int, float]:
    """The on-policy micro-batch of ``batch``: its prompts continued by ``student``, only the written
    tokens labelled (``input_ids``, ``labels`` [B, L'], ``num_tokens``: the sequences' tokens); also the
    number of written tokens and the seconds generation took."""
    from transformers import GenerationConfig

    started = time.perf_counter()
    device = batch["input_ids"].device
    rows = prompts(batch)
    eos = _eos_ids(student)
    pad = 0
    ids, mask = hf.left_padded(rows, pad)  # [B, P]
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
        dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, **sampling)
    training, defaults = student.training, student.generation_config
    student.eval()
    student.generation_config = GenerationConfig()  # none of the student's own defaults (e.g. a repetition penalty)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(np.random.default_rng(list(seed)).integers(2**62)))
            written = student.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    finally:
        student.train(training)
        student.generation_config = defaults
    sequences, labels, count = [], [], 0
    for prompt, new in zip(rows, written):
        new = _until_eos(new, eos) if len(prompt) else new[:0]
        sequence = torch.cat([prompt, new])
        label = torch.full_like(sequence, IGNORE_INDEX)
        label[max(len(prompt) - 1, 0):len(sequence) - 1] = sequence[len(prompt):]
        sequences.append(sequence if len(sequence) else sequence.new_zeros(1))
        labels.append(label if len(sequence) else label.new_full((1,), IGNORE_INDEX))
        count += len(new)
    pad_rows = nn.utils.rnn.pad_sequence
    out = {"input_ids": pad_rows(sequences, batch_first=True, padding_value=pad),
           "labels": pad_rows(labels, batch_first=True, padding_value=IGNORE_INDEX),
           "num_tokens": sum(len(prompt) for prompt in rows) + count}
    return out, count, time.perf_counter() - started


def _eos_ids(student: nn.Module) -> list[int] | None:
    eos = getattr(getattr(student, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(student.config, "eos_token_id", None)
    return None if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _until_eos(tokens: torch.Tensor, eos: list[int] | None) -> torch.Tensor:
    """``tokens`` [G] up to and including the first EOS (generate pads after it)."""
    if not eos:
        return tokens
    hits = torch.isin(tokens, torch.tensor(eos, device=tokens.device)).nonzero().flatten()
    return tokens if len(hits) == 0 else tokens[:int(hits[0]) + 1]
