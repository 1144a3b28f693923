"""kdfast.sources: dataset files -> (tokens, loss mask), checked against masks built independently.

The tokenizer is a WordLevel one over the test's words (whitespace split, so every word is one
token and the expected ids and learned tokens can be written down by hand), wrapped in
PreTrainedTokenizerFast with a ChatML-like chat template.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from kdfast.sources import DataSource, sequence_mask  # noqa: E402

SPECIAL = ["<unk>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
WORDS = ("system user assistant you are kind hello there how are you fine thanks what is two plus "
         "four six the answer question long word").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVERSATIONS = [
    [{"role": "system", "content": "you are kind"}, {"role": "user", "content": "hello there"},
     {"role": "assistant", "content": "hello you are kind"}],
    [{"role": "user", "content": "what is two plus four"}, {"role": "assistant", "content": "six"},
     {"role": "user", "content": "what is the answer"}, {"role": "assistant", "content": "the answer is six thanks"}],
]
PAIRS = [{"prompt": "what is two plus four", "response": "six thanks"},
         {"prompt": "hello there how are you", "response": "fine thanks what is the answer"}]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {token: i for i, token in enumerate(dict.fromkeys(SPECIAL + WORDS))}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>",
                                               eos_token="<eos>", additional_special_tokens=SPECIAL[3:])
    tok.chat_template = CHATML
    return tok


def ids(tok, words):
    return [tok.convert_tokens_to_ids(w) for w in words]


def expected_chat(tok, messages):
    """Tokens and learned tokens of the ChatML rendering, written out word by word."""
    tokens, learned = [], []
    for m in messages:
        header, body = ["<|im_start|>", m["role"]], m["content"].split() + ["<|im_end|>"]
        tokens += ids(tok, header + body)
        learned += [False] * len(header) + [m["role"] == "assistant"] * len(body)
    return np.array(tokens), np.array(learned)


def expected_pair(tok, pair):
    prompt, response = ["<bos>"] + pair["prompt"].split(), pair["response"].split() + ["<eos>"]
    return np.array(ids(tok, prompt + response)), np.array([False] * len(prompt) + [True] * len(response))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def source(path, tok, tmp_path, **kw):
    return DataSource(path, tok, cache_dir=tmp_path / "cache", **{"max_len": 64, **kw})


def check_against(result, expected):
    assert len(result) == len(expected)
    for (tokens, mask), (want_tokens, want_learned) in zip(result, expected):
        np.testing.assert_array_equal(tokens, want_tokens)
        assert mask.dtype == bool and mask.shape == tokens.shape
        # position j is learned exactly when token j + 1 is an assistant / response token
        np.testing.assert_array_equal(mask[:-1], want_learned[1:])
        assert not mask[-1]


def test_sequence_mask_shifts_by_one():
    np.testing.assert_array_equal(sequence_mask(np.array([0, 0, 1, 1, 0, 1], bool)), [0, 1, 1, 0, 1, 0])


def test_messages_jsonl_learns_exactly_the_assistant_tokens(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c, "id": i} for i, c in enumerate(CONVERSATIONS)])
    src = source(path, tokenizer, tmp_path, messages_field="messages")
    result = list(src)
    check_against(result, [expected_chat(tokenizer, c) for c in CONVERSATIONS])
    for (tokens, _), conversation in zip(result, CONVERSATIONS):  # the ids apply_chat_template gives
        assert tokens.tolist() == tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    # learned tokens: the words of the assistant turns and their <|im_end|>, nothing from system/user
    learned = [tokenizer.convert_ids_to_tokens(int(t)) for tokens, mask in result for t in tokens[1:][mask[:-1]]]
    assistant = [w for c in CONVERSATIONS for m in c if m["role"] == "assistant"
                 for w in m["content"].split() + ["<|im_end|>"]]
    assert learned == assistant
    assert src.summary() == {"records": 2, "sequences": 2, "tokens": sum(len(t) for t, _ in result),
                             "learned": len(assistant), "skipped": 0}


@pytest.mark.parametrize("container", ["jsonl", "parquet", "datasets"])
def test_prompt_response_learns_the_response_and_eos(tokenizer, tmp_path, container):
    if container == "jsonl":
        path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    elif container == "parquet":
        path = tmp_path / "pairs.parquet"
        datasets.Dataset.from_list(PAIRS).to_parquet(str(path))
    else:
        path = tmp_path / "pairs_dir"
        datasets.Dataset.from_list(PAIRS).save_to_disk(str(path))
    result = list(source(path, tokenizer, tmp_path, prompt_field="prompt", response_field="response"))
    check_against(result, [expected_pair(tokenizer, p) for p in PAIRS])


@pytest.mark.parametrize("container", ["parquet", "datasets"])
def test_messages_from_parquet_and_datasets_directory(tokenizer, tmp_path, container):
    records = [{"messages": c} for c in CONVERSATIONS]
    path = tmp_path / ("chat.parquet" if container == "parquet" else "chat_dir")
    data = datasets.Dataset.from_list(records)
    data.to_parquet(str(path)) if container == "parquet" else data.save_to_disk(str(path))
    check_against(list(source(path, tokenizer, tmp_path, messages_field="messages")),
                  [expected_chat(tokenizer, c) for c in CONVERSATIONS])


def test_text_windows_overlap_by_one_and_learn_every_transition(tokenizer, tmp_path):
    text = " ".join(WORDS[:11])  # <bos> + 11 words + <eos> = 13 tokens
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": text}, {"text": "hello"}])
    stream = np.array(ids(tokenizer, ["<bos>"] + text.split() + ["<eos>"]))
    result = list(source(path, tokenizer, tmp_path, text_field="text", max_len=5))
    windows = [stream[0:5], stream[4:9], stream[8:13], np.array(ids(tokenizer, ["<bos>", "hello", "<eos>"]))]
    check_against(result, [(w, np.ones(len(w), bool)) for w in windows])
    # every next-token prediction of the document appears exactly once
    pairs = [(int(t[j]), int(t[j + 1])) for t, m in result[:3] for j in np.flatnonzero(m)]
    assert pairs == list(zip(stream[:-1].tolist(), stream[1:].tolist()))
    truncated = list(source(path, tokenizer, tmp_path, text_field="text", max_len=5, truncate=True))
    check_against(truncated, [(windows[0], np.ones(5, bool)), (windows[3], np.ones(3, bool))])


def test_truncate_cuts_prompt_response_and_keeps_the_mask(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[1:])
    tokens, learned = expected_pair(tokenizer, PAIRS[1])
    with pytest.raises(ValueError, match=r"pairs.jsonl record 0: 13 tokens exceed max_len=8"):
        list(source(path, tokenizer, tmp_path, prompt_field="prompt", response_field="response", max_len=8))
    result = list(source(path, tokenizer, tmp_path, prompt_field="prompt", response_field="response", max_len=8,
                         truncate=True))
    check_against(result, [(tokens[:8], learned[:8])])


BAD = [
    ("prompt_response", {"prompt": "hello"}, "field 'response' is missing or null"),
    ("prompt_response", {"prompt": "hello", "response": "  "}, "field 'response' is empty"),
    ("prompt_response", {"prompt": "hello", "response": 7}, "field 'response' must be a string, got int"),
    ("messages", {"messages": [{"role": "user", "content": "hello"}]}, "no assistant turn"),
    ("messages", {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""}]},
     "message 1 is an empty assistant turn"),
    ("messages", {"messages": "hello"}, "must be a non-empty list"),
    ("messages", {"messages": [{"role": "user", "content": "hello " * 70}, {"role": "assistant", "content": "six"}]},
     "tokens exceed max_len=64"),
    ("text", {"text": 3}, "field 'text' must be a string"),
    ("text", {}, "field 'text' is missing or null"),
]
FIELDS = {"prompt_response": {"prompt_field": "prompt", "response_field": "response"},
          "messages": {"messages_field": "messages"}, "text": {"text_field": "text"}}
GOOD = {"prompt_response": PAIRS[0], "messages": {"messages": CONVERSATIONS[0]}, "text": {"text": "hello there"}}


@pytest.mark.parametrize("mode, record, message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_record_is_named_or_skipped_and_counted(tokenizer, tmp_path, mode, record, message):
    # the bad record sits between good ones, so mixed field types across records are covered too
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[mode], record, GOOD[mode]])
    with pytest.raises(ValueError, match=r"bad\.jsonl record 1: .*" + message.replace("(", r"\(")):
        list(source(path, tokenizer, tmp_path, **FIELDS[mode]))
    src = source(path, tokenizer, tmp_path, skip_bad=True, **FIELDS[mode])
    good = list(source(write_jsonl(tmp_path / "good.jsonl", [GOOD[mode]]), tokenizer, tmp_path, **FIELDS[mode]))
    result = list(src)
    assert len(result) == 2 and src.counts.skipped == 1 and src.counts.records == 3
    for tokens, mask in result:
        np.testing.assert_array_equal(tokens, good[0][0])
        np.testing.assert_array_equal(mask, good[0][1])


def test_assistant_tokens_equal_transformers_generation_mask(tmp_path):
    """A byte-level BPE (tokens cross word and newline boundaries) and a template with {% generation %}:
    the learned tokens equal apply_chat_template's return_assistant_tokens_mask."""
    text = [m["content"] for c in CONVERSATIONS for m in c] + ["system\nuser\nassistant\n"] * 3
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.train_from_iterator(text, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                               additional_special_tokens=SPECIAL[3:])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                         "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}"
                         "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    expected = []
    for conversation in CONVERSATIONS:
        out = tok.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        expected.append((np.array(out["input_ids"]), np.array(out["assistant_masks"], bool)))
    assert all(learned.any() and not learned.all() for _, learned in expected)
    check_against(list(source(path, tok, tmp_path, messages_field="messages")), expected)


