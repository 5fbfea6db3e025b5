"""Error analysis of a temporal action detector after DETAD (Alwassel et al., "Diagnosing Error in
Temporal Action Detectors", ECCV 2018), written from the definitions of its public code.

Legend: N predictions, G ground-truth instances, T tIoU thresholds, K classes with ground truth.

Matching is the ActivityNet matching of ``detection`` (per class, predictions by decreasing score,
each taking the unmatched ground truth of its video with the highest tIoU), as
``detection.match_instances``, which also says *which* instance each true positive took, ``matched [T, N]``.

Normalised AP (DETAD's AP_N). Precision is computed as if every class had the same number of
instances, the average ``G / K``: with recall ``r`` and ``fp`` false positives so far,
``precision_N = r * (G / K) / (r * (G / K) + fp)``. Every figure below except ``average_mAP``
uses AP_N, interpolated as in VOC 2011 and averaged over classes and thresholds.

False positives (over the top predictions). Each class keeps only its ``limit_factor * G_c``
best-scored predictions (``G_c`` its instances). At each threshold, a prediction is a true
positive when matched; otherwise it is classified by the ground truth of its video (any class)
with the highest tIoU, the first such instance in file order on ties:
- tIoU >= threshold, same label: double detection (the instance was already taken);
- tIoU >= threshold, other label: wrong label;
- 0.1 <= tIoU < threshold, same label: localisation error;
- 0.1 <= tIoU < threshold, other label: confusion;
- otherwise (or no ground truth in the video): background.
The profile ``breakdown[type][k-1]`` is the share of that type among the predictions ranked in
``((k-1) G_c, k G_c]`` of their class (DETAD's bars "kG" are these bands, not cumulative tops;
``breakdown_cumulative`` gives the top ``k G_c``), per threshold, then averaged over thresholds.
``removed_gain[type]`` is the average-mAP_N of the limited predictions with that type's predictions
deleted (per threshold: a prediction of that type at that threshold) minus the average-mAP_N of
the limited predictions (``normalized_average_mAP``). DETAD deletes, it does not relocate.

False negatives (all predictions). As DETAD, a match only counts while the running normalised
precision of its class exceeds 0.05 (``min_normalized_precision``); an instance that no counting
prediction took is a false negative. ``rate`` per bin = false negatives / instances of the bin,
averaged over thresholds (None for an empty bin; an infinite edge is written None).

Sensitivity (all predictions). For one bin of a characteristic, each class keeps its instances in
the bin and the predictions that, at every threshold, are either unmatched or matched to one of
those instances; AP_N is computed with that class's instances in the bin (and the global ``G / K``),
averaged over thresholds, then over the classes with instances in the bin.

Characteristics of a ground-truth instance and DETAD's bins (right-closed, the first also closed on
the left; ``BIN_PRESETS``): ``length`` = end - start in seconds; ``coverage`` = length / the video's
duration; ``num_instances`` = ground-truth instances of all classes in its video.
  activitynet: coverage 0,.2,.4,.6,.8,1 (XS..XL); length 0,30,60,120,180,inf s; num_instances -1,1,4,8,inf (XS..L)
  thumos14:    coverage 0,.02,.04,.06,.08,1;     length 0,3,6,12,18,inf s;     num_instances -1,1,40,80,inf
An instance outside every bin (coverage > 1, unknown duration) is left out of that characteristic only.

Left out: DETAD's ActivityNet-only characteristics that need extra human annotation (context size,
context distance, annotator agreement, and its multi-segment evaluation). Differences from its
code: instances of zero length and coverage > 1 stay in the analysis (so ``average_mAP`` is
``evaluate_detection``'s); predictions of classes without ground truth are ignored as in
``evaluate_detection`` (DETAD fails on them); ``ignore_ambiguous`` only affects ``average_mAP``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tal_models.evaluation.detection import (
    FlatGroundTruth,
    FlatPredictions,
    _prepare,
    evaluate_detection,
    flatten,
    interpolated_ap,
    match_instances,
)
from tal_models.structures import AnnotationSet, Detections
from tal_models.structures import tiou as segment_tiou

FP_TYPES = ("true_positive", "double_detection", "wrong_label", "localization", "confusion", "background")
ERROR_TYPES = FP_TYPES[1:]
CHARACTERISTICS = ("coverage", "length", "num_instances")
MIN_TIOU = 0.1  # below it, an unmatched prediction is background
FN_MIN_NORMALIZED_PRECISION = 0.05

_SIZES5 = ["XS", "S", "M", "L", "XL"]
BIN_PRESETS: dict[str, dict[str, tuple[list[float], list[str]]]] = {
    "activitynet": {
        "coverage": ([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], _SIZES5),
        "length": ([0.0, 30.0, 60.0, 120.0, 180.0, math.inf], _SIZES5),
        "num_instances": ([-1.0, 1.0, 4.0, 8.0, math.inf], _SIZES5[:4]),
    },
    "thumos14": {
        "coverage": ([0.0, 0.02, 0.04, 0.06, 0.08, 1.0], _SIZES5),
        "length": ([0.0, 3.0, 6.0, 12.0, 18.0, math.inf], _SIZES5),
        "num_instances": ([-1.0, 1.0, 40.0, 80.0, math.inf], _SIZES5[:4]),
    },
}


@dataclass(frozen=True)
class Diagnosis:
    """What ``diagnose`` found; ``to_dict`` is the JSON form (see the module docstring).

    ``prediction_types`` (not serialised): video id -> ``[T, n]`` index into ``FP_TYPES`` of each of
    the video's predictions at each threshold, -1 where it was not analysed (beyond the top
    ``limit_factor * G_c`` of its class, or ignored)."""

    tiou: list[float]
    limit_factor: int
    num_ground_truth: int
    num_predictions: int
    average_mAP: float
    normalized_average_mAP: float  # over the limited predictions: the base of removed_gain
    bins: str
    false_positives: dict
    false_negatives: dict
    sensitivity: dict
    prediction_types: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "tiou": [round(float(t), 10) for t in self.tiou],
            "limit_factor": int(self.limit_factor),
            "num_ground_truth": int(self.num_ground_truth),
            "num_predictions": int(self.num_predictions),
            "average_mAP": float(self.average_mAP),
            "normalized_average_mAP": float(self.normalized_average_mAP),
            "bins": self.bins,
            "false_positives": self.false_positives,
            "false_negatives": self.false_negatives,
            "sensitivity": self.sensitivity,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Diagnosis:
        return cls(
            tiou=[float(t) for t in d["tiou"]],
            limit_factor=int(d["limit_factor"]),
            num_ground_truth=int(d["num_ground_truth"]),
            num_predictions=int(d["num_predictions"]),
            average_mAP=float(d["average_mAP"]),
            normalized_average_mAP=float(d.get("normalized_average_mAP", float("nan"))),
            bins=str(d.get("bins", "")),
            false_positives=dict(d["false_positives"]),
            false_negatives=dict(d["false_negatives"]),
            sensitivity=dict(d["sensitivity"]),
        )


def diagnose(
    ground_truth: AnnotationSet,
    detections: Mapping[str, Detections],
    tiou: np.ndarray,
    *,
    subset: str | None = None,
    limit_factor: int = 10,
    ignore_ambiguous: bool = False,
    bins: str | Mapping[str, tuple[Sequence[float], Sequence[str]]] = "activitynet",
    min_tiou: float = MIN_TIOU,
    min_normalized_precision: float = FN_MIN_NORMALIZED_PRECISION,
) -> Diagnosis:
    """DETAD's false-positive, false-negative and sensitivity analyses of ``detections`` (video id ->
    predictions in seconds) against ``ground_truth`` at the thresholds ``tiou [T]``.

    ``subset`` scopes the ground truth (predictions of its other subsets are ignored), as in
    ``evaluate_detection``. ``limit_factor`` k: the false-positive analysis keeps each class's top
    ``k G_c`` predictions. ``bins``: a name in ``BIN_PRESETS`` or ``{characteristic: (edges, labels)}``.
    ``min_tiou``: the localisation/confusion floor; ``min_normalized_precision``: the false-negative
    analysis's floor on running normalised precision (0 counts every match).
    """
    if limit_factor < 1:
        raise ValueError(f"limit_factor must be >= 1, got {limit_factor}")
    tiou = np.asarray(tiou, dtype=np.float64).reshape(-1)
    if len(tiou) == 0:
        raise ValueError("diagnose needs at least one tIoU threshold")
    bin_spec = _bin_spec(bins)
    metrics = evaluate_detection(ground_truth, detections, tiou, subset=subset, ignore_ambiguous=ignore_ambiguous)
    if subset is not None:
        scoped = ground_truth.subset(subset)
        detections = {vid: det for vid, det in detections.items() if not (vid in ground_truth and vid not in scoped)}
        ground_truth = scoped
    gt, pred, _, _, _ = flatten(ground_truth, detections)
    rank, pairs = _prepare(gt, pred)
    matched = match_instances(gt, pred, tiou, rank, pairs)  # [T, N]
    npos = np.bincount(gt.label, minlength=gt.num_classes)  # [K] G_c
    avg_npos = len(gt.label) / gt.num_classes if gt.num_classes else 0.0  # G / K
    by_class = [np.flatnonzero(pred.label == c)[np.argsort(rank[pred.label == c])] for c in range(gt.num_classes)]  # decreasing score

    false_positives, types, base = _false_positive_analysis(gt, pred, tiou, matched, by_class, npos, avg_npos, limit_factor, min_tiou)
    bin_of = {name: _bin_index(values, bin_spec[name][0]) for name, values in _characteristics(ground_truth, gt).items()}
    false_negatives = _false_negative_analysis(matched, by_class, npos, avg_npos, min_normalized_precision, bin_of, bin_spec)
    sensitivity = _sensitivity_analysis(matched, by_class, gt.label, npos, avg_npos, bin_of, bin_spec)

    prediction_types = _types_by_video(ground_truth, detections, types)
    return Diagnosis(
        tiou=tiou.tolist(),
        limit_factor=int(limit_factor),
        num_ground_truth=len(gt.label),
        num_predictions=int(len(pred.score)),
        average_mAP=metrics.average_mAP,
        normalized_average_mAP=base,
        bins=bins if isinstance(bins, str) else "custom",
        false_positives=false_positives,
        false_negatives=false_negatives,
        sensitivity=sensitivity,
        prediction_types=prediction_types,
    )


def _false_positive_analysis(
    gt: FlatGroundTruth, pred: FlatPredictions, tiou, matched, by_class, npos, avg_npos: float, limit_factor: int, min_tiou: float
) -> tuple[dict, np.ndarray, float]:
    """Types of each class's top ``limit_factor * G_c`` predictions, the profile by band of G_c, the gain of deleting each
    type. Returns the JSON part, ``types [T, N]`` (-1: not analysed) and the limited predictions' average-mAP_N."""
    position = np.empty(len(pred.score), np.int64)
    for rows in by_class:
        position[rows] = np.arange(len(rows))
    band = position // np.maximum(npos[pred.label], 1)  # [N] 0 for the top G_c, 1 for the next G_c...
    limited = band < limit_factor
    types = np.full((len(tiou), len(pred.score)), -1, np.int64)
    types[:, limited] = _fp_types(gt, pred, tiou, matched, min_tiou)[:, limited]
    limited_by_class = [rows[limited[rows]] for rows in by_class]
    tp = matched >= 0
    base = float(_normalized_ap(tp, limited_by_class, npos, avg_npos).mean()) if gt.num_classes else 0.0
    gains = {}
    for code, name in enumerate(FP_TYPES[1:], start=1):
        removed = _normalized_ap(tp, limited_by_class, npos, avg_npos, keep=types != code)
        gains[name] = float(removed.mean()) - base if gt.num_classes else 0.0
    bands = [_shares(types[:, limited & (band == k)]) for k in range(limit_factor)]
    tops = [_shares(types[:, limited & (band <= k)]) for k in range(limit_factor)]
    analysis = {
        "types": list(FP_TYPES),
        "top_k": list(range(1, limit_factor + 1)),
        "min_tiou": float(min_tiou),
        "num_analysed": int(limited.sum()),
        "breakdown": {name: [b[i] for b in bands] for i, name in enumerate(FP_TYPES)},
        "breakdown_cumulative": {name: [b[i] for b in tops] for i, name in enumerate(FP_TYPES)},
        "removed_gain": gains,
    }
    return analysis, types, base


