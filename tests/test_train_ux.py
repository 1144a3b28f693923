"""kdfast train's user-facing behaviour: run_dir/final carries the student directory's tokenizer, a
finished run resumed is left untouched (it says so, exit code 0), and the command prints one start
summary line (parameters, device, dtype, data, steps)."""
from __future__ import annotations

import json

from kdfast.cli import main
from kdfast.shards import ShardDataset
from kdfast.train import Trainer, build_student
from tests.chat_support import chat_config, chat_shards  # noqa: F401
from tests.train_support import make_config, shards, transformers, write_toml  # noqa: F401


def test_final_carries_the_tokenizer_of_the_student_directory(chat_shards, tmp_path):
    run = tmp_path / "run"
    with Trainer(chat_config(chat_shards, run, student=str(chat_shards["model"]), student_config="",
                             max_steps=1)) as trainer:
        trainer.train()
    original = transformers.AutoTokenizer.from_pretrained(chat_shards["model"])
    saved = transformers.AutoTokenizer.from_pretrained(run / "final")
    messages = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on a mat"}]
    assert saved.get_vocab() == original.get_vocab()
    assert saved.apply_chat_template(messages) == original.apply_chat_template(messages)
    assert transformers.AutoModelForCausalLM.from_pretrained(run / "final").config.vocab_size == len(original)

    with Trainer(chat_config(chat_shards, tmp_path / "from-config", max_steps=1)) as trainer:
        trainer.train()
    assert (tmp_path / "from-config" / "final" / "model.safetensors").exists()
    assert not (tmp_path / "from-config" / "final" / "tokenizer_config.json").exists()


def fingerprint(run) -> dict:
    """Every file of the run with its inode and modification time (a rewrite changes them)."""
    return {str(p.relative_to(run)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_leaves_it_as_it_is(shards, tmp_path, capsys):
    run = tmp_path / "run"
    toml = write_toml(tmp_path / "run.toml", make_config(shards, run, max_steps=2))
    assert main(["train", "--config", str(toml)]) == 0
    before = fingerprint(run)
    assert "final/model.safetensors" in before and any(name.startswith("checkpoints/") for name in before)
    capsys.readouterr()

    assert main(["train", "--config", str(toml), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"run {run} is finished (step 2 of max_steps 2, summary.json: completed); nothing to do" in out
    assert fingerprint(run) == before  # no evaluation line, no new final model, summary or checkpoint

    assert main(["train", "--config", str(toml), "--resume", "--max-steps", "3"]) == 0  # more steps: it continues
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 3 and summary["status"] == "completed"


def test_the_start_summary_line(shards, tmp_path, capsys):
    config = make_config(shards, tmp_path / "run", max_steps=2, grad_accum_steps=2)
    assert main(["train", "--config", str(write_toml(tmp_path / "run.toml", config))]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kdfast train:")]
    parameters = sum(p.numel() for p in build_student(config).parameters())
    data = ShardDataset(shards["train"])
    assert lines == [f"kdfast train: student LlamaForCausalLM with {parameters:,} parameters, device cpu, dtype "
                     f"float32, data {len(data)} sequences with {data.learned_tokens:,} learned tokens (1 directory), "
                     "teacher shards, steps 0 -> 2 of 8 sequences"]
