"""Scale-out figures (issue 14): the extraction driver at 100 vs 2,000 videos, throughput against a plain
one-process loop, one 60-minute video split vs unsplit, training from a store larger than its cache,
and the decoders.

    .venv/bin/python benchmarks/scale.py [--sections driver,long,train,decoders] [--quick]
                                         [--cache /tmp/tal-bench-scale]

Prints ONE JSON line (and progress on stderr). Every extraction runs in a fresh child process (so the
driver's peak memory and CPU time are its own) that starts Ray itself, ``ray.init(num_cpus=2)``, with
worker niceness 0 (Ray's default is 15: on a shared machine its workers would get less CPU than the
plain loop they are compared with); ``ray_init_s`` is timed apart and excluded from ``seconds``.

- ``driver``: 100 and 2,000 synthetic videos of 2-4 s (96x64, 10 fps; generated once into ``--cache``),
  a tiny TorchScript frame backbone with 1280-dim features (MobileNetV2's width, a fraction of its
  compute: the per-video overhead is what is measured, not the backbone), 2 workers. Per run: the
  driver's peak resident memory (VmHWM) and CPU seconds, the bytes of replies it received, wall
  seconds. ``rss_ratio`` = peak at 2,000 / peak at 100 (target <= 1.1).
- ``throughput``: the same 2,000 videos through ``features_for_video`` + ``PartWriter`` in a loop, one
  thread, in a fresh process (``loop``), against the 2-worker run above: ``per_core_ratio`` = (videos/s
  of the workers after start-up / 2) / loop videos/s (target >= 0.85). ``per_core_ratio_wall`` also
  counts the job's start-up (actors loading the backbone, the first video). ``two_loops``: two such
  loops side by side on the two halves of the videos (no Ray): ``two_loops_per_core_ratio`` is what
  two busy cores of this machine give per core at all, ``vs_two_loops`` = the workers' rate / theirs
  (what Ray itself costs), ``worker_utilisation`` = time inside the workers' calls / (2 x seconds
  after start-up).
- ``long``: one 60-minute video (160x120, 10 fps) on 2 workers, ``split_seconds=300`` (12 pieces)
  vs unsplit; MobileNetV2 at ``--long-fps`` (default 2) sampled frames per second. ``wall_ratio`` =
  split / unsplit extraction seconds (target <= 0.6).
- ``train``: ``benchmarks/train_streaming.measure`` (a training worker with a store 8x its cache vs one
  that fits).
- ``decoders``: ``benchmarks/decoders.measure`` (frames/s per backend).

``loadavg`` is ``os.getloadavg()`` before and after each section; ``machine_busy`` the whole machine's
CPU use during an extraction (0.5 = one of two cores): read every ratio with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")  # read when Ray starts; Ray's default is 15
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._machine import busy_since, cpu_times, loadavg, peak_rss_mb  # noqa: E402

SHORT = dict(size=(96, 64), fps=10.0, duration_range=(2.0, 4.0))
SHORT_SAMPLING = dict(fps=10.0, window=4, stride=4, chunk_frames=64)
LONG = dict(size=(160, 120), fps=10.0, duration_range=(3600.0, 3600.0))


def _log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _archive(cache: Path, name: str, videos: int, spec: dict) -> Path:
    """``videos`` synthetic videos under ``cache/name/videos``, generated once."""
    from pipelines.synth import ACTIVITYNET_JSON, synthesize

    root = cache / name
    if (root / ACTIVITYNET_JSON).exists() and len(list((root / "videos").glob("*.mp4"))) == videos:
        return root / "videos"
    shutil.rmtree(root, ignore_errors=True)
    _log(f"generating {videos} videos into {root}")
    synthesize(root, videos=videos, seed=videos, classes=3, workers=2, progress=False, **spec)
    return root / "videos"


def _tiny_backbone(cache: Path) -> dict:
    """A TorchScript frame model with MobileNetV2's 1280-dim output and a small fraction of its compute."""
    import warnings

    import torch
    from torch import nn

    path = cache / "tiny1280.pt"
    if not path.exists():

        class Tiny(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(3, 16, 5, stride=2, padding=2)
                self.fc = nn.Linear(16, 1280)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.script(Tiny().eval()), str(path))
    return {"name": "torchscript", "weights": str(path), "kind": "frame", "input_size": [64, 64]}


