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

Sequences are either a token array [N, L] (every position learned) or a ``kdfast.sources.DataSource``
(variable-length (tokens, mask) pairs from a dataset file, see docs/data.md). The teacher always sees
whole sequences (a batch is right-padded to its longest sequence; the teacher is causal, so padding
after a sequence does not change its logits), but top-k / sampling runs and targets are stored only
where the mask is on.

Crash safety: the writer owns the directory state (see ``kdfast.shards.writer``). Batches never
cross a shard boundary, so a resumed capture runs the teacher on exactly the batches an
uninterrupted one would and on CPU writes byte-identical shards.

Parallel capture: under ``torchrun`` (or RANK / WORLD_SIZE set by hand) each rank captures every
WORLD_SIZE-th single-process shard into ``out/.rank-r`` and rank 0 merges them into the dataset one
process would write (see ``_parallel_capture`` and docs/shard-format.md section 4.1).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib
import inspect
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import xxhash
from tqdm import tqdm

from kdfast._backend import resolve_device, synchronize
from kdfast.served import ServedTeacher
from kdfast.shards.reader import open_shards
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
        logits = self._forward(input_ids)
        if not isinstance(logits, torch.Tensor):
            raise ValueError(f"teacher {self.identity['name']!r} returned {type(logits).__name__}, not a logits tensor "
                             f"[B, L, V]: {_TEACHER_PROTOCOL}")
        return logits

    def vocab_size(self, probe_ids: torch.Tensor) -> int:  # probe_ids: [1, l]
        """The logits' width, from the model config or else from one tiny forward pass."""
        if self._vocab_size is None:
            self._vocab_size = int(self(probe_ids).shape[-1])
        return self._vocab_size


def load_teacher(spec, *, device: torch.device, dtype: torch.dtype | None = None, name: str | None = None,
                 progress: bool = True, device_map: str | None = None) -> Teacher:
    """A Teacher from a local Hugging Face model directory, a ``"module:attribute"`` callable, or a callable.

    Hugging Face models are loaded with ``local_files_only=True`` (never the network), in ``dtype``
    (default: bfloat16 on CUDA, float32 on CPU), on ``device``, in eval mode; ``progress=False``
    silences transformers' loading bar too. ``device_map`` ("auto", "balanced", "sequential", ...)
    spreads a Hugging Face model over the visible devices with accelerate's big-model loading
    instead (layers on each GPU, then CPU memory, as ``from_pretrained(device_map=...)`` places them).
    """
    if device_map is not None and not (isinstance(spec, (str, Path)) and Path(spec).is_dir()):
        raise ValueError(f"device_map={device_map!r} needs a local Hugging Face teacher directory, not {spec!r}")
    if callable(spec):
        _check_takes_input_ids(spec, name or _qualified_name(spec))
        return Teacher({"type": "callable", "name": name or _qualified_name(spec)}, lambda: spec)
    spec = str(spec)
    if Path(spec).is_dir():
        return _hf_teacher(Path(spec), device, dtype, progress, device_map)
    if ":" in spec:
        module, _, attribute = spec.partition(":")
        try:
            forward = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"teacher {spec!r}: cannot import it ({e})") from None
        if not callable(forward):
            raise ValueError(f"teacher {spec!r} is not callable")
        _check_takes_input_ids(forward, spec)
        return Teacher({"type": "callable", "name": name or spec}, lambda: forward)
    raise ValueError(f"teacher {spec!r} is neither a local Hugging Face model directory nor 'module:callable'")


_TEACHER_PROTOCOL = ("a teacher is the forward function input_ids [B, L] -> logits [B, L, V], not a factory "
                        "that builds the model (as the trainer's student_module is) nor a model returning an "
                        "output object; wrap the model: `def teacher(input_ids): return model(input_ids).logits`")


def _check_takes_input_ids(forward: Callable, name: str) -> None:
    """A factory passed as the teacher fails here with the protocol, not later as a TypeError."""
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):  # no introspectable signature (some builtins): the call will tell
        return
    try:
        signature.bind(None)
    except TypeError:
        raise ValueError(f"teacher {name!r} cannot be called with one argument (signature {signature}): "
                         f"{_TEACHER_PROTOCOL}") from None


