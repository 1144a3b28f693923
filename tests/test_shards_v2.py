"""Format version 2: loss masks and variable lengths round-trip; version-1 datasets read as before.

The version-1 fixtures in tests/data/ were written by the landed version-1 code (commit 1715d11,
``tests/data/make_shards_v1.py``), together with what that code read back from them (the .npz files).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfast.shards import ShardDataset, ShardError, ShardWriter, open_shards, verify_shards
from kdfast.shards.format import HEADER_SIZE, STATE, Header
from tests.test_shards import flip_byte, random_sequences

DATA = Path(__file__).parent / "data"
V1_FIXTURES = ["uint8-packed", "float16-int32-probs"]


def masked_sequences(rng: np.random.Generator, count: int, vocab: int, k: int, learned: float, lengths=(8, 40)):
    """(tokens, mask, targets for the learned positions only) with ~``learned`` of the positions learned."""
    out = []
    for tokens, indices, values, tail in random_sequences(rng, count, vocab, k, lengths=lengths):
        mask = rng.random(len(tokens)) < learned
        mask[rng.integers(len(tokens))] = True  # at least one learned position
        out.append((tokens, mask, indices[mask], values[mask], tail[mask]))
    return out


def write_masked(directory: Path, sequences, *, vocab: int, k: int, **options) -> Path:
    options.setdefault("shard_tokens", 100)
    with ShardWriter(directory, vocab_size=vocab, k=k, **options) as writer:
        for tokens, mask, indices, values, tail in sequences:
            writer.add(tokens, indices, values, tail, mask=mask)
    return directory


# --- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_dtype,index_encoding", [("float16", "int32"), ("uint8", "packed")])
def test_masked_sequences_round_trip(tmp_path, value_dtype, index_encoding):
    sequences = masked_sequences(np.random.default_rng(0), 12, 70_000, 5, learned=0.3)
    write_masked(tmp_path, sequences, vocab=70_000, k=5, value_dtype=value_dtype, index_encoding=index_encoding)
    shards = open_shards(tmp_path)
    assert len(shards.shards) > 1 and shards.format_version == 2
    shards.verify()
    assert shards.total_tokens == sum(len(s[0]) for s in sequences)
    assert shards.learned_tokens == sum(int(s[1].sum()) for s in sequences)
    dataset = ShardDataset(tmp_path, shuffle=False)
    for index, (tokens, mask, indices, values, tail) in enumerate(sequences):
        row = shards.read(index)
        np.testing.assert_array_equal(row.tokens, tokens)
        np.testing.assert_array_equal(row.mask, mask)
        np.testing.assert_array_equal(row.indices[mask], indices)
        np.testing.assert_array_equal(row.tail[mask], tail)
        assert (row.indices[~mask] == -1).all() and np.isneginf(row.values[~mask]).all()
        assert np.isneginf(row.tail[~mask]).all()
        if value_dtype == "float16":
            stored = torch.from_numpy(np.where(indices < 0, -np.inf, values).astype(np.float32)).half().float()
            np.testing.assert_array_equal(row.values[mask], stored.numpy())
        sample = dataset[index]
        expected = np.where(mask[:-1], tokens[1:], -100).tolist() + [-100]
        assert sample["labels"].tolist() == expected
        assert sample["input_ids"].tolist() == tokens.tolist()
        assert sample["teacher_indices"].shape == (len(tokens), 5)


def test_full_length_targets_with_a_mask_store_only_learned_rows(tmp_path):
    (tokens, indices, values, tail), = random_sequences(np.random.default_rng(1), 1, 50, 3, lengths=(20, 21))
    mask = np.arange(20) % 3 == 0
    with ShardWriter(tmp_path / "full", vocab_size=50, k=3) as writer:
        writer.add(tokens, indices, values, tail, mask=mask)  # [L, k]: rows not learned are dropped
    with ShardWriter(tmp_path / "rows", vocab_size=50, k=3) as writer:
        writer.add(tokens, indices[mask], values[mask], tail[mask], mask=torch.from_numpy(mask))
    assert (tmp_path / "full" / "shard-00000.kds").read_bytes() == (tmp_path / "rows" / "shard-00000.kds").read_bytes()
    assert open_shards(tmp_path / "full").learned_tokens == 7


def test_bytes_are_about_proportional_to_learned_tokens(tmp_path):
    full_sequences = random_sequences(np.random.default_rng(2), 40, 30_000, 16, lengths=(180, 220))
    masks = [np.random.default_rng(i).random(len(s[0])) < 0.3 for i, s in enumerate(full_sequences)]
    with ShardWriter(tmp_path / "full", vocab_size=30_000, k=16) as full, \
            ShardWriter(tmp_path / "masked", vocab_size=30_000, k=16) as masked:
        for sequence, mask in zip(full_sequences, masks):
            full.add(*sequence)
            masked.add(*sequence, mask=mask)
    masked, full = open_shards(tmp_path / "masked"), open_shards(tmp_path / "full")
    header = masked.shards[0].header
    for name, row in [("indices", 64), ("values", 32), ("tail", 4), ("tokens", 4), ("mask", 1)]:
        rows = header.num_tokens if name in ("tokens", "mask") else header.num_learned
        assert header.sections[name][1] == rows * row
    ratio = masked.learned_tokens / masked.total_tokens
    assert 0.25 < ratio < 0.4
    assert masked.nbytes < (ratio + 0.1) * full.nbytes  # 5 bytes per token + targets for learned ones


@pytest.mark.parametrize("mask,problem", [
    (np.zeros(4, bool), "no learned position"),
    (np.ones(5, bool), r"mask must be \[4\]"),
    (np.array([0, 1, 2, 1]), "mask must be"),
])
def test_writer_rejects_bad_masks(tmp_path, mask, problem):
    with pytest.raises(ValueError, match=problem):
        ShardWriter(tmp_path, vocab_size=10, k=2).add([1, 2, 3, 4], np.zeros((4, 2)), np.full((4, 2), -1.0), mask=mask)


def test_writer_rejects_targets_that_match_neither_length(tmp_path):
    writer = ShardWriter(tmp_path, vocab_size=10, k=2)
    with pytest.raises(ValueError, match=r"\[2, 2\] \(learned positions\) or \[4, 2\]"):
        writer.add([1, 2, 3, 4], np.zeros((3, 2)), np.full((3, 2), -1.0), mask=[1, 0, 1, 0])


# --- version 1 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", V1_FIXTURES)
def test_version_1_datasets_open_verify_and_read_as_before(name):
    directory = DATA / f"shards-v1-{name}"
    expected = np.load(DATA / f"shards-v1-{name}.npz")
    shards = open_shards(directory, verify=True)
    assert verify_shards(directory) == []
    assert shards.format_version == 1 and shards.learned_tokens == shards.total_tokens
    dataset = ShardDataset(directory, shuffle=False)
    for index in range(len(shards)):
        row = shards.read(index)
        for field in ("tokens", "indices", "values", "tail"):
            got, want = getattr(row, field), expected[f"{index}.{field}"]
            assert got.dtype == want.dtype and np.array_equal(got, want), field
        assert row.mask.all()
        for key, value in dataset[index].items():
            want = expected[f"{index}.dataset.{key}"]
            assert value.numpy().dtype == want.dtype and np.array_equal(value.numpy(), want), key


def test_version_1_reads_check_whole_section_checksums(tmp_path):
    """v1 has no per-sequence checksums: a verified read checks the shard's sections once, first."""
    directory = Path(shutil.copytree(DATA / "shards-v1-uint8-packed", tmp_path / "ds"))
    path = directory / "shard-00001.kds"
    offset, length, _ = Header.unpack(path.read_bytes()[:HEADER_SIZE], path).sections["values"]
    flip_byte(path, offset + 1)  # a uint8 code stays a valid code: range checks cannot see it
    first = open_shards(directory).shards[0].header.num_sequences
    open_shards(directory, verify_reads=False).read(first)  # the documented v1 limit without checksums
    with pytest.raises(ShardError, match="shard-00001.kds: sequence .*: values section checksum mismatch") as error:
        ShardDataset(directory, shuffle=False)[len(open_shards(directory)) - 1]
    assert error.value.section == "values"


def test_version_1_manifest_metadata_is_checked_when_present(tmp_path):
    directory = Path(shutil.copytree(DATA / "shards-v1-float16-int32-probs", tmp_path / "ds"))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["teacher"] = "a string"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="manifest.json: manifest: field 'teacher' missing or not a object or null"):
        open_shards(directory)


def test_writer_leaves_complete_version_1_data_and_refuses_to_extend_it(tmp_path):
    directory = Path(shutil.copytree(DATA / "shards-v1-uint8-packed", tmp_path / "ds"))
    options = dict(vocab_size=70_000, k=4, value_dtype="uint8", index_encoding="packed", shard_tokens=24)
    assert ShardWriter(directory, resume=True, **options).complete
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").unlink()
    (directory / STATE).write_text(json.dumps({k: v for k, v in manifest.items() if k not in
                                               ("format", "num_sequences", "num_tokens", "shards")}))
    with pytest.raises(ValueError, match="interrupted capture in format version 1; this kdfast writes version 2"):
        ShardWriter(directory, resume=True, **options)
