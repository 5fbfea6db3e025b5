"""Detection metrics with the ActivityNet reference semantics, vectorised over thresholds.

Legend: N predictions, G ground-truth instances, T tIoU thresholds, K classes,
G_max the most ground truth of one class in one video, A predictions handled in one step.

The reference (ActivityNet's ``compute_average_precision_detection``) visits the predictions
of a class one by one in decreasing score order; each takes the not-yet-matched ground truth of
its video with the highest tIoU, and is a true positive if that tIoU reaches the threshold. AP
is the VOC interpolated area under the precision/recall curve; mAP averages the classes present
in the ground truth; average mAP averages the thresholds.

Greedy matching is sequential only *within* one (class, video) group: groups never share ground
truth. So step k below handles the k-th prediction of every group at once, for all classes and
all thresholds together, and the number of steps is the size of the largest group rather than
the number of predictions. Ties are broken exactly as the reference breaks them (it uses
``argsort()[::-1]``), which matters for bit-identical AP when scores or tIoUs are equal.

Deliberate differences from the reference, each a corner where it misbehaves:
- two zero-length segments at the same instant have tIoU 1, not 0/0 = NaN (see ``structures``);
- predictions of videos that the ground truth has in *another* subset are ignored, not counted
  as false positives (they would otherwise punish evaluating one subset of a full submission);
  predictions of videos absent from the ground truth are false positives, as in the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tal_models.structures import AnnotationSet, Detections
from tal_models.structures import tiou as segment_tiou

THUMOS14_TIOU = np.linspace(0.3, 0.7, 5)
ACTIVITYNET_TIOU = np.linspace(0.5, 0.95, 10)
THUMOS14_WEAK_TIOU = np.linspace(0.1, 0.7, 7)  # the weakly supervised papers' THUMOS14 protocol


@dataclass(frozen=True)
class FlatGroundTruth:
    """Ground truth as flat arrays: ``video [G]`` index, ``label [G]`` class column 0..K-1,
    ``segments [G, 2]`` seconds, in file order. ``ambiguous_*`` likewise, without labels."""

    video: np.ndarray
    label: np.ndarray
    segments: np.ndarray
    num_classes: int
    ambiguous_video: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ambiguous_segments: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


@dataclass(frozen=True)
class FlatPredictions:
    """Predictions as flat arrays in file order: ``video [N]`` (-1: not in the ground truth),
    ``label [N]`` class column (-1: class absent from the ground truth), ``segments [N, 2]``,
    ``score [N]``."""

    video: np.ndarray
    label: np.ndarray
    segments: np.ndarray
    score: np.ndarray


@dataclass(frozen=True)
class DetectionMetrics:
    """Everything ``evaluate_detection`` measured. Arrays are indexed [threshold, class]."""

    tiou: np.ndarray  # [T]
    class_names: list[str]  # [K] classes present in the ground truth
    ap: np.ndarray  # [T, K]
    recall_at_k: dict[int, np.ndarray]  # k -> [T] mean over classes of Recall@k x
    num_ground_truth: int
    num_predictions: int  # predictions evaluated
    num_ignored_predictions: int  # other subsets' videos or classes without ground truth
    unknown_videos: list[str]  # predicted videos absent from the ground truth (false positives)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)  # class -> (precision [T, n], recall [T, n])

    @property
    def mAP(self) -> np.ndarray:
        """[T] mean AP over classes."""
        return self.ap.mean(axis=1) if self.ap.shape[1] else np.zeros(len(self.tiou))

    @property
    def average_mAP(self) -> float:
        return float(self.mAP.mean())

    @property
    def per_class_ap(self) -> dict[str, list[float]]:
        return {name: self.ap[:, k].tolist() for k, name in enumerate(self.class_names)}

    def to_dict(self) -> dict:
        """The metrics JSON: ``tiou``, ``mAP`` (same order), ``average_mAP``, ``per_class_AP``..."""
        return {
            "tiou": [round(float(t), 10) for t in self.tiou],
            "mAP": self.mAP.tolist(),
            "average_mAP": self.average_mAP,
            "per_class_AP": self.per_class_ap,
            "recall_at_k": {f"R@{k}x": r.tolist() for k, r in self.recall_at_k.items()},
            "num_ground_truth": self.num_ground_truth,
            "num_predictions": self.num_predictions,
            "num_ignored_predictions": self.num_ignored_predictions,
            "unknown_videos": self.unknown_videos,
        }


def flatten(
    ground_truth: AnnotationSet, predictions: Mapping[str, Detections]
) -> tuple[FlatGroundTruth, FlatPredictions, list[str], int, list[str]]:
    """Lay ground truth and predictions out as aligned flat arrays.

    Returns the two tables, the class names of the columns (classes present in the ground
    truth, by id), the number of predictions ignored, and predicted videos unknown to the
    ground truth. Predicted video ids match with or without the ``v_`` prefix.
    """
    videos = list(ground_truth.videos)
    video_index = {vid: i for i, vid in enumerate(videos)}
    present = sorted({int(c) for v in ground_truth for c in v.labels})
    column = np.full(max(present, default=-1) + 2, -1, dtype=np.int64)  # id -> column, -1 elsewhere
    column[present] = np.arange(len(present))
    names = [ground_truth.label_map.name(c) for c in present]

    def columns_of(labels: np.ndarray) -> np.ndarray:
        inside = (labels >= 0) & (labels < len(column) - 1)
        return np.where(inside, column[np.where(inside, labels, len(column) - 1)], -1)

    gt_video, gt_label, gt_seg, amb_video, amb_seg = [], [], [], [], []
    for i, v in enumerate(ground_truth):
        gt_video.append(np.full(len(v), i, np.int64))
        gt_label.append(columns_of(v.labels))
        gt_seg.append(np.asarray(v.segments.data, np.float64))
        amb_video.append(np.full(len(v.ambiguous), i, np.int64))
        amb_seg.append(np.asarray(v.ambiguous.data, np.float64))
    gt = FlatGroundTruth(
        video=_cat(gt_video, np.int64),
        label=_cat(gt_label, np.int64),
        segments=_cat(gt_seg, np.float64, (0, 2)),
        num_classes=len(present),
        ambiguous_video=_cat(amb_video, np.int64),
        ambiguous_segments=_cat(amb_seg, np.float64, (0, 2)),
    )

    p_video, p_label, p_seg, p_score = [], [], [], []
    ignored, unknown = 0, []
    for vid, det in predictions.items():
        det = det.to_numpy()
        resolved = ground_truth.resolve(vid)
        if resolved is None:
            resolved_index = -1
            unknown.append(vid)
        elif resolved not in video_index:  # pragma: no cover - resolve() only returns known ids
            continue
        else:
            resolved_index = video_index[resolved]
        p_video.append(np.full(len(det), resolved_index, np.int64))
        p_label.append(columns_of(det.labels))
        p_seg.append(np.asarray(det.segments.data, np.float64))
        p_score.append(np.asarray(det.scores, np.float64))
    pred = FlatPredictions(
        video=_cat(p_video, np.int64),
        label=_cat(p_label, np.int64),
        segments=_cat(p_seg, np.float64, (0, 2)),
        score=_cat(p_score, np.float64),
    )
    keep = pred.label >= 0
    ignored += int((~keep).sum())
    pred = FlatPredictions(pred.video[keep], pred.label[keep], pred.segments[keep], pred.score[keep])
    return gt, pred, names, ignored, unknown


def _cat(parts: list[np.ndarray], dtype, empty_shape=(0,)) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype)


def evaluate_detection(
    ground_truth: AnnotationSet,
    predictions: Mapping[str, Detections],
    tiou_thresholds: Sequence[float] | np.ndarray = ACTIVITYNET_TIOU,
    *,
    subset: str | None = None,
    ignore_ambiguous: bool = False,
    top_k: Sequence[int] = (1, 5),
    keep_curves: bool = False,
) -> DetectionMetrics:
    """Detection AP per class and threshold, mAP, average mAP and Recall@k x.

    ``ground_truth`` is restricted to ``subset`` first when given; predictions of videos in other
    subsets are then ignored. ``ignore_ambiguous`` drops false positives that overlap a segment
    in ``VideoAnnotation.ambiguous`` (THUMOS14's rule for its Ambiguous class).
    """
    other_subsets = 0
    if subset is not None:
        scoped = ground_truth.subset(subset)
        kept = {}
        for vid, det in predictions.items():
            if vid in ground_truth and vid not in scoped:
                other_subsets += len(det)
            else:
                kept[vid] = det
        ground_truth, predictions = scoped, kept
    tiou = np.asarray(tiou_thresholds, dtype=np.float64).reshape(-1)
    gt, pred, names, ignored, unknown = flatten(ground_truth, predictions)
    prepared = _prepare(gt, pred)
    ap, curves = average_precision(
        gt, pred, tiou, ignore_ambiguous=ignore_ambiguous, keep_curves=keep_curves, _prepared=prepared
    )
    recall = topk_recall(gt, pred, tiou, top_k, _prepared=prepared)
    return DetectionMetrics(
        tiou=tiou,
        class_names=names,
        ap=ap,
        recall_at_k={k: r.mean(axis=1) if gt.num_classes else np.zeros(len(tiou)) for k, r in recall.items()},
        num_ground_truth=len(gt.label),
        num_predictions=len(pred.score),
        num_ignored_predictions=ignored + other_subsets,
        unknown_videos=unknown,
        curves={names[k]: c for k, c in curves.items()},
    )


# --- matching -------------------------------------------------------------------------------


def _class_rank(pred: FlatPredictions, num_classes: int) -> np.ndarray:
    """[N] position of each prediction in its class's decreasing-score order.

    Uses ``argsort()[::-1]`` on the class's scores in file order, exactly as the reference,
    so equal scores are ordered alike.
    """
    rank = np.empty(len(pred.score), np.int64)
    order_by_class = np.argsort(pred.label, kind="stable")
    bounds = np.searchsorted(pred.label[order_by_class], np.arange(num_classes + 1))
    for c in range(num_classes):
        members = order_by_class[bounds[c] : bounds[c + 1]]  # file order
        order = pred.score[members].argsort()[::-1]
        rank[members[order]] = np.arange(len(members))
    return rank


@dataclass(frozen=True)
class _Groups:
    """Each prediction's (class, video) group of ground truth: ``start [N]``, ``count [N]``
    into ``gt_order`` (ground truth sorted by group, file order within a group)."""

    start: np.ndarray
    count: np.ndarray
    gt_order: np.ndarray


def _groups(gt: FlatGroundTruth, pred: FlatPredictions) -> _Groups:
    n_videos = int(max(gt.video.max(initial=-1), pred.video.max(initial=-1))) + 1
    gt_key = gt.label * n_videos + gt.video
    gt_order = np.argsort(gt_key, kind="stable")
    sorted_keys = gt_key[gt_order]
    pred_key = np.where(pred.video >= 0, pred.label * n_videos + pred.video, -1)
    start = np.searchsorted(sorted_keys, pred_key, side="left")
    count = np.searchsorted(sorted_keys, pred_key, side="right") - start
    count[pred.video < 0] = 0
    return _Groups(start, count, gt_order)


def _gt_group_key(gt: FlatGroundTruth) -> np.ndarray:
    """[G] one integer per (class, video) group of the ground truth."""
    return gt.label * (int(gt.video.max(initial=0)) + 1) + gt.video


@dataclass(frozen=True)
class _Pairs:
    """Every (prediction, ground truth) pair of the same group, prediction by prediction and
    ground truth in file order within a prediction: ``pred [P]``, ``gt [P]``, ``tiou [P]``."""

    pred: np.ndarray
    gt: np.ndarray
    tiou: np.ndarray


def _pairs(gt: FlatGroundTruth, pred: FlatPredictions, groups: _Groups) -> _Pairs:
    rows = np.flatnonzero(groups.count > 0)
    counts = groups.count[rows]
    pred_row = np.repeat(rows, counts)
    offset = np.arange(len(pred_row)) - np.repeat(np.cumsum(counts) - counts, counts)
    gt_index = groups.gt_order[np.repeat(groups.start[rows], counts) + offset]
    return _Pairs(pred_row, gt_index, segment_tiou(pred.segments[pred_row], gt.segments[gt_index]))


def _ragged_position(keys: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal (sorted) ``keys``."""
    return np.arange(len(keys)) - np.searchsorted(keys, keys, side="left")


def _reference_order(pairs: _Pairs, floor: float) -> np.ndarray:
    """Indices of the pairs with tIoU >= ``floor``, each prediction's ground truth in the order
    the reference tries them: decreasing tIoU. Where a prediction has equal tIoUs among these
    candidates, the reference's own ``argsort()[::-1]`` over its whole row decides, the only
    way to reproduce its tie-breaking."""
    cand = np.flatnonzero(pairs.tiou >= floor)
    cand = cand[np.lexsort((-pairs.tiou[cand], pairs.pred[cand]))]
    p, v = pairs.pred[cand], pairs.tiou[cand]
    tied = np.unique(p[1:][(p[1:] == p[:-1]) & (v[1:] == v[:-1])])
    if len(tied) == 0:
        return cand
    key = np.zeros(len(pairs.tiou), np.int64)
    key[cand] = _ragged_position(p)
    bounds_lo = np.searchsorted(pairs.pred, tied, side="left")
    bounds_hi = np.searchsorted(pairs.pred, tied, side="right")
    for lo, hi in zip(bounds_lo, bounds_hi):
        order = pairs.tiou[lo:hi].argsort()[::-1]
        key[lo + order] = np.arange(hi - lo)
    return cand[np.lexsort((key[cand], pairs.pred[cand]))]


def match(
    gt: FlatGroundTruth, pred: FlatPredictions, tiou: np.ndarray, rank: np.ndarray, pairs: _Pairs
) -> np.ndarray:
    """Greedy matching of the reference -> ``tp [T, N]`` (bool)."""
    return match_instances(gt, pred, tiou, rank, pairs) >= 0


def match_instances(
    gt: FlatGroundTruth, pred: FlatPredictions, tiou: np.ndarray, rank: np.ndarray, pairs: _Pairs
) -> np.ndarray:
    """Greedy matching of the reference -> ``matched [T, N]``: the ground-truth row each prediction took, -1 if none
    (a false positive at that threshold). The error analysis (``diagnosis``) needs the instance, the AP only ``>= 0``."""
    t, n = len(tiou), len(pred.score)
    matched = np.full((t, n), -1, np.int64)
    cand = _reference_order(pairs, float(tiou.min()))
    if len(cand) == 0:
        return matched  # every prediction is a false positive at every threshold
    # Compact [A, C] layout of the candidates: A contested predictions, C the most candidates.
    cand_pred = pairs.pred[cand]
    rows = np.unique(cand_pred)
    column = _ragged_position(cand_pred)
    row_of = np.searchsorted(rows, cand_pred)
    values = np.full((len(rows), int(column.max()) + 1), -np.inf)
    gt_index = np.full(values.shape, -1, np.int64)
    values[row_of, column] = pairs.tiou[cand]
    gt_index[row_of, column] = pairs.gt[cand]

    # Step k handles the k-th contested prediction (in score order) of every group at once.
    group = _gt_group_key(gt)[gt_index[:, 0]]  # any ground truth of the group names it
    by_group = np.lexsort((rank[rows], group))
    step = np.empty(len(rows), np.int64)
    step[by_group] = _ragged_position(group[by_group])

    locked = np.zeros((t, len(gt.label) + 1), dtype=bool)  # last column absorbs padding (-1)
    reaches = values[None, :, :] >= tiou[:, None, None]  # [T, A, C]
    step_order = np.argsort(step, kind="stable")
    step_bounds = np.searchsorted(step[step_order], np.arange(step.max() + 2))
    for k in range(step.max() + 1):
        a = step_order[step_bounds[k] : step_bounds[k + 1]]  # at most one prediction per group
        cols = gt_index[a]  # [A_k, C]
        free = reaches[:, a, :] & ~locked[:, cols]  # [T, A_k, C]
        hit = free.any(axis=2)  # [T, A_k]
        chosen = np.take_along_axis(np.broadcast_to(cols, free.shape), free.argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
        ti, ai = np.nonzero(hit)
        locked[ti, chosen[ti, ai]] = True
        matched[:, rows[a]] = np.where(hit, chosen, -1)
    return matched


def _ambiguous_overlap(gt: FlatGroundTruth, pred: FlatPredictions) -> np.ndarray:
    """[N] True where a prediction overlaps an ambiguous segment of its video."""
    out = np.zeros(len(pred.score), dtype=bool)
    if len(gt.ambiguous_video) == 0:
        return out
    for v in np.unique(gt.ambiguous_video):
        rows = np.flatnonzero(pred.video == v)
        if len(rows):
            amb = gt.ambiguous_segments[gt.ambiguous_video == v]
            out[rows] = (segment_tiou(pred.segments[rows, None, :], amb[None, :, :]) > 0).any(axis=1)
    return out


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """VOC 2011 interpolated AP of each row of ``precision``/``recall [T, n]`` -> ``[T]``.

    Precision is made monotone from the right; AP sums precision x recall increments at the
    points where recall changes (recall padded with 0 in front and 1 behind, precision with 0).
    """
    t = precision.shape[0]
    mprec = np.hstack([np.zeros((t, 1)), precision, np.zeros((t, 1))])
    mrec = np.hstack([np.zeros((t, 1)), recall, np.ones((t, 1))])
    mprec = np.maximum.accumulate(mprec[:, ::-1], axis=1)[:, ::-1]
    step = mrec[:, 1:] - mrec[:, :-1]
    return np.where(step != 0, step * mprec[:, 1:], 0.0).sum(axis=1)


def average_precision(
    gt: FlatGroundTruth,
    pred: FlatPredictions,
    tiou: np.ndarray,
    *,
    ignore_ambiguous: bool = False,
    keep_curves: bool = False,
    _prepared: tuple[np.ndarray, _Pairs] | None = None,
) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """AP ``[T, K]`` for flat tables (classes by column), and optionally the PR curves."""
    rank, pairs = _prepared if _prepared is not None else _prepare(gt, pred)
    tp = match(gt, pred, tiou, rank, pairs)
    ignored = np.zeros_like(tp)
    if ignore_ambiguous:
        ignored = ~tp & _ambiguous_overlap(gt, pred)[None, :]
    npos = np.bincount(gt.label, minlength=gt.num_classes)
    ap = np.zeros((len(tiou), gt.num_classes))
    curves: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    by_class = np.lexsort((rank, pred.label))
    bounds = np.searchsorted(pred.label[by_class], np.arange(gt.num_classes + 1))
    for c in range(gt.num_classes):
        rows = by_class[bounds[c] : bounds[c + 1]]  # decreasing score
        if len(rows) == 0 or npos[c] == 0:
            continue
        tp_c = tp[:, rows]
        tp_cum = np.cumsum(tp_c, axis=1, dtype=np.float64)
        fp_cum = np.cumsum(~tp_c & ~ignored[:, rows], axis=1, dtype=np.float64)
        recall = tp_cum / npos[c]
        seen = tp_cum + fp_cum
        precision = np.divide(tp_cum, seen, out=np.zeros_like(tp_cum), where=seen > 0)
        ap[:, c] = interpolated_ap(precision, recall)
        if keep_curves:
            curves[c] = (precision, recall)
    return ap, curves


def _prepare(gt: FlatGroundTruth, pred: FlatPredictions) -> tuple[np.ndarray, _Pairs]:
    return _class_rank(pred, gt.num_classes), _pairs(gt, pred, _groups(gt, pred))


def topk_recall(
    gt: FlatGroundTruth,
    pred: FlatPredictions,
    tiou: np.ndarray,
    top_k: Sequence[int] = (1, 5),
    *,
    _prepared: tuple[np.ndarray, _Pairs] | None = None,
) -> dict[int, np.ndarray]:
    """Recall@k x per class, ``{k: [T, K]}`` (Ego4D): a ground-truth instance is recalled when
    one of the top ``k x n`` predictions of its class in its video (``n`` = that video's
    instances of the class) reaches the threshold; no one-to-one matching. A class without
    predictions has recall 0.

    Predictions are ranked by their class's score order; with equal scores exactly at the
    cut-off, the reference's per-video ``argsort`` may keep a different one of them.
    """
    t, kk = len(tiou), gt.num_classes
    rank, pairs = _prepared if _prepared is not None else _prepare(gt, pred)
    npos = np.bincount(gt.label, minlength=kk)
    out = {int(k): np.zeros((t, kk)) for k in top_k}
    if len(pairs.pred) == 0:
        return out
    # Rank of each paired prediction within its (class, video) group.
    rows = np.unique(pairs.pred)
    first_gt = pairs.gt[np.searchsorted(pairs.pred, rows)]
    keys = _gt_group_key(gt)
    group = keys[first_gt]
    by_group = np.lexsort((rank[rows], group))
    position = np.empty(len(rows), np.int64)
    position[by_group] = _ragged_position(group[by_group])
    group_size = np.bincount(keys)[group]
    pair_position = position[np.searchsorted(rows, pairs.pred)]
    pair_size = group_size[np.searchsorted(rows, pairs.pred)]
    for k in out:
        in_top = pair_position < k * pair_size
        for ti, thr in enumerate(tiou):
            recalled = np.zeros(len(gt.label), dtype=bool)
            recalled[pairs.gt[in_top & (pairs.tiou >= thr)]] = True
            out[k][ti] = np.bincount(gt.label, weights=recalled, minlength=kk)
        out[k] = out[k] / np.maximum(npos, 1)
    return out
