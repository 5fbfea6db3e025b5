"""``tal train``: real local Ray Train (2 DDP workers over gloo), a real MLflow store, a real feature store."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import SYNTHETIC_CLASSES, SYNTHETIC_DIM, SYNTHETIC_TIMING
from helpers import synthetic_store as _dataset

import pipelines.store
from jobs.errors import UsageError
from jobs.report import SECTIONS
from jobs.tracking import resolve_model
from jobs.train import TrainJob, TrainPlan, VideoTargets, _epoch_batches, _read_shard, _Shard, _validate, plan, train
from pipelines.shard_reader import ShardReader
from pipelines.store import FeatureStore
from tal_models.checkpoint import load_checkpoint
from tal_models.config import dump_yaml
from tal_models.optim import OptimConfig
from tal_models.presets import Preset, make_config

C, K = SYNTHETIC_DIM, len(SYNTHETIC_CLASSES)
TIMING, CLASSES = SYNTHETIC_TIMING, SYNTHETIC_CLASSES


def _preset(root: Path, epochs: int = 4) -> Path:
    detector = make_config("temporalmaxer", num_classes=K, input_dim=C, max_seq_len=64, embed_dim=32, levels=4)
    preset = Preset(
        "tiny-temporalmaxer",
        "test",
        "synthetic",
        detector,
        OptimConfig(lr=5e-3, weight_decay=0.0, warmup_epochs=1, epochs=epochs, ema_decay=0.7),
        1,
    )
    path = root / "tiny.yaml"
    path.write_text(dump_yaml(preset))
    return path


@pytest.fixture
def job(tmp_path, ray_session):
    store, gt = _dataset(tmp_path)
    return TrainJob(
        config=str(_preset(tmp_path)),
        features=store,
        annotations=str(gt),
        out=str(tmp_path / "runs"),
        workers=2,
        mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db",
        run_name="tiny",
    )


def _run_and_metrics(job: TrainJob):
    from mlflow import MlflowClient

    summary = train(job)
    client = MlflowClient(job.mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    return summary, client, run


def test_two_workers_train_log_and_register_a_champion(job):
    summary, client, run = _run_and_metrics(job)
    assert run.info.status == "FINISHED"
    assert summary["best_score"] > 0.5, summary  # the synthetic actions are easy: a model that learnt scores well
    history = client.get_metric_history(run.info.run_id, "val_average_mAP")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]  # once per epoch
    assert run.data.params["detector.arch"] == "temporalmaxer" and run.data.params["workers"] == "2"
    assert run.data.tags["features.backbone"] == "synthetic"
    validation = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "validation")}
    assert validation == {"val_predictions.json", "precision_recall.png", "metrics.json", "report.html"}
    report = Path(client.download_artifacts(run.info.run_id, "validation/report.html", str(job.out)))
    text = report.read_text()
    assert all(f'id="{section}"' in text for section in SECTIONS) and "differs from metrics.json" not in text
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "config")} == {"preset.yaml"}
    version = client.get_model_version_by_alias("tal-detector", "champion")
    assert version.run_id == run.info.run_id
    assert summary["registration"]["promoted"]

    checkpoint = load_checkpoint(resolve_model("models:/tal-detector@champion", job.mlflow_uri))
    assert checkpoint.labels == CLASSES and checkpoint.provenance["backbone"] == "synthetic"
    assert checkpoint.metadata["val_average_mAP"] == pytest.approx(summary["best_score"])


def test_a_store_of_another_width_is_refused_before_any_worker_starts(tmp_path):
    store, gt = _dataset(tmp_path, videos=4, dim=8)
    job = TrainJob(config=str(_preset(tmp_path)), features=store, annotations=str(gt), out=str(tmp_path / "runs"))
    with pytest.raises(UsageError, match=r"holds 8-dim features \(synthetic\) but .* expects 16"):
        plan(job)


def test_plan_names_unknown_subsets_and_bad_overrides(tmp_path):
    store, gt = _dataset(tmp_path, videos=4)
    base = TrainJob(config=str(_preset(tmp_path)), features=store, annotations=str(gt))
    with pytest.raises(ValueError, match="subset"):
        plan(TrainJob(**{**base.__dict__, "train_subset": "train", "val_subset": "nope"}))
    with pytest.raises(UsageError, match="no such key"):
        plan(TrainJob(**{**base.__dict__, "overrides": ("optim.learning_rate=1",)}))
    planned = plan(TrainJob(**{**base.__dict__, "overrides": ("optim.lr=0.01", "detector.loss.label_smoothing=0.1")}))
    assert planned.optim.lr == 0.01 and planned.detector.loss.label_smoothing == 0.1
    assert list(planned.labels) == CLASSES and planned.train_subset == "training"


def test_plan_is_a_typed_train_plan_of_the_job(tmp_path):
    """What the driver hands every worker: typed configs, the store's provenance, per-video targets in seconds and steps."""
    import pickle

    from tal_models.config import config_from_dict, config_to_dict
    from tal_models.detectors import DetectorConfig

    store, gt = _dataset(tmp_path, videos=6)
    job = TrainJob(config=str(_preset(tmp_path, epochs=3)), features=store, annotations=str(gt), batch_size=2, seed=7, val_every=2)
    planned = plan(job)
    assert isinstance(planned, TrainPlan)
    assert isinstance(planned.detector, DetectorConfig) and planned.detector.num_classes == K and planned.detector.input_dim == C
    # the workers used to rebuild the config from its dict form: the typed one is the same config
    assert config_from_dict(DetectorConfig, config_to_dict(planned.detector)) == planned.detector
    assert isinstance(planned.optim, OptimConfig) and planned.optim.epochs == 3 and planned.optim.warmup_epochs == 1
    assert (planned.preset, planned.batch_size, planned.seed, planned.val_every) == ("tiny-temporalmaxer", 2, 7, 2)
    assert planned.stop_after is None and planned.amp
    assert planned.labels == tuple(CLASSES) and planned.provenance == FeatureStore(store).provenance
    assert planned.features == FeatureStore(store).uri and planned.storage_options == {}
    assert (planned.train_subset, planned.val_subset, planned.missing_videos) == ("training", "validation", ())
    assert sorted(planned.train) == [f"vid{i:02d}" for i in range(4)] and sorted(planned.val) == ["vid04", "vid05"]
    assert len(planned.validation_key) == 16
    truth = json.loads(gt.read_text())["database"]
    for vid, targets in {**planned.train, **planned.val}.items():
        assert isinstance(targets, VideoTargets)
        annotated = truth[vid]["annotations"]
        np.testing.assert_allclose(targets.segments_s, [a["segment"] for a in annotated])
        np.testing.assert_allclose(TIMING.step_to_seconds(targets.segments), targets.segments_s)  # steps of the store's timing
        assert targets.segments.shape == (len(annotated), 2) and targets.segments.dtype == np.float64
        assert targets.labels.tolist() == [CLASSES.index(a["label"]) for a in annotated] and targets.labels.dtype == np.int64
        assert targets.duration == truth[vid]["duration"]
    again = pickle.loads(pickle.dumps(planned))  # Ray pickles it into the workers
    assert again.detector == planned.detector and sorted(again.train) == sorted(planned.train)


