"""Training from a feature store 8x the worker's cache (streamed) vs one that fits (resident): memory and step time.

    .venv/bin/python benchmarks/train_streaming.py [--quick]

Builds a synthetic store of random 2048-d features (videos of 500-1000 steps, 4-8 MB each; ~520 MB,
``--quick`` ~260 MB) and a store of the same kind of videos that fits in the cache (~0.85x of it), then runs
each case in a fresh Python process (as a Ray Train worker is one; ``torch.set_num_threads(1)`` as a 1-CPU
worker) through the worker's own functions, not through Ray Train: ``jobs.train.plan`` ->
``_read_shard`` (rank 0 of 1, ``cache_gb`` = the cache) -> ``_epoch_batches`` -> ``train_one_epoch``,
the ``actionformer`` architecture at width 128 with crops of 1024 steps, batch 2. The big store's
shard is 8x the cache, so it is streamed (every request a read, hidden by the read-ahead); the small
one is read whole up front, as training always did.

Figures per case: the process's peak RSS (``VmHWM``), the mean iteration time after ``WARMUP``
iterations (waiting for the batch + forward/backward/optimiser: what streaming could slow down), its
CPU time (all threads: the read-ahead's decoding included; the figure the machine's load moves
least), the mean time spent waiting for batches, and the reader's counters. The two cases alternate,
two runs each (``--quick``: one), each run a fresh process, and the figures are the runs' means. The
targets (from the issue): peak RSS <= 1.15x and iteration time <= 1.1x of the fitting case. The stores are local and were just written,
so they sit in the OS page cache: a read costs Parquet decoding, not disk or network I/O. Also measured
(unless ``--quick``): the big store read whole, what training did before streaming. One JSON line with
``os.getloadavg()`` before and after: the machine is shared, and step times move with its load.

``measure(quick)`` returns the same dict (``benchmarks/scale.py`` imports it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._machine import status_mb  # noqa: E402

DIM = 2048
CLASSES = ["a", "b", "c", "d", "e"]
WARMUP = 3
MIB = 2**20


def make_store(root: Path, name: str, total_bytes: int, seed: int) -> tuple[str, Path]:
    """A store of random ``DIM``-d videos (500-1000 steps) adding up to about ``total_bytes``, written in ~64 MB
    parts, and its ActivityNet-style annotations (2-4 segments per video; the last two videos are validation)."""
    from pipelines.store import PART_TARGET_BYTES, FeatureSequence, FeatureStore, Provenance
    from tal_models.timing import FeatureTiming

    g = np.random.default_rng(seed)
    pool = g.standard_normal((4096, DIM), dtype=np.float32)  # each video a random slice, shifted: drawing every number is slow
    timing = FeatureTiming(30.0, 4, 16)
    provenance = Provenance("synthetic-2048", "none", "0" * 64, DIM, 30.0, 4, 16, "{}")
    store = FeatureStore(str(root / name))
    database, pending, pending_bytes, written, i = {}, [], 0, 0, 0
    while written + pending_bytes < total_bytes:
        steps = int(g.integers(500, 1001))
        vid = f"{name}-{i:04d}"
        start = int(g.integers(0, len(pool) - steps))
        x = pool[start : start + steps] + np.float32(g.standard_normal())
        duration = float(timing.step_to_seconds(steps))
        pending.append(FeatureSequence(vid, x, timing, timing.centers(steps), duration=duration))
        pending_bytes += x.nbytes
        segments = np.sort(g.uniform(0, duration, size=(int(g.integers(2, 5)), 2)), axis=1)
        database[vid] = {
            "subset": "training",
            "duration": duration,
            "annotations": [{"segment": [float(s), float(e) + 1.0], "label": CLASSES[int(g.integers(len(CLASSES)))]} for s, e in segments],
        }
        if pending_bytes >= PART_TARGET_BYTES:
            store.write_part(pending, provenance)
            written, pending, pending_bytes = written + pending_bytes, [], 0
        i += 1
    if pending:
        store.write_part(pending, provenance)
    for vid in sorted(database)[-2:]:
        database[vid]["subset"] = "validation"
    gt = root / f"{name}.json"
    gt.write_text(json.dumps({"version": "1.3", "database": database}))
    return store.uri, gt


def make_preset(root: Path) -> Path:
    from dataclasses import replace

    from tal_models.config import dump_yaml
    from tal_models.presets import load_preset, make_config

    base = load_preset("thumos14-actionformer")
    detector = make_config("actionformer", num_classes=len(CLASSES), input_dim=DIM, embed_dim=128, max_seq_len=1024)
    preset = replace(base, name="bench-streaming", detector=detector, optim=replace(base.optim, epochs=1, warmup_epochs=0), batch_size=2)
    path = root / "preset.yaml"
    path.write_text(dump_yaml(preset))
    return path


def run_case(store: str, annotations: str, preset: str, cache_bytes: int, iterations: int) -> dict:
    """One worker's training, in this process: ``iterations`` steps over its shard read within ``cache_bytes``."""
    import torch

    torch.set_num_threads(1)
    from jobs.train import TrainJob, _epoch_batches, _read_shard, plan
    from tal_models.detectors import build_detector
    from tal_models.optim import build_optimizer, build_scheduler
    from tal_models.training import train_one_epoch

    planned = plan(TrainJob(config=preset, features=store, annotations=annotations, cache_gb=cache_bytes / 2**30))
    opened = time.perf_counter()
    shard = _read_shard(planned, 0, 1)
    open_s = time.perf_counter() - opened
    torch.manual_seed(0)
    model = build_detector(planned.detector)
    optimizer = build_optimizer(model, planned.optim)
    scheduler = build_scheduler(optimizer, planned.optim, iterations)
    marks, cpu, waits = [], [], []

    def timed(batches):
        """Marks the moment each batch is handed over and how long it took to get it."""
        it = iter(batches)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            now = time.perf_counter()
            marks.append(now)
            cpu.append(time.process_time())  # every thread of the process: the read-ahead's decoding included
            waits.append(now - asked)
            yield batch

    rng = np.random.default_rng([0, 0, 0])
    train_one_epoch(model, timed(_epoch_batches(planned, shard, rng, iterations, model.pad_multiple)), optimizer, scheduler)
    ended, ended_cpu = time.perf_counter(), time.process_time()
    iteration_s = np.diff([*marks, ended])[WARMUP:]  # from one batch's hand-over to the next: the step + the next batch's wait
    iteration_cpu_s = np.diff([*cpu, ended_cpu])[WARMUP:]
    reader = shard.sequences
    return {
        "videos": len(planned.train) + len(planned.val),
        "shard_mb": round(reader.estimated_bytes / MIB, 1),
        "cache_mb": round(cache_bytes / MIB, 1),
        "streaming": not reader.resident,
        "open_s": round(open_s, 3),
        "iterations_measured": len(iteration_s),
        "iteration_s": round(float(np.mean(iteration_s)), 4),
        "iteration_cpu_s": round(float(np.mean(iteration_cpu_s)), 4),
        "batch_wait_s": round(float(np.mean(waits[WARMUP:])), 4),
        "peak_rss_mb": status_mb("VmHWM"),
        "end_rss_mb": status_mb("VmRSS"),
        "reader": {
            "hits": reader.stats.hits,
            "misses": reader.stats.misses,
            "row_groups_read": reader.stats.row_groups_read,
            "read_mb": round(reader.stats.bytes_read / MIB, 1),
            "read_s": round(reader.stats.read_seconds, 2),
            "peak_cached_mb": round(reader.stats.peak_cached_bytes / MIB, 1),
        },
    }


