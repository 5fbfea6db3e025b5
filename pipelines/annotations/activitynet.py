"""ActivityNet-1.3 JSON: ground truth, detection results (our prediction format) and video-level
classification results.

Ground truth: ``{"version", "taxonomy", "database": {video: {"subset", "duration"?,
"annotations": [{"segment": [start, end], "label": name}]}}}``; the ``database`` wrapper may be
absent (mmaction2 writes the mapping of videos alone, with ``v_``-prefixed keys). Results:
``{"version", "results": {video: [{"label", "score", "segment"}]}, "external_data": {...}}``;
video-level classification results are the same without ``segment``.

Times are seconds. Zero-length segments are legal (the validation set has three) and are kept.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.atomic import write_json_atomic
from tal_models.structures import (
    AnnotationSet,
    Detections,
    LabelMap,
    Segments,
    VideoAnnotation,
)

from .errors import (
    AnnotationFormatError,
    annotation_list,
    field_values,
    label_strings,
    load_json,
    optional_number,
    optional_str,
    require_list,
    require_mapping,
    scores_of,
    seconds_data,
    segments_and_labels,
)

__all__ = [
    "PredictionSet",
    "read_activitynet",
    "read_activitynet_results",
    "read_video_classification",
    "write_activitynet",
    "write_activitynet_results",
    "write_video_classification",
]

_METADATA_KEYS = ("version", "taxonomy", "results", "external_data")


# --- ground truth ----------------------------------------------------------------------------
def read_activitynet(path: str | os.PathLike, *, label_map: LabelMap | None = None) -> AnnotationSet:
    """Read ActivityNet-format ground truth (with or without the ``database`` wrapper).

    The label map is the sorted unique label names with ids ``0..K-1`` (the same whatever the
    order of the file), unless ``label_map`` is given, e.g. a checkpoint's; then a label it does
    not hold is an error. A missing ``duration`` is None.
    """
    return parse_activitynet(load_json(path), path, label_map=label_map)


def parse_activitynet(data: Any, path: str | os.PathLike, *, label_map: LabelMap | None = None) -> AnnotationSet:
    """``read_activitynet`` of an already parsed JSON value (``path`` is for messages)."""
    database = video_database(data, path)
    parsed = []  # (video_id, segments [N, 2], label names [N], duration, subset)
    for vid, video in database.items():
        video = require_mapping(video, path, video_id=vid)
        anns = annotation_list(video, path, vid)
        segments, names = segments_and_labels(anns, path, video_id=vid, prefix="annotations")
        duration = optional_number(video.get("duration"), path, video_id=vid, field="duration")
        subset = optional_str(video.get("subset"), path, video_id=vid, field="subset")
        parsed.append((vid, segments, names, duration, subset))

    if label_map is None:
        label_map = LabelMap.from_names(sorted({n for _, _, names, _, _ in parsed for n in names}))
    id_of = label_map.to_dict()
    videos = {}
    for vid, segments, names, duration, subset in parsed:
        labels = _label_ids(names, id_of, path, vid, lambda i: f"annotations[{i}].label")
        videos[vid] = VideoAnnotation(vid, Segments(segments), labels, duration=duration, subset=subset)
    return AnnotationSet(videos, label_map, source=str(path), format="activitynet")


def video_database(data: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The ``{video: {...}}`` mapping of an ActivityNet-layout file, wrapped or not."""
    data = require_mapping(data, path, what="a JSON object")
    if "database" in data:
        return require_mapping(data["database"], path, field="database", what="an object of videos")
    if "results" in data:
        raise AnnotationFormatError(
            path, "this is a results (predictions) file, not ground truth; read it with read_activitynet_results", field="database"
        )
    if any(k in data for k in _METADATA_KEYS):
        raise AnnotationFormatError(path, f"missing 'database' (the file has keys {sorted(data)[:6]})", field="database")
    return data  # mmaction2 layout: the mapping of videos alone


def _label_ids(names: list[str], id_of: Mapping[str, int], path, vid: str, field) -> np.ndarray:
    try:
        return np.array([id_of[n] for n in names], dtype=np.int64)
    except KeyError:
        i = next(i for i, n in enumerate(names) if n not in id_of)
        raise AnnotationFormatError(
            path, f"label {names[i]!r} is not in the label map ({len(id_of)} classes)", video_id=vid, field=field(i)
        ) from None


