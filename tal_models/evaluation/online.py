"""Metrics of online action detection: per-frame mAP, detection latency, instance mAP of events.

Legend: F scored frames (of one video or of all videos), K classes (score columns), G ground-truth
instances, E events, N detections.

Three figures, each one function, and the same three for an offline model (its "ceiling"):

1. ``frame_map``: per-frame mAP of the online action detection (OAD) protocol on THUMOS14, as
   TRN (``compute_result_multilabel``), LSTR and MiniROAD (``perframe_average_precision`` with
   ``thumos_postprocessing``) compute it. What they do, and what we do:

   - Frames. They score every feature chunk (THUMOS: 24 fps video in chunks of 6 frames, so
     4 frames per second; LSTR's ``data_info.json``: ``"fps": 4``) of every test video, pool all frames of all videos, and rank them per
     class. Here the frames are whatever times the caller scored (e.g. the model's step centres,
     ``FeatureTiming.centers``), pooled over videos the same way.
   - Labels. They read prebuilt one-hot targets, a background column 0, the 20 classes, and an
     "Ambiguous" column 21. We label a frame positive for class ``k`` when a ground-truth segment
     of class ``k`` covers its time (``dense.frame_labels``, ``boundary="open"`` by default);
     a frame that no segment covers is background. Background has no score column in our models
     (sigmoid per class) and is excluded from the mean, as in all three (LSTR: ``ignore_index``
     {0, 21}; TRN ``ignore_class=[0]``; MiniROAD {0}, its Ambiguous column having no positive
     left once the Ambiguous rows are dropped). A frame covered by
     segments of two classes (THUMOS14 annotates its CliffDiving instances as Diving too) is
     positive for both here; how the references' one-hot files resolve that overlap is not in
     their code.
   - Ambiguous. All three drop the frames whose target is Ambiguous before computing any AP
     (rows removed, not just the column). We drop every frame covered (closed interval) by a
     segment of ``VideoAnnotation.ambiguous``.
   - AP. ``sklearn.metrics.average_precision_score`` per class: frames of equal score form one
     group, every positive of a group gets the precision at its end (``ties="grouped"`` of
     ``dense.average_precision``); the mean is over the action classes.
   - Classes without positive frames. LSTR and MiniROAD skip them (``if np.any(gt[:, idx])``);
     TRN keeps them, and the scikit-learn installed here (1.9) gives them AP 0 with a warning
     (older versions gave NaN). ``empty_classes="exclude"`` (default, LSTR / MiniROAD) or ``"zero"`` (TRN today).
   - Left out: the optional 5-frame max smoothing and the CliffDiving -> Diving score "switch"
     of their THUMOS post-processing (both off by default in TRN's and MiniROAD's functions).

2. ``detection_latency``: for each ground-truth instance, how long after its start the stream
   first reported it. Candidates are the instances of the stream (a ``start`` event and, at the
   latest, an ``end`` event sharing ``instance``) of the same class that are reported live at
   some point of ``[gt.start, gt.end]``:
   - reported inside it (``start`` event time in ``[gt.start, gt.end]``): latency
     ``time - gt.start``;
   - reported before it and still open at ``gt.start`` (``start`` time < ``gt.start`` < the
     ``end`` event's time): latency 0 -- the user already saw an action of that class in progress
     when this one began. ``count_early=False`` ignores these (only reports inside the segment).
   Matching is greedy in time: ground-truth instances of one (video, class) in order of start
   each take the unused candidate reported first; a stream instance serves at most one
   ground-truth instance. Reported: median and 90th percentile over detected instances, the
   fraction detected and the counts.

3. ``instance_map``: the ``end`` events of each video as ``Detections`` (segment ``[start, end]``
   seconds, the end event's score, its label) through ``evaluate_detection`` (ActivityNet
   semantics) at the THUMOS14 tIoUs 0.3:0.1:0.7; the headline is the average mAP.

The offline ceiling (``offline_frame_scores``, ``offline_latency``, ``evaluate_offline``): an
offline model sees the whole video before it answers, so its figures bound what an online model
could report. Its instance mAP is ``evaluate_detection`` of its detections. Its per-frame score
of class ``k`` at ``t`` is the highest score of its class-``k`` detections covering ``t``
(closed interval), 0 elsewhere: this conversion is ours (the OAD papers compare with offline
per-frame models such as CDC, which score frames natively). Its latency for a ground-truth
instance is ``max(0, det.start - gt.start)`` for the same-class detection of highest tIoU
(> 0; no overlap: missed): the delay if the whole video were known and the best segment were
reported the moment it begins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tal_models.evaluation.dense import Boundary, DenseMetrics, EmptyClasses, class_columns, evaluate_dense
from tal_models.evaluation.detection import THUMOS14_TIOU, DetectionMetrics, evaluate_detection
from tal_models.structures import AnnotationSet, Detections, Segments, VideoAnnotation, tiou

EventLike = Any  # tal_models.online.events.Event, or its to_dict() form

# --- per-frame mAP ----------------------------------------------------------------------------


def unambiguous(annotation: VideoAnnotation, times: np.ndarray) -> np.ndarray:
    """[F] bool: the frames at ``times [F]`` (seconds) that no ambiguous segment covers (closed)."""
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    amb = np.asarray(annotation.ambiguous.to_numpy().data, dtype=np.float64).reshape(-1, 2)
    if len(amb) == 0:
        return np.ones(times.shape[0], dtype=bool)
    covered = (times[None, :] >= amb[:, 0:1]) & (times[None, :] <= amb[:, 1:2])  # [A, F]
    return ~covered.any(axis=0)


def frame_map(
    ground_truth: AnnotationSet,
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    boundary: Boundary = "open",
    empty_classes: EmptyClasses = "exclude",
) -> DenseMetrics:
    """Per-frame mAP of the OAD protocol (module docstring, 1.) of ``scores = {video_id: (times [F]
    seconds, scores [F, K])}``; column ``k`` is the class ``ground_truth.label_map.ids[k]``.

    Every ground-truth video must be scored; frames inside ambiguous segments are dropped, then
    ``dense.evaluate_dense`` ranks all frames per class with scikit-learn's tie rule.
    """
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, (times, s) in scores.items():
        times, s = np.asarray(times, dtype=np.float64), np.asarray(s)
        resolved = ground_truth.resolve(key)
        if resolved is None or times.ndim != 1 or s.ndim < 1 or s.shape[0] != times.shape[0]:
            kept[key] = (times, s)  # unknown video or bad shapes: evaluate_dense reports it
            continue
        keep = unambiguous(ground_truth.videos[resolved], times)
        kept[key] = (times[keep], s[keep])
    return evaluate_dense(ground_truth, kept, boundary=boundary, ties="grouped", empty_classes=empty_classes)


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamInstance:
    """One reported instance of a stream: its ``start`` event's time (``reported``, seconds), its
    ``end`` event's time (``closed``; inf while open), label column, final segment and score."""

    instance: int
    label: int
    reported: float
    closed: float
    segment: tuple[float, float] | None  # [start, end] seconds of the end event; None while open
    score: float