def _qualified_name(obj) -> str:
    kind = obj if isinstance(obj, type) or hasattr(obj, "__qualname__") else type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _hf_teacher(directory: Path, device: torch.device, dtype: torch.dtype | None, progress: bool,
                device_map: str | None) -> Teacher:
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

        placement = {"device_map": _check_device_map(device_map)} if device_map is not None else {}
        with transformers_progress_bars(progress):
            model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype, **placement)
        if device_map is None:
            model.to(device)
        model.eval()
        first = model.get_input_embeddings().weight.device  # where a device-mapped model takes its inputs
        return lambda input_ids: model(input_ids=input_ids.to(first), use_cache=False).logits

    return Teacher(identity, load, vocab)


def _check_device_map(device_map: str) -> str:
    """accelerate does the placement; without it transformers fails deep inside from_pretrained."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ValueError(f"device_map={device_map!r} needs the accelerate package: pip install 'kdfast[hf]'") from None
    return device_map


@contextlib.contextmanager
def transformers_progress_bars(enabled: bool):
    """transformers' own bars (loading / writing weights) follow ``progress`` too, then are restored."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


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


def _tokenizer_beside(teacher) -> Path | None:
    """A Hugging Face teacher directory that also holds its tokenizer (as ``save_pretrained`` leaves it)."""
    if callable(teacher) or not Path(teacher).is_dir():
        return None
    return Path(teacher) if any((Path(teacher) / name).exists() for name in _TOKENIZER_FILES) else None


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


def capture(teacher, tokens, out_dir: str | Path, *, k: int = 64, temperature: float = 1.0,
            mode: str = "topk", num_samples: int | None = None, batch_size: int = 8, device: str | None = None,
            dtype: str | None = None, shard_tokens: int = 1 << 20, value_dtype: str = "float16",
            index_encoding: str = "int32", seed: int = 0, teacher_name: str | None = None,
            tokenizer: str | Path | None = None, progress: bool = True,
            device_map: str | None = None) -> CaptureResult:
    """Capture ``teacher``'s targets for ``tokens`` into the shard directory ``out_dir``.

    tokens: an integer array [N, L] (every position learned) or a ``kdfast.sources.DataSource``
        (its (tokens [L], mask [L]) sequences; targets are computed and stored where mask is True).

    teacher: local Hugging Face model directory, ``"module:callable"``, a callable
        ``input_ids [B, L] int64 -> logits [B, L, V]``, or a ``kdfast.served.ServedTeacher`` (top-k
        mode at temperature 1 only; batch_size sequences are requests in flight).
        device: "auto"/None = CUDA when available.
        dtype: model dtype for Hugging Face teachers ("float32", "bfloat16", "float16"; default
        bfloat16 on CUDA, float32 on CPU); targets are always computed from float32 logits.
        device_map: a Hugging Face teacher larger than one device, placed by accelerate ("auto",
        "balanced", "sequential"); ``device`` is then not used for the teacher. Not recorded in the
        manifest: the placement does not change the targets, so a rerun may use another one.
    k: slots per position; in sampled mode it must hold every distinct sample (k >= min(num_samples,
        V)); num_samples defaults to k. shard_tokens: tokens per shard (rounded up to whole sequences).
    tokenizer: tokenizer directory recorded in the manifest (used by ``kdfast inspect``); default:
        the teacher's directory when it holds tokenizer files.
    Rerunning with the same arguments after an interruption finishes the job; a finished directory
    is left as is; a directory holding a different capture raises ValueError.
    """
    source = tokens if hasattr(tokens, "identity") else None
    tokens = _check_tokens(tokens) if source is None else None
    num_samples = _check_options(k, temperature, mode, num_samples, batch_size, seed)
    run_device = resolve_device(device)
    if isinstance(teacher, ServedTeacher):
        if device_map is not None:
            raise ValueError("device_map is for a local Hugging Face teacher; a served teacher is placed by its server")
        model, vocab = teacher, _check_served(teacher, k, mode, temperature, tokenizer)
    else:
        tokenizer = tokenizer if tokenizer is not None else _tokenizer_beside(teacher)
        model = load_teacher(teacher, device=run_device, dtype=_parse_dtype(dtype), name=teacher_name,
                             progress=progress, device_map=device_map)
        probe = min(tokens.shape[1] if source is None else source.max_len, 4)
        vocab = model.vocab_size(torch.zeros((1, probe), dtype=torch.int64, device=run_device))
    _check_fits_teacher_vocab(tokens, k, vocab, mode, num_samples)
    metadata = {
        "teacher": model.identity, "tokenizer": tokenizer_identity(tokenizer),
        "source": source.identity() if source is not None else
        {"fingerprint": fingerprint_tokens(tokens), "sequences": tokens.shape[0], "seq_len": tokens.shape[1]},
        "capture": {"mode": mode, "num_samples": num_samples if mode == "sampled" else None, "seed": seed},
    }
    options = dict(vocab_size=vocab, k=k, kind="logprobs" if mode == "topk" else "probs", value_dtype=value_dtype,
                   index_encoding=index_encoding, capture_temperature=temperature, shard_tokens=shard_tokens,
                   metadata=metadata)
    sequences = ((t, m, i) for i, (t, m) in enumerate(source if source is not None else ((r, None) for r in tokens)))
    run = functools.partial(_run, model, sequences=sequences, device=run_device, k=k, temperature=temperature,
                            mode=mode, num_samples=num_samples, seed=seed, batch_size=batch_size, progress=progress)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _parallel_capture(run, Path(out_dir), options)
    return run(ShardWriter(out_dir, **options, resume=True), total_tokens=tokens.size if source is None else None)


