"""Proposal metrics with the ActivityNet reference semantics: average recall at an average
number of proposals per video (AR@AN) and the area under the AR-AN curve.

Legend: V videos with ground truth, G ground-truth instances, P_max the most proposals kept
for one video, T tIoU thresholds, S = 100 points on the AN axis.

Reference semantics (ActivityNet's ``average_recall_vs_avg_nr_proposals``): labels are ignored;
each video keeps its top ``int(n x ratio)`` proposals by score, where ``ratio`` scales the whole
submission to ``max_avg_proposals`` per video; at each of 100 fractions of that budget a
ground-truth instance is recalled when any kept proposal reaches the threshold (no one-to-one
matching); recall is averaged over thresholds; the AUC is the trapezoid area under AR(AN)
divided by the largest AN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tal_models.evaluation.detection import ACTIVITYNET_TIOU
from tal_models.structures import AnnotationSet, Detections
from tal_models.structures import tiou as segment_tiou


@dataclass(frozen=True)
class ProposalMetrics:
    tiou: np.ndarray  # [T]
    proposals_per_video: np.ndarray  # [S] the AN axis
    recall: np.ndarray  # [T, S]
    num_ground_truth: int

    @property
    def average_recall(self) -> np.ndarray:
        """[S] recall averaged over thresholds."""
        return self.recall.mean(axis=0)

    @property
    def auc(self) -> float:
        """Area under AR(AN), normalised by the largest AN, in [0, 1] (ActivityNet prints x100)."""
        an, ar = self.proposals_per_video, self.average_recall
        if an[-1] <= 0:
            return 0.0
        return float(np.sum((an[1:] - an[:-1]) * (ar[1:] + ar[:-1]) / 2) / an[-1])

    def ar_at(self, an: float) -> float:
        """AR at ``an`` proposals per video (the nearest point of the curve at or below it)."""
        idx = int(np.searchsorted(self.proposals_per_video, an + 1e-9, side="right")) - 1
        return float(self.average_recall[max(idx, 0)])

    def to_dict(self, at: Sequence[int] = (1, 5, 10, 100)) -> dict:
        return {
            "tiou": [round(float(t), 10) for t in self.tiou],
            **{f"AR@{n}": self.ar_at(n) for n in at},
            "AUC": self.auc,
            "num_ground_truth": self.num_ground_truth,
        }


def evaluate_proposals(
    ground_truth: AnnotationSet,
    proposals: Mapping[str, Detections],
    tiou_thresholds: Sequence[float] | np.ndarray = ACTIVITYNET_TIOU,
    *,
    max_avg_proposals: float | None = 100,
    subset: str | None = None,
) -> ProposalMetrics:
    """AR-AN curve of class-agnostic ``proposals`` against ``ground_truth`` (see module doc)."""
    if subset is not None:
        ground_truth = ground_truth.subset(subset)
    tiou = np.asarray(tiou_thresholds, dtype=np.float64).reshape(-1)
    videos = [v for v in ground_truth if len(v) > 0]
    total = sum(len(d) for d in proposals.values())
    if not videos or total == 0:
        n = max(1, int(max_avg_proposals or 1))
        return ProposalMetrics(tiou, np.linspace(0.01, 1, 100) * n, np.zeros((len(tiou), 100)), ground_truth.num_instances)
    if max_avg_proposals is None:
        max_avg_proposals = total / len(videos)
    ratio = max_avg_proposals * len(videos) / total
    by_video = {}
    for vid, det in proposals.items():
        resolved = ground_truth.resolve(vid)
        if resolved is not None:
            by_video[resolved] = det.to_numpy()

    # Per video: the kept proposals, best first, and each instance's first recalling rank.
    kept = np.zeros(len(videos), np.int64)
    first_hit = []  # per video [T, n_gt] rank of the first proposal reaching the threshold
    for i, v in enumerate(videos):
        det = by_video.get(v.video_id)
        gt_seg = np.asarray(v.segments.data, np.float64)
        if det is None or len(det) == 0:
            # The reference scores such a video as one non-matching proposal column.
            kept[i] = 1
            first_hit.append(np.full((len(tiou), len(gt_seg)), np.iinfo(np.int64).max))
            continue
        order = np.asarray(det.scores).argsort()[::-1]
        n = min(int(len(order) * ratio), len(order))
        kept[i] = n
        seg = np.asarray(det.segments.data, np.float64)[order[:n]]
        values = segment_tiou(gt_seg[:, None, :], seg[None, :, :])  # [n_gt, n]
        reach = values[None, :, :] >= tiou[:, None, None]  # [T, n_gt, n]
        hit = reach.any(axis=2)
        first_hit.append(np.where(hit, reach.argmax(axis=2) if n else 0, np.iinfo(np.int64).max))
    total_kept = int(sum(k for k, v in zip(kept, videos) if v.video_id in by_video and len(by_video[v.video_id])))

    fractions = np.arange(1, 101) / 100.0 * (max_avg_proposals * len(videos) / max(total_kept, 1))
    positives = sum(len(v) for v in videos)
    recall = np.zeros((len(tiou), len(fractions)))
    for i, hits in enumerate(first_hit):
        budget = np.minimum((kept[i] * fractions).astype(int), kept[i])  # [S]
        recall += (hits[:, :, None] < budget[None, None, :]).sum(axis=1)
    recall /= positives
    an = fractions * (total_kept / len(videos))
    return ProposalMetrics(tiou, an, recall, positives)
