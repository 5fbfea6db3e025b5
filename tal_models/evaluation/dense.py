"""Per-frame mAP of the dense multi-label protocols (MultiTHUMOS, Charades localisation).

Legend: F sampled frames (of one video, or of all videos together), K classes, N segments.

The protocol: sample frames of every video; a frame is positive for class k when a ground-truth
segment of class k covers its time; for each class, rank ALL sampled frames of ALL videos by
that class's score and compute the non-interpolated AP, the mean of the precision at the rank of
every positive frame,

    AP_k = (1 / P_k) * sum over positive frames f of  (positives ranked <= f) / rank(f)

(``THUMOSeventclspr`` of Charades_v1_localize, the ``APMeter`` of super-events / PDAN / MS-TCT);
the mAP is the mean of AP_k over classes. What the reference implementations do, and what we do:

- Sampling. super-events / PDAN / MS-TCT score every feature step of a video and place step
  ``i`` of ``F`` at ``i * duration / F`` seconds (``fps = F / duration``); Charades_v1_localize
  takes 25 frames per video at ``j * duration / 25``. ``frame_times(duration, num_frames=F)`` is
  that grid (``num_frames=25`` for Charades); ``evaluate_dense`` takes whatever times the caller
  scored, so another grid (e.g. step centres, ``FeatureTiming.centers``) is a choice, not a bug.
- Boundaries. super-events / PDAN / MS-TCT label frame ``t`` positive iff ``start < t < end``
  (strict: a zero-length segment labels nothing); Charades_v1_localize uses ``start <= t <= end``.
  ``boundary="open"`` (the default, MultiTHUMOS) or ``"closed"`` (Charades).
- Classes without positive frames. ``APMeter`` divides by ``max(P_k, 1)``, i.e. gives AP 0, and
  its mean counts them; the Python ports of the Charades evaluator give NaN (and ``np.mean``
  then NaN; some use ``nanmean``). Default ``empty_classes="exclude"``: their AP is NaN and the
  mAP averages the classes with positives; ``"zero"`` reproduces ``APMeter``'s mean.
- Ties. ``torch.sort`` (``APMeter``) and ``np.argsort`` (Python Charades ports) do not define
  the order of equal scores; MATLAB's ``sort`` (Charades_v1_localize.m) keeps input order.
  ``ties="stable"`` (default) keeps input order: videos in ground-truth order, frames in the
  order given. ``ties="grouped"`` is order-free: every positive in a run of equal scores gets
  the precision at the end of the run (scikit-learn's ``average_precision_score``).
- Videos. The references skip a ground-truth video that has no scores, silently; here it is a
  ``ValueError`` (a partial evaluation should be asked for, by passing a subset of the ground
  truth). Scored videos absent from the ground truth cannot be labelled, so they are ignored
  (as in the references) and listed in ``DenseMetrics.ignored_videos``.
- Charades' ``-inf`` for a missing frame: scores may be ``±inf`` (ranked last / first); NaN is
  an error.

Cost: one stable sort of all frames per class; MultiTHUMOS test at 10 steps per second (~300k
frames x 65 classes) takes seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from tal_models.structures import AnnotationSet, LabelMap, VideoAnnotation

Boundary = Literal["open", "closed"]
Ties = Literal["stable", "grouped"]
EmptyClasses = Literal["exclude", "zero"]

CHARADES_FRAMES_PER_VIDEO = 25


def frame_times(duration: float, *, num_frames: int | None = None, fps: float | None = None) -> np.ndarray:
    """[F] sampling times (seconds, float64) over ``[0, duration)``; give exactly one of:

    ``num_frames``: ``F`` equally spaced frames at ``i * duration / F`` (the reference grid: the
    feature steps of super-events / PDAN / MS-TCT, or 25 frames for Charades_v1_localize);
    ``fps``: a frame every ``1 / fps`` seconds from 0 while ``t < duration``.
    """
    if (num_frames is None) == (fps is None):
        raise ValueError("frame_times needs exactly one of num_frames and fps")
    if not (np.isfinite(duration) and duration >= 0):
        raise ValueError(f"duration must be a finite number >= 0, got {duration}")
    if num_frames is not None:
        if isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 0:
            raise ValueError(f"num_frames must be a whole number >= 0, got {num_frames!r}")
        return np.arange(int(num_frames), dtype=np.float64) * (duration / num_frames) if num_frames else np.zeros(0)
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    count = int(np.ceil(duration * fps - 1e-9))  # frames at i / fps < duration (the 1e-9 absorbs float error at exact multiples)
    return np.arange(max(count, 0), dtype=np.float64) / fps


def class_columns(classes: int | LabelMap) -> np.ndarray:
    """The label id of each score column: ``0..K-1`` for an int, else the label map's ids in order."""
    if isinstance(classes, LabelMap):
        return np.asarray(classes.ids, dtype=np.int64)
    if isinstance(classes, bool) or int(classes) != classes or classes < 1:
        raise ValueError(f"classes must be a LabelMap or a positive number of classes, got {classes!r}")
    return np.arange(int(classes), dtype=np.int64)


