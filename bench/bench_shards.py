"""Shard benchmarks: shuffled reads into tensors, where capture time goes, compact-encoding error.

    python bench/bench_shards.py > bench/results/shards-cpu.md

prints a complete Markdown report (machine, command, tables). Three measurements:

1. Reads: ``ShardDataset[i]`` in a shuffled order from the page cache (the files are read once
   before timing), per encoding; median over ``--repeats`` passes of tokens/s into ready tensors,
   and GB/s of shard bytes that had to be read for them. Then verified reads (the default: every
   read checks its checksums) against unverified ones (``verify_reads=False``: range checks
   instead), interleaved read by read in one run and timed in CPU seconds of this process, so that
   other load on the machine affects both alike. Also the same through a DataLoader with two
   workers, and a corpus where only ~30% of the positions are learned (loss mask), as chat data.
2. Capture on CPU with a tiny Hugging Face Llama: seconds in the teacher's forward passes, in the
   targets (log-softmax, top-k, tail) and in writing (encode, checksum, write, fsync, manifest),
   plus the writer alone on synthetic targets, to show how far writing is from being the limit.
3. Compact-encoding error: KL between the exact targets and the stored ones, for log-softmax of
   heavy-tailed random logits (Student-t, per-row scale; entropy and top-k mass are printed so the
   data can be judged), in both ways kd_loss reads logprobs: ``tail=True`` (k slots + 1 - sum bucket)
   and ``tail=False`` (softmax over the slots).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdfast.capture import capture
from kdfast.report import describe_machine
from kdfast.shards import ShardDataset, ShardWriter
from kdfast.shards.format import decode_values, encode_values

ENCODINGS = [("float16", "int32"), ("bfloat16", "int32"), ("float16", "packed"), ("uint8", "packed"),
             ("uint8", "int32")]


def synthetic_targets(rng: np.random.Generator, length: int, k: int, vocab: int):
    """Sorted top-k log-probs with a realistic spread, random ids; [L], [L, k], [L, k], [L]."""
    values = -np.cumsum(rng.exponential(0.15, (length, k)), axis=1) - rng.exponential(1.0, (length, 1))
    tail = np.log1p(-np.minimum(np.exp(values.astype(np.float64)).sum(1), 1 - 1e-6)).astype(np.float32)
    return (rng.integers(0, vocab, length), rng.integers(0, vocab, (length, k)).astype(np.int32),
            values.astype(np.float32), tail)


def write_synthetic(directory: Path, args, value_dtype: str, index_encoding: str, learned: float = 1.0) -> float:
    """Write ``args.sequences`` sequences (a fraction ``learned`` of each one's positions learned, as
    runs of prompt and response); returns tokens/s of the writer alone."""
    rng = np.random.default_rng(0)
    pool = [synthetic_targets(rng, args.seq_len, args.k, args.vocab) for _ in range(4)]
    masks = [None if learned == 1 else np.arange(args.seq_len) % 100 >= 100 * (1 - learned) for _ in pool]
    began = time.perf_counter()
    with ShardWriter(directory, vocab_size=args.vocab, k=args.k, value_dtype=value_dtype,
                     index_encoding=index_encoding, shard_tokens=args.seq_len * 16) as writer:
        for index in range(args.sequences):
            writer.add(*pool[index % len(pool)], mask=masks[index % len(pool)])
    return args.sequences * args.seq_len / (time.perf_counter() - began)


def time_reads(dataset: ShardDataset, repeats: int) -> float:
    """Median tokens/s of dataset[i] over shuffled passes, after one warm-up pass (page cache)."""
    tokens = dataset.shards.num_tokens
    for index in range(len(dataset)):
        dataset[index]
    rates = []
    for repeat in range(repeats):
        order = np.random.default_rng(repeat).permutation(len(dataset))
        began = time.perf_counter()
        for index in order:
            dataset[int(index)]
        rates.append(tokens / (time.perf_counter() - began))
    return float(np.median(rates))


def time_verified_vs_unverified(directory: Path, repeats: int) -> tuple[float, float]:
    """Tokens per CPU second of dataset[i] with and without per-read checksums, alternating which
    goes first read by read, over ``repeats`` shuffled passes (after a warm-up pass)."""
    datasets = {True: ShardDataset(directory), False: ShardDataset(directory, verify_reads=False)}
    seconds = dict.fromkeys(datasets, 0.0)
    for dataset in datasets.values():
        for index in range(len(dataset)):
            dataset[index]
    for repeat in range(repeats):
        for step, index in enumerate(np.random.default_rng(repeat).permutation(len(datasets[True])).tolist()):
            for verify in ((True, False) if (repeat + step) % 2 else (False, True)):
                began = time.process_time()
                datasets[verify][index]
                seconds[verify] += time.process_time() - began
    tokens = repeats * datasets[True].shards.num_tokens
    return tokens / seconds[True], tokens / seconds[False]


def time_loader(dataset: ShardDataset, repeats: int) -> float:
    """Median tokens/s of epochs through DataLoader(num_workers=2, batch_size=4, persistent workers)
    with the dataset's sampler, after one untimed epoch that starts the workers."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=dataset.sampler, num_workers=2,
                                         persistent_workers=True)
    sum(1 for _ in loader)
    rates = []
    for _ in range(repeats):
        began = time.perf_counter()
        count = sum(batch["input_ids"].numel() for batch in loader)
        rates.append(count / (time.perf_counter() - began))
    return float(np.median(rates))


