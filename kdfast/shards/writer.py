"""Writing shard datasets: one atomic file per shard, the manifest last, resumable after a crash.

A dataset directory goes through three states, and every state is safe to be killed in:

    in progress   capture.json (the writer's configuration) + finished shard-NNNNN.kds files
                  (+ at most one *.tmp being written, discarded on resume)
    complete      manifest.json (+ the shards); capture.json removed
    (readers refuse a directory without manifest.json)

Each shard is written to ``<name>.tmp``, fsynced, renamed and the directory fsynced, so a shard that
exists under its final name is complete. Shard boundaries depend only on sequence lengths and
``shard_tokens``, so a resumed writer fed the same sequences from ``num_sequences`` on produces the
same files as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from kdfast.shards.format import (
    FORMAT_NAME, INDEX_ENCODINGS, KINDS, MANIFEST, SECTIONS, STATE, VALUE_DTYPES, VERSION, Header, ShardError,
    as_bytes, checksum, encode_indices, encode_values, expected_layout, index_bits_for, pack_footer, section_lengths,
    shard_name,
)
from kdfast._io import fsync_path
from kdfast.shards.reader import ShardFile, read_json

__all__ = ["ShardWriter", "write_json_atomic"]

_MASS_RESOLUTION = 1e-6  # float32 log-probs summed over k slots are accurate to ~1e-7


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON so that ``path`` holds either the old content or all of the new (tmp+fsync+rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _as_numpy(x) -> np.ndarray:
    """Tensors (any device; half types widened, numpy has no bfloat16) or array-likes as numpy."""
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    x = x.detach().cpu()
    return (x.float() if x.is_floating_point() else x).numpy()


class ShardWriter:
    """Append sequences with their teacher targets; shards are cut every ``shard_tokens`` tokens.

    Use as a context manager: a clean exit writes the manifest, an exception leaves the directory
    resumable. With ``resume=True`` an interrupted directory with the same configuration continues
    after its last finished shard (``num_sequences`` says how many sequences are already stored; the
    caller feeds the rest), and a complete one with the same configuration is left as is
    (``complete`` is True). A directory holding anything else raises ValueError.

    ``metadata`` (JSON-serializable dict, e.g. teacher / tokenizer / source identity) is stored in the
    manifest and is part of the configuration a resume must match.
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
        self._open_directory(resume)

    # --- directory state -----------------------------------------------------------------------

    def _open_directory(self, resume: bool) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest, state = self.directory / MANIFEST, self.directory / STATE
        if manifest.exists():
            if not resume:
                raise ValueError(f"{self.directory} already holds a complete shard dataset")
            stored = read_json(manifest)
            self._check_same_config(stored, manifest)
            self.shards, self.complete = stored["shards"], True
            state.unlink(missing_ok=True)  # killed between the manifest's rename and this cleanup
        elif state.exists():
            if not resume:
                raise ValueError(f"{self.directory} holds an interrupted capture; resume it or use a new directory")
            self._check_same_config(read_json(state), state)
            self._recover_shards()
        else:
            if any(path.suffix != ".tmp" for path in self.directory.iterdir()):
                raise ValueError(f"output directory {self.directory} is not empty and holds no kdfast capture")
            self._remove_tmp_files()  # killed while writing capture.json
            write_json_atomic(state, self.config)

    def _check_same_config(self, stored: dict, path: Path) -> None:
        """A resume must produce the dataset the directory was started for; name what differs."""
        differ = [key for key in self.config if stored.get(key) != self.config[key]]
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
        expected = (config["vocab_size"], config["k"], config["kind"], config["value_dtype"],
                    config["index_encoding"], config["capture_temperature"], self.num_sequences)
        found = (header.vocab_size, header.k, header.kind, header.value_dtype, header.index_encoding,
                 header.capture_temperature, header.first_sequence)
        if found != expected:
            raise ShardError(path, f"finished shard does not continue this capture (found {found}, "
                                   f"expected {expected})")

    # --- appending -----------------------------------------------------------------------------

    @property
    def num_sequences(self) -> int:
        """Sequences stored in finished shards plus those buffered for the next one."""
        return sum(s["sequences"] for s in self.shards) + len(self._pending)

    def add(self, tokens, indices, values, tail=None) -> None:
        """Append one sequence.

        tokens  # [L] int, 0 <= id < vocab_size
        indices # [L, k] int, -1 = empty slot (its value is stored as -inf for logprobs, 0 for probs)
        values  # [L, k] float: teacher log-probs at the capture temperature (kind logprobs) or
                #        probabilities (kind probs), for the token after each position
        tail    # [L] float log of the probability mass outside the slots; None computes
                #     log(1 - sum(exp(values))) for logprobs (-inf below 1e-6 missing mass), -inf for probs
        """
        if self.complete:
            raise ValueError(f"{self.directory} is already complete")
        record = self._check_sequence(_as_numpy(tokens), _as_numpy(indices), _as_numpy(values),
                                      None if tail is None else _as_numpy(tail))
        self._pending.append(record)
        self.pending_tokens += len(record[0])
        if self.pending_tokens >= self.shard_tokens:
            self._flush()

    def _check_sequence(self, tokens, indices, values, tail) -> tuple[np.ndarray, ...]:
        """ValueError for anything a reader would refuse; returns the arrays in storage types."""
        vocab, k, kind = self.config["vocab_size"], self.config["k"], self.config["kind"]
        length = tokens.shape[0] if tokens.ndim == 1 else -1
        if length < 1 or indices.shape != (length, k) or values.shape != (length, k):
            raise ValueError(f"expected tokens [L>=1], indices and values [L, {k}]; got tokens "
                             f"{tuple(tokens.shape)}, indices {tuple(indices.shape)}, values {tuple(values.shape)}")
        if tail is not None and tail.shape != (length,):
            raise ValueError(f"tail must be [{length}], got {tuple(tail.shape)}")
        if tokens.min() < 0 or tokens.max() >= vocab or indices.min() < -1 or indices.max() >= vocab:
            raise ValueError(f"tokens must lie in [0, {vocab}) and indices in [-1, {vocab})")
        values = values.astype(np.float32)
        empty = indices < 0
        values[empty] = -np.inf if kind == "logprobs" else 0.0
        low, high = (-np.inf, 0.0) if kind == "logprobs" else (0.0, 1.0)
        if np.isnan(values).any() or values.min() < low or values.max() > high:
            raise ValueError(f"{kind} values must lie in [{low}, {high}] without NaN")
        tail = _default_tail(values, kind) if tail is None else np.minimum(tail.astype(np.float32), 0)
        if np.isnan(tail).any():
            raise ValueError("tail must not contain NaN")
        return tokens.astype(np.int32), indices.astype(np.int32), values, tail

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self.shards)
        path = self.directory / shard_name(index)
        header = _write_shard(path, self._pending, self.config, first_sequence=self.num_sequences - len(self._pending))
        self.shards.append(_shard_entry(path, header))
        self._pending, self.pending_tokens = [], 0

    def finish(self) -> Path:
        """Write the last shard and the manifest; returns the manifest path."""
        manifest = self.directory / MANIFEST
        if self.complete:
            return manifest
        self._flush()
        if not self.shards:
            raise ValueError("no sequences were added; an empty shard dataset is not written")
        write_json_atomic(manifest, self._manifest())
        (self.directory / STATE).unlink(missing_ok=True)
        self.complete = True
        return manifest

    def _manifest(self) -> dict:
        return {
            "format": FORMAT_NAME,
            **self.config,
            "num_sequences": sum(s["sequences"] for s in self.shards),
            "num_tokens": sum(s["tokens"] for s in self.shards),
            "shards": self.shards,
        }

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()


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
    reserved = {"format", "num_sequences", "num_tokens", "shards"}
    if reserved & metadata.keys():
        raise ValueError(f"metadata may not use the manifest's own keys {sorted(reserved & metadata.keys())}")
    config = {
        "format_version": VERSION, "kind": kind, "vocab_size": vocab_size, "k": k,
        "value_dtype": value_dtype, "index_dtype": "int32", "index_encoding": index_encoding,
        "index_bits": index_bits_for(index_encoding, vocab_size), "capture_temperature": float(temperature),
        "shard_tokens": shard_tokens, **metadata,
    }
    return json.loads(json.dumps(config))  # what a resume will read back, e.g. tuples as lists


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
    """Encode ``records`` into one shard file, atomically; returns its header."""
    tokens = np.concatenate([r[0] for r in records])
    lengths = np.array([len(r[0]) for r in records], np.uint64)
    offsets = np.concatenate([np.zeros(1, np.uint64), np.cumsum(lengths, dtype=np.uint64)])
    indices, index_high = encode_indices(np.concatenate([r[1] for r in records]), config["index_encoding"],
                                         config["index_bits"])
    values, value_scale = encode_values(np.concatenate([r[2] for r in records]), config["value_dtype"])
    tail = np.concatenate([r[3] for r in records]).astype("<f4")
    arrays = dict(zip(SECTIONS, (tokens.astype("<i4"), offsets.astype("<u8"), indices, index_high, values,
                                 value_scale, tail)))
    header = _make_header(arrays, config, len(records), len(tokens), first_sequence)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.pack())
        for name in SECTIONS:
            f.write(bytes(header.sections[name][0] - f.tell()))  # zero padding up to the section
            f.write(as_bytes(arrays[name]))
        f.write(pack_footer(f.tell() + 16))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
    return header


def _make_header(arrays: dict, config: dict, num_sequences: int, num_tokens: int, first_sequence: int) -> Header:
    lengths = section_lengths(num_sequences, num_tokens, config["k"], config["value_dtype"],
                              config["index_encoding"], config["index_bits"])
    layout, _ = expected_layout(lengths)
    sections = {}
    for name in SECTIONS:
        data = as_bytes(arrays[name])
        assert data.nbytes == lengths[name], (name, data.nbytes, lengths[name])
        sections[name] = (layout[name][0], data.nbytes, checksum(data))
    return Header(num_sequences, num_tokens, first_sequence, config["vocab_size"], config["k"],
                  config["capture_temperature"], config["kind"], config["value_dtype"], config["index_encoding"],
                  config["index_bits"], sections)


def _shard_entry(path: Path, header: Header) -> dict:
    """The manifest's record of one shard; ``checksum`` is the header checksum (see Header.checksum)."""
    return {"file": path.name, "first_sequence": header.first_sequence, "sequences": header.num_sequences,
            "tokens": header.num_tokens, "bytes": path.stat().st_size, "checksum": f"{header.checksum:016x}"}

