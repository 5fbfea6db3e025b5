"""``tal evaluate``: score an ActivityNet results JSON against ground truth (``run``), or a
checkpoint on a feature store (``run_model``: inference, then the same evaluation; with ``online``
an online checkpoint's streamed events and per-step scores too, ``online_metrics.json``).

Thin on purpose: read the inputs, call ``jobs.inference`` and ``tal_models.evaluation``, print and write.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from jobs.errors import UsageError
from jobs.inference import detect_sequences, detect_store_on_ray, load_model
from pipelines.annotations import (
    AnnotationFormatError,
    read_activitynet_results,
    read_annotations,
    read_video_classification,
    write_activitynet_results,
    write_video_classification,
)
from pipelines.atomic import write_json_atomic
from pipelines.store import FeatureStore, StoreError
from tal_models.checkpoint import Checkpoint, CheckpointError
from tal_models.detectors.fused import is_class_agnostic
from tal_models.evaluation import (
    ACTIVITYNET_TIOU,
    THUMOS14_TIOU,
    ClassificationMetrics,
    DenseMetrics,
    DetectionMetrics,
    ProposalMetrics,
    evaluate_classification,
    evaluate_dense,
    evaluate_detection,
    evaluate_proposals,
)
from tal_models.evaluation.diagnosis import Diagnosis, diagnose
from tal_models.evaluation.online import OnlineMetrics, evaluate_offline, evaluate_online
from tal_models.postprocess import fuse_video_classifier
from tal_models.structures import Detections, LabelMap, video_id_candidates

THUMOS_LIKE = {"thumos14_json", "thumos14_txt", "multithumos"}


@dataclass(frozen=True)
class EvaluationRequest:
    ground_truth: Path
    predictions: Path
    tiou: np.ndarray | None = None  # None: THUMOS14 0.3:0.1:0.7 or ActivityNet 0.5:0.05:0.95 by format
    subset: str | None = None
    ignore_ambiguous: bool = False
    top_k: tuple[int, ...] = (1, 5)
    proposals: bool = False
    output: Path | None = None
    plot: Path | None = None
    report: bool = False  # also report.html beside the metrics file (jobs.report; needs output)
    diagnose: bool = False  # DETAD error analysis: diagnosis.json and diagnosis/*.png next to --output


@dataclass(frozen=True)
class EvaluationReport:
    metrics: DetectionMetrics
    proposal_metrics: ProposalMetrics | None
    ground_truth_format: str
    unknown_labels: dict[str, int]
    subsets: list[str]
    diagnosis: Diagnosis | None = None
    diagnosis_outputs: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = self.metrics.to_dict()
        out["unknown_labels"] = self.unknown_labels
        out["ground_truth_format"] = self.ground_truth_format
        if self.proposal_metrics is not None:
            out["proposals"] = self.proposal_metrics.to_dict()
        return out


def run(request: EvaluationRequest) -> EvaluationReport:
    if request.report and request.output is None:
        raise UsageError("--report needs --output FILE: the report is written beside the metrics JSON, which it reads")
    if request.diagnose and request.output is None:
        raise UsageError("--diagnose needs --output FILE: diagnosis.json and diagnosis/*.png are written beside it")
    ground_truth = read_annotations(request.ground_truth)
    gt_format = ground_truth.format or "activitynet"
    if request.subset is not None and request.subset.lower() not in {s.lower() for s in ground_truth.subsets}:
        raise UsageError(f"--subset {request.subset!r} is not in {request.ground_truth}; it has {ground_truth.subsets}")
    predictions = read_activitynet_results(request.predictions, ground_truth.label_map)
    tiou = request.tiou
    if tiou is None:
        tiou = THUMOS14_TIOU if gt_format in THUMOS_LIKE else ACTIVITYNET_TIOU
    metrics = evaluate_detection(
        ground_truth,
        predictions.detections,
        tiou,
        subset=request.subset,
        ignore_ambiguous=request.ignore_ambiguous,
        top_k=request.top_k,
        keep_curves=request.plot is not None,
    )
    proposal_metrics = None
    if request.proposals:
        proposal_metrics = evaluate_proposals(ground_truth, predictions.detections, tiou, subset=request.subset)
    report = EvaluationReport(metrics, proposal_metrics, gt_format, dict(predictions.unknown_labels), ground_truth.subsets)
    if request.diagnose:
        diagnosis, paths = run_diagnosis(
            ground_truth, predictions.detections, tiou, request.output.parent, gt_format,
            subset=request.subset, ignore_ambiguous=request.ignore_ambiguous,
        )  # fmt: skip
        report = replace(report, diagnosis=diagnosis, diagnosis_outputs=paths)
    if request.output is not None:
        request.output.parent.mkdir(parents=True, exist_ok=True)
        inputs = recorded_inputs(request.ground_truth, request.predictions, tiou, request.subset, request.ignore_ambiguous, request.top_k)
        write_json_atomic(request.output, {**report.to_dict(), "inputs": inputs}, indent=2)
    if request.plot is not None:
        from jobs.plots import plot_detection_metrics  # not at the top: importing jobs.plots switches matplotlib to Agg

        plot_detection_metrics(metrics, request.plot)
    if request.report:
        write_report(request.output)
    return report


def recorded_inputs(
    ground_truth: Path, predictions: Path, tiou, subset: str | None, ignore_ambiguous: bool, top_k, **extra: Any
) -> dict[str, Any]:
    """metrics.json's ``"inputs"``: what was scored, with absolute paths and the exact thresholds, so that ``tal report``
    can read the same files and evaluate them again (``extra``: ``model``, ``class_agnostic`` with --model)."""
    return {
        "ground_truth": str(Path(ground_truth).resolve()),
        "predictions": str(Path(predictions).resolve()),
        "tiou": [float(t) for t in np.asarray(tiou).reshape(-1)],
        "subset": subset,
        "ignore_ambiguous": bool(ignore_ambiguous),
        "top_k": [int(k) for k in top_k],
        **extra,
    }


def write_report(metrics_file: Path) -> Path:
    """``tal evaluate --report``: the HTML report (``jobs.report``) beside ``metrics_file``."""
    from jobs.report import build_report  # not at the top: it imports jobs.plots, which switches matplotlib to Agg

    return build_report(metrics_file)


def format_report(report: EvaluationReport, request: EvaluationRequest) -> str:
    m = report.metrics
    lines = [
        f"ground truth  {request.ground_truth} ({report.ground_truth_format}"
        + (f", subset {request.subset}" if request.subset else "")
        + f"): {m.num_ground_truth:,} instances of {len(m.class_names)} classes",
        f"predictions   {request.predictions}: {m.num_predictions:,} evaluated",
    ]
    if request.subset is None and len(report.subsets) > 1:
        lines.append(f"note          the ground truth has subsets {report.subsets}; all were evaluated (use --subset)")
    if m.num_ignored_predictions:
        lines.append(
            f"ignored       {m.num_ignored_predictions:,} predictions of classes absent from this ground truth or of other subsets' videos"
        )
    if report.unknown_labels:
        shown = ", ".join(f"{k!r} ({v})" for k, v in sorted(report.unknown_labels.items(), key=lambda kv: -kv[1])[:5])
        more = f" and {len(report.unknown_labels) - 5} more" if len(report.unknown_labels) > 5 else ""
        lines.append(
            f"unknown       {sum(report.unknown_labels.values()):,} predictions with labels not in the ground truth: {shown}{more}"
        )
    if m.unknown_videos:
        lines.append(
            f"unknown       {len(m.unknown_videos)} predicted videos are not in the ground truth (their predictions count as false positives), e.g. {m.unknown_videos[0]!r}"
        )
    lines += _metric_table(m, report.proposal_metrics)
    return "\n".join(lines)


def _metric_table(m: DetectionMetrics, proposal_metrics: ProposalMetrics | None) -> list[str]:
    """mAP and Recall@k x per tIoU, average mAP, and AR@AN when proposals were evaluated."""
    header = "  tIoU    mAP(%)" + "".join(f"  R@{k}x(%)" for k in m.recall_at_k)
    lines = ["", header, "  " + "-" * (len(header) - 2)]
    for i, t in enumerate(m.tiou):
        recalls = "".join(f"  {100 * r[i]:7.2f}" for r in m.recall_at_k.values())
        lines.append(f"  {t:4.2f}   {100 * m.mAP[i]:7.2f}{recalls}")
    lines.append(f"  average mAP: {100 * m.average_mAP:.2f}%")
    if proposal_metrics is not None:
        p = proposal_metrics.to_dict()
        lines.append(
            "  proposals: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in p.items() if k.startswith("AR@")) + f"  AUC {100 * p['AUC']:.2f}"
        )
    return lines


# --- a checkpoint on a feature store (``tal evaluate --model``) -----------------------------------

AUTO_RAY_VIDEOS = 200  # from this many videos to infer, --workers defaults to Ray with one actor per CPU


@dataclass(frozen=True)
class ModelEvaluationRequest:
    model: str  # models:/name@alias, models:/name/version, runs:/<id>/path, a path or an s3:// URI
    features: str  # the feature store: a directory or an s3:// prefix
    annotations: Path
    output: Path  # a directory
    subset: str | None = None
    workers: int | None = None  # None: 0 (this process) below AUTO_RAY_VIDEOS videos, else one Ray actor per CPU
    batch_size: int = 8
    timeline_videos: int = 10
    tiou: np.ndarray | None = None
    ignore_ambiguous: bool = False
    top_k: tuple[int, ...] = (1, 5)
    proposals: bool = False
    storage_options: dict | None = None  # fsspec options for s3:// stores and checkpoints
    progress: bool = True
    dense: bool = False  # also the per-frame mAP (a dense, per-step multi-label detector's own metric)
    classifier: str | None = None  # a class-agnostic model's labeller: a video classifier (model reference) or a classification JSON
    fuse_top_k: int = 2  # video classes each class-agnostic segment is labelled with
    online: bool = False  # an online checkpoint: also per-frame mAP, latency and instance mAP of its streamed events
    ceiling: str | None = None  # with online: an offline model whose same figures are the ceiling
    report: bool = False  # also report.html in output (jobs.report)
    diagnose: bool = False  # DETAD error analysis: output/diagnosis.json and output/diagnosis/*.png


@dataclass(frozen=True)
class ModelEvaluationReport:
    metrics: DetectionMetrics
    proposal_metrics: ProposalMetrics | None
    ground_truth_format: str
    checkpoint: str  # the local file (or URI) the model was read from
    videos: list[str]  # evaluated (annotation ids), in annotation order
    missing_from_store: list[str]  # annotated (in the subset) but not in the store: not evaluated
    unknown_classes: list[str]  # classes of the annotations that the model does not predict
    subsets: list[str]  # all subsets of the annotation file
    workers: int  # 0: inferred in this process
    inference_seconds: float
    outputs: dict[str, Path]
    dense_metrics: DenseMetrics | None = None
    notes: tuple[str, ...] = ()  # how the model was scored (class-agnostic, fused), videos left unlabelled
    online_metrics: OnlineMetrics | None = None  # with --online
    ceiling_metrics: OnlineMetrics | None = None  # with --online --ceiling
    diagnosis: Diagnosis | None = None  # with --diagnose

    def to_dict(self) -> dict:
        out = self.metrics.to_dict()
        out["notes"] = list(self.notes)
        if self.dense_metrics is not None:
            out["dense"] = self.dense_metrics.to_dict()
        out["unknown_labels"] = {}  # the checkpoint's labels are checked against the annotations first
        out["ground_truth_format"] = self.ground_truth_format
        if self.proposal_metrics is not None:
            out["proposals"] = self.proposal_metrics.to_dict()
        out["model"] = self.checkpoint
        out["num_videos"] = len(self.videos)
        out["missing_from_store"] = self.missing_from_store
        out["classes_not_in_model"] = self.unknown_classes
        out["workers"] = self.workers
        out["inference_seconds"] = round(self.inference_seconds, 3)
        return out


def open_model(model: str, storage_options: Mapping[str, Any] | None = None):
    """``jobs.inference.load_model`` for a command line: (checkpoint, where it was read from), or a one-line
    ``UsageError`` naming ``--model`` (a missing file, an unknown registry name/alias/version/run, not a checkpoint)."""
    try:
        return load_model(model, storage_options)
    except FileNotFoundError as e:
        raise UsageError(f"--model {model}: no such checkpoint file {e.filename or model}") from None
    except ValueError as e:  # CheckpointError too; registry errors name what exists
        raise UsageError(f"--model {model}: {e}") from None


def run_model(request: ModelEvaluationRequest) -> ModelEvaluationReport:
    """Infer a checkpoint over the store's videos of the annotation file, evaluate, write the outputs.

    Refused before any inference (``UsageError``): a checkpoint that the store's features do not fit
    (dimension, backbone, sampling), checkpoint classes the annotations do not know, a subset
    that does not exist, no annotated video in the store. Annotated videos missing from the
    store are reported and left out of the metrics.
    """
    if request.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {request.batch_size}")
    if request.workers is not None and request.workers < 0:
        raise UsageError(f"--workers must be >= 0 (0: in this process), got {request.workers}")
    if request.timeline_videos < 0:
        raise UsageError(f"--timeline-videos must be >= 0, got {request.timeline_videos}")
    if request.output.exists() and not request.output.is_dir():
        raise UsageError(f"--output {request.output} is a file; with --model it names a directory")

    ground_truth = read_annotations(request.annotations)
    gt_format = ground_truth.format or "activitynet"
    scoped = ground_truth
    if request.subset is not None:
        if request.subset.lower() not in {s.lower() for s in ground_truth.subsets}:
            raise UsageError(f"--subset {request.subset!r} is not in {request.annotations}; it has {ground_truth.subsets}")
        scoped = ground_truth.subset(request.subset)

    checkpoint, checkpoint_uri = open_model(request.model, request.storage_options)
    if checkpoint.config.task == "classification":
        return run_classifier(request, checkpoint, checkpoint_uri, ground_truth, scoped)
    labeller, labels, notes = _labeller(request, checkpoint)
    if labeller is None and is_class_agnostic(checkpoint):  # scored as found: every annotated segment is an "action"
        ground_truth, scoped = ground_truth.class_agnostic(checkpoint.labels[0]), scoped.class_agnostic(checkpoint.labels[0])
    if request.ceiling is not None and not request.online:
        raise UsageError("--ceiling applies with --online (the offline model whose online figures bound the online model's)")
    if request.online and checkpoint.config.family != "online":
        raise UsageError(
            f"--online: {request.model} is a {checkpoint.config.arch} detector ({checkpoint.config.family}), not an online one; "
            "streamed events and per-step scores need an online checkpoint (config family online)"
        )
    if request.online and request.classifier is not None:
        raise UsageError("--online and --classifier do not combine: an online model names its own classes")
    if request.dense and checkpoint.config.task != "dense":
        raise UsageError(
            f"--dense: {request.model} is a {checkpoint.config.arch} detector of segments, not a dense (per-step) one; "
            "the per-frame mAP needs per-step scores (train a preset with task: dense, e.g. multithumos-mstemba)"
        )
    unknown = [n for n in labels if n not in ground_truth.label_map]
    if unknown:
        raise UsageError(
            f"{len(unknown)} classes of the checkpoint are not in {request.annotations}: {unknown[:5]}"
            + (" ..." if len(unknown) > 5 else "")
            + "; evaluate against the annotations the model was trained for"
        )
    to_gt_label = np.array([ground_truth.label_map.id(n) for n in labels], np.int64)  # model (or labeller) id -> annotation id

    store, store_id_of, missing = _store_videos(request, checkpoint, scoped, labeller if isinstance(labeller, Checkpoint) else None)
    ceiling = _open_ceiling(request, ground_truth, store) if request.ceiling is not None else None  # refused before any inference

    workers = request.workers
    if workers is None:
        workers = 0 if len(store_id_of) < AUTO_RAY_VIDEOS else max(1, os.cpu_count() or 1)
    store_ids = list(store_id_of.values())
    started = time.perf_counter()
    if workers > 0:
        found = detect_store_on_ray(
            checkpoint_uri, request.features, store_ids, workers, request.batch_size,
            storage_options=request.storage_options, progress=request.progress,
        )  # fmt: skip
    else:
        wanted = set(store_ids)
        found = detect_sequences(
            checkpoint, (s for s in store if s.video_id in wanted), request.batch_size, progress=request.progress, total=len(wanted)
        )
    if labeller is not None:  # name the class-agnostic segments with the video's classes
        class_scores = _video_class_scores(labeller, labels, store, store_id_of)
        unlabelled = [vid for vid, sid in store_id_of.items() if sid not in class_scores]
        found = {
            sid: fuse_video_classifier(d, class_scores[sid], request.fuse_top_k) if sid in class_scores else d[:0]
            for sid, d in found.items()
        }
        if unlabelled:
            notes.append(
                f"{len(unlabelled)} videos have no classification in {request.classifier} and so no detections, e.g. {unlabelled[:3]}"
            )
    inference_seconds = time.perf_counter() - started

    # Detections under the annotation's video ids and label ids (names are the checkpoint's labels).
    detections = {}
    for vid, store_id in store_id_of.items():
        d = found[store_id]
        detections[vid] = Detections(vid, d.segments, d.scores, to_gt_label[d.labels])
    evaluated = replace(scoped, videos={vid: scoped.videos[vid] for vid in store_id_of})
    tiou = request.tiou
    if tiou is None:
        tiou = THUMOS14_TIOU if gt_format in THUMOS_LIKE else ACTIVITYNET_TIOU
    metrics = evaluate_detection(
        evaluated, detections, tiou, ignore_ambiguous=request.ignore_ambiguous, top_k=request.top_k, keep_curves=True
    )
    proposal_metrics = evaluate_proposals(evaluated, detections, tiou) if request.proposals else None
    dense_metrics = _dense_metrics(checkpoint, store, store_id_of, evaluated) if request.dense else None
    online_metrics = ceiling_metrics = None
    if request.online:
        online_tiou = THUMOS14_TIOU if request.tiou is None else request.tiou  # the OAD benchmark is THUMOS14
        online_metrics, ceiling_metrics = _online_metrics(request, checkpoint, ceiling, store, store_id_of, evaluated, online_tiou)

    out = request.output
    outputs = {"predictions": out / "predictions.json", "metrics": out / "metrics.json", "plot": out / "precision_recall.png"}
    if online_metrics is not None:
        outputs["online"] = out / "online_metrics.json"
    out.mkdir(parents=True, exist_ok=True)
    write_activitynet_results(
        outputs["predictions"], detections.values(), ground_truth.label_map,
        external_data={"used": False, "details": f"model {request.model}, features {request.features}"},
    )  # fmt: skip
    model_classes = set(labels)
    report = ModelEvaluationReport(
        metrics=metrics,
        proposal_metrics=proposal_metrics,
        ground_truth_format=gt_format,
        checkpoint=checkpoint_uri,
        videos=list(store_id_of),
        missing_from_store=missing,
        unknown_classes=[n for n in metrics.class_names if n not in model_classes],
        subsets=ground_truth.subsets,
        workers=workers,
        inference_seconds=inference_seconds,
        outputs=outputs,
        dense_metrics=dense_metrics,
        notes=tuple(notes),
        online_metrics=online_metrics,
        ceiling_metrics=ceiling_metrics,
    )
    if request.diagnose:
        diagnosis, paths = run_diagnosis(evaluated, detections, tiou, out, gt_format, ignore_ambiguous=request.ignore_ambiguous)
        outputs.update(paths)
        report = replace(report, diagnosis=diagnosis)
    agnostic = ground_truth.label_map.names[0] if labeller is None and is_class_agnostic(checkpoint) else None
    inputs = recorded_inputs(request.annotations, outputs["predictions"], tiou, request.subset, request.ignore_ambiguous, request.top_k,
                             model=request.model, class_agnostic=agnostic)  # fmt: skip
    write_json_atomic(outputs["metrics"], {**report.to_dict(), "inputs": inputs}, indent=2)
    if online_metrics is not None:
        online_out = {"model": request.model, "online": online_metrics.to_dict()}
        if ceiling_metrics is not None:
            online_out["ceiling_model"] = request.ceiling
            online_out["ceiling"] = ceiling_metrics.to_dict()
        write_json_atomic(outputs["online"], online_out, indent=2)

    # Here, not at the top: importing jobs.plots switches matplotlib to Agg, which a notebook importing this module must not get.
    from jobs.plots import plot_detection_metrics, plot_timeline

    plot_detection_metrics(metrics, outputs["plot"])
    timeline_tiou = 0.5 if 0.5 in np.round(tiou, 6) else float(tiou[len(tiou) // 2])
    for vid in list(store_id_of)[: request.timeline_videos]:
        video = evaluated.videos[vid]
        path = out / "timelines" / f"{safe_file_name(vid)}.png"
        plot_timeline(path, vid, video, detections[vid], ground_truth.label_map, video.duration, tiou=timeline_tiou)
    if request.timeline_videos and store_id_of:
        outputs["timelines"] = out / "timelines"
    if request.report:
        outputs["report"] = write_report(outputs["metrics"])
    return report


@dataclass(frozen=True)
class ClassifierEvaluationReport:
    """``tal evaluate --model`` of a video classifier: ActivityNet's classification task."""

    metrics: ClassificationMetrics
    ground_truth_format: str
    checkpoint: str
    videos: list[str]  # evaluated (annotation ids)
    missing_from_store: list[str]
    inference_seconds: float
    outputs: dict[str, Path]

    def to_dict(self) -> dict:
        return {
            **self.metrics.to_dict(),
            "ground_truth_format": self.ground_truth_format,
            "model": self.checkpoint,
            "missing_from_store": self.missing_from_store,
            "inference_seconds": round(self.inference_seconds, 3),
        }


