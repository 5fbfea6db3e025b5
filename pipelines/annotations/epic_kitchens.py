"""EPIC-Kitchens-100 action segments (``EPIC_100_{train,validation}.csv``).

One row per narrated action: ``video_id``, ``start_timestamp`` / ``stop_timestamp``
(``HH:MM:SS.ff``; ``narration_timestamp`` has three decimals and is not read), ``verb_class``
and ``noun_class``. The label is the verb, the noun, or the action, i.e. the (verb, noun) pair.
Class names come from ``EPIC_100_{verb,noun}_classes.csv`` (``id,key,...``) when given;
durations and fps from ``EPIC_100_video_info.csv`` (``video_id,duration,fps,...``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterator
from typing import Literal

import numpy as np

from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation

from .errors import AnnotationFormatError, read_text

__all__ = ["parse_timestamp", "read_epic_kitchens"]

_TIMESTAMP = re.compile(r"(\d+):([0-5]\d):([0-5]\d)(?:\.(\d+))?")


def parse_timestamp(text: str) -> float:
    """Seconds of an ``HH:MM:SS.ff`` timestamp (any number of decimals): ``"00:01:02.50"`` -> 62.5.

    The decimal text is converted once, so ``"00:00:01.89"`` gives exactly ``1.89``.
    """
    m = _TIMESTAMP.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"bad timestamp {text!r}: expected HH:MM:SS or HH:MM:SS.ff, e.g. '00:01:02.50'")
    hours, minutes, seconds, fraction = m.groups()
    whole = int(hours) * 3600 + int(minutes) * 60 + int(seconds)
    return float(f"{whole}.{fraction}") if fraction else float(whole)


def read_epic_kitchens(
    csv_path: str | os.PathLike,
    label: Literal["verb", "noun", "action"] = "verb",
    verb_classes: str | os.PathLike | None = None,
    noun_classes: str | os.PathLike | None = None,
    video_info: str | os.PathLike | None = None,
    subset: str | None = "validation",
) -> AnnotationSet:
    """Read EPIC-Kitchens-100 segments with verb, noun or action labels.

    - ``"verb"`` / ``"noun"``: the id is ``verb_class`` / ``noun_class`` as written. With the
      class CSV the label map holds all its classes, named by ``key``; without it, the classes
      that occur, named ``verb_<id>`` / ``noun_<id>``.
    - ``"action"``: ids ``0..P-1`` over the sorted unique (verb_class, noun_class) pairs that
      occur, named ``"<verb>:<noun>"``.

    Videos are in order of first appearance, segments in file order. ``duration`` and ``fps``
    come from ``video_info`` (None without it, or for a video it lacks).
    """
    if label not in ("verb", "noun", "action"):
        raise ValueError(f"label must be 'verb', 'noun' or 'action', got {label!r}")
    verb_names = _class_names(verb_classes) if verb_classes is not None else None
    noun_names = _class_names(noun_classes) if noun_classes is not None else None
    info = _video_info(video_info) if video_info is not None else {}

    need = ["video_id", "start_timestamp", "stop_timestamp"]
    need += {"verb": ["verb_class"], "noun": ["noun_class"], "action": ["verb_class", "noun_class"]}[label]
    rows: dict[str, list[tuple[float, float, int, int]]] = {}
    for line, row_no, row in _csv_rows(csv_path, need):
        vid = row["video_id"]
        start = _timestamp(row, "start_timestamp", csv_path, vid, line, row_no)
        stop = _timestamp(row, "stop_timestamp", csv_path, vid, line, row_no)
        if stop < start:
            raise AnnotationFormatError(
                csv_path, f"row {row_no}: stop {row['stop_timestamp']} is before start {row['start_timestamp']}",
                video_id=vid, field="stop_timestamp", line=line,
            )
        verb = _class_id(row, "verb_class", csv_path, vid, line, row_no) if label != "noun" else -1
        noun = _class_id(row, "noun_class", csv_path, vid, line, row_no) if label != "verb" else -1
        rows.setdefault(vid, []).append((start, stop, verb, noun))

    def verb_name(i: int) -> str:
        return verb_names[i] if verb_names is not None else f"verb_{i}"

    def noun_name(i: int) -> str:
        return noun_names[i] if noun_names is not None else f"noun_{i}"

    used = [(v, n) for segs in rows.values() for _, _, v, n in segs]
    for kind, names, column in (("verb", verb_names, 0), ("noun", noun_names, 1)):
        if names is not None and label in (kind, "action"):
            missing = sorted({pair[column] for pair in used} - set(names))
            if missing:
                raise AnnotationFormatError(csv_path, f"{kind}_class {missing[0]} is not in the {kind} class list ({len(names)} classes)", field=f"{kind}_class")

    if label == "action":
        pair_id = {pair: i for i, pair in enumerate(sorted(set(used)))}
        label_map = LabelMap({f"{verb_name(v)}:{noun_name(n)}": i for (v, n), i in pair_id.items()})
    elif label == "verb":
        ids = sorted(verb_names) if verb_names is not None else sorted({v for v, _ in used})
        label_map = LabelMap({verb_name(i): i for i in ids})
    else:
        ids = sorted(noun_names) if noun_names is not None else sorted({n for _, n in used})
        label_map = LabelMap({noun_name(i): i for i in ids})

    videos = {}
    for vid, segs in rows.items():
        if label == "action":
            labels = [pair_id[(v, n)] for _, _, v, n in segs]
        else:
            labels = [v if label == "verb" else n for _, _, v, n in segs]
        duration, fps = info.get(vid, (None, None))
        videos[vid] = VideoAnnotation(
            vid,
            Segments(np.array([s[:2] for s in segs], dtype=np.float64)),
            np.array(labels, dtype=np.int64),
            duration=duration,
            subset=subset,
            fps=fps,
        )
    return AnnotationSet(videos, label_map, source=str(csv_path), format="epic_kitchens")


def _csv_rows(path, required: list[str]) -> Iterator[tuple[int, int, dict[str, str]]]:
    """``(line, data row number, {column: text})`` per row; the header must hold ``required``."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(reader)
    missing = [c for c in required if c not in header]
    if missing:
        raise AnnotationFormatError(path, f"missing column(s) {missing} (the header has {header})", field=missing[0], line=1)
    for row_no, values in enumerate(reader, start=1):
        if not values:
            continue
        if len(values) != len(header):
            raise AnnotationFormatError(path, f"row {row_no} has {len(values)} fields, the header {len(header)}", line=reader.line_num)
        yield reader.line_num, row_no, dict(zip(header, values))


