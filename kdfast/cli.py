"""The ``kdfast`` command line.

Each subcommand is one ``add_<name>_command(subparsers)`` function that registers its parser and
sets ``func`` (``args -> exit code``); ``COMMANDS`` lists them, so a new subcommand is one function
plus one entry. The ``run_<name>`` functions call the library (``kdfast.capture``, ``kdfast.generate``,
``kdfast.shards``, ``kdfast.train``, ``kdfast.bench``, ``kdfast.demo``, ``kdfast.evaluate``, ``kdfast.export``);
no library module imports this one.

Building the parser imports no torch (the train options come from the torch-free
``kdfast.train.config``, the eval and export options from ``kdfast.evaluate`` / ``kdfast.export``, whose
parser parts import no torch), so ``kdfast --help`` and ``kdfast verify --help`` answer at
once; each command imports what it needs when it runs. The commands that compute (capture, generate,
train, bench, demo, eval, export) take ``--threads``: ``main`` sets PyTorch's intra-op threads before running them and
prints the choice (``set_threads``). Exit codes: 0 success, 1 damaged or incomplete data
(ShardError), 2 bad arguments or input (argparse, ValueError, unreadable files) or a non-finite
training loss (FloatingPointError), 130 a capture
or generation interrupted by Ctrl-C (rerun the same command to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Callable

__all__ = ["main", "build_parser", "COMMANDS"]


def threads_option() -> argparse.ArgumentParser:
    """``--threads``, shared by the commands that compute with PyTorch (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--threads", type=int, metavar="N",
                        help="PyTorch intra-op threads (default: OMP_NUM_THREADS if set, else the CPUs this "
                             "process may use; on a busy machine fewer threads than CPUs can be faster)")
    return parent


