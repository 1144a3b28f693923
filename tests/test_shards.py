"""Shard format, writer, reader and dataset: round trips, damage detection, fuzzing, ordering."""
from __future__ import annotations

import json
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdfast.cli import main
from kdfast.shards import ShardDataset, ShardError, ShardSampler, ShardWriter, open_shards, verify_shards
from kdfast.shards.format import HEADER_SIZE, SECTIONS, STATE, Header

ENCODINGS = [("float16", "int32"), ("bfloat16", "packed"), ("uint8", "packed"), ("float16", "packed"),
             ("uint8", "int32")]


def random_sequences(rng: np.random.Generator, count: int, vocab: int, k: int, kind: str = "logprobs",
                     lengths=(1, 40)) -> list[tuple[np.ndarray, ...]]:
    """(tokens [L], indices [L, k], values [L, k], tail [L]) like a capture would produce them.

    The distribution lives on at most 512 random ids of the vocabulary, which keeps large
    vocabularies cheap while still exercising every index bit.
    """
    support = np.sort(rng.choice(vocab, min(vocab, 512), replace=False))
    sequences = []
    for _ in range(count):
        length = int(rng.integers(*lengths))
        logits = torch.from_numpy(rng.standard_normal((length, len(support))) * rng.uniform(0.5, 6)).float()
        if kind == "logprobs":
            logprobs = torch.log_softmax(logits, -1)
            values, slots = logprobs.topk(k, -1)
            tail = torch.logsumexp(logprobs.scatter(-1, slots, float("-inf")), -1)
        else:
            probs = torch.softmax(logits, -1)
            values, slots = probs.topk(k, -1)
            values = values / values.sum(-1, keepdim=True)
            tail = torch.full((length,), float("-inf"))
        indices = support[slots.numpy()].astype(np.int32)
        indices[:, -1] = np.where(rng.random(length) < 0.3, -1, indices[:, -1])  # some empty slots
        sequences.append((rng.integers(0, vocab, length).astype(np.int32), indices, values.numpy(), tail.numpy()))
    return sequences


def write_dataset(directory: Path, sequences, *, vocab: int, k: int, **options) -> Path:
    options.setdefault("shard_tokens", 64)
    with ShardWriter(directory, vocab_size=vocab, k=k, **options) as writer:
        for sequence in sequences:
            writer.add(*sequence)
    return directory


def stored_values(values: np.ndarray, indices: np.ndarray, value_dtype: str, kind: str) -> np.ndarray:
    """What the reader must return for float16/bfloat16 storage: the same rounding, empty slots filled."""
    values = np.where(indices < 0, -np.inf if kind == "logprobs" else 0.0, values).astype(np.float32)
    dtype = torch.float16 if value_dtype == "float16" else torch.bfloat16
    return torch.from_numpy(values).to(dtype).float().numpy()


def assert_same_data(shards, sequences, value_dtype: str, kind: str = "logprobs") -> None:
    assert len(shards) == len(sequences)
    for index, (tokens, indices, values, tail) in enumerate(sequences):
        row = shards.read(index)
        np.testing.assert_array_equal(row.tokens, tokens)
        np.testing.assert_array_equal(row.indices, indices)
        np.testing.assert_array_equal(row.tail, tail)
        if value_dtype == "uint8":
            valid = indices >= 0
            step = (values.max(1, initial=-np.inf, where=valid) - values.min(1, initial=np.inf, where=valid)) / 254
            tolerance = np.broadcast_to(step[:, None] / 2 + 1e-5, values.shape)
            assert np.all(np.abs(row.values - values)[valid] <= tolerance[valid])
            assert np.all(np.isneginf(row.values[~valid]))
        else:
            np.testing.assert_array_equal(row.values, stored_values(values, indices, value_dtype, kind))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, list]:
    """A small intact dataset with every section non-empty (17-bit packed ids, uint8 values), >= 3 shards."""
    sequences = random_sequences(np.random.default_rng(1), 9, 70_000, 6, lengths=(8, 24))
    directory = write_dataset(tmp_path_factory.mktemp("pristine") / "ds", sequences, vocab=70_000, k=6,
                              value_dtype="uint8", index_encoding="packed", shard_tokens=40)
    assert len(list(directory.glob("*.kds"))) >= 3
    return directory, sequences


