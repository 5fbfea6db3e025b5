"""The Serve app under load, on loopback: what HTTP and Ray Serve add to the model, and what batching buys.

    .venv/bin/python benchmarks/serve.py --overhead-only [--baseline-tree ../wt-base] [--requests 8]
    .venv/bin/python benchmarks/serve.py [--preset thumos14-actionformer] [--requests 24] [--threads 2]

Feature requests: a THUMOS14-sized sequence (2304 steps x 2048 channels, an ``.npy`` body of 18.9 MB)
and a small one (its first 256 steps) against the preset's detector with random weights (its inference
config bounds the detections kept, as for a trained one). Measured in one script, in this order:

1. overhead at concurrency 1, per design (this tree's code; ``--baseline-tree``: another checkout's, e.g.
   a worktree of main, the design before): a process of its own starts Ray and the app, then alternates
   one in-process ``detect_batch`` (its main thread, ``--threads`` torch threads, the replica's count)
   with one HTTP request of the same sequence, ``--requests`` pairs per size. Reported: p50 of
   (HTTP - in-process) over the pairs, both p50s, and p50 of (HTTP - the replica's own ``detect_s``),
   which is what HTTP and Serve add whatever the model's speed under the machine's load;
2. HTTP p50/p99 and requests/s at concurrency 1, 4 and 16 with batching (max batch 8), each with the
   median time per stage (receive, parse, detect, rest_in_app, outside_app: see ``_stage_medians``);
3. the same at concurrency 16 without batching (max batch 1);
4. the video endpoint: a synthetic video through decode + MobileNetV2 (ImageNet weights, 15 fps,
   4-frame clips, the demo's sampling) + a demo-sized detector, as seconds per minute of video.

``--overhead-only`` stops after 1. Prints one JSON line with the load average before and after.
Loopback only, bounded in requests.

Ray starts its workers at nice 15 (``RAY_worker_niceness``), so on a machine with other load a replica
gets less CPU than this script's own process: the comparison would charge that to Serve. The script
starts Ray with worker niceness 0 unless ``RAY_worker_niceness`` is already set (``--ray-niceness``).
Each Ray the script starts has Serve's direct ingress on when the code measured has it
(``jobs.serve.serve_env``), as ``tal serve`` runs it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import socket
import subprocess
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
    """Median ms per stage of the app's own timing, and what lies outside it: inside the app (total - receive -
    parse - detect: before the design of this tree, the hand-off from the ingress to the Detector and back) and
    outside the app (wall - total: Serve's proxy, or with direct ingress the replica's HTTP server, and the client)."""
    ok = [s for s in stages if "total_s" in s]
    if not ok:
        return {}
    med = {k: float(np.median([s[k] for s in ok])) for k in ("receive_s", "parse_s", "detect_s", "total_s", "wall_s")}
    med["rest_in_app_s"] = float(np.median([s["total_s"] - s["receive_s"] - s["parse_s"] - s["detect_s"] for s in ok]))
    med["outside_app_s"] = float(np.median([s["wall_s"] - s["total_s"] for s in ok]))
    return {k.removesuffix("_s"): round(1000 * v, 1) for k, v in med.items()}


# --- 1. overhead at concurrency 1, one process per design ----------------------------------------------


def overhead_child(args: argparse.Namespace) -> dict:
    """In a process whose ``jobs`` package is ``args.tree``'s: Ray, the app, then in-process/HTTP pairs per size."""
    import ray
    import requests
    import torch
    from ray import serve

    import jobs.serve as served
    from jobs.inference import detect_batch
    from jobs.serve_config import ServeArgs
    from pipelines.store import FeatureSequence
    from tal_models.presets import load_preset
    from tal_models.timing import FeatureTiming

    work = Path(tempfile.mkdtemp(prefix="tal-bench-serve-"))
    dim = load_preset(args.preset).detector.input_dim
    provenance = {"backbone": "synthetic", "feature_dim": dim, "fps": 10.0, "stride": 4, "window": 16}
    checkpoint = make_checkpoint(work / "model.pt", args.preset, provenance)
    features = np.random.default_rng(0).standard_normal((args.steps, dim)).astype(np.float32)
    torch.set_num_threads(args.threads)
    model = checkpoint.build("cpu")
    timing = FeatureTiming(10.0, 4, 16)

    os.environ.setdefault(RAY_NICENESS, str(args.ray_niceness))  # read when Ray starts
    if hasattr(served, "serve_env"):  # as run_app sets it for a local Ray it starts
        os.environ.update(served.serve_env())
    ray.init(num_cpus=max(4, args.threads + 2), include_dashboard=False, log_to_driver=False, configure_logging=False)
    out: dict = {"tree": str(args.tree), "direct_ingress": os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"}
    try:
        common = dict(
            model=str(work / "model.pt"), cpus_per_replica=float(args.threads), max_body_mb=64.0, max_steps=max(16384, args.steps)
        )
        url = served.run_app(ServeArgs(**common, max_batch_size=8), "127.0.0.1", _free_port())
        out["deployments"] = sorted(serve.status().applications["tal"].deployments)  # which design's code the replicas run
        session = requests.Session()
        for steps in (256, args.steps):
            x = features[:steps]
            seq = FeatureSequence("v", x, timing, timing.centers(steps), float(timing.step_to_seconds(steps)))
            body = _npy(x)
            pairs = []
            for i in range(args.requests + 2):  # the first two warm both sides
                start = time.perf_counter()
                detect_batch(model, [seq])
                local = time.perf_counter() - start
                start = time.perf_counter()
                r = session.post(url + "/v1/detect", data=body, headers={"content-type": "application/x-npy"}, timeout=600)
                wall = time.perf_counter() - start
                if r.status_code != 200:
                    raise RuntimeError(f"{steps} steps: HTTP {r.status_code}: {r.text[:300]}")
                if i >= 2:
                    pairs.append({"local_s": local, "wall_s": wall, **r.json()["timing"]})
            out[f"steps_{steps}"] = _overhead_figures(pairs, len(body))
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def _overhead_figures(pairs: list[dict], body_bytes: int) -> dict:
    ms = lambda values: round(1000 * float(np.median(values)), 1)  # noqa: E731
    return {
        "npy_mb": round(body_bytes / 2**20, 1),
        "pairs": len(pairs),
        "in_process_p50_ms": ms([p["local_s"] for p in pairs]),
        "http_p50_ms": ms([p["wall_s"] for p in pairs]),
        "replica_detect_p50_ms": ms([p["detect_s"] for p in pairs]),
        "overhead_vs_in_process_p50_ms": ms([p["wall_s"] - p["local_s"] for p in pairs]),
        "overhead_vs_replica_detect_p50_ms": ms([p["wall_s"] - p["detect_s"] for p in pairs]),
        "stage_p50_ms": _stage_medians(pairs),
    }


def bench_overhead(args: argparse.Namespace) -> dict:
    """``overhead_child`` for this tree and ``--baseline-tree`` (alternately, ``--rounds`` times), each in its own process."""
    trees = [("new", ROOT)] + ([("baseline", Path(args.baseline_tree).resolve())] if args.baseline_tree else [])
    rounds: dict[str, list[dict]] = {name: [] for name, _ in trees}
    for _ in range(args.rounds):
        for name, tree in reversed(trees):  # the baseline first: a load that grows during the run favours it
            argv = [sys.executable, str(Path(__file__).resolve()), "--overhead-child", "--tree", str(tree)]
            argv += ["--preset", args.preset, "--steps", str(args.steps), "--requests", str(args.requests)]
            argv += ["--threads", str(args.threads), "--ray-niceness", str(args.ray_niceness)]
            env = {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0"}
            load = os.getloadavg()
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{name} ({tree}) failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["load_before"] = [round(x, 2) for x in load]
            rounds[name].append(result)
    return rounds


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
    parser.add_argument("--baseline-tree", help="a checkout of the design to compare with (e.g. a worktree of main)")
    parser.add_argument("--rounds", type=int, default=1, help="overhead runs per design, alternating")
    parser.add_argument("--overhead-only", action="store_true", help="only the overhead at concurrency 1 (step 1)")
    parser.add_argument("--overhead-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.overhead_child:  # the measured tree's code, not this file's tree (Ray's workers get this sys.path too)
        sys.path[:] = [str(args.tree)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]
        print(json.dumps(overhead_child(args)))
        return
    load_before = os.getloadavg()
    overhead = bench_overhead(args)
    if args.overhead_only:
        print(
            json.dumps(
                {"machine": _machine(args, load_before), "overhead_c1": overhead, "targets": _overhead_targets(overhead, args.steps)}
            )
        )
        return

    import ray
    import torch
    from ray import serve

    from jobs.inference import detect_batch
    from jobs.serve import run_app, serve_env
    from jobs.serve_config import ServeArgs
    from pipelines.store import FeatureSequence
    from tal_models.presets import load_preset

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
    os.environ.update(serve_env())  # as run_app sets it for a local Ray it starts
    ray.init(num_cpus=max(4, args.threads + 2), include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    results: dict = {
        "machine": _machine(args, load_before),
        "overhead_c1": overhead,
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
        **_overhead_targets(overhead, args.steps),
        "batching_ratio_c16>=1.5": results["batching_throughput_ratio_c16"] >= 1.5,
        "zero_errors": results["errors"] == 0,
    }
    print(json.dumps(results))


def _overhead_targets(overhead: dict, steps: int) -> dict:
    """The issue's targets on this tree's overhead (median over rounds of each round's p50 of HTTP - in-process)."""
    runs = overhead["new"]
    at = lambda key: float(np.median([r[key]["overhead_vs_in_process_p50_ms"] for r in runs]))  # noqa: E731
    return {"overhead_256_steps_p50_ms<=15": at("steps_256") <= 15, f"overhead_{steps}_steps_p50_ms<=30": at(f"steps_{steps}") <= 30}


def _machine(args: argparse.Namespace, load_before: tuple[float, ...]) -> dict:
    return {
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "ray_worker_niceness": int(os.environ.get(RAY_NICENESS, args.ray_niceness)),
        "script_niceness": os.nice(0),
        "torch_threads": args.threads,
    }


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
