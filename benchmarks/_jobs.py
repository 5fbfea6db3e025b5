"""Worker processes of the benchmark drivers, ``parallel`` at a time (each trains one model with one thread)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden arguments ``run_model_jobs`` gives a driver's worker (with ``--steps``, ``--batch-size``, ``--embed-dim``,
    ``--max-seq-len`` and ``--lr``, which the drivers document themselves)."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)


def run_model_jobs(jobs: list[dict], args: Any, script: str | Path, cwd: Path) -> None:
    """The accuracy drivers' trainings: for each job ``{"model", "data", "out", "info", "seed", "steps", "lr"}``, the worker
    ``script --worker MODEL ...`` (with ``args``' batch size, widths and crop), ``args.jobs`` at a time; its JSON line (or its
    error) goes into ``job["result"]`` and is kept in ``job["info"]``, so a finished run is reused."""

    def cached(job):
        return json.loads(job["info"].read_text()) if job["info"].exists() and job["out"].exists() else None

    def command(job):
        return [sys.executable, str(script), "--worker", job["model"], "--data", str(job["data"]), "--out", str(job["out"]),
                "--seed", str(job["seed"]), "--steps", str(job["steps"]), "--batch-size", str(args.batch_size),
                "--embed-dim", str(args.embed_dim), "--max-seq-len", str(args.max_seq_len), "--lr", str(job["lr"])]  # fmt: skip

    for job, returncode, stdout, stderr in run_workers(jobs, command, args.jobs, cwd, cached):
        if returncode is None:
            job["result"] = cached(job)
        elif returncode != 0:
            job["result"] = {"error": stderr[-1500:]}
            print(f"{job['model']} seed {job['seed']} failed:\n{stderr[-1500:]}", file=sys.stderr)
        else:
            job["result"] = json.loads(stdout.strip().splitlines()[-1])
            job["info"].write_text(json.dumps(job["result"]))
            print(f"{job['data'].name} {job['model']}: {json.dumps(job['result'])}", file=sys.stderr, flush=True)