@pytest.fixture
def damaged(pristine, tmp_path) -> Path:
    """A private copy of the pristine dataset to damage."""
    return Path(shutil.copytree(pristine[0], tmp_path / "ds"))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def rewrite_manifest(directory: Path, change) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def with_checksum(header: bytearray) -> bytearray:
    header[248:256] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(header[:248])))
    return header


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value_dtype,index_encoding", ENCODINGS)
@pytest.mark.parametrize("vocab", [300, 70_000, 200_000])
def test_round_trip_every_encoding(tmp_path, value_dtype, index_encoding, vocab):
    sequences = random_sequences(np.random.default_rng(vocab), 7, vocab, 5)
    write_dataset(tmp_path, sequences, vocab=vocab, k=5, value_dtype=value_dtype, index_encoding=index_encoding)
    shards = open_shards(tmp_path)
    assert len(shards.shards) > 1
    shards.verify()
    assert_same_data(shards, sequences, value_dtype)


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16"])
def test_round_trip_probs(tmp_path, value_dtype):
    sequences = random_sequences(np.random.default_rng(2), 5, 50, 7, kind="probs")
    write_dataset(tmp_path, sequences, vocab=50, k=7, kind="probs", value_dtype=value_dtype)
    shards = open_shards(tmp_path)
    assert shards.kind == "probs"
    assert_same_data(shards, sequences, value_dtype, kind="probs")


def test_default_tail_is_missing_log_mass(tmp_path):
    logprobs = torch.log_softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    with ShardWriter(tmp_path, vocab_size=4, k=4) as writer:
        writer.add([0, 1, 2], torch.arange(4).repeat(3, 1), logprobs)  # all mass present
        writer.add([3, 0, 1], torch.tensor([0, 1, -1, -1]).repeat(3, 1), logprobs)  # two slots empty
    shards = open_shards(tmp_path)
    assert np.isneginf(shards.read(0).tail).all()
    expected = np.log1p(-np.exp(logprobs[:, :2].numpy()).sum(-1)).astype(np.float32)
    np.testing.assert_allclose(shards.read(1).tail, expected, rtol=1e-5)


def test_shards_are_cut_by_tokens_and_numbered_in_order(tmp_path):
    sequences = random_sequences(np.random.default_rng(3), 10, 30, 2, lengths=(10, 11))
    write_dataset(tmp_path, sequences, vocab=30, k=2, shard_tokens=25)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["sequences"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.kds" for i in range(4)]
    assert not (tmp_path / STATE).exists()


@pytest.mark.parametrize("bad", [
    dict(tokens=[1, 2], indices=np.zeros((3, 2)), values=np.zeros((3, 2))),  # length mismatch
    dict(tokens=[1, 2], indices=np.zeros((2, 3)), values=np.zeros((2, 3))),  # wrong k
    dict(tokens=[1, 99], indices=np.zeros((2, 2)), values=np.full((2, 2), -1.0)),  # token >= vocab
    dict(tokens=[1, 2], indices=np.full((2, 2), -2), values=np.full((2, 2), -1.0)),  # index < -1
    dict(tokens=[1, 2], indices=np.zeros((2, 2)), values=np.full((2, 2), np.nan)),  # NaN
    dict(tokens=[1, 2], indices=np.zeros((2, 2)), values=np.full((2, 2), 0.5)),  # positive log-prob
    dict(tokens=[], indices=np.zeros((0, 2)), values=np.zeros((0, 2))),  # empty sequence
])
def test_writer_rejects_bad_sequences(tmp_path, bad):
    writer = ShardWriter(tmp_path, vocab_size=10, k=2)
    with pytest.raises(ValueError):
        writer.add(bad["tokens"], bad["indices"], bad["values"])


@pytest.mark.parametrize("options", [dict(k=11), dict(kind="scores"), dict(value_dtype="int8"),
                                     dict(kind="probs", value_dtype="uint8"), dict(capture_temperature=0.0),
                                     dict(index_encoding="varint"), dict(metadata={"shards": 1})])
def test_writer_rejects_bad_options(tmp_path, options):
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, **{"vocab_size": 10, "k": 2, **options})


