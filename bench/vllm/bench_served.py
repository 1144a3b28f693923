"""Tokens/s of top-k capture through a vLLM server vs a local Hugging Face teacher, same model, one run.

The two are measured interleaved (round by round) because the machine is shared; the load average
is printed before and after. Served: ``ServedTeacher.topk`` (requests, JSON, rows). Local: the
model's forward pass plus ``kdfast.capture.topk_targets`` per sequence, as ``kdfast capture`` does.
Neither writes shards.

Usage (servers from bench/vllm/start.sh MODEL_DIR PORT [--skip-tokenizer-init]):
  python bench/vllm/bench_served.py --url http://127.0.0.1:PORT/v1 [URL2 ...] --model MODEL_DIR
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from kdfast.capture import load_teacher, topk_targets
from kdfast.served import ServedTeacher


def served_round(teacher: ServedTeacher, tokens: np.ndarray, in_flight: int) -> float:
    began = time.perf_counter()
    for start in range(0, len(tokens), in_flight):
        teacher.topk(tokens[start:start + in_flight], start)
    return tokens.size / (time.perf_counter() - began)


def local_round(model, tokens: np.ndarray, k: int, batch_size: int, threads: int) -> float:
    torch.set_num_threads(threads)
    began = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            logits = model(torch.from_numpy(tokens[start:start + batch_size].astype(np.int64)))
            for row in logits:
                topk_targets(row, k, 1.0)
    return tokens.size / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, nargs="+", help="servers of the same model (e.g. with and without "
                                                                   "--skip-tokenizer-init)")
    parser.add_argument("--model", required=True, help="the model directory the server serves (also run locally)")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[8, 32], help="served requests in flight")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="local PyTorch threads")
    parser.add_argument("--batch-size", type=int, default=8, help="local sequences per forward pass")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    print(f"date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average before {os.getloadavg()}; "
          f"{os.cpu_count()} CPUs")
    servers = {url: ServedTeacher(url, args.model, k=args.k, concurrency=max(args.in_flight)) for url in args.url}
    for url, served in servers.items():
        print(f"server {url}: {served.identity}")
    local = load_teacher(args.model, device=torch.device("cpu"), dtype=torch.float32, progress=False)
    local.load()
    vocab = min(served.vocab_size for served in servers.values())
    tokens = np.random.default_rng(0).integers(3, vocab, (args.sequences, args.seq_len))
    print(f"{args.sequences} sequences x {args.seq_len} tokens, k={args.k}, {args.rounds} interleaved rounds")
    results: dict[str, list[float]] = {}
    for served in servers.values():  # warm-up all
        served_round(served, tokens[:4], 4)
    local_round(local, tokens[:4], args.k, args.batch_size, 1)
    for _ in range(args.rounds):
        for url, served in servers.items():
            for n in args.in_flight:
                results.setdefault(f"{url}, {n} requests in flight", []).append(served_round(served, tokens, n))
        for threads in args.threads:
            results.setdefault(f"local HF, batch {args.batch_size}, {threads} threads", []).append(
                local_round(local, tokens, args.k, args.batch_size, threads))
    for name, rates in results.items():
        print(f"{name:52s} median {statistics.median(rates):9.0f} tok/s  (rounds: "
              f"{', '.join(f'{r:.0f}' for r in rates)})")
    print(f"load average after {os.getloadavg()}")
    for served in servers.values():
        served.close()


if __name__ == "__main__":
    main()
