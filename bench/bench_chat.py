"""Chat-corpus benchmarks: shard bytes per token, reader throughput (compact and full-length version-2
samples) against the version-1 reader, and the trainer padded against packed.

    python bench/bench_chat.py --threads 1 > bench/results/chat-cpu.md

prints a complete Markdown report (machine, load, command, tables). Three measurements:

1. Bytes. A synthetic chat corpus (``--sequences`` sequences of lengths uniform in ``--min-len`` ..
   ``--max-len``, each 1-3 turns of ~70% prompt then ~30% response positions; only the positions
   whose next token is a response token are learned), written once per value / index encoding:
   shard bytes per learned token and per stored token (position).
2. Reads. ``ShardDataset[i]`` in a shuffled order from the page cache, median over ``--repeats``
   passes: learned tokens/s of the version-2 reader on the masked corpus, compact
   (``compact=True``: teacher rows of the learned positions only, what the trainer reads) and
   full-length (one teacher row per position), against tokens/s of the version-1 reader
   (kdfast.shards of commit 1715d11, taken from git as the package ``kdfast_v1``) on the same
   sequences written in format 1 (every position learned, so there its tokens are its learned
   tokens). The three readers alternate pass by pass.
3. Training. ``Trainer.train_step`` of tiny Llama students (CPU, float32, one per ``--hidden``) on
   a corpus of lengths spread ``--min-len`` .. ``--max-len``, with ``packing`` false and true (both
   on the trainer's compact path: the head and the loss run on the learned positions only): the two
   trainers alternate step by step; median learned tokens/s and sequence tokens/s over the timed
   steps (after warm-up steps), and the padding fraction.

Rates are per CPU second of this process (``time.process_time``), so that other jobs on a shared
machine slow neither side more than the other; wall-clock step times are printed beside them.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdfast.shards import ShardDataset, ShardWriter  # noqa: E402

ENCODINGS = [("float16", "int32"), ("bfloat16", "int32"), ("float16", "packed"), ("uint8", "packed"),
             ("uint8", "int32")]
V1_COMMIT = "1715d11"
V1_FILES = ["kdfast/_io.py", "kdfast/shards/__init__.py", "kdfast/shards/dataset.py", "kdfast/shards/format.py",
            "kdfast/shards/reader.py", "kdfast/shards/writer.py"]


def machine() -> list[str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line for line in lscpu.splitlines() if line.startswith("Model name")), "Model name: ?")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return [f"- `lscpu | grep 'Model name'`: {' '.join(model.split())}; {os.cpu_count()} logical CPUs",
            f"- `uptime` at start: {uptime}",
            f"- Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"torch threads {torch.get_num_threads()}"]


# --- the corpus ------------------------------------------------------------------------------------


def chat_lengths_and_masks(rng: np.random.Generator, count: int, low: int, high: int) -> list[np.ndarray]:
    """Loss masks of ``count`` chat sequences: lengths uniform in [low, high], 1-3 turns, each turn's
    first ~70% prompt; a position is learned when its next token is a response token."""
    masks = []
    for _ in range(count):
        length = int(rng.integers(low, high + 1))
        turns = np.array_split(np.arange(length), int(rng.integers(1, 4)))
        response = np.zeros(length, bool)
        for turn in turns:
            response[turn[int(round(0.7 * len(turn))):]] = True
        mask = np.zeros(length, bool)
        mask[:-1] = response[1:]
        mask[0] = mask[0] or not mask.any()  # at least one learned position
        masks.append(mask)
    return masks


def synthetic_targets(rng: np.random.Generator, length: int, k: int, vocab: int):
    """Tokens [L], sorted top-k log-probs [L, k] with random ids distinct within a row [L, k], tail [L]."""
    values = -np.cumsum(rng.exponential(0.15, (length, k)), axis=1) - rng.exponential(1.0, (length, 1))
    tail = np.log1p(-np.minimum(np.exp(values.astype(np.float64)).sum(1), 1 - 1e-6)).astype(np.float32)
    gaps = rng.integers(1, vocab // k + 1, (length, k))  # cumulative gaps stay below vocab: distinct ids
    indices = (rng.integers(0, vocab, (length, 1)) + np.cumsum(gaps, axis=1)) % vocab
    return rng.integers(0, vocab, length), indices.astype(np.int32), values.astype(np.float32), tail


def write_corpus(writer_class, directory: Path, masks: list[np.ndarray], args, value_dtype: str,
                 index_encoding: str, masked: bool) -> None:
    """The corpus into ``directory``; ``masked=False`` learns every position (format 1 has no mask)."""
    rng = np.random.default_rng(0)
    with writer_class(directory, vocab_size=args.vocab, k=args.k, value_dtype=value_dtype,
                      index_encoding=index_encoding, shard_tokens=1 << 16) as writer:
        for mask in masks:
            tokens, indices, values, tail = synthetic_targets(rng, len(mask), args.k, args.vocab)
            if masked:
                writer.add(tokens, indices[mask], values[mask], tail[mask], mask=mask)
            else:
                writer.add(tokens, indices, values, tail)


def import_v1(root: Path):
    """kdfast.shards of commit 1715d11 (the version-1 reader and writer) as the package ``kdfast_v1``."""
    for name in V1_FILES:
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{V1_COMMIT}:{name}"], capture_output=True,
                              text=True, check=True).stdout
        path = root / name.replace("kdfast/", "kdfast_v1/", 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("from kdfast.", "from kdfast_v1.").replace("import kdfast.", "import kdfast_v1."))
    (root / "kdfast_v1" / "__init__.py").write_text("")
    sys.path.insert(0, str(root))
    return importlib.import_module("kdfast_v1.shards")


# --- 1 and 2: bytes and reads ----------------------------------------------------------------------


def one_pass(dataset, order: np.ndarray) -> float:
    """CPU seconds of this process to read ``dataset[i]`` for every i of ``order``."""
    began = time.process_time()
    for index in order.tolist():
        dataset[index]
    return time.process_time() - began


def alternating_rates(datasets: dict, counts: dict, repeats: int) -> dict:
    """Median over ``repeats`` shuffled passes of count / seconds per dataset, the datasets alternating
    pass by pass (after one warm-up pass each: page cache)."""
    seconds = {name: [] for name in datasets}
    size = len(next(iter(datasets.values())))
    for dataset in datasets.values():
        one_pass(dataset, np.arange(size))
    for repeat in range(repeats):
        order = np.random.default_rng(repeat).permutation(size)
        names = list(datasets) if repeat % 2 == 0 else list(datasets)[::-1]
        for name in names:
            seconds[name].append(one_pass(datasets[name], order))
    return {name: counts[name] / float(np.median(s)) for name, s in seconds.items()}


def shard_bytes(directory: Path) -> int:
    """Bytes of a dataset's shard files (the manifest excluded)."""
    return sum(path.stat().st_size for path in directory.glob("shard-*.kds"))