def frame_labels(annotation: VideoAnnotation, classes: int | LabelMap, times: np.ndarray, boundary: Boundary = "open") -> np.ndarray:
    """[F, K] bool: frame ``f`` is positive for column ``k`` iff a segment of that class covers
    ``times[f]``: ``start < t < end`` (``"open"``, MultiTHUMOS) or ``start <= t <= end`` (``"closed"``).

    ``classes``: K, the columns being the label ids 0..K-1, or a ``LabelMap`` whose ids in order
    are the columns (MultiTHUMOS: ids 1..65). Segments are in the seconds of ``times``.
    """
    columns = class_columns(classes)
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    segments = np.asarray(annotation.segments.to_numpy().data, dtype=np.float64)
    column_of = {int(c): i for i, c in enumerate(columns)}
    try:
        cols = np.array([column_of[int(c)] for c in annotation.labels], dtype=np.int64)
    except KeyError:
        bad = next(int(c) for c in annotation.labels if int(c) not in column_of)
        raise ValueError(f"video {annotation.video_id!r}: label id {bad} is not one of the {len(columns)} classes") from None
    out = np.zeros((times.shape[0], len(columns)), dtype=bool)
    if len(cols) == 0 or times.shape[0] == 0:
        return out
    start, end = segments[:, 0:1], segments[:, 1:2]  # [N, 1]
    if boundary == "open":
        inside = (times[None, :] > start) & (times[None, :] < end)  # [N, F]
    elif boundary == "closed":
        inside = (times[None, :] >= start) & (times[None, :] <= end)
    else:
        raise ValueError(f"boundary must be 'open' or 'closed', got {boundary!r}")
    onehot = np.zeros((len(cols), len(columns)), dtype=np.float32)
    onehot[np.arange(len(cols)), cols] = 1.0
    return (inside.T.astype(np.float32) @ onehot) > 0  # [F, N] @ [N, K]: any segment of the class


