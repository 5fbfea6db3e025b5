"""``tal detect --workers N``: detection over a video archive as one Ray Data pipeline, resumable.

    driver:  --model -> its bytes, put in the object store once; list the videos, leave out those of
             complete shards -> one row {video_id, uri, store} per video
    actors:  VideoDetector x N: the featurizer of the checkpoint's provenance and the detector, built
             once each; per call, each video: decode + featurize + detect (``jobs.detect.detect_video``,
             the in-process path's own function) [--features-out: ``FeatureStore.write_part`` of the
             call's features, from the actor] -> one small row per video (detections, timing, reason)
    driver:  rows -> a shard every K videos or T seconds -> at the end results.json and failed.json

Layout of OUTPUT (a local folder or an ``s3://`` prefix)::

    OUTPUT/results-<n>.json             ActivityNet results of shard n's videos (written atomically)
    OUTPUT/_manifest/results-<n>.json   written after its shard: the videos it holds (source, duration,
                                        timing, worker) and the videos that failed in it (reason, message)
    OUTPUT/results.json, failed.json    merged from the complete shards, as the in-process tal detect writes them
    OUTPUT/timelines/<video>.png

A shard is complete once its manifest entry exists, and only complete shards are read: a shard whose
driver died before writing the entry is ignored, its videos redone into a new shard number (no file
is ever overwritten). A re-run skips the videos of complete shards and retries the failed ones. Every
entry records the settings its detections depend on (model sha256, threshold, top k, runtime); a
re-run with other settings is refused rather than mixed. One driver per OUTPUT at a time.

Ray appears in ``run`` (the driver) and in ``VideoDetector`` (the actors) only.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import queue
import re
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from jobs.detect import (
    DEFAULT_SCORE_THRESHOLD,
    DEFAULT_TIMELINE_VIDEOS,
    DetectReport,
    VideoFailure,
    VideoResult,
    _featurizer,
    _list_videos,
    _open_model,
    check_result_flags,
    detect_video,
    format_report,
)
from jobs.errors import UsageError
from jobs.evaluate import safe_file_name
from jobs.export import ExportedModel, build_for_runtime, is_exported
from jobs.inference import read_checkpoint_bytes
from pipelines.annotations import activitynet_results
from pipelines.atomic import write_atomic, write_json_atomic
from pipelines.extract import ALLOCATOR_ENV, VideoRef, build_featurizer, extraction_settings, provenance_for, settings_json
from pipelines.ray_runtime import init_ray
from pipelines.store import FeatureStore, Provenance, StoreError, filesystem_for
from tal_models.checkpoint import load_checkpoint
from tal_models.structures import Detections, LabelMap, Segments, Unit

DEFAULT_SHARD_VIDEOS = 100
DEFAULT_SHARD_SECONDS = 60.0
MANIFEST_DIR = "_manifest"
RESULTS_VERSION = "VERSION 1.3"  # write_activitynet_results' default
_SHARD_NAME = re.compile(r"results-(\d+)\.json")

# What an actor returns per video: detections (seconds, label ids of the checkpoint), timing, or the
# failure's reason. Never features: they stay in the actor (or go to --features-out from there).
ROW_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("ok", pa.bool_(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),  # "" when ok; else a VideoFailure reason
        pa.field("message", pa.string(), nullable=False),
        pa.field("duration", pa.float64(), nullable=False),  # seconds of video (0 when failed)
        pa.field("num_computed", pa.int64(), nullable=False),  # detections before the threshold and top k
        pa.field("segments", pa.list_(pa.float64()), nullable=False),  # [N * 2] (start, end) seconds, flattened
        pa.field("scores", pa.list_(pa.float64()), nullable=False),  # [N], best first
        pa.field("labels", pa.list_(pa.int64()), nullable=False),  # [N]
        pa.field("started", pa.float64(), nullable=False),  # wall clock (epoch s) when the actor began the video
        pa.field("seconds", pa.float64(), nullable=False),  # the actor's time on the video
        pa.field("worker", pa.string(), nullable=False),  # host:pid of the actor
        pa.field("features_part", pa.string(), nullable=False),  # the --features-out part holding its features, or ""
    ]
)


@dataclass(frozen=True)
class BatchDetectRequest:
    """``jobs.detect.DetectRequest``'s fields (same meaning, except ``output`` and ``device``) and the pipeline's."""

    videos: str  # a file, a directory (recursively), a glob, an s3:// prefix or a CSV manifest
    model: str  # models:/name@alias, models:/name/version, runs:/<id>/path, a path or an s3:// URI
    output: str  # a local folder or an s3:// prefix
    workers: int  # actors, each with its own featurizer and detector
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    top_k: int | None = None
    device: str | None = None  # cpu, or cuda (one GPU per actor); None: cuda when the cluster has GPUs
    backbone_weights: str | None = None  # as read by the actors
    timeline_videos: int = DEFAULT_TIMELINE_VIDEOS
    storage_options: dict[str, Any] | None = None
    progress: bool = True
    runtime: str = "torch"
    cpus_per_worker: float = 1.0  # Ray CPUs per actor; its torch threads are the whole number of them (at least 1)
    videos_per_call: int = 1  # videos per actor call (and per --features-out part)
    shard_videos: int = DEFAULT_SHARD_VIDEOS  # a shard once this many videos are pending...
    shard_seconds: float = DEFAULT_SHARD_SECONDS  # ...or the oldest pending one has waited this long
    features_out: str | None = None  # a feature store the actors write the videos' features to


@dataclass
class BatchDetectReport(DetectReport):
    """``DetectReport`` over every listed video (this run's and earlier runs' shards), and what this run did."""

    workers: int = 0
    skipped: int = 0  # videos already in a complete shard of OUTPUT: not sent to the actors
    submitted: int = 0  # videos sent to the actors by this run
    processed: int = 0  # rows (videos) that came back to the driver in this run
    shards: list[str] = field(default_factory=list)  # written by this run
    row_bytes_max: int = 0  # the largest row the driver received (Arrow bytes)
    features_parts: int = 0  # --features-out parts the actors wrote in this run

    @property
    def videos_per_second(self) -> float:
        return self.processed / max(self.seconds, 1e-9)


# --- the actors -------------------------------------------------------------------------------


class VideoDetector:
    """Ray Data callable class: builds the checkpoint's featurizer and the detector once per actor, then
    maps a batch of ``{video_id, uri, store}`` rows to one ``ROW_SCHEMA`` row per video.

    With ``features_out`` the videos' features go to that store from here (one part per call, for the
    rows whose ``store`` is true), never to the driver.
    """

    def __init__(
        self,
        model: Any,  # the model file's bytes (or their ObjectRef)
        where: str,  # where the driver read them (an exported file is told by its suffix)
        runtime: str,
        device: str,
        num_threads: int,
        score_threshold: float,
        top_k: int | None,
        backbone_weights: str | None = None,
        storage_options: dict[str, Any] | None = None,
        features_out: str | None = None,
        provenance: dict[str, Any] | None = None,  # of the features written to features_out
    ):
        import ray

        torch.set_num_threads(max(1, num_threads))
        data = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        loaded = ExportedModel.from_bytes(data, where) if is_exported(where) else load_checkpoint(io.BytesIO(data), map_location="cpu")
        self.storage_options = dict(storage_options or {})
        self.backbone, self.sampling = build_featurizer(
            loaded.provenance, device, weights=backbone_weights, storage_options=self.storage_options, num_threads=num_threads
        )
        self.model = build_for_runtime(loaded, runtime, device, num_threads=num_threads)
        self.score_threshold, self.top_k = score_threshold, top_k
        self.store = FeatureStore(features_out, options=self.storage_options) if features_out else None
        self.provenance = Provenance.from_dict(provenance) if provenance else None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict[str, Any]] = []
        to_store = []  # (row index, FeatureSequence)
        for vid, uri, store in zip(*(batch.column(k).to_pylist() for k in ("video_id", "uri", "store"))):
            started, t0 = time.time(), time.perf_counter()
            outcome, seq = detect_video(
                self.backbone, self.sampling, self.model, VideoRef(vid, uri), self.score_threshold, self.top_k, self.storage_options
            )
            rows.append(_row(outcome, started, time.perf_counter() - t0, self.worker))
            if self.store is not None and store and seq is not None and isinstance(outcome, VideoResult):
                to_store.append((len(rows) - 1, seq))
        if self.store is not None:
            self._store_features(rows, to_store)
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)

    def _store_features(self, rows: list[dict[str, Any]], to_store: list) -> None:
        if to_store:
            try:
                part = self.store.write_part([seq for _, seq in to_store], self.provenance)
            except Exception as e:  # noqa: BLE001 - the videos are retried by the next run, the others go on
                for i, _ in to_store:
                    rows[i].update(ok=False, reason="error", message=f"writing its features to {self.store.uri}: {type(e).__name__}: {e}")
            else:
                for i, _ in to_store:
                    rows[i]["features_part"] = part
        failures = [{k: r[k] for k in ("video_id", "source", "reason", "message")} for r in rows if not r["ok"]]
        self.store.record_failures(failures)


def _row(outcome: VideoResult | VideoFailure, started: float, seconds: float, worker: str) -> dict[str, Any]:
    row = dict.fromkeys(("reason", "message", "features_part"), "")
    row.update(video_id=outcome.video_id, source=outcome.source, started=started, seconds=seconds, worker=worker)
    if isinstance(outcome, VideoFailure):
        return row | {"ok": False, "reason": outcome.reason, "message": outcome.message, "duration": 0.0, "num_computed": 0,
                      "segments": [], "scores": [], "labels": []}  # fmt: skip
    d = outcome.detections
    return row | {
        "ok": True,
        "duration": outcome.duration,
        "num_computed": outcome.num_computed,
        "segments": np.asarray(d.segments.data, np.float64).reshape(-1).tolist(),  # [N, 2] -> [N * 2]
        "scores": np.asarray(d.scores, np.float64).tolist(),
        "labels": np.asarray(d.labels, np.int64).tolist(),
    }


def _detections(row: Mapping[str, Any]) -> Detections:
    segments = np.asarray(row["segments"], np.float64).reshape(-1, 2)  # [N * 2] -> [N, 2]
    return Detections(row["video_id"], Segments(segments, Unit.SECONDS, check=False), np.asarray(row["scores"], np.float64),
                      np.asarray(row["labels"], np.int64))  # fmt: skip


# --- OUTPUT: shards and their manifest ----------------------------------------------------------


class Output:
    """OUTPUT, local or ``s3://``: atomic writes, and reads of what a complete shard names."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None):
        self.uri = uri.rstrip("/") if "://" in uri else os.path.abspath(uri)
        self.fs, self.path = filesystem_for(self.uri, storage_options)

    def name(self, *parts: str) -> str:
        """The URI (or local path) of a file of OUTPUT, for messages."""
        return "/".join((self.uri, *parts))

    def write(self, relative: str, data: bytes) -> None:
        write_atomic(f"{self.path}/{relative}", data, self.fs)

    def write_json(self, relative: str, obj: Any, indent: int | None = None) -> None:
        write_json_atomic(f"{self.path}/{relative}", obj, indent=indent, fs=self.fs)

    def read_json(self, relative: str) -> Any:
        with self.fs.open(f"{self.path}/{relative}", "rb") as f:
            return json.loads(f.read())

    def names(self, relative: str = "") -> list[str]:
        """File names in a folder of OUTPUT (none if it does not exist)."""
        self.fs.invalidate_cache()  # another process (an earlier driver) wrote them
        try:
            return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(f"{self.path}/{relative}".rstrip("/"), detail=False))
        except FileNotFoundError:
            return []


