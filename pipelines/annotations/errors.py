"""``AnnotationFormatError`` and the checked reading and writing helpers every format module shares.

A reader never lets a ``KeyError`` or ``TypeError`` from deep inside a parse reach the user:
whatever is wrong with a file is reported as an ``AnnotationFormatError`` that names the file,
the video and the field (and the line where one is known), so the message says what to fix.

The helpers parse on a fast path (one ``np.array`` call per video) and only walk the rows one by
one, to find and name the culprit, once the fast path has failed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tal_models.structures import Segments, Unit

__all__ = ["AnnotationFormatError"]


class AnnotationFormatError(ValueError):
    """A file that does not follow the format it was read as.

    ``path`` is the file (as the caller gave it), ``video_id`` the video the problem is in and
    ``field`` where inside that video (e.g. ``annotations[3].segment``), each None where it does
    not apply; ``line`` is the 1-based line of the file where one is known (text and CSV files,
    JSON syntax errors).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        reason: str,
        *,
        video_id: str | None = None,
        field: str | None = None,
        line: int | None = None,
    ):
        # args holds only the positional arguments so that the default BaseException pickling
        # (type(self)(*args), then __dict__) rebuilds the error, e.g. when Ray ships it back.
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason
        self.video_id = video_id
        self.field = field
        self.line = line

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}, line {self.line}"
        what = []
        if self.video_id is not None:
            what.append(f"video {self.video_id!r}")
        if self.field is not None:
            what.append(f"field {self.field!r}")
        return ": ".join([where, ", ".join(what), self.reason] if what else [where, self.reason])


# --- reading ---------------------------------------------------------------------------------
def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # json.load would silently keep the last value, i.e. lose a video or its predictions
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


class _DuplicateKey(Exception):
    pass


def read_text(path: str | os.PathLike, *, allow_empty: bool = False) -> str:
    """The file's text (UTF-8, a byte-order mark tolerated); an empty file is an error unless allowed."""
    data = Path(path).read_bytes()  # FileNotFoundError names the path
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AnnotationFormatError(path, f"not UTF-8 text (byte {e.start} is {data[e.start]:#04x})") from None
    if not allow_empty and not text.strip():
        raise AnnotationFormatError(path, "the file is empty")
    return text


def load_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; syntax errors, truncation and duplicate keys are ``AnnotationFormatError``."""
    text = read_text(path)
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as e:
        truncated = not text[e.pos :].strip()
        hint = " (the file ends early: is it truncated?)" if truncated else ""
        raise AnnotationFormatError(path, f"not valid JSON at column {e.colno}: {e.msg}{hint}", line=e.lineno) from None
    except _DuplicateKey as e:
        raise AnnotationFormatError(path, f"key {e.args[0]!r} appears twice in one JSON object (only the last would be kept)") from None


def require_mapping(value: Any, path, *, video_id: str | None = None, field: str | None = None, what: str = "an object") -> dict:
    if not isinstance(value, dict):
        raise AnnotationFormatError(path, f"expected {what}, got {describe(value)}", video_id=video_id, field=field)
    return value


def require_list(value: Any, path, *, video_id: str | None = None, field: str | None = None) -> list:
    if not isinstance(value, list):
        raise AnnotationFormatError(path, f"expected a list, got {describe(value)}", video_id=video_id, field=field)
    return value


def optional_number(
    value: Any, path, *, video_id: str | None, field: str, positive: bool = False
) -> float | None:
    """A finite number (>= 0, or > 0 if ``positive``) or None; anything else is an error."""
    if value is None:
        return None
    if not is_number(value) or not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "a positive number" if positive else "a non-negative number"
        raise AnnotationFormatError(path, f"expected {need}, got {describe(value)}", video_id=video_id, field=field)
    return float(value)


def optional_str(value: Any, path, *, video_id: str | None, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise AnnotationFormatError(path, f"expected a string, got {describe(value)}", video_id=video_id, field=field)
    return value


def annotation_list(video: dict, path, video_id: str) -> list:
    """A video's ``annotations`` list (ActivityNet and ActionFormer layouts)."""
    if "annotations" not in video:
        raise AnnotationFormatError(path, f"missing 'annotations' (the video has {sorted(video)})", video_id=video_id, field="annotations")
    return require_list(video["annotations"], path, video_id=video_id, field="annotations")


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def describe(value: Any) -> str:
    """The value as JSON text (so its type shows: "5", 5, null, [...]), cut short if long."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def segment_array(
    rows: Sequence[Any],
    path,
    *,
    video_id: str | None,
    field: Callable[[int], str],
) -> np.ndarray:
    """``[N, 2]`` float64 seconds from N JSON values that should each be ``[start, end]``.

    Start <= end and both finite; zero-length segments are legal. ``field(i)`` names row ``i``
    in messages, e.g. ``lambda i: f"annotations[{i}].segment"``.
    """
    if len(rows) == 0:
        return np.zeros((0, 2), dtype=np.float64)
    try:
        arr = np.array(rows)
    except (ValueError, TypeError):  # ragged rows
        arr = None
    if arr is None or arr.ndim != 2 or arr.shape[1] != 2 or arr.dtype.kind not in "iuf":
        # a string, bool, null or a row of the wrong length somewhere: find and name it
        for i, row in enumerate(rows):
            _check_segment_row(row, path, video_id=video_id, field=field(i))
        raise AnnotationFormatError(path, "segments are not a list of [start, end] pairs", video_id=video_id, field=field(0))
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        i = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise AnnotationFormatError(path, f"expected finite [start, end], got {arr[i].tolist()}", video_id=video_id, field=field(i))
    if (arr[:, 1] < arr[:, 0]).any():
        i = int(np.flatnonzero(arr[:, 1] < arr[:, 0])[0])
        raise AnnotationFormatError(
            path, f"expected [start, end] with start <= end, got {arr[i].tolist()}", video_id=video_id, field=field(i)
        )
    return arr


def _check_segment_row(row: Any, path, *, video_id: str | None, field: str) -> None:
    if not isinstance(row, (list, tuple)) or len(row) != 2:
        raise AnnotationFormatError(path, f"expected [start, end], got {describe(row)}", video_id=video_id, field=field)
    for x in row:
        if not is_number(x):
            raise AnnotationFormatError(path, f"expected [start, end] of numbers, got {describe(row)}", video_id=video_id, field=field)


def number_array(values: Sequence[Any], path, *, video_id: str | None, field: Callable[[int], str]) -> np.ndarray:
    """``[N]`` float64 of finite numbers (scores), naming the first bad one."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.float64)
    try:
        arr = np.array(values)
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iuf":
        for i, x in enumerate(values):
            if not is_number(x):
                raise AnnotationFormatError(path, f"expected a number, got {describe(x)}", video_id=video_id, field=field(i))
        raise AnnotationFormatError(path, "expected a list of numbers", video_id=video_id, field=field(0))
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        i = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise AnnotationFormatError(path, f"expected a finite number, got {arr[i]}", video_id=video_id, field=field(i))
    return arr