def test_writer_refuses_foreign_or_complete_directories(pristine, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        ShardWriter(tmp_path, vocab_size=10, k=2)
    with pytest.raises(ValueError, match="complete"):
        ShardWriter(pristine[0], vocab_size=70_000, k=6, value_dtype="uint8", index_encoding="packed")


def test_writer_resumes_after_last_finished_shard(tmp_path):
    sequences = random_sequences(np.random.default_rng(4), 8, 40, 3, lengths=(5, 6))
    writer = ShardWriter(tmp_path / "a", vocab_size=40, k=3, shard_tokens=10)
    for sequence in sequences[:5]:
        writer.add(*sequence)  # two finished shards, one sequence pending, then a "crash"
    writer.close()  # what a crash does to the writer's directory lock
    (tmp_path / "a" / "shard-00002.kds.tmp").write_bytes(b"half a shard")
    resumed = ShardWriter(tmp_path / "a", vocab_size=40, k=3, shard_tokens=10, resume=True)
    assert resumed.num_sequences == 4
    with resumed:
        for sequence in sequences[4:]:
            resumed.add(*sequence)
    write_dataset(tmp_path / "b", sequences, vocab=40, k=3, shard_tokens=10)
    for name in ["shard-00000.kds", "shard-00001.kds", "shard-00002.kds", "shard-00003.kds"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))
    with pytest.raises(ValueError, match="k: stored 3, requested 4"):
        ShardWriter(tmp_path / "a", vocab_size=40, k=4, shard_tokens=10, resume=True)


def test_writer_resumes_from_a_kill_at_any_file_operation(tmp_path):
    """Leftovers of a kill while writing capture.json, the manifest, or just after the manifest."""
    sequences = random_sequences(np.random.default_rng(6), 3, 40, 3, lengths=(5, 6))
    options = dict(vocab_size=40, k=3, shard_tokens=10)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "capture.json.tmp").write_text("{")
    with ShardWriter(tmp_path / "a", resume=True, **options) as writer:
        for sequence in sequences:
            writer.add(*sequence)
    write_dataset(tmp_path / "b", sequences, vocab=40, k=3, shard_tokens=10)
    (tmp_path / "b" / "manifest.json").rename(tmp_path / "b" / "manifest.json.tmp")
    (tmp_path / "b" / STATE).write_text((tmp_path / "a" / "manifest.json").read_text())
    finished = ShardWriter(tmp_path / "b", resume=True, **options)
    assert finished.num_sequences == 3
    finished.finish()
    assert shard_bytes_and_manifest(tmp_path / "a") == shard_bytes_and_manifest(tmp_path / "b")
    (tmp_path / "b" / STATE).write_text("{}")
    assert ShardWriter(tmp_path / "b", resume=True, **options).complete
    assert not (tmp_path / "b" / STATE).exists()


def shard_bytes_and_manifest(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --- damage: each case names the file and the problem ---------------------------------------------


def shard_path(directory: Path, index: int = 1) -> Path:
    return directory / f"shard-{index:05d}.kds"


def test_intact_dataset_opens_and_verifies(pristine):
    directory, sequences = pristine
    shards = open_shards(directory)
    shards.verify()
    assert verify_shards(directory) == []
    assert_same_data(shards, sequences, "uint8")


def test_truncated_shard(damaged):
    path = shard_path(damaged)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match="shard-00001.kds: file has .* bytes, the manifest says"):
        open_shards(damaged)