def test_template_that_is_not_prefix_stable_is_refused(tokenizer, tmp_path):
    unstable = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                                    eos_token="<eos>", unk_token="<unk>")
    # the last message is rendered differently from earlier ones (like templates that drop old reasoning)
    unstable.chat_template = ("{% for m in messages %}{{ m['role'] }} {% if loop.last %}answer {% endif %}"
                              "{{ m['content'] }} <|im_end|> {% endfor %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[1]}])
    with pytest.raises(ValueError, match="record 0: the chat template is not prefix-stable at message 1"):
        list(source(path, unstable, tmp_path, messages_field="messages"))


def test_bad_arguments(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(ValueError, match="exactly one of"):
        source(path, tokenizer, tmp_path, text_field="prompt", messages_field="response")
    with pytest.raises(ValueError, match="exactly one of .*none"):
        source(path, tokenizer, tmp_path)
    with pytest.raises(ValueError, match="prompt_field and response_field go together"):
        source(path, tokenizer, tmp_path, prompt_field="prompt")
    with pytest.raises(ValueError, match=r"no field 'text'; the records have \['prompt', 'response'\]"):
        source(path, tokenizer, tmp_path, text_field="text")
    with pytest.raises(ValueError, match="max_len must be an int >= 2"):
        source(path, tokenizer, tmp_path, text_field="prompt", max_len=1)
    with pytest.raises(ValueError, match="expected a .jsonl/.json or .parquet file"):
        source(tmp_path / "data.csv", tokenizer, tmp_path, text_field="prompt")
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(splits))
    with pytest.raises(ValueError, match=r"holds a DatasetDict \(splits \['train'\]\); pass one split's directory"):
        source(splits, tokenizer, tmp_path, text_field="prompt")
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>")
    with pytest.raises(ValueError, match="has no chat template"):
        source(path, plain, tmp_path, messages_field="prompt")


def test_masks_survive_shards_as_labels(tokenizer, tmp_path):
    torch = pytest.importorskip("torch")
    from kdfast.shards.dataset import IGNORE_INDEX, ShardDataset
    from kdfast.shards.writer import ShardWriter

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    sequences = list(source(path, tokenizer, tmp_path, messages_field="messages"))
    vocab, k, rng = len(tokenizer), 3, np.random.default_rng(0)
    with ShardWriter(tmp_path / "shards", vocab_size=vocab, k=k) as writer:
        for tokens, mask in sequences:
            logits = rng.standard_normal((int(mask.sum()), vocab))
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            top = np.argsort(-logp, axis=1)[:, :k]
            writer.add(tokens, top, np.take_along_axis(logp, top, 1), mask=mask)
    data = ShardDataset(tmp_path / "shards", shuffle=False)
    for i, (tokens, mask) in enumerate(sequences):
        item = data[i]
        want = torch.full((len(tokens),), IGNORE_INDEX, dtype=torch.int64)
        want[:-1] = torch.from_numpy(tokens[1:].astype(np.int64))
        want[~torch.from_numpy(mask)] = IGNORE_INDEX
        torch.testing.assert_close(item["labels"], want, rtol=0, atol=0)
        assert ((item["teacher_indices"] >= 0).all(1) == torch.from_numpy(mask)).all()
    assert data.learned_tokens == sum(int(m.sum()) for _, m in sequences)


def test_import_needs_neither_torch_nor_datasets():
    code = "import sys, kdfast.sources; print(sorted({'torch', 'datasets'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_identity_is_stable_and_follows_the_file(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    fields = {"prompt_field": "prompt", "response_field": "response"}
    first = source(path, tokenizer, tmp_path, **fields).identity()
    assert source(path, tokenizer, tmp_path / "other", **fields).identity() == first  # another cache, same data
    assert first["mode"] == "prompt_response" and first["records"] == 2 and first["max_len"] == 64
    write_jsonl(path, PAIRS[:1])
    assert source(path, tokenizer, tmp_path, **fields).identity()["fingerprint"] != first["fingerprint"]