def write_activitynet(path: str | os.PathLike, annotations: AnnotationSet, *, version: str = "VERSION 1.3") -> None:
    """Write ground truth in the ActivityNet layout (atomically).

    ``subset`` and ``duration`` are written where known. The format has no label ids (a reader
    numbers the sorted names) and no place for ``fps`` or ambiguous segments; those are dropped.
    """
    database = {}
    for video in annotations:
        segments = seconds_data(video.segments, video.video_id)
        names = [annotations.label_map.name(c) for c in video.labels.tolist()]
        entry: dict[str, Any] = {}
        if video.subset is not None:
            entry["subset"] = video.subset
        if video.duration is not None:
            entry["duration"] = float(video.duration)
        entry["annotations"] = [{"segment": seg, "label": n} for seg, n in zip(segments.tolist(), names)]
        database[video.video_id] = entry
    write_json_atomic(path, {"version": version, "taxonomy": [], "database": database})


# --- detection results -----------------------------------------------------------------------
@dataclass(frozen=True)
class PredictionSet:
    """Detections read from a results file, per video in file order (each in file order).

    ``unknown_labels`` counts, per label name, the predictions dropped because the label map
    does not hold that name. Video ids are as written: ``AnnotationSet.resolve`` matches them
    to ground truth with or without the ``v_`` prefix.
    """

    detections: dict[str, Detections]
    unknown_labels: dict[str, int]
    source: str

    @property
    def num_predictions(self) -> int:
        return sum(len(d) for d in self.detections.values())


def read_activitynet_results(path: str | os.PathLike, label_map: LabelMap) -> PredictionSet:
    """Read ActivityNet detection results into NumPy ``Detections`` (segments float64 seconds,
    scores float64, labels int64 ids of ``label_map``).

    Order is kept exactly (videos and, within a video, predictions): the evaluator breaks score
    ties by it, as the reference does. Predictions with a label not in ``label_map`` are dropped
    and counted in ``unknown_labels``.
    """
    data = require_mapping(load_json(path), path, what="a JSON object with 'results'")
    if "results" not in data:
        hint = " (this looks like ground truth; read it with read_activitynet)" if "database" in data else ""
        raise AnnotationFormatError(path, f"missing 'results'{hint}", field="results")
    results = require_mapping(data["results"], path, field="results", what="an object of videos")
    id_of = label_map.to_dict()
    unknown: Counter[str] = Counter()
    detections = {}
    for vid, preds in results.items():
        preds = require_list(preds, path, video_id=vid, field="results")
        segments, names = segments_and_labels(preds, path, video_id=vid, prefix="predictions")
        scores = scores_of(preds, path, video_id=vid, prefix="predictions")
        known = np.fromiter((n in id_of for n in names), dtype=bool, count=len(names))
        if not known.all():
            unknown.update(n for n in names if n not in id_of)
            segments, scores = segments[known], scores[known]
            names = [n for n in names if n in id_of]
        labels = np.array([id_of[n] for n in names], dtype=np.int64)
        detections[vid] = Detections(vid, Segments(segments, check=False), scores, labels)
    return PredictionSet(detections, dict(unknown), source=str(path))


def write_activitynet_results(
    path: str | os.PathLike,
    detections: Iterable[Detections],
    label_map: LabelMap,
    version: str = "VERSION 1.3",
    external_data: Mapping[str, Any] | None = None,
) -> None:
    """Write detections (seconds; NumPy or torch) as an ActivityNet results file, atomically.

    A video given twice, segments not in seconds, a non-finite score or a label id not in
    ``label_map`` is a ``ValueError`` (``UnknownLabelError`` for the label) before anything is
    written. ``external_data`` defaults to ``{"used": False, "details": ""}``.
    """
    write_json_atomic(path, activitynet_results(detections, label_map, version, external_data))


