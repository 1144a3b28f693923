"""Several training directories mixed by weight (train_shards = [a, b], train_weights): the order is a
pure function of (seed, epoch) with exact per-epoch quotas, rank slices tile it, the trainer reads the
right sequences and resumes exactly across an epoch boundary, a single directory keeps its order, and
bad inputs are errors naming the key or the directory."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from kdfast.cli import build_parser
from kdfast.shards import ShardDataset, ShardError
from kdfast.train import Trainer, config_from_args
from kdfast.train.data import MixtureSampler, ShardMixture, epoch_quotas, open_train_data
from tests.train_support import K, SEQ, STUDENT, VOCAB, make_config, shards, train_losses  # noqa: F401


def mixed_config(shards, run_dir, **overrides):
    """The 64 training and 16 held-out sequences of the shared fixture, mixed 0.7 / 0.3."""
    values = dict(train_shards=[str(shards["train"]), str(shards["eval"])], train_weights=[0.7, 0.3],
                  eval_shards="")
    return make_config(shards, run_dir, **{**values, **overrides})


def test_epoch_quotas_round_by_largest_remainder():
    assert epoch_quotas([64, 16], [0.7, 0.3]) == [56, 24]
    assert epoch_quotas([64, 16], []) == [64, 16]
    assert epoch_quotas([3, 4], [1, 1]) == [4, 3]  # 3.5 / 3.5: the tie goes to the first directory
    assert epoch_quotas([5, 5, 5], [1, 1, 1]) == [5, 5, 5]
    with pytest.raises(ValueError, match="train_weights: weight 1e-06 of directory 1 gives it no sample"):
        epoch_quotas([100, 1], [1, 1e-6])


def test_the_order_is_a_pure_function_of_seed_and_epoch():
    sampler = MixtureSampler([64, 16], [56, 24], seed=3)
    again = MixtureSampler([64, 16], [56, 24], seed=3)
    for epoch in range(3):
        assert np.array_equal(sampler.order(epoch), again.order(epoch))
    assert not np.array_equal(sampler.order(0), sampler.order(1))
    assert not np.array_equal(sampler.order(0), MixtureSampler([64, 16], [56, 24], seed=4).order(0))


def test_every_epoch_holds_the_quotas_and_each_directory_walks_its_own_passes():
    sampler = MixtureSampler([64, 16], [56, 24], seed=0)
    epochs = [sampler.order(e) for e in range(10)]
    for ids in epochs:
        assert len(ids) == 80 and int((ids < 64).sum()) == 56 and int((ids >= 64).sum()) == 24
    counts = Counter(np.concatenate(epochs).tolist())
    assert {counts[i] for i in range(64, 80)} == {15}  # 240 draws of 16 sequences: 15 whole passes
    assert {counts[i] for i in range(64)} == {8, 9} and sum(counts[i] for i in range(64)) == 560
    first = np.concatenate(epochs)[np.concatenate(epochs) < 64][:64]  # the first pass of directory 0
    assert sorted(first.tolist()) == list(range(64))


def test_rank_slices_tile_the_cut_epoch():
    whole = MixtureSampler([64, 16], [56, 24], seed=1).epoch_ids(2)
    ranks = [MixtureSampler([64, 16], [56, 24], seed=1, rank=r, world_size=3).order(2) for r in range(3)]
    assert all(len(ids) == 26 for ids in ranks)
    for r, ids in enumerate(ranks):
        assert np.array_equal(ids, whole[r:78:3])


def test_iteration_resumes_inside_an_epoch():
    sampler = MixtureSampler([64, 16], [56, 24], seed=0)
    walked = [i for _, i in zip(range(130), iter_epochs(sampler))]
    resumed = MixtureSampler([64, 16], [56, 24], seed=0, consumed=50)
    assert [i for _, i in zip(range(80), iter_epochs(resumed))] == walked[50:]


def iter_epochs(sampler):
    while True:
        yield from sampler


def test_the_mixture_reads_each_directory(shards, tmp_path):
    data = open_train_data(mixed_config(shards, tmp_path / "run"), 0, 1, VOCAB)
    assert isinstance(data, ShardMixture) and len(data) == 80 and data.sampler.per_rank == 80
    parts = [ShardDataset(shards["train"]), ShardDataset(shards["eval"])]
    assert data.learned_tokens == parts[0].learned_tokens + parts[1].learned_tokens
    for index, (part, local) in ((0, (0, 0)), (63, (0, 63)), (64, (1, 0)), (79, (1, 15))):
        for name, tensor in parts[part][local].items():
            torch.testing.assert_close(data[index][name], tensor, rtol=0, atol=0)


def test_one_directory_keeps_its_order(shards, tmp_path):
    single = open_train_data(make_config(shards, tmp_path / "a", seed=5), 0, 1, VOCAB)
    listed = open_train_data(make_config(shards, tmp_path / "b", seed=5, train_shards=[str(shards["train"])],
                                         train_weights=[2.0]), 0, 1, VOCAB)
    assert isinstance(listed, ShardDataset)
    assert np.array_equal(single.sampler.order(0), listed.sampler.order(0))


def test_mixed_training_resumes_exactly_across_an_epoch_boundary(shards, tmp_path):
    n, total = 5, 12  # 8 samples per step, 80 per epoch: the epoch ends in step 10
    config = mixed_config(shards, tmp_path / "full", max_steps=total, micro_batch_size=4, grad_accum_steps=2)
    with Trainer(config) as trainer:
        summary = trainer.train()
    assert summary["epoch"] == 1 and summary["status"] == "completed"
    expected = train_losses(tmp_path / "full")

    cut = replace(config, run_dir=str(tmp_path / "cut"))
    with Trainer(cut) as trainer:
        first = [trainer.train_step()["loss"] for _ in range(n)]
        trainer.save_checkpoint()
    with Trainer(replace(cut, resume=True)) as trainer:
        assert trainer.consumed == 8 * n
        trainer.train()
    rest = train_losses(tmp_path / "cut")
    assert first + [rest[s] for s in range(n + 1, total + 1)] == [expected[s] for s in range(1, total + 1)]


def test_mixed_directories_must_hold_the_same_targets(shards, tmp_path):
    from kdfast.capture import capture

    torch.manual_seed(0)
    logits = torch.randn(VOCAB) * 3
    tokens = np.random.default_rng(0).integers(0, VOCAB, (8, SEQ))
    for name, options in (("k8", dict(k=8)), ("t2", dict(k=K, temperature=2.0))):
        capture(lambda ids: logits.expand(*ids.shape, VOCAB), tokens, tmp_path / name, progress=False,
                teacher_name="fixed", **options)
    for name, key in (("k8", "k = 8"), ("t2", "capture_temperature = 2.0")):
        with pytest.raises(ValueError, match=f"train_shards: .*{name} has {key} but .*train has"):
            Trainer(mixed_config(shards, tmp_path / "run", train_shards=[str(shards["train"]), str(tmp_path / name)]))
    with pytest.raises(ShardError, match="vocabulary"):
        Trainer(mixed_config(shards, tmp_path / "run", student_config={**STUDENT, "vocab_size": VOCAB + 1}))


def test_bad_weights_are_named(shards, tmp_path):
    with pytest.raises(ValueError, match="train_weights has 3 entries for 2 train_shards directories"):
        mixed_config(shards, tmp_path / "run", train_weights=[0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match="train_weights has 2 entries for 1 train_shards directory"):
        make_config(shards, tmp_path / "run", train_weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="train_weights must be finite numbers > 0"):
        mixed_config(shards, tmp_path / "run", train_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="train_shards needs one or more non-empty directories"):
        make_config(shards, tmp_path / "run", train_shards=[])


def test_mixing_from_the_command_line():
    args = build_parser().parse_args(["train", "--train-shards", '["a/", "b/"]', "--train-weights", "[7, 3]",
                                      "--student", "s"])
    config = config_from_args(args)
    assert config.train_shards == ["a/", "b/"] and config.train_weights == [7.0, 3.0]
    assert config.train_dirs == ["a/", "b/"]
    assert config_from_args(build_parser().parse_args(["train", "--train-shards", "a/"])).train_dirs == ["a/"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--train-weights", "0.7"])