def run_classifier(
    request: ModelEvaluationRequest, checkpoint: Checkpoint, checkpoint_uri: str, ground_truth, scoped
) -> ClassifierEvaluationReport:
    """A video classifier over the store's annotated videos: ActivityNet's classification mAP and hit@k, and its
    scores as the official classification JSON (``classification.json``: what ``--classifier FILE.json`` reads)."""
    wrong = [
        flag for flag, on in (("--dense", request.dense), ("--proposals", request.proposals), ("--classifier", request.classifier)) if on
    ]
    if wrong:
        raise UsageError(f"{', '.join(wrong)}: {request.model} is a video classifier, which has no segments")
    unknown = [n for n in checkpoint.labels if n not in ground_truth.label_map]
    if unknown:
        raise UsageError(f"{len(unknown)} classes of the classifier are not in {request.annotations}: {unknown[:5]}")
    store, store_id_of, missing = _store_videos(request, checkpoint, scoped)
    started = time.perf_counter()
    by_store_id = _video_class_scores(checkpoint, list(checkpoint.labels), store, store_id_of)
    inference_seconds = time.perf_counter() - started
    gt_id = [ground_truth.label_map.id(n) for n in checkpoint.labels]
    scores = {vid: dict(zip(gt_id, by_store_id[sid].tolist())) for vid, sid in store_id_of.items()}
    evaluated = replace(scoped, videos={vid: scoped.videos[vid] for vid in store_id_of})
    metrics = evaluate_classification(evaluated, scores, top_k=request.top_k)
    out = request.output
    out.mkdir(parents=True, exist_ok=True)
    outputs = {"classification": out / "classification.json", "metrics": out / "metrics.json"}
    write_video_classification(outputs["classification"], {vid: by_store_id[sid] for vid, sid in store_id_of.items()},
                               LabelMap.from_names(checkpoint.labels))  # fmt: skip
    report = ClassifierEvaluationReport(
        metrics, ground_truth.format or "activitynet", checkpoint_uri, list(store_id_of), missing, inference_seconds, outputs
    )
    write_json_atomic(outputs["metrics"], report.to_dict(), indent=2)
    return report


