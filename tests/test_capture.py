"""kdfast capture: targets equal a direct teacher run, bad input fails clearly, interrupted runs resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kdfast
from kdfast.capture import capture
from kdfast.cli import main
from kdfast.shards import ShardDataset, ShardError, open_shards
from tests.kill_support import sigkill_after_shards

REPO = Path(kdfast.__file__).resolve().parent.parent
VOCAB = 50


class TableTeacher:
    """Deterministic toy teacher: logits of a position depend on its token only (a fixed table)."""

    def __init__(self, vocab: int = VOCAB, scale: float = 3.0, seed: int = 0):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * scale  # [V, V]
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, V]
        self.calls += 1
        return self.table[input_ids]


def token_array(rows: int = 10, length: int = 12, vocab: int = VOCAB, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (rows, length))


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.kds"))}


# --- what gets stored ----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_capture_stores_the_teachers_top_k(tmp_path, temperature):
    teacher, tokens = TableTeacher(), token_array()
    result = capture(teacher, tokens, tmp_path, k=5, temperature=temperature, batch_size=4, shard_tokens=30,
                     progress=False)
    assert result.captured_sequences == 10 and result.captured_tokens == 120
    dataset = ShardDataset(tmp_path, shuffle=False)
    assert dataset.kind == "logprobs" and dataset.capture_temperature == temperature and len(dataset) == 10
    for index, row in enumerate(tokens):
        logprobs = torch.log_softmax(teacher.table[torch.from_numpy(row)] / temperature, -1)  # [L, V]
        values, indices = logprobs.topk(5, -1)
        tail = torch.logsumexp(logprobs.scatter(-1, indices, float("-inf")), -1)
        sample = dataset[index]
        assert torch.equal(sample["teacher_indices"], indices.int())
        assert torch.equal(sample["teacher_values"], values.half().float())
        torch.testing.assert_close(sample["teacher_tail"], tail, rtol=0, atol=1e-6)
        assert sample["input_ids"].tolist() == row.tolist()
        assert sample["labels"].tolist() == row[1:].tolist() + [-100]


def test_k_equal_to_vocab_has_no_tail(tmp_path):
    capture(TableTeacher(vocab=6), token_array(vocab=6), tmp_path, k=6, progress=False)
    sample = ShardDataset(tmp_path)[0]
    assert torch.isneginf(sample["teacher_tail"]).all()
    torch.testing.assert_close(sample["teacher_values"].exp().sum(-1), torch.ones(12), atol=3e-3, rtol=0)


def test_sampled_capture_stores_merged_empirical_probabilities(tmp_path):
    capture(TableTeacher(), token_array(), tmp_path / "a", mode="sampled", k=16, num_samples=16, batch_size=4,
            shard_tokens=30, seed=7, progress=False)
    dataset = ShardDataset(tmp_path / "a", shuffle=False)
    assert dataset.kind == "probs"
    for index in range(len(dataset)):
        sample = dataset[index]
        indices, values = sample["teacher_indices"], sample["teacher_values"]
        valid = indices >= 0
        torch.testing.assert_close((values * valid).sum(-1), torch.ones(12))
        assert torch.equal(torch.where(valid, values * 16, 0.0), torch.where(valid, (values * 16).round(), 0.0))
        assert (values[~valid] == 0).all() and torch.isneginf(sample["teacher_tail"]).all()
        for row in range(12):
            ids = indices[row][valid[row]].tolist()
            assert len(ids) == len(set(ids))  # duplicates merged
            assert (values[row][valid[row]].diff() <= 0).all()  # most frequent first
    # every sequence has its own generator: batching does not change a single sample
    capture(TableTeacher(), token_array(), tmp_path / "b", mode="sampled", k=16, num_samples=16, batch_size=1,
            shard_tokens=30, seed=7, progress=False)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_sampled_frequencies_follow_the_teacher(tmp_path):
    teacher = TableTeacher(vocab=5, scale=1.0)
    capture(teacher, np.zeros((1, 3), np.int64), tmp_path, mode="sampled", k=5, num_samples=4000, progress=False)
    sample = ShardDataset(tmp_path)[0]
    empirical = torch.zeros(5).scatter_add(0, sample["teacher_indices"][0].long().clamp(min=0),
                                           sample["teacher_values"][0])
    assert (empirical - torch.softmax(teacher.table[0], -1)).abs().max() < 0.04


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens,options,problem", [
    (token_array()[None], {}, r"tokens must be a non-empty integer array \[N, L\]"),
    (token_array().astype(np.float32), {}, "integer array"),
    (token_array(), {"k": VOCAB + 1}, "k=51 exceeds the teacher's vocabulary of 50"),
    (token_array(), {"temperature": 0.0}, "temperature must be > 0"),
    (token_array(), {"temperature": -1.0}, "temperature must be > 0"),
    (token_array() + VOCAB, {}, "outside the teacher's vocabulary"),
    (token_array(), {"mode": "sampled", "k": 4, "num_samples": 8}, "cannot hold up to 8 distinct samples"),
    (token_array(), {"mode": "beam"}, "mode must be one of"),
    (token_array(), {"value_dtype": "uint4"}, "value_dtype must be one of"),
    (token_array(), {"device": "tpu:banana"}, "device 'tpu:banana'"),
    pytest.param(token_array(), {"device": "cuda"}, "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
])
def test_capture_rejects_bad_input(tmp_path, tokens, options, problem):
    with pytest.raises(ValueError, match=problem):
        capture(TableTeacher(), tokens, tmp_path / "out", progress=False, **{"k": 4, **options})


def test_teacher_with_wrong_output_shape(tmp_path):
    """[B, L] instead of [B, L, V]: the probe takes L for the vocabulary, the first batch is refused."""
    with pytest.raises(ValueError, match=r"teacher returned logits \(2, 12\) for input_ids \(2, 12\)"):
        capture(lambda ids: ids.float(), token_array(vocab=4), tmp_path, batch_size=2, k=1, progress=False)


def test_output_directory_of_a_different_capture(tmp_path):
    capture(TableTeacher(), token_array(), tmp_path, k=4, progress=False, teacher_name="toy")
    with pytest.raises(ValueError, match="source: stored"):
        capture(TableTeacher(), token_array(seed=1), tmp_path, k=4, progress=False, teacher_name="toy")
    with pytest.raises(ValueError, match="k: stored 4, requested 3"):
        capture(TableTeacher(), token_array(), tmp_path, k=3, progress=False, teacher_name="toy")
    teacher = TableTeacher()
    again = capture(teacher, token_array(), tmp_path, k=4, progress=False, teacher_name="toy")
    assert again.captured_sequences == 0 and teacher.calls == 1  # only the vocabulary probe ran


@pytest.mark.parametrize("argv,problem", [
    (["--tokens", "cube.npy"], "expected shape [N, L] or [T], got (2, 3, 4)"),
    (["--tokens", "floats.npy"], "is not an integer type"),
    (["--tokens", "stream.npy"], "a 1-D token stream needs seq_len"),
    (["--tokens", "missing.npy"], "cannot read it as .npy"),
    (["--tokens", "tokens.npy", "--k", "51"], "k=51 exceeds the teacher's vocabulary of 50"),
    (["--tokens", "tokens.npy", "--temperature", "0"], "temperature must be > 0"),
    (["--tokens", "tokens.npy", "--teacher", "no_such_module:fn"], "cannot import it"),
    (["--tokens", "tokens.npy", "--teacher", "nowhere"], "neither a local Hugging Face model directory"),
    (["--tokens", "tokens.npy", "--teacher", "toy_teacher:make_teacher"],
     "cannot be called with one argument (signature ()): a teacher is the forward function"),
    (["--tokens", "tokens.npy", "--teacher", "toy_teacher:make_model"],
     "returned Embedding, not a logits tensor [B, L, V]: a teacher is the forward function"),
    (["--text", "corpus.txt"], "--text needs --tokenizer and --seq-len"),
])
def test_cli_capture_bad_input_is_one_clear_line(tmp_path, monkeypatch, capsys, argv, problem):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_teacher", raising=False)  # another test's toy_teacher.py
    (tmp_path / "toy_teacher.py").write_text("import torch\nW = torch.randn(50, 50)\n\n\ndef teacher(ids):\n"
                                             "    return W[ids]\n\n\ndef make_teacher():\n    return teacher\n\n\n"
                                             "def make_model(config=None):\n    return torch.nn.Embedding(50, 50)\n")
    np.save("cube.npy", np.zeros((2, 3, 4), np.int64))
    np.save("floats.npy", np.zeros((2, 3)))
    np.save("stream.npy", np.zeros(10, np.int64))
    np.save("tokens.npy", token_array())
    argv = ["capture", "--teacher", "toy_teacher:teacher", "--out", "out", "--no-progress", *argv]
    if argv.count("--teacher") == 2:
        del argv[1:3]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err


# --- interruption --------------------------------------------------------------------------------


class CrashingTeacher(TableTeacher):
    def __init__(self, crash_at_call: int):
        super().__init__()
        self.crash_at_call = crash_at_call

    def __call__(self, input_ids):
        if self.calls + 1 == self.crash_at_call:
            raise RuntimeError("simulated crash")
        return super().__call__(input_ids)


def test_interrupted_capture_resumes_without_redoing_shards(tmp_path):
    tokens = token_array(rows=20, length=8)
    options = dict(k=4, batch_size=3, shard_tokens=40, progress=False, teacher_name="toy")  # 5 sequences a shard
    with pytest.raises(RuntimeError, match="simulated crash"):
        capture(CrashingTeacher(crash_at_call=6), tokens, tmp_path / "a", **options)
    with pytest.raises(ShardError, match="capture in progress"):
        open_shards(tmp_path / "a")
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.kds")}
    assert len(finished) == 2
    teacher = TableTeacher()
    result = capture(teacher, tokens, tmp_path / "a", **options)
    assert result.captured_sequences == 10 and teacher.calls == 1 + 4  # probe + two shards of 2 batches
    assert {name: (tmp_path / "a" / name).stat().st_mtime_ns for name in finished} == finished
    capture(TableTeacher(), tokens, tmp_path / "b", **options)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()


SLOW_TEACHER = """
import time
import torch

