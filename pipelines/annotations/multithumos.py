"""MultiTHUMOS JSON: ``{video: {"subset", "duration", "actions": [[class_id, start, end], ...]}}``.

Dense and multi-label: instances of different classes overlap freely, and seven have zero
length. Class ids are 1..65 as written; the file has no class names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation

from .errors import (
    AnnotationFormatError,
    describe,
    is_number,
    load_json,
    optional_number,
    optional_str,
    require_list,
    require_mapping,
    segment_array,
)

__all__ = ["MULTITHUMOS_NUM_CLASSES", "read_multithumos"]

MULTITHUMOS_NUM_CLASSES = 65


def read_multithumos(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> AnnotationSet:
    """Read MultiTHUMOS; label ids are the file's class ids 1..65.

    Names are ``class_01``..``class_65`` unless ``class_names`` gives the 65 names, in id order
    (``class_names[0]`` is id 1).
    """
    return parse_multithumos(load_json(path), path, class_names=class_names)


def parse_multithumos(data: Any, path: str | os.PathLike, class_names: Sequence[str] | None = None) -> AnnotationSet:
    """``read_multithumos`` of an already parsed JSON value (``path`` is for messages)."""
    if class_names is None:
        class_names = [f"class_{i:02d}" for i in range(1, MULTITHUMOS_NUM_CLASSES + 1)]
    elif len(class_names) != MULTITHUMOS_NUM_CLASSES:
        raise ValueError(f"MultiTHUMOS has {MULTITHUMOS_NUM_CLASSES} classes; class_names has {len(class_names)}")
    label_map = LabelMap({name: i for i, name in enumerate(class_names, start=1)})

    database = require_mapping(data, path, what="a JSON object of videos")
    videos = {}
    for vid, video in database.items():
        video = require_mapping(video, path, video_id=vid)
        if "actions" not in video:
            raise AnnotationFormatError(path, f"missing 'actions' (the video has {sorted(video)})", video_id=vid, field="actions")
        actions = _action_array(require_list(video["actions"], path, video_id=vid, field="actions"), path, vid)
        class_ids = actions[:, 0]
        bad = (class_ids != np.round(class_ids)) | (class_ids < 1) | (class_ids > MULTITHUMOS_NUM_CLASSES)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise AnnotationFormatError(
                path, f"expected a class id in 1..{MULTITHUMOS_NUM_CLASSES}, got {class_ids[i]}", video_id=vid, field=f"actions[{i}][0]"
            )
        segments = segment_array(actions[:, 1:], path, video_id=vid, field=lambda i: f"actions[{i}][1:]")
        videos[vid] = VideoAnnotation(
            vid,
            Segments(segments),
            class_ids.astype(np.int64),
            duration=optional_number(video.get("duration"), path, video_id=vid, field="duration"),
            subset=optional_str(video.get("subset"), path, video_id=vid, field="subset"),
        )
    return AnnotationSet(videos, label_map, source=str(path), format="multithumos")


def _action_array(actions: list, path, vid: str) -> np.ndarray:
    """``[N, 3]`` float64 (class id, start, end) from the JSON rows."""
    if not actions:
        return np.zeros((0, 3), dtype=np.float64)
    try:
        arr = np.array(actions)
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.ndim != 2 or arr.shape[1] != 3 or arr.dtype.kind not in "iuf":
        for i, row in enumerate(actions):
            if not isinstance(row, list) or len(row) != 3 or not all(is_number(x) for x in row):
                raise AnnotationFormatError(path, f"expected [class_id, start, end], got {describe(row)}", video_id=vid, field=f"actions[{i}]")
        raise AnnotationFormatError(path, "expected a list of [class_id, start, end]", video_id=vid, field="actions")
    return arr.astype(np.float64, copy=False)
