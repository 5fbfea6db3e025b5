"""The families of issue 16 through the jobs: ``tal train`` (real Ray Train, 2 DDP workers) of BMN, TadTR and our
video classifier, the MLflow registry (detectors and classifiers apart), ``tal evaluate --model`` with and without
``--classifier`` (a registered classifier, or its classification JSON), and ``tal serve`` of a class-agnostic model
fused with the registry's champion classifier, over real HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import SYNTHETIC_CLASSES, SYNTHETIC_DIM, SYNTHETIC_TIMING, free_port, synthetic_store

from jobs.errors import UsageError
from jobs.evaluate import ClassifierEvaluationReport, ModelEvaluationRequest, run_model
from jobs.train import CLASSIFICATION_SCORE, SCORE, TrainJob, train
from tal_models.config import dump_yaml
from tal_models.detectors.bmn import bmn_config
from tal_models.detectors.classifier import VideoClassifierConfig
from tal_models.detectors.tadtr import tadtr_config
from tal_models.evaluation import THUMOS14_TIOU
from tal_models.optim import OptimConfig
from tal_models.presets import Preset
from tal_models.windows import TemporalScaleConfig

K, C = len(SYNTHETIC_CLASSES), SYNTHETIC_DIM


def _presets() -> dict[str, Preset]:
    """Tiny versions of the shipped presets: ActivityNet-style (resize to 32 cells, class-agnostic) BMN and the classifier
    that names its segments; THUMOS-style (windows of 32 steps over 96-step videos) BMN with its proposal classifier and TadTR."""
    optim = OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=1, epochs=3, ema_decay=0.7)
    bmn = {"hidden_1d": 16, "hidden_2d": 16, "hidden_3d": 32, "num_samples": 4, "samples_per_bin": 2, "length": 32}
    tadtr = {"embed_dim": 32, "num_queries": 10, "enc_layers": 1, "dec_layers": 2, "ffn_dim": 64, "max_seq_len": 32,
             "scale": TemporalScaleConfig("window", 32, 0.25)}  # fmt: skip
    return {
        "anet-bmn": Preset("tiny-anet-bmn", "test", "synthetic", bmn_config(protocol="activitynet", num_classes=1, input_dim=C, **bmn),
                           optim, 2, class_agnostic=True),
        "classifier": Preset("tiny-classifier", "test", "synthetic", VideoClassifierConfig(num_classes=K, input_dim=C, hidden_dim=32),
                             OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=1, epochs=4, ema_decay=None), 2),
        "thumos-bmn": Preset("tiny-thumos-bmn", "test", "synthetic", bmn_config(protocol="thumos14", num_classes=K, input_dim=C, **bmn),
                             optim, 2),
        "tadtr": Preset("tiny-tadtr", "test", "synthetic", tadtr_config(protocol="thumos14", num_classes=K, input_dim=C, **tadtr), optim, 2),
    }  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("store"), videos=18)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One MLflow store for the module: the class-agnostic detector finds its classifier there."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db"


@pytest.fixture(scope="module")
def trained(store, registry, tmp_path_factory, ray_session):
    """``trained(name)`` -> the train summary: each preset trained once, when a test first asks for it."""
    done = {}
    features, gt = store
    presets = _presets()

    def get(name: str):
        if name not in done:
            root = tmp_path_factory.mktemp(name)
            path = root / f"{name}.yaml"
            path.write_text(dump_yaml(presets[name]))
            job = TrainJob(config=str(path), features=features, annotations=str(gt), out=str(root / "runs"), workers=2,
                           mlflow_uri=registry, run_name=name)  # fmt: skip
            done[name] = train(job)
        return done[name]

    return get


def _evaluate(model: str, store, out: Path, **kwargs):
    features, gt = store
    request = ModelEvaluationRequest(
        model=model, features=features, annotations=gt, output=out, subset="validation", workers=0, timeline_videos=0, progress=False,
        tiou=THUMOS14_TIOU, **kwargs,
    )  # fmt: skip
    return run_model(request)


@pytest.mark.timeout(600)
def test_a_class_agnostic_bmn_is_named_by_our_classifier_from_the_registry_or_its_json(trained, store, registry, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    classifier, detector = trained("classifier"), trained("anet-bmn")
    client = MlflowClient(registry)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    # each registered under its own name, ranked by its own metric
    version = client.get_model_version_by_alias("tal-classifier", "champion")
    assert version.run_id == classifier["mlflow_run_id"] and version.tags["metric_name"] == CLASSIFICATION_SCORE
    version = client.get_model_version_by_alias("tal-detector", "champion")
    assert version.run_id == detector["mlflow_run_id"] and version.tags["metric_name"] == SCORE
    run = client.get_run(detector["mlflow_run_id"])
    assert run.data.params["detector.arch"] == "bmn" and run.data.params["detector.num_classes"] == "1"
    artifacts = [a.path for a in client.list_artifacts(classifier["mlflow_run_id"], "validation")]
    assert "validation/val_classification.json" in artifacts

    # the classifier alone: ActivityNet's classification task, and the official JSON of its scores
    report = _evaluate("models:/tal-classifier@champion", store, tmp_path / "cls")
    assert isinstance(report, ClassifierEvaluationReport) and report.metrics.num_videos == 6
    assert report.metrics.mAP == pytest.approx(classifier["best_score"], abs=1e-4)
    written = json.loads((tmp_path / "cls" / "classification.json").read_text())
    assert sorted(written["results"]) == sorted(report.videos) and {p["label"] for p in written["results"]["vid12"]} == set(
        SYNTHETIC_CLASSES
    )

    # the detector alone is scored class-agnostically (as training validated it), and says so
    alone = _evaluate("models:/tal-detector@champion", store, tmp_path / "alone")
    assert alone.metrics.class_names == ["action"] and any("class-agnostic" in n for n in alone.notes)
    assert alone.metrics.average_mAP == pytest.approx(detector["best_score"], abs=1e-4)

    # named by the classifier: the annotation's classes; the same from the classifier's JSON
    fused = _evaluate("models:/tal-detector@champion", store, tmp_path / "fused", classifier="models:/tal-classifier@champion")
    from_json = _evaluate(
        "models:/tal-detector@champion", store, tmp_path / "json", classifier=str(tmp_path / "cls" / "classification.json")
    )
    assert fused.metrics.class_names == sorted(SYNTHETIC_CLASSES) and fused.metrics.num_predictions > alone.metrics.num_predictions
    assert from_json.metrics.average_mAP == pytest.approx(fused.metrics.average_mAP, abs=1e-6)
    predictions = json.loads((tmp_path / "fused" / "predictions.json").read_text())["results"]
    assert {d["label"] for dets in predictions.values() for d in dets} <= set(SYNTHETIC_CLASSES)

    with pytest.raises(UsageError, match="is a video classifier, which has no segments"):
        _evaluate("models:/tal-classifier@champion", store, tmp_path / "x", classifier="models:/tal-classifier@champion")
    with pytest.raises(UsageError, match="not a video classifier"):
        _evaluate("models:/tal-detector@champion", store, tmp_path / "y", classifier="models:/tal-detector@champion")


@pytest.mark.parametrize("name", ["thumos-bmn", "tadtr"])
def test_bmn_with_its_proposal_classifier_and_tadtr_train_on_windows_and_evaluate(name, trained, store, registry, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    summary = trained(name)
    run = MlflowClient(registry).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["workers"] == "2" and run.data.params["detector.scale.protocol"] == "window"
    assert 0.0 < summary["best_score"] <= 1.0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    report = _evaluate(f"runs:/{summary['mlflow_run_id']}/checkpoint/model.pt", store, tmp_path / "eval")
    assert report.metrics.class_names == sorted(SYNTHETIC_CLASSES) and not report.notes
    assert report.metrics.average_mAP == pytest.approx(summary["best_score"], abs=1e-4)  # the registered weights are the validated ones
    with pytest.raises(UsageError, match="names its own"):
        _evaluate(f"runs:/{summary['mlflow_run_id']}/checkpoint/model.pt", store, tmp_path / "z", classifier="x.json")


@pytest.mark.timeout(600)
def test_a_served_class_agnostic_model_is_fused_with_the_champion_classifier_and_tadtr_serves(trained, store, registry, ray_session):
    from ray import serve

    from jobs.serve import run_app
    from jobs.serve_config import ServeArgs
    from jobs.tracking import resolve_model
    from pipelines.store import FeatureStore
    from tal_models.checkpoint import load_checkpoint
    from tal_models.detectors.fused import FusedDetector

    trained("classifier"), trained("anet-bmn")
    features = np.asarray(next(iter(FeatureStore(store[0]))).features[:80], np.float32)
    detector = load_checkpoint(resolve_model("models:/tal-detector@champion", registry)).build("cpu")
    classifier = load_checkpoint(resolve_model("models:/tal-classifier@champion", registry))
    duration = float(SYNTHETIC_TIMING.step_to_seconds(len(features)))
    expected = FusedDetector(detector, classifier.build("cpu"), 2).detect(features, SYNTHETIC_TIMING, duration).sorted_by_score()
    port = free_port()
    url = run_app(ServeArgs(model="models:/tal-detector@champion", mlflow_uri=registry, max_steps=300), "127.0.0.1", port)
    try:
        described = requests.get(url + "/v1/model", timeout=60).json()
        assert described["arch"] == "bmn" and described["labels"] == classifier.labels
        assert described["classifier"]["reference"] == "models:/tal-classifier@champion" and described["classifier"]["registry"]["version"]
        response = requests.post(
            url + "/v1/detect", json={"features": features.tolist(), "duration": duration, "video_id": "clip"}, timeout=120
        )
        assert response.status_code == 200, response.text
        got = response.json()["detections"]
        assert len(got) == len(expected) > 0
        for d, score, label, (a, b) in zip(got, expected.scores, expected.labels, np.asarray(expected.segments.data)):
            assert d["label"] == classifier.labels[int(label)] and d["score"] == pytest.approx(float(score), abs=1e-5)
            assert d["segment"] == pytest.approx([float(a), float(b)], abs=1e-4)
    finally:
        serve.shutdown()

    # a set-prediction model names its own classes: served as it is, no classifier
    summary = trained("tadtr")
    reference = f"runs:/{summary['mlflow_run_id']}/checkpoint/model.pt"
    tadtr = load_checkpoint(resolve_model(reference, registry))
    expected = tadtr.build("cpu").detect(features, SYNTHETIC_TIMING, duration).sorted_by_score()
    url = run_app(ServeArgs(model=reference, mlflow_uri=registry, max_steps=300), "127.0.0.1", free_port())
    try:
        described = requests.get(url + "/v1/model", timeout=60).json()
        assert described["arch"] == "tadtr" and described["classifier"] is None and described["labels"] == SYNTHETIC_CLASSES
        response = requests.post(
            url + "/v1/detect", json={"features": features.tolist(), "duration": duration, "video_id": "clip"}, timeout=120
        )
        assert response.status_code == 200, response.text
        got = response.json()["detections"]
        assert len(got) == len(expected) > 0
        assert [d["label"] for d in got] == [SYNTHETIC_CLASSES[int(k)] for k in expected.labels]
        assert [d["score"] for d in got] == pytest.approx([float(x) for x in expected.scores], abs=1e-5)
    finally:
        serve.shutdown()
