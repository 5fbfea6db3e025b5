"""FineAction (Liu et al., TIP 2022; 106 fine-grained classes, ~17k videos) ground truth.

``annotations_gt.json`` follows the ActivityNet layout with a few more fields:
``{"version"?, "taxonomy"?, "database": {video: {"subset", "duration", "fps"?, "frame"?,
"annotations": [{"label", "label_id"?, "segment": [start, end], "segment(frames)"?}]}}}``
(seconds; subsets ``training`` / ``validation`` / ``testing``). OpenTAD reads it as ActivityNet
and takes class ids from a separate ``category_idx.txt`` (one name per line, id = line number
from 0). ``segment(frames)`` is derived from ``segment`` and not read back.

Class ids, in order of precedence: ``class_names`` (e.g. the lines of ``category_idx.txt``:
ids 0..K-1, every label must be one of them), else the file's ``label_id`` (each name with one id
throughout the file, and each id with one name), else the sorted label names (ids 0..K-1, as
ActivityNet). A video's ``fps`` is its ``fps`` field, or ``frame / duration`` where both are given.

Auto-detection: the layout is the ActivityNet / ActionFormer-THUMOS one, so ``read_annotations``
reads a FineAction file as one of those (the same segments and labels) unless its ``version``
names FineAction; ``format="fineaction"`` asks for this reader whatever the version says.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation

from .activitynet import video_database
from .errors import (
    AnnotationFormatError,
    annotation_list,
    describe,
    field_values,
    load_json,
    number_array,
    optional_number,
    optional_str,
    require_mapping,
    segments_and_labels,
)

__all__ = ["FINEACTION_NUM_CLASSES", "is_fineaction", "read_fineaction"]

FINEACTION_NUM_CLASSES = 106


def read_fineaction(path: str | os.PathLike, *, class_names: Sequence[str] | None = None) -> AnnotationSet:
    """Read FineAction ground truth (see the module docstring for the class ids)."""
    return parse_fineaction(load_json(path), path, class_names=class_names)


def is_fineaction(data: Any) -> bool:
    """Whether parsed JSON says it is FineAction: a ``version`` string naming it."""
    return isinstance(data, dict) and isinstance(data.get("version"), str) and "fineaction" in data["version"].lower()


def parse_fineaction(data: Any, path: str | os.PathLike, *, class_names: Sequence[str] | None = None) -> AnnotationSet:
    """``read_fineaction`` of an already parsed JSON value (``path`` is for messages)."""
    database = video_database(data, path)
    parsed = []  # (video_id, segments [N, 2], names [N], label_ids [N] or None, duration, subset, fps)
    id_seen: dict[str, tuple[int, str, int]] = {}  # label -> (label_id, video, index) where first seen
    name_seen: dict[int, tuple[str, str, int]] = {}  # label_id -> (label, video, index)
    for vid, video in database.items():
        video = require_mapping(video, path, video_id=vid)
        anns = annotation_list(video, path, vid)
        segments, names = segments_and_labels(anns, path, video_id=vid, prefix="annotations")
        ids = None
        if any(isinstance(a, dict) and "label_id" in a for a in anns):
            ids = _label_ids(field_values(anns, "label_id", path, video_id=vid, prefix="annotations"), path, vid)
            _check_consistent(names, ids, id_seen, name_seen, path, vid)
        duration = optional_number(video.get("duration"), path, video_id=vid, field="duration")
        fps = optional_number(video.get("fps"), path, video_id=vid, field="fps", positive=True)
        frames = optional_number(video.get("frame"), path, video_id=vid, field="frame")
        if fps is None and frames and duration:
            fps = frames / duration
        subset = optional_str(video.get("subset"), path, video_id=vid, field="subset")
        parsed.append((vid, segments, names, ids, duration, subset, fps))

    if class_names is not None:
        label_map = LabelMap({name: i for i, name in enumerate(class_names)})
        if len(label_map) != len(class_names):
            raise ValueError(f"class_names holds {len(class_names) - len(label_map)} duplicate names")
    elif id_seen:
        label_map = LabelMap({name: cid for name, (cid, _, _) in sorted(id_seen.items(), key=lambda kv: kv[1][0])})
    else:
        label_map = LabelMap.from_names(sorted({n for _, _, names, _, _, _, _ in parsed for n in names}))
    id_of = label_map.to_dict()

    videos = {}
    for vid, segments, names, ids, duration, subset, fps in parsed:
        if ids is None and id_seen and class_names is None and names:
            raise AnnotationFormatError(
                path, "annotations have no 'label_id' here but do in other videos", video_id=vid, field="annotations[0].label_id"
            )
        unknown = [i for i, n in enumerate(names) if n not in id_of]
        if unknown:
            i = unknown[0]
            raise AnnotationFormatError(
                path, f"label {names[i]!r} is not one of the {len(id_of)} class names given", video_id=vid, field=f"annotations[{i}].label"
            )
        labels = np.array([id_of[n] for n in names], dtype=np.int64)
        videos[vid] = VideoAnnotation(vid, Segments(segments), labels, duration=duration, subset=subset, fps=fps)
    return AnnotationSet(videos, label_map, source=str(path), format="fineaction")


def _label_ids(values: list[Any], path, vid: str) -> np.ndarray:
    ids = number_array(values, path, video_id=vid, field=lambda i: f"annotations[{i}].label_id")
    bad = (ids != np.round(ids)) | (ids < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AnnotationFormatError(
            path, f"expected a non-negative integer class id, got {describe(values[i])}", video_id=vid, field=f"annotations[{i}].label_id"
        )
    return ids.astype(np.int64)


def _check_consistent(names: list[str], ids: np.ndarray, id_seen: dict, name_seen: dict, path, vid: str) -> None:
    """Each name keeps one ``label_id`` throughout the file and each id one name; the error names both places."""
    for i, (name, cid) in enumerate(zip(names, ids.tolist())):
        first = id_seen.setdefault(name, (cid, vid, i))
        if first[0] != cid:
            raise AnnotationFormatError(
                path,
                f"label {name!r} has label_id {cid} here but {first[0]} in video {first[1]!r} (annotations[{first[2]}])",
                video_id=vid,
                field=f"annotations[{i}].label_id",
            )
        other = name_seen.setdefault(cid, (name, vid, i))
        if other[0] != name:
            raise AnnotationFormatError(
                path,
                f"label_id {cid} is {name!r} here but {other[0]!r} in video {other[1]!r} (annotations[{other[2]}])",
                video_id=vid,
                field=f"annotations[{i}].label_id",
            )