def test_truncated_shard_with_matching_manifest(damaged):
    path = shard_path(damaged)
    path.write_bytes(path.read_bytes()[:-100])
    rewrite_manifest(damaged, lambda m: m["shards"][1].update(bytes=path.stat().st_size))
    with pytest.raises(ShardError, match="shard-00001.kds: truncated: header describes"):
        open_shards(damaged)


@pytest.mark.parametrize("section", SECTIONS)
def test_flipped_byte_in_each_section_fails_verify(damaged, section):
    path = shard_path(damaged)
    offset, length, _ = Header.unpack(path.read_bytes()[:HEADER_SIZE], path).sections[section]
    assert length > 0
    flip_byte(path, offset + length // 2)
    open_shards(damaged)  # open is O(1): it does not read data sections
    with pytest.raises(ShardError, match=f"shard-00001.kds: {section} section checksum mismatch"):
        open_shards(damaged).verify()
    with pytest.raises(ShardError, match=f"{section} section checksum mismatch"):
        ShardDataset(damaged, verify=True)
    errors = verify_shards(damaged)
    assert len(errors) == 1 and section in str(errors[0])


@pytest.mark.parametrize("offset,problem", [(0, "bad magic"), (20, "header checksum mismatch"),
                                            (120, "header checksum mismatch"), (250, "header checksum mismatch"),
                                            (-3, "footer"), (-12, "footer magic")])
def test_flipped_byte_in_header_or_footer_fails_open(damaged, offset, problem):
    path = shard_path(damaged)
    flip_byte(path, offset % path.stat().st_size)
    with pytest.raises(ShardError, match=f"shard-00001.kds: .*{problem}"):
        open_shards(damaged)


def test_flipped_padding_byte_fails_verify(damaged):
    flip_byte(shard_path(damaged), 1000)
    with pytest.raises(ShardError, match="nonzero padding"):
        open_shards(damaged).verify()


def test_damaged_ids_never_reach_the_caller(damaged):
    """Without verify, a read still refuses out-of-range ids instead of returning them."""
    path = shard_path(damaged, 0)
    offset, length, _ = Header.unpack(path.read_bytes()[:HEADER_SIZE], path).sections["index_high"]
    data = bytearray(path.read_bytes())
    data[offset:offset + length] = b"\xff" * length  # bit 16 of every id set: most ids leave the vocabulary
    path.write_bytes(bytes(data))
    shards = open_shards(damaged, verify_reads=False)  # checksums would catch it first
    with pytest.raises(ShardError, match="teacher indices outside"):
        for index in range(shards.shards[0].header.num_sequences):
            shards.read(index)


def test_missing_shard(damaged):
    shard_path(damaged, 2).unlink()
    with pytest.raises(ShardError, match="shard-00002.kds: missing shard file"):
        open_shards(damaged)


def test_missing_manifest_during_capture(damaged):
    (damaged / "manifest.json").unlink()
    (damaged / STATE).write_text("{}")
    with pytest.raises(ShardError, match="capture in progress or interrupted"):
        open_shards(damaged)
    (damaged / STATE).unlink()
    with pytest.raises(ShardError, match="incomplete"):
        open_shards(damaged)


def test_not_a_dataset(tmp_path):
    with pytest.raises(ShardError, match="not a kdfast shard dataset"):
        open_shards(tmp_path)
    with pytest.raises(ShardError, match="not a directory"):
        open_shards(tmp_path / "nothing")


@pytest.mark.parametrize("change,problem", [
    (lambda m: m["shards"][0].update(bytes=m["shards"][0]["bytes"] + 4096), "the manifest says"),
    (lambda m: m["shards"][0].update(tokens=m["shards"][0]["tokens"] + 1), "sequences / .* tokens"),
    (lambda m: (m["shards"][0].update(tokens=m["shards"][0]["tokens"] + 1), m.update(num_tokens=m["num_tokens"] + 1)),
     "header tokens is"),
    (lambda m: m["shards"][1].update(sequences=m["shards"][1]["sequences"] + 1), "breaks the sequence of shards"),
    (lambda m: m.update(k=7), "header k is"),
    (lambda m: m.update(capture_temperature=2.0), "header capture_temperature"),
    (lambda m: m["shards"][0].update(checksum="0" * 16), "header checksum is"),
    (lambda m: m.update(format_version=3), "unsupported format version 3"),
    (lambda m: m.update(format="other"), "format is 'other'"),
    (lambda m: m.update(value_dtype="float8"), "value_dtype is 'float8'"),
    (lambda m: m["shards"].reverse(), "breaks the sequence of shards"),
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), "breaks the sequence of shards"),
    (lambda m: m.pop("k"), "field 'k' missing"),
])
def test_manifest_that_lies(damaged, change, problem):
    rewrite_manifest(damaged, change)
    with pytest.raises(ShardError, match=problem):
        open_shards(damaged)


