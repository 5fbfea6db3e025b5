"""Video archive -> feature store, sharded over a pool of Ray actors that write the store themselves.

    list videos (driver) -> ExtractionWorker actors (one task at a time each)
        short video: decode -> backbone -> the actor's PartWriter -> Parquet part + part manifest
        long video:  pieces of about ``split_seconds`` on any actors -> features stay in Ray's
                     object store -> ``stitch`` on a free actor -> its PartWriter
    the driver receives only small replies (video id, part written, pending ids, steps, failure)

Ray appears only in ``extract`` (the driver, ``_Scheduler``) and as the actor pool; the per-video
work (``features_for_video``, ``features_for_range``) is plain Python that a notebook or a test
can call directly. A video that fails is returned as a failure with its reason (the job goes on);
the driver records it in the store's manifest. Finished videos are skipped on a re-run, failed
ones retried. A worker that dies is replaced: its running task and the videos still buffered in
its memory are done again (a video that kills it three times is recorded as ``crashed``). The
driver can die too: every part a worker wrote is complete and listed (``pipelines.store``), so a
re-run keeps it and extracts only the rest.

Not Ray Data: its ``map_batches`` actors cannot be told to flush a buffer when the stream ends, and
routing a long video's pieces to one stitching actor needs a keyed all-to-all stage that waits for
the whole dataset; a dozen lines of scheduling over ``ray.wait`` do both (and retry precisely).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import pickle
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from pipelines.backbones import Backbone, BackboneConfig, build_backbone
from pipelines.decoders import DECODERS, get_decoder
from pipelines.ray_runtime import init_ray
from pipelines.store import PART_TARGET_BYTES, FeatureSequence, FeatureStore, PartWriter, Provenance, filesystem_for
from pipelines.video import FrameChunk, VideoDecodeError, VideoInfo, sample_times
from tal_models.timing import FeatureTiming

# glibc settings for extraction workers (see tune_allocator): one arena, no mmap per large buffer, no trimming.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".mpg", ".mpeg", ".m4v", ".ts")


@dataclass(frozen=True)
class SamplingConfig:
    """How clips are cut: ``fps`` (None: the video's own rate), ``window`` and ``stride`` in sampled frames;
    ``decoder`` (``pipelines.decoders.DECODERS``) decodes the videos. Recorded in the store's provenance, so
    ``tal detect``/``tal serve`` featurize new videos with the same decoder (provenance without it: PyAV)."""

    fps: float | None = 15.0
    window: int = 4
    stride: int = 4
    chunk_frames: int = 64  # sampled frames decoded at once: bounds a worker's memory
    decoder: str = "pyav"

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive (or None for the native rate), got {self.fps}")
        if self.window < 1 or self.stride < 1:
            raise ValueError(f"window and stride are whole numbers of frames >= 1, got window={self.window}, stride={self.stride}")
        if self.chunk_frames < self.window:
            raise ValueError(f"chunk_frames ({self.chunk_frames}) must hold at least one window ({self.window})")


@dataclass(frozen=True)
class ExtractConfig:
    videos: str  # directory, glob, s3:// prefix, or a .csv manifest (video_id,uri)
    out: str  # local directory or s3:// prefix
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    split_seconds: float | None = 300.0  # a longer video is extracted in pieces of about this length on several workers
    part_mb: float = PART_TARGET_BYTES / 2**20  # each worker coalesces finished videos into parts of about this size...
    part_seconds: float = 120.0  # ...or writes what it has after this long (what a crash can cost)

    def __post_init__(self) -> None:
        if self.split_seconds is not None and not self.split_seconds > 0:
            raise ValueError(f"split_seconds must be positive (or None: never split), got {self.split_seconds}")
        if not (self.part_mb > 0 and self.part_seconds > 0):
            raise ValueError(f"part_mb and part_seconds must be positive, got {self.part_mb} and {self.part_seconds}")


@dataclass(frozen=True)
class VideoRef:
    video_id: str
    uri: str


@dataclass
class ExtractSummary:
    store: str
    listed: int = 0
    skipped: int = 0  # finished in an earlier run
    extracted: int = 0
    failed: dict[str, dict[str, str]] = field(default_factory=dict)
    frames: int = 0
    steps: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    parts: list[str] = field(default_factory=list)  # written by the workers in this run
    split_videos: int = 0  # extracted in pieces (longer than split_seconds)
    pieces: int = 0
    worker_restarts: int = 0  # workers that died (and were replaced) during the run
    driver_bytes_received: int = 0  # what the workers sent the driver (pickled replies): metadata only, never features
    worker_seconds: float = 0.0  # time the workers spent inside videos and pieces (vs workers x seconds: their utilisation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"feature store  {self.store}",
            f"videos         {self.listed} listed, {self.skipped} already done, {self.extracted} extracted, {len(self.failed)} failed",
            f"throughput     {self.frames:,} frames -> {self.steps:,} feature steps in {self.seconds:.1f} s "
            f"({self.frames / max(self.seconds - self.startup_seconds, 1e-9):.1f} frames/s after {self.startup_seconds:.1f} s start-up)",
        ]
        for vid, f in list(self.failed.items())[:10]:
            lines.append(f"failed         {vid}: {f['reason']}: {f['message']}")
        if len(self.failed) > 10:
            lines.append(f"failed         ... and {len(self.failed) - 10} more (see manifest.json)")
        return "\n".join(lines)


# --- listing -----------------------------------------------------------------------------------


def list_videos(spec: str, storage_options: dict[str, Any] | None = None) -> list[VideoRef]:
    """Videos named by a directory / s3 prefix (recursively), a glob, or a CSV manifest with
    columns ``video_id,uri`` (or ``path``). Video ids are file stems and must be unique."""
    if spec.endswith(".csv"):
        fs, path = filesystem_for(spec, storage_options)
        with fs.open(path, "r") as f:
            rows = list(csv.DictReader(f))
        if rows and not ({"uri", "path"} & set(rows[0])):
            raise ValueError(f"{spec}: a video manifest needs a 'uri' (or 'path') column, got {list(rows[0])}")
        refs = [VideoRef(r.get("video_id") or _stem(r.get("uri") or r["path"]), r.get("uri") or r["path"]) for r in rows]
    else:
        fs, path = filesystem_for(spec, storage_options)
        prefix = "s3://" if spec.startswith("s3://") else ""
        if any(ch in spec for ch in "*?["):
            paths = fs.glob(path)
        elif fs.isdir(path):
            paths = [p for p in fs.find(path) if p.lower().endswith(VIDEO_EXTENSIONS)]
        elif fs.exists(path):
            paths = [path]
        else:
            raise FileNotFoundError(f"no such video, directory or manifest: {spec}")
        refs = [VideoRef(_stem(p), prefix + p) for p in sorted(paths)]
    seen: dict[str, str] = {}
    for r in refs:
        if r.video_id in seen:
            raise ValueError(f"two videos share the id {r.video_id!r}: {seen[r.video_id]} and {r.uri}; give unique ids in a CSV manifest")
        seen[r.video_id] = r.uri
    return refs


def _stem(uri: str) -> str:
    return os.path.splitext(os.path.basename(uri.rstrip("/")))[0]


# --- per-video work (no Ray) -------------------------------------------------------------------


def decode_size(backbone: Backbone, width: int, height: int) -> tuple[int, int]:
    """``(W, H)`` to decode at: the size the backbone's own transform resizes to, so that its
    resize is a no-op and no full-resolution frame is ever held (never larger than the video)."""
    h, w = backbone.preprocessing.resized_size(height, width)
    if h >= height and w >= width:
        return width, height
    return w, h


def features_for_video(backbone: Backbone, uri: str, sampling: SamplingConfig, *, video_id: str | None = None, filesystem=None) -> FeatureSequence:
    """Decode ``uri`` in chunks and compute one feature per clip -> ``FeatureSequence``.

    Frame backbones: features of the frames of each clip, averaged over the clip's ``window``.
    Clip backbones: the clip's ``window`` frames, resampled to the model's clip length.
    Memory holds one chunk of frames (plus at most one window carried over), whatever the length.
    """
    info, chunks = _open(backbone, uri, sampling, filesystem)
    plan = VideoPlan.of(info, sampling)
    features = features_for_steps(backbone, chunks, plan, 0, plan.num_steps, uri)
    return plan.sequence(video_id or _stem(uri), features, uri)


@dataclass(frozen=True)
class VideoPlan:
    """A video's feature steps: what splitting it into step ranges (``features_for_steps`` on
    different workers) and stitching them back needs. Small: it travels between processes."""

    duration: float
    num_frames: int
    native_fps: float
    timing: FeatureTiming
    num_sampled: int  # sampled frames of the whole video
    num_steps: int

    @classmethod
    def of(cls, info: VideoInfo, sampling: SamplingConfig) -> VideoPlan:
        fps = sampling.fps or info.native_fps
        timing = FeatureTiming(fps, sampling.stride, sampling.window)
        n_sampled = len(sample_times(info.duration, fps))
        return cls(info.duration, info.num_frames, info.native_fps, timing, n_sampled, timing.num_steps(n_sampled))

    def sequence(self, video_id: str, features: np.ndarray, uri: str) -> FeatureSequence:
        return FeatureSequence(
            video_id=video_id,
            features=features,
            timing=self.timing,
            timestamps=self.timing.centers(self.num_steps),
            duration=self.duration,
            num_frames=self.num_frames,
            native_fps=self.native_fps,
            source=uri,
        )

    def step_ranges(self, seconds: float) -> list[tuple[int, int]]:
        """Consecutive ``[first, stop)`` step ranges of about ``seconds`` of video each, as even as whole steps allow."""
        pieces = max(1, min(self.num_steps, math.ceil(self.duration / seconds)))
        bounds = np.linspace(0, self.num_steps, pieces + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def sampled_range(self, first: int, stop: int, flow: bool = False) -> tuple[int, int]:
        """The sampled frames ``[start, end)`` that steps ``[first, stop)`` read: their clips' frames,
        plus for a flow stream the frame its first frame's motion is measured from."""
        if not 0 <= first < stop <= self.num_steps:
            raise ValueError(f"step range [{first}, {stop}) is not within the video's {self.num_steps} steps")
        start = int(_clip_frames(first, self.timing, self.num_sampled)[0])
        end = int(_clip_frames(stop - 1, self.timing, self.num_sampled)[-1]) + 1
        if flow and first > 0:
            start = _previous_needed(start, self.timing, self.num_sampled)
        return start, end