def format_classifier_report(report: ClassifierEvaluationReport, request: ModelEvaluationRequest) -> str:
    m = report.metrics
    lines = [
        f"model         {request.model} (a video classifier" + (f", {report.checkpoint})" if report.checkpoint != request.model else ")"),
        f"annotations   {request.annotations}: {m.num_videos:,} labelled videos of {len(m.class_names)} classes evaluated "
        f"({report.inference_seconds:.1f} s of inference)",
    ]
    if report.missing_from_store:
        lines.append(
            f"warning       {len(report.missing_from_store)} annotated videos are not in the feature store: {report.missing_from_store[:5]}"
        )
    lines.append(f"  classification mAP: {100 * m.mAP:.2f}%  " + "  ".join(f"hit@{k} {100 * v:.2f}%" for k, v in m.hit_at_k.items()))
    lines.append("")
    lines += [f"  {name:<14} -> {path}" for name, path in report.outputs.items()]
    return "\n".join(lines)


def _store_videos(request: ModelEvaluationRequest, checkpoint: Checkpoint, scoped, labeller: Checkpoint | None = None):
    """``(store, {annotation id: store id}, annotated videos missing from the store)``, after checking that the store's
    features fit the checkpoint (and its labeller): ``UsageError`` otherwise, or when no annotated video is in the store."""
    store = FeatureStore(request.features, options=request.storage_options)
    try:
        provenance = store.provenance
        for model in (checkpoint, labeller):
            if model is not None:
                model.check_features(provenance.feature_dim, provenance.to_dict())
        in_store = store.status().done
    except (CheckpointError, StoreError) as e:
        raise UsageError(f"{request.features}: {e}") from None
    store_id_of = {}  # annotation id -> store id (ActivityNet's v_ prefix may differ)
    missing = []
    for vid in scoped.videos:
        store_id = next((c for c in video_id_candidates(vid) if c in in_store), None)
        if store_id is None:
            missing.append(vid)
        else:
            store_id_of[vid] = store_id
    where = f"{request.annotations}" + (f" (subset {request.subset})" if request.subset else "")
    if not store_id_of:
        raise UsageError(f"none of the {len(scoped)} videos of {where} is in the feature store {request.features}")
    return store, store_id_of, missing


