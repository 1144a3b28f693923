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
    # loss (kdfast.fused_linear_kd_loss options; forward KL; the teacher kind comes from the shard manifest)
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
        if not self.train_shards or not all(self.train_dirs):
            raise ValueError(f"TrainConfig: train_shards needs one or more non-empty directories, got "
                             f"{self.train_shards!r}")
        self._check_train_weights()

    @property
    def train_dirs(self) -> list[str]:
        """The training shard directories: ``train_shards`` as a list."""
        return [self.train_shards] if isinstance(self.train_shards, str) else list(self.train_shards)

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
        return f"a list of {typing.get_args(kind)[0].__name__}"
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
    """``train_weights``: a JSON array of numbers."""
    values = json.loads(text)
    if type(values) is not list:
        raise ValueError(f"not a JSON array: {text!r}")  # argparse reports it as a usage error
    return values


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` plus ``--<field>`` (and ``--<field-with-dashes>``) for every TrainConfig field."""
    parser.add_argument("--config", help="TOML file of TrainConfig keys; command-line options override it")
    hints = typing.get_type_hints(TrainConfig)
    parsers = {bool: _parse_bool, int: int, float: float, str: str, dict | str: _parse_table_or_text,
               str | list[str]: _parse_list_or_text, list[float]: _parse_list}
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