def test_a_failing_worker_s_traceback_reaches_the_driver(tmp_path, ray_session):
    """Workers' own output stays in Ray's log files: what went wrong in one must still be readable where train() was called."""
    store, gt = _dataset(tmp_path, videos=6)
    for part in Path(store).glob("*.parquet"):  # the manifests (what plan() reads) stay; the features cannot be read
        part.write_bytes(b"not parquet")
    job = TrainJob(config=str(_preset(tmp_path)), features=store, annotations=str(gt), out=str(tmp_path / "runs"), max_failures=0,
                   mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", run_name="broken", register=False)  # fmt: skip
    with pytest.raises(Exception, match="Training failed") as failed:
        train(job)
    message = str(failed.value)
    assert "Traceback" in message and "_read_shard" in message and "Parquet magic bytes not found" in message, message


def _train_worker_pids() -> list[int]:
    """PIDs of the Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"RayTrainWorker" in cmdline:
                pids.append(int(proc.name))
    return sorted(pids)


def test_a_killed_worker_costs_one_restart_and_no_duplicate_metrics(job):
    """SIGKILL one training worker once the first checkpoint exists: the run restarts from it
    and finishes; every epoch's metrics are logged exactly once; the run ends FINISHED."""
    job = TrainJob(**{**job.__dict__, "run_name": "killed", "max_failures": 2, "register": False})
    killed: list[int] = []

    def killer():
        run_dir = Path(job.out) / "killed"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if any(p.is_dir() for p in run_dir.glob("checkpoint_*")):
                workers = _train_worker_pids()
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)
                    killed.append(workers[-1])
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary, client, run = _run_and_metrics(job)
    thread.join(timeout=5)
    assert killed, "the test never found a training worker to kill"
    assert run.info.status == "FINISHED"
    for key in ("val_average_mAP", "train_final_loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3], (key, steps)


def test_a_stopped_run_resumes_to_the_same_final_state(job):
    """4 epochs in one go == 2 epochs, stop, --resume for the other 2: same weights, same MLflow run, one value per epoch."""
    import torch
    from mlflow import MlflowClient

    def final_weights(run_name):
        folder = Path(job.out) / run_name
        latest = max(
            (p for p in folder.glob("checkpoint_*") if p.is_dir()), key=lambda p: load_checkpoint(p / "model.pt").metadata["epoch"]
        )
        return load_checkpoint(latest / "model.pt")

    straight = train(TrainJob(**{**job.__dict__, "run_name": "straight", "register": False}))
    stopped = train(TrainJob(**{**job.__dict__, "run_name": "stopped", "stop_after": 2, "register": False}))
    with pytest.raises(UsageError, match="no run of that name"):
        train(TrainJob(**{**job.__dict__, "run_name": None, "resume": "never-ran"}))
    resumed = train(TrainJob(**{**job.__dict__, "run_name": None, "resume": "stopped", "register": False}))
    assert resumed["mlflow_run_id"] == stopped["mlflow_run_id"] != straight["mlflow_run_id"]
    a, b = final_weights("straight"), final_weights("stopped")
    assert a.metadata["epoch"] == b.metadata["epoch"] == 3
    for key, value in a.state_dict.items():
        torch.testing.assert_close(b.state_dict[key], value, rtol=1e-5, atol=1e-6, msg=key)
    history = MlflowClient(job.mlflow_uri).get_metric_history(stopped["mlflow_run_id"], "val_average_mAP")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]


