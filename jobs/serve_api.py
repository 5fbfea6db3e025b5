"""The HTTP contract of the Serve application, without Ray: request models, parsing, validation, responses.

    JSON body  ─┐                                      ┌─► FeatureSequence (seconds via FeatureTiming)
    .npy body  ─┴─► parse (400) ─► check vs the model ─┤
                                    (422, named field)  └─► RequestError(status, code, message) ─► JSON error

Every refusal is a ``RequestError`` with an HTTP status and a message that names the problem; the
ingress turns it into ``{"error": code, "message": ...}``. Nothing here unpickles: ``.npy`` bodies
are read with ``allow_pickle=False``, so an object array is refused, never executed.

``DynamicBatcher`` is the Detector's request batching (plain asyncio, see its docstring for why not
``@serve.batch``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import io
import math
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.store import FeatureSequence
from tal_models.structures import Detections
from tal_models.timing import FeatureTiming

NPY_CONTENT_TYPES = ("application/x-npy", "application/octet-stream")


class RequestError(Exception):
    """A request the service refuses: ``status`` (4xx), a short ``code`` and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, code, message)
        self.status, self.code, self.message = status, code, message

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message}


# --- request and response models (they are also the OpenAPI schema) ---------------------------


MAX_CLASSES = 200  # class names per request (an open-vocabulary model embeds each)
MAX_CLASS_NAME = 100  # characters per class name


class DetectOptions(BaseModel):
    """What a caller may ask of the detections (applied after the model's own post-processing)."""

    model_config = ConfigDict(extra="forbid")

    video_id: str | None = Field(None, max_length=512, description="echoed in the response (default 'video')")
    score_threshold: float | None = Field(None, ge=0.0, le=1.0, description="drop detections scoring below this")
    top_k: int | None = Field(None, ge=1, le=100_000, description="keep at most this many detections (best first)")
    classes: list[str] | str | None = Field(
        None,
        description="an open-vocabulary model: the class names to detect (a list, or comma-separated), at most "
        f"{MAX_CLASSES} names of at most {MAX_CLASS_NAME} characters; default: the model's own classes",
    )


class DetectFeaturesRequest(DetectOptions):
    """A feature sequence ``[T, C]`` with its timing. The fields of a feature-store row are accepted as they are.

    Timing: ``fps``/``stride``/``window`` (sampled frames) and ``offset`` (s), or ``timestamps`` (the centre of
    each step, s); omitted, the checkpoint's own sampling is assumed. ``duration`` (s) defaults to the end of the
    last clip.
    """

    model_config = ConfigDict(extra="forbid")

    features: list[list[float]] = Field(description="[T, C] feature steps, C = the model's input width")
    fps: float | None = Field(None, gt=0, description="clip sampling rate, frames/s")
    stride: int | None = Field(None, ge=1, description="sampled frames between clip starts")
    window: int | None = Field(None, ge=1, description="sampled frames per clip")
    offset: float | None = Field(None, description="seconds added to every step time")
    timestamps: list[float] | None = Field(None, description="[T] centre of each step, seconds")
    duration: float | None = Field(None, gt=0, description="video length, seconds")
    # feature-store columns: accepted, checked against the checkpoint where they describe the features
    num_steps: int | None = None
    num_frames: int | None = None
    native_fps: float | None = None
    source: str | None = None
    backbone: str | None = None
    backbone_weights: str | None = None
    backbone_sha256: str | None = None
    feature_dim: int | None = None
    extract_config: str | None = None
    schema_version: int | None = None


