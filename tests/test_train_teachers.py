"""Teachers inside the trainer (kdfast.train.teachers): a live teacher for every divergence, the
hidden-state loss, on-policy micro-batches, several teachers' shard sets, and their bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdfast import kd_loss
from kdfast.shards import IGNORE_INDEX
from kdfast.train import TrainConfig, Trainer
from kdfast.train.data import collate
from kdfast.train.student import DistillationModule
from kdfast.train.teachers import HiddenStateLoss, LiveTeacher, is_on_policy, prompts
from tests.train_support import SEQ, STUDENT, VOCAB, make_config, shards, train_losses  # noqa: F401

transformers = pytest.importorskip("transformers")

TEACHER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
DIVERGENCES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("skew_kl", {"alpha": 0.2}),
               ("skew_reverse_kl", {"alpha": 0.2})]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny Llama teacher (3 layers, width 64: wider and deeper than the student) saved to a directory."""
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEACHER))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    model.save_pretrained(path)
    return path


def tiny_student(dtype=torch.float32):
    torch.manual_seed(2)
    config = transformers.LlamaConfig(**{k: v for k, v in STUDENT.items() if k != "model_type"})
    return transformers.LlamaForCausalLM(config).to(dtype)


def chat_like_batch(rows: int = 3, length: int = 12):
    """input_ids [B, L] and labels [B, L] whose first positions (a "prompt") and padding are not learned."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels = torch.roll(ids, -1, 1)
    for r in range(rows):
        labels[r, : 2 + r] = IGNORE_INDEX  # prompt
        labels[r, length - 1 - r:] = IGNORE_INDEX  # end of the sequence / padding
    return {"input_ids": ids, "labels": labels}


def gradients(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("divergence, extra", DIVERGENCES)
def test_live_teacher_loss_equals_full_logits(teacher_dir, divergence, extra, dtype):
    """The live-teacher loss and the student's gradients equal kd_loss over both models' full logits
    (float64, torch reference backend) at the labelled positions."""
    teacher = LiveTeacher(str(teacher_dir), str(dtype).removeprefix("torch."), torch.device("cpu"), VOCAB)
    options = dict(teacher_kind="logits", tail=False, temperature=2.0, hard_weight=0.3, soft_weight=0.7,
                   scale_t2=True, divergence=divergence, chunk_size=5, backend=None, **extra)
    batch = chat_like_batch()
    num_items = (batch["labels"] != IGNORE_INDEX).sum()
    module = DistillationModule(tiny_student(dtype), options, live_teacher=teacher)
    loss, parts, _ = module(batch, num_items=num_items)
    loss.backward()

    reference = tiny_student(torch.float64)
    labelled = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        teacher_logits = teacher.model.double()(batch["input_ids"]).logits[labelled]
    teacher.model.to(dtype)
    student_logits = reference(batch["input_ids"]).logits[labelled]
    expected, expected_parts = kd_loss(student_logits, batch["labels"][labelled], teacher_logits=teacher_logits,
                                       backend="torch", return_components=True,
                                       **{k: v for k, v in options.items() if k not in ("chunk_size", "backend")})
    expected.backward()
    rtol, atol = (1e-9, 1e-11) if dtype == torch.float64 else (2e-4, 2e-6)
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(parts.kd.double(), expected_parts.kd.double(), rtol=max(rtol, 1e-6), atol=atol)  # float32
    actual, wanted = gradients(module.student), gradients(reference)
    assert actual.keys() == wanted.keys()
    for name in wanted:
        torch.testing.assert_close(actual[name].double(), wanted[name], rtol=rtol * 50, atol=atol * 50, msg=name)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_state_loss_equals_hand_written(teacher_dir, kind):
    """The hidden-state term (with projections 32 -> 64) equals the formula written out by hand, and its
    gradient reaches the student and the projections."""
    teacher = LiveTeacher(str(teacher_dir), "float64", torch.device("cpu"), VOCAB)
    student = tiny_student(torch.float64)
    layer_map = [[1, 2], [2, 3]]
    hidden_loss = HiddenStateLoss(kind, 0.5, layer_map, 2, 32, 3, 64).double()
    options = dict(teacher_kind="logits", tail=False, temperature=1.0, hard_weight=0.0, soft_weight=1.0,
                   scale_t2=True, divergence="forward_kl", beta=0.5, chunk_size=None, backend=None)
    module = DistillationModule(student, options, live_teacher=teacher, hidden_loss=hidden_loss)
    batch = chat_like_batch()
    labelled = batch["labels"] != IGNORE_INDEX
    num_items = labelled.sum()
    _, _, term = module(batch, num_items=num_items)

    s_states = student(batch["input_ids"], output_hidden_states=True).hidden_states
    t_states = teacher.model(batch["input_ids"], output_hidden_states=True).hidden_states
    total = 0.0
    for (s, t), projection in zip(layer_map, hidden_loss.projections):
        a = s_states[s][labelled] @ projection.weight.T
        b = t_states[t][labelled]
        if kind == "cosine":
            per_row = 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        else:
            per_row = ((a - b) ** 2).sum(-1) / b.shape[-1]
        total = total + per_row.sum()
    expected = 0.5 * total / num_items
    torch.testing.assert_close(term.double(), expected.detach(), rtol=1e-6, atol=1e-9)
    with_term, _, _ = module(batch, num_items=num_items)
    with_term.backward()
    assert hidden_loss.projections[0].weight.grad is not None and hidden_loss.projections[0].weight.grad.abs().sum() > 0


def test_hidden_layer_map_out_of_range():
    with pytest.raises(ValueError, match=r"hidden_layer_map: pair \[1, 4\] is out of range"):
        HiddenStateLoss("mse", 1.0, [[1, 4]], 2, 32, 3, 64)


def test_teacher_with_another_vocabulary(tmp_path):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TEACHER, "vocab_size": VOCAB + 8}))
    model.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="vocabulary of 264 tokens but the student has 256"):
        LiveTeacher(str(tmp_path / "other"), "float32", torch.device("cpu"), VOCAB)


@pytest.mark.parametrize("values, match", [
    (dict(on_policy_fraction=0.5), "on_policy_fraction > 0 needs a live teacher"),
    (dict(divergence="jsd"), "needs a dense teacher"),
    (dict(hidden_loss="cosine", hidden_layer_map=[[1, 1]]), "hidden_loss needs a live teacher"),
    (dict(teacher="t", hidden_loss="mse"), "hidden_layer_map must be a non-empty list"),
    (dict(teacher="t", tail=True), "tail = true is for shard targets"),
    (dict(teacher="t", divergence="kl"), "divergence must be one of"),
])
def test_teacher_keys_bad_input(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({"train_shards": "data", **values})


def test_teacher_weights_must_match_the_list():
    with pytest.raises(ValueError, match="teacher_weights has 1 entry for 2 teacher_shards directories"):
        TrainConfig.from_dict({"teacher_shards": ["a", "b"], "teacher_weights": [1.0]})
    with pytest.raises(ValueError, match="give train_shards or teacher_shards, not both"):
        TrainConfig.from_dict({"train_shards": "c", "teacher_shards": ["a", "b"], "teacher_weights": [1.0, 1.0]})


def test_live_teacher_run_trains_and_resumes_exactly(shards, teacher_dir, tmp_path):  # noqa: F811
    """jsd against a live teacher with a hidden-state loss and on-policy micro-batches: the run trains, a
    run stopped at step 3 and resumed gives the same losses, and final/ holds the projections."""
    settings = dict(teacher=str(teacher_dir), divergence="jsd", beta=0.5, hidden_loss="cosine",
                    hidden_layer_map=[[2, 3]], on_policy_fraction=0.5, max_new_tokens=6, max_steps=6,
                    micro_batch_size=2, grad_accum_steps=2, save_every=3)
    straight = tmp_path / "straight"
    with Trainer(make_config(shards, straight, **settings)) as trainer:
        summary = trainer.train()
    assert summary["status"] == "completed" and np.isfinite(summary["train_loss"])
    assert (straight / "final" / "hidden_projections.pt").exists()
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("generation_tokens_per_s", 0) > 0 for r in records)
    assert all("hidden" in r for r in records if "loss" in r)

    cut = make_config(shards, tmp_path / "cut", **settings)
    with Trainer(cut) as trainer:
        first_half = [trainer.train_step()["loss"] for _ in range(3)]
        trainer.save_checkpoint()
    with Trainer(make_config(shards, tmp_path / "cut", **settings, resume=True)) as trainer:
        assert trainer.step == 3
        trainer.train()
    second_half = train_losses(tmp_path / "cut")
    expected = train_losses(straight)
    np.testing.assert_allclose(first_half + [second_half[s] for s in (4, 5, 6)], [expected[s] for s in range(1, 7)],
                               rtol=1e-6, atol=0)


def test_resume_with_another_teacher_is_refused(shards, teacher_dir, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    with Trainer(make_config(shards, run, teacher=str(teacher_dir), max_steps=1)) as trainer:
        trainer.train()
    other = tmp_path / "other-teacher"
    torch.manual_seed(9)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEACHER)).save_pretrained(other)
    with pytest.raises(ValueError, match="trained with another teacher"):
        Trainer(make_config(shards, run, teacher=str(other), max_steps=2, resume=True))


def test_on_policy_batches_hold_only_student_tokens(shards, teacher_dir, tmp_path):  # noqa: F811
    """An on-policy micro-batch keeps each sequence's prompt and labels exactly the tokens the student
    wrote after it; the same (seed, step, micro-batch) writes the same tokens."""
    config = make_config(shards, tmp_path / "run", teacher=str(teacher_dir), on_policy_fraction=1.0, max_new_tokens=5,
                         micro_batch_size=3)
    with Trainer(config) as trainer:
        original = collate([trainer.train_data[int(i)] for i in trainer.train_data.sampler.order(0)[:3]])
        batch, on_policy, counts = trainer._next_micro_batch(0)
    assert on_policy
    for r, prompt in enumerate(prompts(original)):
        row_ids, row_labels = batch["input_ids"][r], batch["labels"][r]
        assert torch.equal(row_ids[: len(prompt)], prompt)
        learned = (row_labels != IGNORE_INDEX).nonzero().flatten()
        assert learned.tolist() == list(range(len(prompt) - 1, len(prompt) - 1 + len(learned)))
        assert 1 <= len(learned) <= 5
        assert torch.equal(row_labels[learned], row_ids[len(prompt): len(prompt) + len(learned)])
    assert counts[3] == (batch["labels"] != IGNORE_INDEX).sum()

    with Trainer(make_config(shards, tmp_path / "again", teacher=str(teacher_dir), on_policy_fraction=1.0,
                             max_new_tokens=5, micro_batch_size=3)) as trainer:
        repeat, _, _ = trainer._next_micro_batch(0)
    assert torch.equal(repeat["input_ids"], batch["input_ids"]) and torch.equal(repeat["labels"], batch["labels"])


def test_on_policy_choice_is_a_function_of_the_position():
    chosen = [is_on_policy(0, step, m, 0.5) for step in range(1, 201) for m in range(2)]
    assert chosen == [is_on_policy(0, step, m, 0.5) for step in range(1, 201) for m in range(2)]
    assert 0.4 < np.mean(chosen) < 0.6
    assert not any(is_on_policy(0, step, 0, 0.0) for step in range(1, 50))


# --- several teachers' shard sets --------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_sets(tmp_path_factory):
    """Two tiny teachers' captures (top-16 + tail and top-8 + tail) of the same 16 sequences, and a third
    capture of other sequences."""
    from kdfast.capture import capture

    root = tmp_path_factory.mktemp("teachers")
    tokens = np.random.default_rng(5).integers(0, VOCAB, (16, SEQ))
    paths = {}
    for name, seed, k, data in (("a", 0, 16, tokens), ("b", 1, 8, tokens), ("other", 1, 8, tokens[::-1].copy())):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEACHER)).eval()
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.3)
        paths[name] = root / name
        capture(lambda ids: model(ids).logits, data, paths[name], k=k, progress=False, teacher_name=f"teacher-{name}")
    return paths


def first_step(config: TrainConfig) -> tuple[float, dict[str, torch.Tensor]]:
    """The first step's loss and the student's gradients (no optimizer step)."""
    with Trainer(config) as trainer:
        num_items, sums = trainer.accumulate_gradients()
        return float(sums[0]), gradients(trainer.student)


@pytest.mark.parametrize("tail", [False, True])
def test_two_teacher_loss_is_the_weighted_sum(teacher_sets, tmp_path, tail):
    """teacher_shards = [a, b] with weights [0.3, 0.7] (summing to 1, so the hard CE adds up too): the first
    step's loss and gradients are 0.3 x the run on a + 0.7 x the run on b."""
    common = dict(eval_shards="", hard_weight=0.2, soft_weight=0.8, tail=tail, micro_batch_size=4,
                  grad_accum_steps=2)
    shards = {"train": teacher_sets["a"], "eval": ""}
    both = make_config(shards, tmp_path / "both", **common, train_shards="",
                       teacher_shards=[str(teacher_sets["a"]), str(teacher_sets["b"])], teacher_weights=[0.3, 0.7])
    loss, grads = first_step(both)
    loss_a, grads_a = first_step(make_config(shards, tmp_path / "a", **common))
    loss_b, grads_b = first_step(make_config(shards, tmp_path / "b", **common, train_shards=str(teacher_sets["b"])))
    assert loss == pytest.approx(0.3 * loss_a + 0.7 * loss_b, rel=1e-5)
    assert loss_a != pytest.approx(loss_b, rel=1e-3)  # the teachers differ: the test can tell them apart
    for name in grads:
        torch.testing.assert_close(grads[name], 0.3 * grads_a[name] + 0.7 * grads_b[name], rtol=1e-4, atol=1e-7,
                                   msg=name)


def test_teacher_shards_of_other_sequences_are_refused(teacher_sets, tmp_path):
    config = make_config({"train": "", "eval": ""}, tmp_path / "run", eval_shards="", train_shards="",
                         teacher_shards=[str(teacher_sets["a"]), str(teacher_sets["other"])], teacher_weights=[1, 1])
    with pytest.raises(ValueError, match="do not record the same source"):
        Trainer(config)


def word_tokenizer(prefix: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(VOCAB)}, unk_token=f"{prefix}0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token=f"{prefix}0")


def test_teacher_with_another_tokenizer_of_the_same_size(tmp_path):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEACHER))
    model.save_pretrained(tmp_path / "teacher")
    word_tokenizer("t").save_pretrained(tmp_path / "teacher")
    LiveTeacher(str(tmp_path / "teacher"), "float32", torch.device("cpu"), VOCAB, word_tokenizer("t"))
    with pytest.raises(ValueError, match="different tokenizers"):
        LiveTeacher(str(tmp_path / "teacher"), "float32", torch.device("cpu"), VOCAB, word_tokenizer("u"))
