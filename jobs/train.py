"""``tal train``: a detector on a feature store, with Ray Train (DDP) and MLflow.

    tal train --config thumos14-actionformer --features STORE --annotations FILE [--workers 2] [--epochs E]

The driver (``train``) checks everything it can before any worker starts: the preset, the
store's provenance and feature width against the detector, the labels, the split. It then opens
one MLflow run and starts ``TorchTrainer``; each worker (``train_loop_per_worker``) reads only its
shard of the store through ``pipelines.shard_reader.ShardReader``: a shard that fits the worker's
cache budget (``--cache-gb``) is read once and kept (a detector needs whole sequences, cropped
anew every epoch); a larger one is streamed by row group through an LRU cache of that size, read
ahead in the epoch's order, with the same batches bit for bit. It trains with the single-process
utilities of ``tal_models.training`` inside DDP, validates its share of the validation videos,
and rank 0 gathers the detections, evaluates once, logs the epoch to MLflow, reports a checkpoint
to Ray Train and sends its progress line to the driver, which prints it (workers' own output
stays in Ray's log files: ``pipelines.ray_runtime``). The driver finally logs the best checkpoint
as an artifact and registers it (``jobs.tracking``).

Fault tolerance: every epoch ends with a checkpoint (weights, optimiser, schedule, EMA, loss
normaliser, epoch); a dead worker restarts the group from the last one (``--max-failures``). A
stopped run resumes with ``--resume RUN_NAME``: the same Ray Train run folder (its checkpoint
snapshot) and the same MLflow run. Randomness is re-seeded from (seed, rank, epoch) at every
epoch, so a resumed run follows the same path as an uninterrupted one. Metrics are logged once
per epoch: an epoch re-run after a failure does not log twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs import tracking
from jobs.errors import UsageError
from jobs.plots import plot_detection_metrics
from pipelines.annotations import read_activitynet_results, read_annotations, write_activitynet_results, write_video_classification
from pipelines.ray_runtime import DriverConsole, init_ray
from pipelines.shard_reader import ShardReader, default_cache_bytes
from pipelines.store import FeatureSequence, FeatureStore, Provenance, StoreError
from tal_models.batch import Batch, collate, random_crop
from tal_models.cam import sample_video
from tal_models.checkpoint import Checkpoint, save_checkpoint
from tal_models.config import apply_overrides, config_to_dict, dump_yaml
from tal_models.detectors import Detector, DetectorConfig, build_detector
from tal_models.evaluation import evaluate_classification, evaluate_dense
from tal_models.evaluation.detection import THUMOS14_TIOU, evaluate_detection
from tal_models.optim import ModelEMA, OptimConfig, build_optimizer, build_scheduler
from tal_models.presets import Preset, load_preset, preset_from_dict
from tal_models.structures import AnnotationSet, Detections, LabelMap, Segments, VideoAnnotation
from tal_models.training import EpochTiming, train_one_epoch

# Ray Train V2's controller polls slowly by default: ~20 s of fixed cost per fit on a small run (STACK_NOTES)
_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}
SCORE = "val_average_mAP"  # what picks and registers the best checkpoint of a detector
DENSE_SCORE = "val_frame_mAP"  # ... of a dense (per-step, multi-label) detector: the per-frame mAP
CLASSIFICATION_SCORE = "val_classification_mAP"  # ... of a video-level classifier: ActivityNet's classification mAP
CLASSIFICATION_FILE = "val_classification.json"  # a classifier's validation scores, in ActivityNet's classification JSON
AGNOSTIC_LABEL = "action"  # the one class of a class-agnostic model (Preset.class_agnostic)


def score_key(detector) -> str:
    """The validation metric that ranks checkpoints of this detector config."""
    return {"dense": DENSE_SCORE, "classification": CLASSIFICATION_SCORE}.get(detector.task, SCORE)


def registered_name(detector) -> str:
    """The MLflow registered model a trained model joins: classifiers have their own, since detectors are fused with one."""
    return tracking.CLASSIFIER_MODEL if detector.task == "classification" else tracking.DETECTOR_MODEL


@dataclass(frozen=True)
class TrainJob:
    """What ``tal train`` was asked to do (the CLI builds it; tests build it directly)."""

    config: str  # preset name or YAML path
    features: str  # feature store URI
    annotations: str
    out: str = "out/train"  # Ray Train run folders (local path or s3://)
    workers: int = 1
    gpus_per_worker: float = 0.0
    epochs: int | None = None  # None: the preset's
    batch_size: int | None = None  # per worker; None: the preset's
    run_name: str | None = None
    resume: str | None = None  # a run name under `out`
    overrides: tuple[str, ...] = ()  # "detector.loss.label_smoothing=0.1"
    train_subset: str | None = None  # None: by the annotation format (THUMOS: Validation, ActivityNet: training)
    val_subset: str | None = None  # None: THUMOS: Test, ActivityNet: validation
    val_every: int = 1
    keep_best: int = 2
    max_failures: int = 1
    seed: int = 0
    mlflow_uri: str | None = None
    experiment: str = "tal"
    register: bool = True
    amp: bool = True  # bf16 autocast on GPU
    stop_after: int | None = None  # stop once this many epochs are done (a time-boxed job); --resume continues
    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_gb: float | None = None  # per worker: decoded features kept in memory; None: shard_reader.default_cache_bytes
    cache_dir: str | None = None  # local disk cache of an S3 store's part files (shard_reader.PartFileCache)
    supervision: str = "full"  # "video": the training subset weakened to video-level labels (AnnotationSet.video_level)
    pseudo_labels: str | None = None  # a results JSON: its confident detections replace the training subset's ground truth
    pseudo_threshold: float = 0.3  # ... kept when scored at least this
    pseudo_top_k: int = 10  # ... at most this many per class and video
    rounds: int = 1  # self-training rounds (jobs.self_train): each round's model labels the next round's training videos
    parent_run_id: str | None = None  # the MLflow run this one belongs to (a self-training round's parent)


@dataclass(frozen=True, eq=False)
class VideoTargets:
    """One annotated video as training and validation use it (N ground-truth segments)."""

    segments_s: np.ndarray  # [N, 2] float64, seconds (validation scores detections against these)
    segments: np.ndarray  # [N, 2] float64, fractional feature steps (the training targets)
    labels: np.ndarray  # [N] int64, model classes 0..K-1
    duration: float | None  # seconds, as annotated (None: the store's)


@dataclass(frozen=True)
class TrainPlan:
    """Everything the workers need, checked on the driver by ``plan``; Ray pickles it into each worker."""

    preset: str
    detector: DetectorConfig  # num_classes set from the annotations
    optim: OptimConfig  # epochs and warm-up as this job runs them
    batch_size: int  # videos per worker and step
    labels: tuple[str, ...]  # class names, in model class order ((AGNOSTIC_LABEL,) for a class-agnostic model)
    provenance: Provenance  # of the feature store
    features: str  # store URI, absolute for a local store: workers run elsewhere
    storage_options: dict[str, Any]
    train: dict[str, VideoTargets]  # video id -> targets, every video with features in the training subset
    val: dict[str, VideoTargets]
    train_subset: str
    val_subset: str
    missing_videos: tuple[str, ...]  # annotated in either subset but without features (skipped)
    validation_key: str  # identifies the validation set (see _validation_key)
    val_every: int
    seed: int
    amp: bool
    stop_after: int | None
    cache_bytes: int | None = None  # per worker; None: shard_reader.default_cache_bytes(workers on the machine)
    cache_dir: str | None = None
    class_agnostic: bool = False  # every ground-truth label was mapped to AGNOSTIC_LABEL
    supervision: str = "full"  # of the training subset: "full", "video" (video-level labels) or "pseudo" (pseudo labels)
    class_embeddings: np.ndarray | None = None  # [K, E] text embeddings of the classes: a text-headed (open-vocabulary) model
    pseudo_stats: dict[str, Any] | None = None  # how many pseudo labels and videos (--pseudo-labels)


# --- the driver ------------------------------------------------------------------------------
def effective_preset(
    config: str, overrides: tuple[str, ...] | list[str] = (), epochs: int | None = None, batch_size: int | None = None
) -> Preset:
    """The preset as a job trains it: ``config`` (a name or a YAML path) with ``--set`` overrides, ``--epochs``
    (the warm-up shortened to fit) and ``--batch-size`` applied; ``UsageError`` naming what to fix.
    (``num_classes`` is the annotations' and is set by ``plan``.)"""
    try:
        preset = load_preset(config)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--config: {exc}") from None
    preset = _apply_overrides(preset, overrides)
    epochs = epochs or preset.optim.epochs
    optim = replace(preset.optim, epochs=epochs, warmup_epochs=min(preset.optim.warmup_epochs, max(epochs - 1, 0)))
    return replace(preset, optim=optim, batch_size=batch_size or preset.batch_size)


def plan(job: TrainJob) -> TrainPlan:
    """Everything the workers need, checked on the driver: raises ``UsageError`` with what to fix."""
    preset = effective_preset(job.config, job.overrides, job.epochs, job.batch_size)
    if job.cache_gb is not None and not job.cache_gb > 0:
        raise UsageError(f"--cache-gb must be > 0, got {job.cache_gb}")
    annotations = read_annotations(job.annotations)
    _check_supervision(job, preset.detector)
    if preset.class_agnostic:
        annotations = annotations.class_agnostic(AGNOSTIC_LABEL)
    store = FeatureStore(job.features, options=job.storage_options or None)
    try:
        provenance = store.provenance
        done = set(store.status().done)
    except StoreError as exc:
        raise UsageError(f"--features: {exc}") from None
    detector = replace(preset.detector, num_classes=len(annotations.label_map))
    if provenance.feature_dim != detector.input_dim:
        raise UsageError(
            f"the store {job.features} holds {provenance.feature_dim}-dim features ({provenance.backbone}) but {job.config} "
            f"expects {detector.input_dim}: use a preset for this backbone, or --set detector.encoder.input_dim={provenance.feature_dim}"
        )
    train_subset, val_subset = _subsets(annotations, job.train_subset, job.val_subset)
    train_set = annotations.subset(train_subset)
    val_set = annotations.subset(val_subset)
    pseudo_stats = None
    if job.pseudo_labels:
        train_set, pseudo_stats = pseudo_annotations(train_set, job)
    elif job.supervision == "video":
        train_set = train_set.video_level()
    missing = sorted(v for v in list(train_set.videos) + list(val_set.videos) if v not in done)
    train_ids = sorted(v for v in train_set.videos if v in done)  # pseudo labels: only the videos that have some
    val_ids = sorted(v for v in val_set.videos if v in done)
    if not train_ids:
        raise UsageError(f"none of the {len(train_set)} {train_subset!r} videos of {job.annotations} has features in {job.features}")
    if job.workers > len(train_ids):
        raise UsageError(
            f"--workers {job.workers} but only {len(train_ids)} training videos have features: every worker needs at least one"
        )
    if not val_ids:
        raise UsageError(f"none of the {len(val_set)} {val_subset!r} videos of {job.annotations} has features in {job.features}")
    ids = annotations.label_map.ids
    model_class = {cid: i for i, cid in enumerate(ids)}  # annotation label id -> model class 0..K-1

    def targets(vid: str) -> VideoTargets:
        v = train_set[vid] if vid in train_set else annotations[vid]
        seconds = np.asarray(v.segments.data, dtype=np.float64).reshape(-1, 2)
        return VideoTargets(
            segments_s=seconds,
            segments=np.asarray(provenance.timing.seconds_to_step(seconds), np.float64),
            labels=np.array([model_class[int(k)] for k in v.labels], np.int64),
            duration=v.duration,
        )

    return TrainPlan(
        preset=preset.name,
        detector=detector,
        optim=preset.optim,
        batch_size=preset.batch_size,
        labels=tuple(annotations.label_map.names),
        provenance=provenance,
        features=store.uri,
        storage_options=job.storage_options,
        train={vid: targets(vid) for vid in train_ids},
        val={vid: targets(vid) for vid in val_ids},
        train_subset=train_subset,
        val_subset=val_subset,
        missing_videos=tuple(missing),
        validation_key=_validation_key(val_ids, annotations),
        val_every=job.val_every,
        seed=job.seed,
        amp=job.amp,
        stop_after=job.stop_after,
        cache_bytes=max(int(job.cache_gb * 2**30), 1) if job.cache_gb is not None else None,
        cache_dir=job.cache_dir,
        class_agnostic=preset.class_agnostic,
        supervision="pseudo" if job.pseudo_labels else job.supervision,
        class_embeddings=_class_embeddings(detector, annotations.label_map.names, job.storage_options),
        pseudo_stats=pseudo_stats,
    )


def _check_supervision(job: TrainJob, detector) -> None:
    """What the flags of weak and pseudo-label training allow, checked before anything is read."""
    if job.supervision not in ("full", "video"):
        raise UsageError(f"--supervision must be full or video, got {job.supervision!r}")
    if job.supervision == "video" and detector.family not in ("weak", "video_classifier"):
        raise UsageError(
            f"--supervision video: a {detector.family} detector needs start and end times; train a weakly supervised preset "
            "(e.g. thumos14-weak) on video-level labels, then its pseudo labels with --pseudo-labels"
        )
    if job.pseudo_labels and job.supervision == "video":
        raise UsageError("--pseudo-labels replaces the training ground truth: it cannot be combined with --supervision video")
    if not 0.0 <= job.pseudo_threshold <= 1.0 or job.pseudo_top_k < 1 or job.rounds < 1:
        raise UsageError("--pseudo-threshold must lie in [0, 1], --pseudo-top-k and --rounds must be >= 1")
    if job.rounds > 1 and not job.pseudo_labels:
        raise UsageError("--rounds needs --pseudo-labels (the first round's labels)")
    if detector.family == "zero_shot" and (job.workers > 1 or job.resume):
        raise UsageError("a zero_shot preset is training-free: it is validated and registered without workers or epochs")


def pseudo_annotations(train_set: AnnotationSet, job: TrainJob) -> tuple[AnnotationSet, dict[str, Any]]:
    """The training subset with its ground truth replaced by the confident detections of ``job.pseudo_labels``
    (``tal_models.pseudo.select_pseudo_labels``); videos without any confident detection are left out."""
    from tal_models.pseudo import select_pseudo_labels

    try:
        predictions = read_activitynet_results(job.pseudo_labels, train_set.label_map)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--pseudo-labels: {exc}") from None
    found = {train_set.resolve(v): d for v, d in predictions.detections.items() if v in train_set}
    kept = select_pseudo_labels(found, threshold=job.pseudo_threshold, top_k=job.pseudo_top_k)
    videos = {
        vid: replace(train_set[vid], segments=Segments(np.asarray(d.segments.data, np.float64).reshape(-1, 2)), labels=d.labels)
        for vid, d in kept.items()
        if len(d)
    }
    if not videos:
        raise UsageError(
            f"--pseudo-labels {job.pseudo_labels}: no detection of a training video scores >= {job.pseudo_threshold} "
            f"({len(found)} of {len(train_set)} training videos have predictions): lower --pseudo-threshold"
        )
    stats = {"videos": len(videos), "segments": sum(len(v) for v in videos.values()), "videos_without": len(train_set) - len(videos),
             "unknown_labels": sum(predictions.unknown_labels.values())}  # fmt: skip
    return replace(train_set, videos=videos, supervision="pseudo"), stats


def _class_embeddings(detector, names: list[str], storage_options: Mapping[str, Any]) -> np.ndarray | None:
    """The text embeddings of the training classes for a text-headed or training-free model (``pipelines.vlm``)."""
    head = getattr(detector, "head", None)
    if getattr(head, "classifier", "linear") != "text" and detector.family != "zero_shot":
        return None
    from pipelines.vlm import load_text_encoder

    try:
        return np.asarray(load_text_encoder(detector.text, storage_options or None).encode(list(names)), np.float32)
    except (OSError, ValueError) as exc:
        raise UsageError(f"the text encoder of the preset ({detector.text.kind}): {exc}") from None


def _apply_overrides(preset, overrides):
    """``preset`` with ``--set key=value`` applied (values parsed as YAML), revalidated."""
    if not overrides:
        return preset
    data = config_to_dict(preset)
    try:
        apply_overrides(data, overrides, example="optim.lr=3e-4")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        return preset_from_dict(data, where="--set")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _subsets(annotations, train: str | None, val: str | None) -> tuple[str, str]:
    names = {s.lower(): s for s in annotations.subsets}
    if train and val:
        return train, val
    pairs = (("training", "validation"), ("train", "validation"), ("train", "val"), ("validation", "test"), ("train", "test"))
    for default_train, default_val in pairs:  # ActivityNet, ours/synthetic, ..., THUMOS14 (trains on Validation)
        if default_train in names and default_val in names:
            return train or names[default_train], val or names[default_val]
    raise UsageError(
        f"cannot tell the training and validation subsets of {annotations.source or 'the annotations'} "
        f"(it has {annotations.subsets or 'none'}): give --train-subset and --val-subset"
    )


def _validation_key(val_ids: list[str], annotations) -> str:
    """Identifies the validation set (videos and their ground truth): a champion is only replaced
    by a model scored on the same set."""
    h = hashlib.sha256()
    for vid in val_ids:
        v = annotations[vid]
        h.update(vid.encode())
        h.update(np.asarray(v.segments.data, dtype=np.float64).tobytes())
        h.update(np.asarray(v.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def train(job: TrainJob) -> dict[str, Any]:
    """Run ``job``; returns a summary (run name, MLflow run id, best score, registration). Several ``rounds`` of
    pseudo-label self-training go through ``jobs.self_train``, each round a run of its own."""
    if job.rounds > 1:
        from jobs.self_train import self_train

        return self_train(job)
    return train_round(job)


def train_round(job: TrainJob) -> dict[str, Any]:
    """One training run (``train``'s body)."""
    given = {k for k in _RAY_TRAIN_ENV if k in os.environ}  # e.g. by a Ray job's runtime_env: left as they are
    for key, value in _RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    started = time.perf_counter()
    planned = plan(job)
    epochs = planned.optim.epochs
    out = _storage_path(job.out)
    key = score_key(planned.detector)
    run_name = job.resume or job.run_name or f"{planned.preset}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    state_file = Path(out) / run_name / "tal_run.json" if "://" not in out else None
    uri = tracking.tracking_uri(job.mlflow_uri)
    mlflow_run_id = None
    if job.resume:
        if state_file is None or not state_file.exists():
            raise UsageError(f"--resume {job.resume}: no run of that name under {out} (its tal_run.json is missing)")
        mlflow_run_id = json.loads(state_file.read_text())["mlflow_run_id"]
    elif (Path(out) / run_name).exists():
        raise UsageError(f"a run named {run_name!r} already exists under {out}: choose another --run-name, or --resume it")
    print(
        f"tal train: {planned.preset} on {len(planned.train)} {planned.train_subset} videos, validating on {len(planned.val)} "
        f"{planned.val_subset} videos; {job.workers} worker(s); run {run_name!r}"
        + (f"; {len(planned.missing_videos)} annotated videos have no features (skipped)" if planned.missing_videos else "")
    )
    tags = {
        "git_commit": tracking.git_commit() or "unknown",
        "preset": planned.preset,
        **{f"features.{k}": str(v) for k, v in planned.provenance.to_dict().items() if k != "extract_config"},
        "features.uri": job.features,
        "validation_key": planned.validation_key,
        "supervision": planned.supervision,
        **({"mlflow.parentRunId": job.parent_run_id} if job.parent_run_id else {}),  # shown nested under the parent in MLflow
        **({"pseudo_labels": str(job.pseudo_labels)} if job.pseudo_labels else {}),
    }
    with tracking.TrainingRun(uri, job.experiment, run_name, tags=tags, run_id=mlflow_run_id) as run:
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps({"mlflow_run_id": run.run_id, "job": asdict(job)}, indent=1))
        run.log_params({"preset": planned.preset, "detector": config_to_dict(planned.detector), "optim": config_to_dict(planned.optim),
                        "batch_size": planned.batch_size, "workers": job.workers, "seed": job.seed})  # fmt: skip
        _log_cache_params(run, job)
        if planned.pseudo_stats is not None:
            run.log_params({"pseudo_threshold": job.pseudo_threshold, "pseudo_top_k": job.pseudo_top_k,
                            **{f"pseudo_{k}": v for k, v in planned.pseudo_stats.items()}})  # fmt: skip
        if planned.detector.family == "zero_shot":
            return _training_free(job, planned, run, key, run_name, uri, started)
        if job.stop_after:
            run.set_tags({"tal.stopped_after_epoch": str(job.stop_after)})
        # keys the environment (e.g. a Ray job's runtime_env) already sets are left to it: Ray refuses to merge conflicting ones
        env = {k: v for k, v in _RAY_TRAIN_ENV.items() if k not in given}
        init_ray(runtime_env={"env_vars": env} if env else None)
        console = DriverConsole()  # the workers' output stays in Ray's logs: rank 0 sends its progress lines here
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"plan": planned, "mlflow_uri": uri, "mlflow_run_id": run.run_id, "console": console},
            scaling_config=ScalingConfig(
                num_workers=job.workers,
                use_gpu=job.gpus_per_worker > 0,
                resources_per_worker={"CPU": 1, **({"GPU": job.gpus_per_worker} if job.gpus_per_worker > 0 else {})},
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=out,
                checkpoint_config=CheckpointConfig(
                    num_to_keep=max(job.keep_best, 1), checkpoint_score_attribute=key, checkpoint_score_order="max"
                ),  # fmt: skip
                failure_config=FailureConfig(max_failures=job.max_failures),
                logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's INFO lines only in its log files
            ),
        )
        fit_started = time.time()
        with console.printing():
            result = trainer.fit()
        best = _best_checkpoint(result, key)
        summary: dict[str, Any] = {
            "run_name": run_name,
            "mlflow_run_id": run.run_id,
            "fit_started_unix": fit_started,
            "fit_seconds": time.time() - fit_started,
            "wall_s": round(time.perf_counter() - started, 1),
        }
        if best is None:
            raise RuntimeError("training finished without a checkpoint")
        checkpoint, score = best
        with checkpoint.as_directory() as directory:
            run.log_artifact(str(Path(directory) / "model.pt"), "checkpoint")
            if (Path(directory) / CLASSIFICATION_FILE).exists():
                run.log_artifact(str(Path(directory) / CLASSIFICATION_FILE), "validation")
            _log_validation_artifacts(run, Path(directory) / "val_predictions.json", job, planned)
        run.log_text(_preset_yaml(job), "config/preset.yaml")
        summary["best_score"] = score
        run.log_metrics({f"best_{key}": score}, step=0)
        stopped = job.stop_after is not None and job.stop_after < epochs
        if stopped:
            print(f"stopped after epoch {job.stop_after} of {epochs}: continue with --resume {run_name}")
        elif job.register:
            summary["registration"] = _register(uri, run.run_id, score, planned, key)
    print(f"done in {summary['wall_s']:.0f} s: best {key} {score:.4f}; MLflow run {summary['mlflow_run_id']} ({uri})")
    return summary