def _run(model, writer: ShardWriter, *, sequences, device, k, temperature, mode, num_samples, seed, batch_size,
         progress, total_tokens=None) -> CaptureResult:
    """Capture (tokens, mask, index) ``sequences`` into ``writer`` (resuming after what it holds), then finish it."""
    try:  # the writer holds the directory's lock until closed, also when the teacher fails
        if not writer.complete:
            if writer.num_sequences:
                log.warning("%s: resuming after %d sequences", writer.directory, writer.num_sequences)
            if not isinstance(model, ServedTeacher):
                model.load()
        loop = _CaptureLoop(model, writer, sequences, device, k, temperature, mode, num_samples, seed, total_tokens)
        with torch.inference_mode():
            loop.run(batch_size, progress)
        return loop.result()
    finally:
        writer.close()


# --- parallel capture (torchrun) -----------------------------------------------------------------

_RANK_DIR = ".rank-{}"
_WAIT = datetime.timedelta(days=7)  # ranks wait at the end for the slowest one, however long it takes


def _parallel_capture(run, out: Path, options: dict) -> CaptureResult:
    """One rank of a ``torchrun`` / RANK+WORLD_SIZE capture into ``out``.

    The sequences are cut into the shards a single-process capture would write (boundaries depend only
    on lengths and shard_tokens); rank r captures shards r, r + W, ... into ``out/.rank-r`` (its own
    resumable writer, with the same batches as one process). Rank 0 holds ``out``'s writer throughout
    and, once every rank is done, copies the sequences shard by shard in the single-process order into
    ``out`` (resumable too), writes the one manifest and removes the rank directories.
    """
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", timeout=_WAIT)
    final = None
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        _check_same_arguments(dist, options, rank, world)
        final = _on_rank_zero(dist, rank, lambda: ShardWriter(out, **options, resume=True))
        result = None
        if not _broadcast(dist, final.complete if rank == 0 else None):
            share = _rank_share(run.keywords["sequences"], options["shard_tokens"], rank, world)
            first = next(share, None)  # a rank beyond the last shard has nothing to capture and writes nothing
            if first is not None:
                part = {**options, "metadata": {**options["metadata"], "parallel": {"rank": rank, "world_size": world}}}
                writer = ShardWriter(out / _RANK_DIR.format(rank), **part, resume=True)
                result = run(writer, sequences=itertools.chain([first], share))
        dist.barrier()
        total = _on_rank_zero(dist, rank, lambda: _merge(final, out, world))
        total = _broadcast(dist, total)
        if result is None:
            return CaptureResult(out, total, 0, 0, 0.0, 0.0, 0.0)
        return CaptureResult(out, total, *dataclasses.astuple(result)[2:])
    finally:
        if final is not None:
            final.close()
        if owned:
            dist.destroy_process_group()


