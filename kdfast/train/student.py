"""The student (a Hugging Face causal LM or any module following the protocol) and ``DistillationModule``,
the student plus the fused loss in one ``forward``.

Protocol for any other ``nn.Module`` (``student_module = "pkg.mod:factory"`` or ``Trainer(config, model=m)``):

    module(input_ids [B, L] int64) -> hidden [B, L, H]      causal: row i sees tokens 0..i only
    module.get_output_embeddings() -> a layer with .weight [V, H] (and .bias [V] or None),
        or module.output_weight [V, H] (and optionally module.output_bias [V])
    logits = hidden @ weight.T + bias                       nothing applied after the head

Packing (``packing = true``): several sequences share a row and ``position_ids`` restart at 0 for
each; a Hugging Face model builds its causal mask per sequence from them (transformers 5.x, with no
attention mask and no cache), which ``check_packing_isolates`` verifies on the student itself once.
A protocol module takes ``input_ids`` only, so packing needs a Hugging Face student.

Precision: parameters are float32. With ``autocast_dtype`` (bf16 on CUDA) the student's forward runs
under autocast and the LM head runs in that dtype too: hidden states and a 16-bit copy of the head
(its gradient flows back to the float32 weight) go to the fused loss, which computes the softmax in
float32. The explicit cast matters: a Hugging Face model's final norm returns float32 under autocast,
and the fused loss runs outside autocast, so the head GEMMs would otherwise run in float32.
"""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from kdfast import hf
from kdfast.api import fused_linear_kd_loss, kd_loss
from kdfast.fused_linear import default_chunk_rows
from kdfast.shards import IGNORE_INDEX
from kdfast.train.config import TrainConfig
from kdfast.train.data import teacher_key

# Options of the held-out divergence D (unweighted, unscaled): the target, not the training weights.
_EVAL_OPTIONS = ("teacher_kind", "tail", "allow_tail_temperature", "temperature", "backend", "divergence", "beta",
                 "alpha")


def build_student(config: TrainConfig) -> nn.Module:
    """The student named by the config, in float32, initialised from ``config.seed``."""
    given = [name for name in ("student", "student_config", "student_module") if getattr(config, name)]
    if len(given) != 1:
        raise ValueError("TrainConfig: give exactly one of student, student_config, student_module; "
                         f"got {given or 'none'}")
    torch.manual_seed(config.seed)
    if config.student_module:
        return _student_from_factory(config.student_module)
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.student:
        return AutoModelForCausalLM.from_pretrained(config.student, dtype=torch.float32)
    values = config.student_config
    if isinstance(values, str):
        try:
            values = json.loads(Path(values).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"student_config {config.student_config}: cannot read a JSON config ({e})") from None
    values = dict(values)
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"student_config needs a 'model_type' key (e.g. 'llama'), got keys {sorted(values)}")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values), dtype=torch.float32)


def _student_from_factory(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"student_module {spec!r}: cannot import it ({e}); expected 'pkg.module:factory'") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"student_module {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


# Files that mean "a tokenizer is saved here" (save_pretrained writes tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def student_tokenizer(config: TrainConfig):
    """The tokenizer saved in the ``student`` directory (None: no directory, or no tokenizer in it), so that
    ``run_dir/final`` can carry it."""
    directory = Path(config.student) if config.student else None
    if directory is None or not directory.is_dir() or not any((directory / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def check_packing_isolates(student: nn.Module) -> None:
    """``packing = true``: the student must isolate the sequences of a packed row by their ``position_ids``.

    Runs two short sequences packed into one row and the second alone (float32, eval mode, fixed ids,
    no random numbers drawn) and compares the second's hidden states; ValueError when they differ,
    i.e. when the model lets the second sequence attend to the first.
    """
    if not is_hf_causal_lm(student):
        raise ValueError(f"packing = true needs a Hugging Face student (position_ids restart per sequence); "
                         f"{type(student).__name__} follows the nn.Module protocol, which takes input_ids only")
    device = next(student.parameters()).device
    vocab = student_vocab(student)
    first, second = torch.arange(1, 4, device=device) % vocab, torch.arange(4, 9, device=device) % vocab
    packed = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(3, device=device), torch.arange(5, device=device)])[None]
    training = student.training
    student.eval()
    try:
        with torch.no_grad():
            together = hf.hidden_and_head(student, packed, position_ids=positions)[0][0, 3:]
            alone = hf.hidden_and_head(student, second[None])[0][0]
    finally:
        student.train(training)
    if not torch.allclose(together.float(), alone.float(), rtol=1e-3, atol=1e-4):
        attention = getattr(student.config, "_attn_implementation", None)
        raise ValueError(f"packing = true: {type(student).__name__} (attn_implementation={attention!r}) does not "
                         "isolate packed sequences by position_ids (a sequence attends to the one before it in "
                         "its row); use packing = false or another attn_implementation")


