"""packing = true on variable-length chat shards (``kdfast capture --data`` from JSONL): a packed row
gives each sequence the logits it has alone, no label crosses a sequence boundary, the first step's
loss and every gradient element equal the padded batches', resume stays exact, the padding fraction
falls, and students that cannot isolate packed sequences are refused."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from kdfast.report import read_metrics
from kdfast.shards import IGNORE_INDEX, ShardDataset
from kdfast.train import DistillationModule, Trainer, build_student, collate, list_checkpoints
from kdfast.train.data import pack, pack_rows
from tests.chat_support import MAX_LEN, chat_config, chat_shards  # noqa: F401
from tests.train_support import VOCAB, make_config, shards, train_losses, transformers  # noqa: F401

LOSS_OPTIONS = dict(teacher_kind="logprobs", tail=False, temperature=1.0, chunk_size=None, backend=None)


def test_the_chat_shards_have_varying_lengths_and_masks(chat_shards):
    dataset = ShardDataset(chat_shards["train"], shuffle=False)
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    assert min(lengths) < 30 and max(lengths) > 90 and max(lengths) <= MAX_LEN, lengths
    assert 0.2 < dataset.learned_tokens / dataset.total_tokens < 0.6


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 9, 3, 4, 2], 9) == [[1], [0, 3], [2, 4]]
    assert pack_rows([4, 4, 4], 12) == [[0, 1, 2]]


def test_a_packed_row_gives_each_sequence_its_own_logits_and_labels(chat_shards):
    dataset = ShardDataset(chat_shards["train"], shuffle=False)
    samples = [dataset[i] for i in range(8)]
    batch = pack(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    rows = pack_rows(lengths, max(lengths))
    assert batch["input_ids"].shape == (len(rows), max(sum(lengths[i] for i in row) for row in rows))
    assert len(rows) < len(samples) and batch["num_tokens"] == sum(lengths)

    torch.manual_seed(0)
    module = DistillationModule(build_student(chat_config(chat_shards, "unused")), LOSS_OPTIONS).eval()
    with torch.no_grad():
        hidden, weight, _ = module.loss_inputs(batch["input_ids"], batch["position_ids"])
        packed_logits = hidden @ weight.T  # [R, L, V]
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                span = slice(start, start + lengths[i])
                alone, _, _ = module.loss_inputs(samples[i]["input_ids"][None])
                torch.testing.assert_close(packed_logits[r, span], (alone @ weight.T)[0], rtol=1e-5, atol=1e-5)
                assert batch["position_ids"][r, span].tolist() == list(range(lengths[i]))
                for name in ("labels", "teacher_indices", "teacher_values", "teacher_tail"):
                    torch.testing.assert_close(batch[name][r, span], samples[i][name], rtol=0, atol=0)
                assert batch["labels"][r, start + lengths[i] - 1] == IGNORE_INDEX  # no label crosses into the next
                start += lengths[i]
            assert (batch["labels"][r, start:] == IGNORE_INDEX).all()


def gradients(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    num_items, sums = trainer.accumulate_gradients()
    return num_items, sums, {name: p.grad.clone() for name, p in trainer.student.named_parameters()}


def test_packing_gives_the_padded_first_loss_and_gradients(chat_shards, tmp_path):
    results = {}
    for packing in (False, True):
        config = chat_config(chat_shards, tmp_path / f"grad-{packing}", packing=packing, grad_accum_steps=2,
                             hard_weight=0.3)
        with Trainer(config) as trainer:
            results[packing] = gradients(trainer)
    (items, sums, padded), (packed_items, packed_sums, packed) = results[False], results[True]
    assert packed_items == items and items > 100
    assert packed_sums[5] == sums[5] and packed_sums[6] < sums[6]  # the same tokens, fewer positions
    torch.testing.assert_close(packed_sums[:3], sums[:3], rtol=1e-5, atol=0)
    assert padded.keys() == packed.keys()
    for name, grad in padded.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(packed[name], grad, rtol=1e-5, atol=1e-8, msg=name)

    summaries = {}
    for packing in (False, True):
        run = tmp_path / f"step-{packing}"
        with Trainer(chat_config(chat_shards, run, packing=packing, max_steps=1, grad_accum_steps=2,
                                 hard_weight=0.3)) as trainer:
            trainer.train()
        summaries[packing] = json.loads((run / "summary.json").read_text())
    assert summaries[True]["train_loss"] == pytest.approx(summaries[False]["train_loss"], rel=1e-5)
    assert summaries[True]["tokens"] == summaries[False]["tokens"]


def test_metrics_report_padding_and_learned_tokens_per_second(chat_shards, tmp_path):
    records = {}
    for packing in (False, True):
        run = tmp_path / f"run-{packing}"
        with Trainer(chat_config(chat_shards, run, packing=packing, max_steps=4, log_every=2)) as trainer:
            trainer.train()
        records[packing] = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    for packing in (False, True):
        assert [r["step"] for r in records[packing]] == [2, 4]
        for record in records[packing]:
            assert record["learned_tokens_per_s"] > 0 and 0 <= record["padding_fraction"] < 1
    for padded, packed in zip(records[False], records[True]):
        assert packed["tokens"] == padded["tokens"]
        assert packed["padding_fraction"] < padded["padding_fraction"]
        assert padded["padding_fraction"] > 0.2  # lengths spread ~20..110 in micro-batches of 8


def test_a_fixed_pack_length_fills_longer_rows(chat_shards):
    dataset = ShardDataset(chat_shards["train"], shuffle=False)
    samples = [dataset[i] for i in range(8)]
    total = sum(len(s["input_ids"]) for s in samples)
    batch = pack(samples, pack_length=total)
    assert batch["input_ids"].shape == (1, total)
    assert pack(samples, pack_length=1)["input_ids"].shape == pack(samples)["input_ids"].shape  # never shorter


def test_resume_is_exact_with_packing(chat_shards, tmp_path):
    n = 3
    config = chat_config(chat_shards, tmp_path / "full", packing=True, pack_length=MAX_LEN, max_steps=2 * n,
                         micro_batch_size=4, grad_accum_steps=2, save_every=n)
    with Trainer(config) as trainer:
        trainer.train()
    expected = train_losses(tmp_path / "full")

    cut = replace(config, run_dir=str(tmp_path / "cut"))
    with Trainer(cut) as trainer:
        first_half = [trainer.train_step()["loss"] for _ in range(n)]
        trainer.save_checkpoint()
    with Trainer(replace(cut, resume=True)) as trainer:
        assert trainer.step == n
        trainer.train()
    second_half = train_losses(tmp_path / "cut")
    assert sorted(second_half) == list(range(n + 1, 2 * n + 1))
    assert first_half + [second_half[s] for s in range(n + 1, 2 * n + 1)] == [expected[s] for s in range(1, 2 * n + 1)]
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == [f"step_{n:08d}", f"step_{2 * n:08d}"]
    full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final").state_dict()
    resumed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "final").state_dict()
    for name, tensor in full.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_students_that_cannot_isolate_packed_sequences_are_refused(shards, tmp_path):
    opt = dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32)
    with pytest.raises(ValueError, match="OPTForCausalLM .* does not isolate packed sequences"):
        Trainer(make_config(shards, tmp_path / "opt", student_config=opt, packing=True))
    with Trainer(make_config(shards, tmp_path / "opt-padded", student_config=opt, eval_shards="")) as trainer:
        assert np.isfinite(trainer.train_step()["loss"])  # the same student trains unpacked

    class Protocol(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 8)
            self.output_weight = torch.nn.Parameter(torch.zeros(VOCAB, 8))

        def forward(self, input_ids):
            return self.embed(input_ids)

    with pytest.raises(ValueError, match="packing = true needs a Hugging Face student"):
        Trainer(make_config(shards, tmp_path / "protocol", student_config="", packing=True), model=Protocol())


def test_padded_batches_are_unchanged_by_the_packing_code(chat_shards):
    """collate keeps one sequence per row, without position_ids (the student's default positions)."""
    dataset = ShardDataset(chat_shards["train"], shuffle=False)
    samples = [dataset[i] for i in range(4)]
    batch = collate(samples)
    assert "position_ids" not in batch and batch["input_ids"].shape[0] == 4
    for i, sample in enumerate(samples):
        assert batch["input_ids"][i, :len(sample["input_ids"])].tolist() == sample["input_ids"].tolist()
