"""`kdfast demo --quick` wall time on an idle machine and next to busy processes, per thread setting.

    python bench/bench_demo_contention.py                    # writes bench/results/demo-contention.md

For each number of busy processes (``--busy``, default 0 then 2: ``python -c 'while True: pass'`` each,
started before and stopped after the runs of that row) and each thread setting (``--threads``, default
``default`` = no ``--threads`` and no OMP_NUM_THREADS, so the demo picks its own count and says why;
then 1 and the usable CPU count), one run of the demo into a fresh directory, timed. With busy
processes the runs wait first until the 1-minute load average shows them (risen by 3/4 of their count,
up to ``--settle`` seconds): the demo's default reads that average. The report names the CPU, the
usable CPUs, the load averages before and after each run, the thread count each run used (the line the
demo prints) and its stage times (its report.json). Run it with nothing else running: "idle" rows are
only idle on an idle machine, and the load columns say how idle it was.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kdfast.report import describe_machine

DEMO = "kdfast demo --quick --no-progress"
BUSY = [sys.executable, "-c", "while True: pass"]
STAGES = ("teacher", "capture", "distill", "baseline", "evaluate")
THREAD_LINE = re.compile(r"kdfast demo: (\d+) PyTorch threads? \((.*?); change with")


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def start_busy(count: int, settle: float) -> list[subprocess.Popen]:
    """``count`` busy processes, once the 1-minute load average has risen by 3/4 of ``count`` (about 80 s)
    or ``settle`` seconds have passed."""
    baseline = os.getloadavg()[0]
    processes = [subprocess.Popen(BUSY) for _ in range(count)]
    deadline = time.monotonic() + settle
    while count and os.getloadavg()[0] < baseline + 0.75 * count and time.monotonic() < deadline:
        time.sleep(1)
    return processes


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


def run_once(command: list[str], threads: str) -> dict:
    """One run of ``command --out <fresh dir>`` (+ ``--threads N``): wall seconds, load, threads used, stages."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        args = command + ["--out", str(out)] + ([] if threads == "default" else ["--threads", threads])
        before, began = load(), time.perf_counter()
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        seconds, after = time.perf_counter() - began, load()
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(args)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
        used = THREAD_LINE.search(done.stderr)
        report = out / "report.json"
        stages = ({s["name"]: s["seconds"] for s in json.loads(report.read_text())["stages"]} if report.is_file()
                  else {})
    return {"seconds": seconds, "load_before": before, "load_after": after, "stages": stages,
            "threads_used": f"{used[1]} ({used[2]})" if used else "not printed"}


def markdown(command: list[str], rows: list[dict], argv: list[str]) -> str:
    header = ["busy processes", "--threads", "threads used (why)", "wall s", "load before", "load after",
              *(f"{name} s" for name in STAGES)]
    lines = [
        "# `kdfast demo --quick` under contention", "",
        f"- command: `{shlex.join(['python', 'bench/bench_demo_contention.py', *argv])}`",
        f"- each run: `{shlex.join(command)} --out <new dir> [--threads N]`; busy process: `python {shlex.join(BUSY[1:])}`",
        f"- CPU: {describe_machine()['cpu']}, {usable_cpus()} usable of {os.cpu_count()} CPUs; Python {platform.python_version()}",
        f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load averages are 1 / 5 / 15 minutes",
        "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]
    for row in rows:
        stages = [f"{row['stages'][name]:.1f}" if name in row["stages"] else "" for name in STAGES]
        lines.append("| " + " | ".join([str(row["busy"]), row["threads"], row["threads_used"], f"{row['seconds']:.1f}",
                                        row["load_before"], row["load_after"], *stages]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2], help="busy processes per row (default 0 2)")
    parser.add_argument("--threads", nargs="+", default=["default", "1", str(usable_cpus())],
                        help="thread settings: 'default' or a count (default: default 1 <usable CPUs>)")
    parser.add_argument("--command", default=DEMO, help=f"what is timed (default: {DEMO!r}); --out DIR is appended")
    parser.add_argument("--settle", type=float, default=180.0,
                        help="seconds to wait at most for the load average to show the busy processes (default 180)")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "demo-contention.md")
    args = parser.parse_args(argv)
    command = shlex.split(args.command)
    rows = []
    for busy in sorted(args.busy):
        processes = start_busy(busy, args.settle)
        try:
            for threads in args.threads:
                rows.append({"busy": busy, "threads": threads, **run_once(command, threads)})
                print(f"busy {busy}, --threads {threads}: {rows[-1]['seconds']:.1f} s", file=sys.stderr)
        finally:
            stop(processes)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(markdown(command, rows, argv))
    print(args.results.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
