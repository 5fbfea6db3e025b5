"""Accuracy of our detectors vs the original ActionFormer (``actionformer==1.5.0``), same data, same budget.

    .venv/bin/python benchmarks/accuracy_vs_actionformer.py [--steps 600] [--input-dim 128] [--embed-dim 128]

The data set (``benchmarks/_thumos_like.py``) follows the real THUMOS14 annotation timings
(``../shared/data/thumos14/thumos14.json``: the real durations, segment lengths, overlaps and class
frequencies; Validation videos train, Test videos evaluate) with synthetic class-conditional
features and noise, because no I3D features can be downloaded here. Every model trains for the same
number of optimiser steps with the same batch size and crop length, and is evaluated on the test
videos with our evaluator (ActivityNet semantics, tIoU 0.3:0.1:0.7; THUMOS14's Ambiguous
segments are not in this annotation file). Widths are scaled down equally for every model so the
whole run fits a CPU budget: ``--input-dim`` (feature width) and ``--embed-dim`` (the models'
embedding / FPN / head width; the reference gets the same through its config overrides).

Training runs two processes at a time with one thread each (the machine has 2 cores), the
reference always alongside one of ours. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REFERENCE_PYTHON = ROOT / ".venv-reference" / "bin" / "python"
THUMOS_TIOU = [0.3, 0.4, 0.5, 0.6, 0.7]
PRESETS = ("thumos14-actionformer", "thumos14-tridet", "thumos14-temporalmaxer")


# --- our side ------------------------------------------------------------------------------
def load_split(data_dir: Path, split: str):
    """Samples of ``split`` ("train"/"test"): features [T, C], segments in steps, labels, timing."""
    from pipelines.annotations import read_annotations
    from tal_models.timing import FeatureTiming

    meta = json.loads((data_dir / "meta.json").read_text())
    timing = FeatureTiming(meta["fps"], meta["stride"], meta["window"])
    classes = {name: i for i, name in enumerate(meta["classes"])}
    gt = read_annotations(data_dir / "annotations.json")
    samples = []
    for video_id in meta["splits"][split]:
        video = gt[video_id]
        steps = timing.seconds_to_step(np.asarray(video.segments.data, dtype=np.float64))
        labels = np.array([classes[gt.label_map.name(int(k))] for k in video.labels], dtype=np.int64)
        samples.append({
            "video_id": video_id,
            "features": np.load(data_dir / "features" / f"{video_id}.npy"),
            "segments": steps.astype(np.float32).reshape(-1, 2),
            "labels": labels,
            "timing": timing,
            "duration": video.duration,
        })  # fmt: skip
    return samples, meta, gt


def train_ours(
    preset_name: str, data_dir: Path, steps: int, batch_size: int, embed_dim: int, max_seq_len: int, seed: int, threads: int, ema_decay: float
):
    import torch

    from tal_models.batch import collate, random_crop
    from tal_models.detectors import build_detector
    from tal_models.optim import ModelEMA, build_optimizer, build_scheduler
    from tal_models.presets import load_preset, make_config
    from tal_models.training import train_one_epoch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train, meta, _ = load_split(data_dir, "train")
    test, _, _ = load_split(data_dir, "test")
    preset = load_preset(preset_name)
    d = preset.detector
    # the preset's architecture at the benchmark's widths: rebuilt by make_config, keeping the preset's loss and inference
    scaled = make_config(d.arch, num_classes=len(meta["classes"]), input_dim=meta["input_dim"], max_seq_len=max_seq_len, embed_dim=embed_dim)
    config = replace(scaled, loss=d.loss, inference=d.inference, encoder=replace(scaled.encoder, **_encoder_extras(d.encoder)))
    model = build_detector(config)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    epochs = max(1, round(steps / steps_per_epoch))
    warmup = min(epochs - 1, round(epochs * preset.optim.warmup_epochs / preset.optim.epochs))
    optim = replace(preset.optim, epochs=epochs, warmup_epochs=warmup, ema_decay=ema_decay)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch)
    ema = ModelEMA(model, optim.ema_decay) if optim.ema_decay else None
    g = np.random.default_rng(seed)

    def batches():  # `steps` batches of random crops, epoch after epoch
        done = 0
        while done < steps:
            order = g.permutation(len(train))
            for i in range(0, len(order) - batch_size + 1, batch_size):
                if done == steps:
                    return
                crops = []
                for j in order[i : i + batch_size]:
                    s = train[j]
                    feats, segs, labels, _ = random_crop(s["features"], s["segments"], s["labels"], max_seq_len, g)
                    crops.append({"features": feats, "segments": segs, "labels": labels, "video_id": s["video_id"]})
                yield collate(crops, model.pad_multiple)
                done += 1

    started = time.perf_counter()
    stats = train_one_epoch(model, batches(), optimizer, scheduler, ema=ema, clip_grad_norm=optim.clip_grad_norm or None)
    train_seconds = time.perf_counter() - started

    evaluated = ema.module if ema is not None else model
    evaluated.eval()
    started = time.perf_counter()
    predictions = {}
    with torch.inference_mode():
        for s in test:
            predictions[s["video_id"]] = evaluated.detect(s["features"], s["timing"], s["duration"], s["video_id"])
    infer_seconds = time.perf_counter() - started
    return predictions, {
        "impl": preset_name,
        "steps": steps,
        "train_seconds": round(train_seconds, 1),
        "infer_seconds": round(infer_seconds, 1),
        "mean_loss": stats["final_loss"],  # over all steps
        "params": sum(p.numel() for p in model.parameters()),
    }


def _encoder_extras(encoder) -> dict:
    """Settings of a preset's encoder that are not widths (kept when the benchmark rescales it)."""
    return {"window": encoder.window, "mlp_ratio": encoder.mlp_ratio, "sgp_k": encoder.sgp_k, "kernel_size": encoder.kernel_size}