def _training_free(job: TrainJob, planned: TrainPlan, run, key: str, run_name: str, uri: str, started: float) -> dict[str, Any]:
    """A training-free preset (``zero_shot``): no workers, no epochs. The model (the class names' text embeddings and
    the inference settings) is validated on the driver as a trained one would be, logged and registered alike."""
    torch.manual_seed(planned.seed)
    model = build_detector(planned.detector)
    model.set_class_embeddings(torch.as_tensor(planned.class_embeddings))
    store = FeatureStore(planned.features, options=planned.storage_options or None)
    val_ids = sorted(planned.val)
    print(f"{planned.detector.arch} is training-free: validating on {len(val_ids)} videos")
    scores, predictions = _validate(model, _Shard([], val_ids, store.read_videos(val_ids)), planned, 0, 1, "cpu")
    score = scores[key]
    run.log_metrics({**scores, f"best_{key}": score}, step=0)
    out = _storage_path(job.out)
    directory = Path(out) / run_name if "://" not in out else Path(tempfile.mkdtemp(prefix="tal-training-free-"))
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"epoch": 0, "preset": planned.preset, "class_agnostic": planned.class_agnostic, "training_free": True, **_scalars(scores)}
    save_checkpoint(Checkpoint.from_model(model, planned.labels, planned.provenance.to_dict(), meta), directory / "model.pt")
    write_activitynet_results(directory / "val_predictions.json", predictions.values(), LabelMap.from_names(planned.labels))
    run.log_artifact(str(directory / "model.pt"), "checkpoint")
    _log_validation_artifacts(run, directory / "val_predictions.json", job, planned)
    run.log_text(_preset_yaml(job), "config/preset.yaml")
    summary: dict[str, Any] = {"run_name": run_name, "mlflow_run_id": run.run_id, "best_score": score}
    if job.register:
        summary["registration"] = _register(uri, run.run_id, score, planned, key)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"done in {summary['wall_s']:.0f} s: {key} {score:.4f}; MLflow run {run.run_id} ({uri})")
    return summary