def test_a_streamed_shard_gives_the_batches_and_detections_of_the_in_memory_shard(tmp_path, monkeypatch):
    """The same seed, the same batches bit for bit: a shard read whole (as training did) vs streamed one video per row
    group through a cache of three videos, over two epochs of random crops (96-step videos, crops of 64), then validation."""
    import torch

    from tal_models.detectors import build_detector

    monkeypatch.setattr(pipelines.store, "ROW_GROUP_TARGET_BYTES", 1)  # one video per row group
    store_uri, gt = _dataset(tmp_path)
    planned = plan(TrainJob(config=str(_preset(tmp_path)), features=store_uri, annotations=str(gt), batch_size=3))
    video_bytes = 96 * C * 4
    planned = TrainPlan(**{**planned.__dict__, "cache_bytes": 3 * video_bytes})
    rank, world = 1, 2
    streamed = _read_shard(planned, rank, world)
    assert isinstance(streamed.sequences, ShardReader) and not streamed.sequences.resident
    store = FeatureStore(store_uri)
    in_memory = _Shard(streamed.train_ids, streamed.val_ids, store.read_videos(streamed.train_ids + streamed.val_ids))
    torch.manual_seed(0)
    model = build_detector(planned.detector)
    iterations = math.ceil(len(planned.train) / (world * planned.batch_size))
    for epoch in range(2):
        batches = [
            list(_epoch_batches(planned, shard, np.random.default_rng([planned.seed, rank, epoch]), iterations, model.pad_multiple))
            for shard in (in_memory, streamed)
        ]
        assert len(batches[0]) == len(batches[1]) == iterations
        for a, b in zip(*batches):
            assert a.video_ids == b.video_ids
            assert torch.equal(a.features, b.features) and torch.equal(a.mask, b.mask)
            assert all(torch.equal(x, y) for x, y in zip(a.segments + a.labels, b.segments + b.labels, strict=True))
    stats = streamed.sequences.stats
    assert stats.evictions > 0 and stats.peak_cached_bytes <= 3 * video_bytes
    few = [dataclasses.replace(shard, val_ids=shard.val_ids[:2]) for shard in (in_memory, streamed)]  # an untrained model: slow NMS
    scores = [_validate(model, shard, planned, 0, 1, "cpu") for shard in few]
    assert scores[0][0] == scores[1][0]
    for vid, det in scores[0][1].items():
        other = scores[1][1][vid]
        assert np.array_equal(det.segments.data, other.segments.data) and np.array_equal(det.scores, other.scores)
    streamed.sequences.close()


def test_training_streams_a_shard_larger_than_its_cache(tmp_path, ray_session, monkeypatch):
    """``tal train --cache-gb`` far below the shard: two workers stream their shards, train and validate; the settings
    are MLflow params and the reading shows in the metrics."""
    monkeypatch.setattr(pipelines.store, "ROW_GROUP_TARGET_BYTES", 1)
    store, gt = _dataset(tmp_path)
    cache_gb = 3 * 96 * C * 4 / 2**30  # three videos of the 12 in each shard
    job = TrainJob(config=str(_preset(tmp_path, epochs=2)), features=store, annotations=str(gt), out=str(tmp_path / "runs"), workers=2,
                   mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", run_name="streamed", register=False, cache_gb=cache_gb)  # fmt: skip
    summary, client, run = _run_and_metrics(job)
    assert run.info.status == "FINISHED" and summary["best_score"] > 0
    assert run.data.params["cache_gb"] == str(cache_gb) and run.data.params["cache_dir"] == "none"
    assert run.data.metrics["shard_streaming"] == 1.0
    assert run.data.metrics["shard_read_mb"] > 12 * 96 * C * 4 / 2**20  # more than its shard once: it was read again