@pytest.mark.parametrize("field,value,problem", [(8, 3, "unsupported format version 3"), (12, 512, "header size"),
                                                 (60, 9, "lists 9 sections"), (56, 7, "unknown encoding code"),
                                                 (40, 5, "implausible counts")])
def test_header_fields_with_valid_checksum(damaged, field, value, problem):
    path = shard_path(damaged)
    data = bytearray(path.read_bytes())
    data[field:field + 4] = struct.pack("<I", value)
    path.write_bytes(bytes(with_checksum(data[:HEADER_SIZE]) + data[HEADER_SIZE:]))
    with pytest.raises(ShardError, match=f"shard-00001.kds: .*{problem}"):
        open_shards(damaged)


def test_wrong_magic(damaged):
    path = shard_path(damaged)
    path.write_bytes(b"NOTSHARD" + path.read_bytes()[8:])
    with pytest.raises(ShardError, match="bad magic b'NOTSHARD'"):
        open_shards(damaged)


def test_vocab_mismatch_with_student(pristine):
    with pytest.raises(ShardError, match="teacher vocabulary has 70000 entries, the student's has 32000"):
        open_shards(pristine[0], vocab_size=32_000)
    with pytest.raises(ShardError, match="the student's has 70001"):
        ShardDataset(pristine[0], vocab_size=70_001)
    assert open_shards(pristine[0], vocab_size=70_000).vocab_size == 70_000


def test_verify_reports_every_damaged_file(damaged, capsys):
    flip_byte(shard_path(damaged, 0), HEADER_SIZE + 4096 + 10)
    flip_byte(shard_path(damaged, 2), 30)
    errors = verify_shards(damaged)
    assert [Path(e.path).name for e in errors] == ["shard-00000.kds", "shard-00002.kds"]
    assert main(["verify", str(damaged), "--no-progress"]) == 1
    assert "2 problem(s)" in capsys.readouterr().err


def test_cli_verify_and_inspect_intact(pristine, capsys):
    assert main(["verify", str(pristine[0]), "--no-progress"]) == 0
    assert "OK (" in capsys.readouterr().out
    assert main(["inspect", str(pristine[0]), "--position", "2"]) == 0
    out = capsys.readouterr().out
    for expected in ["vocab        70000", "k            6", "kind         logprobs", "bytes/token", "rank"]:
        assert expected in out
    assert main(["verify", str(pristine[0]), "--vocab-size", "5"]) == 1


# --- fuzzing: the reader only ever raises ShardError ----------------------------------------------