def _register(uri: str, run_id: str, score: float, planned: TrainPlan, key: str) -> dict[str, Any]:
    """Register the run's ``checkpoint/model.pt`` (the champion alias moves only if it beats the champion on the same
    validation set); prints and returns what happened."""
    name = registered_name(planned.detector)
    registration = tracking.register_checkpoint(uri, run_id, "checkpoint/model.pt", score, planned.validation_key, model_name=name,
                                                metric_name=key)  # fmt: skip
    print(f"registered {name} version {registration.version}: {registration.reason}")
    return asdict(registration)


def _log_cache_params(run, job: TrainJob) -> None:
    """The cache settings as params. They do not change what is trained, so a run may be resumed with others
    (another machine): those are then tagged rather than refused as a changed config."""
    params = {"cache_gb": job.cache_gb if job.cache_gb is not None else "default", "cache_dir": job.cache_dir or "none"}
    try:
        run.log_params(params)
    except tracking.ParamConflictError:
        run.set_tags({f"tal.resumed_{k}": str(v) for k, v in params.items()})


def _preset_yaml(job: TrainJob) -> str:
    """The preset as trained (overrides, epochs and batch size applied), for the run's artifacts."""
    return dump_yaml(effective_preset(job.config, job.overrides, job.epochs, job.batch_size))