def _field(event: EventLike, name: str):
    return event[name] if isinstance(event, Mapping) else getattr(event, name)


def stream_instances(events: Sequence[EventLike], video_id: str = "") -> list[StreamInstance]:
    """Group the events of one stream (``Event`` or their ``to_dict()`` form, in step order) by
    ``instance``. An instance without a ``start`` event, or with two, is a ``ValueError``."""
    starts: dict[int, tuple[int, float]] = {}
    ends: dict[int, tuple[float, float, float, float]] = {}
    for e in events:
        kind, inst = str(_field(e, "kind")), int(_field(e, "instance"))
        if kind == "start":
            if inst in starts:
                raise ValueError(f"video {video_id!r}: instance {inst} has two start events")
            starts[inst] = (int(_field(e, "label")), float(_field(e, "time")))
        elif kind == "end":
            if inst not in starts:
                raise ValueError(f"video {video_id!r}: instance {inst} ends before it starts")
            end = _field(e, "end")
            if end is None:
                raise ValueError(f"video {video_id!r}: the end event of instance {inst} has no end")
            ends[inst] = (float(_field(e, "time")), float(_field(e, "start")), float(end), float(_field(e, "score")))
        elif kind != "update":
            raise ValueError(f"video {video_id!r}: unknown event kind {kind!r}")
    out = []
    for inst, (label, reported) in starts.items():
        closed, seg_start, seg_end, score = ends.get(inst, (np.inf, np.nan, np.nan, np.nan))
        segment = None if not np.isfinite(closed) else (seg_start, seg_end)
        out.append(StreamInstance(inst, label, reported, closed, segment, score))
    return out