@dataclass
class OutputState:
    """What the complete shards of OUTPUT hold."""

    done: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # video_id -> (shard, its manifest record)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)  # video_id -> its latest failure, if not since done
    next_index: int = 0  # the next shard number: above every shard file, complete or not


def read_state(out: Output, settings: Mapping[str, Any] | None = None) -> OutputState:
    """The complete shards of ``out`` (those with a manifest entry), in shard order. With ``settings``,
    shards written with other settings are refused (``UsageError``): their detections would not be comparable."""
    state = OutputState()
    indices = [int(m.group(1)) for n in out.names() if (m := _SHARD_NAME.fullmatch(n))]
    entries = sorted((int(m.group(1)), n) for n in out.names(MANIFEST_DIR) if (m := _SHARD_NAME.fullmatch(n)))
    for index, name in entries:
        entry = out.read_json(f"{MANIFEST_DIR}/{name}")
        if settings is not None and entry["settings"] != dict(settings):
            differ = [f"{k}: {entry['settings'].get(k)!r} there, {v!r} now" for k, v in settings.items() if entry["settings"].get(k) != v]
            raise UsageError(
                f"--output {out.uri} holds detections made with other settings ({'; '.join(differ)}); "
                "give another --output, or delete it to start over"
            )
        for vid, record in entry["videos"].items():
            state.done.setdefault(vid, (entry["shard"], record))
            state.failed.pop(vid, None)
        for failure in entry["failed"]:
            if failure["video_id"] not in state.done:
                state.failed[failure["video_id"]] = failure
        indices.append(index)
    state.next_index = max(indices, default=-1) + 1
    return state