def _log_validation_artifacts(run, predictions_file: Path, job: TrainJob, planned: TrainPlan) -> None:
    """The best checkpoint's validation predictions, its metrics JSON and precision/recall + per-class AP plots."""
    if not predictions_file.exists():
        return
    truth = read_annotations(job.annotations)
    truth = (truth.class_agnostic(AGNOSTIC_LABEL) if planned.class_agnostic else truth).subset(planned.val_subset)
    truth = type(truth)({v: truth[v] for v in planned.val}, truth.label_map, truth.source, truth.format)
    predictions = read_activitynet_results(predictions_file, truth.label_map)
    metrics = evaluate_detection(truth, predictions.detections, THUMOS14_TIOU, keep_curves=True)
    with tempfile.TemporaryDirectory() as tmp:
        plot_detection_metrics(metrics, Path(tmp) / "precision_recall.png")
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=1))
        run.log_artifact(str(predictions_file), "validation")
        run.log_artifact(str(Path(tmp) / "precision_recall.png"), "validation")
        run.log_artifact(str(Path(tmp) / "metrics.json"), "validation")
        report = _validation_report(Path(tmp) / "report", truth, predictions_file, metrics)
        if report is not None:
            run.log_artifact(str(report), "validation")


def _validation_report(directory: Path, truth: AnnotationSet, predictions_file: Path, metrics) -> Path | None:
    """The final validation's HTML report (``jobs.report``), from an evaluation directory of its own: the validation
    ground truth as ActivityNet JSON and a metrics.json whose inputs name it. A report that fails is a warning, not a
    failed training run."""
    from jobs.evaluate import recorded_inputs
    from jobs.report import build_report
    from pipelines.annotations import write_activitynet

    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_activitynet(directory / "ground_truth.json", truth)
        inputs = recorded_inputs(directory / "ground_truth.json", predictions_file, THUMOS14_TIOU, None, False, (1, 5))
        (directory / "metrics.json").write_text(json.dumps({**metrics.to_dict(), "inputs": inputs}, indent=1))
        return build_report(directory, title="Validation of the best checkpoint")
    except Exception as e:  # noqa: BLE001 - the run's model and metrics are logged already; the report is a convenience
        warnings.warn(f"the validation report was not written: {type(e).__name__}: {e}", stacklevel=2)
        return None