def write_results(predictions, classes: list[str], path: Path) -> None:
    from pipelines.annotations import write_activitynet_results
    from tal_models.structures import LabelMap

    write_activitynet_results(path, predictions.values(), LabelMap.from_names(classes))


def evaluate(pred_path: Path, data_dir: Path) -> dict:
    from pipelines.annotations import read_activitynet_results, read_annotations
    from tal_models.evaluation.detection import evaluate_detection

    gt = read_annotations(data_dir / "annotations.json").subset("Test")
    predictions = read_activitynet_results(pred_path, gt.label_map)
    metrics = evaluate_detection(gt, predictions.detections, THUMOS_TIOU)
    return {f"mAP@{t:.1f}": round(float(m), 4) for t, m in zip(THUMOS_TIOU, metrics.mAP)} | {
        "average_mAP": round(float(metrics.mAP.mean()), 4),
        "num_predictions": metrics.num_predictions,
    }


# --- the driver ----------------------------------------------------------------------------
def _worker_cmd(impl: str, args, data_dir: Path, out: Path) -> list[str]:
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--threads", "1", "--seed", str(args.seed)]
    common += ["--ema-decay", str(args.ema_decay)]
    if impl == "reference":
        widths = ["--embed-dim", str(args.embed_dim), "--fpn-dim", str(args.embed_dim), "--head-dim", str(args.embed_dim)]
        return [
            str(REFERENCE_PYTHON), str(ROOT / "benchmarks" / "_actionformer_reference.py"), "train-eval", "--data", str(data_dir),
            "--out", str(out), "--max-seq-len", str(args.max_seq_len), *widths, *common,
        ]  # fmt: skip
    return [
        sys.executable, __file__, "--worker", impl, "--data", str(data_dir), "--out", str(out),
        "--embed-dim", str(args.embed_dim), "--max-seq-len", str(args.max_seq_len), *common,
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--input-dim", type=int, default=128)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=2304)
    parser.add_argument("--max-videos-per-split", type=int, default=None)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema-decay", type=float, default=0.99, help="EMA of the evaluated weights, for every model (0.999 suits 3,500 steps)")
    parser.add_argument("--data", type=Path, help="reuse a data set made by _thumos_like.py")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        predictions, info = train_ours(
            args.worker, args.data, args.steps, args.batch_size, args.embed_dim, args.max_seq_len, args.seed, args.threads, args.ema_decay
        )
        classes = json.loads((args.data / "meta.json").read_text())["classes"]
        write_results(predictions, classes, args.out)
        print(json.dumps(info))
        return

    from benchmarks._thumos_like import make_thumos_like

    started = time.perf_counter()
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="tal-accuracy-"))
    data_dir = args.data
    if data_dir is None:
        data_dir = workdir / "data"
        make_thumos_like(data_dir, input_dim=args.input_dim, seed=args.seed, max_videos_per_split=args.max_videos_per_split)
    impls = (["reference"] if REFERENCE_PYTHON.exists() else []) + list(args.presets)
    results: dict[str, dict] = {}
    pending = list(impls)
    running: list[tuple[str, subprocess.Popen, Path]] = []
    while pending or running:
        while pending and len(running) < 2:  # two single-threaded trainings on two cores
            impl = pending.pop(0)
            out = workdir / f"{impl}.json"
            proc = subprocess.Popen(_worker_cmd(impl, args, data_dir, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((impl, proc, out))
        time.sleep(1.0)
        for item in list(running):
            impl, proc, out = item
            if proc.poll() is None:
                continue
            running.remove(item)
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                results[impl] = {"error": stderr[-1500:]}
                print(f"{impl} failed:\n{stderr[-1500:]}", file=sys.stderr)
                continue
            info = json.loads(stdout.strip().splitlines()[-1])
            results[impl] = info | evaluate(out, data_dir)
            print(f"{impl}: {json.dumps(results[impl])}", file=sys.stderr)

    ref = results.get("reference", {}).get("average_mAP")
    ours = {k: v.get("average_mAP") for k, v in results.items() if k != "reference" and v.get("average_mAP") is not None}
    best = max(ours, key=ours.get) if ours else None
    print(
        json.dumps({
            "benchmark": "accuracy_vs_actionformer",
            "setting": {
                "steps": args.steps, "batch_size": args.batch_size, "input_dim": args.input_dim, "embed_dim": args.embed_dim,
                "max_seq_len": args.max_seq_len, "seed": args.seed, "ema_decay": args.ema_decay, "threads_per_model": 1, "data": str(data_dir),
            },
            "results": results,
            "best_ours": best,
            "best_ours_minus_reference_average_mAP": None if best is None or ref is None else round(ours[best] - ref, 4),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.perf_counter() - started, 1),
        })  # fmt: skip
    )


if __name__ == "__main__":
    main()
