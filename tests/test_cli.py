"""The command line itself: --version and the PyTorch thread count every computing command sets."""
from __future__ import annotations

import importlib.metadata
import re
import sys

import numpy as np
import pytest
import torch

import kdfast
from kdfast import cli
from kdfast.cli import main
from kdfast.report import usable_cpus

TOY_TEACHER = "import torch\nW = torch.randn(50, 50)\n\n\ndef teacher(ids):\n    return W[ids]\n"


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kdfast {importlib.metadata.version('kdfast')}"
    assert kdfast.__version__ == importlib.metadata.version("kdfast")


@pytest.fixture
def capture_argv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_teacher", raising=False)  # another test's toy_teacher.py
    (tmp_path / "toy_teacher.py").write_text(TOY_TEACHER)
    np.save("tokens.npy", np.random.default_rng(0).integers(0, 50, (4, 8)))
    before = torch.get_num_threads()
    torch.set_num_threads(usable_cpus() + 1)  # neither of the values the cases below expect
    yield ["capture", "--teacher", "toy_teacher:teacher", "--tokens", "tokens.npy", "--out", "out", "--k", "4",
           "--no-progress"]
    torch.set_num_threads(before)


@pytest.mark.parametrize("option,environment,expected,reason", [
    (["--threads", "1"], "3", 1, "--threads"),
    ([], "1", 1, "OMP_NUM_THREADS"),
    ([], None, usable_cpus(), "the CPUs this process may use"),
])
def test_threads_come_from_the_option_the_environment_or_the_affinity(capture_argv, monkeypatch, capsys, option,
                                                                      environment, expected, reason):
    if environment is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", environment)
    assert main(capture_argv + option) == 0
    assert torch.get_num_threads() == expected
    err = capsys.readouterr().err
    assert f"kdfast capture: {expected} PyTorch thread" in err and f"({reason};" in err


@pytest.mark.parametrize("usable,cpus,load,busy", [
    (2, 2, 0.2, 0), (2, 2, 0.6, 1), (2, 2, 1.4, 1), (2, 2, 1.6, 2), (2, 2, 7.0, 2),  # a 2-core machine
    (2, 64, 30.0, 1), (2, 64, 10.0, 0),  # 2 CPUs of a 64-CPU host: its load in proportion
    (8, 8, 3.4, 3),
])
def test_busy_cpus_are_the_load_average_in_proportion_to_the_usable_cpus(usable, cpus, load, busy):
    assert cli.busy_cpus(usable, cpus, load) == busy


def test_the_demo_leaves_the_busy_cpus_to_the_other_work(monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        threads = cli.set_threads(None, "demo")
        assert torch.get_num_threads() == threads
        assert cli.set_threads(1, "demo") == 1 == torch.get_num_threads()  # --threads still decides
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    busy = int(re.search(r"about (\d+) of them kept busy by other work: load average [\d.]+ on \d+ CPUs", err)[1])
    assert threads == max(1, usable_cpus() - busy) and f"kdfast demo: {threads} PyTorch thread" in err


@pytest.mark.parametrize("option,environment,problem", [
    (["--threads", "0"], None, "--threads must be >= 1, got 0"),
    ([], "many", "OMP_NUM_THREADS must be an integer, got 'many'"),
])
def test_bad_thread_counts_are_one_clear_line(capture_argv, monkeypatch, capsys, option, environment, problem):
    if environment is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", environment)
    assert main(capture_argv + option) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err


def test_inspect_shows_the_format_the_learned_count_and_a_masked_position(tmp_path, capsys):
    from kdfast.shards import ShardWriter

    rng = np.random.default_rng(0)
    learned = np.array([True, False, True, True])
    with ShardWriter(tmp_path / "shards", vocab_size=50, k=2) as writer:
        values = np.log(np.full((3, 2), 0.25, np.float32))
        writer.add(rng.integers(0, 50, 4), rng.integers(0, 50, (3, 2)), values, np.log(np.full(3, 0.5)),
                   mask=learned)
    assert main(["inspect", str(tmp_path / "shards"), "--position", "1"]) == 0
    out = capsys.readouterr().out
    assert "format       version 2" in out
    assert "tokens       4" in out and "learned      3" in out
    assert "this position is not learned" in out and "rank" not in out
    assert main(["inspect", str(tmp_path / "shards"), "--position", "2"]) == 0
    assert "rank" in capsys.readouterr().out


def test_a_non_finite_training_loss_is_one_clear_line(monkeypatch, capsys):
    import kdfast.train

    def non_finite(args):
        raise FloatingPointError("step 3: the loss is nan and the gradient norm nan; the step was not taken")

    monkeypatch.setattr(kdfast.train, "run_train", non_finite)
    assert main(["train", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "kdfast train: error: step 3: the loss is nan" in err and "Traceback" not in err
