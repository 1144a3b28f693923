"""kdfast eval on dataset files (the chat-data inputs): only the learned tokens are scored, against an
independent float64 recomputation from transformers' own assistant mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from kdfast.cli import main  # noqa: E402
from kdfast.evaluate import evaluate  # noqa: E402
from tests.test_capture_data import CONVERSATIONS, PAIRS, chat_teacher, learned_tokens, write  # noqa: E402,F401

FIELDS = {"messages": {"messages_field": "messages", "max_len": 128},
          "pairs": {"prompt_field": "prompt", "response_field": "response", "max_len": 128}}


@pytest.fixture(scope="module")
def student(chat_teacher, tmp_path_factory):
    root, tokenizer = chat_teacher
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    directory = tmp_path_factory.mktemp("student")
    LlamaForCausalLM(config).save_pretrained(directory)  # no tokenizer here: the teacher's is used
    return directory


def expected_scores(model_dir, teacher_dir, tokenizer, records) -> dict:
    """CE, accuracy and agreement over the learned tokens, float64, one record at a time."""
    model, teacher = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval() for d in (model_dir, teacher_dir))
    ce, correct, agree = [], [], []
    for record in records:
        ids, learned = learned_tokens(tokenizer, record)
        ids = torch.tensor([ids])
        with torch.no_grad():
            z, t = model(input_ids=ids).logits[0, :-1], teacher(input_ids=ids).logits[0, :-1]
        rows = torch.tensor(learned[1:])  # position j predicts token j + 1
        labels = ids[0, 1:][rows]
        log_q = torch.log_softmax(z[rows], -1)
        ce += (-log_q.gather(1, labels[:, None])[:, 0]).tolist()
        correct += (z[rows].argmax(-1) == labels).tolist()
        agree += (z[rows].argmax(-1) == t[rows].argmax(-1)).tolist()
    return {"tokens": len(ce), "ce": float(np.mean(ce)), "accuracy": float(np.mean(correct)),
            "agreement": float(np.mean(agree))}


@pytest.mark.parametrize("kind, container", [("messages", "jsonl"), ("pairs", "parquet")])
def test_eval_scores_only_the_learned_tokens_of_a_dataset_file(chat_teacher, student, tmp_path, kind, container):
    root, tokenizer = chat_teacher
    records = [{"messages": c} for c in CONVERSATIONS] if kind == "messages" else PAIRS
    data = write(records, container, tmp_path / "data")
    report = evaluate({"student": student}, data, teacher=root, fields=FIELDS[kind], tokenizer=root,
                      generate_tokens=0, progress=False)
    got = report["models"]["student"]["data"]["in-distribution"]
    expected = expected_scores(student, root, tokenizer, records)
    assert got["tokens"] == expected["tokens"]
    assert got["ce"] == pytest.approx(expected["ce"], rel=1e-6, abs=1e-6)
    assert got["accuracy"] == pytest.approx(expected["accuracy"])
    assert got["agreement"] == pytest.approx(expected["agreement"])
    assert report["data"]["in-distribution"]["teacher_targets"] == "live teacher"


def test_eval_command_on_chat_jsonl_without_a_teacher(chat_teacher, student, tmp_path, capsys):
    """The tokenizer comes from the first model directory that has one; no teacher: no agreement, no KL."""
    root, _ = chat_teacher
    data = write([{"messages": c} for c in CONVERSATIONS], "jsonl", tmp_path / "chat")
    assert main(["eval", "--model", str(root), "--model", str(student), "--data", str(data), "--messages-field",
                 "messages", "--max-len", "128", "--out", str(tmp_path / "eval"), "--generate-tokens", "0",
                 "--no-progress"]) == 0
    capsys.readouterr()
    import json

    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    scores = report["models"][root.name]["data"]["in-distribution"]
    assert scores["agreement"] is None and scores["kl"] is None and scores["tokens"] > 0
    assert report["data"]["in-distribution"]["teacher_targets"] == "none"


def test_eval_dataset_file_without_fields_is_a_clear_error(chat_teacher, tmp_path):
    root, _ = chat_teacher
    data = write([{"messages": c} for c in CONVERSATIONS], "jsonl", tmp_path / "chat")
    with pytest.raises(ValueError, match="is not a shard directory .* needs one of --text-field"):
        evaluate([root], data, progress=False)
