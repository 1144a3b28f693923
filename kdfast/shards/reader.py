"""Reading shard datasets: O(1) open, verified reads with ``pread``, full verification on request.

``open_shards`` trusts nothing it has not checked: the manifest (a regular file, size-capped,
depth-limited, every field present and typed), then per shard its size against the manifest, the
header (magic, version, checksum, canonical layout), the footer, and that header and manifest
agree. That costs a few hundred bytes of I/O per shard, independent of its size.

Reads use ``pread`` into fresh arrays (one call per section a sequence touches), never a memory map:
a shard truncated or rewritten in place while it is open gives a short read or a checksum mismatch
(ShardError), never SIGBUS. A
version-2 read checks the xxh3_64 of every byte it returns against its sequence's index record; a
version-1 read (no per-sequence checksums in that format) checks the shard's whole-section checksums
once, before the first read from that shard object. Every read also range-checks what it returns,
so even ``verify_reads=False`` yields ShardError, never an out-of-range id or a NaN in a batch.

``read`` returns one target row per position (empty where nothing is learned); ``read_learned``
returns the stored rows of the learned positions only, with the same checks, and skips building the
empty rows.

File descriptors are opened on the first read; a forked DataLoader worker shares them safely
(``pread`` does not move a file offset), pickling a ShardSet sends paths and headers only.
"""
from __future__ import annotations

import bisect
import io
import json
import os
import stat
from pathlib import Path
from typing import NamedTuple

import numpy as np
import xxhash
from tqdm import tqdm

from kdfast.shards.format import (
    FOOTER_SIZE, FORMAT_NAME, HEADER_SIZE, INDEX_ENCODINGS, KINDS, MANIFEST, SEQUENCE_SECTIONS, STATE,
    TOKEN_SECTIONS, VALUE_DTYPES, VERSIONS, Header, IndexRecord, ShardError, decode_indices,
    decode_values, empty_value, range_problem, row_bytes, shard_name, unpack_footer,
)

__all__ = ["open_shards", "verify_shards", "load_manifest", "read_json", "json_depth", "ShardSet", "ShardFile",
           "SequenceArrays", "LearnedRows", "MAX_JSON_BYTES", "MAX_JSON_DEPTH"]

MAX_JSON_BYTES = 64 << 20  # manifest / capture.json size cap (a 1000-shard manifest is ~200 KB)
MAX_JSON_DEPTH = 32  # nesting of objects and arrays (kdfast writes at most 4)
_CHUNK_BYTES = 16 << 20  # streamed whole-section checksums
_EMPTY_CHECKSUM = xxhash.xxh3_64_intdigest(b"")
_NO_ROWS = np.empty((0, 0), np.uint8)  # what the decoders get for an empty section (they do not look at it)


class SequenceArrays(NamedTuple):
    """One sequence, decoded into fresh (writable) arrays; every array has one row per position."""

    tokens: np.ndarray  # [L] int32
    indices: np.ndarray  # [L, k] int32, -1 = empty slot (every slot of a position that is not learned)
    values: np.ndarray  # [L, k] float32: log-probs (kind logprobs) or probabilities (kind probs); empty: -inf / 0
    tail: np.ndarray  # [L] float32 log-mass outside the slots (-inf: none, and at positions not learned)
    mask: np.ndarray  # [L] bool, True = learned (version 1: all True)


class LearnedRows(NamedTuple):
    """One sequence as stored, decoded into fresh (writable) arrays: a token and a mask bit per position,
    target rows for the learned positions only, in position order (no empty rows are made)."""

    tokens: np.ndarray  # [L] int32
    indices: np.ndarray  # [R, k] int32, -1 = empty slot; R = mask.sum() (version 1: R = L)
    values: np.ndarray  # [R, k] float32: log-probs (kind logprobs) or probabilities (kind probs); empty: -inf / 0
    tail: np.ndarray  # [R] float32 log-mass outside the slots (-inf: none)
    mask: np.ndarray  # [L] bool, True = learned (version 1: all True)


# --- hostile-file-safe reading ---------------------------------------------------------------------


