"""`kdfast demo`: the whole distillation job end to end, offline, on a CPU, in minutes.

Stages (each timed; the report lists time and tokens/s per stage):

1. corpus     The Python standard library's own ``.py`` sources (code, docstrings, and the
              language reference text in ``pydoc_data``), found under ``sysconfig``'s ``stdlib``
              path: no download, identical on every machine with the same Python. Files are
              ordered by the SHA-1 of their relative path (a fixed shuffle, so the split is not
              alphabetical by package); the first ones form the held-out split, the next ones the
              train split, up to a character budget each. Tests (``test/``, ``idle_test/``, ...)
              and the codec tables in ``encodings/`` are left out.
2. tokenizer  A byte-level BPE (Hugging Face ``tokenizers``) trained on the train split only,
              vocabulary 16384 in both modes (training takes seconds, and a realistic vocabulary is
              the point of a large-vocabulary loss), saved as a directory that
              ``transformers.PreTrainedTokenizerFast`` / ``AutoTokenizer`` load.
3. teacher    A Llama-architecture model built from a ``LlamaConfig`` (tied embeddings: at this
              size the embedding is most of the parameters), trained with a plain PyTorch loop
              (AdamW, warm-up + cosine) on random windows of the whole train split.
4. capture    ``kdfast.capture.capture`` (what ``kdfast capture`` runs): the teacher's top-k
              log-probs (and tail mass) of the first ``capture_sequences`` train sequences, and of
              the held-out sequences (for the trainer's evaluation curve).
5. distill    ``kdfast.train.Trainer`` (what ``kdfast train`` runs) from the shards: forward KL
              to the top-k targets with the missing-mass bucket (``tail = true``, T = 1 = the
              capture temperature), plus a small weight on the hard labels.
6. baseline   the same trainer with ``soft_weight = 0, hard_weight = 1``: the same saved student
              initialization, the same sequences in the same order, the same steps, schedule and
              learning rate; only the two loss weights differ.
7. report     Held-out cross-entropy / perplexity, top-1 accuracy, top-1 agreement with the
              teacher and expected calibration error (15 equal-width bins of the top-1
              probability) for the three models, from ``kdfast.evaluate.evaluate`` on the held-out
              shards (what ``kdfast eval`` runs); tokens/s and time per stage; shard bytes per
              token; the machine (``kdfast.report.describe_machine``). Written to ``report.md``
              (+ ``report.json``) with ``curves.png``.

Each student run's TrainConfig is also written as ``configs/<run>.toml``:
``kdfast train --config configs/distill.toml --run-dir new-dir`` repeats the distilled run.

Resuming. Every stage writes its files to temporary names in their directory and renames them into
place; then it is added to ``stages.json`` (``StageRecords``: the run's settings, and per finished
stage its time, tokens, note, thread count and result: token counts, parameter counts, the trainer
summaries, the scores). Rerunning the same command with the same ``--out`` after an interruption skips
the recorded stages, taking their results from the records, and runs the others: an interrupted
capture continues after its last complete shard (``kdfast.capture``), an interrupted student run from
its newest checkpoint (``resume``), any other stage starts again. The report is rebuilt from the
records, so on the same machine with the same thread count it equals an uninterrupted run's except
for times and load; the time of a stage that was interrupted is its last attempt's. Other settings
(``--quick``, ``--seed``) with an existing run are refused with the settings that differ; a non-empty
directory without ``stages.json`` is refused too.

``--quick`` is the same pipeline at a size that CI runs (under a minute on two cores): 60 student
steps of a 1.1 M student from a 2.5 M teacher, there to prove that every stage works rather than to
make a point. The full run takes about six minutes on two cores.

What decides whether the distilled student wins (ablations with this pipeline, one seed each, in
docs/demo-report.md): with the demo's loss (tail bucket, 0.2 hard / 0.8 soft, k = 64) distillation
closed 40-54% of the gap between the hard-label baseline and the teacher in all five runs, so the
teacher must be clearly better than the student can become on its own in the same steps (a
300-step teacher 0.12 nats/token ahead of the baseline gave 0.06; the 600-step one, 0.64 ahead,
gives 0.31). The tail bucket matters with top-k targets: a renormalized top-k target says that
everything outside the k is impossible. A little hard-label weight matters too: the bucket says
nothing about how the mass is spread inside it (soft only: no gain; 0.5 / 0.5 closed 33%).
k = 64 beat 16 and 256 at this budget.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kdfast.evaluate import count_parameters
from kdfast.report import describe_machine, load_average, markdown_table, plot_comparison

__all__ = ["DemoConfig", "FULL", "QUICK", "run_demo", "summary_text"]

EOS = "<|endoftext|>"
RECORDS = "stages.json"  # the run's settings and finished stages (StageRecords)
RECORDS_FORMAT = 1
_SKIPPED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class DemoConfig:
    """Every size and hyperparameter of one demo run."""

    name: str
    train_chars: int
    heldout_chars: int
    vocab_size: int
    seq_len: int
    teacher: ModelSize
    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    student: ModelSize
    capture_sequences: int
    k: int
    student_steps: int
    student_batch: int
    student_lr: float
    temperature: float
    hard_weight: float
    soft_weight: float
    eval_sequences: int
    seed: int = 0


# The teacher's 600 steps are most of the full run's time and what the gain depends on most (module
# docstring). The 800 captured sequences hold a sixth of the tokens the teacher trained on (capture
# costs a teacher forward pass per token); the students' 200 steps are two passes over them.
FULL = DemoConfig(
    name="full", train_chars=4_000_000, heldout_chars=300_000, vocab_size=16384, seq_len=128,
    teacher=ModelSize(256, 4, 4, 688), teacher_steps=600, teacher_batch=8, teacher_lr=3e-3,
    student=ModelSize(128, 2, 2, 344), capture_sequences=800, k=64,
    student_steps=200, student_batch=8, student_lr=3e-3,
    temperature=1.0, hard_weight=0.2, soft_weight=0.8, eval_sequences=128,
)
# BPE needs about 2.5 M characters of this corpus to reach 16384 tokens, so quick mode keeps the
# vocabulary and shrinks the models, the steps and the captured sequences instead.
QUICK = DemoConfig(
    name="quick", train_chars=3_000_000, heldout_chars=60_000, vocab_size=16384, seq_len=128,
    teacher=ModelSize(128, 2, 2, 344), teacher_steps=80, teacher_batch=8, teacher_lr=3e-3,
    student=ModelSize(64, 1, 1, 172), capture_sequences=160, k=32,
    student_steps=60, student_batch=8, student_lr=3e-3,
    temperature=1.0, hard_weight=0.2, soft_weight=0.8, eval_sequences=64,
)


@dataclass
class Stage:
    """One timed stage: ``tokens`` is what it processed (read, encoded, trained on, captured);
    ``threads``: the PyTorch threads it ran with."""

    name: str
    seconds: float
    tokens: int | None = None
    note: str = ""
    threads: int | None = None

    @property
    def tokens_per_second(self) -> float | None:
        return None if not self.tokens or self.seconds <= 0 else self.tokens / self.seconds


@dataclass
class Corpus:
    train: list[str]
    heldout: list[str]
    train_files: list[str]
    heldout_files: list[str]

    @property
    def chars(self) -> int:
        return sum(map(len, self.train)) + sum(map(len, self.heldout))


# ----------------------------------------------------------------------------------------------
# 1. corpus
# ----------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The standard library's directory (``sysconfig``'s ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's .py files in a fixed, platform-independent pseudo-random order."""
    root = Path(root or stdlib_root())
    files = [p for p in root.rglob("*.py") if not _SKIPPED_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest())