TABLE = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 3


def teacher(input_ids):  # [B, L] -> [B, L, 64]
    time.sleep(0.15)
    return TABLE[input_ids]
"""


def test_sigkill_mid_capture_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    (tmp_path / "slow_teacher.py").write_text(SLOW_TEACHER)
    tokens = token_array(rows=24, length=8, vocab=64)
    np.save(tmp_path / "tokens.npy", tokens)
    command = [sys.executable, "-m", "kdfast", "capture", "--teacher", "slow_teacher:teacher", "--tokens",
               "tokens.npy", "--out", "out", "--k", "4", "--shard-tokens", "16", "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    sigkill_after_shards(command, tmp_path, env, shards=3, timeout=60)
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.kds")}
    assert 3 <= len(finished) < 12

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stderr
    assert {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in finished} == finished

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    capture("slow_teacher:teacher", tokens, tmp_path / "clean", k=4, shard_tokens=16, batch_size=2, progress=False)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "clean")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == \
        json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert main(["verify", str(tmp_path / "out"), "--no-progress"]) == 0


def test_ctrl_c_mid_capture_says_how_to_resume(tmp_path):
    (tmp_path / "slow_teacher.py").write_text(SLOW_TEACHER)
    np.save(tmp_path / "tokens.npy", token_array(rows=24, length=8, vocab=64))
    command = [sys.executable, "-m", "kdfast", "capture", "--teacher", "slow_teacher:teacher", "--tokens",
               "tokens.npy", "--out", "out", "--k", "4", "--shard-tokens", "16", "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "out").glob("*.kds")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "kdfast capture: interrupted; rerun the same command to resume" in err
    assert "Traceback" not in err
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and "resuming after" in resumed.stderr, resumed.stderr


# --- a tiny Hugging Face Llama, end to end through the CLI ----------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model dir, tokenizer dir, corpus) built offline: a 300-token byte-level BPE and a 2-layer Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_llama")
    corpus = [f"the quick brown fox {i} jumps over the lazy dog and runs {i % 7} miles home" for i in range(60)]
    (root / "corpus.txt").write_text("\n".join(corpus))
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(root / "teacher")
    return root / "teacher", root / "tokenizer", root / "corpus.txt"


def direct_logprobs(model_dir: Path, tokens: np.ndarray) -> torch.Tensor:  # [N, L] -> [N, L, V]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    with torch.inference_mode():  # one sequence per call, the batch shape the capture below uses
        logits = torch.cat([model(input_ids=torch.from_numpy(row[None]).long(), use_cache=False).logits
                            for row in tokens])
    return torch.log_softmax(logits.float(), -1)


def test_hf_llama_capture_verify_inspect_and_read_back(tiny_llama, tmp_path, capsys):
    model_dir, tokenizer_dir, _ = tiny_llama
    tokens = np.random.default_rng(0).integers(3, 300, (6, 16))
    np.save(tmp_path / "tokens.npy", tokens)
    out = tmp_path / "out"
    assert main(["capture", "--teacher", str(model_dir), "--tokens", str(tmp_path / "tokens.npy"), "--out", str(out),
                 "--k", "8", "--shard-tokens", "32", "--batch-size", "1", "--tokenizer", str(tokenizer_dir),
                 "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "captured 6 sequences (96 tokens)" in printed.out
    assert "Loading weights" not in printed.err  # transformers' bar follows --no-progress too
    assert main(["verify", str(out), "--no-progress"]) == 0

    dataset = ShardDataset(out, shuffle=False, vocab_size=300)
    logprobs = direct_logprobs(model_dir, tokens)
    values, indices = logprobs.topk(8, -1)
    for index in range(len(tokens)):
        sample = dataset[index]
        assert torch.equal(sample["teacher_indices"], indices[index].int())
        assert torch.equal(sample["teacher_values"], values[index].half().float())
        assert sample["labels"].tolist() == tokens[index, 1:].tolist() + [-100]

    assert main(["inspect", str(out), "--tokenizer", str(tokenizer_dir), "--sequence", "1", "--position", "3"]) == 0
    report = capsys.readouterr().out
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    top = int(indices[1, 3, 0])
    for expected in ["vocab        300", "k            8", "kind         logprobs", "sequences    6", "tokens       96",
                     "bytes/token", "huggingface", repr(tokenizer.decode([top])), f"{top:>8}"]:
        assert expected in report, expected
    assert "{" not in report  # manifest dicts as plain text, not Python reprs


def test_tokenizer_in_the_teacher_directory_is_recorded_and_used_by_inspect(tiny_llama, tmp_path, capsys):
    import shutil

    model_dir, tokenizer_dir, _ = tiny_llama
    teacher = shutil.copytree(model_dir, tmp_path / "teacher")
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, teacher)
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(3, 300, (2, 8)))
    out = tmp_path / "out"
    assert main(["capture", "--teacher", str(teacher), "--tokens", str(tmp_path / "tokens.npy"), "--out", str(out),
                 "--k", "4", "--no-progress"]) == 0
    assert open_shards(out).manifest["tokenizer"]["path"] == str(teacher.resolve())
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "context      '" in capsys.readouterr().out  # decoded text, not ids


def test_hf_capture_from_text(tiny_llama, tmp_path):
    model_dir, tokenizer_dir, corpus = tiny_llama
    assert main(["capture", "--teacher", str(model_dir), "--text", str(corpus), "--tokenizer", str(tokenizer_dir),
                 "--seq-len", "16", "--out", str(tmp_path / "out"), "--k", "4", "--mode", "sampled", "--samples", "4",
                 "--no-progress"]) == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = corpus.read_text().splitlines()
    stream = [t for ids in tokenizer(lines)["input_ids"] for t in ids + [tokenizer.eos_token_id]]
    dataset = ShardDataset(tmp_path / "out", shuffle=False)
    assert len(dataset) == len(stream) // 16
    assert dataset[2]["input_ids"].tolist() == stream[32:48]
    assert dataset.manifest["tokenizer"]["path"] == str(tokenizer_dir.resolve())


def test_device_map_auto_capture_equals_a_plain_capture(tiny_llama, tmp_path, capsys):
    """The --device-map path loads and runs the teacher through from_pretrained(device_map=...) and
    gives the same targets. On a CPU-only machine accelerate places every layer on the CPU: the
    split over several devices itself needs several GPUs and is not exercised here."""
    model_dir, tokenizer_dir, _ = tiny_llama
    np.save(tmp_path / "tokens.npy", np.random.default_rng(1).integers(3, 300, (5, 12)))
    common = ["--teacher", str(model_dir), "--tokens", str(tmp_path / "tokens.npy"), "--k", "8", "--no-progress"]
    assert main(["capture", *common, "--out", str(tmp_path / "plain")]) == 0
    assert main(["capture", *common, "--out", str(tmp_path / "mapped"), "--device-map", "auto"]) == 0
    capsys.readouterr()
    plain, mapped = (list(ShardDataset(tmp_path / name, shuffle=False)) for name in ("plain", "mapped"))
    for a, b in zip(plain, mapped, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_device_map_needs_a_hugging_face_teacher(tmp_path):
    with pytest.raises(ValueError, match="device_map='auto' needs a local Hugging Face teacher directory"):
        capture(TableTeacher(), token_array(), tmp_path / "out", k=4, device_map="auto")
