"""Figures a person reads at a glance: precision/recall curves and per-class AP (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tal_models.evaluation import DetectionMetrics

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
    if not metrics.curves:
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
