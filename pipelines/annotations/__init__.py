"""Annotation and prediction formats, read into one ``AnnotationSet`` (segments in seconds,
integer labels indexing a ``LabelMap``) and written back where a format is used for output.

| format | read | write |
|---|---|---|
| ActivityNet-1.3 ground truth JSON (with or without ``database``) | ``read_activitynet`` | ``write_activitynet`` |
| ActivityNet results JSON (our predictions) | ``read_activitynet_results`` | ``write_activitynet_results`` |
| ActivityNet video classification JSON | ``read_video_classification`` | ``write_video_classification`` |
| THUMOS14, ActionFormer's JSON | ``read_thumos14_json`` | ``write_thumos14_json`` |
| THUMOS14, original per-class txt | ``read_thumos14_txt`` | |
| MultiTHUMOS JSON | ``read_multithumos`` | |
| FineAction JSON | ``read_fineaction`` | |
| EPIC-Kitchens-100 CSV | ``read_epic_kitchens`` | |

``read_annotations`` picks the ground-truth reader from the file itself; every reader records
which one it was in ``AnnotationSet.format`` (one of ``FORMATS``). A malformed file is an
``AnnotationFormatError`` naming the file, the video and the field.
"""

from __future__ import annotations

import os
from pathlib import Path

from tal_models.structures import AnnotationSet

from .activitynet import (
    PredictionSet,
    activitynet_results,
    parse_activitynet,
    read_activitynet,
    read_activitynet_results,
    read_video_classification,
    video_classification_results,
    write_activitynet,
    write_activitynet_results,
    write_video_classification,
)
from .epic_kitchens import parse_timestamp, read_epic_kitchens
from .errors import AnnotationFormatError, load_json
from .fineaction import FINEACTION_NUM_CLASSES, is_fineaction, parse_fineaction, read_fineaction
from .multithumos import MULTITHUMOS_NUM_CLASSES, parse_multithumos, read_multithumos
from .thumos14 import (
    parse_thumos14_json,
    read_thumos14_json,
    read_thumos14_txt,
    write_thumos14_json,
)

__all__ = [
    "FINEACTION_NUM_CLASSES",
    "FORMATS",
    "SUPERVISION",
    "MULTITHUMOS_NUM_CLASSES",
    "AnnotationFormatError",
    "PredictionSet",
    "activitynet_results",
    "detect_format",
    "parse_timestamp",
    "read_activitynet",
    "read_activitynet_results",
    "read_annotations",
    "read_epic_kitchens",
    "read_fineaction",
    "read_multithumos",
    "read_thumos14_json",
    "read_thumos14_txt",
    "read_video_classification",
    "video_classification_results",
    "write_activitynet",
    "write_activitynet_results",
    "write_thumos14_json",
    "write_video_classification",
]

FORMATS = ("activitynet", "thumos14_json", "thumos14_txt", "multithumos", "epic_kitchens", "fineaction")


SUPERVISION = ("full", "video")


def read_annotations(path: str | os.PathLike, format: str = "auto", supervision: str = "full") -> AnnotationSet:
    """Read ground truth in any supported format with each reader's defaults.

    ``format`` is one of ``FORMATS`` or ``"auto"``: a directory is THUMOS14 txt, a ``.csv`` is
    EPIC-Kitchens, and a JSON file is told apart by its content (see ``detect_format``). For
    options (EPIC label kind, MultiTHUMOS names, a fixed label map) call the reader directly.

    ``supervision="video"`` weakens whatever was read to video-level labels (``AnnotationSet.video_level``: the
    classes of each video, each as one whole-video segment), in every format: what weakly supervised training sees.
    """
    if supervision not in SUPERVISION:
        raise ValueError(f"unknown supervision {supervision!r}; expected one of {', '.join(SUPERVISION)}")
    annotations = _read_annotations(path, format)
    return annotations.video_level() if supervision == "video" else annotations


def _read_annotations(path: str | os.PathLike, format: str) -> AnnotationSet:
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown annotation format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    p = Path(path)
    if format == "thumos14_txt" or (format == "auto" and p.is_dir()):
        return read_thumos14_txt(p)
    if format == "epic_kitchens" or (format == "auto" and p.suffix.lower() == ".csv"):
        return read_epic_kitchens(p)
    data = load_json(p)
    if format == "auto":
        format = detect_format(data, p)
    match format:
        case "activitynet":
            return parse_activitynet(data, path)
        case "thumos14_json":
            return parse_thumos14_json(data, path)
        case "multithumos":
            return parse_multithumos(data, path)
        case "fineaction":
            return parse_fineaction(data, path)
    raise ValueError(f"format {format!r} is not a JSON format")  # pragma: no cover


def detect_format(data: object, path: str | os.PathLike = "<json>") -> str:
    """The JSON ground-truth format of parsed ``data``: ``"thumos14_json"`` if its annotations
    carry ``label_id``, ``"activitynet"`` if they don't (``database`` wrapper or not),
    ``"multithumos"`` for ``actions`` lists, ``"fineaction"`` when the ``version`` names FineAction
    (its layout is ActivityNet's, so nothing else tells it apart); anything else is an ``AnnotationFormatError``."""
    unknown = (
        "unknown annotation format: expected ActivityNet or ActionFormer-THUMOS14 JSON "
        "({'database': {video: {'annotations': [...]}}}), MultiTHUMOS JSON ({video: {'actions': [...]}}), "
        "an EPIC-Kitchens .csv or a THUMOS14 txt directory"
    )
    if not isinstance(data, dict):
        raise AnnotationFormatError(path, f"{unknown}; the file holds a JSON {type(data).__name__}")
    if "results" in data and "database" not in data:
        raise AnnotationFormatError(path, "this is a results (predictions) file, not ground truth; read it with read_activitynet_results")
    if is_fineaction(data):
        return "fineaction"
    database = data.get("database", data)
    videos = [v for v in database.values() if isinstance(v, dict)] if isinstance(database, dict) else []
    if any("actions" in v for v in videos) and not any("annotations" in v for v in videos):
        return "multithumos"
    with_annotations = [v["annotations"] for v in videos if isinstance(v.get("annotations"), list)]
    if not with_annotations:
        if database is not data and isinstance(database, dict) and not database:
            return "activitynet"  # an empty database
        raise AnnotationFormatError(path, f"{unknown}; top-level keys {sorted(data)[:6]}")
    first = next((anns for anns in with_annotations if anns), [])
    if first and isinstance(first[0], dict) and "label_id" in first[0]:
        return "thumos14_json"
    return "activitynet"
