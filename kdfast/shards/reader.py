"""Reading shard datasets: O(1) open, zero-copy memory maps, full verification on request.

``open_shards`` trusts nothing it has not checked: the manifest's schema, then per shard its size
against the manifest, the header (magic, version, checksum, canonical layout), the footer, and that
header and manifest agree. That costs a few hundred bytes of I/O per shard, independent of its size.
Data bytes are only checksummed by ``verify`` (``kdfast verify``), but every read still range-checks
what it returns (offsets, token and teacher ids, values, tail), so a damaged section yields
ShardError, never an out-of-range id or a NaN in a training batch.

Memory maps are opened lazily and per process (a DataLoader worker, forked or spawned, maps the
files itself); pickling a ShardSet sends paths and headers, never mapped data.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from kdfast.shards.format import (
    FOOTER_SIZE, FORMAT_NAME, HEADER_SIZE, INDEX_ENCODINGS, KINDS, MANIFEST, SECTIONS, STATE, VALUE_DTYPES,
    VERSION, Header, ShardError, checksum, decode_indices, decode_values, shard_name, unpack_footer,
)

__all__ = ["open_shards", "verify_shards", "load_manifest", "read_json", "ShardSet", "ShardFile", "SequenceArrays"]

_VERIFY_CHUNK_TOKENS = 1 << 16


class SequenceArrays(NamedTuple):
    """One sequence, decoded into fresh (writable) arrays."""

    tokens: np.ndarray  # [L] int32
    indices: np.ndarray  # [L, k] int32, -1 = empty slot
    values: np.ndarray  # [L, k] float32: log-probs (kind logprobs) or probabilities (kind probs)
    tail: np.ndarray  # [L] float32 log-mass outside the slots (-inf: none)


class _Views(NamedTuple):
    """Zero-copy arrays over one shard's memory map, one per section."""

    file: np.ndarray  # [bytes] uint8
    tokens: np.ndarray  # [T] int32
    offsets: np.ndarray  # [S + 1] uint64
    indices: np.ndarray  # [T, k] int32 or uint16 (packed low bits)
    index_high: np.ndarray  # [T, planes, ceil(k / 8)] uint8
    values: np.ndarray  # [T, k] float16 / uint16 (bfloat16 bits) / uint8 codes
    value_scale: np.ndarray  # [T, 2] float32 (hi, step), uint8 values only
    tail: np.ndarray  # [T] float32


