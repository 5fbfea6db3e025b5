"""Figures a person reads at a glance: precision/recall curves, per-class AP, per-video timelines (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from pipelines.atomic import atomic_path
from tal_models.evaluation import DetectionMetrics, evaluate_detection
from tal_models.structures import AnnotationSet, Detections, LabelMap, VideoAnnotation, pairwise_tiou

RECALL_GRID = np.linspace(0, 1, 101)


def interpolated_pr(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """Precision envelope [T, 101] on a recall grid: best precision at recall >= r (0 beyond reach)."""
    out = np.zeros((precision.shape[0], len(RECALL_GRID)))
    for t in range(precision.shape[0]):
        envelope = np.maximum.accumulate(precision[t, ::-1])[::-1]
        idx = np.searchsorted(recall[t], RECALL_GRID, side="left")
        inside = idx < len(envelope)
        out[t, inside] = envelope[idx[inside]]
    return out


def plot_detection_metrics(metrics: DetectionMetrics, path: str | os.PathLike) -> None:
    """Left: class-averaged interpolated PR curve per tIoU. Right: per-class AP (mean over tIoU)."""
    if not metrics.curves and metrics.num_predictions > 0:  # no predictions at all (e.g. a young dense model): empty curves
        raise ValueError("plotting needs the PR curves: evaluate with keep_curves=True")
    n_classes = len(metrics.class_names)
    fig, (ax_pr, ax_ap) = plt.subplots(1, 2, figsize=(14, max(5, 0.22 * n_classes + 1.5)), gridspec_kw={"width_ratios": [1, 1.2]})
    mean_pr = np.zeros((len(metrics.tiou), len(RECALL_GRID)))
    for name in metrics.class_names:
        if name in metrics.curves:
            mean_pr += interpolated_pr(*metrics.curves[name])
    mean_pr /= max(n_classes, 1)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(metrics.tiou)))
    for t, (thr, color) in enumerate(zip(metrics.tiou, colors)):
        ax_pr.plot(RECALL_GRID, mean_pr[t], color=color, label=f"tIoU {thr:.2f}  mAP {100 * metrics.mAP[t]:.1f}")
    ax_pr.set(xlabel="recall", ylabel="precision (interpolated, mean over classes)", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set_title(f"Precision / recall  (average mAP {100 * metrics.average_mAP:.2f}%)")
    ax_pr.grid(alpha=0.3)
    ax_pr.legend(fontsize=8, loc="upper right")

    per_class = metrics.ap.mean(axis=0)
    order = np.argsort(per_class)
    y = np.arange(n_classes)
    ax_ap.barh(y, 100 * per_class[order], color="#3b75af")
    ax_ap.set_yticks(y, [metrics.class_names[i] for i in order], fontsize=7 if n_classes > 40 else 9)
    ax_ap.set(xlabel="AP (%) averaged over tIoU thresholds", xlim=(0, 100))
    ax_ap.set_title("Per-class AP")
    ax_ap.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path, dpi=110)


def _save(fig: plt.Figure, path: str | os.PathLike, dpi: int) -> None:
    """Write ``fig`` atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def shown_detections(detections: Detections, max_detections: int = 20, min_score: float = 0.1) -> Detections:
    """The detections a timeline draws: the ``max_detections`` best with ``score >= min_score``."""
    d = detections.to_numpy().sorted_by_score()
    return d[np.flatnonzero(d.scores >= min_score)[:max_detections]]


def timeline_summary(
    ground_truth: VideoAnnotation | None, detections: Detections, shown: Detections, label_map: LabelMap, tiou: float = 0.5
) -> str:
    """One line for a timeline's title: the video's AP at ``tiou`` (all its detections, mean over
    its ground-truth classes) and how many ground-truth instances a shown detection of the same
    class overlaps with tIoU >= ``tiou``."""
    gt_segments = np.zeros((0, 2)) if ground_truth is None else np.asarray(ground_truth.segments.data, np.float64)
    gt_labels = np.zeros(0, np.int64) if ground_truth is None else ground_truth.labels
    if len(gt_labels) == 0:
        return f"no ground truth; {len(detections)} detections"
    video = AnnotationSet({ground_truth.video_id: ground_truth}, label_map)
    ap = evaluate_detection(video, {ground_truth.video_id: detections.to_numpy()}, [tiou]).mAP[0]
    found = 0
    if len(shown):
        overlap = pairwise_tiou(gt_segments, np.asarray(shown.segments.data, np.float64))  # [G, D]
        same_class = gt_labels[:, None] == shown.labels[None, :]
        found = int(((overlap >= tiou) & same_class).any(axis=1).sum())
    return f"AP@{tiou:g} {100 * ap:.1f}%   ground truth found (shown, tIoU >= {tiou:g}): {found}/{len(gt_labels)}"