def _storage_path(out: str) -> str:
    return out if "://" in out else str(Path(out).resolve())


def _best_checkpoint(result, key: str = SCORE) -> tuple[Any, float] | None:
    scored = [(c, m.get(key)) for c, m in (result.best_checkpoints or []) if m.get(key) is not None]
    if not scored:
        return (result.checkpoint, float("nan")) if result.checkpoint is not None else None
    return max(scored, key=lambda cm: cm[1])


# --- the worker ------------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: its shard, the epoch loop, validation, checkpoints (rank 0 reports them)."""
    plan: TrainPlan = config["plan"]
    console: DriverConsole = config["console"]
    loop_started = time.time()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    shard = _read_shard(plan, rank, world, workers_on_machine=context.get_local_world_size())
    iterations = math.ceil(len(plan.train) / (world * plan.batch_size))  # the same on every rank: DDP needs it

    torch.manual_seed(plan.seed)  # the same initial weights on every rank
    model = build_detector(plan.detector).to(device)
    if plan.class_embeddings is not None:  # the training classes' text embeddings: part of the weights from here on
        model.set_class_embeddings(torch.as_tensor(plan.class_embeddings, device=device))
    optimizer = build_optimizer(model, plan.optim)
    scheduler = build_scheduler(optimizer, plan.optim, iterations)
    ema = ModelEMA(model, plan.optim.ema_decay) if plan.optim.ema_decay else None
    state = _TrainingState(model, optimizer, scheduler, ema)
    start_epoch = _restore_state(state, ray.train.get_checkpoint(), rank, world, device)
    if start_epoch and rank == 0:
        console.print(f"resuming from the checkpoint of epoch {start_epoch} (of {plan.optim.epochs})")
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    logger = tracking.RunLogger(config["mlflow_uri"], config["mlflow_run_id"]) if rank == 0 else None
    autocast = torch.bfloat16 if plan.amp and device.type == "cuda" else None

    for epoch in range(start_epoch, plan.optim.epochs):
        torch.manual_seed(hash((plan.seed, rank, epoch)) % 2**31)  # drop-path: the same path after a resume
        rng = np.random.default_rng([plan.seed, rank, epoch])
        epoch_started, timing = time.time(), EpochTiming()
        stats = train_one_epoch(
            ddp_model, _epoch_batches(plan, shard, rng, iterations, model.pad_multiple), optimizer, scheduler, ema=ema,
            clip_grad_norm=plan.optim.clip_grad_norm or None, device=device, autocast_dtype=autocast, timing=timing,
        )  # fmt: skip
        metrics = _train_metrics(stats, scheduler.get_last_lr()[0], world, epoch, timing)
        metrics.update(_reader_metrics(shard))
        if epoch == start_epoch:
            metrics.update(first_step_unix=epoch_started + timing.first_step_seconds, worker_start_unix=loop_started)
        predictions = None
        if (epoch + 1) % plan.val_every == 0 or epoch == plan.optim.epochs - 1:
            val_started = time.perf_counter()
            scores, predictions = _validate(state.weights, shard, plan, rank, world, device)
            metrics.update(scores, val_seconds=time.perf_counter() - val_started)
        normalizer = model.loss_normalizer.state_dict() if hasattr(model, "loss_normalizer") else None  # dense detectors have none
        shared = _gather((normalizer, _peak_rss_mb()), world)  # every rank's normaliser: an exact resume
        metrics["worker_peak_rss_mb"] = max(peak for _, peak in shared)
        checkpoint = None
        if rank == 0:
            checkpoint = _save_state(state, [normalizer for normalizer, _ in shared], epoch, metrics, predictions, plan)
            _log_epoch(logger, metrics, epoch)
            console.print(_progress_line(epoch, plan.optim.epochs, metrics))
        ray.train.report(_scalars(metrics), checkpoint=checkpoint)
        if plan.stop_after is not None and epoch + 1 >= plan.stop_after:
            break