_SECTION_DTYPES = {"tokens": "<i4", "offsets": "<u8", "index_high": "u1", "value_scale": "<f4", "tail": "<f4"}
_VALUE_STORAGE = {"float16": "<f2", "bfloat16": "<u2", "uint8": "u1"}


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ShardError if it cannot be read or is not an object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(path, f"unreadable JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ShardError(path, "JSON content is not an object")
    return obj


class ShardFile:
    """One shard: its validated header plus lazily mapped, per-process section views."""

    def __init__(self, path: Path, header: Header):
        self.path = path
        self.header = header
        self._views: _Views | None = None
        self._pid = -1

    @classmethod
    def open(cls, path: str | Path, *, manifest: dict | None = None, entry: dict | None = None) -> ShardFile:
        """O(1) open: size, header, footer, and agreement with the manifest entry when given."""
        path = Path(path)
        try:
            size = path.stat().st_size
            if entry is not None and size != entry["bytes"]:
                raise ShardError(path, f"file has {size} bytes, the manifest says {entry['bytes']}: "
                                       "truncated, extended or replaced after capture")
            with open(path, "rb") as f:
                header = Header.unpack(f.read(HEADER_SIZE), path)
                total = header.total_size()
                if size != total:
                    state = "truncated" if size < total else "longer than its header says"
                    raise ShardError(path, f"{state}: header describes {total} bytes, file has {size}")
                f.seek(total - FOOTER_SIZE)
                footer_total = unpack_footer(f.read(FOOTER_SIZE), path)
        except FileNotFoundError:
            raise ShardError(path, "missing shard file listed in the manifest") from None
        except OSError as e:
            raise ShardError(path, f"cannot read: {e}") from None
        if footer_total != total:
            raise ShardError(path, f"footer records {footer_total} bytes, header describes {total}")
        if manifest is not None:
            _check_header_matches(header, manifest, entry, path)
        return cls(path, header)

    def __getstate__(self) -> dict:
        return {"path": self.path, "header": self.header, "_views": None, "_pid": -1}

    def views(self) -> _Views:
        """Section arrays over a memory map owned by this process (mapped on first use)."""
        if self._pid != os.getpid():
            self._views, self._pid = _map_sections(self.path, self.header), os.getpid()
        return self._views

    def read(self, local: int) -> SequenceArrays:
        """Decode and range-check sequence ``local`` (0-based within this shard)."""
        views = self.views()
        start, end = int(views.offsets[local]), int(views.offsets[local + 1])
        if not 0 <= start < end <= self.header.num_tokens:
            raise ShardError(self.path, f"sequence {local} spans tokens [{start}, {end}) outside the shard's "
                                        f"{self.header.num_tokens}: offsets section damaged (run kdfast verify)")
        arrays = self._decode(views, start, end)
        self._check_ranges(arrays, f"sequence {local}")
        return arrays

    def _decode(self, views: _Views, start: int, end: int) -> SequenceArrays:
        h = self.header
        high = views.index_high[start:end] if h.index_encoding == "packed" else views.index_high
        scale = views.value_scale[start:end] if h.value_dtype == "uint8" else views.value_scale
        return SequenceArrays(
            tokens=views.tokens[start:end].copy(),
            indices=decode_indices(views.indices[start:end], high, h.index_encoding, h.k),
            values=decode_values(views.values[start:end], scale, h.value_dtype),
            tail=views.tail[start:end].copy(),
        )

    def _check_ranges(self, arrays: SequenceArrays, where: str) -> None:
        """Ids inside the vocabulary, values a valid distribution piece, no NaN (NaN fails every test)."""
        h = self.header
        lowest, highest = (-np.inf, 0.0) if h.kind == "logprobs" else (0.0, 1.0)
        checks = (
            ("token ids", arrays.tokens, 0, h.vocab_size - 1),
            ("teacher indices", arrays.indices, -1, h.vocab_size - 1),
            ("teacher values", arrays.values, lowest, highest),
            ("tail log-mass", arrays.tail, -np.inf, 0.0),
        )
        for what, array, lo, hi in checks:
            if not (array.min() >= lo and array.max() <= hi):
                raise ShardError(self.path, f"{where}: {what} outside [{lo}, {hi}]: a data section is damaged "
                                            "(run kdfast verify)")

    def verify(self) -> None:
        """Check every byte: section checksums, zero padding, sequence offsets and value ranges."""
        views = self.views()
        for name in SECTIONS:
            offset, length, expected = self.header.sections[name]
            if checksum(views.file[offset:offset + length]) != expected:
                raise ShardError(self.path, f"{name} section checksum mismatch: the section is damaged")
        self._verify_padding(views.file)
        self._verify_offsets(views.offsets)
        for start in range(0, self.header.num_tokens, _VERIFY_CHUNK_TOKENS):
            end = min(start + _VERIFY_CHUNK_TOKENS, self.header.num_tokens)
            self._check_ranges(self._decode(views, start, end), f"tokens [{start}, {end})")

    def _verify_padding(self, file: np.ndarray) -> None:
        spans = [(offset, offset + length) for offset, length, _ in self.header.sections.values()]
        gap_start = HEADER_SIZE
        for start, end in spans:
            if np.count_nonzero(file[gap_start:start]):
                raise ShardError(self.path, f"nonzero padding in bytes [{gap_start}, {start})")
            gap_start = max(gap_start, end)

    def _verify_offsets(self, offsets: np.ndarray) -> None:
        steps = np.diff(offsets.astype(np.int64))
        if offsets[0] != 0 or offsets[-1] != self.header.num_tokens or steps.min() < 1:
            raise ShardError(self.path, "sequence offsets are not increasing from 0 to the token count")


def _map_sections(path: Path, header: Header) -> _Views:
    try:
        file = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise ShardError(path, f"cannot map: {e}") from None
    if file.size != header.total_size():
        raise ShardError(path, f"file changed size since it was opened ({file.size} bytes)")
    tokens, k = header.num_tokens, header.k
    shapes = {"tokens": (tokens,), "offsets": (header.num_sequences + 1,), "indices": (tokens, k),
              "index_high": (tokens, max(header.index_bits - 16, 0), -(-k // 8)) if header.index_encoding == "packed"
              else (0,), "values": (tokens, k), "value_scale": (tokens, 2) if header.value_dtype == "uint8" else (0,),
              "tail": (tokens,)}
    dtypes = dict(_SECTION_DTYPES, indices="<u2" if header.index_encoding == "packed" else "<i4",
                  values=_VALUE_STORAGE[header.value_dtype])
    arrays = {}
    for name in SECTIONS:
        offset, length, _ = header.sections[name]
        flat = np.frombuffer(file, dtype=dtypes[name], count=length // np.dtype(dtypes[name]).itemsize, offset=offset)
        arrays[name] = flat.reshape(shapes[name])
    return _Views(file=file, **arrays)


def _check_header_matches(header: Header, manifest: dict, entry: dict, path: Path) -> None:
    """The header must say what the manifest says, field by field."""
    pairs = {
        "vocab_size": (header.vocab_size, manifest["vocab_size"]), "k": (header.k, manifest["k"]),
        "kind": (header.kind, manifest["kind"]), "value_dtype": (header.value_dtype, manifest["value_dtype"]),
        "index_encoding": (header.index_encoding, manifest["index_encoding"]),
        "index_bits": (header.index_bits, manifest["index_bits"]),
        "capture_temperature": (header.capture_temperature, manifest["capture_temperature"]),
        "first_sequence": (header.first_sequence, entry["first_sequence"]),
        "sequences": (header.num_sequences, entry["sequences"]), "tokens": (header.num_tokens, entry["tokens"]),
        "checksum": (f"{header.checksum:016x}", entry["checksum"]),
    }
    for field, (found, expected) in pairs.items():
        if found != expected:
            raise ShardError(path, f"header {field} is {found!r}, the manifest says {expected!r}")


# --- manifest ------------------------------------------------------------------------------------

_INT, _NUMBER, _STR = "integer", "number", "string"
_MANIFEST_FIELDS = {
    "format_version": _INT, "kind": _STR, "vocab_size": _INT, "k": _INT, "value_dtype": _STR,
    "index_dtype": _STR, "index_encoding": _STR, "index_bits": _INT, "capture_temperature": _NUMBER,
    "num_sequences": _INT, "num_tokens": _INT,
}
_ENTRY_FIELDS = {"file": _STR, "first_sequence": _INT, "sequences": _INT, "tokens": _INT, "bytes": _INT,
                 "checksum": _STR}
_CHOICES = {"kind": KINDS, "value_dtype": VALUE_DTYPES, "index_encoding": INDEX_ENCODINGS, "index_dtype": ("int32",)}


def _short(value) -> str:
    """repr for an error message, cut so that a garbage manifest cannot flood the terminal."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is(value, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    return {_INT: isinstance(value, int), _NUMBER: isinstance(value, (int, float)), _STR: isinstance(value, str)}[kind]


def _require_fields(obj, fields: dict, path: Path, where: str) -> None:
    if not isinstance(obj, dict):
        raise ShardError(path, f"{where} is not an object")
    for key, kind in fields.items():
        if not _is(obj.get(key), kind):
            raise ShardError(path, f"{where}: field {key!r} missing or not a {kind} (got {_short(obj.get(key))})")


def load_manifest(directory: str | Path) -> dict:
    """The validated manifest of a complete dataset; ShardError says why a directory is not one."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ShardError(directory, "not a directory")
    if not path.exists():
        raise ShardError(directory, _why_no_manifest(directory))
    manifest = read_json(path)
    if manifest.get("format") != FORMAT_NAME:
        raise ShardError(path, f"format is {_short(manifest.get('format'))}, not {FORMAT_NAME!r}")
    if manifest.get("format_version") != VERSION:
        raise ShardError(path, f"unsupported format version {_short(manifest.get('format_version'))} "
                               f"(this kdfast reads version {VERSION})")
    _require_fields(manifest, _MANIFEST_FIELDS, path, "manifest")
    for key, choices in _CHOICES.items():
        if manifest[key] not in choices:
            raise ShardError(path, f"{key} is {_short(manifest[key])}, expected one of {choices}")
    _check_entries(manifest, path)
    return manifest


def _why_no_manifest(directory: Path) -> str:
    finished = len(list(directory.glob("shard-*.kds")))
    if (directory / STATE).exists():
        return (f"no {MANIFEST}: capture in progress or interrupted ({finished} shard(s) finished); "
                "rerun the same kdfast capture command to finish it")
    if finished:
        return f"no {MANIFEST} next to {finished} shard file(s): the dataset is incomplete"
    return f"no {MANIFEST}: not a kdfast shard dataset"


def _check_entries(manifest: dict, path: Path) -> None:
    """Shard entries: well-formed, named in order, contiguous, adding up to the totals."""
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ShardError(path, "manifest lists no shards")
    sequences = tokens = 0
    for index, entry in enumerate(shards):
        _require_fields(entry, _ENTRY_FIELDS, path, f"shard entry {index}")
        if entry["file"] != shard_name(index) or entry["first_sequence"] != sequences:
            raise ShardError(path, f"shard entry {index} ({_short(entry['file'])}, first sequence "
                                   f"{entry['first_sequence']}) breaks the sequence of shards")
        sequences += entry["sequences"]
        tokens += entry["tokens"]
    if (sequences, tokens) != (manifest["num_sequences"], manifest["num_tokens"]):
        raise ShardError(path, f"shards hold {sequences} sequences / {tokens} tokens, the manifest totals say "
                               f"{manifest['num_sequences']} / {manifest['num_tokens']}")


def _check_vocab(manifest: dict, vocab_size: int | None, path: Path) -> None:
    """Exact match: a different size almost always means a different tokenizer, so ids would not align."""
    if vocab_size is not None and vocab_size != manifest["vocab_size"]:
        raise ShardError(path, f"teacher vocabulary has {manifest['vocab_size']} entries, the student's has "
                               f"{vocab_size}: these targets do not belong to this student")


# --- datasets ------------------------------------------------------------------------------------


class ShardSet:
    """A complete, opened shard dataset with random access by global sequence index."""

    def __init__(self, path: Path, manifest: dict, shards: list[ShardFile]):
        self.path = path
        self.manifest = manifest
        self.shards = shards
        self._starts = np.array([s.header.first_sequence for s in shards], np.int64)

    vocab_size = property(lambda self: self.manifest["vocab_size"])
    k = property(lambda self: self.manifest["k"])
    kind = property(lambda self: self.manifest["kind"])
    capture_temperature = property(lambda self: self.manifest["capture_temperature"])
    num_tokens = property(lambda self: self.manifest["num_tokens"])

    def __len__(self) -> int:
        return self.manifest["num_sequences"]

    @property
    def nbytes(self) -> int:
        """Bytes on disk of all shard files."""
        return sum(entry["bytes"] for entry in self.manifest["shards"])

    def read(self, index: int) -> SequenceArrays:
        """Sequence ``index`` (0 <= index < len(self)), decoded and range-checked."""
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.shards[shard].read(index - int(self._starts[shard]))

    def verify(self, progress: bool = False) -> None:
        """Check every byte of every shard; raises ShardError at the first problem."""
        for shard in tqdm(self.shards, desc="verify", unit="shard", disable=not progress):
            shard.verify()


def open_shards(path: str | Path, *, vocab_size: int | None = None, verify: bool = False) -> ShardSet:
    """Open a complete shard dataset directory in O(number of shards) small reads.

    ``vocab_size``: the student's vocabulary size; ShardError unless it equals the teacher's.
    ``verify``: also check every checksum now (reads all data once), for data that has not been
    through ``kdfast verify`` since it was copied.
    Raises ShardError naming the file and the problem when anything is missing, damaged or inconsistent.
    """
    directory = Path(path)
    manifest = load_manifest(directory)
    _check_vocab(manifest, vocab_size, directory / MANIFEST)
    shards = [ShardFile.open(directory / entry["file"], manifest=manifest, entry=entry) for entry in manifest["shards"]]
    opened = ShardSet(directory, manifest, shards)
    if verify:
        opened.verify()
    return opened


def verify_shards(path: str | Path, *, vocab_size: int | None = None, progress: bool = False) -> list[ShardError]:
    """Every problem in a dataset directory, one ShardError per damaged file (empty list: intact)."""
    directory = Path(path)
    try:
        manifest = load_manifest(directory)
        _check_vocab(manifest, vocab_size, directory / MANIFEST)
    except ShardError as e:
        return [e]
    errors = []
    for entry in tqdm(manifest["shards"], desc="verify", unit="shard", disable=not progress):
        try:
            ShardFile.open(directory / entry["file"], manifest=manifest, entry=entry).verify()
        except ShardError as e:
            errors.append(e)
    return errors