class DetectVideoRequest(DetectOptions):
    """A video by URI (it must lie under one of the server's configured roots)."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field(min_length=1, max_length=4096, description="s3://bucket/key or a path under an allowed root")


class Detection(BaseModel):
    label: str
    label_id: int
    score: float
    segment: tuple[float, float] = Field(description="[start, end] in seconds of the video")


class DetectResponse(BaseModel):
    video_id: str
    detections: list[Detection]
    duration: float
    num_steps: int
    model: dict[str, Any]
    timing: dict[str, float] = Field(description="seconds spent per stage")


class ErrorResponse(BaseModel):
    error: str
    message: str


# --- the model the server holds --------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress knows about the served checkpoint (small; it travels to every replica)."""

    reference: str  # as given: models:/tal-detector@champion, a path, ...
    pinned: str  # what every replica loads: the alias resolved to its version
    labels: list[str]
    arch: str
    input_dim: int
    provenance: dict[str, Any]
    registry: dict[str, Any] = field(default_factory=dict)  # name, version, alias, run_id
    metadata: dict[str, Any] = field(default_factory=dict)
    classifier: dict[str, Any] | None = None  # a class-agnostic model's labeller: reference, pinned, registry (labels are its)
    open_vocabulary: bool = False  # the model takes class names per request (a text head or a zero-shot model)
    text: dict[str, Any] | None = None  # ... and its text encoder (tal_models.text.TextEncoderConfig as a dict)

    @property
    def timing(self) -> FeatureTiming | None:
        p = self.provenance
        if not all(p.get(k) for k in ("fps", "stride", "window")):
            return None
        return FeatureTiming(float(p["fps"]), int(p["stride"]), int(p["window"]))

    def summary(self) -> dict[str, Any]:
        """The ``model`` object of every response: which checkpoint answered."""
        return {
            "reference": self.reference,
            "pinned": self.pinned,
            **{k: self.registry[k] for k in ("name", "version", "alias") if k in self.registry},
        }

    def describe(self) -> dict[str, Any]:
        """``GET /v1/model``."""
        provenance = {k: v for k, v in self.provenance.items() if k != "extract_config"}
        return {
            **self.summary(),
            "registry": self.registry,
            "arch": self.arch,
            "input_dim": self.input_dim,
            "labels": self.labels,
            "provenance": provenance,
            "extract_config": self.provenance.get("extract_config"),
            "metadata": self.metadata,
            "classifier": self.classifier,
            "open_vocabulary": self.open_vocabulary,
        }


@dataclass(frozen=True)
class Limits:
    """What the server accepts (and, for clients, how it batches): ``GET /v1/model`` reports it."""

    max_body_bytes: int
    max_upload_bytes: int
    max_steps: int
    max_batch_size: int = 1
    video_uris: bool = False  # whether /v1/detect/video reads URIs (roots configured)


# --- parsing -----------------------------------------------------------------------------------


def request_classes(classes: list[str] | str | None, info: ModelInfo) -> list[str] | None:
    """The class names a request asks an open-vocabulary model for, checked (422 ``invalid_classes``: empty, blank,
    repeated, too many or too long names; 422 ``not_open_vocabulary``: a closed-set model), or None (the model's own)."""
    if classes is None:
        return None
    if not info.open_vocabulary:
        raise RequestError(
            422, "not_open_vocabulary", f"this model ({info.arch}) detects its own {len(info.labels)} classes only: leave out 'classes'"
        )
    from pipelines.vlm import parse_class_names

    try:
        return parse_class_names(classes, max_classes=MAX_CLASSES, max_length=MAX_CLASS_NAME)
    except ValueError as exc:
        raise RequestError(422, "invalid_classes", str(exc)) from None