@dataclass(frozen=True)
class _Shard:
    """One worker's videos (every world-th of the sorted ids) with their features: a ``ShardReader`` (resident or
    streamed within the cache budget), or any mapping of the sequences (a dict read whole: tests compare the two)."""

    train_ids: list[str]
    val_ids: list[str]
    sequences: Mapping[str, FeatureSequence]

    def expect(self, video_ids: list[str]) -> None:
        """The order in which the videos will be read next: a streaming reader reads ahead in it."""
        if isinstance(self.sequences, ShardReader):
            self.sequences.schedule(video_ids)


def _read_shard(plan: TrainPlan, rank: int, world: int, workers_on_machine: int = 1) -> _Shard:
    train_ids = sorted(plan.train)[rank::world]
    val_ids = sorted(plan.val)[rank::world]
    store = FeatureStore(plan.features, options=plan.storage_options or None)
    cache_bytes = plan.cache_bytes or default_cache_bytes(workers_on_machine)
    return _Shard(train_ids, val_ids, ShardReader(store, train_ids + val_ids, cache_bytes=cache_bytes, cache_dir=plan.cache_dir))


def _reader_metrics(shard: _Shard) -> dict[str, float]:
    """This rank's reading so far: streamed or resident, feature MB decoded, cache hit rate."""
    reader = shard.sequences
    if not isinstance(reader, ShardReader):
        return {}
    stats = reader.stats
    requests = stats.hits + stats.misses
    return {
        "shard_streaming": float(not reader.resident),
        "shard_read_mb": stats.bytes_read / 2**20,
        **({"shard_cache_hit_rate": stats.hits / requests} if requests else {}),
    }


