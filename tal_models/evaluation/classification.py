"""Video-level classification metrics with the ActivityNet reference semantics.

Legend: V ground-truth videos, K classes of the label map, K_gt classes present in the ground
truth, N predictions (one per scored (video, class) pair), N_c predictions of class c.

The reference (ActivityNet's ``Evaluation/eval_classification.py``) works on (video, label)
pairs:

- the ground truth is the set of distinct (video, label) pairs of the evaluated subset; a video
  counts only if it has at least one annotation, a class only if some video has it;
- a prediction is one (video, label, score) triple; each class ranks its predictions by
  decreasing score (``argsort()[::-1]`` over the predictions in file order, which decides ties)
  and a prediction is a true positive when its video has that label and no higher-ranked
  prediction took it already. Predictions of videos without ground truth are false positives.
  AP is the VOC interpolated area under the precision/recall curve (``npos`` = the videos with
  the label); mAP is the mean over the classes of the ground truth;
- hit@k: per ground-truth video, its ``k`` best-scored predictions (same ``argsort()[::-1]``);
  a hit if any of its labels is among them; a video without predictions is a miss and still
  counts. "Avg hit@k" (the reference's ``avg=True``) is the fraction of a video's labels found.

Deliberate differences from the reference, each a corner where it crashes or misleads:
- a prediction of a class absent from the ground truth (the reference raises ``KeyError``) has
  no AP of its own but still takes one of its video's top-k places;
- with ``subset``, predictions of videos that the ground truth has in another subset are
  ignored, not false positives (as ``tal_models.evaluation.detection`` does);
- video ids match with or without ActivityNet's ``v_`` prefix (``AnnotationSet.resolve``);
  predictions of two spellings of one video are pooled, in the order given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tal_models.evaluation.detection import interpolated_ap
from tal_models.structures import AnnotationSet

ScoreTable = Mapping[str, "np.ndarray | Mapping[int, float]"]


@dataclass(frozen=True)
class ClassificationMetrics:
    """Everything ``evaluate_classification`` measured."""

    class_names: list[str]  # [K_gt] classes present in the ground truth, by label id
    ap: np.ndarray  # [K_gt] AP of each
    hit_at_k: dict[int, float]  # k -> fraction of videos with a label among their k best predictions
    avg_hit_at_k: dict[int, float]  # k -> mean over videos of the fraction of their labels found
    num_videos: int  # ground-truth videos with at least one label (the hit@k denominator)
    num_predicted_videos: int  # of those, videos with at least one prediction
    num_predictions: int  # (video, class) predictions evaluated
    num_ignored_predictions: int  # other subsets' videos
    unknown_videos: list[str]  # predicted videos without ground truth labels (their predictions are false positives)

    @property
    def mAP(self) -> float:
        return float(self.ap.mean()) if self.ap.size else 0.0

    @property
    def per_class_ap(self) -> dict[str, float]:
        return {name: float(a) for name, a in zip(self.class_names, self.ap)}

    def to_dict(self) -> dict:
        """The metrics JSON: ``mAP``, ``hit@k``, ``avg_hit@k``, ``per_class_AP``, counts."""
        return {
            "mAP": self.mAP,
            **{f"hit@{k}": v for k, v in self.hit_at_k.items()},
            **{f"avg_hit@{k}": v for k, v in self.avg_hit_at_k.items()},
            "per_class_AP": self.per_class_ap,
            "num_videos": self.num_videos,
            "num_predicted_videos": self.num_predicted_videos,
            "num_predictions": self.num_predictions,
            "num_ignored_predictions": self.num_ignored_predictions,
            "unknown_videos": list(self.unknown_videos),
        }


def _flat_scores(vid: str, scores: np.ndarray | Mapping[int, float], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One video's scores -> ``(labels [n] int64, scores [n] float64)`` in the order given (a ``[K]``
    array scores every class, in id order); a ``ValueError`` for a bad shape, label or score."""
    if isinstance(scores, Mapping):
        labels = np.fromiter((int(k) for k in scores), dtype=np.int64, count=len(scores))
        values = np.fromiter((float(v) for v in scores.values()), dtype=np.float64, count=len(scores))
    else:
        values = np.asarray(scores, dtype=np.float64)
        if values.shape != (num_classes,):
            raise ValueError(f"video {vid!r}: class scores must be [{num_classes}] (one per class of the label map), got {values.shape}")
        labels = np.arange(num_classes, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"video {vid!r}: label ids must lie in [0, {num_classes}), got {labels.tolist()[:10]}")
    if not np.isfinite(values).all():
        raise ValueError(f"video {vid!r}: non-finite class score")
    return labels, values