def parse_json_request(body: bytes, model: type[BaseModel]) -> BaseModel:
    """A JSON body -> the pydantic model; malformed JSON is 400, a body that does not fit the model 422."""
    if not body.strip():
        raise RequestError(400, "empty_body", "the request body is empty: send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            raise RequestError(400, "malformed_json", f"the body is not valid JSON: {first['msg']}") from None
        where = ".".join(str(p) for p in first["loc"]) or "body"
        extra = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise RequestError(422, "invalid_request", f"{where}: {first['msg']}{extra}") from None


def parse_npy(body: bytes) -> np.ndarray:
    """An ``.npy`` body -> its ``[T, C]`` array, a read-only view of ``body`` (no copy); never unpickles
    (object arrays are refused before any data is read)."""
    if not body:
        raise RequestError(400, "empty_body", "the request body is empty: send an .npy array [T, C]")
    if body[:4] == b"PK\x03\x04":
        raise RequestError(400, "malformed_npy", "the body is an .npz archive; send one .npy array [T, C]")
    header = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(header)
        # 3.0 differs from 2.0 only in the header's text encoding (UTF-8), which numeric dtypes never need
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(header)
    except Exception as e:  # noqa: BLE001 - numpy raises several types for bytes that are not an .npy
        raise RequestError(400, "malformed_npy", f"the body is not a readable .npy array ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise RequestError(422, "invalid_features", "the .npy holds Python objects; send a numeric array [T, C]")
    if dtype.kind not in "fiu":
        raise RequestError(422, "invalid_features", f"features must be real numbers, got dtype {dtype}")
    count = math.prod(shape)
    offset = header.tell()
    if len(body) - offset != count * dtype.itemsize:
        raise RequestError(
            400, "malformed_npy", f"the .npy header describes {count * dtype.itemsize:,} bytes of data; the body has {len(body) - offset:,}"
        )
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    if fortran_order:
        return array.reshape(shape[::-1]).transpose()
    return array.reshape(shape)


def options_from_query(query: Mapping[str, str]) -> dict[str, Any]:
    """Query parameters of an ``.npy`` or multipart request -> request fields (validated later by pydantic)."""
    known = set(DetectFeaturesRequest.model_fields) - {"features", "timestamps"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise RequestError(422, "invalid_request", f"unknown query parameters {unknown}; known: {sorted(known)}")
    return dict(query)


def features_request(features: np.ndarray | list, fields: Mapping[str, Any]) -> DetectFeaturesRequest:
    """Build the request model from an array and loose fields (query parameters are strings: pydantic converts)."""
    try:
        return DetectFeaturesRequest.model_validate({"features": [], **fields}).model_copy(update={"features": features})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise RequestError(422, "invalid_request", f"{where}: {first['msg']}") from None


# --- validation against the model --------------------------------------------------------------


def to_sequence(request: DetectFeaturesRequest, info: ModelInfo, limits: Limits) -> FeatureSequence:
    """Check a feature request against the served model and build the ``FeatureSequence`` it describes."""
    features = request.features
    if not isinstance(features, np.ndarray):
        lengths = {len(row) for row in features}
        if len(lengths) > 1:
            raise RequestError(
                422, "invalid_features", f"feature rows differ in length ({sorted(lengths)[:5]}): send a rectangular [T, C] array"
            )
        features = np.asarray(features, dtype=np.float32)
    if features.ndim == 1 and features.shape[0] == 0:
        features = features.reshape(0, info.input_dim)
    if features.ndim != 2:
        raise RequestError(422, "invalid_features", f"features must be a 2-D array [T, C]; got shape {list(features.shape)}")
    steps, dim = features.shape
    if dim != info.input_dim:
        backbone = info.provenance.get("backbone", "its backbone")
        raise RequestError(
            422,
            "wrong_feature_dim",
            f"features have {dim} channels; the model takes {info.input_dim} ({backbone} features): shape must be [T, {info.input_dim}]",
        )
    if steps == 0:
        raise RequestError(422, "empty_sequence", "features have 0 steps; send at least one")
    if steps > limits.max_steps:
        raise RequestError(422, "sequence_too_long", f"features have {steps} steps; this server accepts at most {limits.max_steps}")
    features = features.astype(np.float32, copy=False)
    finite = np.isfinite(features)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise RequestError(422, "non_finite_features", f"features contain NaN or infinity (first at step {bad[0]}, channel {bad[1]})")
    _check_provenance(request, info)
    timing = _timing(request, info, steps)
    timestamps = timing.centers(steps)
    duration = (
        request.duration
        if request.duration is not None
        else float(timing.offset + ((steps - 1) * timing.stride + timing.window) / timing.fps)
    )
    if not math.isfinite(duration) or duration <= 0:
        raise RequestError(422, "invalid_request", f"duration must be a positive number of seconds, got {duration}")
    return FeatureSequence(
        video_id=request.video_id or "video", features=features, timing=timing, timestamps=timestamps, duration=float(duration)
    )


def _check_provenance(request: DetectFeaturesRequest, info: ModelInfo) -> None:
    """Feature-store fields that describe how the features were made must match the checkpoint's."""
    prov = info.provenance
    if request.num_steps is not None and request.num_steps != len(request.features):
        raise RequestError(422, "invalid_request", f"num_steps is {request.num_steps} but features have {len(request.features)} steps")
    for key in ("backbone", "backbone_sha256", "feature_dim"):
        given, trained = getattr(request, key), prov.get(key)
        if given is not None and trained is not None and str(given) != str(trained):
            raise RequestError(422, "features_mismatch", f"{key} is {given!r} but the model was trained on features with {key} {trained!r}")


def _timing(request: DetectFeaturesRequest, info: ModelInfo, steps: int) -> FeatureTiming:
    trained = info.timing
    given = {k: getattr(request, k) for k in ("fps", "stride", "window") if getattr(request, k) is not None}
    if trained is None and len(given) < 3:
        raise RequestError(422, "missing_timing", "the model records no sampling: give fps, stride and window (or timestamps with them)")
    fps = float(given.get("fps", trained.fps if trained else 0))
    stride = int(given.get("stride", trained.stride if trained else 0))
    window = int(given.get("window", trained.window if trained else 0))
    if trained is not None:
        diffs = [
            f"{k} {given[k]} (model: {getattr(trained, k)})" for k in given if abs(float(given[k]) - float(getattr(trained, k))) > 1e-9
        ]
        if diffs:
            raise RequestError(
                422, "timing_mismatch", "the features were sampled differently from the model's training features: " + ", ".join(diffs)
            )
    offset = float(request.offset or 0.0)
    if request.timestamps is not None:
        ts = np.asarray(request.timestamps, dtype=np.float64)
        if ts.shape != (steps,):
            raise RequestError(422, "invalid_timestamps", f"timestamps has {ts.shape[0]} values for {steps} feature steps")
        if not np.isfinite(ts).all():
            raise RequestError(422, "invalid_timestamps", "timestamps contain NaN or infinity")
        spacing = stride / fps
        derived = float(ts[0] - (window / 2) / fps)  # the offset that puts step 0's centre at ts[0]
        if request.offset is not None and abs(derived - offset) > 1e-6:
            raise RequestError(422, "invalid_timestamps", f"timestamps start at {ts[0]} s, which disagrees with offset {offset}")
        expected = derived + (np.arange(steps) * stride + window / 2) / fps
        worst = float(np.max(np.abs(ts - expected)))
        if worst > max(1e-3, 0.01 * spacing):
            raise RequestError(
                422, "invalid_timestamps", f"timestamps are not evenly spaced by stride/fps = {spacing:g} s (off by up to {worst:.4g} s)"
            )
        offset = derived
    try:
        return FeatureTiming(fps, stride, window, offset)
    except ValueError as e:
        raise RequestError(422, "invalid_request", str(e)) from None


# --- responses ---------------------------------------------------------------------------------


def detections_payload(
    detections: Detections, labels: Sequence[str], score_threshold: float | None, top_k: int | None
) -> list[dict[str, Any]]:
    """Detections (seconds) -> the response's list, best first, filtered as the caller asked."""
    d = detections.to_numpy().sorted_by_score()
    keep = np.ones(len(d), dtype=bool) if score_threshold is None else d.scores >= score_threshold
    idx = np.flatnonzero(keep)[:top_k]
    segments = np.asarray(d.segments.data, np.float64)
    return [
        {
            "label": labels[int(d.labels[i])],
            "label_id": int(d.labels[i]),
            "score": float(d.scores[i]),
            "segment": [float(segments[i, 0]), float(segments[i, 1])],
        }
        for i in idx
    ]


# --- URIs a video request may name -------------------------------------------------------------


def check_video_uri(uri: str, roots: Sequence[str]) -> str:
    """``uri`` normalised, if it lies under one of ``roots``; otherwise a 403 naming why.

    Roots are ``s3://bucket/prefix/`` or local folders. Local paths are resolved (``..`` and
    symlinks) before the comparison, so no path escapes its root; S3 keys with ``.``/``..``
    segments are refused outright (S3 does not resolve them, but other layers might).
    """
    if not roots:
        raise RequestError(
            403, "uri_not_allowed", "this server reads no URIs (it was started without video roots): upload the video instead"
        )
    uri = uri.strip()
    if "\x00" in uri:
        raise RequestError(400, "invalid_uri", "the URI contains a NUL byte")
    if uri.startswith("s3://"):
        key = uri[len("s3://") :]
        parts = key.split("/")
        if any(p in (".", "..") for p in parts) or "" in parts[:-1] or not parts[0]:
            raise RequestError(403, "uri_not_allowed", f"{uri}: S3 URIs must be plain s3://bucket/key without '.', '..' or empty segments")
        for root in roots:
            if root.startswith("s3://") and uri.startswith(_dir_prefix(root)):
                return uri
        raise RequestError(403, "uri_not_allowed", f"{uri} is not under an allowed root ({', '.join(roots)})")
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise RequestError(403, "uri_not_allowed", f"scheme {scheme}:// is not served; allowed roots: {', '.join(roots)}")
    path = os.path.realpath(uri.removeprefix("file://"))
    for root in roots:
        if root.startswith("s3://"):
            continue
        base = os.path.realpath(root.removeprefix("file://"))
        if path == base or path.startswith(base.rstrip(os.sep) + os.sep):
            return path
    raise RequestError(403, "uri_not_allowed", f"{uri} is not under an allowed root ({', '.join(roots)})")


def _dir_prefix(root: str) -> str:
    """``s3://bucket/prefix`` -> ``s3://bucket/prefix/`` so that ``prefix2`` does not match ``prefix``."""
    head = root[len("s3://") :]
    return "s3://" + posixpath.normpath(head).rstrip("/") + "/"


# --- batching ------------------------------------------------------------------------------------


class DynamicBatcher:
    """Batches calls to a blocking function ``fn(items) -> results`` (run on ``executor``, one batch at a time).

    Whatever waits when ``fn`` becomes free forms the next batch (up to ``max_batch_size``); a call that
    arrives while ``fn`` is idle waits at most ``wait_s`` for company. So under load batches fill by
    themselves and an isolated request pays at most ``wait_s``.

    Why not ``@serve.batch``: in Ray 2.60 it forms a batch as soon as its wait expires, even while the
    previous batch still runs (finished batches then queue on a semaphore). With a model slower than the
    wait, requests that arrive one by one were served in batches of 1 (measured: 16 requests 80 ms apart
    to a 0.4 s function, every batch of size 1), i.e. no batching at all.

    ``executor``: where ``fn`` runs (default: asyncio's default thread pool, any of its threads). The
    Detector passes its single torch thread, so that every forward runs on the thread that built the model.
    ``arriving``: how many requests are on their way to ``submit`` (being received or parsed); when given,
    a call that finds ``fn`` idle waits for company only if some are, so a lone request never waits.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], list[Any]],
        max_batch_size: int,
        wait_s: float,
        executor: concurrent.futures.Executor | None = None,
        arriving: Callable[[], int] | None = None,
    ):
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and wait_s >= 0, got {max_batch_size}, {wait_s}")
        self.fn, self.max_batch_size, self.wait_s, self.executor, self.arriving = fn, max_batch_size, wait_s, executor, arriving
        self._pending: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """``fn``'s result for ``item``, computed in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run())
        future = loop.create_future()
        self._pending.append((item, future))
        self._arrived.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            if len(self._pending) < self.max_batch_size and self.wait_s > 0 and (self.arriving is None or self.arriving() > 0):
                await asyncio.sleep(self.wait_s)
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                item, future = self._pending.popleft()
                if not future.done():  # a caller that went away (cancelled) costs nothing
                    batch.append((item, future))
            if not self._pending:
                self._arrived.clear()
            if not batch:
                continue
            try:
                results = await asyncio.get_running_loop().run_in_executor(self.executor, self.fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batched function returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # noqa: BLE001 - the batch's callers get the error; the batcher goes on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


# --- the videos under the roots (GET /v1/videos, the viewer's listing) ------------------------------

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".ogv", ".3gp")
MAX_LIST_DEPTH = 8  # folders below a root that a listing descends into
MAX_LIST_LIMIT = 1000  # entries per listing
_VIDEO_TYPES = {
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
    ".mov": "video/quicktime",
    ".ogv": "video/ogg",
}


def is_video_name(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


def video_media_type(name: str) -> str:
    """The Content-Type a browser's ``<video>`` gets for a video file named ``name`` (``video/mp4`` for MP4 and the rest)."""
    return _VIDEO_TYPES.get(os.path.splitext(name)[1].lower(), "video/mp4")


def list_videos(roots: Sequence[str], limit: int, prefix: str = "", s3_filesystem: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """The video files under ``roots``, at most ``limit`` of them: ``{"videos": [{"uri", "name", "size", "root"}], "truncated"}``.

    Each root is walked in name order, at most ``MAX_LIST_DEPTH`` folders deep, and the walk stops once ``limit + 1``
    videos are found (so a huge root costs no more than the entries shown). ``name`` is the path under the root;
    ``prefix`` keeps those whose name starts with it (folders that cannot match are not entered). Every entry
    passes ``check_video_uri`` (a symlink out of its root is left out). ``s3_filesystem(root)``: the fsspec
    filesystem of an ``s3://`` root (the featurizer's storage options).
    """
    prefix = prefix.lstrip("/")
    found: list[dict[str, Any]] = []
    for root in roots:
        walk = _walk_s3(root, s3_filesystem) if root.startswith("s3://") else _walk_local(root)
        for name, uri, size in walk(prefix):
            try:
                uri = check_video_uri(uri, roots)
            except RequestError:
                continue
            found.append({"uri": uri, "name": name, "size": size, "root": root})
            if len(found) > limit:
                return {"videos": found[:limit], "truncated": True}
    return {"videos": found, "truncated": False}


def _may_hold(folder: str, prefix: str) -> bool:
    """Whether names under ``folder`` (a path under the root, "" for the root) can start with ``prefix``."""
    return not folder or folder.startswith(prefix) or prefix.startswith(folder + "/")


def _walk_local(root: str) -> Callable[[str], Any]:
    base = os.path.realpath(root.removeprefix("file://"))

    def walk(prefix: str):
        for folder, dirs, files in os.walk(base, followlinks=False):
            rel = os.path.relpath(folder, base).replace(os.sep, "/")
            rel = "" if rel == "." else rel
            depth = 0 if not rel else rel.count("/") + 1
            dirs[:] = sorted(d for d in dirs if depth < MAX_LIST_DEPTH and _may_hold(f"{rel}/{d}".lstrip("/"), prefix))
            for f in sorted(files):
                name = f"{rel}/{f}".lstrip("/")
                if is_video_name(f) and name.startswith(prefix):
                    path = os.path.join(folder, f)
                    try:
                        size = os.path.getsize(path)
                    except OSError:
                        continue  # gone, or a broken link
                    yield name, path, size

    return walk


def _walk_s3(root: str, s3_filesystem: Callable[[str], Any] | None) -> Callable[[str], Any]:
    def walk(prefix: str):
        if s3_filesystem is None:
            return
        fs = s3_filesystem(root)
        base = _dir_prefix(root)[len("s3://") :]
        # one listing per folder (fsspec's walk), folders that cannot match the prefix pruned before they are listed
        for folder, dirs, files in fs.walk(base, maxdepth=MAX_LIST_DEPTH + 1, detail=True):
            rel = folder[len(base) :].strip("/") if folder.startswith(base) else ""
            for d in list(dirs):
                if not _may_hold(f"{rel}/{d}".lstrip("/"), prefix):
                    del dirs[d]
            for f in sorted(files):
                name = f"{rel}/{f}".lstrip("/")
                if is_video_name(f) and name.startswith(prefix):
                    yield name, f"s3://{base}{name}", int(files[f].get("size") or 0)

    return walk


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """An HTTP ``Range: bytes=...`` header (one range) -> ``(start, end)`` inclusive, within a file of ``size`` bytes;
    None for no header. A range that cannot be served is a 416 ``range_not_satisfiable``."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        raise RequestError(416, "range_not_satisfiable", f"Range {header!r}: only one range of bytes is served")
    first, _, last = spec.strip().partition("-")
    try:
        if not first:  # the last N bytes
            start, end = max(0, size - int(last)), size - 1
        else:
            start, end = int(first), (int(last) if last else size - 1)
    except ValueError:
        raise RequestError(416, "range_not_satisfiable", f"Range {header!r} is not bytes=START-END") from None
    end = min(end, size - 1)
    if start < 0 or start > end:
        raise RequestError(416, "range_not_satisfiable", f"Range {header!r} is outside the file's {size:,} bytes")
    return start, end