# --- children (fresh processes) -------------------------------------------------------------------------
def child_extract(spec: dict) -> dict:
    """One extraction job in this process: Ray started here, then ``extract``; the driver's own figures."""
    import ray

    from pipelines.backbones import BackboneConfig
    from pipelines.extract import ExtractConfig, SamplingConfig, extract

    backbone = dict(spec["backbone"])
    if "input_size" in backbone:
        backbone["input_size"] = tuple(backbone["input_size"])
    t0 = time.perf_counter()
    ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    ray_init_s = time.perf_counter() - t0
    machine, cpu0 = cpu_times(), os.times()
    config = ExtractConfig(
        videos=spec["videos"], out=spec["out"], backbone=BackboneConfig(**backbone), sampling=SamplingConfig(**spec["sampling"]),
        num_workers=2, progress=False, split_seconds=spec.get("split_seconds"),
    )  # fmt: skip
    summary = extract(config)
    cpu1 = os.times()
    machine_busy = busy_since(machine)
    ray.shutdown()
    return {
        "videos": summary.extracted,
        "failed": len(summary.failed),
        "seconds": round(summary.seconds, 2),
        "startup_s": round(summary.startup_seconds, 2),
        "ray_init_s": round(ray_init_s, 2),
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "driver_cpu_s": round(cpu1.user - cpu0.user + cpu1.system - cpu0.system, 2),
        "driver_bytes_received": summary.driver_bytes_received,
        "worker_seconds": round(summary.worker_seconds, 2),
        "parts": len(summary.parts),
        "pieces": summary.pieces,
        "steps": summary.steps,
        "machine_busy": machine_busy,
    }


def child_loop(spec: dict) -> dict:
    """The plain baseline: one process, one thread, the same per-video work and part writing, no Ray."""
    import torch

    from pipelines.backbones import BackboneConfig, build_backbone
    from pipelines.extract import SamplingConfig, features_for_video, list_videos, provenance_for, settings_json, tune_allocator
    from pipelines.store import FeatureStore, PartWriter

    tune_allocator()
    torch.set_num_threads(1)
    backbone_config = dict(spec["backbone"])
    backbone_config["input_size"] = tuple(backbone_config["input_size"])
    config = BackboneConfig(**backbone_config)
    sampling = SamplingConfig(**spec["sampling"])
    backbone = build_backbone(config, "cpu", num_threads=1)
    writer = PartWriter(FeatureStore(spec["out"]), provenance_for(backbone, sampling, settings_json(config, sampling)))
    machine = cpu_times()
    t0 = time.perf_counter()
    videos = list_videos(spec["videos"])
    if "shard" in spec:  # one of several loops running side by side
        index, count = spec["shard"]
        videos = videos[index::count]
    for v in videos:
        writer.add(features_for_video(backbone, v.uri, sampling, video_id=v.video_id))
    writer.flush()
    seconds = time.perf_counter() - t0
    machine_busy = busy_since(machine)
    return {
        "videos": len(videos),
        "seconds": round(seconds, 2),
        "videos_per_s": round(len(videos) / seconds, 2),
        "machine_busy": machine_busy,
    }


def _child(kind: str, spec: dict) -> dict:
    return _children(kind, [spec])[0]


