"""Shared by tests/test_train_packing.py and tests/test_train_ux.py: variable-length chat shards.

A byte-level BPE tokenizer with a ChatML template and a tiny Llama teacher are built offline and
saved in one directory (which also serves as a ``student`` directory with a tokenizer); ``kdfast
capture --data`` turns a JSONL file of conversations of varying lengths into masked shards. Import
the fixture into a test module (``from tests.chat_support import chat_shards``) to use it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfast.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("the cat sat on a mat while two dogs ran past it and one bird sang from the old tree near our small "
         "house by the river every morning before the sun came up over green hills").split()
MAX_LEN = 256


def conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """``count`` conversations of 1-3 turns whose texts have 1-25 words: about 20-110 tokens."""
    rng = np.random.default_rng(seed)

    def text(most: int) -> str:
        return " ".join(rng.choice(WORDS, int(rng.integers(1, most + 1))))

    result = []
    for _ in range(count):
        turns = []
        for _ in range(int(rng.integers(1, 4))):
            turns += [{"role": "user", "content": text(25)}, {"role": "assistant", "content": text(10)}]
        result.append(turns)
    return result


def chat_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS)] * 4 + ["system\nuser\nassistant\n"], trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        additional_special_tokens=special[3:])
    tokenizer.chat_template = CHATML
    return tokenizer


def llama_config(vocab: int, hidden: int) -> dict:
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN)


@pytest.fixture(scope="module")
def chat_shards(tmp_path_factory) -> dict:
    """{"train", "eval": shard dirs (48 and 8 conversations), "model": teacher dir with its tokenizer,
    "student": a student config for the same vocabulary}."""
    root = tmp_path_factory.mktemp("chat")
    tokenizer = chat_tokenizer()
    config = dict(llama_config(len(tokenizer), 32))
    config.pop("model_type")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(initializer_range=0.3, **config)).save_pretrained(
        root / "model")
    tokenizer.save_pretrained(root / "model")
    paths = {"model": root / "model", "student": llama_config(len(tokenizer), 32)}
    for name, count, seed in (("train", 48, 0), ("eval", 8, 1)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(count, seed)))
        paths[name] = root / name
        assert main(["capture", "--teacher", str(root / "model"), "--data", str(data), "--messages-field",
                     "messages", "--max-len", str(MAX_LEN), "--out", str(paths[name]), "--k", "8", "--batch-size",
                     "8", "--dtype", "float32", "--no-progress"]) == 0
    return paths


def chat_config(chat_shards: dict, run_dir: Path, **overrides):
    from kdfast.train import TrainConfig

    values = dict(train_shards=str(chat_shards["train"]), eval_shards="", run_dir=str(run_dir),
                  student_config=dict(chat_shards["student"]), max_steps=6, micro_batch_size=8, lr=1e-2,
                  warmup_steps=1, log_every=1, eval_every=0, save_every=0, progress=False)
    values.update(overrides)
    return TrainConfig(**values)