def _rank_share(sequences, shard_tokens: int, rank: int, world: int):
    """The sequences of single-process shards rank, rank + world, ... (cut as ShardWriter cuts them)."""
    shard, tokens = 0, 0
    for sequence in sequences:
        if shard % world == rank:
            yield sequence
        tokens += len(sequence[0])
        if tokens >= shard_tokens:
            shard, tokens = shard + 1, 0


def _check_same_arguments(dist, options: dict, rank: int, world: int) -> None:
    """Every rank must capture the same dataset: ValueError on all ranks naming what differs."""
    mine = json.loads(json.dumps(options))
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    for other, theirs in enumerate(everyone):
        differ = sorted(key for key in mine if theirs.get(key) != everyone[0].get(key))
        if differ:
            raise ValueError(f"parallel capture: rank {other} was started with different arguments than rank 0 "
                             f"(differing: {', '.join(differ)}); start every rank with the same command")


def _broadcast(dist, value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], dict) and "error" in box[0]:
        raise ValueError(box[0]["error"])
    return box[0]


def _on_rank_zero(dist, rank: int, fn):
    """fn() on rank 0; its failure is sent to every rank (which raise it too) instead of leaving them waiting."""
    if rank != 0:
        return _broadcast(dist, None)
    try:
        value = fn()
    except Exception as e:
        _broadcast(dist, {"error": f"rank 0: {e}"})
        raise
    _broadcast(dist, None)
    return value


def _merge(final: ShardWriter, out: Path, world: int) -> int:
    """Rank 0: the rank directories' sequences into ``final`` in single-process order; returns their count."""
    if not final.complete:
        parts = [open_shards(out / _RANK_DIR.format(rank)) for rank in range(world)
                 if (out / _RANK_DIR.format(rank)).exists()]  # ranks past the last shard wrote nothing
        shard = len(final.shards)  # a resumed merge continues after the shards it already wrote
        while shard % world < len(parts) and shard // world < len(parts[shard % world].manifest["shards"]):
            part, entry = parts[shard % world], parts[shard % world].manifest["shards"][shard // world]
            for index in range(entry["first_sequence"], entry["first_sequence"] + entry["sequences"]):
                tokens, indices, values, tail, mask = part.read(index)
                final.add(tokens, indices, values, tail, mask=mask)
            shard += 1
        final.finish()
    for rank_dir in out.glob(_RANK_DIR.format("*")):
        shutil.rmtree(rank_dir)
    return final.num_sequences


def _check_served(teacher: ServedTeacher, k: int, mode: str, temperature: float, tokenizer) -> int:
    """A served teacher gives top-k log-probs of the raw logits (vLLM's prompt log-probs ignore sampling
    parameters) for its own k; its tokenizer must match the local one. Returns its vocabulary size."""
    if teacher.k != k:
        raise ValueError(f"k={k} but the served teacher was opened with k={teacher.k}")
    if mode != "topk" or temperature != 1.0:
        raise ValueError(f"a served teacher captures mode 'topk' at temperature 1.0, got mode={mode!r} and "
                         f"temperature={temperature!r}")
    if tokenizer is not None:
        teacher.check_tokenizer(tokenizer)
    return teacher.vocab_size


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


def _check_fits_teacher_vocab(tokens: np.ndarray | None, k: int, vocab: int, mode: str, num_samples: int) -> None:
    """k slots, the samples and every token id fit the teacher's vocabulary (ids of a data source are
    checked batch by batch)."""
    if k > vocab:
        raise ValueError(f"k={k} exceeds the teacher's vocabulary of {vocab}")
    if mode == "sampled" and k < min(num_samples, vocab):
        raise ValueError(f"k={k} slots cannot hold up to {min(num_samples, vocab)} distinct samples; "
                         f"use k >= num_samples={num_samples}")
    if tokens is None:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"token ids span [{low}, {high}], outside the teacher's vocabulary [0, {vocab})")


def _parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype in (None, "auto"):
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


