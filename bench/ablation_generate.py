"""Ablation on a finished `kdfast demo` run: a student trained on teacher-written data, with and without
the teacher's stored distributions (issue 13).

    kdfast demo --out demo-out
    python bench/ablation_generate.py --demo demo-out [--prompts 400] [--max-new-tokens 64]

1. Prompts: the first ``--prompt-tokens`` tokens of the demo's first ``--prompts`` training sequences,
   decoded to text (prompts.jsonl).
2. ``kdfast generate`` with the demo's teacher: one sampled response per prompt at temperature 1, the
   teacher's top-k (the demo's k) and tail stored at every response token.
3. Two students from the demo's student initialisation, the demo's student settings (steps, batch,
   learning rate, T = 1, tail bucket), trained on the generated shards: "teacher text" (hard 1 /
   soft 0: plain sequence-level distillation, SFT on what the teacher wrote) and "text + distributions"
   (the demo's hard 0.2 / soft 0.8 against the stored top-k).
4. ``kdfast eval`` of the teacher, the two students and the demo's own students on the demo's
   held-out shards (natural text, not teacher-written): mean CE, top-1 agreement with the teacher.

Writes OUT/ablation.md (default OUT = DEMO/ablation-generate) with the numbers, the machine and the
command, whatever they show. Reruns resume (generate and the trainer resume; evaluation reruns).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def write_prompts(demo: Path, path: Path, count: int, prompt_tokens: int) -> int:
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo / "tokenizer", local_files_only=True)
    sequences = np.load(demo / "data" / "train_tokens.npy")[:count, :prompt_tokens]
    records = [{"prompt": tokenizer.decode(row.tolist())} for row in sequences]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)


def demo_config(demo: Path):
    from kdfast.demo import FULL, QUICK

    settings = json.loads((demo / "stages.json").read_text())["settings"]
    return {"quick": QUICK, "full": FULL}[settings["name"]]


def train(demo: Path, shards: Path, run_dir: Path, cfg, hard: float, soft: float) -> dict:
    from kdfast.demo import student_settings
    from kdfast.train import TrainConfig, Trainer

    settings = student_settings(cfg, train_shards=shards, eval_shards=demo / "shards" / "heldout",
                                student=demo / "student-init", run_dir=run_dir, hard_weight=hard, soft_weight=soft,
                                progress=False)
    with Trainer(TrainConfig(**settings)) as trainer:
        return trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a finished kdfast demo --out directory")
    parser.add_argument("--out", type=Path, help="default: DEMO/ablation-generate")
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    out = args.out or args.demo / "ablation-generate"
    out.mkdir(parents=True, exist_ok=True)

    from kdfast.evaluate import evaluate
    from kdfast.generate import generate
    from kdfast.report import describe_machine, load_average

    cfg, load_before, began = demo_config(args.demo), load_average(), time.perf_counter()
    prompts = write_prompts(args.demo, out / "prompts.jsonl", args.prompts, args.prompt_tokens)
    generated = generate(out / "prompts.jsonl", out / "generated", teacher=args.demo / "teacher",
                         prompt_field="prompt", max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0,
                         k=cfg.k, device="cpu", progress=False)
    runs = {"teacher text (hard 1 / soft 0)": ("text", 1.0, 0.0),
            f"text + distributions (hard {cfg.hard_weight} / soft {cfg.soft_weight})":
                ("distributions", cfg.hard_weight, cfg.soft_weight)}
    summaries = {name: train(args.demo, out / "generated", out / "runs" / key, cfg, hard, soft)
                 for name, (key, hard, soft) in runs.items()}
    models = {"teacher": args.demo / "teacher",
              **{name: out / "runs" / key / "final" for name, (key, *_) in runs.items()},
              "demo distilled (captured natural text)": args.demo / "runs" / "distill" / "final",
              "demo baseline (natural text, hard only)": args.demo / "runs" / "baseline" / "final"}
    report = evaluate(models, args.demo / "shards" / "heldout", device="cpu", generate_tokens=0, progress=False)
    seconds = time.perf_counter() - began

    from kdfast.shards.reader import open_shards

    shards = open_shards(out / "generated")
    rows = [f"| {name} | {m['data']['in-distribution']['ce']:.4f} | "
            f"{m['data']['in-distribution']['agreement']:.3f} |" for name, m in report["models"].items()]
    machine = describe_machine("cpu")
    text = "\n".join([
        "# Ablation: students trained on teacher-written data (kdfast generate)", "",
        f"Command: `python bench/ablation_generate.py --demo {args.demo} --prompts {args.prompts} "
        f"--prompt-tokens {args.prompt_tokens} --max-new-tokens {args.max_new_tokens}` on a finished "
        f"`kdfast demo{' --quick' if cfg.name == 'quick' else ''}` run "
        f"({seconds:.0f} s).", "",
        f"Generated: {prompts} prompts of {args.prompt_tokens} tokens, one sample each at temperature 1; "
        f"{len(shards)} sequences, {shards.total_tokens:,} tokens, {shards.learned_tokens:,} learned "
        f"(response) tokens, top-{cfg.k} + tail stored at each. Students: the demo's initialisation and "
        f"settings ({cfg.student_steps} steps, batch {cfg.student_batch}, T = 1, tail bucket). Held-out: "
        f"the demo's held-out shards (natural text).", "",
        "| model | held-out CE (nats/token) | top-1 agreement with the teacher |", "|---|---:|---:|", *rows, "",
        f"Machine: {machine['cpu']} ({machine['isa']}), {machine['threads']} PyTorch threads; load average "
        f"before {load_before}, after {load_average()}.",
        f"Train summaries: {json.dumps({n: {k: s.get(k) for k in ('step', 'train_loss')} for n, s in summaries.items()})}",
        f"Generation (this call): {generated.generated_tokens:,} tokens in {generated.seconds:.1f} s.", ""])
    (out / "ablation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
