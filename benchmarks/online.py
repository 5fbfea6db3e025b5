"""Online detection: accuracy against the offline model, per-step latency, concurrent streams, live end to end.

    .venv/bin/python benchmarks/online.py [--parts accuracy latency serve live] [--seeds 0 1 2]
        [--profiles prototype phases] [--steps 600] [--input-dim 64] [--embed-dim 64] [--jobs 2] [--workdir DIR]

``accuracy``: on the THUMOS14-timed feature set (``_thumos_like``: the real THUMOS14 timings, synthetic features of
each ``--profiles`` signal model; Validation trains, Test evaluates), our offline ``thumos14-actionformer`` and our
``thumos14-online`` (causal, the same widths), trained for the same ``--steps`` optimiser steps of the same crops,
a new data set and training seed per seed. Reported: instance-level average mAP (tIoU 0.3:0.1:0.7) of each and
their ratio online / offline (the issue's target: >= 0.8), the online model's per-frame mAP (the OAD protocol,
``tal_models.evaluation.online``) and detection latency (true start -> first correct ``start`` event), and the
same figures for the offline model as the ceiling.

``latency``: the incremental state of the ``thumos14-online`` preset at its full size (2048-d input, 512 channels,
6 levels; untrained weights: the cost does not depend on them), one CPU thread: per-step p50 / p99 over the steps
after 10 minutes of stream (4,500 steps at 7.5 steps/s), and the time to re-run the causal model on that
4,500-step prefix (what a model without the state would pay for each new step); for each encoder kind.

``serve``: concurrent real-time sessions one CPU replica of ``tal serve`` sustains over ``/v1/stream`` (feature
input, 4 steps/s each) with p99 event delay <= 1 s (``benchmarks/_stream_load.py``).

``live``: ``tal detect --online`` on a live (paced) video file on CPU: the delay from a step's last frame arriving
to that step's scores (p50 / p90 / p99).

Trainings run ``--jobs`` at a time with one thread each. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._jobs import add_worker_arguments, run_model_jobs  # noqa: E402 (after the path)

MODELS = ("actionformer", "online")
LR = {"actionformer": 4e-4, "online": 4e-4}
STREAM_STEPS = 4500  # 10 minutes at THUMOS14's 7.5 steps per second


def build_config(model: str, num_classes: int, input_dim: int, embed: int, max_seq_len: int):
    from tal_models.presets import load_preset

    if model == "actionformer":
        from benchmarks.two_stage import build_config as two_stage_config

        return two_stage_config("actionformer", num_classes, input_dim, embed, max_seq_len)
    preset = load_preset("thumos14-online").detector
    return replace(preset, num_classes=num_classes, max_seq_len=max_seq_len,
                   encoder=replace(preset.encoder, input_dim=input_dim, embed_dim=embed))  # fmt: skip


# --- a worker: one model trained and run on one data set --------------------------------------------------------
def train_and_run(model: str, data_dir: Path, out: Path, steps: int, batch_size: int, embed: int, max_seq_len: int, seed: int,
                  lr: float) -> dict:  # fmt: skip
    import torch

    from benchmarks.accuracy_vs_actionformer import fit_crops, load_split
    from pipelines.annotations import write_activitynet_results
    from tal_models.detectors import build_detector
    from tal_models.structures import LabelMap

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    train, meta, _ = load_split(data_dir, "train")
    test, _, _ = load_split(data_dir, "test")
    config = build_config(model, len(meta["classes"]), meta["input_dim"], embed, max_seq_len)
    net = build_detector(config)
    evaluated, stats, train_seconds, epochs = fit_crops(net, train, steps, batch_size, config.max_seq_len, lr, 0.05, seed)
    started = time.perf_counter()
    with torch.inference_mode():
        found = {s["video_id"]: evaluated.detect(s["features"], s["timing"], s["duration"], s["video_id"]) for s in test}
    infer_seconds = time.perf_counter() - started
    write_activitynet_results(out, found.values(), LabelMap.from_names(meta["classes"]))
    figures = stream_figures(evaluated, model, test, found, data_dir, meta)
    return {"model": model, "train_seconds": round(train_seconds, 1), "infer_ms_per_video": round(1000 * infer_seconds / len(test), 2),
            "mean_loss": round(float(stats["final_loss"]), 4), "params": sum(p.numel() for p in net.parameters()), "epochs": epochs,
            **figures}  # fmt: skip


def stream_figures(model, name: str, test: list[dict], found: dict, data_dir: Path, meta: dict) -> dict:
    """Per-frame mAP and detection latency on the test videos: of the online model's stream (its events, replayed
    offline: identical to streaming), or of the offline model's detections (the ceiling), scored at the step centres."""
    import torch

    from benchmarks.accuracy_vs_actionformer import load_split
    from tal_models.evaluation import online as metrics
    from tal_models.structures import Detections

    _, _, gt = load_split(data_dir, "test")
    gt = gt.subset(gt[test[0]["video_id"]].subset)
    names = gt.label_map.names  # annotation columns, in id order
    # model column -> annotation column (-1: a class no kept video has; its scores and events are dropped)
    to_column = np.array([names.index(n) if n in names else -1 for n in meta["classes"]], np.int64)
    known = to_column >= 0
    times = {s["video_id"]: s["timing"].centers(len(s["features"])) for s in test}
    if name == "online":
        scores, events = {}, {}
        for s in test:
            steps = model.step_scores(s["features"])
            frame = np.zeros((len(steps), len(names)), np.float32)
            frame[:, to_column[known]] = steps[:, known]
            scores[s["video_id"]] = (times[s["video_id"]], frame)
            stream = model.stream_events(s["features"], s["timing"])
            events[s["video_id"]] = [replace(e, label=int(to_column[e.label])) for e in stream if known[e.label]]
        figures = metrics.evaluate_online(gt, events, scores)
    else:
        to_id = torch.as_tensor(np.array([gt.label_map.id(n) if n in names else -1 for n in meta["classes"]], np.int64))
        detections = {}
        for v, d in found.items():
            d = d[torch.as_tensor(known)[d.labels.cpu()]]
            detections[v] = Detections(v, d.segments, d.scores, to_id[d.labels.cpu()])
        figures = metrics.evaluate_offline(gt, detections, times, min_score=0.1)
    return {"frame_mAP": round(figures.frame_mAP, 4), "latency": figures.latency.to_dict()}


