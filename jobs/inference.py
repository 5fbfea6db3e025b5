"""Batch inference of a checkpoint over feature sequences: in this process, or on Ray Data actors.

    in process:  sequences -> batches of ``batch_size`` -> collate (pads) -> forward_inference -> Detections
    on Ray:      store.to_ray_dataset() -> filter(video ids) -> map_batches(StoreDetector, actor pool)
                 -> one row per video of plain arrays -> Detections on the driver

Both paths run the same ``detect_batch``: each video is decoded with its own ``timing`` and
``duration``, so detections come back in seconds of the video. Ray appears only in
``detect_store_on_ray`` and in the ``StoreDetector`` actors.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from ray.data.expressions import col
from tqdm import tqdm

from jobs.export import ExportedModel, is_exported
from pipelines.ray_runtime import init_ray
from pipelines.store import FeatureSequence, FeatureStore, filesystem_for, from_table
from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from tal_models.config import require_positive_int
from tal_models.detectors import Detector
from tal_models.export import RuntimeDetector
from tal_models.structures import Detections, Segments, Unit

# One row per video; a video without detections has empty lists (and so is still accounted for).
DETECTIONS_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("segments", pa.list_(pa.float64()), nullable=False),  # [N * 2] (start, end) seconds, flattened
        pa.field("scores", pa.list_(pa.float64()), nullable=False),  # [N]
        pa.field("labels", pa.list_(pa.int64()), nullable=False),  # [N] ids of the checkpoint's labels
    ]
)


def detect_batch(model: Detector, sequences: Sequence[FeatureSequence], class_embeddings: torch.Tensor | None = None) -> list[Detections]:
    """Detections (NumPy, seconds) of one batch of sequences, each with its own timing and duration; an open-vocabulary
    model scores ``class_embeddings [K', E]`` when given (labels index them), its training classes otherwise."""
    with warnings.catch_warnings():
        # store features are read-only views of Arrow buffers; collate copies them into the padded batch
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        batch = collate(sequences, pad_to_multiple=model.pad_multiple)  # features [B, C, T], T padded
    device = model.device if isinstance(model, RuntimeDetector) else next(model.parameters()).device
    with torch.inference_mode():
        if class_embeddings is None:
            detections = model.forward_inference(batch.to(device))
        else:
            detections = model.forward_inference(batch.to(device), class_embeddings=class_embeddings.to(device))
    return [d.to_numpy() for d in detections]


def detect_sequences(
    checkpoint: Checkpoint,
    sequences: Iterable[FeatureSequence],
    batch_size: int = 8,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, Detections]:
    """Run ``checkpoint`` over ``sequences`` in this process, ``batch_size`` videos per forward pass.

    ``sequences`` may be a generator (e.g. a filtered ``FeatureStore`` iteration): it is consumed
    batch by batch, so memory holds one batch of features at a time. ``device`` defaults to CUDA
    when available. Returns ``{video_id: Detections}`` (NumPy, seconds, labels indexing
    ``checkpoint.labels``) in input order.
    """
    require_positive_int(batch_size, "batch_size")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = checkpoint.build(device)
    if total is None and isinstance(sequences, Sequence | Mapping):
        total = len(sequences)
    if isinstance(sequences, Mapping):
        sequences = sequences.values()
    results: dict[str, Detections] = {}
    pending: list[FeatureSequence] = []
    with tqdm(total=total, unit="video", desc="inference", disable=not progress) as bar:
        for sequence in sequences:
            pending.append(sequence)
            if len(pending) == batch_size:
                results.update((d.video_id, d) for d in detect_batch(model, pending))
                bar.update(len(pending))
                pending = []
        if pending:
            results.update((d.video_id, d) for d in detect_batch(model, pending))
            bar.update(len(pending))
    return results


# --- Ray -------------------------------------------------------------------------------------


class StoreDetector:
    """Ray Data callable class: builds the detector once per actor, then maps a batch of store
    rows (a ``pyarrow.Table`` of the feature-store schema) to one ``DETECTIONS_SCHEMA`` row per video."""

    def __init__(self, checkpoint: Any, num_threads: int = 1):
        torch.set_num_threads(max(1, num_threads))
        data = ray.get(checkpoint) if isinstance(checkpoint, ray.ObjectRef) else checkpoint  # bytes, put once by the driver
        self.model = load_checkpoint(io.BytesIO(data)).build("cpu")

    def __call__(self, table: pa.Table) -> pa.Table:
        sequences = list(from_table(table))
        if not sequences:
            return DETECTIONS_SCHEMA.empty_table()
        return detections_to_table(detect_batch(self.model, sequences))


def detections_to_table(detections: Sequence[Detections]) -> pa.Table:
    """Detections (seconds) -> a ``DETECTIONS_SCHEMA`` table, one row per video."""
    rows = [d.to_numpy() for d in detections]
    for d in rows:
        if d.segments.unit is not Unit.SECONDS:
            raise ValueError(f"video {d.video_id!r}: detections in {d.segments.unit.value}, expected seconds")
    return pa.Table.from_pydict(
        {
            "video_id": [d.video_id for d in rows],
            "segments": [np.asarray(d.segments.data, np.float64).reshape(-1) for d in rows],  # [N, 2] -> [N * 2]
            "scores": [np.asarray(d.scores, np.float64) for d in rows],
            "labels": [np.asarray(d.labels, np.int64) for d in rows],
        },
        schema=DETECTIONS_SCHEMA,
    )


def detections_from_table(table: pa.Table) -> dict[str, Detections]:
    """The inverse of ``detections_to_table``."""
    columns = table.to_pydict()
    out = {}
    for vid, segments, scores, labels in zip(columns["video_id"], columns["segments"], columns["scores"], columns["labels"]):
        segments = np.asarray(segments, np.float64).reshape(-1, 2)  # [N * 2] -> [N, 2]
        out[vid] = Detections(
            vid, Segments(segments, Unit.SECONDS, check=False), np.asarray(scores, np.float64), np.asarray(labels, np.int64)
        )
    return out


def read_checkpoint_bytes(uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of a checkpoint at a local path or an ``s3://`` URI."""
    fs, path = filesystem_for(str(uri), storage_options)
    with fs.open(path, "rb") as f:
        return f.read()


def load_model(
    reference: str,
    storage_options: Mapping[str, Any] | None = None,
    mlflow_uri: str | None = None,
    download_to: str | os.PathLike | None = None,
) -> tuple[Checkpoint, str]:
    """A model reference -> (the checkpoint, the local path or ``s3://`` URI it was read from).

    ``models:/name@alias``, ``models:/name/N`` and ``runs:/...`` are downloaded through MLflow (``mlflow_uri``,
    default ``$MLFLOW_TRACKING_URI``) into ``download_to`` (default: a new temporary folder, left in place);
    ``s3://`` URIs and paths are read where they are. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` for an unknown name, alias, version or run (naming what exists) or a file that is not a
    checkpoint (``CheckpointError``).
    """
    local = _resolve(reference, mlflow_uri, download_to)
    if is_exported(local):
        raise CheckpointError(f"{reference} is an exported model, not a checkpoint: run it with --runtime onnx")
    return load_checkpoint(io.BytesIO(read_checkpoint_bytes(local, storage_options)), map_location="cpu"), local


def load_runtime_model(
    reference: str,
    storage_options: Mapping[str, Any] | None = None,
    mlflow_uri: str | None = None,
    download_to: str | os.PathLike | None = None,
) -> tuple[Checkpoint | ExportedModel, str]:
    """``load_model``, and exported files too (``.onnx``, ``.ts``: ``tal export``'s, read by their suffix) as an
    ``ExportedModel`` with the same ``config``, ``labels``, ``provenance``; ``jobs.export.build_for_runtime`` runs either."""
    local = _resolve(reference, mlflow_uri, download_to)
    if is_exported(local):
        return ExportedModel.from_bytes(read_checkpoint_bytes(local, storage_options), local), local
    return load_model(local, storage_options)[0], local


def _resolve(reference: str, mlflow_uri: str | None, download_to: str | os.PathLike | None) -> str:
    """A model reference -> a local path or ``s3://`` URI (registry references are downloaded first)."""
    if reference.startswith(("models:/", "runs:/")):
        # Here, not at the top: MLflow costs ~1 s and ~40 MB to import, and most processes that import this module
        # (the StoreDetector actors, Serve's Ingress and VideoFeaturizer replicas) never resolve a registry reference.
        from jobs.tracking import resolve_model

        return str(resolve_model(reference, mlflow_uri, None if download_to is None else Path(download_to)))
    return reference if "://" in reference else os.path.expanduser(reference)


def detect_store_on_ray(
    checkpoint_path: str | os.PathLike,
    store_uri: str,
    video_ids: Sequence[str],
    num_workers: int,
    batch_size: int = 8,
    *,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Detections]:
    """Run the checkpoint over the store's ``video_ids`` on a pool of ``num_workers`` CPU actors
    (one CPU and one torch thread each; a share of a CPU when the cluster has fewer than
    ``num_workers + 1``, since the store's reader needs one).

    The driver reads the checkpoint once and puts its bytes in the object store, so actors on
    other nodes need no access to ``checkpoint_path``; the store must be readable from every
    node (shared storage or ``s3://``). Returns ``{video_id: Detections}`` (NumPy, seconds,
    labels indexing the checkpoint's labels) in the order of ``video_ids``.
    """
    require_positive_int(num_workers, "num_workers")
    require_positive_int(batch_size, "batch_size")
    wanted = list(dict.fromkeys(video_ids))
    if not wanted:
        return {}
    store = FeatureStore(store_uri, options=storage_options)
    done = store.status().done
    absent = [v for v in wanted if v not in done]
    if absent:
        raise ValueError(f"{store_uri} does not hold {len(absent)} of the videos asked for, e.g. {absent[:3]}")
    data = read_checkpoint_bytes(checkpoint_path, storage_options)
    load_checkpoint(io.BytesIO(data))  # a bad file fails here, not in every actor

    init_ray()
    ctx = ray.data.DataContext.get_current()
    progress_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # ours counts videos; Ray's per operator would repeat it
    # An actor pool holding every CPU starves the tasks that read the store (Ray Data then waits
    # forever): with fewer than num_workers + 1 CPUs, the actors share what the reader leaves.
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    cpus_per_actor = min(1.0, max(cpus - 1.0, 0.0) / num_workers)
    results: dict[str, Detections] = {}
    try:
        ds = (
            store.to_ray_dataset()
            .filter(expr=col("video_id").is_in(wanted))
            .repartition(target_num_rows_per_block=batch_size)  # a part holds many videos: split it, so every actor gets work
            .map_batches(
                StoreDetector,
                fn_constructor_kwargs={"checkpoint": ray.put(data), "num_threads": 1},
                batch_size=batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=num_workers),
                num_cpus=cpus_per_actor,
            )
        )
        with tqdm(total=len(wanted), unit="video", desc="inference (ray)", disable=not progress) as bar:
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                got = detections_from_table(table)
                results.update(got)
                bar.update(len(got))
    finally:
        ctx.enable_progress_bars = progress_bars
    lost = [v for v in wanted if v not in results]
    if lost:
        raise RuntimeError(f"Ray inference returned no row for {len(lost)} videos, e.g. {lost[:3]}")
    return {v: results[v] for v in wanted}