class ShardWriter:
    """Buffers the actors' rows and writes a shard, then its manifest entry, when ``shard_videos`` are
    pending or the oldest has waited ``shard_seconds`` (bounding what a killed driver loses)."""

    def __init__(self, out: Output, first_index: int, settings: Mapping[str, Any], label_map: LabelMap,
                 external_data: Mapping[str, Any], shard_videos: int, shard_seconds: float):  # fmt: skip
        self.out, self.index, self.settings = out, first_index, dict(settings)
        self.label_map, self.external_data = label_map, dict(external_data)
        self.shard_videos, self.shard_seconds = shard_videos, shard_seconds
        self.pending: list[dict[str, Any]] = []
        self.pending_since = 0.0
        self.written: set[str] = set()  # every video this writer has put in a shard: none twice
        self.shards: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        if row["video_id"] in self.written or any(r["video_id"] == row["video_id"] for r in self.pending):
            return  # a task Ray ran again after its worker died: the first result stands
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append(row)

    def due(self) -> bool:
        return bool(self.pending) and (
            len(self.pending) >= self.shard_videos or time.monotonic() - self.pending_since >= self.shard_seconds
        )

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"results-{self.index}.json"
        ok = [r for r in self.pending if r["ok"]]
        detections = activitynet_results([_detections(r) for r in ok], self.label_map, RESULTS_VERSION, self.external_data)
        self.out.write_json(name, detections)
        record = ("source", "duration", "num_computed", "started", "seconds", "worker", "features_part")
        entry = {
            "kind": "shard",
            "shard": name,
            "settings": self.settings,
            "videos": {r["video_id"]: {k: r[k] for k in record} for r in ok},
            "failed": [
                {k: r[k] for k in ("video_id", "source", "reason", "message", "started", "worker")} for r in self.pending if not r["ok"]
            ],
            "created": time.time(),
        }
        self.out.write_json(f"{MANIFEST_DIR}/{name}", entry)  # after the shard: the entry lists complete shards only
        self.written.update(r["video_id"] for r in self.pending)
        self.shards.append(name)
        self.index += 1
        self.pending = []


