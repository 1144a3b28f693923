"""kdfast.train's configuration: TOML, command line, type checks, removed keys; and that building it
(``kdfast verify --help`` builds every command's parser) imports no torch."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kdfast.cli import build_parser
from kdfast.train import config_from_args, load_config
from tests.train_support import REPO, STUDENT, make_config, shards, subprocess_env, write_toml  # noqa: F401


def test_config_from_toml_and_command_line(shards, tmp_path):
    toml = write_toml(tmp_path / "run.toml", make_config(shards, tmp_path / "run"))
    args = build_parser().parse_args(["train", "--config", str(toml), "--lr", "5e-4", "--max-steps", "7", "--tail",
                                      "--scale_t2", "false", "--student_config", '{"model_type": "llama"}'])
    config = config_from_args(args)
    assert (config.lr, config.max_steps, config.tail, config.scale_t2) == (5e-4, 7, True, False)
    assert config.student_config == {"model_type": "llama"}
    assert load_config(toml).student_config == STUDENT
    assert config.micro_batch_size == 4 and config.train_shards == str(shards["train"])

    with pytest.raises(ValueError, match="'lrr' .*did you mean 'lr'"):
        load_config(toml, {"lrr": 1.0})
    with pytest.raises(ValueError, match="max_steps must be int"):
        load_config(toml, {"max_steps": 2.5})
    with pytest.raises(ValueError, match="tail must be bool"):
        load_config(toml, {"tail": 1})
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        load_config(toml, {"micro_batch_size": 0})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--max-steps", "many"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--resume", "maybe"])
    assert load_config(toml, {"lr": 1}).lr == 1.0 and isinstance(load_config(toml, {"lr": 1}).lr, float)


def test_misspelt_keys_are_unknown_with_a_suggestion(shards, tmp_path):
    toml = write_toml(tmp_path / "run.toml", make_config(shards, tmp_path / "run"))
    with pytest.raises(ValueError, match="unknown key.*'divergance' \\(did you mean 'divergence'\\?\\)"):
        load_config(toml, {"divergance": "jsd"})
    assert load_config(toml, {"divergence": "forward_kl"}).divergence == "forward_kl"


@pytest.mark.parametrize("code", ["import kdfast.train.config", "import kdfast.train",
                                  "from kdfast.train import TrainConfig, add_train_arguments, run_train"])
def test_the_config_imports_no_torch(code):
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120, check=True)
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "kdfast.train.config" in imported
    assert not [name for name in imported if name.split(".")[0] == "torch"], "torch imported"
