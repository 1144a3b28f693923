"""Writing shard datasets: one writer per directory, one atomic file per shard, the manifest last,
resumable after a crash.

A dataset directory goes through three states, and every state is safe to be killed in:

    in progress   capture.json (the writer's configuration) + finished shard-NNNNN.kds files
                  (+ at most one *.tmp being written, discarded on resume) + writer.lock
    complete      manifest.json (+ the shards); capture.json and writer.lock removed
    (readers refuse a directory without manifest.json)

One writer: a ShardWriter holds an exclusive ``flock`` on ``writer.lock`` (which records its pid)
from construction until ``finish`` or ``close``; a second writer into the same directory, in any
process, raises ShardError at once naming the holder's pid. The kernel drops the lock when the
holding process dies, so a crash never leaves the directory locked.

Each shard is written to ``<name>.tmp``, fsynced, renamed and the directory fsynced, so a shard that
exists under its final name is complete; a failed write (disk full, read-only file system) removes
the .tmp file and raises OSError naming the path and what to do. Shard boundaries depend only on
sequence lengths and ``shard_tokens``, so a resumed writer fed the same sequences from
``num_sequences`` on produces the same files as an uninterrupted one.
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from kdfast._io import fsync_path
from kdfast.shards.format import (
    FORMAT_NAME, INDEX_ENCODINGS, KINDS, LOCK, MANIFEST, SECTIONS, SEQUENCE_SECTIONS, STATE, TOKEN_SECTIONS,
    VALUE_DTYPES, VERSION, VERSIONS, Header, IndexRecord, ShardError, as_bytes, checksum, empty_value, encode_indices,
    encode_values, expected_layout, index_bits_for, pack_footer, range_problem, section_lengths, shard_name,
)
from kdfast.shards.reader import MAX_JSON_DEPTH, ShardFile, json_depth, read_json

__all__ = ["ShardWriter", "write_json_atomic"]

_MASS_RESOLUTION = 1e-6  # float32 log-probs summed over k slots are accurate to ~1e-7
_METADATA = ("teacher", "tokenizer", "source", "capture")  # documented manifest objects (None: not recorded)


def _write_error(path: Path, error: OSError) -> OSError:
    """The OSError a user sees when writing ``path`` failed: what failed, why, and what to do."""
    return OSError(error.errno, f"cannot write {path}: {error.strerror or error}. Fix that (free disk space, "
                                f"make {path.parent} writable), then rerun the same command: finished shards are "
                                "kept and the capture resumes after them")


def _write_atomic(path: Path, chunks) -> None:
    """Write the byte chunks to ``path.tmp``, fsync, rename to ``path``, fsync the directory; on an
    OSError the .tmp file is removed and nothing under ``path`` changes."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from e


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON so that ``path`` holds either the old content or all of the new (tmp+fsync+rename)."""
    _write_atomic(path, [(json.dumps(obj, indent=1) + "\n").encode()])


def _as_numpy(x) -> np.ndarray:
    """Tensors (any device; half types widened, numpy has no bfloat16) or array-likes as numpy."""
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    x = x.detach().cpu()
    return (x.float() if x.is_floating_point() else x).numpy()


class _DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``directory/writer.lock``, which holds the owner's pid."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK
        while True:
            try:
                handle = io.FileIO(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), "r+")
            except OSError as e:
                raise _write_error(self.path, e) from e
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(handle.fileno(), 32, 0).decode(errors="replace").strip() or "unknown"
                handle.close()
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise _write_error(self.path, e) from e
                raise ShardError(directory, _locked_message(holder)) from None
            if self._still_the_lock_file(handle):
                break
            handle.close()  # the holder removed it between our open and flock: take the new one
        os.ftruncate(handle.fileno(), 0)
        os.pwrite(handle.fileno(), f"{os.getpid()}\n".encode(), 0)
        self.handle = handle

    def _still_the_lock_file(self, handle: io.FileIO) -> bool:
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(handle.fileno())
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        """Remove the lock file while still holding it, then unlock (by closing)."""
        if not self.handle.closed:
            self.path.unlink(missing_ok=True)
            self.handle.close()


def _locked_message(holder: str) -> str:
    mine = holder == str(os.getpid())
    return (f"another writer (pid {holder}{', this process' if mine else ''}) is writing into this directory "
            f"({LOCK}); " + ("close() the earlier ShardWriter (or use it as a context manager) before opening "
                              "another one" if mine else "wait for it to finish or stop it, then rerun"))


class ShardWriter:
    """Append sequences with their teacher targets; shards are cut every ``shard_tokens`` tokens.

    Use as a context manager: a clean exit writes the manifest, an exception leaves the directory
    resumable; either way the directory lock is released (``close()`` does the same by hand). With
    ``resume=True`` an interrupted directory with the same configuration continues after its last
    finished shard (``num_sequences`` says how many sequences are already stored; the caller feeds
    the rest), and a complete one with the same configuration is left as is (``complete`` is True).
    A directory holding anything else raises ValueError; one another writer holds raises ShardError.

    ``metadata`` (JSON-serializable dict) is stored in the manifest and is part of the configuration
    a resume must match; its ``teacher``, ``tokenizer``, ``source`` and ``capture`` entries (kdfast
    capture's identity records) must be dicts or None and default to None.
    """

    def __init__(self, directory: str | Path, *, vocab_size: int, k: int, kind: str = "logprobs",
                 value_dtype: str = "float16", index_encoding: str = "int32", capture_temperature: float = 1.0,
                 shard_tokens: int = 1 << 20, metadata: dict | None = None, resume: bool = False):
        self.directory = Path(directory)
        self.config = _make_config(vocab_size, k, kind, value_dtype, index_encoding, capture_temperature,
                                   shard_tokens, metadata or {})
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.complete = False
        self._pending: list[tuple[np.ndarray, ...]] = []
        self.pending_tokens = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error(self.directory, e) from e
        self._lock = _DirectoryLock(self.directory)
        try:
            self._open_directory(resume)
        except BaseException:
            self.close()
            raise
        if self.complete:
            self.close()

    # --- directory state -----------------------------------------------------------------------

    def _open_directory(self, resume: bool) -> None:
        manifest, state = self.directory / MANIFEST, self.directory / STATE
        if manifest.exists():
            if not resume:
                raise ValueError(f"{self.directory} already holds a complete shard dataset")
            stored = read_json(manifest)
            self._check_same_config(stored, manifest, ignore=("format_version",))  # complete v1 data stays valid
            self.shards, self.complete = stored["shards"], True
            state.unlink(missing_ok=True)  # killed between the manifest's rename and this cleanup
        elif state.exists():
            if not resume:
                raise ValueError(f"{self.directory} holds an interrupted capture; resume it or use a new directory")
            stored = read_json(state)
            if stored.get("format_version") in VERSIONS and stored["format_version"] != VERSION:
                raise ValueError(f"{state}: an interrupted capture in format version "
                                 f"{stored.get('format_version')!r}; this kdfast writes version {VERSION}. Finish it "
                                 "with the kdfast that started it, or capture into a new directory")
            self._check_same_config(stored, state)
            self._recover_shards()
        else:
            if any(path.suffix != ".tmp" and path.name != LOCK for path in self.directory.iterdir()):
                raise ValueError(f"output directory {self.directory} is not empty and holds no kdfast capture")
            self._remove_tmp_files()  # killed while writing capture.json
            write_json_atomic(state, self.config)

    def _check_same_config(self, stored: dict, path: Path, ignore: tuple[str, ...] = ()) -> None:
        """A resume must produce the dataset the directory was started for; name what differs."""
        differ = [key for key in self.config if key not in ignore and stored.get(key) != self.config[key]]
        if differ:
            details = "; ".join(f"{key}: stored {stored.get(key)!r}, requested {self.config[key]!r}" for key in differ)
            raise ValueError(f"{path} was written with a different configuration ({details}); "
                             "use a new output directory or the original settings")

    def _remove_tmp_files(self) -> None:
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink()

    def _recover_shards(self) -> None:
        """Adopt finished shards in order; discard half-written *.tmp files."""
        self._remove_tmp_files()
        while (path := self.directory / shard_name(len(self.shards))).exists():
            header = ShardFile.open(path).header
            self._check_recovered(header, path)
            self.shards.append(_shard_entry(path, header))
        strays = len(list(self.directory.glob("shard-*.kds"))) - len(self.shards)
        if strays:
            raise ShardError(self.directory, f"{strays} shard file(s) after a gap at {shard_name(len(self.shards))}")

    def _check_recovered(self, header: Header, path: Path) -> None:
        config = self.config
        expected = (VERSION, config["vocab_size"], config["k"], config["kind"], config["value_dtype"],
                    config["index_encoding"], config["capture_temperature"], self.num_sequences)
        found = (header.version, header.vocab_size, header.k, header.kind, header.value_dtype, header.index_encoding,
                 header.capture_temperature, header.first_sequence)
        if found != expected:
            raise ShardError(path, f"finished shard does not continue this capture (found {found}, "
                                   f"expected {expected})")

    # --- appending -----------------------------------------------------------------------------

    @property
    def num_sequences(self) -> int:
        """Sequences stored in finished shards plus those buffered for the next one."""
        return sum(s["sequences"] for s in self.shards) + len(self._pending)

    def add(self, tokens, indices, values, tail=None, mask=None) -> None:
        """Append one sequence.

        tokens  # [L] int, 0 <= id < vocab_size
        mask    # [L] bool (or 0/1), True = the position is learned: its teacher targets are stored and
                #     ShardDataset gives it a label; None = every position (at least one must be learned)
        indices # [R, k] int for the R learned positions in order, or [L, k] (rows not learned are
                #     dropped); -1 = empty slot (its value is stored as -inf for logprobs, 0 for probs)
        values  # [R, k] or [L, k] float: teacher log-probs at the capture temperature (kind logprobs)
                #     or probabilities (kind probs), for the token after each position
        tail    # [R] or [L] float log of the probability mass outside the slots; None computes
                #     log(1 - sum(exp(values))) for logprobs (-inf below 1e-6 missing mass), -inf for probs
        """
        self._check_open()
        record = self._check_sequence(_as_numpy(tokens), _as_numpy(indices), _as_numpy(values),
                                      None if tail is None else _as_numpy(tail), None if mask is None
                                      else _as_numpy(mask))
        self._pending.append(record)
        self.pending_tokens += len(record[0])
        if self.pending_tokens >= self.shard_tokens:
            self._flush()

    def _check_sequence(self, tokens, indices, values, tail, mask) -> tuple[np.ndarray, ...]:
        """ValueError for anything a reader would refuse; (tokens, mask, indices, values, tail) in
        storage types, the targets for learned positions only."""
        vocab, k, kind = self.config["vocab_size"], self.config["k"], self.config["kind"]
        length = tokens.shape[0] if tokens.ndim == 1 else -1
        if length < 1:
            raise ValueError(f"tokens must be [L>=1], got {tuple(tokens.shape)}")
        learned = np.ones(length, bool) if mask is None else _check_mask(mask, length)
        rows = int(learned.sum())
        full = indices.shape[:1] == (length,) and rows < length  # [L, k] targets: keep the learned rows
        if indices.shape != (rows if not full else length, k) or values.shape != indices.shape:
            raise ValueError(f"expected indices and values [{rows}, {k}] (learned positions) or [{length}, {k}]; "
                             f"got indices {tuple(indices.shape)}, values {tuple(values.shape)}")
        if tail is not None and tail.shape != indices.shape[:1]:
            raise ValueError(f"tail must be [{indices.shape[0]}] like the targets, got {tuple(tail.shape)}")
        if full:
            indices, values, tail = indices[learned], values[learned], None if tail is None else tail[learned]
        values = values.astype(np.float32)
        values[indices < 0] = empty_value(kind)
        tail = _default_tail(values, kind) if tail is None else np.minimum(tail.astype(np.float32), 0)
        problem = range_problem(tokens, indices, values, tail, vocab, kind)
        if problem:
            raise ValueError(f"{problem} (vocab_size {vocab}, kind {kind!r}, NaN is never valid)")
        return tokens.astype(np.int32), learned, indices.astype(np.int32), values, tail

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self.shards)
        path = self.directory / shard_name(index)
        header = _write_shard(path, self._pending, self.config, first_sequence=self.num_sequences - len(self._pending))
        self.shards.append(_shard_entry(path, header))
        self._pending, self.pending_tokens = [], 0

    def finish(self) -> Path:
        """Write the last shard and the manifest, release the directory; returns the manifest path."""
        manifest = self.directory / MANIFEST
        if self.complete:
            return manifest
        self._check_open()
        self._flush()
        if not self.shards:
            raise ValueError("no sequences were added; an empty shard dataset is not written")
        write_json_atomic(manifest, self._manifest())
        (self.directory / STATE).unlink(missing_ok=True)
        self.complete = True
        self.close()
        return manifest

    def _check_open(self) -> None:
        if self.complete:
            raise ValueError(f"{self.directory} is already complete")
        if self._lock.handle.closed:
            raise ValueError(f"this ShardWriter for {self.directory} was closed; open a new one with resume=True")

    def close(self) -> None:
        """Release the directory lock without finishing (the directory stays resumable)."""
        self._lock.release()

    def _manifest(self) -> dict:
        return {
            "format": FORMAT_NAME,
            **self.config,
            "num_sequences": sum(s["sequences"] for s in self.shards),
            "num_tokens": sum(s["tokens"] for s in self.shards),
            "num_learned": sum(s["learned"] for s in self.shards),
            "shards": self.shards,
        }

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()


def _check_mask(mask: np.ndarray, length: int) -> np.ndarray:
    if mask.shape != (length,) or not (mask.dtype == bool or np.isin(mask, (0, 1)).all()):
        raise ValueError(f"mask must be [{length}] of bool or 0/1 like tokens, got {mask.dtype} {tuple(mask.shape)}")
    if not mask.any():
        raise ValueError("mask has no learned position: such a sequence trains nothing; leave it out")
    return mask.astype(bool)


def _make_config(vocab_size, k, kind, value_dtype, index_encoding, temperature, shard_tokens, metadata) -> dict:
    """The manifest fields fixed at creation; validates them (ValueError names the argument)."""
    checks = [
        (kind in KINDS, f"kind must be one of {KINDS}, got {kind!r}"),
        (value_dtype in VALUE_DTYPES, f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype!r}"),
        (index_encoding in INDEX_ENCODINGS, f"index_encoding must be one of {INDEX_ENCODINGS}, got {index_encoding!r}"),
        (isinstance(vocab_size, int) and 1 <= vocab_size < 2**31,
         f"vocab_size must be in [1, 2**31), got {vocab_size!r}"),
        (isinstance(k, int) and 1 <= k <= vocab_size, f"k must be in [1, vocab_size={vocab_size}], got {k!r}"),
        (float(temperature) > 0 and np.isfinite(temperature), f"capture_temperature must be > 0, got {temperature!r}"),
        (isinstance(shard_tokens, int) and shard_tokens >= 1, f"shard_tokens must be >= 1, got {shard_tokens!r}"),
        (not (kind == "probs" and value_dtype == "uint8"), "value_dtype 'uint8' is only defined for kind 'logprobs'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    reserved = {"format", "num_sequences", "num_tokens", "num_learned", "shards"}
    if reserved & metadata.keys():
        raise ValueError(f"metadata may not use the manifest's own keys {sorted(reserved & metadata.keys())}")
    for key in _METADATA:
        if not (metadata.get(key) is None or isinstance(metadata[key], dict)):
            raise ValueError(f"metadata[{key!r}] must be a dict or None, got {type(metadata[key]).__name__}")
    config = {
        "format_version": VERSION, "kind": kind, "vocab_size": vocab_size, "k": k,
        "value_dtype": value_dtype, "index_dtype": "int32", "index_encoding": index_encoding,
        "index_bits": index_bits_for(index_encoding, vocab_size), "capture_temperature": float(temperature),
        "shard_tokens": shard_tokens, **dict.fromkeys(_METADATA), **metadata,
    }
    config = json.loads(json.dumps(config))  # what a resume will read back, e.g. tuples as lists
    if json_depth(config) > MAX_JSON_DEPTH:
        raise ValueError(f"metadata is nested deeper than readers accept ({MAX_JSON_DEPTH} levels)")
    return config


def _default_tail(values: np.ndarray, kind: str) -> np.ndarray:
    """log(1 - sum(exp(values))) per row; -inf for probs, and when the missing mass is below what
    float32 values can resolve (so that complete rows get -inf, not the log of a rounding error)."""
    if kind == "probs":
        return np.full(values.shape[0], -np.inf, np.float32)
    missing = 1.0 - np.exp(values.astype(np.float64)).sum(axis=1)
    missing[missing < _MASS_RESOLUTION] = 0.0
    with np.errstate(divide="ignore"):
        return np.log(np.minimum(missing, 1.0)).astype(np.float32)


def _write_shard(path: Path, records: list[tuple[np.ndarray, ...]], config: dict, first_sequence: int) -> Header:
    """Encode ``records`` (tokens, mask, indices, values, tail) into one shard file, atomically."""
    tokens = np.concatenate([r[0] for r in records]).astype("<i4")
    mask = np.concatenate([r[1] for r in records]).astype(np.uint8)
    indices, index_high = encode_indices(np.concatenate([r[2] for r in records]), config["index_encoding"],
                                         config["index_bits"])
    values, value_scale = encode_values(np.concatenate([r[3] for r in records]), config["value_dtype"])
    tail = np.concatenate([r[4] for r in records]).astype("<f4")
    arrays = {"tokens": tokens, "mask": mask, "indices": indices, "index_high": index_high, "values": values,
              "value_scale": value_scale, "tail": tail}
    arrays["index"] = _index_records(arrays, [len(r[0]) for r in records], [len(r[2]) for r in records])
    header = _make_header(arrays, config, len(records), len(tokens), len(tail), first_sequence)

    def chunks():
        yield header.pack()
        position = len(header.pack())
        for name in SECTIONS:
            offset, length, _ = header.sections[name]
            yield bytes(offset - position)  # zero padding up to the section
            yield as_bytes(arrays[name])
            position = offset + length
        yield pack_footer(position + 16)

    _write_atomic(path, chunks())
    return header


def _index_records(arrays: dict, lengths: list[int], learned: list[int]) -> np.ndarray:
    """[S * 96] uint8: per sequence its token and target-row ranges and the checksum of its bytes in
    every SEQUENCE_SECTIONS section (an empty section's slice hashes the empty string)."""
    token_ends, target_ends = np.cumsum(lengths).tolist(), np.cumsum(learned).tolist()
    records = []
    for token_end, target_end, length, rows in zip(token_ends, target_ends, lengths, learned):
        ranges = {True: (token_end - length, token_end), False: (target_end - rows, target_end)}
        sums = tuple(checksum(arrays[name][slice(*ranges[name in TOKEN_SECTIONS])]) for name in SEQUENCE_SECTIONS)
        records.append(IndexRecord(token_end - length, token_end, target_end - rows, target_end, sums).pack())
    return np.frombuffer(b"".join(records), np.uint8)


def _make_header(arrays: dict, config: dict, num_sequences: int, num_tokens: int, num_learned: int,
                 first_sequence: int) -> Header:
    lengths = section_lengths(VERSION, num_sequences, num_tokens, num_learned, config["k"], config["value_dtype"],
                              config["index_encoding"], config["index_bits"])
    layout, _ = expected_layout(lengths)
    sections = {}
    for name in SECTIONS:
        data = as_bytes(arrays[name])
        assert data.nbytes == lengths[name], (name, data.nbytes, lengths[name])
        sections[name] = (layout[name][0], data.nbytes, checksum(data))
    return Header(num_sequences, num_tokens, first_sequence, config["vocab_size"], config["k"],
                  config["capture_temperature"], config["kind"], config["value_dtype"], config["index_encoding"],
                  config["index_bits"], sections, num_learned, VERSION)


def _shard_entry(path: Path, header: Header) -> dict:
    """The manifest's record of one shard; ``checksum`` is the header checksum (see Header.checksum)."""
    return {"file": path.name, "first_sequence": header.first_sequence, "sequences": header.num_sequences,
            "tokens": header.num_tokens, "learned": header.num_learned, "bytes": path.stat().st_size,
            "checksum": f"{header.checksum:016x}"}