def _children(kind: str, specs: list[dict]) -> list[dict]:
    """Run one child per spec, side by side; their JSON results."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    argv = [[sys.executable, __file__, "--child", kind, json.dumps(spec)] for spec in specs]
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for a in argv]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"child {kind} failed ({proc.returncode}): {err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# --- sections -------------------------------------------------------------------------------------------
def driver_and_throughput(cache: Path, quick: bool) -> dict:
    small, large = (20, 200) if quick else (100, 2000)
    backbone = _tiny_backbone(cache)
    out: dict = {"loadavg_before": loadavg(), "videos": [small, large]}
    runs = {}
    for n in (small, large):
        videos = _archive(cache, f"short-{n}", n, SHORT)
        store = cache / "stores" / f"short-{n}-{time.time_ns()}"
        _log(f"extract {n} videos, 2 workers")
        runs[n] = _child("extract", {"videos": str(videos), "out": str(store), "backbone": backbone, "sampling": SHORT_SAMPLING})
        shutil.rmtree(store, ignore_errors=True)
    _log(f"plain loop over {large} videos")
    store = cache / "stores" / f"loop-{time.time_ns()}"
    spec = {
        "videos": str(_archive(cache, f"short-{large}", large, SHORT)),
        "out": str(store),
        "backbone": backbone,
        "sampling": SHORT_SAMPLING,
    }
    loop = _child("loop", spec)
    shutil.rmtree(store, ignore_errors=True)
    _log(f"two plain loops side by side over {large} videos")
    pair = _children("loop", [{**spec, "shard": [i, 2], "out": f"{store}-{i}"} for i in range(2)])
    for i in range(2):
        shutil.rmtree(f"{store}-{i}", ignore_errors=True)
    pair_rate = large / max(r["seconds"] for r in pair)
    big = runs[large]
    workers_rate = big["videos"] / max(big["seconds"] - big["startup_s"], 1e-9)
    out.update(
        runs={str(n): r for n, r in runs.items()},
        loop=loop,
        rss_ratio=round(runs[large]["driver_peak_rss_mb"] / runs[small]["driver_peak_rss_mb"], 3),
        driver_bytes_per_video=round(big["driver_bytes_received"] / big["videos"], 1),
        per_core_ratio=round(workers_rate / 2 / loop["videos_per_s"], 3),
        per_core_ratio_wall=round(big["videos"] / big["seconds"] / 2 / loop["videos_per_s"], 3),
        two_loops=pair,
        two_loops_per_core_ratio=round(pair_rate / 2 / loop["videos_per_s"], 3),  # what two busy cores give without Ray
        vs_two_loops=round(workers_rate / pair_rate, 3),
        worker_utilisation=round(big["worker_seconds"] / (2 * (big["seconds"] - big["startup_s"])), 3),
        loadavg_after=loadavg(),
    )
    return out


def long_video(cache: Path, quick: bool, fps: float) -> dict:
    spec = dict(LONG, duration_range=(600.0, 600.0)) if quick else LONG
    minutes = int(spec["duration_range"][0] // 60)
    videos = _archive(cache, f"long-{minutes}min", 1, spec)
    out: dict = {"minutes": minutes, "backbone": "mobilenet_v2", "fps": fps, "loadavg_before": loadavg()}
    sampling = {"fps": fps, "window": 2, "stride": 2, "chunk_frames": 64}
    for label, split in (("unsplit", None), ("split", 300.0 if not quick else 120.0)):
        store = cache / "stores" / f"long-{label}-{time.time_ns()}"
        _log(f"long video, {label}")
        out[label] = _child(
            "extract",
            {"videos": str(videos), "out": str(store), "backbone": {"name": "mobilenet_v2"}, "sampling": sampling, "split_seconds": split},
        )
        shutil.rmtree(store, ignore_errors=True)
    out["wall_ratio"] = round(out["split"]["seconds"] / out["unsplit"]["seconds"], 3)
    out["loadavg_after"] = loadavg()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="driver,long,train,decoders")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of the benchmark itself")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tal-bench-scale"))
    parser.add_argument("--long-fps", type=float, default=2.0)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child
        print(json.dumps((child_extract if kind == "extract" else child_loop)(json.loads(spec))))
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    result: dict = {"benchmark": "scale", "quick": args.quick, "cpus": os.cpu_count(), "loadavg_start": loadavg()}
    if "driver" in sections:
        result["driver"] = driver_and_throughput(args.cache, args.quick)
    if "long" in sections:
        result["long"] = long_video(args.cache, args.quick, args.long_fps)
    if "train" in sections:
        from benchmarks.train_streaming import measure as train_measure

        _log("training from a store larger than the cache")
        result["train"] = train_measure(quick=args.quick)
    if "decoders" in sections:
        from benchmarks.decoders import measure as decoders_measure

        _log("decoders")
        result["decoders"] = decoders_measure(quick=args.quick)
    result["loadavg_end"] = loadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