def events_to_detections(events: Sequence[EventLike], video_id: str, label_ids: Sequence[int], duration: float | None = None) -> Detections:
    """The ``end`` events of one stream as ``Detections`` (seconds): segment ``[start, end]`` (clipped to
    ``[0, duration]`` when given, as ``OnlineDetector.forward_inference`` clips), the end event's score,
    the label id ``label_ids[column]`` (``label_map.ids``; columns are 0..K-1)."""
    ended = [i for i in stream_instances(events, video_id) if i.segment is not None]
    if not ended:
        return Detections.empty(video_id)
    ids = np.asarray(label_ids, dtype=np.int64)
    cols = np.array([i.label for i in ended], dtype=np.int64)
    if cols.min() < 0 or cols.max() >= len(ids):
        raise ValueError(f"video {video_id!r}: event label column {int(cols.max())} is not one of the {len(ids)} classes")
    segments = np.array([i.segment for i in ended], dtype=np.float64).reshape(-1, 2)
    if duration is not None:  # the last step's span may reach past the video's end
        segments = segments.clip(0.0, float(duration))
    return Detections(video_id, Segments(segments), np.array([i.score for i in ended]), ids[cols])


def instance_map(
    ground_truth: AnnotationSet, events: Mapping[str, Sequence[EventLike]], *, tiou_thresholds=THUMOS14_TIOU
) -> DetectionMetrics:
    """Instance mAP (module docstring, 3.) of the end events ``{video_id: [Event, ...]}``; segments are
    clipped to the video's duration where the ground truth knows it."""
    ids = class_columns(ground_truth.label_map)
    predictions = {}
    for vid, ev in events.items():
        resolved = ground_truth.resolve(vid)
        duration = ground_truth.videos[resolved].duration if resolved is not None else None
        predictions[vid] = events_to_detections(ev, vid, ids, duration)
    return evaluate_detection(ground_truth, predictions, tiou_thresholds)


# --- latency ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyMetrics:
    """Latency of every ground-truth instance, ``latency [G]`` seconds (NaN: missed), in
    ground-truth order (videos as in the ``AnnotationSet``, instances in file order)."""

    latency: np.ndarray  # [G]
    labels: np.ndarray  # [G] label ids

    @property
    def num_ground_truth(self) -> int:
        return int(self.latency.shape[0])

    @property
    def num_detected(self) -> int:
        return int(np.isfinite(self.latency).sum())

    @property
    def fraction_detected(self) -> float:
        return self.num_detected / self.num_ground_truth if self.num_ground_truth else float("nan")

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (linear interpolation) over detected instances; NaN when none."""
        found = self.latency[np.isfinite(self.latency)]
        return float(np.quantile(found, q)) if found.size else float("nan")

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def p90(self) -> float:
        return self.quantile(0.9)

    def to_dict(self) -> dict:
        def num(x: float) -> float | None:
            return float(x) if np.isfinite(x) else None

        return {
            "median_s": num(self.median),
            "p90_s": num(self.p90),
            "fraction_detected": num(self.fraction_detected),
            "num_detected": self.num_detected,
            "num_ground_truth": self.num_ground_truth,
        }


def _resolved(ground_truth: AnnotationSet, predictions: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``{ground-truth id: prediction}``; every ground-truth video must be present (``v_`` optional)."""
    out: dict[str, Any] = {}
    for key, value in predictions.items():
        vid = ground_truth.resolve(key)
        if vid is not None:
            if vid in out:
                raise ValueError(f"video {vid!r} has {what} twice")
            out[vid] = value
    missing = [vid for vid in ground_truth.videos if vid not in out]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(ground_truth)} ground-truth videos have no {what}, e.g. {missing[:5]} (give an empty list)"
        )
    return out