def _timestamp(row: dict[str, str], column: str, path, vid: str, line: int, row_no: int) -> float:
    try:
        return parse_timestamp(row[column])
    except ValueError as e:
        raise AnnotationFormatError(path, f"row {row_no}: {e}", video_id=vid, field=column, line=line) from None


def _class_id(row: dict[str, str], column: str, path, vid: str | None, line: int, row_no: int) -> int:
    try:
        return int(row[column])
    except ValueError:
        raise AnnotationFormatError(path, f"row {row_no}: expected an integer class id, got {row[column]!r}", video_id=vid, field=column, line=line) from None


def _class_names(path) -> dict[int, str]:
    """``{id: key}`` of ``EPIC_100_{verb,noun}_classes.csv``."""
    names: dict[int, str] = {}
    for line, row_no, row in _csv_rows(path, ["id", "key"]):
        cid = _class_id(row, "id", path, None, line, row_no)
        if cid in names:
            raise AnnotationFormatError(path, f"row {row_no}: class id {cid} is listed twice", field="id", line=line)
        names[cid] = row["key"]
    return names


def _video_info(path) -> dict[str, tuple[float, float]]:
    """``{video: (duration, fps)}`` of ``EPIC_100_video_info.csv``."""
    info = {}
    for line, row_no, row in _csv_rows(path, ["video_id", "duration", "fps"]):
        values = []
        for column in ("duration", "fps"):
            try:
                x = float(row[column])
            except ValueError:
                x = math.nan
            if not math.isfinite(x) or x <= 0:
                raise AnnotationFormatError(path, f"row {row_no}: expected a positive number, got {row[column]!r}", video_id=row["video_id"], field=column, line=line)
            values.append(x)
        info[row["video_id"]] = (values[0], values[1])
    return info
