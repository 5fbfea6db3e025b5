"""The Serve app under load, on loopback: what HTTP and Ray Serve add to the model, and what batching buys.

    .venv/bin/python benchmarks/serve.py [--preset thumos14-actionformer] [--requests 24] [--threads 2]

Feature requests: a THUMOS14-sized sequence (2304 steps x 2048 channels, an ``.npy`` body of 18.9 MB)
against the preset's detector with random weights (its inference config bounds the detections kept,
as for a trained one). Measured in one script, in this order:

1. in-process: ``detect_batch`` on one sequence, ``--threads`` torch threads (the replica's count);
2. HTTP p50/p99 and requests/s at concurrency 1, 4 and 16 with batching (max batch 8), each with the
   median time per stage (receive, parse, detect, hand-off to the Detector, proxy); and a small request
   (256 steps) at concurrency 1 for the fixed cost;
3. the same at concurrency 16 without batching (max batch 1);
4. the video endpoint: a synthetic video through decode + MobileNetV2 (ImageNet weights, 15 fps,
   4-frame clips, the demo's sampling) + a demo-sized detector, as seconds per minute of video.

Prints one JSON line with the load average before and after. Loopback only, bounded in requests.

Ray starts its workers at nice 15 (``RAY_worker_niceness``), so on a machine with other load a replica
gets less CPU than this script's own process: the comparison would charge that to Serve. The script
starts Ray with worker niceness 0 unless ``RAY_worker_niceness`` is already set (``--ray-niceness``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RAY_NICENESS = "RAY_worker_niceness"  # Ray's own spelling (ray._private.ray_constants.RAY_WORKER_NICENESS)
sys.path.insert(0, str(ROOT))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it), for Serve's HTTP proxy."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def load_http(url: str, body: bytes, requests_: int, concurrency: int) -> dict:
    """``requests_`` POSTs of ``body`` to /v1/detect from ``concurrency`` threads, each with its own session."""
    import requests

    sessions = [requests.Session() for _ in range(concurrency)]

    stages: list[dict] = []

    def call(i: int) -> tuple[float, int, int]:
        start = time.perf_counter()
        r = sessions[i % concurrency].post(url + "/v1/detect", data=body, headers={"content-type": "application/x-npy"}, timeout=600)
        wall = time.perf_counter() - start
        timing = r.json()["timing"] if r.status_code == 200 else {}
        stages.append({**timing, "wall_s": wall})
        return wall, r.status_code, timing.get("batch_size", 0)

    call(0)  # warm the connection and the replica
    stages.clear()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(call, range(requests_)))
    wall = time.perf_counter() - start
    errors = sum(1 for _, status, _ in results if status != 200)
    return {
        "concurrency": concurrency,
        "requests": requests_,
        "errors": errors,
        **_percentiles([s for s, _, _ in results]),
        "requests_per_s": round(requests_ / wall, 3),
        "mean_batch": round(float(np.mean([b for _, _, b in results])), 2),
        "stage_p50_ms": _stage_medians(stages),
    }


def _stage_medians(stages: list[dict]) -> dict[str, float]:
    """Median ms per stage of the app's own timing, and what lies outside it: the hand-off from the ingress to
    the Detector and back (total - receive - parse - detect) and the HTTP proxy (wall - total)."""
    ok = [s for s in stages if "total_s" in s]
    if not ok:
        return {}
    med = {k: float(np.median([s[k] for s in ok])) for k in ("receive_s", "parse_s", "detect_s", "total_s", "wall_s")}
    med["handoff_s"] = float(np.median([s["total_s"] - s["receive_s"] - s["parse_s"] - s["detect_s"] for s in ok]))
    med["proxy_s"] = float(np.median([s["wall_s"] - s["total_s"] for s in ok]))
    return {k.removesuffix("_s"): round(1000 * v, 1) for k, v in med.items()}


def make_checkpoint(path: Path, preset: str, provenance: dict):
    """An untrained checkpoint of ``preset`` (random weights: latency does not depend on them)."""
    import torch

    from tal_models.checkpoint import Checkpoint, save_checkpoint
    from tal_models.detectors import build_detector
    from tal_models.presets import load_preset

    torch.manual_seed(0)
    config = load_preset(preset).detector
    model = build_detector(config).eval()
    checkpoint = Checkpoint.from_model(model, [f"class_{i}" for i in range(config.num_classes)], provenance)
    save_checkpoint(checkpoint, path)
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="thumos14-actionformer")
    parser.add_argument("--steps", type=int, default=2304)
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level (x2 at 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in-process and per Detector replica")
    parser.add_argument("--video-seconds", type=float, default=30.0)
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--ray-niceness", type=int, default=0, help="niceness of Ray's workers (Ray's default: 15)")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from jobs.inference import detect_batch
    from jobs.serve import run_app
    from jobs.serve_config import ServeArgs
    from pipelines.store import FeatureSequence
    from tal_models.presets import load_preset

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="tal-bench-serve-"))
    preset = load_preset(args.preset)
    dim = preset.detector.input_dim
    provenance = {"backbone": "synthetic", "feature_dim": dim, "fps": 10.0, "stride": 4, "window": 16}
    checkpoint = make_checkpoint(work / "model.pt", args.preset, provenance)
    features = np.random.default_rng(0).standard_normal((args.steps, dim)).astype(np.float32)
    body = _npy(features)

    # 1. in-process, same thread count as a replica
    torch.set_num_threads(args.threads)
    model = checkpoint.build("cpu")
    from tal_models.timing import FeatureTiming

    timing = FeatureTiming(10.0, 4, 16)
    seq = FeatureSequence("v", features, timing, timing.centers(args.steps), float(timing.step_to_seconds(args.steps)))
    detect_batch(model, [seq])
    in_process = []
    for _ in range(max(5, args.requests // 2)):
        start = time.perf_counter()
        detect_batch(model, [seq])
        in_process.append(time.perf_counter() - start)
    small_seq = FeatureSequence("v", features[:256], timing, timing.centers(256), float(timing.step_to_seconds(256)))
    in_process_small = []
    for _ in range(max(5, args.requests)):
        start = time.perf_counter()
        detect_batch(model, [small_seq])
        in_process_small.append(time.perf_counter() - start)
    batch8 = []
    for _ in range(2):
        start = time.perf_counter()
        detect_batch(model, [seq] * 8)
        batch8.append(time.perf_counter() - start)
    del model

    os.environ.setdefault(RAY_NICENESS, str(args.ray_niceness))  # read when Ray starts
    ray.init(num_cpus=max(4, args.threads + 2), include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_before": [round(x, 2) for x in load_before],
            "ray_worker_niceness": int(os.environ[RAY_NICENESS]),
            "script_niceness": os.nice(0),
        },
        "request": {"steps": args.steps, "channels": dim, "npy_mb": round(len(body) / 2**20, 1), "preset": args.preset},
        "in_process": {**_percentiles(in_process), "batch_of_8_per_request_ms": round(1000 * min(batch8) / 8, 1)},
    }
    try:
        common = dict(
            model=str(work / "model.pt"), cpus_per_replica=float(args.threads), max_body_mb=64.0, max_steps=max(16384, args.steps)
        )
        url = run_app(ServeArgs(**common, max_batch_size=8), "127.0.0.1", port)
        batched = [load_http(url, body, n, c) for c, n in ((1, args.requests), (4, args.requests), (16, 2 * args.requests))]
        small = load_http(url, _npy(features[:256]), args.requests, 1)  # the fixed cost, where the body is small
        results["http_small_c1"] = {"steps": 256, **small, "in_process_p50_ms": _percentiles(in_process_small)["p50_ms"]}
        serve.delete("tal")
        url = run_app(ServeArgs(**common, max_batch_size=1), "127.0.0.1", port)
        unbatched = load_http(url, body, 2 * args.requests, 16)
        serve.delete("tal")
        results["http_batched"] = batched
        results["http_unbatched_c16"] = unbatched
        results["serve_overhead_p50_ms_c1"] = round(batched[0]["p50_ms"] - results["in_process"]["p50_ms"], 1)
        results["serve_overhead_p50_ms_c1_small"] = round(small["p50_ms"] - results["http_small_c1"]["in_process_p50_ms"], 1)
        results["batching_throughput_ratio_c16"] = round(batched[2]["requests_per_s"] / unbatched["requests_per_s"], 3)
        if not args.skip_video:
            results["video"] = bench_video(work, args.video_seconds, port)
        results["errors"] = sum(r["errors"] for r in batched) + unbatched["errors"] + results.get("video", {}).get("errors", 0)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = {
        "serve_overhead_p50_ms_c1<=15": results["serve_overhead_p50_ms_c1"] <= 15,
        "batching_ratio_c16>=1.5": results["batching_throughput_ratio_c16"] >= 1.5,
        "zero_errors": results["errors"] == 0,
    }
    print(json.dumps(results))


def bench_video(work: Path, seconds: float, port: int) -> dict:
    """Seconds of wall time per minute of video through /v1/detect/video (upload), demo sampling and backbone."""
    import requests
    from ray import serve

    from jobs.serve import run_app
    from jobs.serve_config import ServeArgs
    from pipelines.backbones import BackboneConfig, build_backbone
    from pipelines.extract import SamplingConfig, provenance_for, settings_json
    from pipelines.synth import synthesize
    from pipelines.video import probe

    sampling = SamplingConfig(fps=15.0, window=4, stride=4)
    backbone_config = BackboneConfig(name="mobilenet_v2")
    backbone = build_backbone(backbone_config, "cpu")
    provenance = provenance_for(backbone, sampling, settings_json(backbone_config, sampling)).to_dict()
    make_checkpoint(work / "video-model.pt", "demo-actionformer", provenance)
    synth = synthesize(work / "synth", videos=1, seed=1, duration_range=(seconds, seconds), workers=1, progress=False)
    video = next(iter(synth.videos.values()))
    info = probe(video)
    url = run_app(ServeArgs(model=str(work / "video-model.pt"), cpus_per_replica=2.0), "127.0.0.1", port)
    timings, errors = [], 0
    for _ in range(2):
        start = time.perf_counter()
        with open(video, "rb") as f:
            r = requests.post(url + "/v1/detect/video", files={"video": (video.name, f, "video/mp4")}, timeout=600)
        wall = time.perf_counter() - start
        if r.status_code != 200:
            errors += 1
            continue
        timings.append((wall, r.json()))
    serve.delete("tal")
    if not timings:
        return {"errors": errors}
    wall, best = min(timings, key=lambda t: t[0])
    duration = best["duration"]
    per_minute = {k: round(v * 60 / duration, 2) for k, v in best["timing"].items() if k.endswith("_s")}
    return {
        "video_s": round(duration, 2),
        "size": f"{info.width}x{info.height}",
        "wall_s_per_minute": round(wall * 60 / duration, 2),
        "stage_s_per_minute": per_minute,
        "errors": errors,
    }


if __name__ == "__main__":
    main()