def _false_negative_analysis(matched, by_class, npos, avg_npos: float, floor: float, bin_of, bin_spec) -> dict:
    """Share of the instances that no counting match found, overall and per bin, averaged over thresholds."""
    t, g = matched.shape[0], len(next(iter(bin_of.values())))
    counted = _counting_matches(matched, by_class, npos, avg_npos, floor)
    found = np.zeros((t, g + 1), bool)  # the last column absorbs -1
    found[np.arange(t)[:, None], np.where(counted, matched, -1)] = True
    missed = ~found[:, :g]  # [T, G]
    out: dict = {"min_normalized_precision": float(floor), "overall_rate": float(missed.mean(axis=1).mean()) if g else None}
    for name, (edges, labels) in bin_spec.items():
        b = bin_of[name]
        count = np.bincount(b[b >= 0], minlength=len(labels))
        out[name] = {
            "bins": list(labels),
            "edges": [float(e) if math.isfinite(e) else None for e in edges],
            "count": count.tolist(),
            "rate": [float(missed[:, b == i].mean(axis=1).mean()) if count[i] else None for i in range(len(labels))],
        }
    return out


def _sensitivity_analysis(matched, by_class, gt_label, npos, avg_npos: float, bin_of, bin_spec) -> dict:
    """Average-mAP_N overall and restricted to each bin's instances."""
    overall = float(_normalized_ap(matched >= 0, by_class, npos, avg_npos).mean()) if len(by_class) else 0.0
    out: dict = {"overall_normalized_ap": overall}
    for name, (_, labels) in bin_spec.items():
        per_bin = [_bin_normalized_ap(matched, by_class, gt_label, bin_of[name], i, avg_npos) for i in range(len(labels))]
        present = [v for v in per_bin if v is not None]
        out[name] = {
            "bins": list(labels),
            "normalized_ap": per_bin,
            "min": min(present) if present else None,
            "max": max(present) if present else None,
        }
    return out


