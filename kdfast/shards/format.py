"""The shard file format, version 1: constants, the header, the section layout and the codecs.

This module is the executable form of ``docs/shard-format.md``; the two must change together. A shard
is one little-endian file:

    [0, 256)        header (struct below), ending in xxh3_64 of bytes [0, 248)
    [256, 4096)     zero padding
    sections        tokens, offsets, indices, index_high, values, value_scale, tail; each starts on a
                    4 KiB boundary (so every section can be memory-mapped and viewed as an array
                    without copying), gaps are zero, optional sections have length 0
    footer          16 bytes: the magic again and the total file size, so truncation is caught by
                    looking at the last 16 bytes only

Everything a reader needs to validate a file without trusting it lives here: ``Header.unpack``
checks every field, ``expected_layout`` recomputes where each section must be from the counts alone,
so a header can only be accepted if it describes exactly the canonical layout.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash

__all__ = [
    "ShardError", "Header", "MAGIC", "VERSION", "HEADER_SIZE", "ALIGN", "FOOTER_SIZE", "SECTIONS",
    "KINDS", "VALUE_DTYPES", "INDEX_ENCODINGS", "MANIFEST", "STATE", "FORMAT_NAME", "shard_name",
    "index_bits_for", "section_lengths", "expected_layout", "pack_footer",
    "unpack_footer", "checksum", "as_bytes", "encode_indices", "decode_indices", "encode_values", "decode_values",
]

FORMAT_NAME = "kdfast-shards"  # the manifest's "format" field
MANIFEST = "manifest.json"  # written last: its presence means the dataset is complete
STATE = "capture.json"  # present while a capture is in progress
MAGIC = b"KDFSHARD"
VERSION = 1
HEADER_SIZE = 256
ALIGN = 4096
FOOTER_SIZE = 16
EMPTY_CODE = 255  # uint8 value code of an empty slot / -inf
SECTIONS = ("tokens", "offsets", "indices", "index_high", "values", "value_scale", "tail")
KINDS = ("logprobs", "probs")
VALUE_DTYPES = ("float16", "bfloat16", "uint8")
INDEX_ENCODINGS = ("int32", "packed")

# magic, version, header_size, num_sequences, num_tokens, first_sequence, vocab_size, k,
# capture_temperature, kind, value_dtype, index_encoding, index_bits, num_sections
_FIXED = struct.Struct("<8sIIQQQIIdBBBBI")
_SECTION = struct.Struct("<QQQ")  # offset, length, xxh3_64
_TAIL = struct.Struct("<16sQ")  # reserved (zero), header checksum
_FOOTER = struct.Struct("<8sQ")  # magic, total file size
_CHECKSUM_AT = HEADER_SIZE - 8
assert _FIXED.size + len(SECTIONS) * _SECTION.size + _TAIL.size == HEADER_SIZE


class ShardError(Exception):
    """A shard dataset is damaged, incomplete or does not match what the caller expects.

    ``path`` is the file (or directory) at fault and ``problem`` says what is wrong, in words a user
    can act on; ``str()`` gives both.
    """

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.kds"


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


def section_lengths(num_sequences: int, num_tokens: int, k: int, value_dtype: str, index_encoding: str,
                    index_bits: int) -> dict[str, int]:
    """Byte length of every section, a pure function of the counts and encodings."""
    packed = index_encoding == "packed"
    return {
        "tokens": 4 * num_tokens,
        "offsets": 8 * (num_sequences + 1),
        "indices": num_tokens * k * (2 if packed else 4),
        "index_high": num_tokens * (index_bits - 16) * math.ceil(k / 8) if packed else 0,
        "values": num_tokens * k * (1 if value_dtype == "uint8" else 2),
        "value_scale": 8 * num_tokens if value_dtype == "uint8" else 0,
        "tail": 4 * num_tokens,
    }


def expected_layout(lengths: dict[str, int]) -> tuple[dict[str, tuple[int, int]], int]:
    """Canonical (offset, length) of every section and the total file size, footer included."""
    layout, offset = {}, ALIGN
    for name in SECTIONS:
        layout[name] = (offset, lengths[name])
        offset = _align(offset + lengths[name]) if name != SECTIONS[-1] else offset + lengths[name]
    return layout, offset + FOOTER_SIZE


@dataclass(frozen=True)
class Header:
    """Every field of a shard header; ``sections`` maps name -> (offset, length, xxh3_64)."""

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

    def lengths(self) -> dict[str, int]:
        return section_lengths(self.num_sequences, self.num_tokens, self.k, self.value_dtype,
                               self.index_encoding, self.index_bits)

    def total_size(self) -> int:
        return expected_layout(self.lengths())[1]

    def pack(self) -> bytes:
        """The 256 header bytes, checksum included."""
        fixed = _FIXED.pack(MAGIC, VERSION, HEADER_SIZE, self.num_sequences, self.num_tokens,
                            self.first_sequence, self.vocab_size, self.k, self.capture_temperature,
                            KINDS.index(self.kind), VALUE_DTYPES.index(self.value_dtype),
                            INDEX_ENCODINGS.index(self.index_encoding), self.index_bits, len(SECTIONS))
        table = b"".join(_SECTION.pack(*self.sections[name]) for name in SECTIONS)
        body = fixed + table + bytes(16)
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
        if version != VERSION:
            raise ShardError(path, f"unsupported format version {version} (this kdfast reads version {VERSION})")
        reserved, stored = _TAIL.unpack_from(data, _FIXED.size + len(SECTIONS) * _SECTION.size)
        if stored != checksum(data[:_CHECKSUM_AT]):
            raise ShardError(path, "header checksum mismatch: the header is damaged")
        if header_size != HEADER_SIZE or reserved != bytes(16):
            raise ShardError(path, "header size or reserved bytes differ from format version 1")
        header = cls._from_fields(fields[3:], data, path)
        header._check_layout(path)
        return header

    @classmethod
    def _from_fields(cls, fields: tuple, data: bytes, path) -> Header:
        (num_sequences, num_tokens, first_sequence, vocab_size, k, temperature, kind, value_dtype,
         index_encoding, index_bits, num_sections) = fields
        if num_sections != len(SECTIONS):
            raise ShardError(path, f"header lists {num_sections} sections, format version 1 has {len(SECTIONS)}")
        if kind >= len(KINDS) or value_dtype >= len(VALUE_DTYPES) or index_encoding >= len(INDEX_ENCODINGS):
            raise ShardError(path, f"unknown encoding code (kind {kind}, values {value_dtype}, "
                                   f"indices {index_encoding})")
        table = [_SECTION.unpack_from(data, _FIXED.size + i * _SECTION.size) for i in range(len(SECTIONS))]
        return cls(num_sequences, num_tokens, first_sequence, vocab_size, k, temperature, KINDS[kind],
                   VALUE_DTYPES[value_dtype], INDEX_ENCODINGS[index_encoding], index_bits,
                   dict(zip(SECTIONS, table)))

    def _check_layout(self, path) -> None:
        """Counts must be plausible and every section exactly where the canonical layout puts it."""
        if not (1 <= self.k <= self.vocab_size < 2**31 and 1 <= self.num_sequences <= self.num_tokens < 2**40):
            raise ShardError(path, f"implausible counts (sequences {self.num_sequences}, tokens "
                                   f"{self.num_tokens}, vocab {self.vocab_size}, k {self.k})")
        if not (math.isfinite(self.capture_temperature) and self.capture_temperature > 0):
            raise ShardError(path, f"capture temperature {self.capture_temperature} is not positive and finite")
        if self.index_bits != index_bits_for(self.index_encoding, self.vocab_size):
            raise ShardError(path, f"{self.index_bits}-bit indices do not fit {self.index_encoding} "
                                   f"encoding of vocabulary {self.vocab_size}")
        if self.kind == "probs" and self.value_dtype == "uint8":
            raise ShardError(path, "uint8 values are only defined for kind 'logprobs'")
        layout, _ = expected_layout(self.lengths())
        for name in SECTIONS:
            if self.sections[name][:2] != layout[name]:
                raise ShardError(path, f"section table: {name} at (offset, length) {self.sections[name][:2]}, "
                                       f"format requires {layout[name]}")


def pack_footer(total_size: int) -> bytes:
    return _FOOTER.pack(MAGIC, total_size)


def unpack_footer(data: bytes, path) -> int:
    """Total size recorded in the footer; ShardError if the footer's magic is wrong."""
    magic, total = _FOOTER.unpack(data)
    if magic != MAGIC:
        raise ShardError(path, "footer magic missing: the file is truncated or was overwritten at its end")
    return total