def bench_bytes_and_reads(args, root: Path, v1) -> list[str]:
    masks = chat_lengths_and_masks(np.random.default_rng(1), args.sequences, args.min_len, args.max_len)
    tokens, learned = sum(len(m) for m in masks), sum(int(m.sum()) for m in masks)
    labelled = learned - sum(int(m[-1]) for m in masks)  # rows of compact samples: learned positions with a label
    lines = [f"## Bytes and reads: chat corpus ({args.sequences} sequences, lengths {args.min_len}..{args.max_len}, "
             f"{tokens:,} tokens, {learned:,} learned = {learned / tokens:.1%}; k={args.k}, vocab={args.vocab})", "",
             "Bytes: shard files of each corpus. Reads: `dataset[i]` in shuffled order, page cache, tokens per CPU "
             "second, median over passes, the three readers alternating pass by pass (verified reads, the "
             "defaults): version 2 compact (`ShardDataset(compact=True)`: teacher rows of the learned positions "
             "only, what the trainer reads), version 2 full-length (one teacher row per position, empty where "
             "nothing is learned) and version 1 (kdfast.shards of commit 1715d11). The version-1 corpus is the "
             "same sequences with every position learned (format 1 has no mask), so its tokens are its learned "
             "tokens. Learned tokens/s of the version-2 readers count the corpus's learned positions.",
             "", "| values | indices | v2 bytes / learned token | v2 bytes / stored token | v1 bytes / token | "
                 "v2 compact learned Mtok/s | v2 full-length learned Mtok/s | v1 Mtok/s | compact / v1 | "
                 "full-length / v1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for value_dtype, index_encoding in ENCODINGS:
        v2_dir, v1_dir = root / f"v2-{value_dtype}-{index_encoding}", root / f"v1-{value_dtype}-{index_encoding}"
        write_corpus(ShardWriter, v2_dir, masks, args, value_dtype, index_encoding, masked=True)
        write_corpus(v1.ShardWriter, v1_dir, masks, args, value_dtype, index_encoding, masked=False)
        compact, full, old = ShardDataset(v2_dir, compact=True), ShardDataset(v2_dir), v1.ShardDataset(v1_dir)
        assert full.learned_tokens == learned and full.total_tokens == tokens and len(old) == len(full)
        assert sum(len(compact[i]["teacher_tail"]) for i in range(len(compact))) == labelled
        rates = alternating_rates({"compact": compact, "full": full, "v1": old},
                                  {"compact": learned, "full": learned, "v1": tokens}, args.repeats)
        v2_bytes, v1_bytes = shard_bytes(v2_dir), shard_bytes(v1_dir)
        lines.append(f"| {value_dtype} | {index_encoding} | {v2_bytes / learned:.1f} | "
                     f"{v2_bytes / tokens:.1f} | {v1_bytes / tokens:.1f} | {rates['compact'] / 1e6:.2f} | "
                     f"{rates['full'] / 1e6:.2f} | {rates['v1'] / 1e6:.2f} | "
                     f"{rates['compact'] / rates['v1']:.2f} | {rates['full'] / rates['v1']:.2f} |")
        shutil.rmtree(v2_dir)
        shutil.rmtree(v1_dir)
    return lines


# --- 3: the trainer --------------------------------------------------------------------------------


def bench_trainer(args, root: Path) -> list[str]:
    masks = chat_lengths_and_masks(np.random.default_rng(2), args.train_sequences, args.min_len, args.max_len)
    data = root / "train"
    write_corpus(ShardWriter, data, masks, argparse.Namespace(**{**vars(args), "vocab": args.train_vocab}),
                 "float16", "int32", masked=True)
    lines = [f"## Trainer: padded against packed ({args.train_sequences} sequences of lengths {args.min_len}.."
             f"{args.max_len}, ~30% learned; micro-batch {args.micro_batch}, k={args.k}; tiny Llama students: 2 "
             f"layers, vocab {args.train_vocab}, CPU float32, sdpa)", "",
             f"`Trainer.train_step`, {args.warmup} warm-up steps each, then {args.steps} timed steps each, the padded "
             "and the packed trainer alternating step by step; medians over the timed steps. Both see the same "
             "sequences in the same micro-batches and both run the compact path (compact samples; the LM head and "
             "the fused loss over the learned positions' hidden states only); packing uses `pack_length = 0` (rows "
             "as long as the micro-batch's longest sequence). Rates per CPU second of this process.", "",
             "| hidden | packing | learned tok/s | sequence tok/s | padding fraction | rows per micro-batch | "
             "CPU ms / step | wall ms / step |", "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for hidden in args.hidden:
        results = alternating_steps(args, root, data, hidden)
        for packing, r in results.items():
            rows = rows_per_micro_batch(data, args.micro_batch, r["layout"])
            lines.append(f"| {hidden} | {str(packing).lower()} | {r['learned']:,.0f} | {r['sequence']:,.0f} | "
                         f"{r['padding']:.3f} | {rows:.2f} | {r['cpu_s'] * 1e3:.0f} | {r['wall_s'] * 1e3:.0f} |")
        ratios.append(f"hidden {hidden}: {results[True]['learned'] / results[False]['learned']:.2f}x")
    lines += ["", f"Packed / padded learned tokens per CPU second: {', '.join(ratios)}."]
    return lines


def alternating_steps(args, root: Path, data: Path, hidden: int) -> dict:
    """Per packing value: median learned / sequence tokens per CPU second, padding fraction, step times."""
    from kdfast.train import Trainer, TrainConfig, collate
    from kdfast.train.data import pack

    student = dict(model_type="llama", vocab_size=args.train_vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=args.max_len)
    samples = {packing: {"cpu": [], "wall": [], "learned": [], "sequence": [], "positions": []}
               for packing in (False, True)}
    with contextlib.ExitStack() as stack:
        trainers = {packing: stack.enter_context(Trainer(TrainConfig(
            train_shards=str(data), run_dir=str(root / f"run-{hidden}-{packing}"), student_config=student,
            max_steps=args.warmup + args.steps, micro_batch_size=args.micro_batch, warmup_steps=1,
            log_every=10_000, eval_every=0, save_every=0, progress=False, packing=packing, device="cpu")))
            for packing in (False, True)}
        for step in range(args.warmup + args.steps):
            for packing in ((False, True) if step % 2 == 0 else (True, False)):
                began, began_wall = time.process_time(), time.perf_counter()
                stats = trainers[packing].train_step()
                cpu, wall = time.process_time() - began, time.perf_counter() - began_wall
                if step >= args.warmup:
                    s = samples[packing]
                    s["cpu"].append(cpu)
                    s["wall"].append(wall)
                    s["learned"].append(stats["tokens"])
                    s["sequence"].append(stats["sequence_tokens"])
                    s["positions"].append(stats["positions"])
    results = {}
    for packing, s in samples.items():
        cpu = np.array(s["cpu"])
        results[packing] = {"learned": float(np.median(np.array(s["learned"]) / cpu)),
                            "sequence": float(np.median(np.array(s["sequence"]) / cpu)),
                            "padding": 1 - sum(s["sequence"]) / sum(s["positions"]),
                            "cpu_s": float(np.median(cpu)), "wall_s": float(np.median(s["wall"])),
                            "layout": pack if packing else collate}
    return results


def rows_per_micro_batch(data: Path, size: int, layout) -> float:
    """Mean rows of ``layout`` (collate or pack) over the micro-batches of the first epoch (seed 0)."""
    dataset = ShardDataset(data, seed=0, compact=True)
    order = dataset.sampler.order(0)
    return float(np.mean([layout([dataset[int(i)] for i in order[start:start + size]])["input_ids"].shape[0]
                          for start in range(0, len(order) - size + 1, size)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-sequences", type=int, default=128)
    parser.add_argument("--train-vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python bench/bench_chat.py " + " ".join(sys.argv[1:])
    lines = ["# kdfast chat corpus on CPU", "", f"- command: `{command.strip()}`", *machine(), ""]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        v1 = import_v1(root / "v1-code")
        lines += bench_bytes_and_reads(args, root, v1) + [""] + bench_trainer(args, root)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines += ["", f"- `uptime` at the end: {uptime}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
