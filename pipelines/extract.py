"""Video archive -> feature store, sharded over Ray Data actors.

    list videos (driver) -> map_batches(VideoFeatureExtractor, one video per call, actor pool)
                         -> rows stream back to the driver -> PartWriter (coalesced Parquet parts)

Ray appears only in ``extract`` (the driver) and as the actor pool that runs
``VideoFeatureExtractor``; the per-video work (``features_for_video``) is plain Python that a
notebook or a test can call directly. A video that fails is returned as a failure row with its
reason (the job goes on); the driver records it in the store's manifest. Finished videos are
skipped on a re-run, failed ones retried.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from pipelines.backbones import Backbone, BackboneConfig, build_backbone
from pipelines.decoders import DECODERS, get_decoder
from pipelines.ray_runtime import init_ray
from pipelines.store import FeatureSequence, FeatureStore, PartWriter, Provenance, filesystem_for
from pipelines.video import VideoDecodeError, sample_times
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
    parts: list[str] = field(default_factory=list)

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
    info, chunks = get_decoder(sampling.decoder).iter_frames(
        uri,
        fps=sampling.fps,
        chunk_frames=sampling.chunk_frames,
        resize=lambda w, h: decode_size(backbone, w, h),
        filesystem=filesystem,
        num_threads=1,
    )
    fps = sampling.fps or info.native_fps
    timing = FeatureTiming(fps, sampling.stride, sampling.window)
    n_sampled = len(sample_times(info.duration, fps))
    num_steps = timing.num_steps(n_sampled)
    if backbone.kind == "frame":
        features = _frame_backbone_steps(backbone, chunks, timing, num_steps, n_sampled, uri)
    else:
        features = _clip_backbone_steps(backbone, chunks, timing, num_steps, n_sampled, uri)
    return FeatureSequence(
        video_id=video_id or _stem(uri),
        features=features,
        timing=timing,
        timestamps=timing.centers(num_steps),
        duration=info.duration,
        num_frames=info.num_frames,
        native_fps=info.native_fps,
        source=uri,
    )


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


def _frame_backbone_steps(backbone: Backbone, chunks: Iterator, timing: FeatureTiming, num_steps: int, n_sampled: int, uri: str) -> np.ndarray:
    out = np.zeros((num_steps, backbone.feature_dim), np.float32)
    needed = np.zeros(n_sampled, bool)  # frames that some clip uses (stride > window skips some)
    for s in range(num_steps):
        needed[_clip_frames(s, timing, n_sampled)] = True
    cache: dict[int, np.ndarray] = {}  # sampled index -> feature, only for clips not yet complete
    step, previous = 0, None
    for chunk in chunks:
        idx = chunk.start + np.arange(len(chunk.frames))
        keep = needed[np.minimum(idx, n_sampled - 1)] & (idx < n_sampled)
        if keep.any():
            frames = chunk.frames[keep]
            feats = backbone.frame_features(frames, previous=previous) if backbone.flow else backbone.frame_features(frames)
            previous = frames[-1]
            cache.update(zip(idx[keep].tolist(), feats))
        while step < num_steps and int(_clip_frames(step, timing, n_sampled)[-1]) in cache:
            out[step] = np.mean([cache[i] for i in _clip_frames(step, timing, n_sampled).tolist()], axis=0)
            step += 1
            first_needed = step * timing.stride if step < num_steps else n_sampled
            for i in [i for i in cache if i < first_needed]:
                del cache[i]
    if step < num_steps:
        raise VideoDecodeError("truncated", uri, f"decoded frames cover {step} of {num_steps} feature steps")
    return out


def _clip_backbone_steps(backbone: Backbone, chunks: Iterator, timing: FeatureTiming, num_steps: int, n_sampled: int, uri: str) -> np.ndarray:
    length = backbone.clip_length or timing.window
    pick = np.linspace(0, timing.window - 1, length).round().astype(int)  # window frames -> clip length
    out = np.zeros((num_steps, backbone.feature_dim), np.float32)
    buffer: dict[int, np.ndarray] = {}
    step, batch, batch_steps = 0, [], []

    def run_batch() -> None:
        if batch:
            out[batch_steps] = backbone.clip_features(np.stack(batch))
            batch.clear()
            batch_steps.clear()

    for chunk in chunks:
        for j, frame in enumerate(chunk.frames):
            buffer[chunk.start + j] = frame
        while step < num_steps and int(_clip_frames(step, timing, n_sampled)[-1]) in buffer:
            frames_idx = _clip_frames(step, timing, n_sampled)[pick]
            batch.append(np.stack([buffer[int(i)] for i in frames_idx]))
            batch_steps.append(step)
            step += 1
            if len(batch) >= backbone.batch_size:
                run_batch()
            first_needed = step * timing.stride if step < num_steps else n_sampled
            for i in [i for i in buffer if i < first_needed]:
                del buffer[i]
    run_batch()
    if step < num_steps:
        raise VideoDecodeError("truncated", uri, f"decoded frames cover {step} of {num_steps} feature steps")
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


def encode_sequence(seq: FeatureSequence) -> bytes:
    """A sequence as ``.npz`` bytes (no pickle) for the trip from a Ray worker to the driver."""
    buf = io.BytesIO()
    meta = {k: getattr(seq, k) for k in ("video_id", "duration", "num_frames", "native_fps", "source")}
    meta["timing"] = asdict(seq.timing)
    np.savez(buf, features=seq.features, timestamps=seq.timestamps, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    return buf.getvalue()


def decode_sequence(data: bytes) -> FeatureSequence:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        timing = FeatureTiming(**meta.pop("timing"))
        return FeatureSequence(features=z["features"], timestamps=z["timestamps"], timing=timing, **meta)


class VideoFeatureExtractor:
    """Ray Data callable class: loads the backbone once per actor, then one video per call.

    Returns one row per video: ``ok`` with the encoded sequence, or the failure's reason.
    """

    def __init__(self, backbone: BackboneConfig, sampling: SamplingConfig, storage_options: dict[str, Any], num_threads: int, use_gpu: bool):
        import torch

        tune_allocator()
        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.storage_options = storage_options
        self.backbone = build_backbone(backbone, device, filesystem=self._filesystem(backbone.weights or ""), num_threads=num_threads)
        self.sampling = sampling

    def _filesystem(self, uri: str):
        return filesystem_for(uri, self.storage_options)[0] if uri.startswith("s3://") else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"video_id": [], "uri": [], "ok": [], "reason": [], "message": [], "payload": [], "frames": [], "seconds": []}
        for vid, uri in zip(batch["video_id"].tolist(), batch["uri"].tolist()):
            start = time.perf_counter()
            ok, reason, message, payload, frames = True, "", "", b"", 0
            try:
                seq = features_for_video(self.backbone, uri, self.sampling, video_id=vid, filesystem=self._filesystem(uri))
                payload = encode_sequence(seq)
                frames = int(round(seq.duration * seq.timing.fps))
            except VideoDecodeError as e:
                ok, reason, message = False, e.reason, str(e)
            except Exception as e:  # noqa: BLE001 - one broken video must not stop the job
                ok, reason, message = False, "error", f"{type(e).__name__}: {e}"
            for key, value in zip(rows, (vid, uri, ok, reason, message, payload, frames, time.perf_counter() - start)):
                rows[key].append(value)
        out = {k: np.array(v) for k, v in rows.items() if k != "payload"}
        out["payload"] = np.array(rows["payload"], dtype=object)
        return out


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
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is per video; Ray's per operator would repeat it
    items = [{"video_id": v.video_id, "uri": v.uri} for v in todo]
    workers = max(1, min(config.num_workers, len(todo)))
    with warnings.catch_warnings():
        # max_task_retries has no named parameter in Ray 2.60 (pinned); without it a video that
        # kills its worker natively would be retried forever (the actor pool's default is -1).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = _pipeline(ray, items, config, workers)
    writer = PartWriter(store, provenance)
    failures: list[dict[str, str]] = []
    first_row_at = None
    bar = tqdm(total=len(todo), unit="video", desc="extract", disable=not config.progress)
    try:
        # iter_rows() prefetches one block, which holds every finished video back until the next one
        # finishes; unbatched iteration without prefetch hands each over as it completes.
        for row in _rows(ds):
            if first_row_at is None:
                first_row_at = time.perf_counter()
                summary.startup_seconds = first_row_at - t0 - float(row["seconds"])
            if row["ok"]:
                seq = decode_sequence(row["payload"])
                writer.add(seq)
                summary.extracted += 1
                summary.frames += int(row["frames"])
                summary.steps += seq.features.shape[0]
            else:
                failure = {"video_id": row["video_id"], "source": row["uri"], "reason": row["reason"], "message": row["message"]}
                failures.append(failure)
                summary.failed[row["video_id"]] = {k: failure[k] for k in ("reason", "message", "source")}
            bar.update(1)
            bar.set_postfix(failed=len(failures))
    finally:
        bar.close()
        writer.flush()  # whatever finished is kept, even when the job is interrupted
        store.record_failures(failures)
        summary.parts = writer.parts
        summary.seconds = time.perf_counter() - t0
        final = store.status()
        store.write_summary({"done": sorted(final.done), "failed": final.failed, "provenance": provenance.to_dict(), "last_run": summary.to_dict()})
    return summary


def _rows(ds) -> Iterator[dict[str, Any]]:
    for batch in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"):
        for i in range(len(batch["video_id"])):
            yield {k: v[i].item() if isinstance(v[i], np.generic) else v[i] for k, v in batch.items()}


def _pipeline(ray, items: list[dict[str, str]], config: ExtractConfig, workers: int):
    """The Ray Data plan: one row per video -> an actor pool of ``VideoFeatureExtractor``."""
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        VideoFeatureExtractor,
        fn_constructor_kwargs={
            "backbone": config.backbone,
            "sampling": config.sampling,
            "storage_options": config.storage_options,
            "num_threads": max(1, int(config.cpus_per_worker)),
            "use_gpu": config.gpus_per_worker > 0,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),  # no video waits behind another
        num_cpus=config.cpus_per_worker,
        num_gpus=config.gpus_per_worker or None,
        max_task_retries=2,  # a worker that dies is restarted and its video retried, twice at most
        # Ray Data calls the UDF from a thread of its own, whose glibc arena ignores tune_allocator()
        # (measured: half speed, kernel time ~ user time); these variables act from process start.
        runtime_env={"env_vars": ALLOCATOR_ENV},
    )


def _weights_fs(config: ExtractConfig):
    weights = config.backbone.weights or ""
    return filesystem_for(weights, config.storage_options)[0] if weights.startswith("s3://") else None