class _CaptureLoop:
    """Batches of (tokens [L], mask [L] or None, index in the whole input) sequences through the teacher
    into the writer, timing each stage."""

    def __init__(self, teacher: Teacher, writer: ShardWriter, sequences, device: torch.device, k: int,
                 temperature: float, mode: str, num_samples: int, seed: int, total_tokens: int | None):
        self.teacher, self.writer, self.sequences, self.device = teacher, writer, sequences, device
        self.k, self.temperature, self.mode, self.num_samples, self.seed = k, temperature, mode, num_samples, seed
        self.seconds = {"teacher": 0.0, "targets": 0.0, "write": 0.0}
        self.start, self.total_tokens, self.captured_tokens = writer.num_sequences, total_tokens, 0

    def run(self, batch_size: int, progress: bool) -> None:
        stored = sum(shard["tokens"] for shard in self.writer.shards) + self.writer.pending_tokens
        with tqdm(total=self.total_tokens, initial=stored, unit="tok", unit_scale=True, desc="capture",
                  disable=not progress or self.writer.complete) as bar:
            if not self.writer.complete:
                stream = itertools.islice(iter(self.sequences), self.writer.num_sequences, None)  # resume
                for batch in self._batches(stream, batch_size):
                    self._batch(batch)
                    self.captured_tokens += (tokens := sum(len(t) for t, *_ in batch))
                    bar.update(tokens)
            self._timed("write", self.writer.finish)

    def _batches(self, stream, batch_size: int):
        """Up to batch_size sequences; a batch ends at a shard boundary, so a resumed run sees the same
        batches (pulled lazily: each batch starts from the writer's state after the previous one)."""
        while True:
            left, batch, tokens = self.writer.shard_tokens - self.writer.pending_tokens, [], 0
            for sequence in stream:
                batch.append(sequence)
                tokens += len(sequence[0])
                if len(batch) == batch_size or tokens >= left:
                    break
            if not batch:
                return
            yield batch

    def _batch(self, batch: list) -> None:
        vocab = self.writer.config["vocab_size"]
        if isinstance(self.teacher, ServedTeacher):  # the server sends top-k rows, not logits
            self._served_batch(batch)
            return
        longest = max(len(tokens) for tokens, *_ in batch)
        input_ids = torch.zeros((len(batch), longest), dtype=torch.int64)  # [B, L] right-padded with id 0
        for row, (tokens, _, index) in enumerate(batch):
            if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
                raise ValueError(f"sequence {index}: token ids span [{int(tokens.min())}, {int(tokens.max())}], "
                                 f"outside the teacher's vocabulary [0, {vocab})")
            input_ids[row, :len(tokens)] = torch.from_numpy(np.array(tokens, np.int64))  # a copy: memmaps are read-only
        input_ids = input_ids.to(self.device)
        logits = self._timed("teacher", self.teacher, input_ids)
        expected = (*input_ids.shape, vocab)
        if tuple(logits.shape) != expected:
            raise ValueError(f"teacher returned logits {tuple(logits.shape)} for input_ids {tuple(input_ids.shape)}; "
                             f"expected {expected}")
        for row, (tokens, mask, index) in enumerate(batch):
            rows = logits[row, :len(tokens)]  # [L, V]
            if mask is not None:
                rows = rows[torch.from_numpy(np.asarray(mask, bool)).to(rows.device)]  # [R, V]: learned only
            targets = self._timed("targets", self._targets, rows, index)
            self._timed("write", functools.partial(self.writer.add, mask=mask), tokens, *targets)

    def _served_batch(self, batch: list) -> None:
        """Equal-length sequences go to the server together; others one by one (ServedTeacher.topk takes [B, L])."""
        lengths = {len(tokens) for tokens, *_ in batch}
        groups = [batch] if len(lengths) == 1 else [[sequence] for sequence in batch]
        for group in groups:
            tokens = np.stack([t for t, *_ in group])
            indices, values, tail = self._timed("teacher", self.teacher.topk, tokens, group[0][2])
            for row, (sequence, mask, _) in enumerate(group):
                self._timed("write", functools.partial(self.writer.add, mask=mask), sequence, indices[row],
                            values[row], tail[row])

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
        synchronize(self.device)
        self.seconds[stage] += time.perf_counter() - began
        return out

    def result(self) -> CaptureResult:
        return CaptureResult(self.writer.directory, self.writer.num_sequences, self.writer.num_sequences - self.start,
                             self.captured_tokens, self.seconds["teacher"], self.seconds["targets"],
                             self.seconds["write"])
