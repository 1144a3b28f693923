"""Shards that protect themselves: verified reads, no signal from a file changed under a reader,
hostile manifests, one writer per directory, clear write errors."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import kdfast
import kdfast.shards.reader as reader
from kdfast.shards import ShardDataset, ShardError, ShardWriter, open_shards, verify_shards
from kdfast.shards.format import HEADER_SIZE, LOCK, SECTIONS, STATE, Header, IndexRecord, row_bytes
from tests.test_shards import flip_byte, random_sequences, rewrite_manifest, shard_path, write_dataset

REPO = Path(kdfast.__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Every v2 section non-empty (17-bit packed ids, uint8 values), some positions not learned, 3+ shards."""
    directory = tmp_path_factory.mktemp("pristine") / "ds"
    sequences = random_sequences(np.random.default_rng(7), 9, 70_000, 6, lengths=(8, 24))
    with ShardWriter(directory, vocab_size=70_000, k=6, value_dtype="uint8", index_encoding="packed",
                     shard_tokens=40) as writer:
        for i, sequence in enumerate(sequences):
            writer.add(*sequence, mask=np.arange(len(sequence[0])) % 4 != i % 4)
    assert len(list(directory.glob("*.kds"))) >= 3
    return directory


@pytest.fixture
def damaged(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ds"))


def sequence_at(path: Path, section: str, offset: int) -> int:
    """Global index of the sequence whose bytes of ``section`` include file offset ``offset``."""
    header = Header.unpack(path.read_bytes()[:HEADER_SIZE], path)
    start = header.sections[section][0]
    if section == "index":
        return header.first_sequence + (offset - start) // IndexRecord.SIZE
    row = (offset - start) // row_bytes(header.k, header.value_dtype, header.index_encoding, header.index_bits)[section]
    index = np.frombuffer(path.read_bytes(), "<u8", count=header.num_sequences * 12,
                          offset=header.sections["index"][0]).reshape(-1, 12)
    column = 0 if section in ("tokens", "mask") else 2
    local = int(np.searchsorted(index[:, column + 1], row, side="right"))
    return header.first_sequence + local


# --- verified reads ------------------------------------------------------------------------------


@pytest.mark.parametrize("section", SECTIONS)
def test_a_flipped_byte_in_any_section_fails_the_read_of_its_sequence(damaged, section):
    path = shard_path(damaged)
    offset, length, _ = Header.unpack(path.read_bytes()[:HEADER_SIZE], path).sections[section]
    flip_byte(path, offset + length // 2)
    victim = sequence_at(path, section, offset + length // 2)
    dataset = ShardDataset(damaged, shuffle=False)
    with pytest.raises(ShardError, match=f"shard-00001.kds: sequence {victim} .*{section} section checksum mismatch"
                       ) as error:
        dataset[victim]
    assert (Path(error.value.path).name, error.value.sequence, error.value.section) == ("shard-00001.kds", victim,
                                                                                         section)
    first = dataset.shards.shards[1].header.first_sequence
    for index in range(len(dataset)):  # each read checks what it returns, and only that
        if index != victim:
            dataset[index]
    assert victim >= first


def test_a_damaged_worker_read_reaches_the_main_process_as_shard_error(damaged):
    path = shard_path(damaged)
    offset, length, _ = Header.unpack(path.read_bytes()[:HEADER_SIZE], path).sections["values"]
    flip_byte(path, offset + 3)
    dataset = ShardDataset(damaged, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
    with pytest.raises(ShardError, match="shard-00001.kds: sequence .*values section checksum mismatch"):
        list(loader)


TRUNCATE_WHILE_OPEN = """
import os, sys
from kdfast.shards import ShardDataset, ShardError, open_shards
directory, mode = sys.argv[1], sys.argv[2]
dataset = ShardDataset(directory, shuffle=False)
dataset[0]  # the shard files are open now
target = os.path.join(directory, "shard-00000.kds")
size = os.path.getsize(target)
if mode == "truncate":
    os.truncate(target, size // 2)
else:  # rewrite in place with other bytes of the same size, as cp over it or rsync --inplace would
    with open(target, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(size - 4096 - 16))
failures = 0
for index in range(len(dataset)):
    try:
        dataset[index]
    except ShardError as e:
        failures += 1
        assert e.sequence == index and "shard-00000.kds" in str(e), e
try:
    dataset.shards.verify()
except ShardError:
    failures += 1
print("shard errors", failures)
"""


@pytest.mark.parametrize("mode", ["truncate", "rewrite"])
@pytest.mark.parametrize("fixture", ["v2", "v1"])
def test_a_shard_changed_under_an_open_reader_gives_shard_error_not_a_signal(pristine, tmp_path, mode, fixture):
    source = pristine if fixture == "v2" else REPO / "tests" / "data" / "shards-v1-uint8-packed"
    directory = shutil.copytree(source, tmp_path / "ds")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", TRUNCATE_WHILE_OPEN, str(directory), mode], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode} (SIGBUS is -{signal.SIGBUS}): {run.stderr[-2000:]}"
    assert int(run.stdout.split()[-1]) >= 2  # at least one read of shard 0, and verify


# --- hostile manifests ---------------------------------------------------------------------------


def test_manifest_that_is_a_device(damaged):
    (damaged / "manifest.json").unlink()
    (damaged / "manifest.json").symlink_to("/dev/zero")
    with pytest.raises(ShardError, match="manifest.json: not a regular file"):
        open_shards(damaged)
    assert "not a regular file" in str(verify_shards(damaged)[0])


def test_manifest_that_is_a_fifo_does_not_hang(damaged):
    (damaged / "manifest.json").unlink()
    os.mkfifo(damaged / "manifest.json")
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(verify_shards(damaged)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "verify_shards blocked on a FIFO manifest"
    assert "manifest.json: not a regular file" in str(outcome[0][0])


def test_manifest_that_is_a_directory_or_too_large(damaged, monkeypatch):
    monkeypatch.setattr(reader, "MAX_JSON_BYTES", 100)
    with pytest.raises(ShardError, match=r"manifest.json: \d+ bytes, over the 100-byte limit"):
        open_shards(damaged)
    monkeypatch.undo()
    (damaged / "manifest.json").unlink()
    (damaged / "manifest.json").mkdir()
    with pytest.raises(ShardError, match="manifest.json: not a regular file"):
        open_shards(damaged)


@pytest.mark.parametrize("depth", [100_000, 40])
def test_deeply_nested_manifest(damaged, depth):
    (damaged / "manifest.json").write_text('{"format": "kdfast-shards", "teacher": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ShardError, match="manifest.json: JSON nested"):
        open_shards(damaged)


MANIFEST_FIELDS = ["format", "format_version", "kind", "vocab_size", "k", "value_dtype", "index_dtype",
                   "index_encoding", "index_bits", "capture_temperature", "num_sequences", "num_tokens", "num_learned",
                   "shard_tokens", "teacher", "tokenizer", "source", "capture", "shards"]
ENTRY_FIELDS = ["file", "first_sequence", "sequences", "tokens", "learned", "bytes", "checksum"]


@pytest.mark.parametrize("field", MANIFEST_FIELDS + [f"shards.{name}" for name in ENTRY_FIELDS])
def test_every_documented_manifest_field_is_required(damaged, field):
    def drop(manifest):
        if field.startswith("shards."):
            del manifest["shards"][1][field.split(".")[1]]
        else:
            del manifest[field]
    rewrite_manifest(damaged, drop)
    with pytest.raises(ShardError, match=f"manifest.json: .*{field.split('.')[-1]}"):
        open_shards(damaged)


@pytest.mark.parametrize("field,value", [("teacher", "llama"), ("tokenizer", 3), ("source", []), ("capture", True),
                                         ("shard_tokens", 0), ("num_learned", 1.5)])
def test_manifest_field_types_are_checked(damaged, field, value):
    rewrite_manifest(damaged, lambda m: m.update({field: value}))
    with pytest.raises(ShardError, match=f"manifest.json: .*{field}"):
        open_shards(damaged)


# --- one writer ----------------------------------------------------------------------------------

HOLD_THE_LOCK = """
import sys
import numpy as np
from kdfast.shards import ShardWriter
writer = ShardWriter(sys.argv[1], vocab_size=10, k=2, shard_tokens=100, resume=True)
print("locked", flush=True)
sys.stdin.readline()
writer.add([1, 2, 3], np.zeros((3, 2)), np.full((3, 2), -1.0))
writer.finish()
"""


def hold_the_lock(directory: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(directory)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_writer_refuses_at_once_naming_the_holder(tmp_path):
    holder = hold_the_lock(tmp_path / "ds")
    try:
        with pytest.raises(ShardError, match=f"ds: another writer \\(pid {holder.pid}\\) is writing into this"):
            ShardWriter(tmp_path / "ds", vocab_size=10, k=2, shard_tokens=100, resume=True)
    finally:
        holder.communicate("go\n", timeout=60)
    assert holder.returncode == 0
    assert ShardWriter(tmp_path / "ds", vocab_size=10, k=2, shard_tokens=100, resume=True).complete
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["manifest.json", "shard-00000.kds"]


def test_a_killed_writer_leaves_the_directory_unlocked(tmp_path):
    holder = hold_the_lock(tmp_path / "ds")
    holder.kill()
    holder.wait(timeout=60)
    with ShardWriter(tmp_path / "ds", vocab_size=10, k=2, shard_tokens=100, resume=True) as writer:
        writer.add([4, 5], np.zeros((2, 2)), np.full((2, 2), -1.0))
    assert len(open_shards(tmp_path / "ds")) == 1


def test_one_writer_per_directory_within_a_process(tmp_path):
    first = ShardWriter(tmp_path, vocab_size=10, k=2)
    with pytest.raises(ShardError, match=f"pid {os.getpid()}, this process"):
        ShardWriter(tmp_path, vocab_size=10, k=2, resume=True)
    first.close()
    with pytest.raises(ValueError, match="was closed"):
        first.add([1], np.zeros((1, 2)), np.full((1, 2), -1.0))
    with ShardWriter(tmp_path, vocab_size=10, k=2, resume=True) as second:
        second.add([1], np.zeros((1, 2)), np.full((1, 2), -1.0))
    assert not (tmp_path / LOCK).exists()


# --- write errors --------------------------------------------------------------------------------


def failing_fsync(suffix: str):
    """os.fsync that fails with ENOSPC for files whose name ends in ``suffix``."""
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    return fsync


def test_disk_full_while_writing_a_shard(tmp_path, monkeypatch):
    sequences = random_sequences(np.random.default_rng(3), 6, 40, 3, lengths=(5, 6))
    writer = ShardWriter(tmp_path / "a", vocab_size=40, k=3, shard_tokens=10)
    writer.add(*sequences[0])
    monkeypatch.setattr(os, "fsync", failing_fsync("shard-00000.kds.tmp"))
    with pytest.raises(OSError, match=r"\[Errno 28\] cannot write .*shard-00000.kds: No space left on device\. "
                                      r"Fix that \(free disk space, .* rerun the same command") as error:
        writer.add(*sequences[1])
    assert error.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [STATE, LOCK]  # nothing half-written
    monkeypatch.undo()
    writer.close()
    with ShardWriter(tmp_path / "a", vocab_size=40, k=3, shard_tokens=10, resume=True) as resumed:
        assert resumed.num_sequences == 0
        for sequence in sequences:
            resumed.add(*sequence)
    write_dataset(tmp_path / "b", sequences, vocab=40, k=3, shard_tokens=10)
    for path in (tmp_path / "b").iterdir():
        assert (tmp_path / "a" / path.name).read_bytes() == path.read_bytes()


def test_disk_full_while_writing_the_manifest(tmp_path, monkeypatch):
    sequences = random_sequences(np.random.default_rng(4), 3, 40, 3, lengths=(5, 6))
    monkeypatch.setattr(os, "fsync", failing_fsync("manifest.json.tmp"))
    with pytest.raises(OSError, match="cannot write .*manifest.json: No space left"):
        write_dataset(tmp_path, sequences, vocab=40, k=3, shard_tokens=10)
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ShardError, match="capture in progress or interrupted"):
        open_shards(tmp_path)
    assert not (tmp_path / LOCK).exists()  # the context manager released the directory
    monkeypatch.undo()
    assert ShardWriter(tmp_path, vocab_size=40, k=3, shard_tokens=10, resume=True).num_sequences == 3


def test_manifest_file_written_by_the_writer_is_accepted_and_complete(pristine):
    manifest = json.loads((pristine / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["num_learned"] < manifest["num_tokens"]
    assert {"teacher", "tokenizer", "source", "capture"} <= manifest.keys()
    assert sorted(p.name for p in pristine.iterdir() if not p.name.startswith("shard-")) == ["manifest.json"]


def test_manifest_version_must_match_the_shards(damaged):
    rewrite_manifest(damaged, lambda m: m.update(format_version=1))
    with pytest.raises(ShardError, match="shard-00000.kds: header format_version is 2, the manifest says 1"):
        open_shards(damaged)