def evaluate_classification(
    ground_truth: AnnotationSet,
    scores: ScoreTable,
    top_k: Sequence[int] = (1, 3),
    *,
    subset: str | None = None,
) -> ClassificationMetrics:
    """ActivityNet untrimmed-video classification: AP per class, mAP, hit@k (module docstring).

    ``scores``: per video id, either ``[K]`` class scores (every class of
    ``ground_truth.label_map`` is then a prediction; e.g. ``VideoClassifier.classify``) or
    ``{label id: score}`` for the classes it predicts (e.g. a results file read with
    ``pipelines.annotations.read_video_classification``, names mapped to ids). The order of the
    videos and, within a video, of its classes is the file order that breaks score ties.
    ``ground_truth`` is restricted to ``subset`` first when given.
    """
    ks = [int(k) for k in top_k]
    if any(k < 1 for k in ks):
        raise ValueError(f"evaluate_classification: top_k values must be >= 1, got {list(top_k)}")
    num_classes = len(ground_truth.label_map)
    ignored = 0
    if subset is not None:
        scoped = ground_truth.subset(subset)
        kept = {}
        for vid, s in scores.items():
            if vid in ground_truth and vid not in scoped:
                ignored += len(s)
            else:
                kept[vid] = s
        ground_truth, scores = scoped, kept

    # ground truth: distinct labels of each video that has any
    gt_labels = {v.video_id: np.unique(v.labels) for v in ground_truth if len(v)}
    video_index = {vid: i for i, vid in enumerate(gt_labels)}
    present = np.unique(np.concatenate(list(gt_labels.values()))) if gt_labels else np.zeros(0, np.int64)
    has_label = np.zeros((len(gt_labels), num_classes), dtype=bool)  # [V, K]
    for vid, labels in gt_labels.items():
        has_label[video_index[vid], labels] = True

    # predictions, flat in the order given; video -1: no ground-truth labels
    p_video, p_label, p_score, unknown = [], [], [], []
    for vid, s in scores.items():
        labels, values = _flat_scores(vid, s, num_classes)
        resolved = ground_truth.resolve(vid)
        index = video_index.get(resolved, -1) if resolved is not None else -1
        if index < 0 and vid not in unknown:
            unknown.append(vid)
        p_video.append(np.full(labels.shape, index, np.int64))
        p_label.append(labels)
        p_score.append(values)
    video = np.concatenate(p_video) if p_video else np.zeros(0, np.int64)
    label = np.concatenate(p_label) if p_label else np.zeros(0, np.int64)
    score = np.concatenate(p_score) if p_score else np.zeros(0, np.float64)

    ap = np.array([_class_ap(video[label == c], score[label == c], has_label[:, c]) for c in present.tolist()])
    hits, avg_hits, predicted = _hits(video, label, score, has_label, ks)
    return ClassificationMetrics(
        class_names=[ground_truth.label_map.name(int(c)) for c in present],
        ap=ap.reshape(-1),
        hit_at_k=hits,
        avg_hit_at_k=avg_hits,
        num_videos=len(gt_labels),
        num_predicted_videos=predicted,
        num_predictions=int(score.size),
        num_ignored_predictions=ignored,
        unknown_videos=unknown,
    )


def _class_ap(video: np.ndarray, score: np.ndarray, positive: np.ndarray) -> float:
    """AP of one class: its predictions' ``video [N_c]`` (-1: none) and ``score [N_c]`` in file
    order, ``positive [V]`` the videos having the class."""
    npos = int(positive.sum())
    order = score.argsort()[::-1]  # the reference's order, ties included
    ranked = video[order]
    tp = np.zeros(ranked.size, dtype=bool)
    known = ranked >= 0
    tp[known] = positive[ranked[known]]
    # a video's label is taken once: a later prediction of the same (video, class) is a false positive
    first = np.zeros(ranked.size, dtype=bool)
    first[np.unique(ranked, return_index=True)[1]] = True
    tp &= first
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(~tp, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # npos = 0 cannot happen: the class is in the ground truth
        recall = tp_cum / npos
        precision = tp_cum / (tp_cum + fp_cum)
    return float(interpolated_ap(precision[None, :], recall[None, :])[0])


def _hits(
    video: np.ndarray, label: np.ndarray, score: np.ndarray, has_label: np.ndarray, ks: list[int]
) -> tuple[dict[int, float], dict[int, float], int]:
    """hit@k and avg hit@k over the ``V`` ground-truth videos, and how many have predictions."""
    num_videos = has_label.shape[0]
    hit = {k: np.zeros(num_videos) for k in ks}
    avg = {k: np.zeros(num_videos) for k in ks}
    known = np.flatnonzero(video >= 0)
    by_video = known[np.argsort(video[known], kind="stable")]  # each video's predictions, in the order given
    bounds = np.searchsorted(video[by_video], np.arange(num_videos + 1))
    predicted = 0
    for v in range(num_videos):
        members = by_video[bounds[v] : bounds[v + 1]]
        if members.size == 0:
            continue  # no prediction: a miss
        predicted += 1
        ranked = label[members[score[members].argsort()[::-1]]]  # the reference's order, ties included
        wanted = np.flatnonzero(has_label[v])
        for k in ks:
            found = np.isin(wanted, ranked[:k])
            avg[k][v] = found.mean()
            hit[k][v] = float(found.any())
    denominator = max(num_videos, 1)
    return (
        {k: float(h.sum() / denominator) for k, h in hit.items()},
        {k: float(a.sum() / denominator) for k, a in avg.items()},
        predicted,
    )
