"""Feature extraction throughput (Ray pipeline vs a plain one-core loop) and per-worker peak memory.

    .venv/bin/python benchmarks/extract.py [--videos 8] [--duration 30] [--long-minutes 5]
                                           [--skip-memory] [--skip-throughput] [--cache /tmp/tal-bench]

Prints ONE JSON line. Videos are synthetic (``pipelines.synth``, seed 0, 320x240, 15 fps), generated
once into ``--cache`` and reused. Backbone: the default ``mobilenet_v2``; sampling
``SamplingConfig(fps=15, window=4, stride=4)``. "frames" are sampled frames (15 per second of video).

Throughput (the same videos, one after the other, in this process):

* ``plain``: ``features_for_video`` in a loop, ``torch.set_num_threads(1)`` and a backbone built with
  ``num_threads=1``: one core. ``fps`` = frames / loop seconds (backbone build excluded, ``build_s``);
  ``steady_fps`` leaves out the first video (warm-up).
* ``pipeline``: ``extract`` with ``num_workers=2``, ``cpus_per_worker=1`` into a fresh store, after
  ``ray.init(num_cpus=2)`` (timed on its own: ``ray_init_s``). ``total_s`` is ``extract``'s wall time
  (Ray already up). The arrival time of every row at the driver is recorded (by wrapping the
  ``PartWriter`` that ``extract`` writes rows with; nothing else is changed). With W workers:

  - ``startup_s`` = ``ray_init_s`` + time from ``extract``'s start until W rows have arrived, i.e.
    Ray init + driver probe + actor construction + every worker's first video (with its warm-up);
  - ``steady_fps`` = frames of the rows after the W-th / (last arrival - W-th arrival): the rate once
    every worker is warm (exact for equal-length videos whatever the workers' start skew);
  - ``fps_total`` = frames / (``ray_init_s`` + ``total_s``), start-up included; ``fps_extract`` the same
    without ``ray_init_s``;
  - ``fixed_cost_s`` = (``ray_init_s`` + ``total_s``) - frames / ``steady_fps``: wall time lost to
    everything that is not steady-state work (start-up, tail imbalance, store writes);
  - ``summary_startup_s`` / ``summary_steady_fps``: ``ExtractSummary.startup_seconds`` (first row's arrival
    minus its own processing time: roughly when the first actor began work) and the rate the summary
    prints from it, frames / (seconds - startup_seconds), kept for comparison.

  ``ratio_per_core`` = steady_fps / W / plain fps (target >= 0.9); ``ratio_per_core_total`` uses
  ``fps_total``. ``machine_busy`` is the whole machine's CPU use during a phase (/proc/stat; 0.5 = one
  of two cores): above what the phase itself uses means other processes were competing.

Memory: ``features_for_video`` on a 1-minute and a ``--long-minutes`` video (same size and fps), each
in a fresh process (the two run at the same time; peaks are per process), reporting the child's
``ru_maxrss`` at the end (``*_mb``) and after building the backbone (``baseline_mb``); ``growth`` =
long / short (target < 1.2). The issue asks for 30 minutes; at ~27 frames/s per core that is ~17 min
of compute here, so the default is 5 (pass ``--long-minutes 30 --skip-throughput`` for the full check).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SIZE, FPS, SEED, WORKERS = (320, 240), 15.0, 0, 2
SAMPLING = dict(fps=15.0, window=4, stride=4)


# --- helpers -------------------------------------------------------------------------------------
def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


def _busy_since(start: tuple[float, float]) -> float:
    busy, total = _cpu_times()
    return round((busy - start[0]) / max(total - start[1], 1e-9), 3)


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _frames(seq) -> int:
    return int(round(seq.duration * seq.timing.fps))  # as ExtractSummary counts them


def _archive(cache: Path, name: str, *, videos: int, seconds: float) -> list[Path]:
    """``videos`` synthetic videos of ``seconds`` each, generated once under ``cache/name``."""
    from pipelines.synth import ACTIVITYNET_JSON, synthesize

    root = cache / name
    paths = sorted((root / "videos").glob("*.mp4"))
    if (root / ACTIVITYNET_JSON).exists() and len(paths) == videos:  # written after every video
        return paths
    shutil.rmtree(root, ignore_errors=True)
    result = synthesize(
        root, videos=videos, seed=SEED, duration_range=(seconds, seconds), size=SIZE, fps=FPS,
        workers=min(videos, os.cpu_count() or 1), progress=False,
    )  # fmt: skip
    return [result.videos[k] for k in sorted(result.videos)]


# --- throughput ------------------------------------------------------------------------------------
def plain_loop(videos: list[Path]) -> dict:
    import torch

    from pipelines.backbones import BackboneConfig, build_backbone
    from pipelines.extract import SamplingConfig, features_for_video

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    backbone = build_backbone(BackboneConfig(), "cpu", num_threads=1)
    build_s = time.perf_counter() - t0
    sampling = SamplingConfig(**SAMPLING)
    machine = _cpu_times()
    cpu0, t0 = time.process_time(), time.perf_counter()
    per_video = []
    for path in videos:
        t = time.perf_counter()
        seq = features_for_video(backbone, str(path), sampling)
        per_video.append((_frames(seq), time.perf_counter() - t))
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    frames = sum(f for f, _ in per_video)
    rest = per_video[1:]
    return {
        "fps": round(frames / seconds, 2),
        "seconds": round(seconds, 2),
        "steady_fps": round(sum(f for f, _ in rest) / sum(s for _, s in rest), 2) if rest else None,
        "first_video_s": round(per_video[0][1], 2),
        "build_s": round(build_s, 2),
        "threads": torch.get_num_threads(),
        "cpu_per_wall": round(cpu / seconds, 3),  # < 1: this one-thread loop was waiting for a core
        "machine_busy": _busy_since(machine),
        "frames": frames,
    }


def pipeline(video_dir: Path, cache: Path, workers: int) -> dict:
    import ray

    import pipelines.extract as extract_module
    from pipelines.backbones import BackboneConfig
    from pipelines.extract import ExtractConfig, SamplingConfig, extract

    arrivals: list[tuple[float, int]] = []  # (perf_counter, frames) of each row at the driver

    class TimedPartWriter(extract_module.PartWriter):
        def add(self, seq, *args, **kwargs):
            arrivals.append((time.perf_counter(), _frames(seq)))
            return super().add(seq, *args, **kwargs)

    store = cache / "stores" / f"extract-{uuid.uuid4().hex[:8]}"
    machine = _cpu_times()
    t0 = time.perf_counter()
    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    ray_init_s = time.perf_counter() - t0
    original = extract_module.PartWriter
    extract_module.PartWriter = TimedPartWriter
    try:
        config = ExtractConfig(
            videos=str(video_dir), out=str(store), backbone=BackboneConfig(), sampling=SamplingConfig(**SAMPLING),
            num_workers=workers, cpus_per_worker=1.0, progress=False,
        )  # fmt: skip
        t1 = time.perf_counter()
        summary = extract(config)
        total_s = time.perf_counter() - t1
    finally:
        extract_module.PartWriter = original
        ray.shutdown()
        shutil.rmtree(store, ignore_errors=True)
    busy = _busy_since(machine)
    if summary.failed:
        raise RuntimeError(f"extraction failed for {summary.failed}")
    frames = summary.frames
    w = min(workers, len(arrivals))
    times = [t - t1 for t, _ in arrivals]
    steady_fps = None
    if len(arrivals) > w and times[-1] > times[w - 1]:
        steady_fps = sum(f for _, f in arrivals[w:]) / (times[-1] - times[w - 1])
    wall = ray_init_s + total_s
    after = summary.seconds - summary.startup_seconds
    return {
        "workers": workers,
        "ray_init_s": round(ray_init_s, 2),
        "total_s": round(total_s, 2),
        "startup_s": round(ray_init_s + times[w - 1], 2),
        "steady_fps": round(steady_fps, 2) if steady_fps else None,
        "fps_total": round(frames / wall, 2),
        "fps_extract": round(frames / total_s, 2),
        "fixed_cost_s": round(wall - frames / steady_fps, 2) if steady_fps else None,
        "first_row_s": round(times[0], 2),
        "row_arrivals_s": [round(t, 1) for t in times],
        "summary_startup_s": round(summary.startup_seconds, 2),
        "summary_steady_fps": round(frames / after, 2) if after > 0 else None,
        "machine_busy": busy,
        "frames": frames,
    }


# --- memory ----------------------------------------------------------------------------------------
def memory_child(path: str) -> None:
    """One video in this (fresh) process -> a JSON line with its peak resident memory."""
    import resource

    import torch

    from pipelines.backbones import BackboneConfig, build_backbone
    from pipelines.extract import SamplingConfig, features_for_video

    torch.set_num_threads(1)
    backbone = build_backbone(BackboneConfig(), "cpu", num_threads=1)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    seq = features_for_video(backbone, path, SamplingConfig(**SAMPLING))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": round(peak, 1), "baseline_mb": round(baseline, 1), "seconds": round(seconds, 1), "frames": _frames(seq)}))


def memory(cache: Path, long_minutes: float) -> dict:
    short = _archive(cache, "mem-1min", videos=1, seconds=60.0)[0]
    long = _archive(cache, f"mem-{long_minutes:g}min", videos=1, seconds=60.0 * long_minutes)[0]
    children = {
        name: subprocess.Popen([sys.executable, __file__, "--memory-child", str(path)], stdout=subprocess.PIPE, text=True)
        for name, path in (("short", short), ("long", long))
    }
    results = {}
    for name, child in children.items():
        out, _ = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"memory child for the {name} video failed (exit {child.returncode})")
        results[name] = json.loads(out.strip().splitlines()[-1])
    s, l = results["short"], results["long"]
    return {
        "short_minutes": 1.0,
        "long_minutes": long_minutes,
        "short_video_mb": s["peak_mb"],
        "long_video_mb": l["peak_mb"],
        "growth": round(l["peak_mb"] / s["peak_mb"], 3),
        "baseline_mb": [s["baseline_mb"], l["baseline_mb"]],  # after the backbone is built, before any frame
        "seconds": [s["seconds"], l["seconds"]],  # the two ran at the same time on the machine's cores
    }


# --- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per video (default 30)")
    parser.add_argument("--long-minutes", type=float, default=5.0, help="the long video of the memory check (default 5; the issue's is 30)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--cache", default="/tmp/tal-bench", help="where the synthetic videos are kept between runs")
    parser.add_argument("--memory-child", metavar="VIDEO", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    load_start = _loadavg()
    t0 = time.perf_counter()
    out: dict = {"benchmark": "extract", "machine": {"cpus": os.cpu_count(), "loadavg_start": load_start}}
    if not args.skip_throughput:
        name = f"archive-{args.videos}x{args.duration:g}s"
        videos = _archive(cache, name, videos=args.videos, seconds=args.duration)
        out["archive"] = {"videos": len(videos), "seconds_of_video": args.videos * args.duration}
        out["plain"] = plain_loop(videos)
        out["pipeline"] = pipeline(cache / name / "videos", cache, WORKERS)
        out["archive"]["frames"] = out["plain"]["frames"]
        plain_fps, p = out["plain"]["fps"], out["pipeline"]
        out["ratio_per_core"] = round(p["steady_fps"] / WORKERS / plain_fps, 3) if p["steady_fps"] else None
        out["ratio_per_core_total"] = round(p["fps_total"] / WORKERS / plain_fps, 3)
        out["target_ratio_met"] = out["ratio_per_core"] is not None and out["ratio_per_core"] >= 0.9
    if not args.skip_memory:
        out["memory"] = memory(cache, args.long_minutes)
        out["target_memory_met"] = out["memory"]["growth"] < 1.2
    out["machine"]["loadavg_end"] = _loadavg()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