def _bin_spec(bins) -> dict[str, tuple[list[float], list[str]]]:
    if isinstance(bins, str):
        if bins not in BIN_PRESETS:
            raise ValueError(f"unknown bins {bins!r}; choose one of {sorted(BIN_PRESETS)} or pass {{characteristic: (edges, labels)}}")
        return BIN_PRESETS[bins]
    spec = {}
    for name in CHARACTERISTICS:
        edges, labels = bins[name]
        if len(labels) != len(edges) - 1 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"bins for {name}: {len(edges)} increasing edges need {len(edges) - 1} labels")
        spec[name] = ([float(e) for e in edges], list(labels))
    return spec


def _fp_types(gt: FlatGroundTruth, pred: FlatPredictions, tiou: np.ndarray, matched: np.ndarray, min_tiou: float) -> np.ndarray:
    """``[T, N]`` index into FP_TYPES of every prediction (see the module docstring)."""
    n = len(pred.score)
    best = np.zeros(n)  # highest tIoU with any ground truth of the video
    best_label = np.full(n, -1, np.int64)
    for v in np.unique(pred.video[pred.video >= 0]):
        rows = np.flatnonzero(pred.video == v)
        cols = np.flatnonzero(gt.video == v)  # file order: argmax takes the first of equal tIoUs
        if len(cols) == 0:
            continue
        overlap = segment_tiou(pred.segments[rows, None, :], gt.segments[None, cols, :])  # [n_v, G_v]
        arg = overlap.argmax(axis=1)
        best[rows] = overlap[np.arange(len(rows)), arg]
        best_label[rows] = gt.label[cols[arg]]
    same = best_label == pred.label
    has_gt = best_label >= 0
    out = np.full((len(tiou), n), FP_TYPES.index("background"), np.int64)
    for ti, thr in enumerate(tiou):
        near = has_gt & (best >= thr)
        loose = has_gt & (best >= min_tiou) & ~near
        out[ti, near & same] = FP_TYPES.index("double_detection")
        out[ti, near & ~same] = FP_TYPES.index("wrong_label")
        out[ti, loose & same] = FP_TYPES.index("localization")
        out[ti, loose & ~same] = FP_TYPES.index("confusion")
    out[matched >= 0] = FP_TYPES.index("true_positive")
    return out


