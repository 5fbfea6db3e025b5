"""Issue 18 through the jobs, over real parts: ``tal train --supervision video`` of the weak family (Ray Train, 2 DDP
workers, MLflow registry), ``--pseudo-labels`` self-training over two rounds (each round an MLflow run nested under a
parent), a training-free zero-shot preset validated and registered, a text-headed (open-vocabulary) model trained on
seen classes and served over real HTTP with class names per request (checked: 4xx for empty, too many, too long)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import SYNTHETIC_CLASSES, SYNTHETIC_DIM, SYNTHETIC_TIMING, free_port, synthetic_store

from jobs.errors import UsageError
from jobs.evaluate import ModelEvaluationRequest, run_model
from jobs.train import SCORE, TrainJob, train
from pipelines.vlm import write_embedding_table
from tal_models.config import dump_yaml
from tal_models.detectors.weak import weak_config
from tal_models.detectors.zero_shot import zero_shot_config
from tal_models.evaluation import THUMOS14_WEAK_TIOU
from tal_models.open_vocab import open_vocab_config
from tal_models.optim import OptimConfig
from tal_models.presets import Preset, paper_preset
from tal_models.text import TextEncoderConfig

K, C = len(SYNTHETIC_CLASSES), SYNTHETIC_DIM
EXTRA = ["swim", "climb"]  # names the table knows but no training video has


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("store"), videos=18)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """Text embeddings of the synthetic classes: the store's own class prototypes (helpers.synthetic_store draws them
    first from its seed), so a zero-shot model can find them; two extra names with unrelated directions."""
    protos = 2.0 * np.random.default_rng(0).standard_normal((K, C)).astype(np.float32)
    extra = np.random.default_rng(7).standard_normal((len(EXTRA), C)).astype(np.float32)
    path = tmp_path_factory.mktemp("text") / "table.npz"
    write_embedding_table(path, SYNTHETIC_CLASSES + EXTRA, np.concatenate([protos, extra]))
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _write(root: Path, preset: Preset) -> str:
    path = root / f"{preset.name}.yaml"
    path.write_text(dump_yaml(preset))
    return str(path)


def _tiny_actionformer():
    return paper_preset("actionformer", num_classes=K, input_dim=C, max_seq_len=96, embed_dim=32, levels=3).detector


def _job(root: Path, config: str, store, registry: str, **kwargs) -> TrainJob:
    features, gt = store
    return TrainJob(config=config, features=features, annotations=str(gt), out=str(root / "runs"), mlflow_uri=registry, **kwargs)


def _evaluate(model: str, store, out: Path, subset: str = "validation", **kwargs):
    features, gt = store
    request = ModelEvaluationRequest(model=model, features=features, annotations=gt, output=out, subset=subset, workers=0,
                                     timeline_videos=0, progress=False, **kwargs)  # fmt: skip
    return run_model(request)


@pytest.fixture(scope="module")
def weak_run(store, registry, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("weak")
    preset = Preset("tiny-weak", "test", "synthetic", weak_config(num_classes=K, input_dim=C, hidden_dim=32, max_seq_len=64),
                    OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=1, epochs=8, ema_decay=None), 2)  # fmt: skip
    summary = train(_job(root, _write(root, preset), store, registry, workers=2, run_name="weak", supervision="video"))
    return summary, root


@pytest.mark.timeout(600)
def test_weak_training_from_video_labels_registers_and_localizes(weak_run, store, registry, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    summary, _ = weak_run
    client = MlflowClient(registry)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["supervision"] == "video" and run.data.params["detector.arch"] == "weak"
    assert summary["best_score"] > 0.2  # the validation videos' real segments, found from video-level labels only
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    report = _evaluate(f"runs:/{summary['mlflow_run_id']}/checkpoint/model.pt", store, tmp_path / "eval", tiou=THUMOS14_WEAK_TIOU)
    np.testing.assert_allclose(report.metrics.tiou, THUMOS14_WEAK_TIOU)
    assert report.metrics.mAP[0] >= report.metrics.mAP[-1] and report.metrics.mAP[0] > 0.3


def test_video_supervision_is_refused_for_a_segment_detector(store, registry, tmp_path):
    preset = Preset("tiny-af", "test", "synthetic", _tiny_actionformer(), OptimConfig(epochs=1, warmup_epochs=0), 2)
    with pytest.raises(UsageError, match="needs start and end times"):
        train(_job(tmp_path, _write(tmp_path, preset), store, registry, supervision="video"))
    with pytest.raises(UsageError, match="--rounds needs --pseudo-labels"):
        train(_job(tmp_path, _write(tmp_path, preset), store, registry, rounds=2))


@pytest.mark.timeout(900)
def test_two_rounds_of_self_training_from_the_weak_model_are_nested_mlflow_runs(weak_run, store, registry, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    summary, _ = weak_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    # the weak model's detections on the training videos: round 1's pseudo labels
    _evaluate(f"runs:/{summary['mlflow_run_id']}/checkpoint/model.pt", store, tmp_path / "train-preds", subset="training")
    first = tmp_path / "train-preds" / "predictions.json"
    assert json.loads(first.read_text())["results"]
    with pytest.raises(UsageError, match="lower --pseudo-threshold"):
        train(_job(tmp_path, _write(tmp_path, Preset("tiny-af", "test", "synthetic", _tiny_actionformer(), OptimConfig(epochs=1, warmup_epochs=0),
                                                     2)), store, registry, pseudo_labels=str(first), pseudo_threshold=1.0))  # fmt: skip
    preset = Preset("tiny-af", "test", "synthetic", _tiny_actionformer(),
                    OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=1, epochs=5, ema_decay=0.7), 2)  # fmt: skip
    job = _job(tmp_path, _write(tmp_path, preset), store, registry, workers=1, run_name="selftrain", pseudo_labels=str(first),
               pseudo_threshold=0.2, rounds=2, register=False)  # fmt: skip
    result = train(job)
    client = MlflowClient(registry)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.params["rounds"] == "2" and parent.info.run_name == "selftrain"
    rounds = [client.get_run(r["mlflow_run_id"]) for r in result["rounds"]]
    assert [r.info.run_name for r in rounds] == ["selftrain-round1", "selftrain-round2"]
    for r in rounds:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.data.tags["supervision"] == "pseudo"
        assert int(r.data.params["pseudo_videos"]) > 0 and int(r.data.params["pseudo_segments"]) > 0
        assert np.isfinite(r.data.metrics[f"best_{SCORE}"])
    assert rounds[0].data.metrics[f"best_{SCORE}"] > 0.02  # round 1 learnt from the weak model's labels (untrained: < 0.01)
    assert rounds[1].data.tags["pseudo_labels"].endswith("pseudo_labels_round2.json")
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "round2")] == ["round2/pseudo_labels_round2.json"]
    history = client.get_metric_history(parent.info.run_id, "round_best_score")
    assert [m.step for m in history] == [1, 2]


@pytest.mark.timeout(600)
def test_zero_shot_is_validated_and_registered_without_training(store, registry, table, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    text = TextEncoderConfig(kind="table", weights=str(table))
    preset = Preset("tiny-zero-shot", "test", "synthetic", zero_shot_config(num_classes=K, input_dim=C, text=text), OptimConfig(), 1)
    summary = train(_job(tmp_path, _write(tmp_path, preset), store, registry, run_name="zs", register=True))
    assert summary["best_score"] > 0.2  # the names' embeddings are the classes' prototypes here
    client = MlflowClient(registry)
    assert [a.path for a in client.list_artifacts(summary["mlflow_run_id"], "checkpoint")] == ["checkpoint/model.pt"]
    with pytest.raises(UsageError, match="training-free"):
        train(_job(tmp_path, _write(tmp_path, preset), store, registry, workers=2, run_name="zs2"))


@pytest.mark.timeout(900)
def test_an_open_vocabulary_model_trains_on_seen_classes_and_serves_named_classes(store, table, tmp_path, ray_session):
    from ray import serve

    from jobs.serve import run_app
    from jobs.serve_config import ServeArgs
    from pipelines.store import FeatureStore
    from tal_models.checkpoint import load_checkpoint

    registry = f"sqlite:///{tmp_path}/mlflow.db"
    text = TextEncoderConfig(kind="table", weights=str(table))
    detector = open_vocab_config(_tiny_actionformer(), text=text, text_dim=C)
    preset = Preset(
        "tiny-open-vocab",
        "test",
        "synthetic",
        detector,
        OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=1, epochs=8, ema_decay=0.7),
        2,
    )
    summary = train(_job(tmp_path, _write(tmp_path, preset), store, registry, workers=2, run_name="ov"))
    assert summary["best_score"] > 0.2
    from jobs.tracking import resolve_model

    model = load_checkpoint(resolve_model("models:/tal-detector@champion", registry)).build("cpu").eval()  # what is served
    features = np.asarray(next(iter(FeatureStore(store[0]))).features[:80], np.float32)
    duration = float(SYNTHETIC_TIMING.step_to_seconds(len(features)))
    port = free_port()
    url = run_app(ServeArgs(model="models:/tal-detector@champion", mlflow_uri=registry, max_steps=300), "127.0.0.1", port)
    try:
        assert requests.get(url + "/v1/model", timeout=60).json()["open_vocabulary"] is True
        body = {"features": features.tolist(), "duration": duration}
        own = requests.post(url + "/v1/detect", json=body, timeout=120).json()
        assert {d["label"] for d in own["detections"]} <= set(SYNTHETIC_CLASSES) and own["detections"]
        named = requests.post(url + "/v1/detect", json={**body, "classes": ["run", "swim"]}, timeout=120)
        assert named.status_code == 200, named.text
        found = named.json()["detections"]
        assert {d["label"] for d in found} <= {"run", "swim"} and found
        # the same as the model in this process with those two names' embeddings
        import torch

        from pipelines.vlm import load_text_encoder

        emb = torch.as_tensor(load_text_encoder(text).encode(["run", "swim"]))
        expected = model.detect(features, SYNTHETIC_TIMING, duration, class_embeddings=emb).sorted_by_score()
        assert len(found) == len(expected)
        assert found[0]["score"] == pytest.approx(float(expected.scores[0]), abs=1e-5)
        for bad, code in ((["run", ""], "invalid_classes"), ([], "invalid_classes"), (["x"] * 2, "invalid_classes"),
                          ([f"c{i}" for i in range(201)], "invalid_classes"), (["a" * 101], "invalid_classes"),
                          (["unknown-name"], "invalid_classes")):  # fmt: skip
            r = requests.post(url + "/v1/detect", json={**body, "classes": bad}, timeout=60)
            assert r.status_code == 422 and r.json()["error"] == code, (bad, r.text)
    finally:
        serve.shutdown()