def read_source(path: Path) -> str:
    """One source file's text (undecodable bytes replaced, so every file reads)."""
    return path.read_text(encoding="utf-8", errors="replace")


def build_corpus(train_chars: int, heldout_chars: int, root: Path | None = None) -> Corpus:
    """Whole files, held-out first then train, each split filled up to its character budget."""
    root = Path(root or stdlib_root())
    corpus = Corpus([], [], [], [])
    chars = {"heldout": 0, "train": 0}
    for path in stdlib_sources(root):
        if chars["train"] >= train_chars:
            break
        text = read_source(path)
        if not text.strip():
            continue
        split = "heldout" if chars["heldout"] < heldout_chars else "train"
        chars[split] += len(text)
        getattr(corpus, split).append(text)
        getattr(corpus, f"{split}_files").append(path.relative_to(root).as_posix())
    if not corpus.train or not corpus.heldout:
        raise RuntimeError(f"kdfast demo: too little Python source under {root} for a train and a held-out split")
    return corpus


def load_corpus(listing: Path) -> Corpus:
    """The corpus that ``corpus.json`` (its root and the two file lists) names, read again from disk."""
    files = json.loads(listing.read_text())
    root = Path(files["root"])
    return Corpus([read_source(root / name) for name in files["train_files"]],
                  [read_source(root / name) for name in files["heldout_files"]],
                  files["train_files"], files["heldout_files"])