def activitynet_results(
    detections: Iterable[Detections],
    label_map: LabelMap,
    version: str = "VERSION 1.3",
    external_data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object ``write_activitynet_results`` writes (for a writer of its own, e.g. to S3); same checks."""
    name_of = {cid: name for name, cid in label_map.to_dict().items()}
    results: dict[str, list[dict[str, Any]]] = {}
    for det in detections:
        if det.video_id in results:
            raise ValueError(f"video {det.video_id!r} is given twice; concatenate its detections first (Detections.cat)")
        det = det.to_numpy()
        segments = seconds_data(det.segments, det.video_id)
        bad = ~(np.isfinite(det.scores) & np.isfinite(segments).all(axis=1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"video {det.video_id!r}, detection {i}: non-finite score or segment ({det.scores[i]}, {segments[i].tolist()})"
            )
        try:
            names = [name_of[c] for c in det.labels.tolist()]
        except KeyError:
            for c in det.labels.tolist():
                label_map.name(c)  # raises UnknownLabelError naming the id
            raise
        results[det.video_id] = [
            {"label": n, "score": s, "segment": seg} for n, s, seg in zip(names, det.scores.tolist(), segments.tolist())
        ]
    extra = dict(external_data) if external_data is not None else {"used": False, "details": ""}
    return {"version": version, "results": results, "external_data": extra}


# --- video-level classification ----------------------------------------------------------------
def read_video_classification(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """ActivityNet classification results ``{"results": {video: [{"label", "score"}]}}`` as
    ``{video: {label: score}}`` (videos and labels in file order); a label twice in one video
    is an error."""
    data = require_mapping(load_json(path), path, what="a JSON object with 'results'")
    if "results" not in data:
        raise AnnotationFormatError(path, "missing 'results'", field="results")
    results = require_mapping(data["results"], path, field="results", what="an object of videos")
    out: dict[str, dict[str, float]] = {}
    for vid, preds in results.items():
        preds = require_list(preds, path, video_id=vid, field="results")
        names = label_strings(
            field_values(preds, "label", path, video_id=vid, prefix="predictions"),
            path,
            video_id=vid,
            field=lambda i: f"predictions[{i}].label",
        )
        scores = scores_of(preds, path, video_id=vid, prefix="predictions")
        scored = dict(zip(names, scores.tolist()))
        if len(scored) != len(names):
            i = next(i for i, n in enumerate(names) if n in names[:i])
            raise AnnotationFormatError(path, f"label {names[i]!r} is scored twice", video_id=vid, field=f"predictions[{i}].label")
        out[vid] = scored
    return out


def write_video_classification(
    path: str | os.PathLike,
    scores: Mapping[str, np.ndarray],
    label_map: LabelMap,
    top_k: int | None = None,
    *,
    version: str = "VERSION 1.3",
    external_data: Mapping[str, Any] | None = None,
) -> None:
    """Write video-level class scores as an ActivityNet classification results file, atomically.

    ``scores``: per video, ``[K]`` scores indexed by the ids of ``label_map`` (e.g.
    ``VideoClassifier.classify``). Each video lists its classes best first (ties in id order),
    only the ``top_k`` best when given; ``external_data`` defaults to ``{"used": False,
    "details": ""}``. A wrong shape or a non-finite score is a ``ValueError`` before anything is
    written. ``read_video_classification`` reads the file back.
    """
    write_json_atomic(path, video_classification_results(scores, label_map, top_k, version=version, external_data=external_data))


def video_classification_results(
    scores: Mapping[str, np.ndarray],
    label_map: LabelMap,
    top_k: int | None = None,
    *,
    version: str = "VERSION 1.3",
    external_data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object ``write_video_classification`` writes (for a writer of its own); same checks."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"write_video_classification: top_k must be a positive int or None (all classes), got {top_k!r}")
    names = [label_map.name(i) for i in range(len(label_map))]
    results: dict[str, list[dict[str, Any]]] = {}
    for vid, s in scores.items():
        s = np.asarray(s.detach().cpu() if hasattr(s, "detach") else s, dtype=np.float64)
        if s.shape != (len(names),):
            raise ValueError(f"video {vid!r}: class scores must be [{len(names)}] (one per class of the label map), got {s.shape}")
        if not np.isfinite(s).all():
            raise ValueError(f"video {vid!r}: non-finite class score")
        order = np.argsort(-s, kind="stable")[:top_k]
        results[str(vid)] = [{"label": names[c], "score": float(s[c])} for c in order.tolist()]
    extra = dict(external_data) if external_data is not None else {"used": False, "details": ""}
    return {"version": version, "results": results, "external_data": extra}
