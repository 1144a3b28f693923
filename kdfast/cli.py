"""The ``kdfast`` command line.

Each subcommand is one ``add_<name>_command(subparsers)`` function that registers its parser and
sets ``func`` (``args -> exit code``); ``COMMANDS`` lists them, so a new subcommand (train, bench,
demo) is one function plus one entry. Heavy imports (torch, transformers) happen inside the
command that needs them. Exit codes: 0 success, 1 damaged or incomplete data (ShardError),
2 bad arguments or input (argparse, ValueError, unreadable files).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

from kdfast.shards.format import ShardError

__all__ = ["main", "build_parser", "COMMANDS"]


def add_capture_command(subparsers) -> None:
    p = subparsers.add_parser("capture", help="run a teacher over token sequences and write shards",
                              description="Run a teacher once and store its top-k or sampled targets as shards. "
                                          "Rerun the same command after an interruption to finish.")
    p.add_argument("--teacher", required=True,
                   help="local Hugging Face model directory, or module:callable (input_ids [B, L] -> logits [B, L, V])")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help=".npy of token ids: [N, L], or a 1-D stream cut into --seq-len pieces")
    source.add_argument("--text", help="UTF-8 text, one document per line (needs --tokenizer and --seq-len)")
    p.add_argument("--tokenizer", help="tokenizer directory (required with --text; recorded in the manifest)")
    p.add_argument("--seq-len", type=int, help="sequence length for a 1-D token stream or text")
    p.add_argument("--out", required=True, help="output directory (created; resumed if interrupted)")
    p.add_argument("--k", type=int, default=64, help="slots per position (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="capture temperature (default 1.0)")
    p.add_argument("--mode", choices=("topk", "sampled"), default="topk")
    p.add_argument("--samples", type=int, help="samples per position in sampled mode (default: k)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="teacher dtype: auto, float32, bfloat16, float16")
    p.add_argument("--shard-tokens", type=int, default=1 << 20, help="tokens per shard (default 1048576)")
    p.add_argument("--values", choices=("float16", "bfloat16", "uint8"), default="float16",
                   help="stored value type (uint8: compact, topk mode only)")
    p.add_argument("--indices", choices=("int32", "packed"), default="int32",
                   help="stored index type (packed: ceil(log2(V + 1)) bits per id)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (sampled mode)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_capture)


def run_capture(args) -> int:
    from kdfast.capture import capture, load_token_file, tokenize_text

    if args.text is not None:
        if args.tokenizer is None or args.seq_len is None:
            raise ValueError("--text needs --tokenizer and --seq-len")
        tokens = tokenize_text(args.text, args.tokenizer, args.seq_len)
    else:
        tokens = load_token_file(args.tokens, args.seq_len)
    result = capture(args.teacher, tokens, args.out, k=args.k, temperature=args.temperature, mode=args.mode,
                     num_samples=args.samples, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                     shard_tokens=args.shard_tokens, value_dtype=args.values, index_encoding=args.indices,
                     seed=args.seed, tokenizer=args.tokenizer, progress=not args.no_progress)
    if result.captured_sequences == 0:
        print(f"{result.path}: already complete ({result.sequences} sequences)")
    else:
        print(f"{result.path}: captured {result.captured_sequences} sequences ({result.captured_tokens} tokens); "
              f"teacher {result.teacher_seconds:.2f} s, targets {result.targets_seconds:.2f} s, "
              f"write {result.write_seconds:.2f} s")
    return 0


def add_verify_command(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check every checksum of a shard dataset",
                              description="Check every byte of a shard dataset; exit code 1 on any damage.")
    p.add_argument("directory")
    p.add_argument("--vocab-size", type=int, help="fail unless the teacher vocabulary has this size")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_verify)


def run_verify(args) -> int:
    from kdfast.shards.reader import load_manifest, verify_shards

    errors = verify_shards(args.directory, vocab_size=args.vocab_size, progress=not args.no_progress)
    for error in errors:
        print(f"DAMAGED {error}", file=sys.stderr)
    if errors:
        print(f"{args.directory}: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    manifest = load_manifest(args.directory)
    print(f"{args.directory}: OK ({len(manifest['shards'])} shards, {manifest['num_sequences']} sequences, "
          f"{manifest['num_tokens']} tokens)")
    return 0


def add_inspect_command(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="summarize a shard dataset and show one sample row",
                              description="Summarize a shard dataset (O(1) open, no checksums) and print the "
                                          "teacher targets at one position, decoded when a tokenizer is known.")
    p.add_argument("directory")
    p.add_argument("--tokenizer", help="tokenizer directory for decoding (default: the manifest's, if present)")
    p.add_argument("--sequence", type=int, default=0)
    p.add_argument("--position", type=int, default=0)
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from kdfast.shards.reader import open_shards

    shards = open_shards(args.directory)
    m = shards.manifest
    tokenizer = _load_tokenizer(args.tokenizer or (m.get("tokenizer") or {}).get("path"))
    rows = [
        ("teacher", m.get("teacher")), ("tokenizer", m.get("tokenizer")), ("vocab", m["vocab_size"]), ("k", m["k"]),
        ("kind", m["kind"]), ("values", m["value_dtype"]),
        ("indices", f"{m['index_encoding']} ({m['index_bits']} bits)"),
        ("temperature", m["capture_temperature"]), ("capture", m.get("capture")), ("sequences", m["num_sequences"]),
        ("tokens", m["num_tokens"]), ("shards", len(m["shards"])), ("bytes", shards.nbytes),
        ("bytes/token", f"{shards.nbytes / m['num_tokens']:.1f}"),
    ]
    for name, value in rows:
        print(f"{name:<12} {value}")
    _print_sample(shards, args.sequence, args.position, tokenizer)
    return 0


def _load_tokenizer(directory):
    if directory is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load tokenizer {directory}: {e}") from None


def _print_sample(shards, sequence: int, position: int, tokenizer) -> None:
    if not 0 <= sequence < len(shards):
        raise ValueError(f"--sequence {sequence} out of range [0, {len(shards)})")
    row = shards.read(sequence)
    if not 0 <= position < len(row.tokens):
        raise ValueError(f"--position {position} out of range [0, {len(row.tokens)})")
    show = (lambda i: repr(tokenizer.decode([int(i)]))) if tokenizer is not None else (lambda i: "")
    context = row.tokens[:position + 1].tolist()
    following = row.tokens[position + 1] if position + 1 < len(row.tokens) else None
    print(f"\nsample       sequence {sequence}, position {position}")
    print(f"context      {tokenizer.decode(context)!r}" if tokenizer is not None else f"context ids  {context[-16:]}")
    if following is not None:
        print(f"next token   {int(following)} {show(following)}")
    print(f"{'rank':>4} {'id':>8} {'value':>10} {'prob':>8}  token")
    for rank, (index, value) in enumerate(zip(row.indices[position], row.values[position]), 1):
        if index < 0:
            continue
        prob = math.exp(value) if shards.kind == "logprobs" else value
        print(f"{rank:>4} {int(index):>8} {value:>10.4f} {prob:>8.4f}  {show(index)}")
    if shards.kind == "logprobs":
        print(f"tail         log-mass {row.tail[position]:.4f} (prob {math.exp(row.tail[position]):.4f})")


def add_train_command(subparsers) -> None:
    from kdfast.train import add_train_arguments, run_train

    p = subparsers.add_parser("train", help="distill a student from teacher shards (one process or torchrun)",
                              description="Train a student on teacher shards; every TrainConfig key is an option "
                                          "(--key value) that overrides the TOML file. See docs/train.md.")
    add_train_arguments(p)
    p.set_defaults(func=run_train)


def add_bench_command(subparsers) -> None:
    from kdfast.bench import add_arguments, run

    p = subparsers.add_parser("bench", help="time the fused loss against the PyTorch reference (and Liger-Kernel)",
                              description="Benchmark kd_loss forward+backward for every available backend, "
                                          "torch eager and torch.compile; prints a table, writes JSON and a PNG.")
    add_arguments(p)
    p.set_defaults(func=run)


def add_demo_command(subparsers) -> None:
    from kdfast.demo import add_arguments, run

    p = subparsers.add_parser("demo", help="the whole job offline on CPU: tokenizer, teacher, capture, distill, report",
                              description="Train a tokenizer and a small teacher on the Python standard library, "
                                          "capture its top-k targets, distill a student and compare it with a "
                                          "hard-label baseline; writes report.md and curves.png.")
    add_arguments(p)
    p.set_defaults(func=run)


COMMANDS: list[Callable] = [add_capture_command, add_verify_command, add_inspect_command, add_train_command,
                            add_bench_command, add_demo_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdfast", description="Fast knowledge distillation for large vocabularies.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ShardError as e:
        print(f"kdfast {args.command}: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"kdfast {args.command}: error: {e}", file=sys.stderr)
        return 2
