"""``tal train``: a detector on a feature store, with Ray Train (DDP) and MLflow.

    tal train --config thumos14-actionformer --features STORE --annotations FILE [--workers 2] [--epochs E]

The driver (``train``) checks everything it can before any worker starts: the preset, the
store's provenance and feature width against the detector, the labels, the split. It then opens
one MLflow run and starts ``TorchTrainer``; each worker (``train_loop_per_worker``) reads only its
shard of the store (the parts holding its videos: a detector needs whole sequences, cropped
anew every epoch, so a worker keeps its shard in memory rather than streaming it each epoch),
trains with the single-process utilities of ``tal_models.training`` inside DDP, validates its
share of the validation videos, and rank 0 gathers the detections, evaluates once, logs the
epoch to MLflow and reports a checkpoint to Ray Train. The driver finally logs the best
checkpoint as an artifact and registers it (``jobs.tracking``).

Fault tolerance: every epoch ends with a checkpoint (weights, optimiser, schedule, EMA, loss
normaliser, epoch); a dead worker restarts the group from the last one (``--max-failures``). A
stopped run resumes with ``--resume RUN_NAME``: the same Ray Train run folder (its checkpoint
snapshot) and the same MLflow run. Randomness is re-seeded from (seed, rank, epoch) at every
epoch, so a resumed run follows the same path as an uninterrupted one. Metrics are logged once
per epoch: an epoch re-run after a failure does not log twice.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from jobs.errors import UsageError

# Ray Train V2's controller polls slowly by default: ~20 s of fixed cost per fit on a small run (STACK_NOTES)
_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}
SCORE = "val_average_mAP"


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


# --- the driver ------------------------------------------------------------------------------
def plan(job: TrainJob) -> dict[str, Any]:
    """Everything the workers need, checked on the driver: raises ``UsageError`` with what to fix."""
    from pipelines.annotations import read_annotations
    from pipelines.store import FeatureStore, StoreError
    from tal_models.config import config_to_dict
    from tal_models.presets import load_preset

    try:
        preset = load_preset(job.config)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--config: {exc}") from None
    preset = _apply_overrides(preset, job.overrides)
    annotations = read_annotations(job.annotations)
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
    missing = sorted(v for v in list(train_set.videos) + list(val_set.videos) if v not in done)
    train_ids = sorted(v for v in train_set.videos if v in done)
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
    timing = provenance.timing

    def video(vid: str) -> dict[str, Any]:
        v = annotations[vid]
        seconds = np.asarray(v.segments.data, dtype=np.float64).reshape(-1, 2)
        return {
            "segments_s": seconds.tolist(),
            "segments": timing.seconds_to_step(seconds).tolist(),
            "labels": [model_class[int(k)] for k in v.labels],
            "duration": v.duration,
        }

    epochs = job.epochs or preset.optim.epochs
    optim = replace(preset.optim, epochs=epochs, warmup_epochs=min(preset.optim.warmup_epochs, max(epochs - 1, 0)))
    return {
        "preset": preset.name,
        "detector": config_to_dict(detector),
        "optim": config_to_dict(optim),
        "batch_size": job.batch_size or preset.batch_size,
        "labels": annotations.label_map.names,
        "provenance": provenance.to_dict(),
        "features": store.uri,  # absolute for a local store: workers run elsewhere
        "storage_options": job.storage_options,
        "train": {vid: video(vid) for vid in train_ids},
        "val": {vid: video(vid) for vid in val_ids},
        "train_subset": train_subset,
        "val_subset": val_subset,
        "missing_videos": missing,
        "val_every": job.val_every,
        "seed": job.seed,
        "amp": job.amp,
        "validation_key": _validation_key(val_ids, annotations),
        "stop_after": job.stop_after,
    }


def _apply_overrides(preset, overrides):
    """``preset`` with ``--set key=value`` applied (values parsed as YAML), revalidated."""
    from tal_models.config import apply_overrides, config_from_dict, config_to_dict
    from tal_models.presets import Preset

    if not overrides:
        return preset
    data = config_to_dict(preset)
    try:
        apply_overrides(data, overrides, example="optim.lr=3e-4")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        return config_from_dict(Preset, data, where="--set")
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
    import hashlib

    h = hashlib.sha256()
    for vid in val_ids:
        v = annotations[vid]
        h.update(vid.encode())
        h.update(np.asarray(v.segments.data, dtype=np.float64).tobytes())
        h.update(np.asarray(v.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def train(job: TrainJob) -> dict[str, Any]:
    """Run ``job``; returns a summary (run name, MLflow run id, best score, registration)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs import tracking

    given = {k for k in _RAY_TRAIN_ENV if k in os.environ}  # e.g. by a Ray job's runtime_env: left as they are
    for key, value in _RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    started = time.perf_counter()
    spec = plan(job)
    out = _storage_path(job.out)
    run_name = job.resume or job.run_name or f"{spec['preset']}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
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
        f"tal train: {spec['preset']} on {len(spec['train'])} {spec['train_subset']} videos, validating on {len(spec['val'])} "
        f"{spec['val_subset']} videos; {job.workers} worker(s); run {run_name!r}"
        + (f"; {len(spec['missing_videos'])} annotated videos have no features (skipped)" if spec["missing_videos"] else "")
    )
    tags = {
        "git_commit": tracking.git_commit() or "unknown",
        "preset": spec["preset"],
        **{f"features.{k}": str(v) for k, v in spec["provenance"].items() if k != "extract_config"},
        "features.uri": job.features,
        "validation_key": spec["validation_key"],
    }
    with tracking.TrainingRun(uri, job.experiment, run_name, tags=tags, run_id=mlflow_run_id) as run:
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps({"mlflow_run_id": run.run_id, "job": asdict(job)}, indent=1))
        run.log_params({"preset": spec["preset"], "detector": spec["detector"], "optim": spec["optim"], "batch_size": spec["batch_size"],
                        "workers": job.workers, "seed": job.seed})  # fmt: skip
        if job.stop_after:
            run.set_tags({"tal.stopped_after_epoch": str(job.stop_after)})
        if not ray.is_initialized():
            # keys the environment (e.g. a Ray job's runtime_env) already sets are left to it: Ray refuses to merge conflicting ones
            env = {k: v for k, v in _RAY_TRAIN_ENV.items() if k not in given}
            ray.init(runtime_env={"env_vars": env} if env else None)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={**spec, "mlflow_uri": uri, "mlflow_run_id": run.run_id},
            scaling_config=ScalingConfig(
                num_workers=job.workers,
                use_gpu=job.gpus_per_worker > 0,
                resources_per_worker={"CPU": 1, **({"GPU": job.gpus_per_worker} if job.gpus_per_worker > 0 else {})},
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=out,
                checkpoint_config=CheckpointConfig(
                    num_to_keep=max(job.keep_best, 1), checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
                ),  # fmt: skip
                failure_config=FailureConfig(max_failures=job.max_failures),
            ),
        )
        fit_started = time.time()
        result = trainer.fit()
        best = _best_checkpoint(result)
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
            _log_validation_artifacts(run, Path(directory) / "val_predictions.json", job, spec)
        run.log_text(_preset_yaml(job), "config/preset.yaml")
        summary["best_score"] = score
        run.log_metrics({f"best_{SCORE}": score}, step=0)
        stopped = job.stop_after is not None and job.stop_after < spec["optim"]["epochs"]
        if stopped:
            print(f"stopped after epoch {job.stop_after} of {spec['optim']['epochs']}: continue with --resume {run_name}")
        elif job.register:
            registration = tracking.register_checkpoint(uri, run.run_id, "checkpoint/model.pt", score, spec["validation_key"])
            summary["registration"] = asdict(registration)
            print(f"registered tal-detector version {registration.version}: {registration.reason}")
    print(f"done in {summary['wall_s']:.0f} s: best {SCORE} {score:.4f}; MLflow run {summary['mlflow_run_id']} ({uri})")
    return summary


