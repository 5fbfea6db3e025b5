"""``tal evaluate``: score an ActivityNet results JSON against ground truth.

Thin on purpose: read the two files, call ``tal_models.evaluation``, print and write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.errors import UsageError
from pipelines.annotations import read_activitynet_results, read_annotations
from pipelines.annotations.errors import write_json_atomic
from tal_models.evaluation import (
    ACTIVITYNET_TIOU,
    THUMOS14_TIOU,
    DetectionMetrics,
    ProposalMetrics,
    evaluate_detection,
    evaluate_proposals,
)

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


@dataclass(frozen=True)
class EvaluationReport:
    metrics: DetectionMetrics
    proposal_metrics: ProposalMetrics | None
    ground_truth_format: str
    unknown_labels: dict[str, int]
    subsets: list[str]

    def to_dict(self) -> dict:
        out = self.metrics.to_dict()
        out["unknown_labels"] = self.unknown_labels
        out["ground_truth_format"] = self.ground_truth_format
        if self.proposal_metrics is not None:
            out["proposals"] = self.proposal_metrics.to_dict()
        return out


def run(request: EvaluationRequest) -> EvaluationReport:
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
    if request.output is not None:
        request.output.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(request.output, report.to_dict(), indent=2)
    if request.plot is not None:
        from jobs.plots import plot_detection_metrics  # matplotlib only when asked

        plot_detection_metrics(metrics, request.plot)
    return report


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
        lines.append(f"ignored       {m.num_ignored_predictions:,} predictions of classes absent from this ground truth or of other subsets' videos")
    if report.unknown_labels:
        shown = ", ".join(f"{k!r} ({v})" for k, v in sorted(report.unknown_labels.items(), key=lambda kv: -kv[1])[:5])
        more = f" and {len(report.unknown_labels) - 5} more" if len(report.unknown_labels) > 5 else ""
        lines.append(f"unknown       {sum(report.unknown_labels.values()):,} predictions with labels not in the ground truth: {shown}{more}")
    if m.unknown_videos:
        lines.append(
            f"unknown       {len(m.unknown_videos)} predicted videos are not in the ground truth (their predictions count as false positives), e.g. {m.unknown_videos[0]!r}"
        )
    header = "  tIoU    mAP(%)" + "".join(f"  R@{k}x(%)" for k in m.recall_at_k)
    lines += ["", header, "  " + "-" * (len(header) - 2)]
    for i, t in enumerate(m.tiou):
        recalls = "".join(f"  {100 * r[i]:7.2f}" for r in m.recall_at_k.values())
        lines.append(f"  {t:4.2f}   {100 * m.mAP[i]:7.2f}{recalls}")
    lines.append(f"  average mAP: {100 * m.average_mAP:.2f}%")
    if report.proposal_metrics is not None:
        p = report.proposal_metrics.to_dict()
        lines.append(
            "  proposals: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in p.items() if k.startswith("AR@")) + f"  AUC {100 * p['AUC']:.2f}"
        )
    return "\n".join(lines)