def detection_latency(
    ground_truth: AnnotationSet, events: Mapping[str, Sequence[EventLike]], *, count_early: bool = True
) -> LatencyMetrics:
    """Latency (module docstring, 2.) of the streams' events ``{video_id: [Event, ...]}``; event
    label columns are ``ground_truth.label_map.ids`` in order. Every ground-truth video must be given."""
    ids = class_columns(ground_truth.label_map)
    by_video = _resolved(ground_truth, events, "events")
    latencies, labels = [], []
    for vid, video in ground_truth.videos.items():
        inst = stream_instances(by_video[vid], vid)
        cols = np.array([i.label for i in inst], dtype=np.int64)
        if cols.size and (cols.min() < 0 or cols.max() >= len(ids)):
            raise ValueError(f"video {vid!r}: event label column {int(cols.max())} is not one of the {len(ids)} classes")
        label_id = ids[cols]
        reported = np.array([i.reported for i in inst], dtype=np.float64)
        closed = np.array([i.closed for i in inst], dtype=np.float64)
        used = np.zeros(len(inst), dtype=bool)
        segs = np.asarray(video.segments.to_numpy().data, dtype=np.float64).reshape(-1, 2)
        lat = np.full(len(video), np.nan)
        for g in np.argsort(segs[:, 0], kind="stable"):  # greedy in time: earlier instances choose first
            start, end = segs[g]
            inside = (reported >= start) & (reported <= end)
            early = (reported < start) & (closed > start) if count_early else np.zeros_like(inside)
            candidates = np.flatnonzero((label_id == video.labels[g]) & ~used & (inside | early))
            if candidates.size:
                pick = candidates[np.argmin(reported[candidates])]
                used[pick] = True
                lat[g] = max(0.0, reported[pick] - start)
        latencies.append(lat)
        labels.append(video.labels)
    return LatencyMetrics(
        np.concatenate(latencies) if latencies else np.zeros(0), np.concatenate(labels) if labels else np.zeros(0, np.int64)
    )


# --- the offline ceiling --------------------------------------------------------------------------


def offline_frame_scores(detections: Detections, times: np.ndarray, label_ids: Sequence[int]) -> np.ndarray:
    """[F, K] float64 per-frame scores from one video's offline detections (seconds): column ``k``
    (label id ``label_ids[k]``) at ``times[f]`` is the highest score of the class's detections
    covering it (closed interval), 0 where none does."""
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    det = detections.to_numpy()
    ids = np.asarray(label_ids, dtype=np.int64)
    out = np.zeros((times.shape[0], len(ids)), dtype=np.float64)
    segs = np.asarray(det.segments.data, dtype=np.float64).reshape(-1, 2)
    for k, cid in enumerate(ids):
        mine = det.labels == cid
        if not mine.any():
            continue
        covers = (times[None, :] >= segs[mine, 0:1]) & (times[None, :] <= segs[mine, 1:2])  # [N_k, F]
        out[:, k] = np.where(covers, det.scores[mine][:, None], 0.0).max(axis=0)
    return out


