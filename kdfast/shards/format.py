"""The shard file format, versions 1 and 2: constants, the header, the section layout, the codecs.

This module is the executable form of ``docs/shard-format.md``; the two must change together. A shard
is one little-endian file:

    [0, 256)        header (struct below), ending in xxh3_64 of bytes [0, 248)
    [256, 4096)     zero padding
    sections        each starts on a 4 KiB boundary, gaps are zero, optional sections have length 0
                    v1: tokens, offsets, indices, index_high, values, value_scale, tail
                    v2: index, tokens, mask, indices, index_high, values, value_scale, tail
    footer          16 bytes: the magic again and the total file size

Version 2 (written by this kdfast) adds a loss mask (which positions are learned; teacher targets
are stored for learned positions only) and an index of one 96-byte record per sequence holding
where its tokens and target rows are and an xxh3_64 of its bytes in every data section, so that
a read checks exactly the bytes it returns. Version 1 is still read.

Everything a reader needs to validate a file without trusting it lives here: ``Header.unpack``
checks every field, ``expected_layout`` recomputes where each section must be from the counts alone,
so a header can only be accepted if it describes exactly the canonical layout; ``range_problem`` is
the one value-range check shared by the writer (ValueError) and the reader (ShardError).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import xxhash

__all__ = [
    "ShardError", "Header", "IndexRecord", "MAGIC", "VERSION", "VERSIONS", "HEADER_SIZE", "ALIGN", "FOOTER_SIZE",
    "SECTIONS", "SECTIONS_V1", "SEQUENCE_SECTIONS", "TOKEN_SECTIONS", "KINDS", "VALUE_DTYPES", "INDEX_ENCODINGS",
    "MANIFEST", "STATE", "LOCK", "FORMAT_NAME", "shard_name", "sections_of", "index_bits_for", "row_bytes",
    "section_lengths", "expected_layout", "pack_footer", "unpack_footer", "checksum", "as_bytes", "range_problem",
    "encode_indices", "decode_indices", "encode_values", "decode_values", "empty_value",
]

FORMAT_NAME = "kdfast-shards"  # the manifest's "format" field
MANIFEST = "manifest.json"  # written last: its presence means the dataset is complete
STATE = "capture.json"  # present while a capture is in progress
LOCK = "writer.lock"  # flock-ed by the one writer of a directory; holds its pid
MAGIC = b"KDFSHARD"
VERSION = 2  # what the writer writes
VERSIONS = (1, 2)  # what the reader reads
HEADER_SIZE = 256
ALIGN = 4096
FOOTER_SIZE = 16
EMPTY_CODE = 255  # uint8 value code of an empty slot / -inf
SECTIONS_V1 = ("tokens", "offsets", "indices", "index_high", "values", "value_scale", "tail")
SECTIONS = ("index", "tokens", "mask", "indices", "index_high", "values", "value_scale", "tail")  # version 2
# The sections a v2 index record checksums per sequence, in record order; the first two are
# indexed by token position, the others by target row (learned positions only).
SEQUENCE_SECTIONS = ("tokens", "mask", "indices", "index_high", "values", "value_scale", "tail")
TOKEN_SECTIONS = ("tokens", "mask")
KINDS = ("logprobs", "probs")
VALUE_DTYPES = ("float16", "bfloat16", "uint8")
INDEX_ENCODINGS = ("int32", "packed")

# magic, version, header_size, num_sequences, num_tokens, first_sequence, vocab_size, k,
# capture_temperature, kind, value_dtype, index_encoding, index_bits, num_sections
_FIXED = struct.Struct("<8sIIQQQIIdBBBBI")
_SECTION_V1 = struct.Struct("<QQQ")  # v1 table entry: offset, length, xxh3_64
_LEARNED = struct.Struct("<Q")  # v2: number of learned positions (target rows), at offset 64
_CHECKSUMS_V2 = struct.Struct(f"<{len(SECTIONS)}Q")  # v2 table: xxh3_64 per section, at offset 72
_CHECKSUM_AT = HEADER_SIZE - 8
_FOOTER = struct.Struct("<8sQ")  # magic, total file size
assert _FIXED.size + len(SECTIONS_V1) * _SECTION_V1.size + 16 == _CHECKSUM_AT
assert _FIXED.size + _LEARNED.size + _CHECKSUMS_V2.size <= _CHECKSUM_AT


class ShardError(Exception):
    """A shard dataset is damaged, incomplete, in use or does not match what the caller expects.

    ``path`` is the file (or directory) at fault and ``problem`` says what is wrong, in words a user
    can act on; ``str()`` gives both. When one sequence could not be read, ``sequence`` is its global
    index in the dataset (what ``ShardDataset[i]`` was asked for) and ``section`` names the damaged
    section when it is known; both are None otherwise. ``ShardError(message)`` alone (path None) is
    how a DataLoader re-raises a worker's ShardError in the main process: the message keeps the
    worker's text and traceback, the attributes are lost.
    """

    def __init__(self, path: str | Path, problem: str | None = None, *, sequence: int | None = None,
                 section: str | None = None):
        super().__init__(str(path) if problem is None else f"{path}: {problem}")
        self.path = None if problem is None else str(path)
        self.problem = str(path) if problem is None else problem
        self.sequence = sequence
        self.section = section

    def __reduce__(self):  # DataLoader workers send exceptions to the main process by pickling
        return _rebuild_error, (self.path, self.problem, self.sequence, self.section)


def _rebuild_error(path, problem, sequence, section) -> ShardError:
    return ShardError(path, problem, sequence=sequence, section=section)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.kds"


def sections_of(version: int) -> tuple[str, ...]:
    return SECTIONS_V1 if version == 1 else SECTIONS


def as_bytes(array: np.ndarray) -> np.ndarray:
    """A flat uint8 view of an array's bytes (a copy only if it is not contiguous)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def checksum(data: bytes | np.ndarray) -> int:
    """xxh3_64 of bytes or of an array's bytes, without copying a contiguous array."""
    return xxhash.xxh3_64_intdigest(as_bytes(data) if isinstance(data, np.ndarray) else data)