def _open(backbone: Backbone, uri: str, sampling: SamplingConfig, filesystem, start_index: int = 0, stop_index: int | None = None):
    """Open ``uri`` for decoding at ``sampling`` (at the backbone's input size): ``(VideoInfo, chunks)``,
    the chunks holding sampled frames ``[start_index, stop_index)`` only (the decoder seeks to the
    keyframe before ``start_index``)."""
    info, chunks = get_decoder(sampling.decoder).iter_frames(
        uri,
        fps=sampling.fps,
        chunk_frames=sampling.chunk_frames,
        resize=lambda w, h: decode_size(backbone, w, h),
        filesystem=filesystem,
        num_threads=1,
        start_index=start_index,
        stop_index=stop_index,
    )
    return info, chunks


def features_for_range(
    backbone: Backbone, uri: str, sampling: SamplingConfig, first: int, stop: int, *, plan: VideoPlan | None = None, filesystem=None
) -> tuple[VideoPlan, np.ndarray]:
    """Features of steps ``[first, stop)`` of ``uri`` only (decoding from near the first one's
    frames): equal to the same rows of ``features_for_video``. What one piece of a split video is.
    ``plan`` (the video's, from an earlier open) saves opening the video twice."""
    if plan is None:
        info, _ = _open(backbone, uri, sampling, filesystem, 0, 0)
        plan = VideoPlan.of(info, sampling)
    start, end = plan.sampled_range(first, stop, backbone.flow)
    _, chunks = _open(backbone, uri, sampling, filesystem, start, end)
    return plan, features_for_steps(backbone, chunks, plan, first, stop, uri)