# --- scoring ----------------------------------------------------------------------------------------------------
def score(job: dict) -> dict:
    """A worker's instance-level average mAP (the accuracy benchmark's ActivityNet evaluator) and its stream figures."""
    from benchmarks.accuracy_vs_actionformer import evaluate

    result = job["result"]
    return {"average_mAP": evaluate(job["out"], job["data"])["average_mAP"], "frame_mAP": result["frame_mAP"], "latency": result["latency"]}


def _summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
            "min": round(float(a.min()), 4), "max": round(float(a.max()), 4), "n": len(a)}  # fmt: skip


# --- latency of the incremental state ---------------------------------------------------------------------------
def latency(kinds: tuple[str, ...], stream_steps: int = STREAM_STEPS, measured: int = 500) -> dict:
    """Per-step time of each kind's incremental state after ``stream_steps`` steps, and of re-running the prefix."""
    import torch

    from tal_models.detectors import build_detector
    from tal_models.presets import load_preset

    torch.set_num_threads(1)
    preset = load_preset("thumos14-online").detector
    out = {}
    for kind in kinds:
        torch.manual_seed(0)
        model = build_detector(replace(preset, encoder=replace(preset.encoder, kind=kind))).eval()
        g = np.random.default_rng(0)
        feats = g.standard_normal((stream_steps + measured, preset.input_dim), dtype=np.float32)
        stream = model.stream(keep_scores=False)
        stream.push(feats[:stream_steps])  # 10 minutes of stream
        times = []
        for t in range(stream_steps, stream_steps + measured):
            start = time.perf_counter()
            stream.push(feats[t])
            times.append(time.perf_counter() - start)
        prefix = []
        for _ in range(3):
            start = time.perf_counter()
            model.step_scores(feats[:stream_steps])
            prefix.append(time.perf_counter() - start)
        ms = 1000 * np.asarray(times)
        p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
        rerun = 1000 * float(np.median(prefix))
        out[kind] = {"step_ms_p50": round(p50, 2), "step_ms_p99": round(p99, 2), "rerun_prefix_ms": round(rerun, 1),
                     "speedup_p50": round(rerun / p50, 1), "speedup_p99": round(rerun / p99, 1),
                     "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
        print(f"latency {kind}: {json.dumps(out[kind])}", file=sys.stderr, flush=True)
    return out


# --- concurrent streams on one Serve replica -------------------------------------------------------------------
def serve_capacity(workdir: Path, seconds: float = 15.0, max_sessions: int = 128) -> dict:
    """``tal serve`` of the ``thumos14-online`` preset at its full size (untrained weights: the cost does not depend on
    them; they made no events in our runs, so the delay is then that of each step's ``scores`` message) on a local Ray, one Detector replica of one CPU;
    ``benchmarks/_stream_load.search``: N = 1, 2, 4, ... sessions each sending a 2048-d step every 0.25 s for
    ``seconds``, until the event p99 exceeds 1 s (or sessions are refused)."""
    import asyncio

    import ray
    import torch
    from ray import serve

    from benchmarks._stream_load import search
    from jobs.serve import run_app
    from jobs.serve_config import ServeArgs
    from tal_models.checkpoint import Checkpoint, save_checkpoint
    from tal_models.detectors import build_detector
    from tal_models.presets import load_preset

    torch.manual_seed(0)
    model = build_detector(load_preset("thumos14-online").detector)
    path = workdir / "thumos14-online.pt"
    save_checkpoint(Checkpoint.from_model(model, [f"class{k}" for k in range(model.config.num_classes)], {"feature_dim": 2048}), path)
    port = 8765
    url = run_app(ServeArgs(model=str(path), stream_max_sessions=max_sessions, cpus_per_replica=1.0), "127.0.0.1", port, quiet=True)
    try:
        found = asyncio.run(search(url, seconds, rate=4.0, max_sessions=max_sessions))
    finally:
        serve.shutdown()
        ray.shutdown()
    runs = [{"sessions": r["sessions"], "event_delay_s": r["event_delay_s"], "step_delay_s": r["step_delay_s"], "errors": r["errors"]}
            for r in found["runs"]]  # fmt: skip
    return {"model": "thumos14-online (2048-d, 512 channels, 6 levels)", "replica_cpus": 1, "rate_steps_per_s": 4,
            "seconds_per_run": seconds, "max_sessions_within_p99_1s": found["max_sessions_within_target"], "runs": runs}  # fmt: skip


# --- live, end to end ------------------------------------------------------------------------------------------
def live_delay(workdir: Path, seconds: float = 30.0) -> dict:
    """``tal detect --online`` on a ``seconds``-long 320x240 30 fps MP4 played at its own rate (``--realtime``) with the
    demo's real backbone (MobileNetV2, ImageNet weights from the torch hub cache; 15 fps, window 4, stride 4) and a
    ``demo-online`` model (untrained weights: the delay does not depend on them): the delay from a step's last frame
    arriving to its scores, one torch thread."""
    from fractions import Fraction

    import av
    import torch

    from jobs.online import detect_online
    from pipelines.backbones import BackboneConfig, build_backbone
    from pipelines.extract import SamplingConfig, provenance_for, settings_json
    from tal_models.checkpoint import Checkpoint, save_checkpoint
    from tal_models.detectors import build_detector
    from tal_models.presets import load_preset

    torch.set_num_threads(1)
    video = workdir / "live.mp4"
    width, height, fps = 320, 240, 30
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        yy, xx = np.mgrid[0:height, 0:width]
        for k in range(int(seconds * fps)):
            image = np.stack([(xx + 3 * k) % 256, (yy + k) % 256, (xx + yy + 2 * k) % 256], -1).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    backbone_config, sampling = BackboneConfig(name="mobilenet_v2"), SamplingConfig(fps=15.0, window=4, stride=4)
    backbone = build_backbone(backbone_config, "cpu", num_threads=1)
    provenance = provenance_for(backbone, sampling, settings_json(backbone_config, sampling)).to_dict()
    torch.manual_seed(0)
    detector = load_preset("demo-online").detector
    model = build_detector(replace(detector, encoder=replace(detector.encoder, input_dim=backbone.feature_dim)))
    checkpoint = workdir / "live-online.pt"
    save_checkpoint(Checkpoint.from_model(model, [f"class{k}" for k in range(detector.num_classes)], provenance), checkpoint)
    report = detect_online(str(video), str(checkpoint), realtime=True, out=workdir / "live-events.jsonl", print_events=False, device="cpu")
    return {"video": f"{seconds:g} s, {width}x{height}, {fps} fps, paced at its own rate", "backbone": "mobilenet_v2 (ImageNet)",
            "steps": report["steps"], "frames": report["frames"], "seconds": round(report["seconds"], 1),
            "delay_ms": {k: round(v, 1) for k, v in report["delay_ms"].items()}}  # fmt: skip


# --- the driver -------------------------------------------------------------------------------------------------
def accuracy(args, workdir: Path) -> dict:
    from benchmarks._thumos_like import make_thumos_like

    lrs = LR | {k: float(v) for k, v in (item.split("=") for item in args.lr)}
    tag = f"d{args.input_dim}-e{args.embed_dim}-b{args.batch_size}-s{args.steps}"
    jobs = []
    for profile in args.profiles:
        for seed in args.seeds:
            data = workdir / f"thumos-{profile}-{seed}-d{args.input_dim}-v{args.max_videos_per_split}"
            if not (data / "meta.json").exists():
                make_thumos_like(data, input_dim=args.input_dim, seed=seed, max_videos_per_split=args.max_videos_per_split, profile=profile)
            for m in MODELS:
                name = f"{data.name}-{m}-{tag}-lr{lrs[m]:g}"
                jobs.append({"profile": profile, "seed": seed, "model": m, "data": data, "steps": args.steps, "lr": lrs[m],
                             "out": workdir / f"{name}.json", "info": workdir / f"{name}.info.json"})  # fmt: skip
    run_model_jobs(jobs, args, __file__, ROOT)
    report = {}
    for profile in args.profiles:
        rows = {}
        for seed in args.seeds:
            found = {j["model"]: j for j in jobs if j["profile"] == profile and j["seed"] == seed and "error" not in j["result"]}
            if len(found) < 2:
                continue
            scores = {m: score(j) for m, j in found.items()}
            rows[seed] = {m: {**scores[m], "train_seconds": found[m]["result"]["train_seconds"]} for m in MODELS}
            rows[seed]["ratio"] = round(scores["online"]["average_mAP"] / max(scores["actionformer"]["average_mAP"], 1e-9), 3)
        ratios = [r["ratio"] for r in rows.values()]
        report[profile] = {"seeds": rows, "ratio": _summary(ratios) if ratios else None, "target_ratio": 0.8,
                           "met": bool(ratios) and min(ratios) >= 0.8}  # fmt: skip
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", default=["accuracy", "latency", "serve", "live"], choices=["accuracy", "latency", "serve", "live"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--profiles", nargs="+", default=["prototype", "phases"], help="signal models of benchmarks/_thumos_like.py")
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps of both models")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--input-dim", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=576, help="training crops (ActionFormer's THUMOS benchmark crop)")
    parser.add_argument("--max-videos-per-split", type=int, default=100, help="THUMOS videos per split")
    parser.add_argument("--kinds", nargs="+", default=["transformer", "conv", "mamba", "maxpool"], help="encoder kinds of the latency part")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    add_worker_arguments(parser)
    parser.add_argument("--lr", nargs="*", default=[], help="MODEL=LR overrides of the learning rates (default: " + str(LR) + ")")
    args = parser.parse_args()
    if args.worker:
        info = train_and_run(args.worker, args.data, args.out, args.steps, args.batch_size, args.embed_dim, args.max_seq_len, args.seed,
                             float(args.lr[0]))  # fmt: skip
        print(json.dumps(info))
        return

    from benchmarks._machine import loadavg

    started, load_before = time.perf_counter(), loadavg()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tal-online-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {"benchmark": "online", "settings": {k: v for k, v in vars(args).items() if k in (
        "parts", "seeds", "profiles", "steps", "batch_size", "input_dim", "embed_dim", "max_seq_len", "max_videos_per_split")}}  # fmt: skip
    if "accuracy" in args.parts:
        report["accuracy"] = accuracy(args, workdir)
    if "latency" in args.parts:
        report["latency"] = latency(tuple(args.kinds))
    if "serve" in args.parts:
        report["serve"] = serve_capacity(workdir)
    if "live" in args.parts:
        report["live"] = live_delay(workdir)
    report["machine"] = {"load_before": load_before, "load_after": loadavg(), "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