def _in_child(store: str, annotations: Path, preset: Path, cache_bytes: int, iterations: int) -> dict:
    """``run_case`` in a fresh interpreter: its own peak RSS, nothing left over from another case."""
    cmd = [sys.executable, __file__, "--case", store, str(annotations), str(preset), str(cache_bytes), str(iterations)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mean_of_rounds(runs: list[dict]) -> dict:
    """The first run's figures, with iteration times and peak RSS averaged over the runs (each run's kept in ``rounds``)."""
    keys = ("iteration_s", "iteration_cpu_s", "batch_wait_s", "peak_rss_mb")
    merged = {**runs[0], **{k: round(float(np.mean([r[k] for r in runs])), 4) for k in keys}}
    merged["rounds"] = [{k: r[k] for k in keys} for r in runs]
    return merged


def measure(quick: bool = False) -> dict:
    """Peak RSS and mean iteration time, streaming a store 8x the cache vs a store that fits (see the module doc).

    The two cases alternate (``ROUNDS`` times each, one fresh process per run) so that a change of the shared
    machine's load falls on both; the iteration's CPU time (all threads) is the figure that load moves least."""
    cache_bytes = (32 if quick else 64) * MIB
    rounds, iterations = (1, WARMUP + 6) if quick else (2, WARMUP + 8)
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tal-bench-streaming-") as tmp:
        root = Path(tmp)
        preset = make_preset(root)
        big = make_store(root, "big", 8 * cache_bytes, seed=1)
        fits = make_store(root, "fits", int(0.85 * cache_bytes), seed=2)
        build_s = time.perf_counter() - started
        runs: dict[str, list[dict]] = {"fits": [], "streamed": []}
        for _ in range(rounds):
            runs["fits"].append(_in_child(*fits, preset, cache_bytes, iterations))
            runs["streamed"].append(_in_child(*big, preset, cache_bytes, iterations))
        # what training needed before streaming: the big store read whole (its memory; a few steps suffice)
        whole = None if quick else _in_child(*big, preset, 16 * cache_bytes, WARMUP + 1)
    fitting, streamed = _mean_of_rounds(runs["fits"]), _mean_of_rounds(runs["streamed"])
    result = {
        "benchmark": "train_streaming",
        "quick": quick,
        "cache_mb": cache_bytes / MIB,
        "fits": fitting,
        "streamed_8x": streamed,
        "rss_ratio": round(streamed["peak_rss_mb"] / fitting["peak_rss_mb"], 3),
        "iteration_time_ratio": round(streamed["iteration_s"] / fitting["iteration_s"], 3),
        "iteration_cpu_ratio": round(streamed["iteration_cpu_s"] / fitting["iteration_cpu_s"], 3),
        "targets": {"rss_ratio": 1.15, "iteration_time_ratio": 1.1},
        "build_s": round(build_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "how": "in-process worker functions (plan, _read_shard, _epoch_batches, train_one_epoch), one fresh process per case, 1 torch thread",
    }
    if whole is not None:
        result["whole_8x_in_memory"] = {k: whole[k] for k in ("videos", "shard_mb", "open_s", "peak_rss_mb")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the sizes, fewer steps, no whole-store case")
    parser.add_argument("--case", nargs=5, metavar=("STORE", "ANNOTATIONS", "PRESET", "CACHE_BYTES", "ITERATIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        store, annotations, preset, cache_bytes, iterations = args.case
        print(json.dumps(run_case(store, annotations, preset, int(cache_bytes), int(iterations))))
        return
    print(json.dumps(measure(quick=args.quick)))


if __name__ == "__main__":
    main()
