"""``tal train`` with 1 and 2 Ray Train workers on the same data: where the wall time goes.

    .venv/bin/python benchmarks/train.py [--videos 60] [--epochs 3] [--input-dim 256] [--embed-dim 128]

A THUMOS14-timed synthetic feature store (``benchmarks/_thumos_like.py``: real durations and
segments of the first videos of each split) and the ``actionformer`` architecture at reduced
widths; the same job runs with 1 then 2 workers (each worker 1 CPU, batch 2 per worker). From
the per-epoch metrics every worker reports (MLflow) it prints, per worker count: time to the
first step (from ``trainer.fit()``), seconds per step, samples/s, the share of the fit's wall
time spent outside the training step (Ray start-up and scheduling, data preparation, validation,
checkpointing, MLflow), that share after start-up with and without validation (the work one asks
for), and each worker's peak memory. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_store(workdir: Path, videos: int, input_dim: int) -> tuple[str, Path]:
    from benchmarks._thumos_like import make_thumos_like
    from pipelines.annotations import read_annotations
    from pipelines.store import FeatureSequence, FeatureStore, Provenance
    from tal_models.timing import FeatureTiming

    data = workdir / "data"
    make_thumos_like(data, input_dim=input_dim, max_videos_per_split=videos // 2)
    meta = json.loads((data / "meta.json").read_text())
    timing = FeatureTiming(meta["fps"], meta["stride"], meta["window"])
    gt = read_annotations(data / "annotations.json")
    store = FeatureStore(str(workdir / "store"))
    provenance = Provenance("synthetic-thumos", "none", "0" * 64, input_dim, meta["fps"], meta["stride"], meta["window"], "{}")
    sequences = []
    for vid in meta["splits"]["train"] + meta["splits"]["test"]:
        x = np.load(data / "features" / f"{vid}.npy")
        sequences.append(FeatureSequence(vid, x, timing, timing.centers(x.shape[0]), duration=gt[vid].duration))
    for i in range(0, len(sequences), 16):
        store.write_part(sequences[i : i + 16], provenance)
    return str(workdir / "store"), data / "annotations.json"


def make_preset(workdir: Path, input_dim: int, embed_dim: int, epochs: int) -> Path:
    from dataclasses import replace

    from tal_models.config import dump_yaml
    from tal_models.presets import load_preset, make_config

    base = load_preset("thumos14-actionformer")
    detector = make_config("actionformer", num_classes=20, input_dim=input_dim, embed_dim=embed_dim, max_seq_len=2304)
    preset = replace(base, name="bench-actionformer", detector=detector, optim=replace(base.optim, epochs=epochs, warmup_epochs=1))
    path = workdir / "preset.yaml"
    path.write_text(dump_yaml(preset))
    return path


def figures(summary: dict, uri: str, workers: int, batch: int) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run_id = summary["mlflow_run_id"]

    def series(key):
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    step_s = series("step_seconds")
    iterations = _iterations(summary, workers, batch)
    first = series("first_step_unix")[0] - summary["fit_started_unix"]
    worker_start = series("worker_start_unix")[0] - summary["fit_started_unix"]
    samples = series("samples_per_second")
    fit = summary["fit_seconds"]
    inside = sum(step_s)
    validation = sum(series("val_seconds"))
    return {
        "workers": workers,
        "fit_seconds": round(fit, 1),
        "time_to_first_step_s": round(first, 1),
        "worker_started_after_s": round(worker_start, 1),
        "seconds_per_step": round(inside / (len(step_s) * iterations), 3),
        "samples_per_second": round(float(np.median(samples)), 2),
        "outside_step_share": round(1 - inside / fit, 3),
        "outside_step_share_after_startup": round(1 - inside / max(fit - first, 1e-9), 3),
        "validation_share_after_startup": round(validation / max(fit - first, 1e-9), 3),
        "overhead_share_after_startup": round(1 - (inside + validation) / max(fit - first, 1e-9), 3),  # Ray, data, checkpoints, MLflow
        "peak_rss_mb_per_worker": round(max(series("worker_peak_rss_mb")), 0),
        "steps_per_epoch": iterations,
    }


def _iterations(summary: dict, workers: int, batch: int) -> int:
    return -(-summary["train_videos"] // (workers * batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=60, help="videos (half train, half validation)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--val-every", type=int, default=4)
    parser.add_argument("--input-dim", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    import ray

    from jobs.train import TrainJob, train

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="tal-train-bench-"))
    store, annotations = make_store(workdir, args.videos, args.input_dim)
    preset = make_preset(workdir, args.input_dim, args.embed_dim, args.epochs)
    uri = f"sqlite:///{workdir}/mlflow.db"
    started = time.perf_counter()
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    results = []
    for workers in args.workers:
        job = TrainJob(
            config=str(preset), features=store, annotations=str(annotations), out=str(workdir / "runs"), workers=workers,
            mlflow_uri=uri, run_name=f"bench-{workers}", register=False, batch_size=2, val_every=args.val_every,
        )  # fmt: skip
        summary = train(job)
        summary["train_videos"] = args.videos // 2
        results.append(figures(summary, uri, workers, 2))
        print(json.dumps(results[-1]), file=sys.stderr)
    ray.shutdown()
    one = next((r for r in results if r["workers"] == 1), None)
    two = next((r for r in results if r["workers"] == 2), None)
    print(
        json.dumps({
            "benchmark": "train",
            "setting": {"videos": args.videos, "epochs": args.epochs, "val_every": args.val_every, "input_dim": args.input_dim, "embed_dim": args.embed_dim,
                        "arch": "actionformer", "batch_per_worker": 2, "cpus": os.cpu_count()},
            "results": results,
            "speedup_2_vs_1_samples_per_second": round(two["samples_per_second"] / one["samples_per_second"], 3) if one and two else None,
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.perf_counter() - started, 1),
        })  # fmt: skip
    )


if __name__ == "__main__":
    main()