def _labeller(request: ModelEvaluationRequest, checkpoint: Checkpoint) -> tuple[Checkpoint | dict | None, list[str], list[str]]:
    """What names a class-agnostic model's segments: ``(a classifier checkpoint or {video: {label: score}} of a
    classification JSON, or None; the labels detections will carry; notes for the report)``."""
    agnostic = is_class_agnostic(checkpoint)
    if request.classifier is None:
        notes = []
        if agnostic:
            notes.append(
                f"{request.model} is class-agnostic: scored against the annotations with every class as {checkpoint.labels[0]!r} "
                "(name its segments with --classifier: a video classifier or a classification JSON)"
            )
        return None, list(checkpoint.labels), notes
    if not agnostic:
        raise UsageError(
            f"--classifier names the segments of a class-agnostic detector; {request.model} is a {checkpoint.config.arch} of "
            f"{checkpoint.config.num_classes} classes that names its own"
        )
    if request.fuse_top_k < 1:
        raise UsageError(f"--fuse-top-k must be >= 1, got {request.fuse_top_k} (ActivityNet practice: 2)")
    if request.classifier.endswith(".json"):
        try:
            scores = read_video_classification(request.classifier)
        except FileNotFoundError:
            raise UsageError(f"--classifier {request.classifier}: no such file") from None
        except AnnotationFormatError as e:
            raise UsageError(f"--classifier {request.classifier}: {e}") from None
        labels = sorted({name for video in scores.values() for name in video})
        how = f"fused with the video classes of {request.classifier} (top {request.fuse_top_k} per video)"
        return scores, labels, [how]
    try:
        classifier, where = load_model(request.classifier, request.storage_options)
    except FileNotFoundError as e:
        raise UsageError(f"--classifier {request.classifier}: no such checkpoint file {e.filename or request.classifier}") from None
    except ValueError as e:
        raise UsageError(f"--classifier {request.classifier}: {e}") from None
    if classifier.config.task != "classification":
        raise UsageError(f"--classifier {request.classifier} is a {classifier.config.arch} detector, not a video classifier")
    how = f"fused with the video classifier {request.classifier} ({where}; top {request.fuse_top_k} classes per video)"
    return classifier, list(classifier.labels), [how]


