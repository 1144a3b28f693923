"""Scaling of `kdfast capture` with 1 and 2 processes (torchrun), the whole command, on this machine.

Each configuration runs the real CLI in a fresh subprocess over the same tokens and teacher (a
local Hugging Face Llama built offline from a config, saved once), writing real shards; the
2-process run includes rank 0's merge of the rank directories. Configurations are interleaved
round by round because the machine may be shared; medians over rounds, the load average before and
after. Tokens/s counts every captured token over the command's wall time (model loading included,
the same in every configuration).

Usage:
  python bench/bench_capture_parallel.py [--sequences 96] [--seq-len 256] [--rounds 3] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kdfast.report import describe_machine

# (name, processes, intra-op threads per process)
CONFIGURATIONS = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("2 processes, 1 thread each", 2, 1)]


def build_teacher(root: Path, vocab: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(root / "teacher")
    return root / "teacher"


def capture_command(processes: int, teacher: Path, tokens: Path, out: Path, k: int) -> list[str]:
    launcher = [sys.executable, "-m", "kdfast"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "kdfast"]
    return [*launcher, "capture", "--teacher", str(teacher), "--tokens", str(tokens), "--out", str(out), "--k", str(k),
            "--batch-size", "4", "--shard-tokens", "4096", "--device", "cpu", "--no-progress"]


def timed_capture(processes: int, threads: int, teacher: Path, tokens: Path, out: Path, k: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    subprocess.run(capture_command(processes, teacher, tokens, out, k), env=env, check=True, capture_output=True)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=96)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the results as markdown here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        teacher = build_teacher(root, args.vocab)
        np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, args.vocab, (args.sequences, args.seq_len)))
        load_before = os.getloadavg()
        seconds: dict[str, list[float]] = {name: [] for name, *_ in CONFIGURATIONS}
        for _ in range(args.rounds):
            for name, processes, threads in CONFIGURATIONS:
                seconds[name].append(timed_capture(processes, threads, teacher, root / "tokens.npy", root / "out",
                                                   args.k))
        load_after = os.getloadavg()

    tokens = args.sequences * args.seq_len
    lines = [f"Machine: {describe_machine()['cpu']}, {os.cpu_count()} CPUs; load average (1, 5, 15 min) before "
             f"{tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}",
             f"Teacher: Llama hidden 256, 4 layers, vocabulary {args.vocab}, float32; {args.sequences} sequences x "
             f"{args.seq_len} tokens, k = {args.k}, {args.rounds} interleaved rounds",
             f"Command: python bench/bench_capture_parallel.py --sequences {args.sequences} --seq-len {args.seq_len} "
             f"--vocab {args.vocab} --k {args.k} --rounds {args.rounds}", "",
             "| configuration | median wall s | tokens/s | vs 1 process, 2 threads | rounds (s) |",
             "|---|---|---|---|---|"]
    reference = statistics.median(seconds["1 process, 2 threads"])
    for name, values in seconds.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.2f} | {tokens / median:,.0f} | {reference / median:.2f}x | "
                     f"{', '.join(f'{v:.2f}' for v in values)} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