# --- the driver ---------------------------------------------------------------------------------


def run(request: BatchDetectRequest) -> BatchDetectReport:
    """Detect actions in ``request.videos`` on a pool of ``request.workers`` Ray actors; write the shards as
    they come and, at the end, ``results.json``, ``failed.json`` and timelines (module doc).

    Refused before any video (``UsageError``): what the in-process ``tal detect`` refuses, flags of the
    pipeline out of range, an OUTPUT holding detections of other settings, a --features-out store of
    other features, ``--device cuda`` on a cluster without GPUs.
    """
    _check_flags(request)
    model, model_uri = _open_model(request)
    if isinstance(model, ExportedModel) and model.info.format != "onnx":
        raise UsageError(f"--model {request.model} is a {model.info.format} export; --runtime onnx needs a .onnx file or a checkpoint")
    out = Output(request.output, request.storage_options)
    videos = _list_videos(request)
    # Built here once, on CPU, as the actors will (the same refusals as in-process, before any actor starts),
    # and for the provenance of --features-out; then dropped.
    backbone, sampling = _featurizer(model, "cpu", request)
    data = model.data if isinstance(model, ExportedModel) else read_checkpoint_bytes(model_uri, request.storage_options)
    settings = {
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "score_threshold": request.score_threshold,
        "top_k": request.top_k,
        "runtime": request.runtime,
    }
    state = read_state(out, settings)
    provenance, stored = _features_out(request, model, backbone, sampling)
    prov = model.provenance
    report = BatchDetectReport(
        checkpoint=model_uri,
        labels=list(model.labels),
        featurizer=f"{prov.get('backbone')} ({backbone.weights_name}, sha256 {backbone.weights_sha256[:12]}...), "
        f"{sampling.fps or 'native'} fps, window {sampling.window}, stride {sampling.stride}",
        workers=request.workers,
    )
    del backbone

    todo = [v for v in videos if v.video_id not in state.done]
    report.skipped = len(videos) - len(todo)
    kept = f"score >= {request.score_threshold:g}" + (f", top {request.top_k} per video" if request.top_k else "")
    external = {"used": False, "details": f"tal detect, model {request.model}, {kept}"}
    writer = ShardWriter(out, state.next_index, settings, model.label_map, external, request.shard_videos, request.shard_seconds)
    started = time.perf_counter()
    if todo:
        _detect_on_ray(request, todo, stored, data, model_uri, provenance, writer, report)
    report.seconds = time.perf_counter() - started
    report.shards = writer.shards
    _write_outputs(report, request, out, videos, model.label_map, external)
    if request.features_out:
        _summarize_store(request, provenance, report)
    return report


