"""Run a teacher over token sequences once and store its targets as shards (``kdfast capture``).

Two modes, both at the capture temperature T (logits / T):

- ``topk``: the k most likely next tokens with their full-vocabulary log-probs
  (``log_softmax(logits / T)`` gathered at the top-k ids, kind "logprobs") and the log of the mass
  outside them, computed exactly as ``logsumexp`` over the other log-probs (not ``log(1 - sum)``,
  which loses all precision when the top-k hold nearly all the mass).
- ``sampled`` (RS-KD): ``num_samples`` draws with replacement from ``softmax(logits / T)``;
  duplicates are merged into one slot whose value is its empirical probability count / num_samples
  (kind "probs", values sum to 1, tail -inf). Each sequence draws from its own generator seeded by
  (seed, sequence index), so the targets do not depend on batching or on resuming.

Position i of a stored sequence holds the teacher's distribution for token i + 1, computed from its
logits at position i (see ``kdfast.shards.dataset`` for how that lines up with labels).

Crash safety: the writer owns the directory state (see ``kdfast.shards.writer``). Batches never
cross a shard boundary, so a resumed capture runs the teacher on exactly the batches an
uninterrupted one would and on CPU writes byte-identical shards.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import xxhash
from tqdm import tqdm

from kdfast.shards.writer import ShardWriter

__all__ = ["capture", "CaptureResult", "Teacher", "load_teacher", "load_token_file", "tokenize_text",
           "fingerprint_tokens", "topk_targets", "sampled_targets"]

log = logging.getLogger("kdfast.capture")

MODES = ("topk", "sampled")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "merges.txt", "special_tokens_map.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_FINGERPRINT_SPAN = 1 << 20
# Rows of logits whose targets are computed together. On CPU the [rows, V] float32 temporaries of
# log-softmax / top-k stay in cache and in malloc's reused heap (a fresh multi-MB temporary is a
# new mmap that page-faults on every use: ~3x slower); on GPUs larger chunks mean fewer launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 18, "default": 1 << 26}


# --- teachers ------------------------------------------------------------------------------------


class Teacher:
    """``teacher(input_ids [B, L] int64) -> logits [B, L, V]``, with an identity for the manifest.

    ``load`` builds the forward function on first use, so that a capture which turns out to be
    finished, or to conflict with its output directory, never loads the model.
    """

    def __init__(self, identity: dict, load: Callable[[], Callable], vocab_size: int | None = None):
        self.identity = identity
        self._load = load
        self._forward: Callable | None = None
        self._vocab_size = vocab_size

    def load(self) -> None:
        """Build the forward function now, so that loading time is not counted as teacher time."""
        if self._forward is None:
            self._forward = self._load()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, V]
        self.load()
        return self._forward(input_ids)

    def vocab_size(self, probe_ids: torch.Tensor) -> int:  # probe_ids: [1, l]
        """The logits' width, from the model config or else from one tiny forward pass."""
        if self._vocab_size is None:
            self._vocab_size = int(self(probe_ids).shape[-1])
        return self._vocab_size


def load_teacher(spec, *, device: torch.device, dtype: torch.dtype | None = None, name: str | None = None) -> Teacher:
    """A Teacher from a local Hugging Face model directory, a ``"module:attribute"`` callable, or a callable.

    Hugging Face models are loaded with ``local_files_only=True`` (never the network), in ``dtype``
    (default: bfloat16 on CUDA, float32 on CPU), on ``device``, in eval mode.
    """
    if callable(spec):
        return Teacher({"type": "callable", "name": name or _qualified_name(spec)}, lambda: spec)
    spec = str(spec)
    if Path(spec).is_dir():
        return _hf_teacher(Path(spec), device, dtype)
    if ":" in spec:
        module, _, attribute = spec.partition(":")
        try:
            forward = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"teacher {spec!r}: cannot import it ({e})") from None
        if not callable(forward):
            raise ValueError(f"teacher {spec!r} is not callable")
        return Teacher({"type": "callable", "name": name or spec}, lambda: forward)
    raise ValueError(f"teacher {spec!r} is neither a local Hugging Face model directory nor 'module:callable'")