def features_for_steps(backbone: Backbone, chunks: Iterator[FrameChunk], plan: VideoPlan, first: int, stop: int, uri: str) -> np.ndarray:
    """``[stop - first, C]`` features of steps ``[first, stop)`` from ``chunks`` (which must cover
    ``plan.sampled_range(first, stop, backbone.flow)``; frames outside it are ignored)."""
    if backbone.kind == "frame":
        return _frame_backbone_steps(backbone, chunks, plan.timing, first, stop, plan.num_sampled, uri)
    return _clip_backbone_steps(backbone, chunks, plan.timing, first, stop, plan.num_sampled, uri)


class FeaturizerUnavailable(ValueError):
    """Features cannot be recomputed as a store (or a checkpoint's provenance) describes them."""


def extraction_settings(provenance: Any) -> tuple[BackboneConfig, SamplingConfig]:
    """The backbone and sampling that made a store's features, from its provenance (a ``Provenance``
    or its dict, e.g. a checkpoint's ``provenance``): what featurizing a new video the same way needs.

    Raises ``FeaturizerUnavailable`` for features this platform did not extract (imported ones).
    """
    prov = provenance.to_dict() if isinstance(provenance, Provenance) else dict(provenance or {})
    try:
        settings = json.loads(prov.get("extract_config") or "{}")
    except json.JSONDecodeError as e:
        raise FeaturizerUnavailable(f"the provenance's extract_config is not JSON ({e})") from None
    if not isinstance(settings, dict) or "backbone" not in settings or "sampling" not in settings:
        origin = prov.get("backbone_weights") or prov.get("backbone") or "unknown features"
        raise FeaturizerUnavailable(
            f"these features were not extracted by tal extract ({origin}): their backbone and sampling are unknown, "
            "so new videos cannot be featurized the same way"
        )
    backbone = dict(settings["backbone"])
    for key in ("input_size", "mean", "std"):
        if isinstance(backbone.get(key), list):
            backbone[key] = tuple(backbone[key])
    return BackboneConfig(**backbone), SamplingConfig(**settings["sampling"])


