"""Teachers inside the trainer on a finished `kdfast demo` run (issue 14): the demo's student trained
with the same budget against the stored top-k shards, a live teacher, a live teacher with on-policy
micro-batches, and a live teacher with a hidden-state loss; held-out CE and agreement, tokens/s and
peak memory of each run.

    kdfast demo --out demo-out
    python bench/ablation_teachers.py --demo demo-out [--out DIR]

Every run starts from the demo's student initialisation with the demo's student settings (steps,
batch, learning rate, T = 1, hard 0.2 / soft 0.8, forward KL) and differs only in the teacher keys:

    stored top-k     train_shards = the demo's captured shards (top-k + tail), as the demo's "distill" run
    live teacher     teacher = the demo's teacher (dense distribution, no shards read for targets)
    on-policy 0.5    live teacher, on_policy_fraction = 0.5, max_new_tokens = 64, generation_temperature = 1
    hidden cosine    live teacher, hidden_loss = "cosine" (weight 1) on [[1, 2], [2, 4]] (student -> teacher)

Each run is its own process (`kdfast train`'s code in a child), so its peak resident memory (ru_maxrss)
is its own. Writes OUT/ablation.md (default DEMO/ablation-teachers) with the numbers, the machine, the
load and the command, whatever they show. A rerun resumes finished runs (they are left as they are).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys
from kdfast.train import Trainer, load_config
with Trainer(load_config(sys.argv[1])) as trainer:
    summary = trainer.train()
print("ABLATION " + json.dumps({"summary": summary,
                                "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def runs(demo: Path) -> dict[str, dict]:
    """Name -> the TrainConfig keys that differ from the demo's stored-shard student run."""
    live = {"teacher": str(demo / "teacher"), "tail": False}
    return {
        "stored top-k": {},
        "live teacher": live,
        "on-policy 0.5": {**live, "on_policy_fraction": 0.5, "max_new_tokens": 64, "generation_temperature": 1.0},
        "hidden cosine": {**live, "hidden_loss": "cosine", "hidden_loss_weight": 1.0,
                          "hidden_layer_map": [[1, 2], [2, 4]]},
    }


def train(demo: Path, out: Path, name: str, changes: dict, cfg) -> dict:
    from kdfast.demo import student_settings, to_toml

    key = name.replace(" ", "-").replace(".", "")
    settings = student_settings(cfg, train_shards=demo / "shards" / "train", eval_shards=demo / "shards" / "heldout",
                                student=demo / "student-init", run_dir=out / "runs" / key,
                                hard_weight=cfg.hard_weight, soft_weight=cfg.soft_weight, progress=False)
    settings.update(changes)
    path = out / f"{key}.toml"
    path.write_text(to_toml(settings))
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"run {name!r} failed:\n{result.stderr[-4000:]}")
    line = next(l for l in result.stdout.splitlines() if l.startswith("ABLATION "))
    return {**json.loads(line.removeprefix("ABLATION ")), "wall_s": time.perf_counter() - began,
            "final": out / "runs" / key / "final"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="a finished kdfast demo --out directory")
    parser.add_argument("--out", type=Path, help="default: DEMO/ablation-teachers")
    args = parser.parse_args()
    out = args.out or args.demo / "ablation-teachers"
    out.mkdir(parents=True, exist_ok=True)

    import numpy as np

    from kdfast.evaluate import evaluate
    from kdfast.report import describe_machine, load_average

    sys.path.insert(0, str(Path(__file__).parent))
    from ablation_generate import demo_config

    cfg, load_before = demo_config(args.demo), load_average()
    results = {name: train(args.demo, out, name, changes, cfg) for name, changes in runs(args.demo).items()}
    models = {"teacher": args.demo / "teacher", **{name: r["final"] for name, r in results.items()}}
    report = evaluate(models, args.demo / "shards" / "heldout", device="cpu", generate_tokens=0, progress=False)
    metrics = report["models"]

    def row(name: str) -> str:
        data = metrics[name]["data"]["in-distribution"]
        if name == "teacher":
            return f"| teacher | {data['ce']:.4f} | {data['agreement']:.3f} | | | |"
        summary, rss = results[name]["summary"], results[name]["max_rss_mib"]
        return (f"| {name} | {data['ce']:.4f} | {data['agreement']:.3f} | {summary['learned_tokens_per_s']:,.0f} | "
                f"{summary['train_seconds']:.0f} | {rss:,.0f} |")

    from kdfast.report import read_metrics

    on_policy = [r for r in read_metrics(out / "runs" / "on-policy-05" / "metrics.jsonl") if "generation_fraction" in r]
    overhead = (f"On-policy overhead: the student's generation took {np.mean([r['generation_fraction'] for r in on_policy]):.0%} "
                f"of the on-policy run's wall time, at {np.median([r['generation_tokens_per_s'] for r in on_policy]):,.0f} "
                "written tokens/s (median of the logged windows)." if on_policy else "")
    machine = describe_machine("cpu")
    text = "\n".join([
        "# Ablation: teachers inside the trainer", "",
        f"Command: `python bench/ablation_teachers.py --demo {args.demo}` on a finished "
        f"`kdfast demo{' --quick' if cfg.name == 'quick' else ''}` run. Same budget for every student: "
        f"{cfg.student_steps} steps of {cfg.student_batch} sequences from the demo's initialisation, T = 1, "
        f"hard {cfg.hard_weight} / soft {cfg.soft_weight}, forward KL; held-out = the demo's held-out shards.", "",
        "| student | held-out CE (nats/token) | top-1 agreement with the teacher | learned tokens/s | train s | "
        "peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|", *map(row, models), "",
        "tokens/s counts the learned tokens of the data batches over the whole step (an on-policy step's "
        "learned tokens are the ones the student wrote); peak RSS is the training process's ru_maxrss.",
        overhead, "",
        f"Machine: {machine['cpu']} ({machine['isa']}), {machine['threads']} PyTorch threads; load average "
        f"before {load_before}, after {load_average()}.", ""])
    (out / "ablation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
