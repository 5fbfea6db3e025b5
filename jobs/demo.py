"""``tal demo``: the whole platform on the embedded default, end to end, on this machine.

    synthetic archive (tal synth) -> MobileNetV2 ImageNet features on local Ray Data actors (tal extract)
    -> Ray Train DDP training tracked in a local MLflow store, champion registered (tal train)
    -> the champion evaluated on the held-out test videos: metrics, plots (tal evaluate --model)
    -> Ray Serve with the champion; one test video POSTed to /v1/detect/video; detections vs ground truth

Local Ray, a local MLflow SQLite store, local files: nothing but this machine. A second run reuses
the archive and the features (extraction resumes) and trains a new run.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import requests
from ray import serve

from jobs.evaluate import ModelEvaluationRequest, format_model_report, run_model
from jobs.serve import run_app
from jobs.serve_config import ServeArgs
from jobs.train import TrainJob, train
from pipelines.annotations import read_activitynet
from pipelines.extract import ExtractConfig, SamplingConfig, extract
from pipelines.ray_runtime import owns_ray
from pipelines.store import FeatureStore
from pipelines.synth import summary, synthesize
from tal_models.structures import pairwise_tiou


@dataclass(frozen=True)
class DemoRequest:
    """What ``tal demo`` was asked to do (the CLI builds it)."""

    out: Path  # the working folder: archive/, features/, mlruns/, train/, eval/
    videos: int  # synthetic videos, split 60/20/20 into train/validation/test
    seed: int
    duration_range: tuple[float, float]  # video lengths, seconds
    workers: int  # synthesis processes and extraction actors
    preset: str
    epochs: int
    train_workers: int  # DDP workers (at most one per training video)
    serve: bool = True  # end with Ray Serve and one test video


def run_demo(request: DemoRequest) -> int:
    """The five steps of the module doc, printing as they go; 0 once done, 1 if videos have no features."""
    started_ray = not ray.is_initialized()
    t0 = time.perf_counter()
    root = request.out
    print(f"[1/5] synthetic archive -> {root / 'archive'}")
    archive_dir = root / "archive"
    gt_path = archive_dir / "annotations_activitynet.json"
    if gt_path.exists() and len(list((archive_dir / "videos").glob("*.mp4"))) == request.videos:
        print("      (already there: reusing it)")
    else:
        result = synthesize(
            archive_dir, videos=request.videos, seed=request.seed, duration_range=tuple(request.duration_range), workers=request.workers
        )
        print("      " + summary(result))
    print(f"[2/5] features (mobilenet_v2, ImageNet weights, 15 fps, 4-frame steps) -> {root / 'features'}")
    config = ExtractConfig(
        videos=str(archive_dir / "videos"),
        out=str(root / "features"),
        sampling=SamplingConfig(fps=15.0, window=4, stride=4),
        num_workers=request.workers,
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

    mlflow_uri = f"sqlite:///{(root / 'mlruns').resolve()}/mlflow.db"
    (root / "mlruns").mkdir(parents=True, exist_ok=True)
    train_workers = max(1, min(request.train_workers, len(ground_truth.subset("train"))))  # each worker needs a video
    print(f"[3/5] train {request.preset} ({request.epochs} epochs, {train_workers} Ray Train workers), MLflow {mlflow_uri}")
    summary_ = train(
        TrainJob(
            config=request.preset,
            features=config.out,
            annotations=str(gt_path),
            out=str(root / "train"),
            workers=train_workers,
            epochs=request.epochs,
            mlflow_uri=mlflow_uri,
        )
    )
    print(f"[4/5] evaluate the champion (models:/tal-detector@champion) on the test videos -> {root / 'eval'}")
    evaluation = ModelEvaluationRequest(
        model="models:/tal-detector@champion",
        features=config.out,
        annotations=gt_path,
        output=root / "eval",
        subset="test",
        tiou=DEMO_TIOU,
        report=True,
    )
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri  # where models:/ resolves
    report = run_model(evaluation)
    print(format_model_report(report, evaluation))
    average = float(report.metrics.average_mAP)
    print(f"      average mAP (tIoU 0.3:0.7) on the {len(report.videos)} test videos: {average:.3f}")
    if request.serve:
        test_videos = [v for v in ground_truth if v.subset == "test"]
        print("[5/5] Ray Serve: the champion behind HTTP; one test video POSTed to /v1/detect/video")
        serve_one_video(
            mlflow_uri,
            archive_dir / "videos" / f"{test_videos[0].video_id}.mp4",
            test_videos[0],
            ground_truth.label_map,
            stop_serve=not (started_ray and owns_ray()),  # a local Ray the demo started ends below, Serve with it
        )
    if started_ray:  # a caller's own Ray (a notebook, the tests) is left running
        ray.shutdown()
    print(f"done in {time.perf_counter() - t0:.0f} s. Outputs:")
    print(f"  archive      {archive_dir} (videos/, annotations_activitynet.json)")
    print(f"  features     {config.out}")
    print(f"  training     {root / 'train'} (checkpoints per epoch), MLflow run {summary_['mlflow_run_id']}")
    print(f"  evaluation   {root / 'eval'}: metrics.json, predictions.json, precision_recall.png, timelines/<video>.png")
    print(f"  report       {report.outputs['report']}   (one HTML file: open it in a browser)")
    print(f"  MLflow UI    .venv/bin/mlflow ui --backend-store-uri {mlflow_uri}   (then http://127.0.0.1:5000)")
    print(
        f"  viewer       .venv/bin/tal serve --model models:/tal-detector@champion --mlflow-uri {mlflow_uri} "
        f"--video-root {(archive_dir / 'videos').resolve()}   (then http://127.0.0.1:8000/)"
    )
    return 0


DEMO_TIOU = np.round(np.arange(0.3, 0.71, 0.1), 2)  # THUMOS14's thresholds: the synthetic actions last seconds, like THUMOS's


def serve_one_video(mlflow_uri: str, video: Path, truth, label_map, *, stop_serve: bool = True) -> None:
    """Start the Serve app on a free port, POST ``video``, print its detections beside the ground truth, shut Serve down
    (``stop_serve``; a Ray that ``ray.shutdown()`` ends next takes Serve with it)."""
    port = _free_port()
    started = time.perf_counter()
    try:
        url = run_app(ServeArgs(model="models:/tal-detector@champion", mlflow_uri=mlflow_uri), "127.0.0.1", port, quiet=True)
        print(f"      app up at {url} in {time.perf_counter() - started:.0f} s (OpenAPI: {url}/docs)")
        with open(video, "rb") as f:
            r = requests.post(url + "/v1/detect/video", files={"video": (video.name, f, "video/mp4")}, params={"top_k": 10}, timeout=600)
        if r.status_code != 200:
            print(f"      /v1/detect/video answered {r.status_code}: {r.text[:300]}")
            return
        result = r.json()
        t = result["timing"]
        print(
            f"      POST {video.name} ({result['duration']:.1f} s of video): {result['num_steps']} feature steps; "
            f"decode {t['decode_s']:.1f} s, features {t['features_s']:.1f} s, detection {t['detect_s']:.2f} s"
        )
        detections = result["detections"]
        segments = np.array([d["segment"] for d in detections]).reshape(-1, 2)
        print(f"      {'ground truth':<34} best detection of the same class (tIoU)")
        for (start, end), label in zip(np.asarray(truth.segments.data), truth.labels):
            name = label_map.name(int(label))
            same = [i for i, d in enumerate(detections) if d["label"] == name]
            if same:
                overlaps = pairwise_tiou(np.array([[start, end]]), segments[same])[0]
                best = same[int(np.argmax(overlaps))]
                d = detections[best]
                found = f"{d['segment'][0]:6.1f}-{d['segment'][1]:6.1f} s  score {d['score']:.2f}  (tIoU {overlaps.max():.2f})"
            else:
                found = "none among the top 10"
            print(f"      {name:<20} {start:6.1f}-{end:6.1f} s  {found}")
    finally:
        # serve.shutdown() prints Ray's "Task ServeController.graceful_shutdown failed ... will be retried" (the
        # controller kills itself while the call waits): only for a Ray that outlives the demo
        if stop_serve:
            serve.shutdown()


def _free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it), for Serve's HTTP proxy: a fixed one may be taken."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