def bench_reads(args, root: Path) -> list[str]:
    lines = [f"## Shuffled reads into tensors (k={args.k}, seq_len={args.seq_len}, vocab={args.vocab}, "
             f"{args.sequences} sequences, page cache)", "",
             "`dataset[i]` and DataLoader: wall-clock medians over passes. Verified / unverified: tokens per CPU "
             "second of this process, the two interleaved read by read in the same run.", "",
             "| values | indices | bytes/token | dataset[i] Mtok/s | GB/s read | verified Mtok/s (CPU) | "
             "unverified Mtok/s (CPU) | verified / unverified | DataLoader(2 workers) Mtok/s | writer alone Mtok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for value_dtype, index_encoding in ENCODINGS:
        directory = root / f"{value_dtype}-{index_encoding}"
        write_rate = write_synthetic(directory, args, value_dtype, index_encoding)
        dataset = ShardDataset(directory, seed=0)
        per_token = dataset.shards.nbytes / dataset.shards.num_tokens
        rate = time_reads(dataset, args.repeats)
        verified, unverified = time_verified_vs_unverified(directory, args.repeats)
        loader_rate = time_loader(dataset, max(1, args.repeats // 2))
        lines.append(f"| {value_dtype} | {index_encoding} | {per_token:.1f} | {rate / 1e6:.2f} | "
                     f"{rate * per_token / 1e9:.2f} | {verified / 1e6:.2f} | {unverified / 1e6:.2f} | "
                     f"{verified / unverified:.3f} | {loader_rate / 1e6:.2f} | {write_rate / 1e6:.2f} |")
        shutil.rmtree(directory)
    return lines


def bench_masked_reads(args, root: Path) -> list[str]:
    """A corpus where 30% of the positions are learned (runs of 70 prompt, 30 response positions)."""
    lines = [f"## Reads with a loss mask: 30% of positions learned (k={args.k}, seq_len={args.seq_len}, "
             f"vocab={args.vocab}, {args.sequences} sequences, page cache, verified reads)", "",
             "| values | indices | bytes/token | bytes/learned token | bytes vs all learned | dataset[i] Mtok/s | "
             "learned Mtok/s |", "|---|---|---|---|---|---|---|"]
    for value_dtype, index_encoding in [("float16", "int32"), ("uint8", "packed")]:
        sizes = {}
        for learned in (1.0, 0.3):
            directory = root / f"masked-{value_dtype}-{index_encoding}-{learned}"
            write_synthetic(directory, args, value_dtype, index_encoding, learned)
            dataset = ShardDataset(directory, seed=0)
            sizes[learned] = dataset.shards.nbytes
            if learned < 1:
                rate = time_reads(dataset, args.repeats)
                share = dataset.learned_tokens / dataset.total_tokens
                lines.append(f"| {value_dtype} | {index_encoding} | {sizes[learned] / dataset.total_tokens:.1f} | "
                             f"{sizes[learned] / dataset.learned_tokens:.1f} | {sizes[learned] / sizes[1.0]:.2f} | "
                             f"{rate / 1e6:.2f} | {rate * share / 1e6:.2f} |")
        for learned in sizes:
            shutil.rmtree(root / f"masked-{value_dtype}-{index_encoding}-{learned}")
    return lines


def bench_capture(args, root: Path) -> list[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.capture_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.capture_seq_len)
    LlamaForCausalLM(config).save_pretrained(root / "teacher")
    tokens = np.random.default_rng(0).integers(0, args.capture_vocab, (args.capture_sequences, args.capture_seq_len))
    result = capture(root / "teacher", tokens, root / "captured", k=args.k, batch_size=4, device="cpu",
                     shard_tokens=args.capture_seq_len * 8, progress=False)
    total = result.teacher_seconds + result.targets_seconds + result.write_seconds
    count = result.captured_tokens
    return [f"## Capture on CPU: tiny Llama teacher (vocab {args.capture_vocab}, hidden 64, 2 layers), k={args.k}, "
            f"{args.capture_sequences} x {args.capture_seq_len} tokens, batch 4, float16/int32", "",
            "| stage | seconds | share | tokens/s if alone |", "|---|---|---|---|",
            *(f"| {name} | {seconds:.2f} | {seconds / total:.0%} | {count / seconds:,.0f} |" for name, seconds in
              [("teacher forward", result.teacher_seconds), ("targets (log-softmax, top-k, tail)",
                                                             result.targets_seconds),
               ("write (encode, checksum, write, fsync)", result.write_seconds)]),
            f"| total | {total:.2f} | 100% | {count / total:,.0f} |"]


def scaled_logits(rng: np.random.Generator, rows: int, vocab: int) -> torch.Tensor:  # -> [rows, V] float64
    """Gaussian logits times a per-row scale in [3, 9]: rows range from flat (entropy ~6 nats) to
    near-deterministic, like a language model's positions."""
    return torch.from_numpy(rng.standard_normal((rows, vocab)) * rng.uniform(3, 9, (rows, 1)))


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # [N, m] -> [N]
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0.0).sum(-1)


def with_rest(values: torch.Tensor) -> torch.Tensor:  # [N, k] log-probs -> [N, k + 1] (tail=True target)
    probs = values.exp()
    rest = (1 - probs.sum(-1, keepdim=True)).clamp_min(0)
    target = torch.cat([probs, rest], -1)
    return target / target.sum(-1, keepdim=True)


def bench_kl(args) -> list[str]:
    rng = np.random.default_rng(0)
    logprobs = torch.log_softmax(scaled_logits(rng, args.kl_rows, args.kl_vocab), -1)
    exact, _ = logprobs.topk(args.k, -1)  # [N, k] float64
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    mass = exact.exp().sum(-1)
    tail = torch.logsumexp(logprobs.scatter(-1, logprobs.topk(args.k, -1)[1], float("-inf")), -1, keepdim=True)
    lines = [f"## Compact-encoding error (k={args.k}, {args.kl_rows} rows, vocab {args.kl_vocab}, Gaussian logits "
             "x per-row scale in [3, 9])", "",
             f"Data: entropy quartiles {np.percentile(entropy, [25, 50, 75]).round(2).tolist()} nats, top-1 prob "
             f"median {float(exact[:, 0].exp().median()):.2f}, top-{args.k} mass quartiles "
             f"{np.percentile(mass, [25, 50, 75]).round(3).tolist()}.", "",
             "Errors of the stored values against the exact (float64) targets, for the three ways a loss can read "
             "them: k slots plus the stored float32 tail bucket (exact); softmax over the k slots (kd_loss "
             "tail=False); k slots plus a rest bucket 1 - sum(exp(values)) (kd_loss tail=True). The last reading "
             "is ill-conditioned when the rest is smaller than the values' rounding: the rest can come out 0 where "
             "it is not, making KL unbounded, so its total-variation distance (half the L1 error of the target, "
             "which bounds the gradient error) is given too. KL in nats per token, mean / max over rows.", "",
             "| values | KL, stored tail | KL, tail=False | KL, rest = 1 - sum | TV, rest = 1 - sum | "
             "max abs log-prob error |", "|---|---|---|---|---|---|"]
    for value_dtype in ("float16", "bfloat16", "uint8"):
        stored = torch.from_numpy(decode_values(*encode_values(exact.float().numpy(), value_dtype), value_dtype))
        stored = stored.double()
        rest_exact, rest_stored = with_rest(exact), with_rest(stored)
        errors = (kl(torch.cat([exact, tail], -1).exp(), torch.cat([stored, tail], -1).softmax(-1)),
                  kl(exact.softmax(-1), stored.softmax(-1)), kl(rest_exact, rest_stored),
                  (rest_exact - rest_stored).abs().sum(-1) / 2)
        cells = [f"{e.mean():.1e} / {e.max():.1e}" for e in errors]
        lines.append(f"| {value_dtype} | {' | '.join(cells)} | {(stored - exact).abs().max():.1e} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--capture-vocab", type=int, default=32000)
    parser.add_argument("--capture-seq-len", type=int, default=512)
    parser.add_argument("--capture-sequences", type=int, default=32)
    parser.add_argument("--kl-rows", type=int, default=2048)
    parser.add_argument("--kl-vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--dir", help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="kdfast-bench-", dir=args.dir))
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
        header = ["# kdfast shards on CPU", "",
                  f"- command: `python {' '.join(sys.argv)}`",
                  f"- CPU: {describe_machine()['cpu']}, {os.cpu_count()} logical CPUs; /proc/loadavg at start {' '.join(load)}",
                  f"- Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
                  f"torch threads {torch.get_num_threads()}", ""]
        report = (header + bench_reads(args, root) + [""] + bench_masked_reads(args, root) + [""]
                  + bench_capture(args, root) + [""] + bench_kl(args))
        load = Path("/proc/loadavg").read_text().split()[:3]
        print("\n".join(report + ["", f"/proc/loadavg at the end: {' '.join(load)}"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
