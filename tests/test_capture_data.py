"""kdfast capture --data (proposed for tests/test_capture.py): a tiny Llama teacher, a tokenizer with a
chat template, conversations / prompt-response records in JSONL, Parquet and a datasets directory.
Targets are stored exactly where the next token is an assistant / response token, and equal the
teacher run on each whole sequence alone (the capture batches right-padded sequences)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdfast.cli import main
from kdfast.shards import ShardDataset

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATIONS = [
    [{"role": "system", "content": "you are a kind helper"}, {"role": "user", "content": "hello there"},
     {"role": "assistant", "content": "hello, how can I help?"}],
    [{"role": "user", "content": "what is two plus four"}, {"role": "assistant", "content": "six"},
     {"role": "user", "content": "and two plus two?"}, {"role": "assistant", "content": "four, of course"}],
    [{"role": "user", "content": "name a color"}, {"role": "assistant", "content": "blue"}],
]
PAIRS = [{"prompt": "Q: two plus four? A:", "response": " six"}, {"prompt": "Q: a color? A:", "response": " blue sky"}]


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("chat_teacher")
    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    text = [m["content"] for c in CONVERSATIONS for m in c] + [p["prompt"] + p["response"] for p in PAIRS]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text * 4 + ["system\nuser\nassistant\n"], trainers.BpeTrainer(
        vocab_size=200, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        additional_special_tokens=special[3:])
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)  # beside the weights: capture --data uses it
    return root, tokenizer


def learned_tokens(tokenizer, record) -> tuple[list[int], list[bool]]:
    """Independent of kdfast.sources: token ids and which are learned, from transformers' own
    assistant mask (the template below marks the assistant turns with {% generation %})."""
    if "messages" in record:
        marked = CHATML.replace("{{ m['content'] }}<|im_end|>\n",
                                "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n"
                                "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}")
        out = tokenizer.apply_chat_template(record["messages"], chat_template=marked, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        return out["input_ids"], [bool(m) for m in out["assistant_masks"]]
    prompt = tokenizer(record["prompt"])["input_ids"]
    response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + response, [False] * len(prompt) + [True] * len(response)


def write(records, container, path):
    if container == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif container == "parquet":
        path = path.with_suffix(".parquet")
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind, container", [("messages", "jsonl"), ("messages", "parquet"),
                                             ("messages", "datasets"), ("pairs", "jsonl"), ("pairs", "parquet"),
                                             ("pairs", "datasets")])
def test_capture_data_stores_targets_only_where_learned(chat_teacher, tmp_path, kind, container):
    teacher_dir, tokenizer = chat_teacher
    records = [{"messages": c} for c in CONVERSATIONS] if kind == "messages" else PAIRS
    fields = ["--messages-field", "messages"] if kind == "messages" else ["--prompt-field", "prompt",
                                                                          "--response-field", "response"]
    data = write(records, container, tmp_path / "data")
    out = tmp_path / "out"
    assert main(["capture", "--teacher", str(teacher_dir), "--data", str(data), *fields, "--max-len", "128",
                 "--out", str(out), "--k", "4", "--batch-size", "2", "--values", "bfloat16", "--dtype", "float32",
                 "--no-progress"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    dataset = ShardDataset(out, shuffle=False)
    assert len(dataset) == len(records)
    for index, record in enumerate(records):
        ids, learned = learned_tokens(tokenizer, record)
        sample = dataset[index]
        assert sample["input_ids"].tolist() == ids
        mask = torch.tensor(learned[1:] + [False])  # position j learned <=> token j + 1 is learned
        assert mask.any() and not mask.all()
        want_labels = torch.where(mask, torch.tensor(ids[1:] + [0]), torch.tensor(-100))
        assert torch.equal(sample["labels"], want_labels)
        assert torch.equal((sample["teacher_indices"] >= 0).all(-1), mask)  # targets exactly where learned
        with torch.inference_mode():  # the teacher on this whole sequence alone, no padding
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        values, indices = logprobs[mask].topk(4, -1)
        assert torch.equal(sample["teacher_indices"][mask], indices.int())
        torch.testing.assert_close(sample["teacher_values"][mask], values.bfloat16().float(), rtol=1e-2, atol=1e-2)


def test_capture_data_bad_record_names_it_and_skip_bad_counts_it(chat_teacher, tmp_path, capsys):
    teacher_dir, _ = chat_teacher
    records = [{"messages": CONVERSATIONS[0]}, {"messages": [{"role": "user", "content": "hi"}]}]
    data = write(records, "jsonl", tmp_path / "chat")
    argv = ["capture", "--teacher", str(teacher_dir), "--data", str(data), "--messages-field", "messages",
            "--max-len", "128", "--k", "4", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "chat.jsonl record 1: the conversation has no assistant turn" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    assert "2 records (1 bad, skipped), 1 sequences" in capsys.readouterr().out
    assert len(ShardDataset(tmp_path / "b")) == 1