def is_hf_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "base_model") and hasattr(model, "save_pretrained")


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of a protocol module's output layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return head.weight, getattr(head, "bias", None)
    weight = getattr(model, "output_weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} exposes no output layer: define get_output_embeddings() or output_weight [V, H]"
        )
    return weight, getattr(model, "output_bias", None)


def student_vocab(student: nn.Module) -> int:
    """Rows of the student's output weight (HF models with soft-capped or scaled logits are refused)."""
    if is_hf_causal_lm(student):
        hf.check_plain_head(student)
        return student.get_output_embeddings().weight.shape[0]
    return output_head(student)[0].shape[0]


class DistillationModule(nn.Module):
    """Student + fused loss in one ``forward``, so that DDP / FSDP2 hooks see the whole computation.

    ``forward(batch, num_items)`` -> (loss, LossComponents, hidden-state term) for training;
    ``forward(batch, evaluate=True)`` -> float64 sums [ce, kd, active tokens, top-1 matches, top-1 rows]
    for evaluation. ``batch`` is a compact batch (``kdfast.train.data.collate`` or ``pack`` of
    ``ShardDataset(compact=True)`` samples): ``input_ids`` / ``labels`` [B, L] and teacher rows [N, k] /
    [N] of the N labelled positions in row-major order. The student runs on every position; the head and
    the loss run on the hidden states of the labelled positions only (row j of the hidden states predicts
    ``labels[j]``: the labels are shifted already), the rows that carry loss, so prompt and padding
    positions cost no head matmul and no softmax. Rows without a label add nothing to the loss or its
    gradients and the divisor is the count of labels either way, so this is the loss of all rows with
    the full-length teacher tensors. A packed batch (``kdfast.train.data.pack``) carries
    ``position_ids``, which go to the student (and the live teacher).
    ``loss_options`` are ``fused_linear_kd_loss`` keywords; with ``tail`` the batch's ``teacher_tail``
    (the shards' exact tail log-mass) is passed as well, instead of the mass recomputed from the values.

    The teacher is the batch's shard rows, or ``live_teacher`` (a ``kdfast.train.teachers.LiveTeacher``,
    not a submodule: it is neither trained nor checkpointed), or with ``teacher_weights`` several shard
    sets' rows (``TeacherStack`` batches). ``hidden_loss`` (a ``HiddenStateLoss``, a submodule: its
    projections train with the student) adds the hidden-state term. ``on_policy=True`` (a batch the
    student wrote): the hard cross-entropy is off.
    """

    def __init__(self, student: nn.Module, loss_options: dict, autocast_dtype: torch.dtype | None = None, *,
                 live_teacher=None, hidden_loss: nn.Module | None = None, teacher_weights: list[float] | None = None):
        super().__init__()
        self.student = student
        self.loss_options = loss_options
        self.autocast_dtype = autocast_dtype
        self.hf = is_hf_causal_lm(student)
        self.live_teacher = live_teacher
        self.hidden_loss = hidden_loss
        self.teacher_weights = list(teacher_weights) if teacher_weights else None

    def loss_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """The student's hidden states [B, L, H] and the LM head (weight [V, H], bias [V]), in the compute
        dtype. ``position_ids`` [B, L]: a packed batch's (Hugging Face students only)."""
        return self.student_outputs(input_ids, position_ids)[:3]

    def student_outputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                        all_states: bool = False):
        """``loss_inputs`` and, with ``all_states``, every layer's hidden states (Hugging Face
        ``hidden_states``; else None)."""
        states = None
        with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            if self.hf:
                outputs, weight, bias = hf.hidden_and_head(self.student, input_ids, position_ids=position_ids,
                                                           output_hidden_states=all_states, return_outputs=True)
                hidden = outputs.last_hidden_state
                states = outputs.hidden_states if all_states else None
            else:
                hidden = self.student(input_ids)
                weight, bias = output_head(self.student)
        dtype = self.autocast_dtype or hidden.dtype  # a 16-bit copy of the head; its gradient flows back
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), states

    def _shard_teachers(self, batch: dict) -> dict:
        """The fused loss's teacher arguments from the batch's shard rows (one set, or several)."""
        names = ("teacher_indices", "teacher_values") + (("teacher_tail",) if self.loss_options["tail"] else ())
        if self.teacher_weights is None:
            return {name: batch[name] for name in names}
        teachers = range(len(self.teacher_weights))
        return {**{name: tuple(batch[teacher_key(name, j)] for j in teachers) for name in names},
                "teacher_weights": self.teacher_weights}

    def forward(self, batch: dict, num_items: torch.Tensor | None = None, evaluate: bool = False,
                on_policy: bool = False):
        want_states = self.hidden_loss is not None and not evaluate
        position_ids = batch.get("position_ids")
        hidden, weight, bias, states = self.student_outputs(batch["input_ids"], position_ids, want_states)
        labelled = batch["labels"] != IGNORE_INDEX  # [B, L]
        rows, labels = hidden[labelled], batch["labels"][labelled]  # [N, H], [N]: the rows the teacher rows fit
        teacher_states = None
        if self.live_teacher is not None:
            last, teacher_states, t_weight, t_bias = self.live_teacher.forward(batch["input_ids"], position_ids,
                                                                               want_states)
            teacher = {"teacher_hidden": last[labelled], "teacher_weight": t_weight, "teacher_bias": t_bias}
        else:
            teacher = self._shard_teachers(batch)
        if evaluate:
            with torch.no_grad():
                return self._eval_sums(rows, weight, bias, labels, teacher)
        options = {**self.loss_options, "hard_weight": 0.0} if on_policy else self.loss_options
        loss, parts = fused_linear_kd_loss(rows, weight, labels, bias=bias, num_items=num_items,
                                           return_components=True, **teacher, **options)
        hidden_term = torch.zeros((), device=loss.device)
        if self.hidden_loss is not None:
            hidden_term = self.hidden_loss(states, teacher_states, labelled, num_items)
            loss = loss + hidden_term
        return loss, parts, hidden_term.detach()

    def _eval_sums(self, hidden, weight, bias, labels, teacher) -> torch.Tensor:
        """[ce_sum, kd_sum, active, top1_matches, top1_rows] over the labelled rows ``hidden`` [N, H], a chunk
        of logits at a time (the teacher's too, for a live teacher); with several teachers kd is the
        weighted sum of their divergences and top-1 compares with the first."""
        options = {key: value for key, value in self.loss_options.items() if key in _EVAL_OPTIONS}
        rows = self.loss_options["chunk_size"] or default_chunk_rows(hidden.shape[0], weight.shape[0], hidden.dtype)
        sums = torch.zeros(5, dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, min(start + rows, hidden.shape[0]))
            logits = nn.functional.linear(hidden[chunk], weight, bias)  # [c, V]
            n_active = torch.tensor(logits.shape[0], device=logits.device)
            ce, kd, teacher_top1 = self._chunk_divergence(logits, labels[chunk], teacher, chunk, options)
            scored = teacher_top1 >= 0
            matches = (logits.argmax(-1) == teacher_top1) & scored
            chunk_sums = [ce * n_active, kd * n_active, n_active, matches.sum(), scored.sum()]
            sums += torch.stack(chunk_sums).double()
        return sums

    def _chunk_targets(self, logits, teacher: dict, chunk: slice, j: int) -> dict:
        """kd_loss teacher arguments of rows ``chunk`` for teacher j (a live teacher: its logits)."""
        if "teacher_hidden" in teacher:
            teacher_logits = nn.functional.linear(teacher["teacher_hidden"][chunk], teacher["teacher_weight"],
                                                  teacher["teacher_bias"])
            return {"teacher_logits": teacher_logits.to(logits.dtype)}
        tensors = {name: t for name, t in teacher.items() if name != "teacher_weights"}
        if "teacher_weights" in teacher:
            tensors = {name: t[j] for name, t in tensors.items()}
        return {name: t[chunk] for name, t in tensors.items()}

    def _chunk_divergence(self, logits, labels, teacher: dict, chunk: slice, options: dict):
        """Means over the chunk's rows of the hard CE and of the divergence D (weighted over several
        teachers), and the (first) teacher's top-1 [c] (-1 = none)."""
        ce = kd = top1 = None
        for j, w in enumerate(teacher.get("teacher_weights", [1.0])):
            targets = self._chunk_targets(logits, teacher, chunk, j)
            parts = kd_loss(logits, labels, return_components=True, **targets, **options)[1]
            kd = w * parts.kd if kd is None else kd + w * parts.kd
            if j == 0:
                ce = parts.ce
                top1 = (targets["teacher_logits"].argmax(-1) if "teacher_logits" in targets
                        else _teacher_top1(targets["teacher_indices"], targets["teacher_values"]))
        return ce, kd, top1


def _teacher_top1(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # [N, k] -> [N], -1 = none
    """The teacher's most likely slot (values are log-probs or probs: both rank the same way)."""
    scores = values.float().masked_fill(indices < 0, -math.inf)
    best = indices.gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1).long()
    return torch.where((indices >= 0).any(-1), best, torch.full_like(best, -1))