# (offset, size) of every header field that is not the magic or the checksum
HEADER_FIELDS = [(8, 4), (12, 4), (16, 8), (24, 8), (32, 8), (40, 4), (44, 4), (48, 8), (56, 1), (57, 1), (58, 1),
                 (59, 1), (60, 4)] + [(64 + 8 * i, 8) for i in range(21)] + [(232, 8), (240, 8)]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def read_everything_or_shard_error(directory: Path, sequences) -> None:
    """Open, read every sequence, verify: any failure must be a ShardError; success means intact data."""
    try:
        shards = open_shards(directory)
        rows = [shards.read(i) for i in range(len(shards))]
        shards.verify()
    except ShardError:
        return
    assert len(rows) == len(sequences)
    for row, (tokens, indices, _, tail) in zip(rows, sequences):
        np.testing.assert_array_equal(row.tokens, tokens)
        np.testing.assert_array_equal(row.indices, indices)
        np.testing.assert_array_equal(row.tail, tail)


def fuzzed_copy(pristine: Path, target: Path, shard: bytes | None = None, manifest: dict | None = None) -> None:
    shutil.copytree(pristine, target)
    if shard is not None:
        shard_path(target).write_bytes(shard)
    if manifest is not None:
        (target / "manifest.json").write_text(json.dumps(manifest))


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(HEADER_FIELDS), st.integers(0, 2**64 - 1), st.booleans()),
                        min_size=1, max_size=4),
       fix_checksum=st.booleans(), sync_manifest=st.booleans())
def test_fuzz_header_fields(pristine, changes, fix_checksum, sync_manifest):
    """Fields set to random values, or nudged by a few units (near-valid headers reach deeper checks)."""
    directory, sequences = pristine
    data = bytearray(shard_path(directory).read_bytes())
    for (offset, size), value, nudge in changes:
        if nudge:
            value = int.from_bytes(data[offset:offset + size], "little") + value % 9 - 4
        data[offset:offset + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
    if fix_checksum:
        data[:HEADER_SIZE] = with_checksum(data[:HEADER_SIZE])
    manifest = json.loads((directory / "manifest.json").read_text())
    if sync_manifest:
        manifest["shards"][1]["checksum"] = f"{struct.unpack('<Q', bytes(data[248:256]))[0]:016x}"
    with tempfile.TemporaryDirectory() as tmp:
        fuzzed_copy(directory, Path(tmp) / "ds", bytes(data), manifest)
        read_everything_or_shard_error(Path(tmp) / "ds", sequences)


@FUZZ
@given(body=st.binary(max_size=12_000), keep_header=st.booleans(), fix_size=st.booleans())
def test_fuzz_random_files(pristine, body, keep_header, fix_size):
    directory, sequences = pristine
    original = shard_path(directory).read_bytes()
    data = (original[:HEADER_SIZE] + body) if keep_header else body
    manifest = json.loads((directory / "manifest.json").read_text())
    if fix_size:
        manifest["shards"][1]["bytes"] = len(data)
    with tempfile.TemporaryDirectory() as tmp:
        fuzzed_copy(directory, Path(tmp) / "ds", data, manifest)
        read_everything_or_shard_error(Path(tmp) / "ds", sequences)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)


@FUZZ
@given(key=st.sampled_from(["format", "format_version", "kind", "vocab_size", "k", "value_dtype", "index_dtype",
                            "index_encoding", "index_bits", "capture_temperature", "num_sequences", "num_tokens",
                            "shards", "shards.file", "shards.first_sequence", "shards.sequences", "shards.tokens",
                            "shards.bytes", "shards.checksum", "shards.entry", "whole"]),
       value=JSON)