@dataclass(frozen=True)
class _TrainingState:
    """What a checkpoint restores: weights, optimiser, schedule and EMA (the loss normaliser lives in the model)."""

    model: Detector
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEMA | None

    @property
    def weights(self) -> Detector:
        """The weights that are validated and shipped: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model


def _restore_state(state: _TrainingState, checkpoint: ray.train.Checkpoint | None, rank: int, world: int, device) -> int:
    """Load ``checkpoint`` (Ray Train's latest, after a failure or a --resume) into ``state``; returns the first epoch to run."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        saved = torch.load(Path(directory) / "state.pt", map_location=device, weights_only=True)
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.ema is not None:
        state.ema.load_state_dict(saved["ema"])
    normalizers = saved["loss_normalizers"]  # one per rank: each counts its own positives
    if hasattr(state.model, "loss_normalizer"):
        state.model.loss_normalizer.load_state_dict(normalizers[rank] if len(normalizers) == world else normalizers[0])
    return int(saved["epoch"]) + 1


def _epoch_batches(plan: TrainPlan, shard: _Shard, rng: np.random.Generator, iterations: int, pad_multiple: int) -> Iterator[Batch]:
    """This epoch's ``iterations`` batches of random crops, in a shuffled order of the shard (as many passes as it takes);
    the crops are drawn from ``rng`` as the loop asks for each batch."""
    n, size = len(shard.train_ids), plan.batch_size
    # video-level labels promise an action somewhere in the video: a crop could lose it, a resampling cannot
    sample = sample_video if plan.detector.family == "weak" else random_crop
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(iterations * size / max(n, 1)) + 1)])
    shard.expect([shard.train_ids[j] for j in order[: iterations * size]])  # no random numbers: the same crops either way
    for it in range(iterations):
        samples = []
        for j in order[it * size : (it + 1) * size]:
            vid = shard.train_ids[j]
            targets = plan.train[vid]
            features, segments, labels, _ = sample(
                shard.sequences[vid].features,
                np.asarray(targets.segments, np.float32).reshape(-1, 2),
                np.asarray(targets.labels, np.int64),
                plan.detector.max_seq_len,
                rng,
            )
            samples.append({"features": features, "segments": segments, "labels": labels, "video_id": vid})
        yield collate(samples, pad_multiple, num_classes=plan.detector.num_classes)  # labels checked here, on the host


def _train_metrics(stats: dict[str, float], lr: float, world: int, epoch: int, timing: EpochTiming) -> dict[str, float]:
    metrics = {f"train_{k}": stats[k] for k in stats if k.endswith("loss")}
    metrics["lr"] = lr
    metrics["samples_per_second"] = stats["samples_per_second"] * world
    metrics["epoch"] = epoch
    metrics["epoch_seconds"] = timing.epoch_seconds  # data preparation + steps
    metrics["step_seconds"] = timing.step_seconds  # forward + backward + optimiser only
    return metrics