def set_threads(requested: int | None, command: str) -> int:
    """Set PyTorch's intra-op threads from ``--threads``, else OMP_NUM_THREADS, else the CPUs this
    process may run on (its affinity mask, which a container or taskset narrows) or, for ``demo``, those
    of them other work leaves free (``busy_cpus``); print the choice."""
    import torch

    from kdfast.report import load_average, usable_cpus

    if requested is not None:
        threads, why = requested, "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        threads, why = _integer(os.environ["OMP_NUM_THREADS"], "OMP_NUM_THREADS"), "OMP_NUM_THREADS"
    elif command == "demo" and (load := load_average()) is not None:
        usable, cpus = usable_cpus(), os.cpu_count() or usable_cpus()
        busy = busy_cpus(usable, cpus, load[0])
        threads = max(1, usable - busy)
        why = (f"{usable} usable CPUs, about {busy} of them kept busy by other work: load average {load[0]:.1f} "
               f"on {cpus} CPUs")
    else:
        threads, why = usable_cpus(), "the CPUs this process may use"
    if threads < 1:
        raise ValueError(f"{why} must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per rank
        print(f"kdfast {command}: {threads} PyTorch thread{'s' if threads > 1 else ''} ({why}; "
              f"change with --threads or OMP_NUM_THREADS)", file=sys.stderr)
    return threads


def busy_cpus(usable: int, cpus: int, load: float) -> int:
    """How many of the ``usable`` CPUs other work keeps busy: the 1-minute ``load`` average of the
    machine's ``cpus``, in proportion to this process's share of them, rounded (at most ``usable``).

    ``kdfast demo`` runs on the others (at least 1): a thread that waits for a busy core holds up the
    others at every synchronisation, so on a 2-core machine with two other busy processes its steps
    took 1.5 s with one thread against 5.5 s with two (issue #19). The other commands keep all usable
    CPUs, so that their results (which round differently with another thread count) do not depend on
    the load."""
    return min(usable, math.floor(load * usable / cpus + 0.5))


def _integer(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def add_capture_command(subparsers) -> None:
    p = subparsers.add_parser("capture", help="run a teacher over token sequences and write shards",
                              parents=[threads_option()],
                              description="Run a teacher once and store its top-k or sampled targets as shards. "
                                          "Rerun the same command after an interruption to finish.")
    teacher = p.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher",
                         help="local Hugging Face model directory, or module:callable (input_ids [B, L] -> logits "
                              "[B, L, V])")
    teacher.add_argument("--teacher-url",
                         help="OpenAI-compatible completions server (vLLM), e.g. http://127.0.0.1:8000/v1: read its "
                              "prompt log-probs (topk mode, temperature 1; --batch-size requests in flight)")
    p.add_argument("--teacher-model", help="with --teacher-url: the served model's name (as its /v1/models lists it)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help=".npy of token ids: [N, L], or a 1-D stream cut into --seq-len pieces")
    source.add_argument("--text", help="UTF-8 text, one document per line (needs --tokenizer and --seq-len)")
    source.add_argument("--data", help="dataset file: .jsonl, .parquet or a datasets save_to_disk directory "
                                       "(needs one of --text-field, --prompt-field/--response-field, "
                                       "--messages-field, and --max-len; see docs/data.md)")
    p.add_argument("--tokenizer", help="tokenizer directory (required with --text; recorded in the manifest)")
    p.add_argument("--seq-len", type=int, help="sequence length for a 1-D token stream or text")
    p.add_argument("--text-field", help="--data: plain-text field, every token learned, EOS appended")
    p.add_argument("--prompt-field", help="--data: prompt field (not learned), with --response-field")
    p.add_argument("--response-field", help="--data: response field (learned, with the EOS after it)")
    p.add_argument("--messages-field", help="--data: list of {role, content} rendered with the tokenizer's chat "
                                            "template; only assistant turns are learned")
    p.add_argument("--max-len", type=int, help="--data: longest stored sequence in tokens")
    p.add_argument("--truncate", action="store_true",
                   help="--data: cut sequences longer than --max-len (text: keep only the first window)")
    p.add_argument("--skip-bad", action="store_true",
                   help="--data: skip and count bad records instead of stopping at the first one")
    p.add_argument("--out", required=True, help="output directory (created; resumed if interrupted)")
    p.add_argument("--k", type=int, default=64, help="slots per position (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="capture temperature (default 1.0)")
    p.add_argument("--mode", choices=("topk", "sampled"), default="topk",
                   help="topk: the k most likely tokens' log-probs and the tail mass (default); sampled: "
                        "--samples draws from the teacher, stored as empirical probabilities (RS-KD)")
    p.add_argument("--samples", type=int, help="samples per position in sampled mode (default: k)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences per teacher forward pass (default 8; lower it if the teacher runs out of memory)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="teacher dtype: auto, float32, bfloat16, float16")
    p.add_argument("--device-map", choices=("auto", "balanced", "balanced_low_0", "sequential"),
                   help="spread a Hugging Face teacher larger than one device over the GPUs (then CPU memory) "
                        "with accelerate's big-model loading, instead of --device")
    p.add_argument("--shard-tokens", type=int, default=1 << 20, help="tokens per shard (default 1048576)")
    p.add_argument("--values", choices=("float16", "bfloat16", "uint8"), default="float16",
                   help="stored value type (uint8: compact, topk mode only)")
    p.add_argument("--indices", choices=("int32", "packed"), default="int32",
                   help="stored index type (packed: ceil(log2(V + 1)) bits per id)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (sampled mode)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_capture)


def run_capture(args) -> int:
    try:
        result = _capture(args)
    except KeyboardInterrupt:  # the shards written so far are complete: the writer resumes after them
        print("\nkdfast capture: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if result.captured_sequences == 0:
        print(f"{result.path}: already complete ({result.sequences} sequences)")
    else:
        print(f"{result.path}: captured {result.captured_sequences} sequences ({result.captured_tokens} tokens); "
              f"teacher {result.teacher_seconds:.2f} s, targets {result.targets_seconds:.2f} s, "
              f"write {result.write_seconds:.2f} s")
    return 0


def _capture(args):
    from kdfast.capture import capture, load_token_file, tokenize_text

    data_options = ("text_field", "prompt_field", "response_field", "messages_field", "max_len", "truncate",
                    "skip_bad")
    if args.data is None and any(getattr(args, name) not in (None, False) for name in data_options):
        raise ValueError("--text-field, --prompt-field, --response-field, --messages-field, --max-len, --truncate "
                         "and --skip-bad go with --data")
    if args.data is not None:
        tokens = _data_source(args)
    elif args.text is not None:
        if args.tokenizer is None or args.seq_len is None:
            raise ValueError("--text needs --tokenizer and --seq-len")
        tokens = tokenize_text(args.text, args.tokenizer, args.seq_len)
    else:
        tokens = load_token_file(args.tokens, args.seq_len)
    result = capture(_teacher(args), tokens, args.out, k=args.k, temperature=args.temperature, mode=args.mode,
                     num_samples=args.samples, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                     shard_tokens=args.shard_tokens, value_dtype=args.values, index_encoding=args.indices,
                     seed=args.seed, tokenizer=args.tokenizer, progress=not args.no_progress,
                     device_map=args.device_map)
    if args.data is not None and result.captured_sequences:
        c = tokens.counts
        print(f"{args.data}: {c.records} records ({c.skipped} bad, skipped), {c.sequences} sequences, "
              f"{c.tokens} tokens, {c.learned} learned")
    return result


def _data_source(args):
    """--data PATH as a kdfast.sources.DataSource, tokenized with --tokenizer or the teacher's own."""
    from transformers import AutoTokenizer

    from kdfast.capture import _tokenizer_beside
    from kdfast.sources import DataSource

    if args.max_len is None:
        raise ValueError("--data needs --max-len")
    tokenizer_dir = args.tokenizer or (args.teacher and _tokenizer_beside(args.teacher))
    if not tokenizer_dir:
        raise ValueError("--data needs --tokenizer" if args.teacher is None else
                         "--data needs --tokenizer (the teacher has no tokenizer files beside it)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer {tokenizer_dir}: cannot load it ({e})") from None
    return DataSource(args.data, tokenizer, max_len=args.max_len, text_field=args.text_field,
                      prompt_field=args.prompt_field, response_field=args.response_field,
                      messages_field=args.messages_field, truncate=args.truncate, skip_bad=args.skip_bad)


def _teacher(args):
    """--teacher as given, or the ServedTeacher that --teacher-url and --teacher-model name."""
    if args.teacher_url is None:
        if args.teacher_model is not None:
            raise ValueError("--teacher-model goes with --teacher-url")
        return args.teacher
    if args.teacher_model is None:
        raise ValueError("--teacher-url needs --teacher-model (a model name from the server's /v1/models)")
    from kdfast.served import ServedTeacher

    return ServedTeacher(args.teacher_url, args.teacher_model, k=args.k, concurrency=args.batch_size)


def add_generate_command(subparsers) -> None:
    p = subparsers.add_parser("generate", help="let the teacher answer prompts and store its answers as shards",
                              parents=[threads_option()],
                              description="The teacher generates responses to prompts; each prompt + response is "
                                          "stored with the teacher's top-k at every response token (only the "
                                          "response and its EOS are learned), the texts in responses.jsonl. Rerun "
                                          "the same command after an interruption to finish. See docs/generate.md.")
    teacher = p.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher", help="local Hugging Face model directory (generates with model.generate)")
    teacher.add_argument("--teacher-url", help="vLLM completions server, e.g. http://127.0.0.1:8000/v1 (its log-probs "
                                               "of the generated tokens; --batch-size requests in flight)")
    p.add_argument("--teacher-model", help="with --teacher-url: the served model's name (as its /v1/models lists it)")
    p.add_argument("--prompts", required=True, help="prompt records: .jsonl, .parquet or a datasets directory")
    field = p.add_mutually_exclusive_group(required=True)
    field.add_argument("--prompt-field", help="prompt text field (tokenized with the tokenizer's special tokens)")
    field.add_argument("--messages-field", help="list of {role, content} with a user turn, rendered by the chat "
                                                "template with its generation prompt")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the teacher's; required with --teacher-url)")
    p.add_argument("--out", required=True, help="output directory (created; resumed if interrupted)")
    p.add_argument("--max-new-tokens", type=int, required=True, help="longest response in tokens")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="responses per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default 1.0; 0 = greedy); a local teacher's targets are stored at "
                        "this temperature (greedy: 1), a served one's at 1")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--k", type=int, default=64, help="slots per learned position (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per model.generate call or requests in flight "
                                                             "(default 8)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="teacher dtype: auto, float32, bfloat16, float16")
    p.add_argument("--shard-tokens", type=int, default=1 << 20, help="tokens per shard (default 1048576)")
    p.add_argument("--values", choices=("float16", "bfloat16", "uint8"), default="float16", help="stored value type")
    p.add_argument("--indices", choices=("int32", "packed"), default="int32", help="stored index type")
    p.add_argument("--drop-unfinished", action="store_true",
                   help="leave out responses that reached --max-new-tokens without EOS")
    p.add_argument("--filter", metavar="MODULE:FUNCTION",
                   help="keep a response only when FUNCTION(prompt_record, response_text) returns True")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from kdfast.generate import generate

    try:
        result = generate(args.prompts, args.out, teacher=_teacher(args), prompt_field=args.prompt_field,
                          messages_field=args.messages_field, tokenizer=args.tokenizer,
                          max_new_tokens=args.max_new_tokens, samples_per_prompt=args.samples_per_prompt,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed, k=args.k,
                          batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                          shard_tokens=args.shard_tokens, value_dtype=args.values, index_encoding=args.indices,
                          drop_unfinished=args.drop_unfinished, filter=args.filter, progress=not args.no_progress)
    except KeyboardInterrupt:  # the shards written so far are complete: the rerun continues after them
        print("\nkdfast generate: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if result.generated_tokens == 0:
        print(f"{result.path}: already complete ({result.sequences} sequences)")
    else:
        print(f"{result.path}: stored {result.generated_sequences} responses, dropped {result.dropped}; generated "
              f"{result.generated_tokens} tokens in {result.seconds:.2f} s; texts in {result.responses}")
    return 0


def add_verify_command(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check every byte of a shard dataset",
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
        ("format", f"version {shards.format_version}"), ("kind", m["kind"]), ("values", m["value_dtype"]),
        ("indices", f"{m['index_encoding']} ({m['index_bits']} bits)"),
        ("temperature", m["capture_temperature"]), ("capture", m.get("capture")), ("sequences", m["num_sequences"]),
        ("tokens", shards.total_tokens), ("learned", shards.learned_tokens), ("shards", len(m["shards"])),
        ("bytes", shards.nbytes), ("bytes/token", f"{shards.nbytes / shards.total_tokens:.1f}"),
    ]
    if m.get("generation") is not None:  # written by kdfast generate
        rows.insert(10, ("generation", m["generation"]))
    for name, value in rows:
        print(f"{name:<12} {_plain(value)}")
    _print_sample(shards, args.sequence, args.position, tokenizer)
    return 0


def _plain(value) -> str:
    """A manifest value as text: a dict (teacher, tokenizer, capture) as "key value" pairs, not Python syntax."""
    if isinstance(value, dict):
        return ", ".join(f"{key} {item}" for key, item in value.items() if item is not None)
    return "none" if value is None else str(value)


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
    if not row.mask[position]:
        print("targets      none: this position is not learned (masked out when the shards were written)")
        return
    print(f"{'rank':>4} {'id':>8} {'value':>10} {'prob':>8}  token")
    for rank, (index, value) in enumerate(zip(row.indices[position], row.values[position]), 1):
        if index < 0:
            continue
        prob = math.exp(value) if shards.kind == "logprobs" else value
        print(f"{rank:>4} {int(index):>8} {value:>10.4f} {prob:>8.4f}  {show(index)}")
    if shards.kind == "logprobs":
        print(f"tail         log-mass {row.tail[position]:.4f} (prob {math.exp(row.tail[position]):.4f})")


def add_train_command(subparsers) -> None:
    from kdfast.train.config import add_train_arguments  # torch-free: the TrainConfig fields

    p = subparsers.add_parser("train", help="distill a student from teacher shards (one process, DDP or FSDP2)",
                              parents=[threads_option()],
                              description="Train a student on teacher shards; every TrainConfig key is an option "
                                          "(--key value) that overrides the TOML file. See docs/train.md.")
    add_train_arguments(p)
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from kdfast.train import run_train as train

    return train(args)


# kdfast.bench.IMPLS, repeated here so that building the parser does not import torch (a test checks they agree)
BENCH_IMPLS = ("kdfast-cpu", "kdfast-triton", "torch-eager", "torch-compile", "liger")


def add_bench_command(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time the fused loss against the PyTorch reference (and Liger-Kernel)",
                              parents=[threads_option()],
                              description="Benchmark kd_loss forward+backward for every available backend, "
                                          "torch eager and torch.compile; prints a table, writes JSON and a PNG.")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (CI smoke run)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="directory for bench.json and bench_vocab.png")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported)")
    p.add_argument("--impl", action="append", choices=BENCH_IMPLS, default=None,
                   help="implementation to run (repeatable); default: every one available here")
    p.add_argument("--no-sweep", action="store_true", help="skip the vocabulary sweep (and the PNG)")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from kdfast.bench import run_bench as bench

    return bench(args.out, device=args.device, quick=args.quick, repeats=args.repeats, impls=args.impl,
                 sweep=not args.no_sweep)


def add_demo_command(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the whole job offline on CPU: tokenizer, teacher, capture, distill, report",
                              parents=[threads_option()],
                              description="Train a tokenizer and a small teacher on the Python standard library, "
                                          "capture its top-k targets, distill a student and compare it with a "
                                          "hard-label baseline; writes report.md and curves.png.")
    p.add_argument("--out", type=Path, default=Path("demo-out"),
                   help="output directory: new or empty, or an interrupted demo run with the same settings to finish")
    p.add_argument("--quick", action="store_true", help="the CI-sized run (well under three minutes on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and every initialization")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from kdfast import demo

    cfg = dataclasses.replace(demo.QUICK if args.quick else demo.FULL, seed=args.seed)
    report = demo.run_demo(args.out, cfg, progress=not args.no_progress)
    print(demo.summary_text(report, args.out / "report.md"))
    return 0


def add_eval_command(subparsers) -> None:
    from kdfast.evaluate import add_eval_arguments

    p = subparsers.add_parser("eval", help="compare students with their teacher: quality, agreement, calibration, "
                                           "size, speed", parents=[threads_option()],
                              description="Evaluate models on teacher shards; writes report.md, report.json, "
                                          "reliability.png and quality_vs_size.png.")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from kdfast.evaluate import run_eval as evaluate

    return evaluate(args)


def add_export_command(subparsers) -> None:
    from kdfast.export import add_export_arguments

    p = subparsers.add_parser("export", help="write a Hugging Face directory (optionally int8 weights) with its card",
                              parents=[threads_option()],
                              description="Export a model as safetensors that from_pretrained loads, with the "
                                          "fitted temperature and, with --quantize int8-weight, torchao int8 weights.")
    add_export_arguments(p)
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from kdfast.export import run_export as export

    return export(args)


COMMANDS: list[Callable] = [add_capture_command, add_generate_command, add_verify_command, add_inspect_command,
                            add_train_command, add_bench_command, add_demo_command, add_eval_command,
                            add_export_command]


def build_parser() -> argparse.ArgumentParser:
    from kdfast import __version__

    parser = argparse.ArgumentParser(prog="kdfast", description="Fast knowledge distillation for large vocabularies.")
    parser.add_argument("--version", action="version", version=f"kdfast {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    from kdfast.shards.format import ShardError  # after parsing: --help imports no torch

    try:
        if "threads" in args:
            set_threads(args.threads, args.command)
        return args.func(args)
    except ShardError as e:
        print(f"kdfast {args.command}: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, FloatingPointError) as e:  # FloatingPointError: the trainer's non-finite loss
        print(f"kdfast {args.command}: error: {e}", file=sys.stderr)
        return 2
