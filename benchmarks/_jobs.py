"""Worker processes of the benchmark drivers, ``parallel`` at a time (each trains one model with one thread)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def run_workers(
    jobs: list[dict], command: Callable[[dict], list[str]], parallel: int, cwd: Path, cached: Callable[[dict], Any] | None = None
) -> Iterator[tuple[dict, int | None, str, str]]:
    """``(job, returncode, stdout, stderr)`` for each job as its worker ends, ``parallel`` running at a time; a job for which
    ``cached(job)`` is not None is yielded at once as ``(job, None, "", "")`` without running (its result is the caller's)."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            if cached is not None and cached(job) is not None:
                yield job, None, "", ""
                continue
            running.append((job, subprocess.Popen(command(job), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        time.sleep(1.0)
        for item in list(running):
            job, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            stdout, stderr = proc.communicate()
            yield job, proc.returncode, stdout, stderr
