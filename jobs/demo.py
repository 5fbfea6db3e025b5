"""``tal demo``: the whole pipeline on the embedded default, end to end, on this machine.

What exists today: a synthetic archive (``tal synth``) -> features on local Ray actors with the real
ImageNet MobileNetV2 (``tal extract``) -> a feature store checked back against the ground truth.
Training, evaluation of a trained detector and serving join as they are built.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from jobs.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline end to end on a synthetic archive (local Ray, local files)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="working folder (default out/demo)")
    p.add_argument("--videos", type=int, default=12, help="synthetic videos (default 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration-range", nargs=2, type=float, default=[20.0, 40.0], metavar=("MIN", "MAX"))
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 2), help="extraction actors (default: one per core)")
    p.add_argument("--preset", default="demo-temporalmaxer", help="detector preset (default demo-temporalmaxer: the fastest to learn the demo)")
    p.add_argument("--epochs", type=int, default=80, help="training epochs (default 80)")
    p.add_argument("--train-workers", type=int, default=min(2, os.cpu_count() or 1), help="DDP workers (default 2)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from pipelines.annotations import read_activitynet
    from pipelines.extract import ExtractConfig, SamplingConfig, extract
    from pipelines.store import FeatureStore
    from pipelines.synth import summary, synthesize

    if args.videos < 1:
        raise UsageError(f"--videos must be >= 1, got {args.videos}")
    t0 = time.perf_counter()
    root = args.out
    print(f"[1/4] synthetic archive -> {root / 'archive'}")
    archive_dir = root / "archive"
    gt_path = archive_dir / "annotations_activitynet.json"
    if gt_path.exists() and len(list((archive_dir / "videos").glob("*.mp4"))) == args.videos:
        print("      (already there: reusing it)")
    else:
        result = synthesize(archive_dir, videos=args.videos, seed=args.seed, duration_range=tuple(args.duration_range), workers=args.workers)
        print("      " + summary(result))
    print(f"[2/4] features (mobilenet_v2, ImageNet weights, 15 fps, 4-frame steps) -> {root / 'features'}")
    config = ExtractConfig(
        videos=str(archive_dir / "videos"),
        out=str(root / "features"),
        sampling=SamplingConfig(fps=15.0, window=4, stride=4),
        num_workers=args.workers,
    )
    result = extract(config)
    print("      " + result.format().replace("\n", "\n      "))
    store = FeatureStore(config.out)
    sequences = store.read_all()
    ground_truth = read_activitynet(gt_path)
    missing = [v.video_id for v in ground_truth if v.video_id not in sequences]
    if missing:
        print(f"      {len(missing)} annotated videos have no features: {missing[:5]}")
        return 1
    steps = sum(s.features.shape[0] for s in sequences.values())
    print(
        f"      {len(sequences)} videos, {steps:,} feature steps of {store.provenance.feature_dim} dims, "
        f"{ground_truth.num_instances} annotated actions in {len(ground_truth.label_map)} classes"
    )

    from jobs.evaluate import ModelEvaluationRequest, format_model_report, run_model
    from jobs.train import TrainJob, train

    mlflow_uri = f"sqlite:///{(root / 'mlruns').resolve()}/mlflow.db"
    (root / "mlruns").mkdir(parents=True, exist_ok=True)
    train_workers = max(1, min(args.train_workers, len(ground_truth.subset("train"))))  # each worker needs a video
    print(f"[3/4] train {args.preset} ({args.epochs} epochs, {train_workers} Ray Train workers), MLflow {mlflow_uri}")
    summary_ = train(
        TrainJob(
            config=args.preset,
            features=config.out,
            annotations=str(gt_path),
            out=str(root / "train"),
            workers=train_workers,
            epochs=args.epochs,
            mlflow_uri=mlflow_uri,
        )
    )
    print(f"[4/4] evaluate the champion (models:/tal-detector@champion) on the test videos -> {root / 'eval'}")
    request = ModelEvaluationRequest(
        model="models:/tal-detector@champion", features=config.out, annotations=gt_path, output=root / "eval", subset="test"
    )
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri  # where models:/ resolves
    report = run_model(request)
    print(format_model_report(report, request))
    print(
        f"done in {time.perf_counter() - t0:.0f} s. MLflow run {summary_['mlflow_run_id']}: "
        f"MLFLOW_TRACKING_URI={mlflow_uri} .venv/bin/mlflow ui; timelines in {root / 'eval' / 'timelines'}"
    )
    return 0