# ----------------------------------------------------------------------------------------------
# 2. tokenizer
# ----------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE on ``texts``, saved as a PreTrainedTokenizerFast directory; returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out_dir)
    return fast


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """[T] int32: every document's ids followed by EOS, concatenated in order."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int32)


def cut_sequences(stream: np.ndarray, seq_len: int, count: int | None = None) -> np.ndarray:
    """[N, L] non-overlapping windows from the start of ``stream`` (at most ``count``)."""
    available = len(stream) // seq_len
    n = available if count is None else min(count, available)
    return np.ascontiguousarray(stream[: n * seq_len].reshape(n, seq_len))


# ----------------------------------------------------------------------------------------------
# 3. models
# ----------------------------------------------------------------------------------------------


def llama_config(size: ModelSize, vocab_size: int, seq_len: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=seq_len, tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def new_model(size: ModelSize, vocab_size: int, seq_len: int, eos_id: int, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(size, vocab_size, seq_len, eos_id))


def train_teacher(model, stream: np.ndarray, cfg: DemoConfig, progress: bool = True) -> list[dict]:
    """Plain PyTorch next-token training on random windows of ``stream`` (AdamW, the trainer's
    warm-up + cosine schedule: 10% warm-up, cosine to 10%); returns the loss log."""
    from tqdm import tqdm

    from kdfast.train import warmup_cosine

    generator = torch.Generator().manual_seed(cfg.seed)
    data = torch.from_numpy(stream.astype(np.int64))  # [T]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.teacher_lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, cfg.teacher_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, warmup=warmup, total=cfg.teacher_steps, floor=0.1))
    offsets = torch.arange(cfg.seq_len)
    log = []
    model.train()
    for step in tqdm(range(cfg.teacher_steps), desc="teacher", disable=not progress):
        starts = torch.randint(0, len(data) - cfg.seq_len, (cfg.teacher_batch, 1), generator=generator)
        input_ids = data[starts + offsets]  # [B, L]
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "tokens": (step + 1) * cfg.teacher_batch * cfg.seq_len, "loss": loss.item()})
    model.eval()
    return log


# ----------------------------------------------------------------------------------------------
# 7. evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Held-out next-token metrics of one model (the learned positions 0..L-2 of every held-out
    sequence), as ``kdfast.evaluate`` measures them against the held-out shards' teacher top-1."""

    ce: float
    perplexity: float
    accuracy: float
    agreement: float
    ece: float
    tokens: int
    parameters: int


def evaluate_models(models: dict[str, Path], shards: Path) -> dict[str, Scores]:
    """Scores of every model on the held-out shard directory ``shards`` (``kdfast.evaluate.evaluate``)."""
    from kdfast.evaluate import evaluate

    report = evaluate(models, shards, device="cpu", generate_tokens=0, progress=False)
    scores = {}
    for name, model in report["models"].items():
        result = model["data"]["in-distribution"]
        scores[name] = Scores(ce=result["ce"], perplexity=result["perplexity"], accuracy=result["accuracy"],
                              agreement=result["agreement"], ece=result["ece"], tokens=result["tokens"],
                              parameters=model["parameters"])
    return scores


# ----------------------------------------------------------------------------------------------
# 4.-6. the student runs' settings
# ----------------------------------------------------------------------------------------------