def build_featurizer(
    provenance: Any,
    device: str = "cpu",
    *,
    weights: str | None = None,
    storage_options: dict[str, Any] | None = None,
    num_threads: int | None = None,
) -> tuple[Backbone, SamplingConfig]:
    """The backbone (loaded) and sampling that reproduce ``provenance``'s features for new videos.

    ``weights`` replaces the recorded weights location (e.g. the same file at another path on a
    serving node). The loaded weights must have the recorded sha256: features from other weights
    would be silently wrong, so a mismatch raises ``FeaturizerUnavailable`` naming both digests.
    """
    config, sampling = extraction_settings(provenance)
    if weights is not None:
        config = replace(config, weights=weights)
    fs = filesystem_for(config.weights, storage_options)[0] if (config.weights or "").startswith("s3://") else None
    backbone = build_backbone(config, device, filesystem=fs, num_threads=num_threads)
    prov = provenance.to_dict() if isinstance(provenance, Provenance) else dict(provenance)
    expected = prov.get("backbone_sha256")
    if expected and backbone.weights_sha256 != expected:
        raise FeaturizerUnavailable(
            f"backbone weights {backbone.weights_source} have sha256 {backbone.weights_sha256[:12]}..., but the features "
            f"were made with {prov.get('backbone_weights')} (sha256 {str(expected)[:12]}...): give the same weights file"
        )
    dim = prov.get("feature_dim")
    if dim is not None and int(dim) != backbone.feature_dim:
        raise FeaturizerUnavailable(f"the backbone gives {backbone.feature_dim}-dim features, the provenance says {dim}")
    return backbone, sampling


def _clip_frames(step: int, timing: FeatureTiming, n_sampled: int) -> np.ndarray:
    """Sampled-frame indices of clip ``step`` (a short last clip repeats its final frame)."""
    idx = step * timing.stride + np.arange(timing.window)
    return np.minimum(idx, n_sampled - 1)


def _needed(timing: FeatureTiming, n_sampled: int) -> np.ndarray:
    """``[n_sampled]`` bool: the frames some clip uses (stride > window skips some)."""
    needed = np.zeros(n_sampled, bool)
    starts = np.arange(timing.num_steps(n_sampled)) * timing.stride
    needed[np.minimum(starts[:, None] + np.arange(timing.window), n_sampled - 1).ravel()] = True
    return needed


def _previous_needed(index: int, timing: FeatureTiming, n_sampled: int) -> int:
    """The last frame before ``index`` that some clip uses: where a flow stream measures ``index``'s motion from."""
    before = np.flatnonzero(_needed(timing, n_sampled)[:index])
    return int(before[-1]) if len(before) else index


def _frame_backbone_steps(backbone: Backbone, chunks: Iterator, timing: FeatureTiming, first: int, stop: int, n_sampled: int, uri: str) -> np.ndarray:
    out = np.zeros((stop - first, backbone.feature_dim), np.float32)
    start = int(_clip_frames(first, timing, n_sampled)[0])
    needed = _needed(timing, n_sampled)
    needed[:start] = False
    # a flow stream measures the first frame's motion from the last used frame before it, as an unsplit pass does
    lead = _previous_needed(start, timing, n_sampled) if backbone.flow and first > 0 else None
    cache: dict[int, np.ndarray] = {}  # sampled index -> feature, only for clips not yet complete
    step, previous = first, None
    for chunk in chunks:
        idx = chunk.start + np.arange(len(chunk.frames))
        if lead is not None and (idx == lead).any():
            previous = chunk.frames[int(np.flatnonzero(idx == lead)[0])]
        keep = needed[np.minimum(idx, n_sampled - 1)] & (idx < n_sampled)
        if keep.any():
            frames = chunk.frames[keep]
            feats = backbone.frame_features(frames, previous=previous) if backbone.flow else backbone.frame_features(frames)
            previous = frames[-1]
            cache.update(zip(idx[keep].tolist(), feats))
        while step < stop and int(_clip_frames(step, timing, n_sampled)[-1]) in cache:
            out[step - first] = np.mean([cache[i] for i in _clip_frames(step, timing, n_sampled).tolist()], axis=0)
            step += 1
            first_needed = step * timing.stride if step < stop else n_sampled
            for i in [i for i in cache if i < first_needed]:
                del cache[i]
        if step >= stop:
            break
    if step < stop:
        raise VideoDecodeError("truncated", uri, f"decoded frames cover {step} of {stop} feature steps")
    return out