def _qualified_name(obj) -> str:
    kind = obj if isinstance(obj, type) or hasattr(obj, "__qualname__") else type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _hf_teacher(directory: Path, device: torch.device, dtype: torch.dtype | None) -> Teacher:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ValueError(f"teacher directory {directory} has no config.json (not a Hugging Face model)")
    config = json.loads(config_path.read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    identity = {"type": "huggingface", "name": directory.resolve().name, "model_type": config.get("model_type"),
                "dtype": str(dtype).removeprefix("torch."), "fingerprint": _files_fingerprint(directory)}

    def load() -> Callable:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
        model.to(device).eval()
        return lambda input_ids: model(input_ids=input_ids, use_cache=False).logits

    return Teacher(identity, load, vocab)


def _files_fingerprint(directory: Path) -> str:
    """xxh3_64 over config.json, tokenizer files, and each weight file's name, size, first and last MiB.

    Cheap for a 16 GB checkpoint yet different for two fine-tunes of one architecture (their tensors
    differ from the first bytes on); reading every weight byte would double the model's load time.
    """
    digest = xxhash.xxh3_64()
    for path in sorted(directory.iterdir()):
        if path.name == "config.json" or path.name in _TOKENIZER_FILES:
            digest.update(path.name.encode() + path.read_bytes())
        elif path.suffix in _WEIGHT_SUFFIXES:
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as f:
                digest.update(f.read(_FINGERPRINT_SPAN))
                f.seek(max(size - _FINGERPRINT_SPAN, 0))
                digest.update(f.read())
    return digest.hexdigest()


def tokenizer_identity(directory: str | Path | None) -> dict | None:
    """What the manifest records about the tokenizer: where it was and a hash of its files."""
    if directory is None:
        return None
    directory = Path(directory)
    digest = xxhash.xxh3_64()
    for name in _TOKENIZER_FILES:
        if (directory / name).exists():
            digest.update(name.encode() + (directory / name).read_bytes())
    return {"name": directory.resolve().name, "path": str(directory.resolve()), "fingerprint": digest.hexdigest()}


# --- inputs --------------------------------------------------------------------------------------


def load_token_file(path: str | Path, seq_len: int | None = None) -> np.ndarray:
    """[N, L] token ids from a .npy file: [N, L] as is, or a 1-D stream cut into ``seq_len`` pieces.

    The file is memory-mapped (never unpickled). A 1-D stream's last ``len % seq_len`` tokens, too few
    for a sequence, are dropped with a warning.
    """
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokens file {path}: cannot read it as .npy ({e})") from None
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens file {path}: dtype {tokens.dtype} is not an integer type")
    if tokens.ndim == 1:
        return _cut_stream(tokens, seq_len, str(path))
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise ValueError(f"tokens file {path}: expected shape [N, L] or [T], got {tokens.shape}")
    if seq_len is not None and seq_len != tokens.shape[1]:
        raise ValueError(f"tokens file {path} holds sequences of length {tokens.shape[1]}, but seq_len={seq_len}")
    return tokens


def _cut_stream(stream: np.ndarray, seq_len: int | None, what: str) -> np.ndarray:  # [T] -> [N, L]
    if seq_len is None or seq_len < 1:
        raise ValueError(f"{what}: a 1-D token stream needs seq_len >= 1, got {seq_len}")
    count = len(stream) // seq_len
    if count == 0:
        raise ValueError(f"{what}: {len(stream)} tokens are fewer than one sequence of {seq_len}")
    if len(stream) % seq_len:
        log.warning("%s: dropping the last %d tokens (less than one sequence)", what, len(stream) % seq_len)
    return stream[:count * seq_len].reshape(count, seq_len)


def tokenize_text(text_path: str | Path, tokenizer_dir: str | Path, seq_len: int) -> np.ndarray:
    """[N, L] int32 token ids from a UTF-8 text file, one document per non-empty line.

    Each document is tokenized with the tokenizer's special tokens, followed by EOS when the tokenizer
    has one, the documents are concatenated and cut into ``seq_len`` pieces (rest dropped). Meant for
    small corpora; tokenize large ones once into a .npy stream instead.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        documents = [line for line in Path(text_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot tokenize {text_path} with {tokenizer_dir}: {e}") from None
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = [token for ids in tokenizer(documents)["input_ids"] for token in ids + eos]
    return _cut_stream(np.asarray(stream, np.int32), seq_len, str(text_path))


def fingerprint_tokens(tokens: np.ndarray) -> str:  # tokens: [N, L]
    """xxh3_64 of the shape and the int32 ids; the same for int32 and int64 copies of the data."""
    digest = xxhash.xxh3_64(f"{tokens.shape}".encode())
    rows = max(1, (1 << 24) // max(tokens.shape[1], 1))
    for start in range(0, tokens.shape[0], rows):
        digest.update(np.ascontiguousarray(tokens[start:start + rows], dtype="<i4"))
    return digest.hexdigest()


# --- targets -------------------------------------------------------------------------------------


def topk_targets(logits: torch.Tensor, k: int, temperature: float):  # logits: [L, V]
    """Top-k ids [L, k] int32 (-1 where the log-prob is -inf), their log-probs [L, k] float32 and the
    tail log-mass [L] float32, all at ``temperature``; values sorted from most to least likely."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter_(-1, indices, float("-inf")), dim=-1)  # in place: no [L, V] copy
    indices[values == float("-inf")] = -1
    return indices.int(), values, tail


def sampled_targets(logits: torch.Tensor, k: int, temperature: float, num_samples: int,
                    generator: torch.Generator):  # logits: [L, V]
    """RS-KD targets: unique sampled ids [L, k] int32 (-1 = unused slot) with probabilities count / n
    [L, k] float32, most frequent first (ties: smaller id first), and tail [L] = -inf."""
    length, vocab = logits.shape
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    samples = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # [L, n]
    rows = torch.arange(length, device=logits.device)
    unique, counts = torch.unique(samples + rows[:, None] * vocab, return_counts=True)  # sorted by (row, id)
    row_of = unique // vocab
    slot = torch.arange(len(unique), device=logits.device) - torch.searchsorted(row_of, rows)[row_of]
    indices = torch.full((length, k), -1, dtype=torch.int64, device=logits.device)
    values = torch.zeros((length, k), dtype=torch.float32, device=logits.device)
    indices[row_of, slot] = unique % vocab
    values[row_of, slot] = counts.float() / num_samples
    order = values.argsort(dim=-1, descending=True, stable=True)
    tail = torch.full((length,), float("-inf"), device=logits.device)
    return indices.gather(-1, order).int(), values.gather(-1, order), tail


def _sequence_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(xxhash.xxh3_64_intdigest(f"{seed}:{index}".encode()) >> 1)
    return generator


# --- the capture loop ----------------------------------------------------------------------------


@dataclass
class CaptureResult:
    """What a capture call did; the seconds split the time between the teacher and everything after it."""

    path: Path
    sequences: int  # in the finished dataset
    captured_sequences: int  # computed by this call (0: already complete)
    captured_tokens: int
    teacher_seconds: float  # teacher forward passes
    targets_seconds: float  # softmax, top-k / sampling, copy to host
    write_seconds: float  # encoding, checksums, file writes, fsync, manifest


def capture(teacher, tokens: np.ndarray, out_dir: str | Path, *, k: int = 64, temperature: float = 1.0,
            mode: str = "topk", num_samples: int | None = None, batch_size: int = 8, device: str | None = None,
            dtype: str | None = None, shard_tokens: int = 1 << 20, value_dtype: str = "float16",
            index_encoding: str = "int32", seed: int = 0, teacher_name: str | None = None,
            tokenizer: str | Path | None = None, progress: bool = True) -> CaptureResult:
    """Capture ``teacher``'s targets for ``tokens`` [N, L] into the shard directory ``out_dir``.

    teacher: local Hugging Face model directory, ``"module:callable"``, or a callable
        ``input_ids [B, L] int64 -> logits [B, L, V]``. device: "auto"/None = CUDA when available.
        dtype: model dtype for Hugging Face teachers ("float32", "bfloat16", "float16"; default
        bfloat16 on CUDA, float32 on CPU); targets are always computed from float32 logits.
    k: slots per position; in sampled mode it must hold every distinct sample (k >= min(num_samples,
        V)); num_samples defaults to k. shard_tokens: tokens per shard (rounded up to whole sequences).
    tokenizer: tokenizer directory recorded in the manifest (used by ``kdfast inspect``).
    Rerunning with the same arguments after an interruption finishes the job; a finished directory
    is left as is; a directory holding a different capture raises ValueError.
    """
    tokens = _check_tokens(tokens)
    num_samples = _check_options(k, temperature, mode, num_samples, batch_size, seed)
    run_device = _resolve_device(device)
    model = load_teacher(teacher, device=run_device, dtype=_parse_dtype(dtype), name=teacher_name)
    vocab = model.vocab_size(torch.zeros((1, min(tokens.shape[1], 4)), dtype=torch.int64, device=run_device))
    _check_vocab(tokens, k, vocab, mode, num_samples)
    metadata = {
        "teacher": model.identity, "tokenizer": tokenizer_identity(tokenizer),
        "source": {"fingerprint": fingerprint_tokens(tokens), "sequences": tokens.shape[0], "seq_len": tokens.shape[1]},
        "capture": {"mode": mode, "num_samples": num_samples if mode == "sampled" else None, "seed": seed},
    }
    writer = ShardWriter(out_dir, vocab_size=vocab, k=k, kind="logprobs" if mode == "topk" else "probs",
                         value_dtype=value_dtype, index_encoding=index_encoding, capture_temperature=temperature,
                         shard_tokens=shard_tokens, metadata=metadata, resume=True)
    if not writer.complete:
        if writer.num_sequences:
            log.warning("%s: resuming after %d of %d sequences", out_dir, writer.num_sequences, tokens.shape[0])
        model.load()
    loop = _CaptureLoop(model, writer, tokens, run_device, k, temperature, mode, num_samples, seed)
    with torch.inference_mode():
        loop.run(batch_size, progress)
    return loop.result()


def _check_tokens(tokens) -> np.ndarray:  # [N, L]
    tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
    if tokens.ndim != 2 or 0 in tokens.shape or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a non-empty integer array [N, L], got {tokens.dtype} {tokens.shape}")
    return tokens


def _check_options(k, temperature, mode, num_samples, batch_size, seed) -> int:
    """Validate the scalar options; returns num_samples (default k)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not (temperature > 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0 and finite, got {temperature!r}")
    if batch_size < 1 or seed < 0:
        raise ValueError(f"batch_size must be >= 1 and seed >= 0, got {batch_size} and {seed}")
    num_samples = k if num_samples is None else num_samples
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return num_samples


def _check_vocab(tokens: np.ndarray, k: int, vocab: int, mode: str, num_samples: int) -> None:
    if k > vocab:
        raise ValueError(f"k={k} exceeds the teacher's vocabulary of {vocab}")
    if mode == "sampled" and k < min(num_samples, vocab):
        raise ValueError(f"k={k} slots cannot hold up to {min(num_samples, vocab)} distinct samples; "
                         f"use k >= num_samples={num_samples}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"token ids span [{low}, {high}], outside the teacher's vocabulary [0, {vocab})")


def _resolve_device(device: str | None) -> torch.device:
    """None / "auto": the GPU when there is one; an unusable request fails here, not inside the model."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r}: {e}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def _parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype in (None, "auto"):
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


class _CaptureLoop:
    """Batches of sequences through the teacher into the writer, timing each stage."""

    def __init__(self, teacher: Teacher, writer: ShardWriter, tokens: np.ndarray, device: torch.device, k: int,
                 temperature: float, mode: str, num_samples: int, seed: int):
        self.teacher, self.writer, self.tokens, self.device = teacher, writer, tokens, device
        self.k, self.temperature, self.mode, self.num_samples, self.seed = k, temperature, mode, num_samples, seed
        self.seconds = {"teacher": 0.0, "targets": 0.0, "write": 0.0}
        self.start = writer.num_sequences

    def run(self, batch_size: int, progress: bool) -> None:
        count, length = self.tokens.shape
        first = self.writer.num_sequences
        with tqdm(total=count * length, initial=first * length, unit="tok", unit_scale=True, desc="capture",
                  disable=not progress or self.writer.complete) as bar:
            while not self.writer.complete and self.writer.num_sequences < count:
                done = self.writer.num_sequences
                end = min(done + batch_size, count, done + self._sequences_left_in_shard(length))
                self._batch(done, end)
                bar.update((end - done) * length)
            self._timed("write", self.writer.finish)

    def _sequences_left_in_shard(self, length: int) -> int:
        """Batches stop at shard boundaries so that a resumed run sees the same batches."""
        return -(-(self.writer.shard_tokens - self.writer.pending_tokens) // length)

    def _batch(self, start: int, end: int) -> None:
        input_ids = torch.from_numpy(self.tokens[start:end].astype(np.int64)).to(self.device)  # [B, L]
        logits = self._timed("teacher", self.teacher, input_ids)
        expected = (*input_ids.shape, self.writer.config["vocab_size"])
        if tuple(logits.shape) != expected:
            raise ValueError(f"teacher returned logits {tuple(logits.shape)} for input_ids {tuple(input_ids.shape)}; "
                             f"expected {expected}")
        for row in range(end - start):
            targets = self._timed("targets", self._targets, logits[row], start + row)
            self._timed("write", self.writer.add, self.tokens[start + row], *targets)

    def _targets(self, logits: torch.Tensor, index: int):  # logits: [L, V]
        """Targets of one sequence, computed over chunks of rows (see _CHUNK_ELEMENTS)."""
        if self.mode == "topk":
            compute = functools.partial(topk_targets, k=self.k, temperature=self.temperature)
        else:
            compute = functools.partial(sampled_targets, k=self.k, temperature=self.temperature,
                                        num_samples=self.num_samples,
                                        generator=_sequence_generator(self.seed, index, logits.device))
        limit = _CHUNK_ELEMENTS.get(logits.device.type, _CHUNK_ELEMENTS["default"])
        chunks = [compute(rows) for rows in logits.split(max(1, limit // logits.shape[-1]))]
        return tuple(torch.cat(parts).cpu() for parts in zip(*chunks))

    def _timed(self, stage: str, fn, *args):
        began = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[stage] += time.perf_counter() - began
        return out

    def result(self) -> CaptureResult:
        captured = self.writer.num_sequences - self.start
        return CaptureResult(self.writer.directory, self.writer.num_sequences, captured,
                             captured * self.tokens.shape[1], self.seconds["teacher"], self.seconds["targets"],
                             self.seconds["write"])