def offline_latency(ground_truth: AnnotationSet, detections: Mapping[str, Detections], *, min_score: float = 0.0) -> LatencyMetrics:
    """Latency of an offline model (module docstring): per ground-truth instance, ``max(0,
    det.start - gt.start)`` of the same-class detection of highest tIoU; NaN when none overlaps.

    ``min_score``: only detections scoring at least this count (an offline detector returns many
    low-score segments, one of which overlaps nearly every instance: with the default 0 the
    fraction detected is that of a recall at any tIoU > 0)."""
    by_video = _resolved(ground_truth, detections, "detections")
    latencies, labels = [], []
    for vid, video in ground_truth.videos.items():
        det = by_video[vid].to_numpy()
        det = det[det.scores >= min_score]
        segs = np.asarray(video.segments.to_numpy().data, dtype=np.float64).reshape(-1, 2)
        pred = np.asarray(det.segments.data, dtype=np.float64).reshape(-1, 2)
        lat = np.full(len(video), np.nan)
        if len(det) and len(video):
            overlap = np.asarray(tiou(segs[:, None, :], pred[None, :, :]), dtype=np.float64)  # [G, N]
            overlap = np.where(video.labels[:, None] == det.labels[None, :], overlap, 0.0)
            best = overlap.argmax(axis=1)
            hit = overlap[np.arange(len(video)), best] > 0
            lat[hit] = np.maximum(0.0, pred[best[hit], 0] - segs[hit, 0])
        latencies.append(lat)
        labels.append(video.labels)
    return LatencyMetrics(
        np.concatenate(latencies) if latencies else np.zeros(0), np.concatenate(labels) if labels else np.zeros(0, np.int64)
    )


# --- all together -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnlineMetrics:
    """The three figures of one model: per-frame mAP, detection latency and instance mAP."""

    frame: DenseMetrics
    latency: LatencyMetrics
    detection: DetectionMetrics
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def frame_mAP(self) -> float:
        return self.frame.mAP

    @property
    def average_mAP(self) -> float:
        return self.detection.average_mAP

    def to_dict(self) -> dict:
        """The metrics JSON (NaN written as null)."""
        return {
            "frame_mAP": self.frame_mAP if np.isfinite(self.frame_mAP) else None,
            "average_mAP": self.average_mAP,
            "latency": self.latency.to_dict(),
            "frame": self.frame.to_dict(),
            "detection": self.detection.to_dict(),
            **self.settings,
        }


def evaluate_online(
    ground_truth: AnnotationSet,
    events: Mapping[str, Sequence[EventLike]],
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    tiou_thresholds=THUMOS14_TIOU,
    boundary: Boundary = "open",
    empty_classes: EmptyClasses = "exclude",
    count_early: bool = True,
) -> OnlineMetrics:
    """All three figures of an online model: its events ``{video_id: [Event, ...]}`` and per-step
    scores ``{video_id: (times [F] seconds, scores [F, K])}``."""
    return OnlineMetrics(
        frame=frame_map(ground_truth, scores, boundary=boundary, empty_classes=empty_classes),
        latency=detection_latency(ground_truth, events, count_early=count_early),
        detection=instance_map(ground_truth, events, tiou_thresholds=tiou_thresholds),
        settings={"model": "online", "count_early": count_early},
    )


def evaluate_offline(
    ground_truth: AnnotationSet,
    detections: Mapping[str, Detections],
    times: Mapping[str, np.ndarray],
    *,
    tiou_thresholds=THUMOS14_TIOU,
    boundary: Boundary = "open",
    empty_classes: EmptyClasses = "exclude",
    min_score: float = 0.0,
) -> OnlineMetrics:
    """The same figures for an offline model (the ceiling): its ``detections`` (seconds) per video,
    scored as frames at ``times = {video_id: [F] seconds}`` (e.g. the online model's step centres);
    ``min_score`` applies to the latency only (``offline_latency``)."""
    ids = class_columns(ground_truth.label_map)
    by_video = _resolved(ground_truth, detections, "detections")
    frame_scores = {}
    for key, t in times.items():
        vid = ground_truth.resolve(key)
        det = by_video.get(vid) if vid is not None else None
        frame_scores[key] = (np.asarray(t, np.float64), offline_frame_scores(det if det is not None else Detections.empty(key), t, ids))
    return OnlineMetrics(
        frame=frame_map(ground_truth, frame_scores, boundary=boundary, empty_classes=empty_classes),
        latency=offline_latency(ground_truth, detections, min_score=min_score),
        detection=evaluate_detection(ground_truth, detections, tiou_thresholds),
        settings={"model": "offline", "latency_min_score": min_score},
    )