def scores_at(times: np.ndarray, scores: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Per-frame ``scores [F, K]`` given at increasing ``times [F]`` -> ``[F', K]`` at ``at [F']``,
    linearly interpolated (held constant beyond the ends), e.g. a model's per-step scores at the
    step centres onto the 25 Charades frames."""
    times, scores, at = np.asarray(times, np.float64), np.asarray(scores, np.float64), np.asarray(at, np.float64)
    if times.ndim != 1 or scores.ndim != 2 or scores.shape[0] != times.shape[0] or times.shape[0] == 0:
        raise ValueError(f"scores_at needs times [F] and scores [F, K] with F >= 1, got {times.shape} and {scores.shape}")
    if np.any(np.diff(times) < 0):
        raise ValueError("scores_at needs increasing times")
    if len(times) == 1:
        return np.repeat(scores, len(at), axis=0)
    right = np.clip(np.searchsorted(times, at, side="right"), 1, len(times) - 1)
    left = right - 1
    span = times[right] - times[left]
    w = np.clip(np.where(span > 0, (at - times[left]) / np.where(span > 0, span, 1.0), 0.0), 0.0, 1.0)[:, None]
    return (1 - w) * scores[left] + w * scores[right]


def average_precision(scores: np.ndarray, labels: np.ndarray, ties: Ties = "stable") -> float:
    """Non-interpolated AP of one class: ``scores [F]``, bool ``labels [F]``; NaN without positives."""
    num_pos = int(labels.sum())
    if num_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")  # stable: equal scores keep input order
    hits = labels[order]
    true_pos = np.cumsum(hits, dtype=np.float64)
    if ties == "stable":
        precision = true_pos / np.arange(1, len(hits) + 1)
        return float(precision[hits].sum() / num_pos)
    if ties != "grouped":
        raise ValueError(f"ties must be 'stable' or 'grouped', got {ties!r}")
    ranked = scores[order]
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # last index of each run of equal scores
    pos_in_run = np.diff(np.r_[0.0, true_pos[ends]])
    return float((pos_in_run * true_pos[ends] / (ends + 1)).sum() / num_pos)


@dataclass(frozen=True)
class DenseMetrics:
    """What ``evaluate_dense`` measured; arrays are indexed by class column."""

    mAP: float
    per_class_ap: np.ndarray  # [K]; NaN for a class without positive frames (when excluded)
    class_names: list[str]  # [K]
    num_positive: np.ndarray  # [K] positive frames per class
    num_frames: int
    num_videos: int
    ignored_videos: list[str] = field(default_factory=list)  # scored but not in the ground truth
    settings: dict[str, str] = field(default_factory=dict)  # boundary, ties, empty_classes

    @property
    def num_classes_evaluated(self) -> int:
        return int(np.isfinite(self.per_class_ap).sum())

    def to_dict(self) -> dict:
        """The metrics JSON (NaN APs are written as null)."""
        return {
            "mAP": self.mAP,
            "per_class_AP": {n: (float(a) if np.isfinite(a) else None) for n, a in zip(self.class_names, self.per_class_ap)},
            "num_positive": {n: int(p) for n, p in zip(self.class_names, self.num_positive)},
            "num_frames": self.num_frames,
            "num_videos": self.num_videos,
            "num_classes_evaluated": self.num_classes_evaluated,
            "ignored_videos": list(self.ignored_videos),
            **self.settings,
        }


def evaluate_dense(
    ground_truth: AnnotationSet,
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    boundary: Boundary = "open",
    ties: Ties = "stable",
    empty_classes: EmptyClasses = "exclude",
) -> DenseMetrics:
    """Per-frame mAP of ``scores = {video_id: (times [F], scores [F, K])}`` against ``ground_truth``.

    Column ``k`` of every score matrix is the class ``ground_truth.label_map.ids[k]`` (MultiTHUMOS:
    column 0 is id 1); ``times`` are seconds. Every ground-truth video must be scored (ids match
    with or without ``v_``); scored videos the ground truth lacks are ignored and listed. A wrong
    ``K``, mismatched lengths or a NaN is a ``ValueError`` naming the video. See the module
    docstring for ``boundary``, ``ties`` and ``empty_classes``.
    """
    if empty_classes not in ("exclude", "zero"):
        raise ValueError(f"empty_classes must be 'exclude' or 'zero', got {empty_classes!r}")
    if ties not in ("stable", "grouped"):
        raise ValueError(f"ties must be 'stable' or 'grouped', got {ties!r}")
    label_map = ground_truth.label_map
    K = len(label_map)
    key_of: dict[str, str] = {}
    ignored: list[str] = []
    for key in scores:
        resolved = ground_truth.resolve(key)
        if resolved is None:
            ignored.append(key)
        elif resolved in key_of:
            raise ValueError(f"video {resolved!r} is scored twice, as {key_of[resolved]!r} and {key!r}")
        else:
            key_of[resolved] = key
    missing = [vid for vid in ground_truth.videos if vid not in key_of]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(ground_truth)} ground-truth videos have no scores, e.g. {missing[:5]}; "
            "score every video or evaluate a subset of the ground truth"
        )

    all_scores, all_labels = [], []
    for vid, video in ground_truth.videos.items():
        times, s = _checked(key_of[vid], *scores[key_of[vid]], K)
        all_scores.append(s)
        all_labels.append(frame_labels(video, label_map, times, boundary))
    S = np.concatenate(all_scores) if all_scores else np.zeros((0, K))
    Y = np.concatenate(all_labels) if all_labels else np.zeros((0, K), dtype=bool)

    ap = np.array([average_precision(S[:, k], Y[:, k], ties) for k in range(K)], dtype=np.float64)
    if empty_classes == "zero":
        ap = np.nan_to_num(ap, nan=0.0)
    finite = np.isfinite(ap)
    return DenseMetrics(
        mAP=float(ap[finite].mean()) if finite.any() else float("nan"),
        per_class_ap=ap,
        class_names=label_map.names,
        num_positive=Y.sum(axis=0).astype(np.int64),
        num_frames=int(S.shape[0]),
        num_videos=len(ground_truth),
        ignored_videos=ignored,
        settings={"boundary": boundary, "ties": ties, "empty_classes": empty_classes},
    )


def _checked(video_id: str, times: np.ndarray | Sequence[float], scores: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    times = np.asarray(times, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if times.ndim != 1:
        raise ValueError(f"video {video_id!r}: times must be [F], got shape {times.shape}")
    if scores.ndim != 2 or scores.shape[0] != times.shape[0]:
        raise ValueError(f"video {video_id!r}: scores must be [F, K] = [{times.shape[0]}, {K}], got {scores.shape}")
    if scores.shape[1] != K:
        raise ValueError(f"video {video_id!r}: scores have {scores.shape[1]} classes, the ground truth has {K}")
    if not np.isfinite(times).all():
        raise ValueError(f"video {video_id!r}: frame {int(np.flatnonzero(~np.isfinite(times))[0])} has a non-finite time")
    nan = np.isnan(scores)
    if nan.any():
        f, k = np.argwhere(nan)[0]
        raise ValueError(f"video {video_id!r}: the score of frame {f}, class column {k} is NaN")
    return times, scores