def _preset_yaml(job: TrainJob) -> str:
    """The preset as trained (overrides applied), for the run's artifacts."""
    from tal_models.config import dump_yaml
    from tal_models.presets import load_preset

    return dump_yaml(_apply_overrides(load_preset(job.config), job.overrides))


def _log_validation_artifacts(run, predictions_file: Path, job: TrainJob, spec: dict[str, Any]) -> None:
    """The best checkpoint's validation predictions, its metrics JSON and precision/recall + per-class AP plots."""
    if not predictions_file.exists():
        return
    from jobs.plots import plot_detection_metrics
    from pipelines.annotations import read_activitynet_results, read_annotations
    from tal_models.evaluation.detection import THUMOS14_TIOU, evaluate_detection

    truth = read_annotations(job.annotations).subset(spec["val_subset"])
    truth = type(truth)({v: truth[v] for v in spec["val"]}, truth.label_map, truth.source, truth.format)
    predictions = read_activitynet_results(predictions_file, truth.label_map)
    metrics = evaluate_detection(truth, predictions.detections, THUMOS14_TIOU, keep_curves=True)
    with tempfile.TemporaryDirectory() as tmp:
        plot_detection_metrics(metrics, Path(tmp) / "precision_recall.png")
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=1))
        run.log_artifact(str(predictions_file), "validation")
        run.log_artifact(str(Path(tmp) / "precision_recall.png"), "validation")
        run.log_artifact(str(Path(tmp) / "metrics.json"), "validation")