def _video_class_scores(
    labeller: Checkpoint | dict, labels: list[str], store: FeatureStore, store_id_of: dict[str, str]
) -> dict[str, np.ndarray]:
    """``{store id: [K] class scores in the order of labels}`` of the evaluated videos: from the classifier (in this
    process: one pass over the features) or from the classification JSON (a class a video's entry lacks scores 0)."""
    wanted = set(store_id_of.values())
    if isinstance(labeller, Checkpoint):
        model = labeller.build()
        return {seq.video_id: model.classify(seq.features) for seq in store if seq.video_id in wanted}
    column = {name: i for i, name in enumerate(labels)}
    out = {}
    for vid, store_id in store_id_of.items():
        entry = next((labeller[c] for c in video_id_candidates(vid) if c in labeller), None)
        if entry is not None:
            scores = np.zeros(len(labels), np.float64)
            for name, score in entry.items():
                scores[column[name]] = score
            out[store_id] = scores
    return out


def _dense_metrics(checkpoint, store: FeatureStore, store_id_of: dict[str, str], ground_truth) -> DenseMetrics:
    """The per-frame mAP of a dense checkpoint over the evaluated videos: every feature step's centre is a
    frame, scored by the model's per-step probabilities (in this process; the columns are reordered to the
    annotation's classes, and an annotated class the model lacks scores 0)."""
    model = checkpoint.build().eval()
    column_of = {name: i for i, name in enumerate(checkpoint.labels)}
    columns = [column_of.get(ground_truth.label_map.name(i)) for i in ground_truth.label_map.ids]
    wanted = {store_id: vid for vid, store_id in store_id_of.items()}
    frames = {}
    for seq in store:
        if seq.video_id not in wanted:
            continue
        steps = model.sequence_scores(seq.features)  # [T, K_model]
        scores = np.zeros((len(steps), len(columns)), np.float32)
        for j, col in enumerate(columns):
            if col is not None:
                scores[:, j] = steps[:, col]
        frames[wanted[seq.video_id]] = (seq.timing.centers(len(steps)), scores)
    return evaluate_dense(ground_truth, frames)