def _detect_on_ray(request, todo: list[VideoRef], stored: set[str], data: bytes, where: str, provenance, writer: ShardWriter,
                   report: BatchDetectReport) -> None:  # fmt: skip
    import ray

    init_ray()
    device = _actor_device(request.device, float(ray.cluster_resources().get("GPU", 0.0)))
    report.featurizer += f", on {min(request.workers, len(todo))} Ray actors ({device})"
    if request.runtime == "onnx":
        report.featurizer += "; detector on ONNX Runtime"
    ctx = ray.data.DataContext.get_current()
    progress_bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # ours counts videos
    items = [{"video_id": v.video_id, "uri": v.uri, "store": v.video_id not in stored} for v in todo]
    workers = max(1, min(request.workers, len(todo)))
    threads = max(1, int(request.cpus_per_worker))
    try:
        with warnings.catch_warnings():
            # as pipelines.extract: max_task_retries has no named parameter in Ray 2.60
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / request.videos_per_call)).map_batches(
                VideoDetector,
                fn_constructor_kwargs={
                    "model": ray.put(data),
                    "where": where,
                    "runtime": request.runtime,
                    "device": device,
                    "num_threads": threads,
                    "score_threshold": request.score_threshold,
                    "top_k": request.top_k,
                    "backbone_weights": request.backbone_weights,
                    "storage_options": request.storage_options,
                    "features_out": request.features_out,
                    "provenance": provenance.to_dict() if provenance else None,
                },
                batch_size=request.videos_per_call,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),  # no video waits behind another
                num_cpus=request.cpus_per_worker,
                num_gpus=1 if device == "cuda" else None,
                max_task_retries=2,  # a worker that dies is restarted and its call retried, twice at most
                runtime_env={"env_vars": ALLOCATOR_ENV},  # the extraction workers' allocator settings (pipelines.extract)
            )
        report.submitted = len(todo)
        parts: set[str] = set()
        with tqdm(total=len(todo), unit="video", desc="detect (ray)", disable=not request.progress) as bar:
            try:
                for table in _batches(ds, poll_s=min(1.0, request.shard_seconds / 4)):
                    if table is not None:
                        report.row_bytes_max = max([report.row_bytes_max, *(table.slice(i, 1).nbytes for i in range(table.num_rows))])
                        for row in table.to_pylist():
                            writer.add(row)
                            parts.add(row["features_part"])
                        report.processed += table.num_rows
                        bar.update(table.num_rows)
                    if writer.due():
                        writer.flush()
            finally:
                writer.flush()  # what finished is kept, even when the job fails or is interrupted
        report.features_parts = len(parts - {""})
    finally:
        ctx.enable_progress_bars = progress_bars