def _normalized_ap(
    tp: np.ndarray, by_class: list[np.ndarray], npos: np.ndarray, avg_npos: float, keep: np.ndarray | None = None
) -> np.ndarray:
    """AP_N ``[T, K]`` of the predictions ``by_class`` (rows in decreasing score), ``tp [T, N]``;
    ``keep [T, N]`` drops predictions per threshold."""
    t = tp.shape[0]
    ap = np.zeros((t, len(by_class)))
    for c, rows in enumerate(by_class):
        if npos[c] == 0:
            continue
        for ti in range(t):
            r = rows if keep is None else rows[keep[ti, rows]]
            if len(r) == 0:
                continue
            ap[ti, c] = _ap_n(tp[ti, r], npos[c], avg_npos)
    return ap


def _ap_n(tp: np.ndarray, npos: int, avg_npos: float) -> float:
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(~tp, dtype=np.float64)
    recall = tp_cum / npos
    denom = recall * avg_npos + fp_cum
    precision = np.divide(recall * avg_npos, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(interpolated_ap(precision[None], recall[None])[0])


def _counting_matches(matched: np.ndarray, by_class: list[np.ndarray], npos, avg_npos: float, floor: float) -> np.ndarray:
    """``[T, N]`` True where a match counts: the running AP_N precision of its class exceeds ``floor``."""
    counted = np.zeros(matched.shape, bool)
    for c, rows in enumerate(by_class):
        if npos[c] == 0 or len(rows) == 0:
            continue
        tp = matched[:, rows] >= 0
        recall = np.cumsum(tp, axis=1, dtype=np.float64) / npos[c]
        fp_cum = np.cumsum(~tp, axis=1, dtype=np.float64)
        denom = recall * avg_npos + fp_cum
        precision = np.divide(recall * avg_npos, denom, out=np.zeros_like(denom), where=denom > 0)
        counted[:, rows] = tp & (precision > floor)
    return counted


def _characteristics(ground_truth: AnnotationSet, gt: FlatGroundTruth) -> dict[str, np.ndarray]:
    """Per instance ``[G]``: length (s), coverage (NaN without a duration), instances in its video."""
    length = gt.segments[:, 1] - gt.segments[:, 0]
    duration = np.array([v.duration if v.duration and v.duration > 0 else np.nan for v in ground_truth], np.float64)
    per_video = np.bincount(gt.video, minlength=len(duration)).astype(np.float64)
    return {
        "length": length,
        "coverage": length / duration[gt.video] if len(gt.video) else length,
        "num_instances": per_video[gt.video] if len(gt.video) else length,
    }


def _bin_index(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bins ``(e_i, e_i+1]``, the first closed on the left too; -1 outside (or NaN)."""
    edges = np.asarray(edges, np.float64)
    idx = np.searchsorted(edges, values, side="left") - 1
    idx[values == edges[0]] = 0
    idx[~((values >= edges[0]) & (values <= edges[-1]))] = -1
    return idx


def _bin_normalized_ap(matched: np.ndarray, by_class, gt_label: np.ndarray, gt_bin: np.ndarray, b: int, avg_npos: float) -> float | None:
    """Sensitivity: AP_N restricted to the instances of bin ``b``, mean over thresholds then classes."""
    in_bin = np.append(gt_bin == b, True)  # the last entry: unmatched (-1) predictions stay
    npos = np.bincount(gt_label[gt_bin == b], minlength=len(by_class))
    per_class = []
    for c, rows in enumerate(by_class):
        if npos[c] == 0:
            continue
        rows = rows[in_bin[matched[:, rows]].all(axis=0)] if len(rows) else rows
        tp = matched[:, rows] >= 0
        per_class.append(np.mean([_ap_n(tp[ti], npos[c], avg_npos) if len(rows) else 0.0 for ti in range(len(tp))]))
    return float(np.mean(per_class)) if per_class else None


def _shares(types: np.ndarray) -> list[float]:
    """Share of each FP type among ``types [T, n]``, per threshold then averaged; zeros if n == 0."""
    if types.shape[1] == 0:
        return [0.0] * len(FP_TYPES)
    counts = np.stack([(types == code).mean(axis=1) for code in range(len(FP_TYPES))])  # [6, T]
    return counts.mean(axis=1).tolist()


def _types_by_video(ground_truth: AnnotationSet, detections: Mapping[str, Detections], types: np.ndarray) -> dict[str, np.ndarray]:
    """Split ``types [T, N]`` (flat, in ``flatten``'s order) back into each video's prediction order;
    predictions that ``flatten`` ignored (classes without ground truth) get -1."""
    present_ids = np.array(sorted({int(c) for v in ground_truth for c in v.labels}), np.int64)
    out, offset = {}, 0
    for vid, det in detections.items():
        labels = np.asarray(det.to_numpy().labels, np.int64)
        present = np.isin(labels, present_ids)
        per_video = np.full((types.shape[0], len(labels)), -1, np.int64)
        n = int(present.sum())
        per_video[:, present] = types[:, offset : offset + n]
        offset += n
        out[vid] = per_video
    return out