def _open_ceiling(request: ModelEvaluationRequest, ground_truth, store: FeatureStore) -> Checkpoint:
    """The ``--ceiling`` checkpoint, checked: an offline detector of segments that fits the store's features and whose
    classes the annotations know (``UsageError`` otherwise)."""
    ceiling, _ = open_model(request.ceiling, request.storage_options)
    where = f"--ceiling {request.ceiling}"
    if ceiling.config.family == "online" or ceiling.config.task == "classification":
        raise UsageError(f"{where}: the ceiling is an offline detector of segments, not a {ceiling.config.arch} ({ceiling.config.family})")
    try:
        ceiling.check_features(store.provenance.feature_dim, store.provenance.to_dict())
    except (CheckpointError, StoreError) as e:
        raise UsageError(f"{where}: {e}") from None
    unknown = [n for n in ceiling.labels if n not in ground_truth.label_map]
    if unknown:
        raise UsageError(f"{where}: {len(unknown)} of its classes are not in {request.annotations}: {unknown[:5]}")
    return ceiling


def _online_metrics(
    request: ModelEvaluationRequest,
    checkpoint: Checkpoint,
    ceiling: Checkpoint | None,
    store: FeatureStore,
    store_id_of: dict[str, str],
    ground_truth,
    tiou,
) -> tuple[OnlineMetrics, OnlineMetrics | None]:
    """The online figures (``tal_models.evaluation.online``) of an online checkpoint over the evaluated videos, in this
    process: its events as streamed step by step (``stream_events``) and its per-step scores at the step centres; with
    a ``ceiling`` the same figures for that offline model, its frames at the same step centres."""
    import torch

    model = checkpoint.build().eval()
    names = ground_truth.label_map.names  # annotation columns, in id order
    to_column = np.array([names.index(n) for n in checkpoint.labels], np.int64)  # model column -> annotation column
    wanted = {store_id: vid for vid, store_id in store_id_of.items()}
    events, scores, times = {}, {}, {}
    with torch.no_grad():
        for seq in store:
            if seq.video_id not in wanted:
                continue
            vid = wanted[seq.video_id]
            steps = np.asarray(model.step_scores(seq.features), np.float32)  # [T, K_model]
            frame_scores = np.zeros((len(steps), len(names)), np.float32)  # an annotated class the model lacks scores 0
            frame_scores[:, to_column] = steps
            times[vid] = seq.timing.centers(len(steps))
            scores[vid] = (times[vid], frame_scores)
            events[vid] = [replace(e, label=int(to_column[e.label])) for e in model.stream_events(seq.features, seq.timing)]
    online = evaluate_online(ground_truth, events, scores, tiou_thresholds=tiou)
    if ceiling is None:
        return online, None
    to_id = np.array([ground_truth.label_map.id(n) for n in ceiling.labels], np.int64)
    found = detect_sequences(ceiling, (s for s in store if s.video_id in wanted), request.batch_size)
    detections = {wanted[sid]: Detections(wanted[sid], d.segments, d.scores, to_id[d.labels]) for sid, d in found.items()}
    return online, evaluate_offline(ground_truth, detections, times, tiou_thresholds=tiou)