def _batches(ds, poll_s: float) -> Iterator[pa.Table | None]:
    """The dataset's output batches as they complete, and ``None`` whenever ``poll_s`` pass without one
    (so that the caller can write a shard on time while a long video is still being processed)."""
    items: queue.Queue = queue.Queue()
    stop = threading.Event()
    end = object()

    def pump() -> None:
        try:
            # prefetch_batches=0: each batch is handed over as it completes (see pipelines.extract._rows)
            for table in ds.iter_batches(batch_size=None, prefetch_batches=0, batch_format="pyarrow"):
                items.put(table)
                if stop.is_set():
                    return
            items.put(end)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            items.put(e)

    thread = threading.Thread(target=pump, name="tal-detect-rows", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = items.get(timeout=poll_s)
            except queue.Empty:
                yield None
                continue
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _check_flags(request: BatchDetectRequest) -> None:
    check_result_flags(request.score_threshold, request.top_k, request.timeline_videos)
    for flag, value in (
        ("--workers", request.workers),
        ("--videos-per-call", request.videos_per_call),
        ("--shard-videos", request.shard_videos),
    ):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if not request.cpus_per_worker > 0:
        raise UsageError(f"--cpus-per-worker must be > 0, got {request.cpus_per_worker}")
    if not request.shard_seconds > 0:
        raise UsageError(f"--shard-seconds must be > 0, got {request.shard_seconds}")
    if request.device not in (None, "cpu", "cuda"):
        raise UsageError(f"--device {request.device!r} with --workers: give cpu or cuda (Ray gives each actor its own GPU)")
    if "://" not in request.output and os.path.isfile(request.output):
        raise UsageError(f"--output {request.output} is a file; it names a directory (results.json, failed.json, shards)")
    if request.features_out and request.features_out.rstrip("/") == request.output.rstrip("/"):
        raise UsageError("--features-out must not be --output: give the feature store a folder of its own")


def _actor_device(requested: str | None, cluster_gpus: float) -> str:
    if requested is None:
        return "cuda" if cluster_gpus >= 1 else "cpu"
    if requested == "cuda" and cluster_gpus < 1:
        raise UsageError("--device cuda: the Ray cluster has no GPU; use --device cpu")
    return requested


def _features_out(request: BatchDetectRequest, model, backbone, sampling) -> tuple[Provenance | None, set[str]]:
    """The provenance of the features the actors will store (the checkpoint's featurizer), and the videos
    the store holds already (not written again). A store of other features is refused."""
    if not request.features_out:
        return None, set()
    config, _ = extraction_settings(model.provenance)
    if request.backbone_weights is not None:
        config = replace(config, weights=request.backbone_weights)
    provenance = provenance_for(backbone, sampling, settings_json(config, sampling))
    store = FeatureStore(request.features_out, options=request.storage_options)
    try:
        store.check_compatible(provenance)
        return provenance, set(store.status().done)
    except StoreError as e:
        raise UsageError(f"--features-out: {e}") from None


def _write_outputs(report: BatchDetectReport, request: BatchDetectRequest, out: Output, videos: list[VideoRef],
                   label_map: LabelMap, external: Mapping[str, Any]) -> None:  # fmt: skip
    """results.json and failed.json over every listed video, merged from the complete shards (this run's and
    earlier ones'), and timelines; failed.json before results.json, as the in-process path."""
    state = read_state(out)
    shards: dict[str, dict[str, Any]] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    for ref in videos:
        if ref.video_id in state.done:
            shard, record = state.done[ref.video_id]
            if shard not in shards:
                shards[shard] = out.read_json(shard)["results"]
            found = shards[shard][ref.video_id]
            results[ref.video_id] = found
            detections = Detections(
                ref.video_id,
                Segments(np.asarray([d["segment"] for d in found], np.float64).reshape(-1, 2), Unit.SECONDS, check=False),
                np.asarray([d["score"] for d in found], np.float64),
                np.asarray([label_map.id(d["label"]) for d in found], np.int64),
            )
            report.videos.append(VideoResult(ref.video_id, record["source"], record["duration"], detections, record["num_computed"]))
        elif ref.video_id in state.failed:
            f = state.failed[ref.video_id]
            report.failed.append(VideoFailure(ref.video_id, f["source"], f["reason"], f["message"]))
        else:  # sent to the actors, yet no row came back (a job that failed): the next run retries it
            report.failed.append(VideoFailure(ref.video_id, ref.uri, "error", "no result came back from the Ray actors"))
    drawn = report.videos[: request.timeline_videos]
    if drawn:
        from jobs.plots import plot_timeline  # here, not at the top: it switches matplotlib to Agg

        with tempfile.TemporaryDirectory() as tmp:
            for v in drawn:
                name = f"{safe_file_name(v.video_id)}.png"
                plot_timeline(
                    os.path.join(tmp, name), v.video_id, None, v.detections, label_map, v.duration, min_score=request.score_threshold
                )
                with open(os.path.join(tmp, name), "rb") as f:
                    out.write(f"timelines/{name}", f.read())
        report.outputs["timelines"] = out.name("timelines")
    out.write_json("failed.json", {"failed": [asdict(f) for f in report.failed]}, indent=2)
    report.outputs["failed"] = out.name("failed.json")
    out.write_json("results.json", {"version": RESULTS_VERSION, "results": results, "external_data": dict(external)})
    report.outputs["results"] = out.name("results.json")
    report.outputs["manifest"] = out.name(MANIFEST_DIR)


def _summarize_store(request: BatchDetectRequest, provenance: Provenance, report: BatchDetectReport) -> None:
    store = FeatureStore(request.features_out, options=request.storage_options)
    status = store.status()
    last_run = {"by": "tal detect --workers", "model": request.model, "videos": request.videos, "parts": report.features_parts}
    store.write_summary({"done": sorted(status.done), "failed": status.failed, "provenance": provenance.to_dict(), "last_run": last_run})
    report.outputs["features"] = store.uri


def format_batch_report(report: BatchDetectReport, request: BatchDetectRequest) -> str:
    lines = [
        format_report(report, request),
        f"  this run    {report.skipped} videos already in complete shards (skipped), {report.processed} of {report.submitted} "
        f"processed by {report.workers} actors into {len(report.shards)} shards",
        f"  driver rows the largest was {report.row_bytes_max:,} bytes (detections and timing; features stay in the actors)",
    ]
    return "\n".join(lines)
