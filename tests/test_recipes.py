"""The recipes of docs/recipes.md (examples/*.py) run, lower their held-out loss, and their Trainer
loss is the loss they claim: recomputed here on one batch from the models' dense logits, in plain
PyTorch (float64) or, for TRL's GKD, by GKDTrainer's own loss."""
from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPES = EXAMPLES.parent / "docs" / "recipes.md"


def load_example(name: str):
    """examples/<name>.py as a module (its ``import tiny`` resolved in examples/)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def threads():
    """Two threads at most, as the examples' command line sets, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)


def run_example(name: str, tmp_path_factory) -> tuple:
    module = load_example(name)
    return module, module.main(tmp_path_factory.mktemp(name))


def logged_training_losses(log: list[dict]) -> list[float]:
    return [record["loss"] for record in log if "loss" in record]


def reference_sparse_kd(logits, labels, indices, values, tail, hard_weight, soft_weight) -> torch.Tensor:
    """Mean over labelled rows of hard_weight * CE + soft_weight * KL(p || q) over the k slots plus one
    bucket for everything outside them: p = exp(values), p_out = exp(tail); q = softmax(logits),
    q_out = its mass outside the slots, summed directly. T = 1."""
    logits, values, tail = logits.double(), values.double(), tail.double()
    active = labels != -100
    logq = torch.log_softmax(logits, dim=-1)
    valid = indices >= 0
    slots = torch.where(valid, indices, 0).long()
    logq_slots = logq.gather(-1, slots)
    in_slots = torch.zeros_like(logq, dtype=torch.bool).scatter(-1, slots, valid)
    logq_out = torch.logsumexp(logq.masked_fill(in_slots, -torch.inf), dim=-1)
    kl_slots = torch.where(valid, values.exp() * (values - logq_slots), 0.0).sum(-1)
    kl_out = torch.where(tail > -torch.inf, tail.exp() * (tail - logq_out), 0.0)
    ce = -logq.gather(-1, torch.where(active, labels, 0).long()[..., None])[..., 0]
    rows = hard_weight * ce + soft_weight * (kl_slots + kl_out)
    return rows[active].mean()


def reference_dense_kd(student_logits, teacher_logits, labels, temperature, hard_weight, soft_weight):
    """Mean over labelled rows of hard_weight * CE + soft_weight * T^2 * KL(softmax(t / T) || softmax(s / T))."""
    s, t = student_logits.double(), teacher_logits.double()
    active = labels != -100
    logq, logp = torch.log_softmax(s / temperature, dim=-1), torch.log_softmax(t / temperature, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    ce = torch.nn.functional.cross_entropy(s.transpose(1, 2), torch.where(active, labels, 0).long(), reduction="none")
    rows = hard_weight * ce + soft_weight * temperature**2 * kl
    return rows[active].mean()


def test_every_code_block_of_the_recipes_is_in_the_example_it_names():
    """Each ```python block of docs/recipes.md, verbatim in the example file named last before it."""
    text = RECIPES.read_text()
    blocks = list(re.finditer(r"```python\n(.*?)```", text, re.S))
    assert len(blocks) == 4
    for block in blocks:
        path = re.findall(r"examples/\w+\.py", text[:block.start()])[-1]
        assert block[1] in (EXAMPLES.parent / path).read_text(), f"docs/recipes.md block not in {path}:\n{block[1]}"


@pytest.fixture(scope="module")
def shards_recipe(tmp_path_factory, threads):
    return run_example("hf_trainer_shards", tmp_path_factory)


@pytest.mark.slow
def test_trainer_on_shards_lowers_the_held_out_loss(shards_recipe):
    _, result = shards_recipe
    assert result["trainer"].state.global_step == 40
    assert result["eval_after"] < result["eval_before"] - 0.5, result
    losses = logged_training_losses(result["log"])
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_trainer_on_shards_computes_the_sparse_kd_loss_with_the_tail_bucket(shards_recipe):
    module, result = shards_recipe
    trainer = result["trainer"]
    batch = module.shard_batch([trainer.eval_dataset[i] for i in range(4)])
    model = trainer.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(model, batch)
        logits = model(input_ids=batch["input_ids"]).logits
    expected = reference_sparse_kd(logits, batch["labels"], batch["teacher_indices"], batch["teacher_values"],
                                   batch["teacher_tail"], hard_weight=0.2, soft_weight=0.8)
    assert (batch["teacher_tail"] > -torch.inf).any()  # the bucket is in play
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_trainer_on_shards_counts_the_accumulated_batch_over_the_shard_labels(shards_recipe):
    module, result = shards_recipe
    trainer = result["trainer"]
    batches = [module.shard_batch([trainer.train_dataset[i] for i in range(j, j + 8)]) for j in (0, 8)]
    learned = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert int(trainer._get_num_items_in_batch(batches, torch.device("cpu"))) == learned


@pytest.fixture(scope="module")
def live_recipe(tmp_path_factory, threads):
    return run_example("hf_trainer_live_teacher", tmp_path_factory)


@pytest.mark.slow
def test_trainer_with_a_live_teacher_lowers_the_held_out_loss(live_recipe):
    _, result = live_recipe
    assert result["trainer"].state.global_step == 40
    assert result["eval_after"] < result["eval_before"] - 0.5, result


@pytest.mark.slow
def test_trainer_with_a_live_teacher_computes_the_dense_kd_loss(live_recipe):
    module, result = live_recipe
    trainer = result["trainer"]
    batch = module.lm_batch([trainer.eval_dataset[i] for i in range(4)])
    model = trainer.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(model, batch)
        student = model(input_ids=batch["input_ids"]).logits[:, :-1]
        teacher = trainer.teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    expected = reference_dense_kd(student, teacher, batch["labels"][:, 1:], temperature=2.0, hard_weight=0.5,
                                  soft_weight=0.5)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.fixture(scope="module")
def gkd_recipe(tmp_path_factory, threads):
    pytest.importorskip("trl", minversion="1.16")
    return run_example("trl_gkd", tmp_path_factory)


@pytest.mark.slow
def test_gkd_with_the_kdfast_loss_trains_and_lowers_the_held_out_jsd(gkd_recipe):
    _, result = gkd_recipe
    assert result["trainer"].state.global_step == 30
    assert result["eval_after"] < result["eval_before"], result


@pytest.mark.slow
@pytest.mark.parametrize("num_items", [None, 37])
def test_gkd_with_the_kdfast_loss_equals_gkd_trainers_own_loss(gkd_recipe, num_items):
    from trl.experimental.gkd import GKDTrainer

    module, result = gkd_recipe
    trainer = result["trainer"]
    batch = module.prompt_completion_batch([trainer.eval_dataset[i] for i in range(4)])
    model = trainer.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
        trl_loss = GKDTrainer.compute_loss(trainer, model, batch, num_items_in_batch=num_items)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    per_token = float(trl_loss) * (num_items or tokens) / tokens
    assert 0 < per_token < math.log(2)  # beta = 0.5: at most log 2 per token
    assert float(got) == pytest.approx(float(trl_loss), rel=1e-5)
