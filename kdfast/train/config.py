"""``TrainConfig``: every setting of a run, from a TOML file and the command line. Imports no torch.

    config = load_config("run.toml", {"lr": 1e-3})            # TOML keys at top level, then overrides
    add_train_arguments(parser); config_from_args(args)       # `kdfast train --config run.toml --lr 1e-3`

The dataclass fields are the schema: their types check TOML and override values (an int is accepted
for a float, also inside a list, nothing else is converted), their ``help`` metadata is the ``--help``
text, and each field is a command-line option ``--name`` (also ``--name-with-dashes``; a list is
given as a JSON array, e.g. ``--train-weights '[0.7, 0.3]'``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = ["TrainConfig", "load_config", "add_train_arguments", "config_from_args", "OPERATIONAL_KEYS"]

# Keys that may change between a run and its resumption without breaking exactness.
OPERATIONAL_KEYS = {"run_dir", "resume", "progress", "num_workers", "eval_every", "eval_sequences", "eval_batch_size",
                    "eval_shards", "log_every", "save_every", "keep_checkpoints", "save_final", "device"}


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
HIDDEN_LOSSES = ("cosine", "mse")


def _opt(default, description: str):
    return field(default=default, metadata={"help": description})


def _list_opt(description: str):
    """A list-valued key whose default is the empty list."""
    return field(default_factory=list, metadata={"help": description})


@dataclass
class TrainConfig:
    """Every setting of a run; a TOML file holds these keys at top level (``student_config`` may be a table)."""

    # data
    train_shards: str | list[str] = _opt("", "training shard directory, or a list of them mixed by train_weights "
                                              "(required)")
    train_weights: list[float] = _list_opt("sampling weights of the train_shards directories "
                                           "([] = in proportion to their sizes)")
    packing: bool = _opt(False, "lay each micro-batch's sequences into as few rows as fit (attention isolated per "
                                "sequence by position_ids; Hugging Face students)")
    pack_length: int = _opt(0, "packing: row length, at least the micro-batch's longest sequence "
                               "(0 = that longest sequence)")
    eval_shards: str = _opt("", "held-out shard directory ('' = no evaluation)")
    skip_damaged: bool = _opt(False, "skip (and count) sequences whose shard data fails its checks instead of stopping")
    run_dir: str = _opt("runs/kdfast", "output directory: checkpoints, metrics, summary, plot, final model")
    # student: exactly one of the three
    student: str = _opt("", "Hugging Face model directory (or hub id) for from_pretrained")
    student_config: dict | str = _opt("", "HF config (JSON file or dict with model_type) for a new student")
    student_module: str = _opt("", "'pkg.module:factory': factory() returns an nn.Module following the protocol")
    # teachers besides the train_shards targets (docs/train.md "Teachers inside the trainer")
    teacher: str = _opt("", "live teacher: a Hugging Face causal LM directory run beside the student (frozen); "
                            "the train_shards targets are then ignored")
    teacher_dtype: str = _opt("float32", "live teacher's parameter dtype: float32, bfloat16, float16")
    teacher_shards: list[str] = _list_opt("several teachers' shard directories captured over the same sequences "
                                          "(instead of train_shards); the loss weights them by teacher_weights")
    teacher_weights: list[float] = _list_opt("teacher_shards: one weight (>= 0) per directory, used as given")
    on_policy_fraction: float = _opt(0.0, "fraction of micro-batches in which the student writes continuations of "
                                          "the prompts and the live teacher scores them (needs teacher)")
    max_new_tokens: int = _opt(64, "on-policy: tokens the student writes per prompt")
    generation_temperature: float = _opt(1.0, "on-policy: the student's sampling temperature (0 = greedy)")
    hidden_loss: str = _opt("", "hidden-state distillation against the live teacher: cosine, mse ('' = off)")
    hidden_loss_weight: float = _opt(1.0, "weight of the hidden-state loss")
    hidden_layer_map: list[list[int]] = _list_opt("[[student_layer, teacher_layer], ...]: hidden-state pairs "
                                                  "(0 = embeddings, l = output of layer l)")
    # loss (kdfast.fused_linear_kd_loss options; the teacher kind comes from the shard manifest)
    divergence: str = _opt("forward_kl", "forward_kl; with a live teacher also reverse_kl, jsd, skew_kl, "
                                         "skew_reverse_kl")
    beta: float = _opt(0.5, "jsd: the mixture weight (0 = forward KL, 1 = reverse KL)")
    alpha: float = _opt(0.1, "skew_kl / skew_reverse_kl: the skew (0 = forward / reverse KL)")
    temperature: float = _opt(1.0, "distillation temperature T")
    hard_weight: float = _opt(0.0, "weight of the hard cross-entropy on the labels")
    soft_weight: float = _opt(1.0, "weight of the distillation divergence")
    tail: bool = _opt(False, "missing-mass bucket (the shards' exact tail) for logprobs shards; needs T == capture T")
    scale_t2: bool = _opt(True, "multiply the divergence by T^2")
    chunk_size: int = _opt(0, "rows per logits chunk in the fused loss and evaluation (0 = automatic)")
    loss_backend: str = _opt("", "kd_loss backend: triton, cpu, torch ('' = automatic)")
    # optimisation
    max_steps: int = _opt(1000, "optimizer steps; also the length of the cosine schedule")
    micro_batch_size: int = _opt(8, "sequences per micro-batch per rank")
    grad_accum_steps: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(3e-4, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of lr")
    warmup_steps: int = _opt(100, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (not applied to 1-D parameters)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.95, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = no clipping)")
    seed: int = _opt(0, "seed of the data order and of the student's initialisation")
    # hardware
    device: str = _opt("auto", "auto (cuda:LOCAL_RANK when available), cpu, cuda")
    bf16: bool = _opt(True, "bf16 autocast of the student's forward and LM head on CUDA (ignored on CPU)")
    fsdp: bool = _opt(False, "shard the student with FSDP2 (fully_shard) instead of DDP")
    num_workers: int = _opt(0, "DataLoader worker processes")
    # evaluation, logging, checkpoints
    eval_every: int = _opt(200, "evaluate every N steps (0 = only at the start and the end)")
    eval_sequences: int = _opt(256, "held-out sequences per evaluation (0 = all)")
    eval_batch_size: int = _opt(0, "sequences per evaluation batch per rank (0 = micro_batch_size)")
    log_every: int = _opt(10, "write a metrics line every N steps")
    save_every: int = _opt(500, "checkpoint every N steps (0 = only at the end or on a signal)")
    keep_checkpoints: int = _opt(3, "checkpoints to keep")
    resume: bool = _opt(False, "continue from the newest checkpoint in run_dir (fresh start if there is none)")
    progress: bool = _opt(True, "progress bar")
    save_final: bool = _opt(True, "save the student into run_dir/final at the end")

    def __post_init__(self):
        positive = ("max_steps", "micro_batch_size", "grad_accum_steps", "keep_checkpoints")
        non_negative = ("warmup_steps", "eval_every", "eval_sequences", "eval_batch_size", "log_every", "save_every",
                        "num_workers", "chunk_size", "seed", "max_grad_norm", "weight_decay", "pack_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"TrainConfig: need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")
        if self.teacher_shards and self.train_shards:
            raise ValueError("TrainConfig: give train_shards or teacher_shards, not both (teacher_shards' first "
                             "directory supplies the sequences)")
        if not self.train_dirs or not all(self.train_dirs):
            raise ValueError(f"TrainConfig: train_shards needs one or more non-empty directories, got "
                             f"{self.train_shards!r}")
        self._check_train_weights()
        self._check_teachers()

    @property
    def train_dirs(self) -> list[str]:
        """The directories the sequences come from: ``train_shards`` as a list (``teacher_shards``: its first)."""
        if self.teacher_shards:
            return list(self.teacher_shards[:1])
        return [self.train_shards] if isinstance(self.train_shards, str) else list(self.train_shards)

    def _check_teachers(self) -> None:
        """The teacher keys agree with each other (see docs/train.md); ValueError naming the key."""
        if self.teacher_shards:
            if len(self.teacher_weights) != len(self.teacher_shards):
                raise ValueError(f"TrainConfig: teacher_weights has {_count(len(self.teacher_weights), 'entry', 'entries')}"
                                 f" for {_count(len(self.teacher_shards), 'teacher_shards directory', 'teacher_shards directories')}; "
                                 "give one weight per directory")
            if not (all(math.isfinite(w) and w >= 0 for w in self.teacher_weights) and sum(self.teacher_weights) > 0):
                raise ValueError(f"TrainConfig: teacher_weights must be finite numbers >= 0 with a positive sum, "
                                 f"got {self.teacher_weights}")
            if self.teacher:
                raise ValueError("TrainConfig: teacher (a live teacher) and teacher_shards cannot be combined")
        elif self.teacher_weights:
            raise ValueError("TrainConfig: teacher_weights needs teacher_shards (one weight per directory)")
        if self.teacher and self.tail:
            raise ValueError("TrainConfig: tail = true is for shard targets; a live teacher's distribution is dense "
                             "(set tail = false)")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"TrainConfig: teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, "
                             f"got {self.teacher_dtype!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"TrainConfig: divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if self.divergence != "forward_kl" and not self.teacher:
            raise ValueError(f"TrainConfig: divergence = {self.divergence!r} needs a dense teacher: set teacher (a "
                             "live teacher); shard targets are sparse and take forward_kl only")
        if not 0 <= self.on_policy_fraction <= 1:
            raise ValueError(f"TrainConfig: on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        if self.on_policy_fraction and not self.teacher:
            raise ValueError("TrainConfig: on_policy_fraction > 0 needs a live teacher (teacher = DIR) to score "
                             "the student's tokens")
        if self.on_policy_fraction and (self.packing or self.fsdp):
            raise ValueError("TrainConfig: on_policy_fraction > 0 needs packing = false and fsdp = false (under FSDP "
                             "the ranks' generation lengths, hence their collectives, could differ)")
        if self.max_new_tokens < 1 or self.generation_temperature < 0:
            raise ValueError(f"TrainConfig: need max_new_tokens >= 1 and generation_temperature >= 0, got "
                             f"{self.max_new_tokens}, {self.generation_temperature}")
        self._check_hidden_loss()

    def _check_hidden_loss(self) -> None:
        if self.hidden_loss not in ("", *HIDDEN_LOSSES):
            raise ValueError(f"TrainConfig: hidden_loss must be '' or one of {', '.join(HIDDEN_LOSSES)}, "
                             f"got {self.hidden_loss!r}")
        if not self.hidden_loss:
            if self.hidden_layer_map:
                raise ValueError("TrainConfig: hidden_layer_map is set but hidden_loss is '' (off)")
            return
        if not self.teacher:
            raise ValueError("TrainConfig: hidden_loss needs a live teacher (teacher = DIR): shards hold no "
                             "hidden states")
        pairs = self.hidden_layer_map
        if not pairs or not all(len(pair) == 2 and min(pair) >= 0 for pair in pairs):
            raise ValueError(f"TrainConfig: hidden_layer_map must be a non-empty list of [student_layer, "
                             f"teacher_layer] pairs of layer numbers >= 0, got {pairs}")

    def _check_train_weights(self) -> None:
        weights = self.train_weights
        if weights and len(weights) != len(self.train_dirs):
            raise ValueError(f"TrainConfig: train_weights has {_count(len(weights), 'entry', 'entries')} for "
                             f"{_count(len(self.train_dirs), 'train_shards directory', 'train_shards directories')}; "
                             "give one weight per directory (or none)")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"TrainConfig: train_weights must be finite numbers > 0, got {weights}")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from plain values (TOML or overrides); unknown keys and wrong types raise ValueError."""
        kinds = typing.get_type_hints(cls)
        unknown = [key for key in values if key not in kinds]
        if unknown:
            hints = {key: "".join(f" (did you mean {m!r}?)" for m in difflib.get_close_matches(key, kinds, 1))
                     for key in unknown}
            raise ValueError(f"TrainConfig: unknown key(s) {', '.join(f'{k!r}{hint}' for k, hint in hints.items())}")
        return cls(**{key: _checked(key, value, kinds[key]) for key, value in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _count(number: int, singular: str, plural: str) -> str:
    """``number`` and the noun, singular for 1: "1 entry", "2 entries"."""
    return f"{number} {singular if number == 1 else plural}"


_MISMATCH = object()


def _checked(name: str, value, kind):
    """``value`` if its type is the field's (``dict | str`` allows either, ``list[float]`` a list of numbers);
    an int is taken as a float."""
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    for alternative in allowed:
        converted = _as_type(value, alternative)
        if converted is not _MISMATCH:
            return converted
    raise ValueError(f"TrainConfig: {name} must be {' or '.join(map(_type_name, allowed))}, "
                     f"got {type(value).__name__} {value!r}")


def _as_type(value, kind):
    """``value`` as ``kind`` (exact types: True is not an int; an int is a float), else ``_MISMATCH``."""
    if typing.get_origin(kind) is list:
        if type(value) is not list:
            return _MISMATCH
        items = [_as_type(item, typing.get_args(kind)[0]) for item in value]
        return _MISMATCH if any(item is _MISMATCH for item in items) else items
    if kind is float and type(value) is int:
        return float(value)
    return value if type(value) is kind else _MISMATCH


def _type_name(kind) -> str:
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return f"a list of {_type_name(item) if typing.get_origin(item) is list else item.__name__}"
    return kind.__name__


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig from a TOML file (flat keys; paths as written, relative to the working directory)
    updated by ``overrides`` (e.g. from the command line)."""
    values = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config {path}: invalid TOML: {e}") from None
    return TrainConfig.from_dict({**values, **(overrides or {})})


# --- command line: `kdfast train --config run.toml [--key value ...]` ---------------------------------

_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse_bool(text: str) -> bool:
    if text.strip().lower() not in _BOOLEANS:
        raise ValueError(f"not a boolean: {text!r}")  # argparse reports it as a usage error
    return _BOOLEANS[text.strip().lower()]


def _parse_table_or_text(text: str) -> dict | str:
    """``student_config``: a JSON object on the command line, else a path."""
    return json.loads(text) if text.lstrip().startswith("{") else text


def _parse_list_or_text(text: str) -> list | str:
    """``train_shards``: a JSON array of paths on the command line, else one path."""
    return json.loads(text) if text.lstrip().startswith("[") else text


def _parse_list(text: str) -> list:
    """``train_weights``, ``teacher_shards``, ``hidden_layer_map``: a JSON array."""
    values = json.loads(text)
    if type(values) is not list:
        raise ValueError(f"not a JSON array: {text!r}")  # argparse reports it as a usage error
    return values


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` plus ``--<field>`` (and ``--<field-with-dashes>``) for every TrainConfig field."""
    parser.add_argument("--config", help="TOML file of TrainConfig keys; command-line options override it")
    hints = typing.get_type_hints(TrainConfig)
    parsers = {bool: _parse_bool, int: int, float: float, str: str, dict | str: _parse_table_or_text,
               str | list[str]: _parse_list_or_text, list[float]: _parse_list, list[str]: _parse_list,
               list[list[int]]: _parse_list}
    for f in fields(TrainConfig):
        names = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])
        flag = dict(nargs="?", const=True, metavar="BOOL") if hints[f.name] is bool else {}  # bare --resume
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        parser.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, type=parsers[hints[f.name]],
                            help=f"{f.metadata['help']} (default: {default!r})", **flag)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TOML file of ``--config`` updated by the options given on the command line."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return load_config(args.config, overrides)