def test_fuzz_manifest(pristine, key, value):
    directory, sequences = pristine
    manifest = json.loads((directory / "manifest.json").read_text())
    if key == "whole":
        manifest = value
    elif key == "shards.entry":
        manifest["shards"][1] = value
    elif key.startswith("shards."):
        manifest["shards"][1][key.split(".")[1]] = value
    else:
        manifest[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        fuzzed_copy(directory, Path(tmp) / "ds", manifest=manifest)
        read_everything_or_shard_error(Path(tmp) / "ds", sequences)


# --- dataset: alignment, order, ranks, resume, workers ---------------------------------------------


def test_dataset_sample_alignment_and_types(pristine):
    directory, sequences = pristine
    dataset = ShardDataset(directory, shuffle=False)
    sample = dataset[4]
    tokens, indices, _, tail = sequences[4]
    length = len(tokens)
    assert sample["input_ids"].dtype == torch.int64 and sample["labels"].dtype == torch.int64
    assert sample["teacher_indices"].dtype == torch.int32 and sample["teacher_values"].dtype == torch.float32
    assert sample["teacher_indices"].shape == (length, 6) and sample["teacher_tail"].shape == (length,)
    assert sample["input_ids"].tolist() == tokens.tolist()
    assert sample["labels"].tolist() == tokens[1:].tolist() + [-100]
    assert sample["teacher_indices"].tolist() == indices.tolist()
    assert torch.equal(sample["teacher_tail"], torch.from_numpy(tail))
    wide = ShardDataset(directory, index_dtype=torch.int64, values_dtype=torch.float16)[4]
    assert wide["teacher_indices"].dtype == torch.int64 and wide["teacher_values"].dtype == torch.float16


def test_dataset_returns_stored_half_values_exactly(tmp_path):
    sequences = random_sequences(np.random.default_rng(5), 3, 100, 4)
    write_dataset(tmp_path, sequences, vocab=100, k=4, value_dtype="bfloat16")
    sample = ShardDataset(tmp_path, shuffle=False, values_dtype=torch.bfloat16)[1]
    tokens, indices, values, _ = sequences[1]
    expected = torch.from_numpy(np.where(indices < 0, -np.inf, values).astype(np.float32)).bfloat16()
    assert torch.equal(sample["teacher_values"], expected)


def test_order_is_a_pure_function_of_seed_and_epoch():
    a, b = ShardSampler(50, seed=3), ShardSampler(50, seed=3)
    assert np.array_equal(a.order(0), b.order(0))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), ShardSampler(50, seed=4).order(0))
    assert sorted(a.order(2).tolist()) == list(range(50))
    assert ShardSampler(50, shuffle=False).order(7).tolist() == list(range(50))


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_ranks_never_share_a_sample(world_size):
    orders = [ShardSampler(50, seed=1, rank=r, world_size=world_size).order(2) for r in range(world_size)]
    assert {len(o) for o in orders} == {50 // world_size}
    together = np.concatenate(orders)
    assert len(set(together.tolist())) == len(together)


def test_resume_from_consumed_count():
    full = ShardSampler(20, seed=9, rank=1, world_size=2)
    first_epoch, second_epoch = list(full), list(full)
    assert first_epoch == full.order(0).tolist() and second_epoch == full.order(1).tolist()
    assert list(ShardSampler(20, seed=9, rank=1, world_size=2, consumed=4)) == first_epoch[4:]
    resumed = ShardSampler(20, seed=9, rank=1, world_size=2, consumed=13)
    assert resumed.epoch == 1 and len(resumed) == 7
    assert list(resumed) == second_epoch[3:]
    with pytest.raises(ValueError):
        ShardSampler(3, world_size=4)
    with pytest.raises(ValueError):
        ShardSampler(30, rank=2, world_size=2)


def test_dataloader_workers_give_the_same_batches(pristine):
    directory, _ = pristine
    dataset = ShardDataset(directory, seed=5, consumed=2)
    expected = [dataset[i] for i in dataset.sampler.order(0)[2:]]
    assert len(pickle.dumps(dataset)) < 20_000  # paths and headers, no mapped data
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=dataset.sampler, num_workers=2,
                                         collate_fn=lambda batch: batch[0])
    got = list(loader)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert dataset.sampler.consumed == len(dataset)  # the next pass over the loader is epoch 1


def test_iterating_the_dataset_follows_its_sampler(pristine):
    dataset = ShardDataset(pristine[0], seed=1, rank=1, world_size=2)
    ids = [sample["input_ids"].tolist() for sample in dataset]
    assert ids == [dataset[i]["input_ids"].tolist() for i in dataset.sampler.order(0)]