def format_online_table(online: OnlineMetrics, ceiling: OnlineMetrics | None) -> list[str]:
    """The online figures, one row per model: per-frame mAP, average instance mAP, latency, instances reported."""
    tiou = online.detection.tiou
    span = f"{tiou[0]:.1f}:{tiou[-1]:.1f}" if len(tiou) > 1 else f"{tiou[0]:.2f}"
    header = f"  {'':<9}  frame mAP(%)  avg mAP {span}(%)  latency median / p90 (s)  detected"
    lines = ["", header, "  " + "-" * (len(header) - 2)]
    for name, m in (("online", online), ("ceiling", ceiling)):
        if m is None:
            continue
        lat = m.latency
        latency = f"{lat.median:.2f} / {lat.p90:.2f}" if lat.num_detected else "-"
        detected = f"{100 * lat.fraction_detected:.1f}% ({lat.num_detected}/{lat.num_ground_truth})" if lat.num_ground_truth else "-"
        frame = f"{100 * m.frame_mAP:.2f}" if np.isfinite(m.frame_mAP) else "-"
        lines.append(f"  {name:<9}  {frame:>12}  {100 * m.average_mAP:>{len(span) + 12}.2f}  {latency:>25}  {detected}")
    return lines


def run_diagnosis(
    ground_truth,
    detections: Mapping[str, Detections],
    tiou: np.ndarray,
    out_dir: Path,
    gt_format: str,
    *,
    subset: str | None = None,
    ignore_ambiguous: bool = False,
) -> tuple[Diagnosis, dict[str, Path]]:
    """``--diagnose``: DETAD's analysis (THUMOS14's bins for THUMOS-style ground truth, else ActivityNet's), written
    as ``out_dir/diagnosis.json`` and ``out_dir/diagnosis/*.png``."""
    from jobs.diagnosis import write_diagnosis  # not at the top: importing it switches matplotlib to Agg

    bins = "thumos14" if gt_format in THUMOS_LIKE else "activitynet"
    diagnosis = diagnose(ground_truth, detections, tiou, subset=subset, ignore_ambiguous=ignore_ambiguous, bins=bins)
    return diagnosis, write_diagnosis(diagnosis, out_dir)


