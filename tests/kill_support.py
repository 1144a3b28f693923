"""Kill a running capture once it has finished some shards: the harness of the crash-and-resume tests."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def sigkill_after_shards(command: list[str], cwd: Path, env: dict, shards: int, timeout: float) -> None:
    """Starts ``command`` in ``cwd``, SIGKILLs it once ``cwd/out`` holds ``shards`` finished shard files,
    and asserts that it was killed (not finished) and left no manifest behind."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = cwd / "out"
    deadline = time.monotonic() + timeout
    while len(list(out.glob("*.kds"))) < shards and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "capture ended before it could be killed"
    assert not (out / "manifest.json").exists()