def _storage_path(out: str) -> str:
    return out if "://" in out else str(Path(out).resolve())


def _best_checkpoint(result) -> tuple[Any, float] | None:
    scored = [(c, m.get(SCORE)) for c, m in (result.best_checkpoints or []) if m.get(SCORE) is not None]
    if not scored:
        return (result.checkpoint, float("nan")) if result.checkpoint is not None else None
    return max(scored, key=lambda cm: cm[1])


# --- the worker ------------------------------------------------------------------------------
def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """One DDP worker: its shard, the epoch loop, validation, checkpoints (rank 0 reports them)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from jobs import tracking
    from pipelines.store import FeatureStore
    from tal_models.batch import collate, random_crop
    from tal_models.checkpoint import Checkpoint, save_checkpoint
    from tal_models.config import config_from_dict
    from tal_models.detectors import DetectorConfig, build_detector
    from tal_models.losses import LossNormalizer
    from tal_models.optim import ModelEMA, OptimConfig, build_optimizer, build_scheduler
    from tal_models.training import EpochTiming, train_one_epoch

    loop_started = time.time()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    detector_config = config_from_dict(DetectorConfig, cfg["detector"])
    optim = config_from_dict(OptimConfig, cfg["optim"])
    batch_size = int(cfg["batch_size"])

    # this worker's shard: every world-th video, read from the parts that hold them
    train_ids = sorted(cfg["train"])[rank::world]
    val_ids = sorted(cfg["val"])[rank::world]
    store = FeatureStore(cfg["features"], options=cfg["storage_options"] or None)
    sequences = store.read_videos(train_ids + val_ids)
    iterations = math.ceil(len(cfg["train"]) / (world * batch_size))  # the same on every rank: DDP needs it

    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    model = build_detector(detector_config).to(device)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, iterations)
    ema = ModelEMA(model, optim.ema_decay) if optim.ema_decay else None
    start_epoch = 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            state = torch.load(Path(directory) / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        normalizers = state["loss_normalizers"]  # one per rank: each counts its own positives
        model.loss_normalizer.load_state_dict(normalizers[rank] if len(normalizers) == world else normalizers[0])
        start_epoch = int(state["epoch"]) + 1
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {start_epoch} (of {optim.epochs})")
    normalizer: LossNormalizer = model.loss_normalizer
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    logger = tracking.RunLogger(cfg["mlflow_uri"], cfg["mlflow_run_id"]) if rank == 0 else None
    use_amp = bool(cfg["amp"]) and device.type == "cuda"

    for epoch in range(start_epoch, optim.epochs):
        torch.manual_seed(hash((cfg["seed"], rank, epoch)) % 2**31)  # drop-path: the same path after a resume
        rng = np.random.default_rng([cfg["seed"], rank, epoch])
        order = np.concatenate(
            [rng.permutation(len(train_ids)) for _ in range(math.ceil(iterations * batch_size / max(len(train_ids), 1)) + 1)]
        )

        def batches(rng=rng, order=order):  # crops are drawn as the loop asks for each batch
            for it in range(iterations):
                samples = []
                for j in order[it * batch_size : (it + 1) * batch_size]:
                    vid = train_ids[j]
                    ann = cfg["train"][vid]
                    feats, segs, labels, _ = random_crop(
                        sequences[vid].features,
                        np.asarray(ann["segments"], np.float32).reshape(-1, 2),
                        np.asarray(ann["labels"], np.int64),
                        detector_config.max_seq_len,
                        rng,
                    )
                    samples.append({"features": feats, "segments": segs, "labels": labels, "video_id": vid})
                yield collate(samples, model.pad_multiple)

        epoch_started, timing = time.time(), EpochTiming()
        stats = train_one_epoch(
            ddp_model, batches(), optimizer, scheduler, ema=ema, clip_grad_norm=optim.clip_grad_norm or None, device=device,
            autocast_dtype=torch.bfloat16 if use_amp else None, timing=timing,
        )  # fmt: skip
        metrics = {f"train_{k}": stats[k] for k in stats if k.endswith("loss")}
        metrics["lr"] = scheduler.get_last_lr()[0]
        metrics["samples_per_second"] = stats["samples_per_second"] * world
        metrics["epoch"] = epoch
        metrics["epoch_seconds"] = timing.epoch_seconds  # data preparation + steps
        metrics["step_seconds"] = timing.step_seconds  # forward + backward + optimiser only
        if epoch == start_epoch:
            metrics.update(first_step_unix=epoch_started + timing.first_step_seconds, worker_start_unix=loop_started)

        last = epoch == optim.epochs - 1
        if (epoch + 1) % cfg["val_every"] == 0 or last:
            evaluated = ema.module if ema is not None else model
            val_started = time.perf_counter()
            metrics.update(_validate(evaluated, sequences, val_ids, cfg, rank, world, dist, device))
            metrics["val_seconds"] = time.perf_counter() - val_started

        checkpoint_dir = tempfile.mkdtemp(prefix="tal-ckpt-")
        shared = [None] * world  # every rank's loss normaliser (for an exact resume) and peak memory
        mine = (normalizer.state_dict(), _peak_rss_mb())
        if world > 1:
            dist.all_gather_object(shared, mine)
        else:
            shared = [mine]
        normalizers = [n for n, _ in shared]
        metrics["worker_peak_rss_mb"] = max(p for _, p in shared)
        predictions = metrics.pop("_predictions", None)
        if rank == 0:
            if predictions is not None:
                from pipelines.annotations import write_activitynet_results
                from tal_models.structures import LabelMap

                write_activitynet_results(
                    Path(checkpoint_dir) / "val_predictions.json", predictions.values(), LabelMap.from_names(cfg["labels"])
                )
            weights = ema.module if ema is not None else model
            meta = {"epoch": epoch, "preset": cfg["preset"], **_scalars(metrics)}
            save_checkpoint(Checkpoint.from_model(weights, cfg["labels"], cfg["provenance"], meta), Path(checkpoint_dir) / "model.pt")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ema": ema.state_dict() if ema is not None else {},
                    "loss_normalizers": normalizers,
                    "epoch": epoch,
                },
                Path(checkpoint_dir) / "state.pt",
            )
            _log_epoch(logger, metrics, epoch)
            print(_progress_line(epoch, optim.epochs, metrics))
        ray.train.report(_scalars(metrics), checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if rank == 0 else None)
        if cfg["stop_after"] is not None and epoch + 1 >= cfg["stop_after"]:
            break


def _validate(model, sequences, val_ids, cfg, rank, world, dist, device) -> dict[str, float]:
    """Detections of this rank's validation videos, gathered on rank 0 and evaluated once."""
    import torch

    from tal_models.evaluation.detection import THUMOS14_TIOU, evaluate_detection
    from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation

    model.eval()
    local = []
    with torch.inference_mode():
        for vid in val_ids:
            seq = sequences[vid]
            det = model.detect(seq.features, seq.timing, cfg["val"][vid]["duration"] or seq.duration, vid)
            local.append((vid, det.segments.data.cpu().numpy(), det.scores.cpu().numpy(), det.labels.cpu().numpy()))
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    if rank != 0:
        return {}
    from tal_models.structures import Detections

    predictions = {vid: Detections(vid, Segments(s), sc, lab) for part in gathered for vid, s, sc, lab in part}
    label_map = LabelMap.from_names(cfg["labels"])
    truth = {
        vid: VideoAnnotation(
            vid, Segments(np.asarray(a["segments_s"], np.float64).reshape(-1, 2)), np.asarray(a["labels"], np.int64), a["duration"]
        )
        for vid, a in cfg["val"].items()
    }
    metrics = evaluate_detection(AnnotationSet(truth, label_map), predictions, THUMOS14_TIOU)
    out = {f"val_mAP_{t:.2f}": float(m) for t, m in zip(metrics.tiou, metrics.mAP)}  # MLflow refuses "@" in names
    out[SCORE] = float(metrics.mAP.mean())
    out["_predictions"] = predictions  # rank 0 writes them beside the checkpoint
    return out


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
    parts.append(f"(cls {m.get('train_cls_loss', float('nan')):.4f}, reg {m.get('train_reg_loss', float('nan')):.4f})")
    parts.append(f"lr {m['lr']:.3g}")
    if SCORE in m:
        parts.append(f"val avg mAP {m[SCORE]:.4f}")
    parts.append(f"{m['samples_per_second']:.1f} videos/s")
    return "  ".join(parts)


def _log_epoch(logger, metrics: dict[str, Any], epoch: int) -> None:
    """Log one epoch's metrics once: an epoch re-run after a worker failure is not logged twice."""
    fresh = {k: v for k, v in _scalars(metrics).items() if k != "epoch" and all(step != epoch for step, _ in logger.metric_history(k))}
    if fresh:
        logger.log_metrics(fresh, step=epoch)