def student_settings(cfg: DemoConfig, *, train_shards: Path, eval_shards: Path, student: Path, run_dir: Path,
                     hard_weight: float, soft_weight: float, progress: bool) -> dict:
    """TrainConfig keys of one student run; distill and baseline differ only in the two weights.

    Four checkpoints per run, and ``resume``: a rerun of an interrupted demo continues a student run
    from its newest checkpoint (in a new ``run_dir`` there is none, and the run starts fresh)."""
    return {
        "train_shards": str(train_shards), "eval_shards": str(eval_shards), "run_dir": str(run_dir),
        "student": str(student), "temperature": cfg.temperature, "tail": True,
        "hard_weight": hard_weight, "soft_weight": soft_weight,
        "max_steps": cfg.student_steps, "micro_batch_size": cfg.student_batch, "lr": cfg.student_lr,
        "warmup_steps": max(1, cfg.student_steps // 10), "min_lr_ratio": 0.1, "seed": cfg.seed, "device": "cpu",
        "eval_every": max(1, cfg.student_steps // 5), "eval_sequences": cfg.eval_sequences,
        "log_every": max(1, cfg.student_steps // 50), "save_every": max(1, cfg.student_steps // 4),
        "keep_checkpoints": 1, "resume": True, "progress": progress,
    }


def to_toml(values: dict) -> str:
    """Flat TOML (``kdfast train --config``) of string, bool and number values."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


# ----------------------------------------------------------------------------------------------
# Files written atomically, and the stage records
# ----------------------------------------------------------------------------------------------


def _temporary_name(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (same directory, so the rename is atomic)."""
    return path.with_name(f".tmp-{path.name}")


def _publish_file(tmp: Path, path: Path) -> None:
    """fsync the finished ``tmp`` and rename it to ``path`` (replacing an older ``path``)."""
    from kdfast._io import fsync_path

    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.write_text(text)
    _publish_file(tmp, path)


def write_json_atomically(path: Path, obj) -> None:
    write_text_atomically(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def save_array_atomically(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array)
    _publish_file(tmp, path)


def publish_directory(path: Path, write):
    """``write(tmp)`` fills a fresh temporary directory beside ``path``, which is then fsynced and renamed
    to ``path`` (replacing an older one); returns what ``write`` returned."""
    from kdfast.train.checkpoint import publish_dir

    tmp = _temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted attempt
    tmp.mkdir(parents=True)
    result = write(tmp)
    publish_dir(tmp, path)
    return result


class StageRecords:
    """``out/stages.json``: the run's settings and, for every finished stage, its ``Stage`` fields and
    its result (a JSON object: what later stages and the report need from it).

    A stage is added only once all its outputs are in place, and the file is rewritten atomically, so a
    stage listed here is complete: a rerun skips it and takes its result from here."""

    def __init__(self, path: Path, settings: dict, finished: dict[str, dict]):
        self.path, self.settings, self.finished = path, settings, finished

    @classmethod
    def open(cls, out: Path, settings: dict) -> StageRecords:
        """The records of the demo run in ``out``, or new ones when ``out`` is new or empty.

        Raises ValueError when ``out`` holds something else, or a run with other settings."""
        path = out / RECORDS
        settings = _json_roundtrip(settings)
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("format") != RECORDS_FORMAT:
                raise ValueError(f"{path}: stage records of format {saved.get('format')!r}, this kdfast writes "
                                 f"format {RECORDS_FORMAT}; choose a new --out")
            differences = settings_differences(saved["settings"], settings)
            if differences:
                raise ValueError(f"--out {out} holds a kdfast demo run with other settings "
                                 f"({'; '.join(differences)}); rerun with that run's settings (--quick, --seed) to "
                                 "continue it, or choose a new --out")
            return cls(path, settings, saved["stages"])
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"--out {out} is not an empty directory and holds no kdfast demo run (no {RECORDS}); "
                             "choose a new or empty directory")
        out.mkdir(parents=True, exist_ok=True)
        records = cls(path, settings, {})
        records.save()
        return records

    def add(self, stage: Stage, result) -> None:
        """Record ``stage`` as finished with ``result``."""
        self.finished[stage.name] = {"stage": asdict(stage), "result": result}
        self.save()

    def save(self) -> None:
        write_json_atomically(self.path, {"format": RECORDS_FORMAT, "settings": self.settings,
                                          "stages": self.finished})


def settings_differences(saved: dict, wanted: dict) -> list[str]:
    """``"key <saved> there, <wanted> here"`` for every setting that differs (nested keys dotted)."""
    saved, wanted = _flatten(saved), _flatten(wanted)
    return [f"{key} {saved.get(key)!r} there, {wanted.get(key)!r} here"
            for key in sorted(saved.keys() | wanted.keys()) if saved.get(key) != wanted.get(key)]


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _json_roundtrip(obj):
    """``obj`` as it reads back from JSON (lists for tuples), so a fresh result and a recorded one are equal."""
    return json.loads(json.dumps(obj, default=_json_default))


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


class _Stages:
    """Runs the stages in order. A stage the records list as finished is skipped and its recorded result
    returned; any other runs, timed, and is recorded once its outputs are in place."""

    def __init__(self, records: StageRecords):
        self.records = records
        self.stages: list[Stage] = []
        self.reused: list[str] = []  # finished by an earlier run

    def run(self, name: str, fn, *, tokens=None, note="") -> dict:
        """``fn()``'s result (a JSON object); ``tokens`` and ``note`` may be functions of it."""
        if name in self.records.finished:
            record = self.records.finished[name]
            stage = Stage(**record["stage"])
            print(f"[kdfast demo] {name}: finished by an earlier run in {stage.seconds:.1f} s; skipped", flush=True)
            self.stages.append(stage)
            self.reused.append(name)
            return record["result"]
        print(f"[kdfast demo] {name} ...", flush=True)
        began = time.perf_counter()
        result = _json_roundtrip(fn())
        stage = Stage(name, time.perf_counter() - began, tokens(result) if callable(tokens) else tokens,
                      note(result) if callable(note) else note, threads=torch.get_num_threads())
        self.records.add(stage, result)
        self.stages.append(stage)
        rate = f", {stage.tokens_per_second:,.0f} tokens/s" if stage.tokens_per_second else ""
        print(f"[kdfast demo] {name}: {stage.seconds:.1f} s{rate}", flush=True)
        return result

    def reused_seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages if stage.name in self.reused)


def run_demo(out: Path, cfg: DemoConfig, progress: bool = True) -> dict:
    """Every stage of the demo into ``out``; returns the report (also written as report.json / report.md).

    ``out`` new or empty: a new run. ``out`` holding a demo run with the same settings (``cfg``): the
    stages it finished are skipped and the others run (an interrupted capture or student run continues
    where it stopped). Anything else raises ValueError."""
    out = Path(out).resolve()
    records = StageRecords.open(out, asdict(cfg))
    from kdfast.capture import transformers_progress_bars

    with transformers_progress_bars(progress):
        return _Pipeline(out, cfg, records, progress).run()


class _Pipeline:
    """The stages in order; each stage method leaves its files under ``out`` and returns its result."""

    def __init__(self, out: Path, cfg: DemoConfig, records: StageRecords, progress: bool):
        self.out, self.cfg, self.progress = out, cfg, progress
        self.stages = _Stages(records)
        self.paths = {
            "corpus": out / "corpus.json", "tokenizer": out / "tokenizer", "teacher": out / "teacher",
            "teacher_log": out / "teacher_log.json", "student_init": out / "student-init",
            "train_stream": out / "data" / "train_stream.npy", "train_tokens": out / "data" / "train_tokens.npy",
            "heldout_tokens": out / "data" / "heldout_tokens.npy", "train_shards": out / "shards" / "train",
            "heldout_shards": out / "shards" / "heldout",
        }

    def run(self) -> dict:
        machine, began = describe_machine("cpu"), time.perf_counter()
        print(f"[kdfast demo] {contention_note(machine)}", flush=True)
        self.warn_about_other_thread_counts(machine["threads"])
        cfg = self.cfg
        self.stages.run("corpus", self.collect_corpus,
                        note=lambda r: f"{r['train_files']} + {r['heldout_files']} files, {r['chars']:,} characters")
        vocab = self.stages.run(
            "tokenizer", self.train_tokenizer_and_encode, tokens=lambda r: r["train_tokens"] + r["heldout_tokens"],
            note=lambda r: f"byte-level BPE, {r['vocab']} tokens; {r['train_tokens']:,} train + "
                           f"{r['heldout_tokens']:,} held-out tokens")
        self.stages.run("teacher", lambda: self.train_and_save_teacher(vocab),
                        tokens=cfg.teacher_steps * cfg.teacher_batch * cfg.seq_len,
                        note=lambda r: f"{r['parameters'] / 1e6:.2f} M parameters, {cfg.teacher_steps} steps")
        self.stages.run("capture", self.capture_targets, tokens=lambda r: r["train_tokens"] + r["heldout_tokens"],
                        note=f"top-{cfg.k} log-probs + tail mass, train and held-out sequences")
        summaries = {}
        for name, hard, soft in (("distill", cfg.hard_weight, cfg.soft_weight), ("baseline", 1.0, 0.0)):
            result = self.stages.run(
                name, lambda: self.train_student(name, hard, soft, vocab), tokens=lambda r: r["summary"]["tokens"],
                note=lambda r: f"{r['parameters'] / 1e6:.2f} M parameters, hard {hard:g} / soft {soft:g}")
            summaries[name] = result["summary"]
        scores = self.stages.run("evaluate", self.evaluate, tokens=lambda r: sum(s["tokens"] for s in r.values()),
                                 note=f"{vocab['heldout_sequences']} held-out sequences per model")
        report = {
            "config": asdict(cfg),
            "stages": [asdict(st) | {"tokens_per_second": st.tokens_per_second} for st in self.stages.stages],
            "scores": scores,
            "shards": shard_stats(self.paths["train_shards"], vocab["vocab"]), "train_summaries": summaries,
            "distill_minus_baseline_ce": scores["distilled student"]["ce"] - scores["baseline student"]["ce"],
            "resumed_stages": self.stages.reused,
            "total_seconds": self.stages.reused_seconds() + time.perf_counter() - began,
            "machine": machine | {"load_average_after": load_average()},
        }
        self.write_report(report)
        return report

    def warn_about_other_thread_counts(self, threads: int) -> None:
        """Say so when finished stages ran with another thread count: it rounds differently."""
        earlier = {r["stage"]["threads"] for r in self.stages.records.finished.values()} - {threads}
        if earlier:
            counts = " and ".join(map(str, sorted(earlier)))
            print(f"[kdfast demo] continuing a run whose finished stages used {counts} PyTorch threads with "
                  f"{threads}: the results may differ in the last digits from an uninterrupted run (--threads "
                  f"sets the count)", flush=True)

    def collect_corpus(self) -> dict:
        """The train / held-out split, listed in corpus.json (the next stage reads the files again)."""
        root = stdlib_root()
        corpus = build_corpus(self.cfg.train_chars, self.cfg.heldout_chars, root)
        write_json_atomically(self.paths["corpus"], {"root": str(root), "train_files": corpus.train_files,
                                                     "heldout_files": corpus.heldout_files})
        return {"train_files": len(corpus.train_files), "heldout_files": len(corpus.heldout_files),
                "chars": corpus.chars}

    def train_tokenizer_and_encode(self) -> dict:
        """BPE on the train split; the train stream, the sequences to capture and the held-out sequences."""
        cfg = self.cfg
        corpus = load_corpus(self.paths["corpus"])
        tokenizer = publish_directory(self.paths["tokenizer"],
                                      lambda tmp: train_tokenizer(corpus.train, cfg.vocab_size, tmp))
        train_stream, heldout_stream = encode_stream(tokenizer, corpus.train), encode_stream(tokenizer, corpus.heldout)
        heldout_sequences = cut_sequences(heldout_stream, cfg.seq_len, cfg.eval_sequences)
        save_array_atomically(self.paths["train_stream"], train_stream)
        save_array_atomically(self.paths["train_tokens"],
                              cut_sequences(train_stream, cfg.seq_len, cfg.capture_sequences))
        save_array_atomically(self.paths["heldout_tokens"], heldout_sequences)
        return {"vocab": len(tokenizer), "eos_id": tokenizer.eos_token_id, "train_tokens": len(train_stream),
                "heldout_tokens": len(heldout_stream), "heldout_sequences": len(heldout_sequences)}

    def train_and_save_teacher(self, vocab: dict) -> dict:
        cfg = self.cfg
        teacher = new_model(cfg.teacher, vocab["vocab"], cfg.seq_len, vocab["eos_id"], cfg.seed)
        log = train_teacher(teacher, np.load(self.paths["train_stream"]), cfg, self.progress)
        publish_directory(self.paths["teacher"], lambda tmp: self.save_model(teacher, tmp))
        write_json_atomically(self.paths["teacher_log"], log)
        return {"parameters": count_parameters(teacher)}

    def save_model(self, model, directory: Path) -> None:
        """``save_pretrained`` with the tokenizer's files beside the weights."""
        model.save_pretrained(directory)
        for file in self.paths["tokenizer"].iterdir():
            shutil.copy2(file, directory / file.name)

    def capture_targets(self) -> dict:
        """Top-k targets of the train and the held-out sequences (an interrupted capture continues)."""
        from kdfast.capture import capture, load_token_file
        from kdfast.shards import open_shards

        tokens = {}
        for split in ("train", "heldout"):
            capture(self.paths["teacher"], load_token_file(self.paths[f"{split}_tokens"]),
                    self.paths[f"{split}_shards"], k=self.cfg.k, device="cpu", tokenizer=self.paths["tokenizer"],
                    progress=self.progress)
            tokens[f"{split}_tokens"] = open_shards(self.paths[f"{split}_shards"]).manifest["num_tokens"]
        return tokens

    def save_student_init(self, vocab: dict) -> None:
        """The one initialization both student runs start from (saved by the first run that needs it)."""
        if self.paths["student_init"].is_dir():
            return
        cfg = self.cfg
        student = new_model(cfg.student, vocab["vocab"], cfg.seq_len, vocab["eos_id"], cfg.seed + 1)
        publish_directory(self.paths["student_init"], lambda tmp: self.save_model(student, tmp))

    def train_student(self, name: str, hard_weight: float, soft_weight: float, vocab: dict) -> dict:
        """One Trainer run (its settings also saved as configs/<name>.toml): its summary and parameter count.

        A run interrupted after a checkpoint continues from it; one interrupted before its first
        checkpoint starts again from nothing."""
        from kdfast.train import TrainConfig, Trainer
        from kdfast.train.checkpoint import list_checkpoints

        self.save_student_init(vocab)
        run_dir = self.out / "runs" / name
        settings = student_settings(self.cfg, train_shards=self.paths["train_shards"],
                                    eval_shards=self.paths["heldout_shards"], student=self.paths["student_init"],
                                    run_dir=run_dir, hard_weight=hard_weight, soft_weight=soft_weight,
                                    progress=self.progress)
        write_text_atomically(self.out / "configs" / f"{name}.toml", to_toml(settings))
        checkpoints = list_checkpoints(run_dir)
        if checkpoints:
            print(f"[kdfast demo] {name}: continuing from {checkpoints[-1].relative_to(self.out)}", flush=True)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        with Trainer(TrainConfig(**settings)) as trainer:
            summary = trainer.train()
            return {"summary": summary, "parameters": count_parameters(trainer.student)}

    def evaluate(self) -> dict:
        models = {"teacher": self.paths["teacher"], "distilled student": self.out / "runs" / "distill" / "final",
                  "baseline student": self.out / "runs" / "baseline" / "final"}
        return {name: asdict(scores) for name, scores in evaluate_models(models, self.paths["heldout_shards"]).items()}

    def write_report(self, report: dict) -> None:
        """curves.png, report.json and report.md, each written to a temporary name and renamed."""
        runs = {f"{name} student": self.out / "runs" / name / "metrics.jsonl" for name in ("distill", "baseline")}
        curves = _temporary_name(self.out / "curves.png")
        if plot_comparison(curves, runs, teacher_log=json.loads(self.paths["teacher_log"].read_text()),
                           teacher_ce=report["scores"]["teacher"]["ce"]):
            _publish_file(curves, self.out / "curves.png")
        write_json_atomically(self.out / "report.json", report)
        write_text_atomically(self.out / "report.md", format_report(report))


def shard_stats(directory: Path, vocab: int) -> dict:
    """Bytes per token of the captured shards, next to what dense fp16 logits would take."""
    from kdfast.shards import open_shards

    shards = open_shards(directory)
    tokens = shards.manifest["num_tokens"]
    return {"bytes": shards.nbytes, "tokens": tokens, "bytes_per_token": shards.nbytes / tokens,
            "dense_fp16_bytes_per_token": 2 * vocab, "k": shards.manifest["k"],
            "value_dtype": shards.manifest["value_dtype"], "index_encoding": shards.manifest["index_encoding"]}


# ----------------------------------------------------------------------------------------------
# 7. report
# ----------------------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    cfg, scores, shards, machine = report["config"], report["scores"], report["shards"], report["machine"]
    delta = report["distill_minus_baseline_ce"]
    verdict = "beats" if delta < 0 else "does NOT beat"
    distilled, baseline = scores["distilled student"]["perplexity"], scores["baseline student"]["perplexity"]
    dense = shards["dense_fp16_bytes_per_token"]
    return "\n".join([
        f"# kdfast demo report ({cfg['name']})", "",
        "## Held-out results", "", results_table(scores), "",
        (f"The distilled student {verdict} the hard-label baseline on held-out cross-entropy by {abs(delta):.4f} "
         f"nats/token (perplexity {distilled:.1f} vs {baseline:.1f})."), "",
        "## Stages", "", stages_table(report["stages"]), "",
        f"Total wall time: {report['total_seconds']:.1f} s. {machine_text(machine)}{history_text(report)}", "",
        "## Shards", "",
        (f"{shards['tokens']:,} training tokens in {shards['bytes']:,} bytes: **{shards['bytes_per_token']:.1f} "
         f"bytes/token** (top-{shards['k']}, {shards['value_dtype']} values, {shards['index_encoding']} indices, "
         f"tail mass), against {dense:,} bytes/token for dense fp16 logits ({dense / shards['bytes_per_token']:.0f}x)."),
        "",
        "## Settings", "", "```", json.dumps(cfg, indent=1), "```", "",
        "Curves: `curves.png`. Configs of the two student runs: `configs/*.toml`. What drives the gain "
        "(ablations of teacher steps, captured sequences, loss weights, k and the tail bucket, run with this "
        "pipeline): docs/demo-report.md in the kdfast repository.", "",
    ])


def history_text(report: dict) -> str:
    """The stages an earlier run finished (their times are that run's), and thread counts when the stages'
    differ (they round differently); empty for one uninterrupted run."""
    text = ""
    if report["resumed_stages"]:
        text += (f" Resumed: {', '.join(report['resumed_stages'])} finished in an earlier run in this directory "
                 f"(their times are that run's).")
    threads = {stage["name"]: stage["threads"] for stage in report["stages"]}
    if len(set(threads.values())) > 1:
        counts = ", ".join(f"{name} {count}" for name, count in threads.items())
        text += (f" The stages ran with different PyTorch thread counts ({counts}), so the losses may differ in "
                 f"the last digits from a run with one count.")
    return text


def contention_note(machine: dict) -> str:
    """What the load average says about the times to expect (the 1-minute average, before the demo ran)."""
    load, threads = machine["load_average"], machine["threads"]
    if load is None:
        return f"{threads} PyTorch threads; this system reports no load average"
    if load[0] < 1:
        return f"{threads} PyTorch threads; load average {load[0]:.1f}: no other work kept a CPU busy in the last minute"
    return (f"{threads} PyTorch threads; load average {load[0]:.1f} on {machine['usable_cpus']} CPUs: other "
            f"processes are running, so every stage will take longer than on an idle machine (--threads sets "
            f"how many threads PyTorch uses)")


def machine_text(machine: dict) -> str:
    """The machine line of the report: results repeat exactly on one machine with one thread count only."""
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    return (f"Machine: {machine['cpu']} ({machine['isa']}), {machine['usable_cpus']} of {machine['cpus']} CPUs "
            f"usable, {machine['threads']} PyTorch threads; {versions}; {machine['platform']}. Load average "
            f"(1, 5, 15 min) before {machine['load_average']}, after {machine['load_average_after']}.")


def results_table(scores: dict) -> str:
    header = ("model", "params", "held-out CE", "perplexity", "top-1 acc", "top-1 agreement w/ teacher", "ECE")
    rows = [(name, f"{s['parameters'] / 1e6:.2f} M", f"{s['ce']:.4f}", f"{s['perplexity']:.1f}",
             f"{s['accuracy']:.3f}", f"{s['agreement']:.3f}", f"{s['ece']:.4f}") for name, s in scores.items()]
    return markdown_table(header, rows)


def stages_table(stages: list[dict]) -> str:
    header = ("stage", "time (s)", "tokens", "tokens/s", "what")
    rows = [(st["name"], f"{st['seconds']:.1f}", f"{st['tokens']:,}" if st["tokens"] else "",
             f"{st['tokens_per_second']:,.0f}" if st["tokens_per_second"] else "", st["note"]) for st in stages]
    return markdown_table(header, rows)


def summary_text(report: dict, report_path: Path) -> str:
    """What ``kdfast demo`` prints at the end: the two tables and the verdict."""
    delta = report["distill_minus_baseline_ce"]
    return "\n".join([
        "", results_table(report["scores"]), "", stages_table(report["stages"]), "",
        f"distilled - baseline held-out CE: {delta:+.4f} nats/token; total {report['total_seconds']:.0f} s; "
        f"report: {report_path}",
    ])


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