def index_bits_for(encoding: str, vocab_size: int) -> int:
    """Bits per stored index: 32, or for "packed" the fewest that hold ``id + 1`` (0 = empty slot)."""
    return 32 if encoding == "int32" else max(16, vocab_size.bit_length())


def _align(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def row_bytes(k: int, value_dtype: str, index_encoding: str, index_bits: int) -> dict[str, int]:
    """Bytes per row of every per-sequence section (a row is a token for TOKEN_SECTIONS, a target row else)."""
    packed = index_encoding == "packed"
    return {
        "tokens": 4,
        "mask": 1,
        "indices": k * (2 if packed else 4),
        "index_high": (index_bits - 16) * math.ceil(k / 8) if packed else 0,
        "values": k * (1 if value_dtype == "uint8" else 2),
        "value_scale": 8 if value_dtype == "uint8" else 0,
        "tail": 4,
    }


def section_lengths(version: int, num_sequences: int, num_tokens: int, num_learned: int, k: int, value_dtype: str,
                    index_encoding: str, index_bits: int) -> dict[str, int]:
    """Byte length of every section of a shard, a pure function of the counts and encodings."""
    rows = row_bytes(k, value_dtype, index_encoding, index_bits)
    lengths = {name: (num_tokens if name in TOKEN_SECTIONS else num_learned) * size for name, size in rows.items()}
    if version == 1:
        lengths["offsets"] = 8 * (num_sequences + 1)
    else:
        lengths["index"] = IndexRecord.SIZE * num_sequences
    return {name: lengths[name] for name in sections_of(version)}


def expected_layout(lengths: dict[str, int]) -> tuple[dict[str, tuple[int, int]], int]:
    """Canonical (offset, length) of every section (in ``lengths``' order) and the total file size."""
    layout, offset, names = {}, ALIGN, list(lengths)
    for name in names:
        layout[name] = (offset, lengths[name])
        offset = _align(offset + lengths[name]) if name != names[-1] else offset + lengths[name]
    return layout, offset + FOOTER_SIZE


@dataclass(frozen=True)
class Header:
    """Every field of a shard header; ``sections`` maps name -> (offset, length, xxh3_64).

    ``num_learned`` is the number of learned positions (rows of the target sections); in version 1
    every position is learned, so it equals ``num_tokens``.
    """

    num_sequences: int
    num_tokens: int
    first_sequence: int
    vocab_size: int
    k: int
    capture_temperature: float
    kind: str
    value_dtype: str
    index_encoding: str
    index_bits: int
    sections: dict[str, tuple[int, int, int]]
    num_learned: int
    version: int = VERSION

    def lengths(self) -> dict[str, int]:
        return section_lengths(self.version, self.num_sequences, self.num_tokens, self.num_learned, self.k,
                               self.value_dtype, self.index_encoding, self.index_bits)

    def total_size(self) -> int:
        return expected_layout(self.lengths())[1]

    def pack(self) -> bytes:
        """The 256 header bytes, checksum included."""
        names = sections_of(self.version)
        fixed = _FIXED.pack(MAGIC, self.version, HEADER_SIZE, self.num_sequences, self.num_tokens,
                            self.first_sequence, self.vocab_size, self.k, self.capture_temperature,
                            KINDS.index(self.kind), VALUE_DTYPES.index(self.value_dtype),
                            INDEX_ENCODINGS.index(self.index_encoding), self.index_bits, len(names))
        if self.version == 1:
            table = b"".join(_SECTION_V1.pack(*self.sections[name]) for name in names)
        else:
            table = _LEARNED.pack(self.num_learned) + _CHECKSUMS_V2.pack(*(self.sections[n][2] for n in names))
        body = (fixed + table).ljust(_CHECKSUM_AT, b"\0")
        return body + struct.pack("<Q", checksum(body))

    @property
    def checksum(self) -> int:
        """The header checksum; the manifest records it as the shard's checksum (it covers the
        section checksums, so it identifies every data byte of the shard)."""
        return struct.unpack("<Q", self.pack()[_CHECKSUM_AT:])[0]

    @classmethod
    def unpack(cls, data: bytes, path: str | Path) -> Header:
        """Parse and fully validate 256 header bytes; any inconsistency raises ShardError."""
        if len(data) < HEADER_SIZE:
            raise ShardError(path, f"truncated: {len(data)} bytes, smaller than the {HEADER_SIZE}-byte header")
        fields = _FIXED.unpack_from(data)
        magic, version, header_size = fields[:3]
        if magic != MAGIC:
            raise ShardError(path, f"bad magic {magic!r}, expected {MAGIC!r}: not a kdfast shard")
        if version not in VERSIONS:
            raise ShardError(path, f"unsupported format version {version} (this kdfast reads versions {VERSIONS})")
        if struct.unpack_from("<Q", data, _CHECKSUM_AT)[0] != checksum(data[:_CHECKSUM_AT]):
            raise ShardError(path, "header checksum mismatch: the header is damaged")
        table_end = _FIXED.size + (len(SECTIONS_V1) * _SECTION_V1.size if version == 1
                                   else _LEARNED.size + _CHECKSUMS_V2.size)
        if header_size != HEADER_SIZE or any(data[table_end:_CHECKSUM_AT]):
            raise ShardError(path, f"header size or reserved bytes differ from format version {version}")
        header = cls._from_fields(version, fields[3:], data, path)
        header._check_layout(path)
        return header

    @classmethod
    def _from_fields(cls, version: int, fields: tuple, data: bytes, path) -> Header:
        (num_sequences, num_tokens, first_sequence, vocab_size, k, temperature, kind, value_dtype,
         index_encoding, index_bits, num_sections) = fields
        names = sections_of(version)
        if num_sections != len(names):
            raise ShardError(path, f"header lists {num_sections} sections, format version {version} has {len(names)}")
        if kind >= len(KINDS) or value_dtype >= len(VALUE_DTYPES) or index_encoding >= len(INDEX_ENCODINGS):
            raise ShardError(path, f"unknown encoding code (kind {kind}, values {value_dtype}, "
                                   f"indices {index_encoding})")
        if version == 1:
            num_learned = num_tokens
            table = [_SECTION_V1.unpack_from(data, _FIXED.size + i * _SECTION_V1.size) for i in range(len(names))]
        else:
            num_learned = _LEARNED.unpack_from(data, _FIXED.size)[0]
            sums = _CHECKSUMS_V2.unpack_from(data, _FIXED.size + _LEARNED.size)
            lengths = section_lengths(2, num_sequences, num_tokens, num_learned, k, VALUE_DTYPES[value_dtype],
                                      INDEX_ENCODINGS[index_encoding], index_bits)
            table = [(*expected_layout(lengths)[0][name], value) for name, value in zip(names, sums)]
        return cls(num_sequences, num_tokens, first_sequence, vocab_size, k, temperature, KINDS[kind],
                   VALUE_DTYPES[value_dtype], INDEX_ENCODINGS[index_encoding], index_bits,
                   dict(zip(names, table)), num_learned, version)

    def _check_layout(self, path) -> None:
        """Counts must be plausible and every section exactly where the canonical layout puts it."""
        if not (1 <= self.k <= self.vocab_size < 2**31 and 1 <= self.num_sequences <= self.num_learned
                <= self.num_tokens < 2**40):
            raise ShardError(path, f"implausible counts (sequences {self.num_sequences}, tokens {self.num_tokens}, "
                                   f"learned {self.num_learned}, vocab {self.vocab_size}, k {self.k})")
        if not (math.isfinite(self.capture_temperature) and self.capture_temperature > 0):
            raise ShardError(path, f"capture temperature {self.capture_temperature} is not positive and finite")
        if self.index_bits != index_bits_for(self.index_encoding, self.vocab_size):
            raise ShardError(path, f"{self.index_bits}-bit indices do not fit {self.index_encoding} "
                                   f"encoding of vocabulary {self.vocab_size}")
        if self.kind == "probs" and self.value_dtype == "uint8":
            raise ShardError(path, "uint8 values are only defined for kind 'logprobs'")
        layout, _ = expected_layout(self.lengths())
        for name, expected in layout.items():
            if self.sections[name][:2] != expected:
                raise ShardError(path, f"section table: {name} at (offset, length) {self.sections[name][:2]}, "
                                       f"format requires {expected}")


class IndexRecord(NamedTuple):
    """One v2 index record (96 bytes): where sequence s lies and the checksums of its bytes.

    tokens / mask rows [token_start, token_end), target rows [target_start, target_end), one xxh3_64
    per SEQUENCE_SECTIONS entry over the sequence's bytes of that section, and an xxh3_64 of the
    record's first 88 bytes. A named tuple, cheap to make: every read unpacks one.
    """

    token_start: int
    token_end: int
    target_start: int
    target_end: int
    checksums: tuple[int, ...]

    SIZE = 96
    _STRUCT = struct.Struct(f"<4Q{len(SEQUENCE_SECTIONS)}Q")

    def pack(self) -> bytes:
        body = self._STRUCT.pack(self.token_start, self.token_end, self.target_start, self.target_end,
                                 *self.checksums)
        return body + struct.pack("<Q", checksum(body))

    @classmethod
    def unpack(cls, data: bytes) -> IndexRecord | None:
        """The record from its 96 bytes (any buffer), or None when its own checksum does not match (the
        record is damaged)."""
        fields = _RECORD.unpack(data)
        if fields[-1] != xxhash.xxh3_64_intdigest(memoryview(data)[:cls._STRUCT.size]):
            return None
        # cls(...) without the named tuple's Python-level __new__
        return tuple.__new__(cls, (fields[0], fields[1], fields[2], fields[3], fields[4:-1]))


_RECORD = struct.Struct(f"<{IndexRecord._STRUCT.size // 8 + 1}Q")  # a whole record: its fields and its checksum
assert IndexRecord._STRUCT.size + 8 == IndexRecord.SIZE


def pack_footer(total_size: int) -> bytes:
    return _FOOTER.pack(MAGIC, total_size)


def unpack_footer(data: bytes, path) -> int:
    """Total size recorded in the footer; ShardError if the footer's magic is wrong."""
    magic, total = _FOOTER.unpack(data)
    if magic != MAGIC:
        raise ShardError(path, "footer magic missing: the file is truncated or was overwritten at its end")
    return total


def range_problem(tokens: np.ndarray, indices: np.ndarray, values: np.ndarray, tail: np.ndarray, vocab_size: int,
                  kind: str) -> str | None:
    """What lies outside its valid range in one sequence's arrays, or None.

    tokens [L] in [0, V), indices [R, k] in [-1, V), values [R, k] in [-inf, 0] (logprobs) or
    [0, 1] (probs), tail [R] in [-inf, 0]; NaN fails every check. The writer turns an answer into
    a ValueError, the reader into a ShardError.
    """
    lowest, highest = (-np.inf, 0.0) if kind == "logprobs" else (0.0, 1.0)
    checks = (
        ("token ids", tokens, 0, vocab_size - 1),
        ("teacher indices", indices, -1, vocab_size - 1),
        ("teacher values", values, lowest, highest),
        ("tail log-mass", tail, -np.inf, 0.0),
    )
    for what, array, lo, hi in checks:  # max and min propagate NaN; no lower bound: no min pass
        if array.size and not (array.max() <= hi and (lo == -np.inf or array.min() >= lo)):
            return f"{what} outside [{lo}, {hi}]"
    return None


def empty_value(kind: str) -> float:
    """The value stored in (and returned for) an empty slot: -inf for log-probs, 0 for probabilities."""
    return -np.inf if kind == "logprobs" else 0.0


# ---------------------------------------------------------------------------------------------
# Codecs. Indices: "int32" stores ids as is (-1 = empty). "packed" stores code = id + 1 (0 = empty)
# split into its low 16 bits (uint16 [R, k], a plain array) and index_bits - 16 bit planes
# (uint8 [R, planes, ceil(k / 8)], little bit order), so decoding is one widening plus, per plane,
# one gather of 8 slots' bits per byte from a table, instead of a bit-level gather.
# Values: "float16"/"bfloat16" store the float as is (bfloat16 as its raw uint16 bits).
# "uint8" (kind logprobs only) quantizes each row linearly between its largest value `hi` and
# smallest finite value: value = hi - code * step, code 0..254, code 255 = -inf / empty; (hi, step)
# is stored per row as float32 in the value_scale section.
# ---------------------------------------------------------------------------------------------


def encode_indices(indices: np.ndarray, encoding: str, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Arrays for the indices and index_high sections from int32 ids [R, k] (-1 = empty)."""
    if encoding == "int32":
        return np.ascontiguousarray(indices, dtype="<i4"), np.empty(0, np.uint8)
    codes = indices.astype(np.int64) + 1  # [R, k]
    low = (codes & 0xFFFF).astype("<u2")
    shifts = np.arange(16, index_bits, dtype=np.int64)[None, :, None]
    planes = ((codes[:, None, :] >> shifts) & 1).astype(np.uint8)  # [R, planes, k]
    return low, np.packbits(planes, axis=-1, bitorder="little")


def decode_indices(low: np.ndarray, high: np.ndarray, encoding: str, k: int) -> np.ndarray:
    """int32 ids [R, k] (-1 = empty) from the indices section [R, k] and index_high [R, planes, kb].

    For "int32" this is ``low`` itself: callers pass arrays they own.
    """
    if encoding == "int32":
        return low
    ids = low.astype(np.int32)
    planes = high.shape[1]
    if not planes:
        ids -= 1
    for plane in range(planes):  # a gather of 8 slots per byte of the plane; the first plane also subtracts the 1
        adds = _FIRST_PLANE_ADDS if plane == 0 else _PLANE_ADDS[plane]
        ids += adds.take(high[:, plane], axis=0).reshape(len(ids), 8 * high.shape[2])[:, :k]
    return ids


_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")  # [256, 8]
# _PLANE_ADDS[p, byte] [8] int32: what one byte of bit plane p adds to the codes of its 8 slots (at most 31 bits)
_PLANE_ADDS = _BYTE_BITS.astype(np.int32)[None] << (16 + np.arange(15, dtype=np.int32))[:, None, None]
_FIRST_PLANE_ADDS = _PLANE_ADDS[0] - 1  # ... and code - 1 is the id


def encode_values(values: np.ndarray, value_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays for the values and value_scale sections from float32 values [R, k]."""
    if value_dtype == "float16":
        return values.astype("<f2"), np.empty(0, np.float32)
    if value_dtype == "bfloat16":
        bits = torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(torch.bfloat16).view(torch.int16)
        return bits.numpy().view("<u2"), np.empty(0, np.float32)
    return _quantize_rows(values)


def _quantize_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 codes [R, k] and (hi, step) [R, 2] float32; see the codec comment above."""
    finite = np.isfinite(values)
    hi = np.where(finite, values, -np.inf).max(axis=1)
    lo = np.where(finite, values, np.inf).min(axis=1)
    has_any = np.isfinite(hi)
    hi = np.where(has_any, hi, 0).astype(np.float32)
    step = np.where(has_any, (hi - np.where(has_any, lo, 0)) / (EMPTY_CODE - 1), 0).astype(np.float32)
    safe_step = np.where(step > 0, step, 1)[:, None]
    with np.errstate(invalid="ignore"):
        codes = np.rint((hi[:, None] - values) / safe_step)
    codes = np.where(finite, np.clip(codes, 0, EMPTY_CODE - 1), EMPTY_CODE).astype(np.uint8)
    return codes, np.stack([hi, step], axis=1).astype("<f4")


def decode_values(stored: np.ndarray, scale: np.ndarray, value_dtype: str) -> np.ndarray:
    """float32 values [R, k] from the values section [R, k] and value_scale [R, 2]."""
    if value_dtype == "float16":
        return _half_to_float(stored)
    if value_dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    values = stored.astype(np.float32)
    values *= scale[:, 1:]
    np.subtract(scale[:, :1], values, out=values)  # hi - code * step
    np.copyto(values, -np.inf, where=stored == EMPTY_CODE)
    return values


# torch runs an element-wise op on at most this many elements on the calling thread (its grain size,
# at::internal::GRAIN_SIZE); a longer one would go to its thread pool
_SERIAL_ELEMENTS = 32768


def _half_to_float(stored: np.ndarray) -> np.ndarray:
    """float32 copy of the writable float16 array ``stored``, converted by torch on the calling thread,
    ``_SERIAL_ELEMENTS`` at a time (~3x faster than numpy's conversion or a table gather). Equal to
    numpy's conversion for every float16 but NaN (the writer refuses NaN), whose payload may differ."""
    half = torch.from_numpy(stored.view(np.float16))
    if half.numel() <= _SERIAL_ELEMENTS:
        return half.float().numpy()
    values = np.empty(stored.shape, np.float32)
    source, target = half.view(-1), torch.from_numpy(values).view(-1)
    for start in range(0, source.numel(), _SERIAL_ELEMENTS):
        target[start:start + _SERIAL_ELEMENTS].copy_(source[start:start + _SERIAL_ELEMENTS])
    return values