def _clip_backbone_steps(backbone: Backbone, chunks: Iterator, timing: FeatureTiming, first: int, stop: int, n_sampled: int, uri: str) -> np.ndarray:
    length = backbone.clip_length or timing.window
    pick = np.linspace(0, timing.window - 1, length).round().astype(int)  # window frames -> clip length
    out = np.zeros((stop - first, backbone.feature_dim), np.float32)
    start = int(_clip_frames(first, timing, n_sampled)[0])
    buffer: dict[int, np.ndarray] = {}
    step, batch, batch_steps = first, [], []

    def run_batch() -> None:
        if batch:
            out[batch_steps] = backbone.clip_features(np.stack(batch))
            batch.clear()
            batch_steps.clear()

    for chunk in chunks:
        for j, frame in enumerate(chunk.frames):
            if chunk.start + j >= start:
                buffer[chunk.start + j] = frame
        while step < stop and int(_clip_frames(step, timing, n_sampled)[-1]) in buffer:
            frames_idx = _clip_frames(step, timing, n_sampled)[pick]
            batch.append(np.stack([buffer[int(i)] for i in frames_idx]))
            batch_steps.append(step - first)
            step += 1
            if len(batch) >= backbone.batch_size:
                run_batch()
            first_needed = step * timing.stride if step < stop else n_sampled
            for i in [i for i in buffer if i < first_needed]:
                del buffer[i]
        if step >= stop:
            break
    run_batch()
    if step < stop:
        raise VideoDecodeError("truncated", uri, f"decoded frames cover {step} of {stop} feature steps")
    return out


def tune_allocator() -> bool:
    """Keep glibc from returning large buffers to the kernel after every layer.

    A backbone's activations at batch 64 exceed glibc's mmap threshold, so each forward pass
    mapped fresh pages and paid the page faults and zeroing: measured here, kernel time exceeded
    user time and throughput was 27 frames/s per core; with mmap off and a high trim threshold it
    was 66-68 (peak memory about 0.1-0.2 GB higher). Linux/glibc only; a no-op elsewhere.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


class ExtractionWorker:
    """One extraction actor (the driver makes it a Ray actor): loads the backbone once, then
    featurizes videos and pieces of videos, and writes its own Parquet parts to the store.

    Finished videos are coalesced in a ``PartWriter`` (about ``part_bytes`` per part, or
    ``part_seconds`` of waiting), so every call returns only small metadata: which videos it has
    written (and in which part; a video it reports done and not written waits in its buffer), or why
    a video failed.
    A split video's pieces return their features as a second object that the driver hands, unread,
    to ``stitch`` on whichever actor is free; Ray moves it between the actors.
    """

    def __init__(self, config: ExtractConfig, provenance: dict[str, Any]):
        import torch

        tune_allocator()
        threads = max(1, int(config.cpus_per_worker))
        torch.set_num_threads(threads)
        device = "cuda" if config.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.config = config
        self.backbone = build_backbone(config.backbone, device, filesystem=self._filesystem(config.backbone.weights or ""), num_threads=threads)
        store = FeatureStore(config.out, options=config.storage_options)
        self.writer = PartWriter(store, Provenance.from_dict(provenance), target_bytes=int(config.part_mb * 2**20), max_wait_s=config.part_seconds)

    def _filesystem(self, uri: str):
        return filesystem_for(uri, self.config.storage_options)[0] if uri.startswith("s3://") else None

    def _reply(self, video_id: str, written: tuple[str, list[str]] | None = None, **fields: Any) -> dict[str, Any]:
        reply = {"video_id": video_id, "pid": os.getpid(), "written": [written] if written else []}
        reply.update(fields)
        return reply

    def video(self, video_id: str, uri: str) -> dict[str, Any]:
        """Featurize a whole video, or (longer than ``split_seconds``) return its plan and step ranges instead."""
        start = time.perf_counter()
        try:
            fs = self._filesystem(uri)
            info, chunks = _open(self.backbone, uri, self.config.sampling, fs)
            plan = VideoPlan.of(info, self.config.sampling)
            split = self.config.split_seconds
            if split and plan.duration > split and len(ranges := plan.step_ranges(split)) > 1:
                return self._reply(video_id, status="split", plan=plan, ranges=ranges, seconds=time.perf_counter() - start)
            features = features_for_steps(self.backbone, chunks, plan, 0, plan.num_steps, uri)
            written = self.writer.add(plan.sequence(video_id, features, uri))
            return self._reply(video_id, written, status="ok", frames=plan.num_sampled, steps=plan.num_steps, seconds=time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - one broken video must not stop the job
            return self._reply(video_id, status="failed", **_failure(e), seconds=time.perf_counter() - start)

    def piece(self, video_id: str, uri: str, plan: VideoPlan, first: int, stop: int) -> tuple[dict[str, Any], np.ndarray]:
        """Steps ``[first, stop)`` of a split video: (metadata, features) as two objects (``num_returns=2``)."""
        start = time.perf_counter()
        try:
            _, features = features_for_range(self.backbone, uri, self.config.sampling, first, stop, plan=plan, filesystem=self._filesystem(uri))
        except Exception as e:  # noqa: BLE001 - fails its video, not the job
            return self._reply(video_id, status="failed", **_failure(e), seconds=time.perf_counter() - start), np.zeros((0, 0), np.float32)
        start_frame, end_frame = plan.sampled_range(first, stop)
        return self._reply(video_id, status="ok", frames=end_frame - start_frame, steps=stop - first, seconds=time.perf_counter() - start), features

    def stitch(self, video_id: str, uri: str, plan: VideoPlan, *pieces: np.ndarray) -> dict[str, Any]:
        """A split video's pieces (in order) -> one sequence, buffered for this actor's next part."""
        try:
            features = np.concatenate(pieces, axis=0)
            if features.shape[0] != plan.num_steps:
                raise ValueError(f"the pieces hold {features.shape[0]} steps, the video has {plan.num_steps}")
            written = self.writer.add(plan.sequence(video_id, features, uri))
            return self._reply(video_id, written, status="ok")
        except Exception as e:  # noqa: BLE001
            return self._reply(video_id, status="failed", **_failure(e))

    def flush(self) -> dict[str, Any]:
        """Write whatever is buffered (the end of the job)."""
        return self._reply("", self.writer.flush(), status="flushed")

    def ping(self) -> dict[str, Any]:
        """Which process this is and what it holds (after an error, the driver asks whether it was replaced)."""
        return self._reply("", status="alive", pending=self.writer.pending_ids)


def _failure(e: Exception) -> dict[str, str]:
    if isinstance(e, VideoDecodeError):
        return {"reason": e.reason, "message": str(e)}
    return {"reason": "error", "message": f"{type(e).__name__}: {e}"}


# --- the driver ----------------------------------------------------------------------------


def settings_json(backbone: BackboneConfig, sampling: SamplingConfig) -> str:
    """The provenance's ``extract_config``: what ``extraction_settings`` reads back to featurize new videos alike."""
    return json.dumps({"backbone": asdict(backbone), "sampling": asdict(sampling)}, sort_keys=True, default=list)