def field_values(items: Sequence[Any], key: str, path, *, video_id: str | None, prefix: str) -> list[Any]:
    """``[item[key] for item in items]``, or an error naming the first item that is not an object
    holding ``key`` (``prefix[i].key``)."""
    try:
        return [item[key] for item in items]
    except (KeyError, TypeError, IndexError):
        pass
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise AnnotationFormatError(path, f"expected an object, got {describe(item)}", video_id=video_id, field=f"{prefix}[{i}]")
        if key not in item:
            raise AnnotationFormatError(path, f"missing ({prefix}[{i}] has keys {sorted(item)})", video_id=video_id, field=f"{prefix}[{i}].{key}")
    raise AssertionError("unreachable")  # pragma: no cover


def segments_and_labels(items: Sequence[Any], path, *, video_id: str, prefix: str) -> tuple[np.ndarray, list[str]]:
    """The checked ``segment [N, 2]`` and ``label`` names of a list of ``{"segment", "label"}``
    objects (annotations or predictions), errors naming ``prefix[i].segment`` / ``.label``."""
    segments = segment_array(
        field_values(items, "segment", path, video_id=video_id, prefix=prefix),
        path, video_id=video_id, field=lambda i: f"{prefix}[{i}].segment",
    )
    names = label_strings(
        field_values(items, "label", path, video_id=video_id, prefix=prefix),
        path, video_id=video_id, field=lambda i: f"{prefix}[{i}].label",
    )
    return segments, names


def scores_of(items: Sequence[Any], path, *, video_id: str, prefix: str) -> np.ndarray:
    """The checked ``score`` of each object of a list, errors naming ``prefix[i].score``."""
    return number_array(
        field_values(items, "score", path, video_id=video_id, prefix=prefix),
        path, video_id=video_id, field=lambda i: f"{prefix}[{i}].score",
    )


def label_strings(labels: list[Any], path, *, video_id: str | None, field: Callable[[int], str]) -> list[str]:
    """Check that every label is a non-empty string."""
    for i, name in enumerate(labels):
        if not isinstance(name, str) or not name:
            raise AnnotationFormatError(path, f"expected a non-empty label name, got {describe(name)}", video_id=video_id, field=field(i))
    return labels


# --- writing ---------------------------------------------------------------------------------
def seconds_data(segments: Segments, video_id: str) -> np.ndarray:
    """``[N, 2]`` NumPy seconds of ``segments``; other units are refused (every format is in seconds)."""
    if segments.unit != Unit.SECONDS:
        raise ValueError(f"video {video_id!r}: segments are in {segments.unit.value}; convert them to seconds before writing")
    return segments.to_numpy().data
