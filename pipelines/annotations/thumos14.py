"""THUMOS14: ActionFormer's JSON layout and the original per-class txt files.

ActionFormer JSON: ``{"version", "database": {video: {"subset", "duration", "fps",
"annotations": [{"label", "label_id", "segment", "segment(frames)"}]}}}`` (seconds; the
``segment(frames)`` are ``segment * fps`` and are not read back).

Original txt: ``annotations_{val,test}/<Class>_{val,test}.txt`` with lines ``video start end``
(seconds). ``Ambiguous_*.txt`` is not a class: its parts of the videos were hard to call action
or background and the official evaluation leaves them out, so they go to
``VideoAnnotation.ambiguous``, never to the ground truth. Class ids are the 20 class names in
alphabetical order, which is ActionFormer's ``label_id``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.atomic import write_json_atomic
from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation

from .activitynet import video_database
from .errors import (
    AnnotationFormatError,
    annotation_list,
    field_values,
    load_json,
    number_array,
    optional_number,
    optional_str,
    read_text,
    require_list,
    require_mapping,
    seconds_data,
    segment_array,
    segments_and_labels,
)

__all__ = ["read_thumos14_json", "read_thumos14_txt", "write_thumos14_json"]

# txt file suffix -> subset name as ActionFormer's JSON spells it
_SUBSETS = {"val": "Validation", "test": "Test"}
_SUBSET_ALIASES = {"val": "val", "validation": "val", "test": "test"}
_TXT_NAME = re.compile(r"^(?P<cls>.+)_(?P<sub>val|test)\.txt$")
_AMBIGUOUS = "ambiguous"


# --- ActionFormer JSON -----------------------------------------------------------------------
def read_thumos14_json(path: str | os.PathLike) -> AnnotationSet:
    """Read THUMOS14 in ActionFormer's JSON layout.

    The label map is the file's own ``label -> label_id``; a label written with two ids, or an
    id with two labels, is an error naming both places. An optional ``ambiguous`` list of
    ``[start, end]`` per video (written by ``write_thumos14_json``) is read into
    ``VideoAnnotation.ambiguous``.
    """
    return parse_thumos14_json(load_json(path), path)


def parse_thumos14_json(data: Any, path: str | os.PathLike) -> AnnotationSet:
    """``read_thumos14_json`` of an already parsed JSON value (``path`` is for messages)."""
    database = video_database(data, path)
    id_seen: dict[str, tuple[int, str, int]] = {}  # label -> (label_id, video, index) where first seen
    name_seen: dict[int, tuple[str, str, int]] = {}  # label_id -> (label, video, index)
    videos = {}
    for vid, video in database.items():
        video = require_mapping(video, path, video_id=vid)
        anns = annotation_list(video, path, vid)
        segments, names = segments_and_labels(anns, path, video_id=vid, prefix="annotations")
        ids = _integer_ids(field_values(anns, "label_id", path, video_id=vid, prefix="annotations"), path, vid)
        for i, (name, cid) in enumerate(zip(names, ids.tolist())):
            first = id_seen.setdefault(name, (cid, vid, i))
            if first[0] != cid:
                raise AnnotationFormatError(
                    path, f"label {name!r} has label_id {cid} here but {first[0]} in video {first[1]!r} (annotations[{first[2]}])",
                    video_id=vid, field=f"annotations[{i}].label_id",
                )
            other = name_seen.setdefault(cid, (name, vid, i))
            if other[0] != name:
                raise AnnotationFormatError(
                    path, f"label_id {cid} is {name!r} here but {other[0]!r} in video {other[1]!r} (annotations[{other[2]}])",
                    video_id=vid, field=f"annotations[{i}].label_id",
                )
        ambiguous = segment_array(
            require_list(video.get("ambiguous", []), path, video_id=vid, field="ambiguous"),
            path, video_id=vid, field=lambda i: f"ambiguous[{i}]",
        )
        videos[vid] = VideoAnnotation(
            vid,
            Segments(segments),
            ids,
            duration=optional_number(video.get("duration"), path, video_id=vid, field="duration"),
            subset=optional_str(video.get("subset"), path, video_id=vid, field="subset"),
            fps=optional_number(video.get("fps"), path, video_id=vid, field="fps", positive=True),
            ambiguous=Segments(ambiguous),
        )
    label_map = LabelMap({name: cid for name, (cid, _, _) in sorted(id_seen.items(), key=lambda kv: kv[1][0])})
    return AnnotationSet(videos, label_map, source=str(path), format="thumos14_json")


def _integer_ids(values: list[Any], path, vid: str) -> np.ndarray:
    ids = number_array(values, path, video_id=vid, field=lambda i: f"annotations[{i}].label_id")
    fractional = ids != np.round(ids)
    if fractional.any():
        i = int(np.flatnonzero(fractional)[0])
        raise AnnotationFormatError(path, f"expected an integer class id, got {ids[i]}", video_id=vid, field=f"annotations[{i}].label_id")
    return ids.astype(np.int64)


def write_thumos14_json(path: str | os.PathLike, annotations: AnnotationSet, *, version: str = "Thumos14-30fps") -> None:
    """Write ground truth in ActionFormer's THUMOS14 JSON layout (atomically).

    ``label_id`` is the label map's id. ``subset``, ``duration`` and ``fps`` are written where
    known, ``segment(frames)`` where ``fps`` is; non-empty ambiguous segments go to an extra
    ``ambiguous`` list per video, which ActionFormer ignores and ``read_thumos14_json`` reads.
    """
    database = {}
    for video in annotations:
        segments = seconds_data(video.segments, video.video_id).tolist()
        entry: dict[str, Any] = {}
        if video.subset is not None:
            entry["subset"] = video.subset
        if video.duration is not None:
            entry["duration"] = float(video.duration)
        if video.fps is not None:
            entry["fps"] = float(video.fps)
        anns = []
        for seg, cid in zip(segments, video.labels.tolist()):
            ann: dict[str, Any] = {"label": annotations.label_map.name(cid), "segment": seg}
            if video.fps is not None:
                ann["segment(frames)"] = [t * video.fps for t in seg]
            ann["label_id"] = cid
            anns.append(ann)
        entry["annotations"] = anns
        if len(video.ambiguous):
            entry["ambiguous"] = seconds_data(video.ambiguous, video.video_id).tolist()
        database[video.video_id] = entry
    write_json_atomic(path, {"version": version, "database": database})


# --- original per-class txt files ----------------------------------------------------------
def read_thumos14_txt(
    directory: str | os.PathLike,
    subset: str | None = None,
    *,
    durations: Mapping[str, float] | None = None,
) -> AnnotationSet:
    """Read the original THUMOS14 per-class txt files.

    ``directory`` holds ``<Class>_{val,test}.txt`` files or ``annotations_{val,test}``
    folders of them. ``subset`` is ``"val"``/``"validation"`` or ``"test"`` (None: both);
    videos get ActionFormer's subset names ``"Validation"`` / ``"Test"``. Videos are sorted by
    id; a video with only ambiguous segments is kept (with no ground truth). ``duration`` is
    None unless ``durations`` gives it.
    """
    root = Path(directory)
    if not root.exists():
        raise FileNotFoundError(f"THUMOS14 annotation directory not found: {str(root)!r}")
    if not root.is_dir():
        raise AnnotationFormatError(root, "expected a directory of THUMOS14 <Class>_{val,test}.txt files, got a file")
    wanted = set(_SUBSETS)
    if subset is not None:
        key = _SUBSET_ALIASES.get(subset.lower())
        if key is None:
            raise ValueError(f"unknown THUMOS14 subset {subset!r}; use 'val' (or 'validation'), 'test' or None for both")
        wanted = {key}

    files = []  # (class name, subset key, path)
    for folder in [root, *sorted(p for p in root.glob("annotations_*") if p.is_dir())]:
        for p in sorted(folder.glob("*.txt")):
            m = _TXT_NAME.match(p.name)
            if m and m["sub"] in wanted:
                files.append((m["cls"], m["sub"], p))
    if not files:
        raise AnnotationFormatError(root, f"no <Class>_{{{','.join(sorted(wanted))}}}.txt files here or in annotations_* folders")

    classes = sorted({cls for cls, _, _ in files if cls.lower() != _AMBIGUOUS})
    class_id = {name: i for i, name in enumerate(classes)}
    rows: dict[str, dict[str, list]] = {}  # video -> {"gt": [(start, end, id)], "amb": [(start, end)], "subset": key}
    for cls, sub, p in files:
        for lineno, vid, start, end in _txt_rows(p):
            video = rows.setdefault(vid, {"gt": [], "amb": [], "subset": sub})
            if video["subset"] != sub:
                raise AnnotationFormatError(p, f"the video is also in the {_SUBSETS[video['subset']]} files", video_id=vid, line=lineno)
            if cls.lower() == _AMBIGUOUS:
                video["amb"].append((start, end))
            else:
                video["gt"].append((start, end, class_id[cls]))

    videos = {}
    for vid in sorted(rows):
        gt, amb = rows[vid]["gt"], rows[vid]["amb"]
        segments = np.array([g[:2] for g in gt], dtype=np.float64).reshape(-1, 2)
        labels = np.array([g[2] for g in gt], dtype=np.int64)
        duration = None if durations is None or vid not in durations else float(durations[vid])
        videos[vid] = VideoAnnotation(
            vid, Segments(segments), labels, duration=duration, subset=_SUBSETS[rows[vid]["subset"]],
            ambiguous=Segments(np.array(amb, dtype=np.float64).reshape(-1, 2)),
        )
    return AnnotationSet(videos, LabelMap(class_id), source=str(root), format="thumos14_txt")


def _txt_rows(path: Path):
    """``(line, video, start, end)`` per non-blank line of one per-class file."""
    for lineno, line in enumerate(read_text(path, allow_empty=True).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise AnnotationFormatError(path, f"expected 'video start end', got {line.strip()!r}", line=lineno)
        vid = parts[0]
        try:
            start, end = float(parts[1]), float(parts[2])
        except ValueError:
            raise AnnotationFormatError(path, f"expected numeric start and end seconds, got {line.strip()!r}", video_id=vid, line=lineno) from None
        if not (math.isfinite(start) and math.isfinite(end)):
            raise AnnotationFormatError(path, f"expected finite start and end, got {line.strip()!r}", video_id=vid, line=lineno)
        if end < start:
            raise AnnotationFormatError(path, f"expected start <= end, got [{start}, {end}]", video_id=vid, line=lineno)
        yield lineno, vid, start, end