# ---------------------------------------------------------------------------------------------
# Codecs. Indices: "int32" stores ids as is (-1 = empty). "packed" stores code = id + 1 (0 = empty)
# split into its low 16 bits (uint16 [T, k], a plain array) and index_bits - 16 bit planes
# (uint8 [T, planes, ceil(k / 8)], little bit order), so decoding is one widening plus one
# np.unpackbits per plane instead of a bit-level gather.
# Values: "float16"/"bfloat16" store the float as is (bfloat16 as its raw uint16 bits).
# "uint8" (kind logprobs only) quantizes each row linearly between its largest value `hi` and
# smallest finite value: value = hi - code * step, code 0..254, code 255 = -inf / empty; (hi, step)
# is stored per token as float32 in the value_scale section.
# ---------------------------------------------------------------------------------------------


def encode_indices(indices: np.ndarray, encoding: str, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Arrays for the indices and index_high sections from int32 ids [T, k] (-1 = empty)."""
    if encoding == "int32":
        return np.ascontiguousarray(indices, dtype="<i4"), np.empty(0, np.uint8)
    codes = indices.astype(np.int64) + 1  # [T, k]
    low = (codes & 0xFFFF).astype("<u2")
    shifts = np.arange(16, index_bits, dtype=np.int64)[None, :, None]
    planes = ((codes[:, None, :] >> shifts) & 1).astype(np.uint8)  # [T, planes, k]
    return low, np.packbits(planes, axis=-1, bitorder="little")


def decode_indices(low: np.ndarray, high: np.ndarray, encoding: str, k: int) -> np.ndarray:
    """int32 ids [T, k] (-1 = empty) from the indices section [T, k] and index_high [T, planes, kb]."""
    if encoding == "int32":
        return low.copy()
    ids = low.astype(np.int32)
    for plane in range(high.shape[1]):
        bits = np.unpackbits(high[:, plane], axis=-1, count=k, bitorder="little")  # [T, k]
        ids |= bits.astype(np.int32) << (16 + plane)
    ids -= 1
    return ids


def encode_values(values: np.ndarray, value_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays for the values and value_scale sections from float32 values [T, k]."""
    if value_dtype == "float16":
        return values.astype("<f2"), np.empty(0, np.float32)
    if value_dtype == "bfloat16":
        bits = torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(torch.bfloat16).view(torch.int16)
        return bits.numpy().view("<u2"), np.empty(0, np.float32)
    return _quantize_rows(values)


def _quantize_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 codes [T, k] and (hi, step) [T, 2] float32; see the codec comment above."""
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


# float16 -> float32 through a 256 KiB table: a gather is ~3x faster than numpy's own conversion
_HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def decode_values(stored: np.ndarray, scale: np.ndarray, value_dtype: str) -> np.ndarray:
    """float32 values [T, k] from the values section [T, k] and value_scale [T, 2]."""
    if value_dtype == "float16":
        return _HALF_TO_FLOAT.take(stored.view("<u2"))
    if value_dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    values = scale[:, :1] - stored.astype(np.float32) * scale[:, 1:]
    values[stored == EMPTY_CODE] = -np.inf
    return values