def _validate(
    model: Detector, shard: _Shard, plan: TrainPlan, rank: int, world: int, device
) -> tuple[dict[str, float], dict[str, Detections] | None]:
    """Detections of this rank's validation videos, gathered on rank 0 and evaluated once: rank 0 gets
    ``(metrics, {video_id: Detections})``, the other ranks ``({}, None)``."""
    model.eval()
    if plan.detector.task == "classification":
        return _validate_classifier(model, shard, plan, rank, world)
    local = []
    dense = plan.detector.task == "dense"
    shard.expect(shard.val_ids)
    with torch.inference_mode():
        for vid in shard.val_ids:
            seq = shard.sequences[vid]
            det = model.detect(seq.features, seq.timing, plan.val[vid].duration or seq.duration, vid)
            frames = None
            if dense:  # each feature step's centre (s) and its class probabilities [T, K]
                steps = model.sequence_scores(seq.features)
                frames = (seq.timing.centers(len(steps)), steps)
            local.append((vid, det.segments.data.cpu().numpy(), det.scores.cpu().numpy(), det.labels.cpu().numpy(), frames))
    gathered = _gather(local, world)
    if rank != 0:
        return {}, None
    predictions = {vid: Detections(vid, Segments(s), sc, lab) for part in gathered for vid, s, sc, lab, _ in part}
    labels = LabelMap.from_names(plan.labels)
    truth = {vid: VideoAnnotation(vid, Segments(t.segments_s), t.labels, t.duration) for vid, t in plan.val.items()}
    result = evaluate_detection(AnnotationSet(truth, labels), predictions, THUMOS14_TIOU)
    metrics = {f"val_mAP_{t:.2f}": float(m) for t, m in zip(result.tiou, result.mAP)}  # MLflow refuses "@" in names
    metrics[SCORE] = float(result.mAP.mean())
    if dense:  # the per-frame mAP (MultiTHUMOS / Charades protocol) at every feature step's centre
        frames = {vid: f for part in gathered for vid, _, _, _, f in part}
        metrics[DENSE_SCORE] = float(evaluate_dense(AnnotationSet(truth, labels), frames).mAP)
    return metrics, predictions


def _validate_classifier(
    model, shard: _Shard, plan: TrainPlan, rank: int, world: int
) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
    """A video classifier's class probabilities of this rank's validation videos, gathered on rank 0 and scored as
    ActivityNet's classification task (mAP over classes, hit@k): rank 0 gets ``(metrics, {video_id: scores [K]})``."""
    shard.expect(shard.val_ids)
    with torch.inference_mode():
        local = {vid: model.classify(shard.sequences[vid].features) for vid in shard.val_ids}
    gathered = _gather(local, world)
    if rank != 0:
        return {}, None
    scores = {vid: s for part in gathered for vid, s in part.items()}
    truth = {vid: VideoAnnotation(vid, Segments(t.segments_s), t.labels, t.duration) for vid, t in plan.val.items()}
    result = evaluate_classification(AnnotationSet(truth, LabelMap.from_names(plan.labels)), scores)
    metrics = {CLASSIFICATION_SCORE: float(result.mAP), **{f"val_hit_at_{k}": float(v) for k, v in result.hit_at_k.items()}}
    return metrics, scores


def _gather(obj: Any, world: int) -> list[Any]:
    """``obj`` from every rank, in rank order, on every rank (one ``all_gather_object`` over the DDP group)."""
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _save_state(
    state: _TrainingState,
    normalizers: list[dict],
    epoch: int,
    metrics: dict[str, Any],
    predictions: dict[str, Detections] | dict[str, np.ndarray] | None,
    plan: TrainPlan,
) -> ray.train.Checkpoint:
    """This epoch's checkpoint folder: ``model.pt`` (the shipped weights), ``state.pt`` (what ``_restore_state`` loads,
    every rank's loss normaliser included) and, when validated, ``val_predictions.json``."""
    directory = Path(tempfile.mkdtemp(prefix="tal-ckpt-"))
    if predictions is not None and plan.detector.task == "classification":  # the official classification JSON
        write_video_classification(directory / CLASSIFICATION_FILE, predictions, LabelMap.from_names(plan.labels))
    elif predictions is not None:
        write_activitynet_results(directory / "val_predictions.json", predictions.values(), LabelMap.from_names(plan.labels))
    meta = {"epoch": epoch, "preset": plan.preset, "class_agnostic": plan.class_agnostic, **_scalars(metrics)}
    save_checkpoint(Checkpoint.from_model(state.weights, plan.labels, plan.provenance.to_dict(), meta), directory / "model.pt")
    torch.save(
        {
            "model": state.model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "ema": state.ema.state_dict() if state.ema is not None else {},
            "loss_normalizers": normalizers,
            "epoch": epoch,
        },
        directory / "state.pt",
    )
    return ray.train.Checkpoint.from_directory(str(directory))


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return float("nan")


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}


def _progress_line(epoch: int, epochs: int, m: dict[str, float]) -> str:
    parts = [f"epoch {epoch + 1}/{epochs}", f"loss {m.get('train_final_loss', float('nan')):.4f}"]
    parts_of_loss = [
        f"{k[6:-5]} {v:.4f}" for k, v in m.items() if k.startswith("train_") and k.endswith("_loss") and k != "train_final_loss"
    ]
    if parts_of_loss:  # the family's own terms: cls/reg, tem/pem, the set criterion's
        parts.append("(" + ", ".join(parts_of_loss) + ")")
    parts.append(f"lr {m['lr']:.3g}")
    if SCORE in m:
        parts.append(f"val avg mAP {m[SCORE]:.4f}")
    if DENSE_SCORE in m:
        parts.append(f"val per-frame mAP {m[DENSE_SCORE]:.4f}")
    if CLASSIFICATION_SCORE in m:
        parts.append(f"val classification mAP {m[CLASSIFICATION_SCORE]:.4f}")
    parts.append(f"{m['samples_per_second']:.1f} videos/s")
    return "  ".join(parts)


def _log_epoch(logger, metrics: dict[str, Any], epoch: int) -> None:
    """Log one epoch's metrics once: an epoch re-run after a worker failure is not logged twice."""
    fresh = {k: v for k, v in _scalars(metrics).items() if k != "epoch" and all(step != epoch for step, _ in logger.metric_history(k))}
    if fresh:
        logger.log_metrics(fresh, step=epoch)
