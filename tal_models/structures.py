"""Typed structures shared by every stage: segments, detections, label maps and annotations.

Legend: N segments in one set, M segments in another.

Every structure accepts either a NumPy array or a torch tensor and keeps the backend it was
given (annotations and evaluation use NumPy; models and post-processing use torch), so data
never hops between backends behind the caller's back. ``to_numpy()`` / ``to_torch()`` convert.

Degenerate segments are deliberate, not accidental:
- zero-length segments (start == end) are legal: real ground truth has them (three in the
  ActivityNet-1.3 validation set, seven in MultiTHUMOS);
- inverted segments (end < start) are refused by ``Segments`` with the offending row named;
  the tIoU functions, which also take raw arrays, treat an inverted segment as empty.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]


class Unit(enum.StrEnum):
    """The unit a set of segments is measured in."""

    SECONDS = "seconds"
    STEPS = "steps"  # feature-sequence steps
    FRAMES = "frames"
    NORMALIZED = "normalized"  # fractions of the video's duration, in [0, 1]


def _is_torch(x: Array) -> bool:
    return isinstance(x, torch.Tensor)


def _as_segment_array(data: Array | Sequence) -> Array:
    if _is_torch(data):
        x = data if data.is_floating_point() else data.float()
    else:
        x = np.asarray(data, dtype=np.float64)
    if x.ndim == 1 and x.shape[0] == 0:  # [] -> [0, 2]
        x = x.reshape(0, 2)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"segments must have shape [N, 2] (start, end), got {tuple(x.shape)}")
    return x


class Segments:
    """Temporal segments ``[N, 2]`` (start, end) in one named ``Unit``.

    Indexing with an int, a slice, an index array or a boolean mask returns ``Segments``.
    """

    __slots__ = ("data", "unit")

    def __init__(self, data: Array | Sequence, unit: Unit | str = Unit.SECONDS, *, check: bool = True):
        self.data = _as_segment_array(data)
        self.unit = Unit(unit)
        if check:
            self._check()

    def _check(self) -> None:
        x = self.data
        finite = torch.isfinite(x).all(dim=1) if _is_torch(x) else np.isfinite(x).all(axis=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0]) if _is_torch(x) else int(np.flatnonzero(~finite)[0])
            raise ValueError(f"segment {row} is not finite: {x[row].tolist()}")
        inverted = x[:, 1] < x[:, 0]
        if bool(inverted.any()):
            row = int(inverted.nonzero()[0]) if _is_torch(x) else int(np.flatnonzero(inverted)[0])
            raise ValueError(f"segment {row} ends before it starts: {x[row].tolist()} ({self.unit.value})")

    # --- views -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, item) -> Segments:
        if isinstance(item, int):
            item = slice(item, item + 1) if item != -1 else slice(-1, None)
        return Segments(self.data[item], self.unit, check=False)

    def __iter__(self) -> Iterator[tuple[float, float]]:
        return iter(tuple(row) for row in self.data.tolist())

    def __repr__(self) -> str:
        return f"Segments(n={len(self)}, unit={self.unit.value}, backend={'torch' if _is_torch(self.data) else 'numpy'})"

    @property
    def starts(self) -> Array:
        return self.data[:, 0]

    @property
    def ends(self) -> Array:
        return self.data[:, 1]

    def lengths(self) -> Array:
        """[N] end - start (never negative for a checked ``Segments``)."""
        return self.data[:, 1] - self.data[:, 0]

    def centers(self) -> Array:
        """[N] midpoints."""
        return (self.data[:, 0] + self.data[:, 1]) / 2

    # --- transforms (each returns a new object) ----------------------------------------
    def clip(self, low: float, high: float) -> Segments:
        """Clamp both ends into ``[low, high]`` (e.g. ``[0, duration]``)."""
        x = self.data.clamp(low, high) if _is_torch(self.data) else np.clip(self.data, low, high)
        return Segments(x, self.unit, check=False)

    def scale(self, factor: float, unit: Unit | str) -> Segments:
        """Multiply by ``factor`` and relabel the unit, e.g. normalized -> seconds by duration."""
        return Segments(self.data * factor, unit, check=False)

    def to_numpy(self) -> Segments:
        x = self.data.detach().cpu().double().numpy() if _is_torch(self.data) else self.data
        return Segments(x, self.unit, check=False)

    def to_torch(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Segments:
        x = self.data if _is_torch(self.data) else torch.from_numpy(np.ascontiguousarray(self.data))
        return Segments(x.to(device=device, dtype=dtype), self.unit, check=False)

    @staticmethod
    def cat(items: Sequence[Segments]) -> Segments:
        if not items:
            raise ValueError("Segments.cat needs at least one Segments")
        units = {s.unit for s in items}
        if len(units) != 1:
            raise ValueError(f"cannot concatenate segments in different units: {sorted(u.value for u in units)}")
        datas = [s.data for s in items]
        x = torch.cat(datas) if _is_torch(datas[0]) else np.concatenate(datas)
        return Segments(x, items[0].unit, check=False)


def _raw(x: Segments | Array | Sequence) -> Array:
    if isinstance(x, Segments):
        return x.data
    return _as_segment_array(x)


def tiou(a: Array, b: Array) -> Array:
    """Broadcasting tIoU of ``a [..., 2]`` and ``b [..., 2]``.

    The float operations are those of the ActivityNet reference (intersection clipped at 0,
    union = length + length - intersection), so thresholds compare bit for bit alike; where
    the union is zero (two empty segments) the tIoU is 1 for identical segments and 0 otherwise,
    instead of the reference's 0/0 = NaN.
    """
    if _is_torch(a) or _is_torch(b):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(b.device if _is_torch(b) else a.device).to(dtype)
        inter = (torch.minimum(a[..., 1], b[..., 1]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
        union = (a[..., 1] - a[..., 0]).clamp(min=0) + (b[..., 1] - b[..., 0]).clamp(min=0) - inter
        empty = union <= 0
        same = (a[..., 0] == b[..., 0]) & (a[..., 1] == b[..., 1])
        return torch.where(empty, same.to(dtype), inter / torch.where(empty, torch.ones_like(union), union))
    inter = (np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0])).clip(0)
    union = (a[..., 1] - a[..., 0]).clip(0) + (b[..., 1] - b[..., 0]).clip(0) - inter
    empty = union <= 0
    same = (a[..., 0] == b[..., 0]) & (a[..., 1] == b[..., 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(empty, same.astype(inter.dtype), inter / np.where(empty, 1.0, union))


def pairwise_tiou(a: Segments | Array, b: Segments | Array) -> Array:
    """Temporal IoU of every segment in ``a [N, 2]`` with every segment in ``b [M, 2]`` -> ``[N, M]``.

    Accepts ``Segments`` or raw arrays; returns the backend of the inputs (torch if either is).
    """
    _same_unit(a, b)
    x, y = _raw(a), _raw(b)
    return tiou(x[:, None, :], y[None, :, :])


def matched_tiou(a: Segments | Array, b: Segments | Array) -> Array:
    """Temporal IoU of ``a[i]`` with ``b[i]`` -> ``[N]``; ``a`` and ``b`` have equal length."""
    _same_unit(a, b)
    x, y = _raw(a), _raw(b)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"matched_tiou needs equal lengths, got {x.shape[0]} and {y.shape[0]}")
    return tiou(x, y)


def _same_unit(a, b) -> None:
    if isinstance(a, Segments) and isinstance(b, Segments) and a.unit != b.unit:
        raise ValueError(f"tIoU of segments in different units: {a.unit.value} vs {b.unit.value}")


class UnknownLabelError(KeyError):
    """A class name or id that the label map does not contain."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class LabelMap:
    """A bijection between class names and integer ids (ids need not start at 0 or be contiguous)."""

    __slots__ = ("_id_of", "_name_of")

    def __init__(self, mapping: Mapping[str, int]):
        self._id_of: dict[str, int] = {}
        self._name_of: dict[int, str] = {}
        for name, cid in mapping.items():
            cid = int(cid)
            if not isinstance(name, str) or not name:
                raise ValueError(f"label names must be non-empty strings, got {name!r}")
            if cid in self._name_of and self._name_of[cid] != name:
                raise ValueError(f"label id {cid} is used by both {self._name_of[cid]!r} and {name!r}")
            self._id_of[name] = cid
            self._name_of[cid] = name

    @classmethod
    def from_names(cls, names: Iterable[str]) -> LabelMap:
        """Ids 0..K-1 in order of first appearance."""
        ordered = list(dict.fromkeys(names))
        return cls({n: i for i, n in enumerate(ordered)})

    def id(self, name: str) -> int:
        try:
            return self._id_of[name]
        except KeyError:
            known = ", ".join(repr(n) for n in list(self._id_of)[:5])
            raise UnknownLabelError(f"unknown label {name!r} (the label map has {len(self)} classes, e.g. {known})") from None

    def name(self, cid: int) -> str:
        try:
            return self._name_of[int(cid)]
        except KeyError:
            raise UnknownLabelError(
                f"unknown label id {cid} (known ids {min(self._name_of, default=None)}..{max(self._name_of, default=None)})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._id_of

    def __len__(self) -> int:
        return len(self._id_of)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self._id_of == other._id_of

    def __repr__(self) -> str:
        return f"LabelMap({len(self)} classes)"

    @property
    def names(self) -> list[str]:
        """Names in increasing id order."""
        return [self._name_of[i] for i in sorted(self._name_of)]

    @property
    def ids(self) -> list[int]:
        return sorted(self._name_of)

    def to_dict(self) -> dict[str, int]:
        """Plain ``{name: id}`` for JSON, YAML and checkpoints."""
        return {self._name_of[i]: i for i in sorted(self._name_of)}


class Detections:
    """Detections of one video: ``segments [N, 2]``, ``scores [N]``, integer ``labels [N]``.

    Indexing with a boolean mask, an index array or a slice selects detections.
    """

    __slots__ = ("labels", "scores", "segments", "video_id")

    def __init__(self, video_id: str, segments: Segments, scores: Array, labels: Array):
        if not isinstance(segments, Segments):
            segments = Segments(segments)
        if _is_torch(segments.data):
            scores, labels = torch.as_tensor(scores, device=segments.data.device), torch.as_tensor(labels, device=segments.data.device)
            labels = labels.long()
        else:
            scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
        if scores.ndim != 1 or labels.ndim != 1 or not (len(segments) == scores.shape[0] == labels.shape[0]):
            raise ValueError(
                f"detections of {video_id!r} disagree in length: segments {len(segments)}, "
                f"scores {tuple(scores.shape)}, labels {tuple(labels.shape)}"
            )
        self.video_id = str(video_id)
        self.segments = segments
        self.scores = scores
        self.labels = labels

    @classmethod
    def empty(cls, video_id: str, unit: Unit | str = Unit.SECONDS) -> Detections:
        return cls(video_id, Segments(np.zeros((0, 2)), unit), np.zeros(0), np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.segments)

    def __getitem__(self, item) -> Detections:
        if isinstance(item, int):
            item = slice(item, item + 1) if item != -1 else slice(-1, None)
        return Detections(self.video_id, self.segments[item], self.scores[item], self.labels[item])

    def __repr__(self) -> str:
        return f"Detections(video_id={self.video_id!r}, n={len(self)}, unit={self.segments.unit.value})"

    def sorted_by_score(self) -> Detections:
        """Highest score first (stable for equal scores)."""
        if _is_torch(self.scores):
            order = torch.sort(self.scores, descending=True, stable=True).indices
        else:
            order = np.argsort(-self.scores, kind="stable")
        return self[order]

    def to_numpy(self) -> Detections:
        s, lab = self.scores, self.labels
        if _is_torch(s):
            s, lab = s.detach().cpu().double().numpy(), lab.detach().cpu().numpy()
        return Detections(self.video_id, self.segments.to_numpy(), s, lab)

    def to_torch(self, device: torch.device | str | None = None) -> Detections:
        s, lab = self.scores, self.labels
        if not _is_torch(s):
            s, lab = torch.from_numpy(np.ascontiguousarray(s)), torch.from_numpy(np.ascontiguousarray(lab))
        return Detections(self.video_id, self.segments.to_torch(device), s.to(device, torch.float32), lab.to(device))

    @staticmethod
    def cat(items: Sequence[Detections]) -> Detections:
        if not items:
            raise ValueError("Detections.cat needs at least one Detections")
        ids = {d.video_id for d in items}
        if len(ids) != 1:
            raise ValueError(f"cannot concatenate detections of different videos: {sorted(ids)[:3]}")
        torch_backend = _is_torch(items[0].scores)
        cat = torch.cat if torch_backend else np.concatenate
        return Detections(
            items[0].video_id,
            Segments.cat([d.segments for d in items]),
            cat([d.scores for d in items]),
            cat([d.labels for d in items]),
        )


@dataclass(frozen=True)
class VideoAnnotation:
    """Ground truth of one video: ``segments [N, 2]`` with integer ``labels [N]``.

    ``ambiguous`` holds segments that evaluation may ignore predictions on (THUMOS14's
    Ambiguous class); they are never ground truth. ``duration`` and ``fps`` may be unknown.
    """

    video_id: str
    segments: Segments
    labels: np.ndarray
    duration: float | None = None
    subset: str | None = None
    fps: float | None = None
    ambiguous: Segments = field(default_factory=lambda: Segments(np.zeros((0, 2))))

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        object.__setattr__(self, "labels", labels)
        if labels.shape[0] != len(self.segments):
            raise ValueError(f"video {self.video_id!r}: {len(self.segments)} segments but {labels.shape[0]} labels")
        if self.segments.unit != self.ambiguous.unit:
            raise ValueError(
                f"video {self.video_id!r}: ambiguous segments in {self.ambiguous.unit.value}, ground truth in {self.segments.unit.value}"
            )

    def __len__(self) -> int:
        return len(self.segments)


def video_id_candidates(video_id: str) -> tuple[str, ...]:
    """``video_id`` itself, then the ActivityNet spelling with or without the ``v_`` prefix."""
    if video_id.startswith("v_"):
        return video_id, video_id[2:]
    return video_id, "v_" + video_id


@dataclass(frozen=True)
class AnnotationSet:
    """Ground truth of a dataset: ``videos`` by id and the ``label_map`` their labels index."""

    videos: Mapping[str, VideoAnnotation]
    label_map: LabelMap
    source: str = ""  # where it was read from, for messages
    format: str | None = None  # the file format it was read from (pipelines.annotations.FORMATS)
    supervision: str = "full"  # "video": weakened to video-level labels (``video_level``)

    def __len__(self) -> int:
        return len(self.videos)

    def __iter__(self) -> Iterator[VideoAnnotation]:
        return iter(self.videos.values())

    def __getitem__(self, video_id: str) -> VideoAnnotation:
        resolved = self.resolve(video_id)
        if resolved is None:
            raise KeyError(f"video {video_id!r} is not in {self.source or 'the annotations'}")
        return self.videos[resolved]

    def __contains__(self, video_id: object) -> bool:
        return isinstance(video_id, str) and self.resolve(video_id) is not None

    def resolve(self, video_id: str) -> str | None:
        """The id under which ``video_id`` is stored (``v_`` prefix optional), or None."""
        for candidate in video_id_candidates(video_id):
            if candidate in self.videos:
                return candidate
        return None

    @property
    def subsets(self) -> list[str]:
        return sorted({v.subset for v in self.videos.values() if v.subset is not None})

    @property
    def num_instances(self) -> int:
        return sum(len(v) for v in self.videos.values())

    def subset(self, *names: str) -> AnnotationSet:
        """Only the videos of the given subsets (compared case-insensitively)."""
        wanted = {n.lower() for n in names}
        missing = wanted - {s.lower() for s in self.subsets}
        if missing:
            raise ValueError(f"subset {sorted(missing)} not in {self.source or 'the annotations'}; it has {self.subsets}")
        kept = {k: v for k, v in self.videos.items() if v.subset is not None and v.subset.lower() in wanted}
        return replace(self, videos=kept)

    def class_agnostic(self, name: str = "action") -> AnnotationSet:
        """The same segments, all of one class ``name`` (id 0): what a class-agnostic model is trained and scored on."""
        videos = {k: replace(v, labels=np.zeros(len(v.labels), np.int64)) for k, v in self.videos.items()}
        return replace(self, videos=videos, label_map=LabelMap({name: 0}))

    def video_level(self) -> AnnotationSet:
        """Weak supervision: each video keeps only the set of classes it contains, as one segment per class spanning
        the whole video (``[0, duration]``; without a duration, up to its last annotated end), so every reader and
        writer still applies and a crop or a resampling of the video keeps the label. Ambiguous segments go.
        Full annotations weakened this way train a weakly supervised model for comparison with a supervised one."""
        videos = {}
        for k, v in self.videos.items():
            classes = np.unique(v.labels)
            seconds = np.asarray(v.segments.data, np.float64).reshape(-1, 2)
            end = v.duration if v.duration else (float(np.max(seconds[:, 1])) if len(seconds) else 0.0)
            spans = Segments(np.tile(np.array([[0.0, end]]), (len(classes), 1)), v.segments.unit)
            videos[k] = replace(v, segments=spans, labels=classes, ambiguous=Segments(np.zeros((0, 2)), v.segments.unit))
        return replace(self, videos=videos, supervision="video")