def _open_regular(path: Path, missing: str) -> io.FileIO:
    """A read-only handle on ``path`` if it is a regular file (never blocks: FIFOs are opened O_NONBLOCK)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ShardError(path, missing) from None
    except OSError as e:
        raise ShardError(path, f"cannot open: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ShardError(path, "not a regular file (a directory, device, FIFO or socket): refusing to read it")
    return io.FileIO(fd, "r")


def _pread_into(fd: int, out: np.ndarray, offset: int) -> int:
    """Fill the C-contiguous array ``out`` from file offset ``offset``; returns the bytes read (fewer at end
    of file)."""
    size = out.nbytes
    done = os.preadv(fd, [out], offset) if size else 0
    if 0 < done < size:  # a short read: continue after it
        view = out.reshape(-1).view(np.uint8)
        while done < size:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                break
            done += got
    return done


def read_json(path: Path) -> dict:
    """A JSON object from the regular file ``path``: at most MAX_JSON_BYTES, nested at most
    MAX_JSON_DEPTH deep; ShardError naming the file otherwise."""
    path = Path(path)
    with _open_regular(path, "missing") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise ShardError(path, f"{size} bytes, over the {MAX_JSON_BYTES}-byte limit for this file")
        try:
            data = os.pread(handle.fileno(), size + 1, 0)
        except OSError as e:
            raise ShardError(path, f"cannot read: {e.strerror}") from None
    if len(data) > size:
        raise ShardError(path, "file grew while it was read: another process is writing it")
    try:
        obj = json.loads(data)
    except RecursionError:
        raise ShardError(path, "JSON nested too deeply") from None
    except ValueError as e:
        raise ShardError(path, f"unreadable JSON: {e}") from None
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise ShardError(path, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(obj, dict):
        raise ShardError(path, "JSON content is not an object")
    return obj


def json_depth(obj) -> int:
    """Nesting depth of objects and arrays (a scalar is 0, ``{}`` is 1), without recursion."""
    depth, level = 0, [obj] if isinstance(obj, (dict, list)) else []
    while level:
        depth += 1
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list))]
    return depth


# --- one shard file --------------------------------------------------------------------------------


class ShardFile:
    """One shard: its validated header and, after the first read, a read-only file handle."""

    def __init__(self, path: Path, header: Header):
        self.path = path
        self.header = header
        self._handle: io.FileIO | None = None
        self._sections_checked = False  # version 1: whole-section checksums checked by this object
        self._sections, self._empty_sections = _read_plan(header)
        self._index_offset = header.sections["index"][0] if header.version == 2 else None
        self._no_parts = tuple(_NO_ROWS if name in header.sections else None for name in SEQUENCE_SECTIONS)

    @classmethod
    def open(cls, path: str | Path, *, manifest: dict | None = None, entry: dict | None = None) -> ShardFile:
        """O(1) open: size, header, footer, and agreement with the manifest entry when given."""
        path = Path(path)
        with _open_regular(path, "missing shard file listed in the manifest") as handle:
            header = _check_file(handle, path, entry)
        if manifest is not None:
            _check_header_matches(header, manifest, entry, path)
        return cls(path, header)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}

    def _file(self) -> io.FileIO:
        """The read handle, opened on first use; the file must still be the one that was opened."""
        if self._handle is None:
            handle = _open_regular(self.path, "shard file disappeared after the dataset was opened")
            header = np.empty(HEADER_SIZE, np.uint8)  # [256] uint8
            size = os.fstat(handle.fileno()).st_size
            if (size != self.header.total_size() or _pread_into(handle.fileno(), header, 0) != HEADER_SIZE
                    or header.tobytes() != self.header.pack()):
                handle.close()
                raise ShardError(self.path, f"changed since the dataset was opened (now {size} bytes): replaced, "
                                            "truncated or rewritten; reopen it")
            self._handle = handle
        return self._handle

    def _error(self, problem: str, local: int | None = None, section: str | None = None) -> ShardError:
        if local is None:
            return ShardError(self.path, problem, section=section)
        sequence = self.header.first_sequence + local
        return ShardError(self.path, f"sequence {sequence} ({local} in this shard): {problem}", sequence=sequence,
                          section=section)

    def _pread(self, offset: int, dtype: np.dtype, shape: tuple, what: str, local: int | None,
               expected: int | None = None) -> np.ndarray:
        """A fresh array of ``shape`` read from ``offset``; ``expected``: its xxh3_64 (checked while hot)."""
        return self._fill(self._file().fileno(), np.empty(shape, dtype), offset, what, local, expected)

    def _fill(self, fd: int, out: np.ndarray, offset: int, what: str, local: int | None,
              expected: int | None) -> np.ndarray:
        """``out`` filled from ``offset`` of the shard's descriptor ``fd``; ``expected``: its xxh3_64."""
        try:
            got = _pread_into(fd, out, offset)
        except OSError as e:
            raise self._error(f"cannot read the {what} section: {e.strerror}", local, what) from None
        if got != out.nbytes:
            raise self._error(f"the file ends inside the {what} section: truncated after it was opened", local, what)
        if expected is not None and xxhash.xxh3_64_intdigest(out) != expected:
            raise self._mismatch(what, local)
        return out

    def _mismatch(self, what: str, local: int | None) -> ShardError:
        return self._error(f"{what} section checksum mismatch: the section is damaged", local, what)

    def read(self, local: int, *, verify: bool = True) -> SequenceArrays:
        """Sequence ``local`` (0-based within this shard) with one target row per position, empty where
        nothing is learned; checked as ``read_learned`` checks it."""
        rows = self.read_learned(local, verify=verify)
        if len(rows.tail) == len(rows.mask):
            return SequenceArrays(*rows)
        return SequenceArrays(rows.tokens, *_spread(rows.mask, rows.indices, rows.values, rows.tail,
                                                    self.header.kind), rows.mask)

    def read_learned(self, local: int, *, verify: bool = True) -> LearnedRows:
        """Sequence ``local`` (0-based within this shard) as stored: target rows of its learned positions
        only; ShardError (with ``sequence`` set) on any problem. Version 2 with ``verify``: every byte read
        is checked against the sequence's checksums; otherwise (and always for version 1) the decoded
        values are range-checked instead."""
        h = self.header
        if verify and h.version == 1 and not self._sections_checked:
            self._check_sections(local)
        fd = self._file().fileno()
        record = self._record(fd, local) if h.version == 2 else self._locate_v1(fd, local)
        checksums = record.checksums if verify and h.version == 2 else None  # version 1 records have none
        if checksums is not None:
            self._check_empty_sections(checksums, local)
        tokens, mask, low, high, stored, scale, tail = self._read_rows(fd, record, checksums, local)
        learned = self._mask(mask, record, local)
        indices = decode_indices(low, high, h.index_encoding, h.k)
        values = decode_values(stored, scale, h.value_dtype)
        if checksums is None:  # checksummed bytes are the writer's, which it range-checked
            self._check_ranges(tokens, indices, values, tail, local)
        return LearnedRows(tokens, indices, values, tail, learned)

    def _read_rows(self, fd: int, record: IndexRecord, checksums: tuple[int, ...] | None, local: int) -> list:
        """Sequence ``local``'s rows of every SEQUENCE_SECTIONS entry, in that order: for a non-empty section
        one pread into a fresh array, checked against its entry of ``checksums`` (None: not checked); for
        an empty one ``_NO_ROWS``; None for the mask of version 1, which has none."""
        spans = ((record.target_start, record.target_end), (record.token_start, record.token_end))
        parts = list(self._no_parts)
        for slot, name, per_position, offset, size, dtype, row_shape in self._sections:
            start, end = spans[per_position]
            out = parts[slot] = np.empty((end - start, *row_shape), dtype)
            at = offset + start * size
            try:
                complete = os.preadv(fd, [out], at) == out.nbytes
            except OSError:
                complete = False
            if not complete:  # a short read or an error: _fill continues it or says what is wrong
                self._fill(fd, out, at, name, local, None)
            if checksums is not None and xxhash.xxh3_64_intdigest(out) != checksums[slot]:
                raise self._mismatch(name, local)
        return parts

    def _check_empty_sections(self, checksums: tuple[int, ...], local: int) -> None:
        """A sequence's slice of an empty section is empty: its checksum must be that of no bytes."""
        for slot, name in self._empty_sections:
            if checksums[slot] != _EMPTY_CHECKSUM:
                raise self._error(f"{name} section checksum mismatch: the index record is damaged", local, name)

    def _check_ranges(self, tokens, indices, values, tail, local: int) -> None:
        problem = range_problem(tokens, indices, values, tail, self.header.vocab_size, self.header.kind)
        if problem:
            raise self._error(f"{problem}: a data section is damaged (run kdfast verify)", local)

    def _locate_v1(self, fd: int, local: int) -> IndexRecord:
        """Where sequence ``local`` of a version-1 shard lies, from its offsets section (no checksums); ``fd``:
        the shard's descriptor."""
        h = self.header
        start, end = self._fill(fd, np.empty(2, "<u8"), h.sections["offsets"][0] + 8 * local, "offsets", local,
                                None).tolist()
        if not 0 <= start < end <= h.num_tokens:
            raise self._error(f"spans tokens [{start}, {end}) outside the shard's {h.num_tokens}: offsets "
                              "section damaged (run kdfast verify)", local, "offsets")
        return IndexRecord(start, end, start, end, ())

    def _record(self, fd: int, local: int) -> IndexRecord:
        """Sequence ``local``'s index record (version 2), checked: its own checksum, and that it lies inside
        the shard. One ``os.pread``; through ``_fill`` (which continues a short read or says what is wrong)
        when that does not return the record's 96 bytes."""
        h = self.header
        offset = self._index_offset + IndexRecord.SIZE * local
        try:
            raw = os.pread(fd, IndexRecord.SIZE, offset)
        except OSError:
            raw = b""  # _fill reads again and reports the error
        if len(raw) != IndexRecord.SIZE:
            raw = self._fill(fd, np.empty(IndexRecord.SIZE, np.uint8), offset, "index", local, None)
        record = IndexRecord.unpack(raw)
        if record is None:
            raise self._error("index section checksum mismatch: the sequence's index record is damaged", local,
                              "index")
        token_start, token_end, target_start, target_end, _ = record
        if not (0 <= token_start < token_end <= h.num_tokens and 0 <= target_start < target_end <= h.num_learned
                and target_end - target_start <= token_end - token_start):
            raise self._error(f"index record places it outside the shard (tokens [{token_start}, {token_end}), "
                              f"targets [{target_start}, {target_end}))", local, "index")
        return record

    def _mask(self, mask: np.ndarray | None, record: IndexRecord, local: int) -> np.ndarray:
        """[L] bool learned positions; the mask must hold 0/1 and as many ones as there are target rows."""
        if mask is None:
            return np.ones(record.token_end - record.token_start, bool)
        rows = record.target_end - record.target_start
        stored = mask.tobytes()  # bytes.count: cheaper than numpy reductions over a few hundred bytes
        if stored.count(1) != rows or stored.count(0) != len(stored) - rows:
            raise self._error(f"mask does not match its {rows} target rows: the mask section is damaged (run "
                              "kdfast verify)", local, "mask")
        return mask.view(np.bool_)

    def verify(self) -> None:
        """Check every byte: section checksums, zero padding, the sequence index, then every sequence as
        a verified read checks it (per-sequence checksums, mask), and its value ranges."""
        self._check_sections()
        self._check_padding()
        self._check_sequence_index()
        for local in range(self.header.num_sequences):
            self._check_ranges(*self.read(local)[:4], local)

    def _check_sections(self, local: int | None = None) -> None:
        """Whole-section checksums, streamed; ``local``: the read that asked (named in the error)."""
        for name, (offset, length, expected) in self.header.sections.items():
            digest = xxhash.xxh3_64()
            for start in range(0, length, _CHUNK_BYTES):
                digest.update(self._pread(offset + start, np.dtype("u1"), (min(_CHUNK_BYTES, length - start),), name,
                                          local))
            if digest.intdigest() != expected:
                raise self._error(f"{name} section checksum mismatch: the section is damaged", local, name)
        self._sections_checked = True

    def _check_padding(self) -> None:
        gap_start = HEADER_SIZE
        for offset, length, _ in sorted(self.header.sections.values()):
            if offset > gap_start and np.count_nonzero(self._pread(gap_start, np.dtype("u1"), (offset - gap_start,),
                                                                   "padding", None)):
                raise self._error(f"nonzero padding in bytes [{gap_start}, {offset})")
            gap_start = max(gap_start, offset + length)

    def _check_sequence_index(self) -> None:
        """Sequences tile the shard's tokens (and, version 2, its target rows) in order."""
        h = self.header
        if h.version == 1:
            offsets = self._pread(h.sections["offsets"][0], np.dtype("<u8"), (h.num_sequences + 1,), "offsets", None)
            steps = np.diff(offsets.astype(np.int64))
            if offsets[0] != 0 or offsets[-1] != h.num_tokens or steps.min() < 1:
                raise self._error("sequence offsets are not increasing from 0 to the token count", section="offsets")
            return
        records = self._pread(h.sections["index"][0], np.dtype("<u8"), (h.num_sequences, IndexRecord.SIZE // 8),
                              "index", None)
        for column, total in ((0, h.num_tokens), (2, h.num_learned)):
            starts, ends = records[:, column].astype(np.int64), records[:, column + 1].astype(np.int64)
            if starts[0] != 0 or ends[-1] != total or np.any(starts[1:] != ends[:-1]) or np.any(ends <= starts):
                raise self._error("index records do not tile the shard's tokens and target rows in order",
                                  section="index")


class _Section(NamedTuple):
    """How a read finds a sequence's rows in one non-empty per-sequence section."""

    slot: int  # the section's position in an index record's checksums (SEQUENCE_SECTIONS order)
    name: str
    per_position: bool  # a row per position (tokens, mask) rather than per learned position
    offset: int  # of the section in the file
    row_bytes: int
    dtype: np.dtype  # storage type of a row's elements
    row_shape: tuple  # shape of one row


def _read_plan(h: Header) -> tuple[tuple[_Section, ...], tuple[tuple[int, str], ...]]:
    """The per-sequence sections a read touches, in SEQUENCE_SECTIONS order (version 1 has no mask): the
    non-empty ones as ``_Section``s, and (checksum slot, name) of the empty ones."""
    rows = row_bytes(h.k, h.value_dtype, h.index_encoding, h.index_bits)
    storage = {"tokens": "<i4", "mask": "u1", "indices": "<u2" if h.index_encoding == "packed" else "<i4",
               "index_high": "u1", "values": {"float16": "<f2", "bfloat16": "<u2", "uint8": "u1"}[h.value_dtype],
               "value_scale": "<f4", "tail": "<f4"}
    shapes = {"tokens": (), "mask": (), "indices": (h.k,), "index_high": (h.index_bits - 16, -(-h.k // 8)),
              "values": (h.k,), "value_scale": (2,), "tail": ()}
    present = [(slot, name) for slot, name in enumerate(SEQUENCE_SECTIONS) if name in h.sections]
    sections = tuple(_Section(slot, name, name in TOKEN_SECTIONS, h.sections[name][0], rows[name],
                              np.dtype(storage[name]), shapes[name]) for slot, name in present if rows[name])
    return sections, tuple((slot, name) for slot, name in present if not rows[name])


def _spread(learned: np.ndarray, indices: np.ndarray, values: np.ndarray, tail: np.ndarray, kind: str):
    """Target rows of the learned positions -> one row per position, empty where not learned."""
    length, k = len(learned), indices.shape[1]
    full_indices = np.full((length, k), -1, np.int32)
    full_values = np.full((length, k), empty_value(kind), np.float32)
    full_tail = np.full(length, -np.inf, np.float32)
    full_indices[learned], full_values[learned], full_tail[learned] = indices, values, tail
    return full_indices, full_values, full_tail


def _check_file(handle: io.FileIO, path: Path, entry: dict | None) -> Header:
    """Size against the manifest entry, header, size against the header, footer."""
    size = os.fstat(handle.fileno()).st_size
    if entry is not None and size != entry["bytes"]:
        raise ShardError(path, f"file has {size} bytes, the manifest says {entry['bytes']}: "
                               "truncated, extended or replaced after capture")
    try:
        header = Header.unpack(os.pread(handle.fileno(), HEADER_SIZE, 0), path)
        total = header.total_size()
        if size != total:
            state = "truncated" if size < total else "longer than its header says"
            raise ShardError(path, f"{state}: header describes {total} bytes, file has {size}")
        footer_total = unpack_footer(os.pread(handle.fileno(), FOOTER_SIZE, total - FOOTER_SIZE), path)
    except OSError as e:
        raise ShardError(path, f"cannot read: {e.strerror}") from None
    if footer_total != total:
        raise ShardError(path, f"footer records {footer_total} bytes, header describes {total}")
    return header


def _check_header_matches(header: Header, manifest: dict, entry: dict, path: Path) -> None:
    """The header must say what the manifest says, field by field."""
    pairs = {
        "format_version": (header.version, manifest["format_version"]),
        "vocab_size": (header.vocab_size, manifest["vocab_size"]), "k": (header.k, manifest["k"]),
        "kind": (header.kind, manifest["kind"]), "value_dtype": (header.value_dtype, manifest["value_dtype"]),
        "index_encoding": (header.index_encoding, manifest["index_encoding"]),
        "index_bits": (header.index_bits, manifest["index_bits"]),
        "capture_temperature": (header.capture_temperature, manifest["capture_temperature"]),
        "first_sequence": (header.first_sequence, entry["first_sequence"]),
        "sequences": (header.num_sequences, entry["sequences"]), "tokens": (header.num_tokens, entry["tokens"]),
        "learned": (header.num_learned, entry.get("learned", entry["tokens"])),
        "checksum": (f"{header.checksum:016x}", entry["checksum"]),
    }
    for field, (found, expected) in pairs.items():
        if found != expected:
            raise ShardError(path, f"header {field} is {found!r}, the manifest says {expected!r}")


# --- manifest ------------------------------------------------------------------------------------

_INT, _NUMBER, _STR, _OBJECT = "integer", "number", "string", "object or null"
_MANIFEST_FIELDS = {
    "format_version": _INT, "kind": _STR, "vocab_size": _INT, "k": _INT, "value_dtype": _STR,
    "index_dtype": _STR, "index_encoding": _STR, "index_bits": _INT, "capture_temperature": _NUMBER,
    "num_sequences": _INT, "num_tokens": _INT, "shard_tokens": _INT,
}
_METADATA_FIELDS = {"teacher": _OBJECT, "tokenizer": _OBJECT, "source": _OBJECT, "capture": _OBJECT}
_MANIFEST_FIELDS_V2 = {"num_learned": _INT, **_METADATA_FIELDS}
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
    return {_INT: isinstance(value, int), _NUMBER: isinstance(value, (int, float)), _STR: isinstance(value, str),
            _OBJECT: value is None or isinstance(value, dict)}[kind]


def _require_fields(obj, fields: dict, path: Path, where: str, *, optional: bool = False) -> None:
    """Every field present (unless ``optional``) with its type."""
    if not isinstance(obj, dict):
        raise ShardError(path, f"{where} is not an object")
    for key, kind in fields.items():
        if (key in obj or not optional) and not (key in obj and _is(obj[key], kind)):
            got = _short(obj[key]) if key in obj else "nothing"
            raise ShardError(path, f"{where}: field {key!r} missing or not a {kind} (got {got})")


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
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in VERSIONS:
        raise ShardError(path, f"unsupported format version {_short(version)} (field format_version; this kdfast "
                               f"reads versions {VERSIONS})")
    _require_fields(manifest, _MANIFEST_FIELDS, path, "manifest")
    if version == 1:  # capture wrote these, the v1 Python writer only when given: checked when present
        _require_fields(manifest, _METADATA_FIELDS, path, "manifest", optional=True)
    else:
        _require_fields(manifest, _MANIFEST_FIELDS_V2, path, "manifest")
    for key, choices in _CHOICES.items():
        if manifest[key] not in choices:
            raise ShardError(path, f"{key} is {_short(manifest[key])}, expected one of {choices}")
    if manifest["shard_tokens"] < 1:
        raise ShardError(path, f"shard_tokens is {manifest['shard_tokens']}, expected >= 1")
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
    entry_fields = _ENTRY_FIELDS if manifest["format_version"] == 1 else {**_ENTRY_FIELDS, "learned": _INT}
    sequences = tokens = learned = 0
    for index, entry in enumerate(shards):
        _require_fields(entry, entry_fields, path, f"shard entry {index}")
        if entry["file"] != shard_name(index) or entry["first_sequence"] != sequences:
            raise ShardError(path, f"shard entry {index} ({_short(entry['file'])}, first sequence "
                                   f"{entry['first_sequence']}) breaks the sequence of shards")
        sequences += entry["sequences"]
        tokens += entry["tokens"]
        learned += entry.get("learned", entry["tokens"])
    if (sequences, tokens) != (manifest["num_sequences"], manifest["num_tokens"]):
        raise ShardError(path, f"shards hold {sequences} sequences / {tokens} tokens, the manifest totals say "
                               f"{manifest['num_sequences']} / {manifest['num_tokens']}")
    if learned != manifest.get("num_learned", manifest["num_tokens"]):
        raise ShardError(path, f"shards hold {learned} learned tokens, the manifest total says "
                               f"{manifest['num_learned']}")


def _check_vocab(manifest: dict, vocab_size: int | None, path: Path) -> None:
    """Exact match: a different size almost always means a different tokenizer, so ids would not align."""
    if vocab_size is not None and vocab_size != manifest["vocab_size"]:
        raise ShardError(path, f"teacher vocabulary has {manifest['vocab_size']} entries, the student's has "
                               f"{vocab_size}: these targets do not belong to this student")


# --- datasets ------------------------------------------------------------------------------------


class ShardSet:
    """A complete, opened shard dataset with random access by global sequence index.

    ``verify_reads`` (default True): every read checks its checksums (see the module docstring).
    """

    def __init__(self, path: Path, manifest: dict, shards: list[ShardFile], verify_reads: bool = True):
        self.path = path
        self.manifest = manifest
        self.shards = shards
        self.verify_reads = verify_reads
        self._starts = [s.header.first_sequence for s in shards]

    vocab_size = property(lambda self: self.manifest["vocab_size"])
    k = property(lambda self: self.manifest["k"])
    kind = property(lambda self: self.manifest["kind"])
    capture_temperature = property(lambda self: self.manifest["capture_temperature"])
    format_version = property(lambda self: self.manifest["format_version"])
    num_tokens = property(lambda self: self.manifest["num_tokens"])
    total_tokens = num_tokens
    # positions with teacher targets and a label (version 1: every position)
    learned_tokens = property(lambda self: self.manifest.get("num_learned", self.manifest["num_tokens"]))

    def __len__(self) -> int:
        return self.manifest["num_sequences"]

    @property
    def nbytes(self) -> int:
        """Bytes on disk of all shard files."""
        return sum(entry["bytes"] for entry in self.manifest["shards"])

    def read(self, index: int) -> SequenceArrays:
        """Sequence ``index`` (0 <= index < len(self)) with one target row per position, decoded and
        checked; ShardError names file and sequence."""
        shard, local = self._find(index)
        return shard.read(local, verify=self.verify_reads)

    def read_learned(self, index: int) -> LearnedRows:
        """Sequence ``index`` (0 <= index < len(self)) with the target rows of its learned positions only,
        decoded and checked as ``read`` checks it."""
        shard, local = self._find(index)
        return shard.read_learned(local, verify=self.verify_reads)

    def _find(self, index: int) -> tuple[ShardFile, int]:
        """The shard holding sequence ``index`` and the sequence's number within it."""
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences")
        shard = bisect.bisect_right(self._starts, index) - 1
        return self.shards[shard], index - self._starts[shard]

    def verify(self, progress: bool = False) -> None:
        """Check every byte of every shard; raises ShardError at the first problem."""
        for shard in tqdm(self.shards, desc="verify", unit="shard", disable=not progress):
            shard.verify()


def open_shards(path: str | Path, *, vocab_size: int | None = None, verify: bool = False,
                verify_reads: bool = True) -> ShardSet:
    """Open a complete shard dataset directory in O(number of shards) small reads.

    ``vocab_size``: the student's vocabulary size; ShardError unless it equals the teacher's.
    ``verify``: also check every byte now (reads all data once), for data that has not been
    through ``kdfast verify`` since it was copied.
    ``verify_reads``: check each read's checksums (default; False leaves only the range checks, for
    measuring their cost or data whose integrity another layer guarantees).
    Raises ShardError naming the file and the problem when anything is missing, damaged or inconsistent.
    """
    directory = Path(path)
    manifest = load_manifest(directory)
    _check_vocab(manifest, vocab_size, directory / MANIFEST)
    shards = [ShardFile.open(directory / entry["file"], manifest=manifest, entry=entry) for entry in manifest["shards"]]
    opened = ShardSet(directory, manifest, shards, verify_reads)
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