def provenance_for(backbone: Backbone, sampling: SamplingConfig, config_json: str) -> Provenance:
    return Provenance(
        backbone=backbone.describe()["name"],
        backbone_weights=backbone.weights_name,
        backbone_sha256=backbone.weights_sha256,
        feature_dim=backbone.feature_dim,
        fps=float(sampling.fps or 0.0),
        stride=sampling.stride,
        window=sampling.window,
        extract_config=config_json,
    )


def extract(config: ExtractConfig) -> ExtractSummary:
    """Run the extraction job described by ``config`` (see module doc)."""
    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    store = FeatureStore(config.out, options=config.storage_options)
    summary = ExtractSummary(store=config.out)
    videos = list_videos(config.videos, config.storage_options)
    summary.listed = len(videos)
    # The driver builds the backbone once, on CPU, for its provenance (and to fail fast on bad weights).
    probe_backbone = build_backbone(config.backbone, "cpu", filesystem=_weights_fs(config))
    provenance = provenance_for(probe_backbone, config.sampling, settings_json(config.backbone, config.sampling))
    del probe_backbone
    store.check_compatible(provenance)
    status = store.status()
    todo = [v for v in videos if v.video_id not in status.done]
    summary.skipped = len(videos) - len(todo)
    if not todo:
        summary.seconds = time.perf_counter() - t0
        return summary

    init_ray()
    # a single long video still uses every worker (its pieces); without splitting, more workers than videos would idle
    workers = max(1, config.num_workers if config.split_seconds else min(config.num_workers, len(todo)))
    actor_class = ray.remote(ExtractionWorker).options(
        num_cpus=config.cpus_per_worker,
        num_gpus=config.gpus_per_worker or None,
        max_restarts=-1,  # a worker that dies is replaced; a video that kills it is retried at most MAX_ATTEMPTS times
        max_task_retries=0,  # the driver retries (it knows what the dead actor held)
        # glibc settings from process start (see tune_allocator): Ray calls actors from threads whose arenas ignore mallopt
        runtime_env={"env_vars": ALLOCATOR_ENV},
    )
    actors = [actor_class.remote(config, provenance.to_dict()) for _ in range(workers)]
    bar = tqdm(total=len(todo), unit="video", desc="extract", disable=not config.progress)
    scheduler = None
    try:
        scheduler = _Scheduler(ray, actors, todo, summary, bar, t0)
        scheduler.run()
    except BaseException:
        # interrupted (Ctrl-C) or failed: what the workers finished but have not written yet is kept if they can write it now
        with contextlib.suppress(BaseException):
            ray.get([actor.flush.remote() for actor in actors], timeout=INTERRUPT_FLUSH_S)
        raise
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
        store.record_failures(list(scheduler.failures.values()) if scheduler else [])
        summary.seconds = time.perf_counter() - t0
        final = store.status()
        store.write_summary({"done": sorted(final.done), "failed": final.failed, "provenance": provenance.to_dict(), "last_run": summary.to_dict()})
    return summary