def plot_timeline(
    path: str | os.PathLike,
    video_id: str,
    ground_truth: VideoAnnotation | None,
    detections: Detections,
    label_map: LabelMap,
    duration: float | None = None,
    *,
    tiou: float = 0.5,
    max_detections: int = 20,
    min_score: float = 0.1,
) -> None:
    """One video at a glance: time (s) across, one row per class in the ground truth or among the
    shown detections (``shown_detections``); ground truth as solid bars in the upper half of a
    row, detections as translucent bars (opacity = score) in the lower half.

    ``detections`` are in seconds with labels of ``label_map`` (the ground truth's);
    ``duration`` (s) sets the axis, else the latest segment end does.
    """
    shown = shown_detections(detections, max_detections, min_score)
    gt_segments = np.zeros((0, 2)) if ground_truth is None else np.asarray(ground_truth.segments.data, np.float64)
    gt_labels = np.zeros(0, np.int64) if ground_truth is None else ground_truth.labels
    det_segments = np.asarray(shown.segments.data, np.float64).reshape(-1, 2)
    classes = sorted({int(c) for c in gt_labels} | {int(c) for c in shown.labels})
    row = {c: i for i, c in enumerate(classes)}
    if duration is None or not duration > 0:
        duration = max(1.0, float(np.max(np.concatenate([gt_segments[:, 1], det_segments[:, 1], [0.0]]))))
    palette = plt.cm.tab10 if len(classes) <= 10 else plt.cm.tab20

    fig, ax = plt.subplots(figsize=(12, 1.6 + 0.5 * max(len(classes), 1)))
    for c in classes:
        color = palette(row[c] % palette.N)
        y = row[c]
        gt = gt_segments[gt_labels == c]
        ax.barh(np.full(len(gt), y - 0.2), gt[:, 1] - gt[:, 0], left=gt[:, 0], height=0.36, color=color, edgecolor="black", linewidth=0.6)
        mine = shown.labels == c
        det, scores = det_segments[mine], shown.scores[mine]
        rgba = np.tile(matplotlib.colors.to_rgba(color), (len(det), 1))
        rgba[:, 3] = 0.1 + 0.85 * np.clip(scores, 0.0, 1.0)
        ax.barh(np.full(len(det), y + 0.2), det[:, 1] - det[:, 0], left=det[:, 0], height=0.36, color=rgba, edgecolor=rgba, linewidth=0.8)
    ax.set_yticks(range(len(classes)), [label_map.name(c) for c in classes])
    ax.set_ylim(max(len(classes), 1) - 0.5, -0.5)  # first class on top
    if not classes:
        ax.text(0.5, 0.5, f"no ground truth and no detection with score >= {min_score:g}", transform=ax.transAxes, ha="center", va="center")
    for y in range(len(classes) - 1):
        ax.axhline(y + 0.5, color="0.85", linewidth=0.8)
    ax.set(xlim=(0, duration), xlabel="time (s)")
    ax.grid(axis="x", alpha=0.3)
    summary = timeline_summary(ground_truth, detections, shown, label_map, tiou)
    ax.set_title(
        f"{video_id}   ({duration:.1f} s, {len(gt_labels)} ground-truth segments, {len(detections)} detections)\n{summary}",
        fontsize=10,
        loc="left",
    )
    ax.legend(
        handles=[
            Patch(facecolor="0.4", edgecolor="black", label="ground truth"),
            Patch(facecolor="0.4", alpha=0.45, label=f"detections: top {max_detections}, score >= {min_score:g}, opacity = score"),
        ],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),  # above the axes, beside the title
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    _save(fig, path, dpi=100)