def safe_file_name(video_id: str) -> str:
    """``video_id`` as one file name: path separators and other odd characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", video_id).lstrip(".") or "_"


def format_model_report(report: ModelEvaluationReport, request: ModelEvaluationRequest) -> str:
    m = report.metrics
    where = "in this process" if report.workers == 0 else f"on Ray, {report.workers} actors"
    rate = len(report.videos) / max(report.inference_seconds, 1e-9)
    lines = [
        f"model         {request.model}" + (f" ({report.checkpoint})" if report.checkpoint != request.model else ""),
        f"annotations   {request.annotations} ({report.ground_truth_format}"
        + (f", subset {request.subset}" if request.subset else "")
        + f"): {m.num_ground_truth:,} instances of {len(m.class_names)} classes in the {len(report.videos):,} videos evaluated",
        f"inference     {len(report.videos):,} videos of {request.features} {where}: {report.inference_seconds:.1f} s ({rate:.1f} videos/s), "
        f"{m.num_predictions:,} detections",
    ]
    if report.missing_from_store:
        shown = ", ".join(repr(v) for v in report.missing_from_store[:5])
        more = f" and {len(report.missing_from_store) - 5} more" if len(report.missing_from_store) > 5 else ""
        lines.append(
            f"warning       {len(report.missing_from_store)} annotated videos are not in the feature store and were not evaluated: {shown}{more}"
        )
    if request.subset is None and len(report.subsets) > 1:
        lines.append(f"note          the annotations have subsets {report.subsets}; all were evaluated (use --subset)")
    lines += [f"note          {n}" for n in report.notes]
    if report.unknown_classes:
        classes = report.unknown_classes
        lines.append(f"note          the model does not predict {len(classes)} annotated classes (their AP is 0): {classes[:5]}")
    lines += _metric_table(report.metrics, report.proposal_metrics)
    if report.dense_metrics is not None:
        d = report.dense_metrics
        lines.append(
            f"per-frame mAP {d.mAP:.4f}  ({d.num_frames:,} frames of {d.num_videos:,} videos, {d.num_classes_evaluated} classes with positives)"
        )
    if report.online_metrics is not None:
        lines += format_online_table(report.online_metrics, report.ceiling_metrics)
    lines.append("")
    for name, path in report.outputs.items():
        lines.append(f"  {name:<11} -> {path}")
    return "\n".join(lines)