MAX_ATTEMPTS = 3  # tries per video (or piece) when its worker dies under it
TASKS_PER_ACTOR = 2  # whole videos in flight per actor: the next one is queued there while it works
PING_TIMEOUT_S = 300.0
INTERRUPT_FLUSH_S = 60.0  # an interrupted job waits this long for its workers to write what they hold  # how long a replaced worker may take to start (it loads the backbone)


@dataclass
class _Task:
    method: str  # an ExtractionWorker method: video, piece, stitch, flush
    video: VideoRef | None
    args: tuple = ()
    attempt: int = 1


class _Scheduler:
    """The driver's loop: hands tasks to the least busy actors (two whole-video tasks each, so that an
    actor never waits for its next video; one piece of a long video, so that no piece waits behind
    another while an actor is free), reads back only their small replies, splits long videos into pieces, sends the
    pieces' features (as object refs, never fetched here) to be stitched, flushes every actor at
    the end, and re-queues what a dead actor held (its running task and its unwritten videos)."""

    def __init__(self, ray, actors: list, todo: list[VideoRef], summary: ExtractSummary, bar, t0: float):
        self.ray, self.summary, self.bar, self.t0 = ray, summary, bar, t0
        self.actors = list(actors)
        self.queue: deque[_Task] = deque(_video_task(v) for v in todo)
        self.refs = {v.video_id: v for v in todo}
        self.busy = [0] * len(actors)  # tasks in flight per actor
        self.running: dict[Any, tuple[int, _Task]] = {}  # reply ref -> (actor, task)
        self.pending: dict[int, set[str]] = {i: set() for i in range(len(actors))}  # buffered, not yet written
        self.pids: dict[int, int] = {}  # the process each actor last replied from
        self.pieces: dict[str, dict] = {}  # split video_id -> {"plan", "count", "running"/"done": {first step: features ref}, "frames"}
        self.failures: dict[str, dict[str, str]] = {}
        self.flushed: set[int] = set()
        for i, reply in enumerate(ray.get([a.ping.remote() for a in self.actors])):  # waits for every backbone to load
            self.pids[i] = reply["pid"]
        self.counted: dict[str, tuple[int, int]] = {}  # video_id -> (frames, steps) added to the summary

    def run(self) -> None:
        while True:
            self._dispatch()
            if not self.running:
                if self.queue:
                    continue
                unflushed = [i for i in range(len(self.actors)) if i not in self.flushed]
                if not unflushed:
                    return
                self.queue.extend(_Task("flush", None, (i,)) for i in unflushed)
                self.flushed.update(unflushed)
                continue
            [ready], _ = self.ray.wait(list(self.running), num_returns=1)
            actor, task = self.running.pop(ready)
            try:
                reply = self.ray.get(ready)
            except self.ray.exceptions.RayActorError as e:
                self._worker_died(actor, task, e)
            except self.ray.exceptions.RayError as e:  # e.g. a stitch whose piece was lost with its node
                self._retry(task, e)
            else:
                self.summary.driver_bytes_received += len(pickle.dumps(reply, protocol=5))
                self._handle(actor, task, reply)
            self.busy[actor] -= 1

    def _dispatch(self) -> None:
        while self.queue:
            task = self.queue[0]
            if task.video and task.video.video_id in self.failures:
                self.queue.popleft()  # another piece failed it
                continue
            if task.method == "flush":
                actor = task.args[0]
                if self.busy[actor]:
                    return
            else:
                actor = min(range(len(self.actors)), key=self.busy.__getitem__)
                if self.busy[actor] >= (1 if task.method == "piece" else TASKS_PER_ACTOR):
                    return
            self.queue.popleft()
            self.busy[actor] += 1
            if task.method == "flush":
                ref = self.actors[actor].flush.remote()
            else:
                self.flushed.discard(actor)
                method = getattr(self.actors[actor], task.method)
                if task.method == "piece":
                    ref, features = method.options(num_returns=2).remote(*task.args)
                    self.pieces[task.video.video_id]["running"][task.args[3]] = features
                else:
                    ref = method.remote(*task.args)
            self.running[ref] = (actor, task)

    def _handle(self, actor: int, task: _Task, reply: dict[str, Any]) -> None:
        s = self.summary
        if "seconds" in reply:
            s.worker_seconds += reply["seconds"]
            if s.startup_seconds == 0.0:
                s.startup_seconds = time.perf_counter() - self.t0 - float(reply["seconds"])
        self.pids[actor] = reply["pid"]
        vid = reply["video_id"]
        if reply["status"] == "ok" and task.method in ("video", "stitch"):
            self.pending[actor].add(vid)
        for part, ids in reply["written"]:
            s.parts.append(part)
            s.extracted += len(ids)
            self.pending[actor].difference_update(ids)
        if vid in self.failures:
            return  # a late piece of a video that has failed
        if reply["status"] == "failed":
            self._fail(vid, reply["reason"], reply["message"])
        elif reply["status"] == "split":
            ranges = reply["ranges"]
            self.pieces[vid] = {"plan": reply["plan"], "running": {}, "done": {}, "count": len(ranges), "frames": 0}
            s.split_videos += 1
            s.pieces += len(ranges)
            v = task.video
            self.queue.extendleft(reversed([_Task("piece", v, (v.video_id, v.uri, reply["plan"], a, b)) for a, b in ranges]))
        elif task.method == "piece":
            job = self.pieces[vid]
            job["done"][task.args[3]] = job["running"].pop(task.args[3])
            job["frames"] += reply["frames"]
            if len(job["done"]) == job["count"]:
                del self.pieces[vid]
                refs = [job["done"][a] for a in sorted(job["done"])]
                self.queue.appendleft(_Task("stitch", task.video, (vid, task.video.uri, job["plan"], *refs)))
                self.counted[vid] = (job["frames"], job["plan"].num_steps)
        elif task.method in ("video", "stitch"):
            if task.method == "video":
                self.counted[vid] = (reply["frames"], reply["steps"])
            s.frames += self.counted[vid][0]
            s.steps += self.counted[vid][1]
            self.bar.update(1)
            self.bar.set_postfix(failed=len(self.failures))

    def _fail(self, video_id: str, reason: str, message: str) -> None:
        if video_id in self.failures:
            return
        ref = self.refs[video_id]
        self.failures[video_id] = {"video_id": video_id, "source": ref.uri, "reason": reason, "message": message}
        self.summary.failed[video_id] = {"reason": reason, "message": message, "source": ref.uri}
        self.pieces.pop(video_id, None)
        self.bar.update(1)
        self.bar.set_postfix(failed=len(self.failures))

    def _worker_died(self, actor: int, task: _Task, error: Exception) -> None:
        """Ray restarts the actor (``max_restarts=-1``); what it held is done again. Ray cannot say whether
        an unavailable actor lost its process, so the driver asks it: a new process lost the old one's buffer."""
        now = self._ping(actor)
        replaced = now["pid"] != self.pids.get(actor)
        lost = self.pending[actor] if replaced else set()
        self.pending[actor], self.pids[actor] = set(now["pending"]), now["pid"]
        if replaced:
            self.summary.worker_restarts += 1
            self.flushed.discard(actor)
        for vid in sorted(lost):  # buffered in the dead process, not in any part: back on the queue, off the bar and the counts
            frames, steps = self.counted.pop(vid, (0, 0))
            self.summary.frames -= frames
            self.summary.steps -= steps
            self.bar.update(-1)
            self.queue.appendleft(_video_task(self.refs[vid]))
        if task.method == "flush" or (not replaced and task.video.video_id in self.pending[actor]):
            return  # nothing ran, or it ran and the video waits in the live actor's buffer
        self._retry(task, error)

    def _ping(self, actor: int) -> dict[str, Any]:
        """The actor's process and buffer, once it answers again (Ray refuses calls while it restarts)."""
        deadline = time.monotonic() + PING_TIMEOUT_S
        while True:
            try:
                return self.ray.get(self.actors[actor].ping.remote(), timeout=max(deadline - time.monotonic(), 1.0))
            except self.ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            except self.ray.exceptions.RayError:
                break
        return {"pid": None, "pending": []}

    def _retry(self, task: _Task, error: Exception) -> None:
        vid = task.video.video_id
        if vid in self.failures:
            return  # a piece of a video that has failed already
        if task.attempt >= MAX_ATTEMPTS:
            self._fail(vid, "crashed", f"failed {MAX_ATTEMPTS} times on this video, the last with {type(error).__name__}: {str(error)[:300]}")
        elif task.method == "stitch":  # the pieces may have died with it: do the video again
            self.queue.appendleft(_video_task(task.video, task.attempt + 1))
        else:
            if task.method == "piece":
                self.pieces[vid]["running"].pop(task.args[3], None)
            self.queue.appendleft(replace(task, attempt=task.attempt + 1))


def _video_task(video: VideoRef, attempt: int = 1) -> _Task:
    return _Task("video", video, (video.video_id, video.uri), attempt)


def _weights_fs(config: ExtractConfig):
    weights = config.backbone.weights or ""
    return filesystem_for(weights, config.storage_options)[0] if weights.startswith("s3://") else None
