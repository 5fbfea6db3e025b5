"""The detectors of issues 15 and 17 (the online detector) through the jobs: ``tal train`` (real Ray Train, 2 DDP workers), the MLflow registry,
``tal evaluate --model`` (``--dense`` for a dense model) and ``tal serve`` over real HTTP."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import SYNTHETIC_CLASSES, SYNTHETIC_DIM, SYNTHETIC_TIMING, free_port, synthetic_store

from jobs.evaluate import ModelEvaluationRequest, run_model
from jobs.train import DENSE_SCORE, SCORE, TrainJob, train
from tal_models.config import dump_yaml
from tal_models.detectors import online_config
from tal_models.evaluation import THUMOS14_TIOU
from tal_models.online.events import EventRuleConfig
from tal_models.optim import OptimConfig
from tal_models.presets import Preset, make_config

# One of each kind the jobs treat differently (tiny widths): a state-space one-stage detector (also served below), a
# graph one, MS-Temba, a dense (per-step) detector, and the online (causal) detector. causaltad and dyfadet take
# gtad's path through the jobs (build_detector, the same loss and validation); their models are trained in
# tests/tal_models/test_one_stage.py and dyfadet is exported in tests/jobs/test_export.py (each fit here costs ~25 s of CI).
ARCHS = ("actionmamba", "gtad", "mstemba", "online")


def _preset(root: Path, arch: str) -> Path:
    sizes = dict(num_classes=len(SYNTHETIC_CLASSES), input_dim=SYNTHETIC_DIM, max_seq_len=64, embed_dim=32, levels=3)
    detector = online_config(kind="transformer", window=5, **sizes) if arch == "online" else make_config(arch, **sizes)
    if detector.task == "dense":  # three short epochs leave per-step scores near the 0.01 prior: report runs above 0.02
        detector = replace(detector, inference=replace(detector.inference, dense_threshold=0.02))
    if arch == "online":  # the same: instances start above 0.1 (not 0.5) and end below 0.05
        rule = EventRuleConfig(start_threshold=0.1, end_threshold=0.05)
        detector = replace(detector, inference=replace(detector.inference, rule=rule))
    optim = OptimConfig(lr=5e-3, weight_decay=0.0, warmup_epochs=1, epochs=3, ema_decay=0.7)
    path = root / f"tiny-{arch}.yaml"
    path.write_text(dump_yaml(Preset(f"tiny-{arch}", "test", "synthetic", detector, optim, 1)))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("store"), videos=18)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory, ray_session):
    """``trained(arch)`` -> (the train summary, the MLflow URI): each arch trained once, when a test first asks
    (so a test's time limit covers one or two fits, not all of them)."""
    done = {}
    features, gt = store

    def get(arch: str):
        if arch not in done:
            root = tmp_path_factory.mktemp(arch)
            job = TrainJob(
                config=str(_preset(root, arch)), features=features, annotations=str(gt), out=str(root / "runs"), workers=2,
                mlflow_uri=f"sqlite:///{root}/mlflow.db", run_name=arch,
            )  # fmt: skip
            done[arch] = (train(job), job.mlflow_uri)
        return done[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_each_new_detector_trains_on_two_workers_registers_and_evaluates(arch, trained, store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    summary, uri = trained(arch)
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    dense = arch == "mstemba"
    key = DENSE_SCORE if dense else SCORE
    assert run.info.status == "FINISHED" and run.data.params["detector.arch"] == arch and run.data.params["workers"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1, 2]  # validated every epoch
    assert 0.0 < summary["best_score"] <= 1.0 and summary["registration"]["promoted"]
    version = client.get_model_version_by_alias("tal-detector", "champion")
    assert version.run_id == run.info.run_id and version.tags["metric_name"] == key

    features, gt = store
    request = ModelEvaluationRequest(
        model="models:/tal-detector@champion", features=features, annotations=gt, output=tmp_path / "eval", subset="validation",
        workers=0, timeline_videos=1, dense=dense, progress=False, tiou=THUMOS14_TIOU,  # the thresholds training validates at
    )  # fmt: skip
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where models:/ resolves
    report = run_model(request)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert len(report.videos) == 6 and report.metrics.num_ground_truth > 0
    if dense:  # the per-frame mAP of the registered checkpoint is the one training reported for it
        assert report.dense_metrics is not None and written["dense"]["mAP"] == pytest.approx(report.dense_metrics.mAP)
        assert report.dense_metrics.mAP == pytest.approx(summary["best_score"], abs=1e-4)
    else:
        assert "dense" not in written and written["average_mAP"] == pytest.approx(summary["best_score"], abs=1e-4)


def test_evaluate_dense_refuses_a_detector_of_segments(trained, store, tmp_path, monkeypatch):
    from jobs.errors import UsageError

    features, gt = store
    summary, uri = trained("gtad")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = f"runs:/{summary['mlflow_run_id']}/checkpoint/model.pt"
    with pytest.raises(UsageError, match="--dense: .* gtad detector of segments, not a dense"):
        run_model(ModelEvaluationRequest(model=model, features=features, annotations=gt, output=tmp_path, dense=True, progress=False))


@pytest.mark.timeout(600)  # two Serve starts (and two fits if run alone)
def test_a_dense_and_a_mamba_detector_serve_over_http_as_in_process(trained, store, ray_session):
    from ray import serve

    from jobs.serve import run_app
    from jobs.serve_config import ServeArgs
    from jobs.tracking import resolve_model
    from pipelines.store import FeatureStore
    from tal_models.checkpoint import load_checkpoint

    features = np.asarray(next(iter(FeatureStore(store[0]))).features[:70], np.float32)  # a video like those trained on
    for arch in ("mstemba", "actionmamba"):
        _, uri = trained(arch)
        checkpoint = load_checkpoint(resolve_model("models:/tal-detector@champion", uri))
        model = checkpoint.build("cpu").eval()
        duration = float(SYNTHETIC_TIMING.step_to_seconds(len(features)))
        expected = model.detect(features, SYNTHETIC_TIMING, duration).sorted_by_score()
        port = free_port()
        url = run_app(ServeArgs(model="models:/tal-detector@champion", mlflow_uri=uri, max_steps=300), "127.0.0.1", port)
        try:
            body = {"features": features.tolist(), "duration": duration, "video_id": "clip"}  # the timing is the checkpoint's features'

            response = requests.post(url + "/v1/detect", json=body, timeout=120)
            assert response.status_code == 200, response.text
            got = response.json()
            assert got["num_steps"] == len(features) == 70 and requests.get(url + "/v1/model", timeout=60).json()["arch"] == arch
            assert len(got["detections"]) == len(expected) > 0
            for d, score, label, (a, b) in zip(got["detections"], expected.scores, expected.labels, np.asarray(expected.segments.data)):
                assert d["label"] == SYNTHETIC_CLASSES[int(label)] and d["score"] == pytest.approx(float(score), abs=1e-5)
                assert d["segment"] == pytest.approx([float(a), float(b)], abs=1e-4)
        finally:
            serve.shutdown()
