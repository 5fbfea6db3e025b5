"""The feature store: one Parquet row per video, on local disk or S3, with a manifest.

Layout of a store ``STORE`` (a local directory or an ``s3://`` prefix)::

    STORE/part-<uuid>.parquet          rows of finished videos (schema below), written atomically
    STORE/_manifest/part-<uuid>.json   written after its part: the videos it holds
    STORE/_manifest/failed-<uuid>.json videos that failed in one run, with reasons
    STORE/manifest.json                a human-readable summary of the latest run

A part is listed in ``_manifest/`` only once it is complete, and readers only read listed parts,
so a half-written or orphaned file is never read as complete. A video is finished when a part
manifest names it; a re-run skips finished videos and retries failed ones.

The schema is declared once (``feature_schema``) and checked when read; all parts of one store
share the same provenance (backbone, weights, sampling), and a store from another backbone or
schema version is refused with a message rather than mixed.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.atomic import is_local, write_atomic
from tal_models.timing import FeatureTiming

SCHEMA_VERSION = 1
MANIFEST_DIR = "_manifest"
PART_TARGET_BYTES = 64 * 2**20  # coalesce rows into parts of about this size
# A part is written as row groups of about this many feature bytes (a video larger than that is a row group of its
# own), so that a reader that wants a few videos of a part (a streaming training shard) reads just their row groups.
ROW_GROUP_TARGET_BYTES = 4 * 2**20

# Provenance columns: equal in every row of a store.
PROVENANCE_KEYS = ("backbone", "backbone_weights", "backbone_sha256", "feature_dim", "fps", "stride", "window", "extract_config", "schema_version")


def feature_schema(feature_dim: int) -> pa.Schema:
    """The store's row schema for ``feature_dim``-dimensional features (``features`` is ``[T, C]``)."""
    return pa.schema(
        [
            pa.field("video_id", pa.string(), nullable=False),
            pa.field("features", pa.list_(pa.list_(pa.float32(), feature_dim)), nullable=False),
            pa.field("num_steps", pa.int32(), nullable=False),
            pa.field("timestamps", pa.list_(pa.float64()), nullable=False),  # centre of each step, seconds
            pa.field("fps", pa.float64(), nullable=False),  # sampling rate of the clips
            pa.field("stride", pa.int32(), nullable=False),  # sampled frames between clip starts
            pa.field("window", pa.int32(), nullable=False),  # sampled frames per clip
            pa.field("offset", pa.float64(), nullable=False),  # seconds
            pa.field("duration", pa.float64(), nullable=False),  # seconds
            pa.field("num_frames", pa.int64(), nullable=False),  # native frames
            pa.field("native_fps", pa.float64(), nullable=False),
            pa.field("source", pa.string(), nullable=False),  # the video's URI
            pa.field("backbone", pa.string(), nullable=False),
            pa.field("backbone_weights", pa.string(), nullable=False),
            pa.field("backbone_sha256", pa.string(), nullable=False),
            pa.field("feature_dim", pa.int32(), nullable=False),
            pa.field("extract_config", pa.string(), nullable=False),  # JSON
            pa.field("schema_version", pa.int32(), nullable=False),
        ]
    )


class StoreError(ValueError):
    """A store that cannot be used as asked (wrong schema, other backbone, missing)."""


@dataclass(frozen=True)
class Provenance:
    """What every feature of a store was computed with."""

    backbone: str
    backbone_weights: str
    backbone_sha256: str
    feature_dim: int
    fps: float
    stride: int
    window: int
    extract_config: str = "{}"  # JSON
    schema_version: int = SCHEMA_VERSION

    @property
    def timing(self) -> FeatureTiming:
        return FeatureTiming(self.fps, self.stride, self.window)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PROVENANCE_KEYS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provenance:
        missing = [k for k in PROVENANCE_KEYS if k not in d]
        if missing:
            raise StoreError(f"provenance lacks {missing}")
        return cls(
            backbone=str(d["backbone"]),
            backbone_weights=str(d["backbone_weights"]),
            backbone_sha256=str(d["backbone_sha256"]),
            feature_dim=int(d["feature_dim"]),
            fps=float(d["fps"]),
            stride=int(d["stride"]),
            window=int(d["window"]),
            extract_config=str(d["extract_config"]),
            schema_version=int(d["schema_version"]),
        )

    def differences(self, other: Provenance) -> list[str]:
        """Human-readable differences that make two stores incompatible (config JSON aside)."""
        keys = [k for k in PROVENANCE_KEYS if k != "extract_config"]
        return [f"{k}: {getattr(self, k)!r} vs {getattr(other, k)!r}" for k in keys if getattr(self, k) != getattr(other, k)]


@dataclass(frozen=True)
class FeatureSequence:
    """One video's features ``[T, C]`` (float32) with their timing and provenance."""

    video_id: str
    features: np.ndarray
    timing: FeatureTiming
    timestamps: np.ndarray  # [T] seconds
    duration: float
    num_frames: int = 0
    native_fps: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        f = self.features
        if f.ndim != 2:
            raise ValueError(f"{self.video_id}: features must be [T, C], got shape {f.shape}")
        if self.timestamps.shape != (f.shape[0],):
            raise ValueError(f"{self.video_id}: {f.shape[0]} feature steps but {self.timestamps.shape[0]} timestamps")
        if not np.isfinite(f).all():
            bad = int(np.flatnonzero(~np.isfinite(f).all(axis=1))[0])
            raise ValueError(f"{self.video_id}: features are not finite (first at step {bad})")


@dataclass(frozen=True)
class VideoLocation:
    """Where a video's row lies in a store: its part file name, the part's row group (``None``: not recorded) and
    its number of feature steps (``None``: not recorded)."""

    part: str
    row_group: int | None
    num_steps: int | None


@dataclass(frozen=True)
class StoreStatus:
    done: dict[str, str] = field(default_factory=dict)  # video_id -> part file name
    failed: dict[str, dict[str, str]] = field(default_factory=dict)  # video_id -> {"reason", "message", "source"}; not later done
    provenance: Provenance | None = None


def storage_options(s3_endpoint: str | None = None) -> dict[str, Any]:
    """fsspec options for ``s3://`` URIs; the endpoint falls back to ``AWS_ENDPOINT_URL``."""
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def filesystem_for(uri: str, options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path within it for a local path or an ``s3://`` URI."""
    opts = dict(options or {}) if uri.startswith("s3://") else {}
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    return fs, path.rstrip("/")


class FeatureStore:
    """A feature store at a local path or ``s3://`` prefix (see module doc)."""

    def __init__(self, uri: str, *, options: Mapping[str, Any] | None = None):
        # a local store is named by its absolute path: Ray workers do not share the caller's working folder
        self.uri = uri.rstrip("/") if "://" in uri else os.path.abspath(uri)
        self.options = dict(options or {})
        self.fs, self.path = filesystem_for(self.uri, self.options)

    # --- manifest ----------------------------------------------------------------------------
    def _manifest_path(self, name: str) -> str:
        return f"{self.path}/{MANIFEST_DIR}/{name}"

    def _manifests(self) -> list[dict[str, Any]]:
        pattern = f"{self.path}/{MANIFEST_DIR}/*.json"
        try:
            paths = sorted(self.fs.glob(pattern))
        except FileNotFoundError:
            return []
        paths = [p for p in paths if not os.path.basename(p).startswith(".tmp-")]
        # one call for all of them: s3fs fetches them concurrently (one GET after another took minutes for 10,000 parts)
        contents = self.fs.cat(paths) if paths else {}
        out = [json.loads(contents[p]) for p in paths]
        return sorted(out, key=lambda m: m.get("created", 0))

    def status(self) -> StoreStatus:
        """Finished videos (named by a part manifest), failures not since fixed, provenance."""
        done: dict[str, str] = {}
        failed: dict[str, dict[str, str]] = {}
        provenance = None
        for m in self._manifests():
            if m.get("kind") == "part":
                p = Provenance.from_dict(m["provenance"])
                if provenance is not None and provenance.differences(p):
                    raise StoreError(f"{self.uri} mixes parts of different provenance: {provenance.differences(p)}")
                provenance = provenance or p
                for vid in m["videos"]:
                    done[vid] = m["part"]
                    failed.pop(vid, None)
            elif m.get("kind") == "failed":
                for f in m["failed"]:
                    if f["video_id"] not in done:
                        failed[f["video_id"]] = {k: f.get(k, "") for k in ("reason", "message", "source")}
        return StoreStatus(done, failed, provenance)

    def check_compatible(self, provenance: Provenance) -> None:
        """Refuse to add features of another backbone/sampling/schema to this store."""
        existing = self.status().provenance
        if existing is not None and existing.differences(provenance):
            raise StoreError(
                f"{self.uri} already holds features with other settings ({'; '.join(existing.differences(provenance))}); "
                "write to another --out, or delete the store to start over"
            )

    # --- writing -----------------------------------------------------------------------------
    def write_part(self, sequences: list[FeatureSequence], provenance: Provenance) -> str:
        """Write one Parquet part holding ``sequences``, then its manifest. Returns the part name."""
        if not sequences:
            raise ValueError("write_part needs at least one sequence")
        table = to_table(sequences, provenance)
        groups = row_groups_by_bytes([s.features.nbytes for s in sequences], ROW_GROUP_TARGET_BYTES)
        buf = io.BytesIO()
        # Float features gain nothing from a dictionary (it grew a part by half and made writing 10x and reading 2-3x
        # slower) and no reader uses their min/max statistics: both only for the other columns.
        others = [name for name in table.column_names if name != "features"]
        with pq.ParquetWriter(buf, table.schema, compression="zstd", use_dictionary=others, write_statistics=others) as writer:
            start = 0
            for rows in groups:
                writer.write_table(table.slice(start, rows), row_group_size=rows)  # one call, one row group
                start += rows
        name = f"part-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}"
        write_atomic(f"{self.path}/{name}.parquet", buf.getvalue(), self.fs)
        manifest = {
            "kind": "part",
            "part": f"{name}.parquet",
            "videos": [s.video_id for s in sequences],
            "num_steps": [int(s.features.shape[0]) for s in sequences],
            "row_groups": [i for i, rows in enumerate(groups) for _ in range(rows)],  # each video's row group
            "provenance": provenance.to_dict(),
            "created": time.time(),
        }
        write_atomic(self._manifest_path(f"{name}.json"), json.dumps(manifest).encode(), self.fs)
        return f"{name}.parquet"

    def record_failures(self, failures: list[dict[str, str]]) -> None:
        """Record failed videos (``video_id``, ``source``, ``reason``, ``message``)."""
        if failures:
            manifest = {"kind": "failed", "failed": failures, "created": time.time()}
            write_atomic(self._manifest_path(f"failed-{uuid.uuid4().hex[:12]}.json"), json.dumps(manifest).encode(), self.fs)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_atomic(f"{self.path}/manifest.json", (json.dumps(summary, indent=2) + "\n").encode(), self.fs)

    # --- reading -----------------------------------------------------------------------------
    def part_paths(self) -> list[str]:
        """Full paths of the complete parts (those named by a manifest)."""
        parts = sorted(set(self.status().done.values()))
        return [f"{self.path}/{p}" for p in parts]

    @property
    def provenance(self) -> Provenance:
        p = self.status().provenance
        if p is None:
            raise StoreError(f"{self.uri} holds no finished videos (no part manifest under {MANIFEST_DIR}/)")
        return p

    def __iter__(self) -> Iterator[FeatureSequence]:
        for path in self.part_paths():
            yield from from_table(self._read_table(path))

    def read_all(self) -> dict[str, FeatureSequence]:
        return {s.video_id: s for s in self}

    def read_videos(self, video_ids: Iterable[str]) -> dict[str, FeatureSequence]:
        """The sequences of ``video_ids`` only, reading just the parts that hold them (what a
        training worker does with its shard). Videos the store does not hold are a ``StoreError``."""
        wanted = set(video_ids)
        done = self.status().done
        missing = sorted(wanted - set(done))
        if missing:
            raise StoreError(f"{self.uri} holds no features for {len(missing)} of the requested videos, e.g. {missing[:5]}")
        out: dict[str, FeatureSequence] = {}
        for part in sorted({done[v] for v in wanted}):
            table = self._read_table(f"{self.path}/{part}")
            table = table.filter(pc.is_in(table["video_id"], value_set=pa.array(sorted(wanted), pa.string())))
            out.update((s.video_id, s) for s in from_table(table))
        return out

    def locate(self, video_ids: Iterable[str]) -> dict[str, VideoLocation]:
        """Where each of ``video_ids`` lies: its part, its row group when the part's manifest records it (stores
        written before row groups were recorded: ``None``, see ``part_row_groups``) and its number of steps.
        Videos the store does not hold are a ``StoreError``."""
        wanted = set(video_ids)
        out: dict[str, VideoLocation] = {}
        for m in self._manifests():
            if m.get("kind") != "part":
                continue
            groups = m.get("row_groups") or [None] * len(m["videos"])
            steps = m.get("num_steps") or [None] * len(m["videos"])
            for vid, group, n in zip(m["videos"], groups, steps):
                if vid in wanted:  # a later part that holds a video again wins, as in status()
                    out[vid] = VideoLocation(m["part"], group, n)
        missing = sorted(wanted - set(out))
        if missing:
            raise StoreError(f"{self.uri} holds no features for {len(missing)} of the requested videos, e.g. {missing[:5]}")
        return out

    def open_part(self, part: str, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
        """A part (a name listed by the manifests) opened for reading single row groups. On S3 no block of the file is
        read ahead (fsspec's default reads tens of MB past what was asked) and the column chunks of a row group are
        fetched in coalesced ranges; ``metadata`` (a previous ``.metadata``) saves reading the footer again."""
        path = f"{self.path}/{part}"
        if is_local(self.fs):
            return pq.ParquetFile(path, metadata=metadata)
        return pq.ParquetFile(self.fs.open(path, "rb", cache_type="none"), metadata=metadata, pre_buffer=True)

    def part_row_groups(self, part: str) -> list[list[str]]:
        """The video ids of each row group of ``part``, from the file itself (its footer and ``video_id`` column):
        for parts whose manifest does not record row groups."""
        with self.open_part(part) as f:
            return [f.read_row_group(i, columns=["video_id"]).column("video_id").to_pylist() for i in range(f.num_row_groups)]

    def _read_table(self, path: str) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            table = pq.read_table(f)
        check_table(table, path)
        return table

    def to_ray_dataset(self):
        """The store as a Ray Dataset, one row per video (only complete parts)."""
        import ray.data  # Ray only when asked

        paths = self.part_paths()
        if not paths:
            raise StoreError(f"{self.uri} holds no finished videos")
        filesystem = None
        if not is_local(self.fs):
            import pyarrow.fs as pafs

            filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))
        return ray.data.read_parquet(paths, filesystem=filesystem)


def to_table(sequences: Iterable[FeatureSequence], provenance: Provenance) -> pa.Table:
    seqs = list(sequences)
    c = provenance.feature_dim
    for s in seqs:
        if s.features.shape[1] != c:
            raise StoreError(f"{s.video_id}: features have dimension {s.features.shape[1]}, the store {c}")
    flat = pa.array(np.concatenate([s.features.astype(np.float32, copy=False).reshape(-1) for s in seqs]), pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(flat, c)
    offsets = np.concatenate([[0], np.cumsum([s.features.shape[0] for s in seqs])]).astype(np.int32)
    features = pa.ListArray.from_arrays(pa.array(offsets), vectors)
    n = len(seqs)
    columns = {
        "video_id": pa.array([s.video_id for s in seqs], pa.string()),
        "features": features,
        "num_steps": pa.array([s.features.shape[0] for s in seqs], pa.int32()),
        "timestamps": pa.array([s.timestamps.astype(np.float64) for s in seqs], pa.list_(pa.float64())),
        "fps": pa.array([provenance.fps] * n, pa.float64()),
        "stride": pa.array([provenance.stride] * n, pa.int32()),
        "window": pa.array([provenance.window] * n, pa.int32()),
        "offset": pa.array([s.timing.offset for s in seqs], pa.float64()),
        "duration": pa.array([s.duration for s in seqs], pa.float64()),
        "num_frames": pa.array([s.num_frames for s in seqs], pa.int64()),
        "native_fps": pa.array([s.native_fps for s in seqs], pa.float64()),
        "source": pa.array([s.source for s in seqs], pa.string()),
        "backbone": pa.array([provenance.backbone] * n, pa.string()),
        "backbone_weights": pa.array([provenance.backbone_weights] * n, pa.string()),
        "backbone_sha256": pa.array([provenance.backbone_sha256] * n, pa.string()),
        "feature_dim": pa.array([c] * n, pa.int32()),
        "extract_config": pa.array([provenance.extract_config] * n, pa.string()),
        "schema_version": pa.array([provenance.schema_version] * n, pa.int32()),
    }
    return pa.Table.from_pydict(columns, schema=feature_schema(c))


def row_groups_by_bytes(sizes: list[int], target_bytes: int) -> list[int]:
    """Rows per row group for rows of ``sizes`` bytes, in order: a group takes rows while it stays within
    ``target_bytes`` (a row larger than that is a group of its own)."""
    groups: list[int] = []
    rows = total = 0
    for size in sizes:
        if rows and total + size > target_bytes:
            groups.append(rows)
            rows = total = 0
        rows, total = rows + 1, total + size
    if rows:
        groups.append(rows)
    return groups


def read_row_group(part: pq.ParquetFile, index: int, where: str) -> list[FeatureSequence]:
    """The sequences of row group ``index`` of an opened part (``FeatureStore.open_part``), checked like a whole part."""
    table = part.read_row_group(index)
    check_table(table, f"{where} (row group {index})")
    return list(from_table(table))


def check_table(table: pa.Table, where: str) -> None:
    """Refuse a table that does not follow ``feature_schema`` of this schema version."""
    if "schema_version" not in table.column_names:
        raise StoreError(f"{where}: not a feature-store part (no schema_version column)")
    versions = set(table.column("schema_version").to_pylist())
    if versions != {SCHEMA_VERSION}:
        raise StoreError(f"{where}: schema version {sorted(versions)}, this code reads version {SCHEMA_VERSION}; re-extract or convert the store")
    dims = set(table.column("feature_dim").to_pylist())
    if len(dims) != 1:
        raise StoreError(f"{where}: mixed feature dimensions {sorted(dims)}")
    expected = feature_schema(dims.pop())
    if not table.schema.equals(expected, check_metadata=False):
        diff = [f.name for f in expected if f.name not in table.schema.names or table.schema.field(f.name).type != f.type]
        raise StoreError(f"{where}: columns {diff} do not match the feature-store schema")


def from_table(table: pa.Table) -> Iterator[FeatureSequence]:
    """Rows of a checked part table -> ``FeatureSequence``s (features copied out of Arrow once)."""
    features = table.column("features").combine_chunks()
    vectors = features.flatten()  # FixedSizeList [sum T, C]
    c = vectors.type.list_size
    flat = vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, c)
    offsets = features.offsets.to_numpy()
    cols = {name: table.column(name).to_pylist() for name in ("video_id", "fps", "stride", "window", "offset", "duration", "num_frames", "native_fps", "source")}
    timestamps = table.column("timestamps").to_pylist()
    for i, vid in enumerate(cols["video_id"]):
        yield FeatureSequence(
            video_id=vid,
            features=flat[offsets[i] : offsets[i + 1]],
            timing=FeatureTiming(cols["fps"][i], cols["stride"][i], cols["window"][i], cols["offset"][i]),
            timestamps=np.asarray(timestamps[i], np.float64),
            duration=cols["duration"][i],
            num_frames=cols["num_frames"][i],
            native_fps=cols["native_fps"][i],
            source=cols["source"][i],
        )


class PartWriter:
    """Buffers finished sequences and writes a part when about ``target_bytes`` are pending or
    the oldest pending sequence has waited ``max_wait_s`` (bounding the work a crash can cost).

    ``add`` and ``flush`` return the ``(part, video_ids)`` they wrote, or None: an extraction actor
    tells its driver which of its videos are safely stored and which are still ``pending_ids``."""

    def __init__(self, store: FeatureStore, provenance: Provenance, target_bytes: int = PART_TARGET_BYTES, max_wait_s: float = 120.0):
        self.store, self.provenance = store, provenance
        self.target_bytes, self.max_wait_s = target_bytes, max_wait_s
        self.pending: list[FeatureSequence] = []
        self.pending_bytes = 0
        self.pending_since = 0.0
        self.parts: list[str] = []

    @property
    def pending_ids(self) -> list[str]:
        return [s.video_id for s in self.pending]

    def add(self, sequence: FeatureSequence) -> tuple[str, list[str]] | None:
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append(sequence)
        self.pending_bytes += sequence.features.nbytes
        if self.pending_bytes >= self.target_bytes or time.monotonic() - self.pending_since >= self.max_wait_s:
            return self.flush()
        return None

    def flush(self) -> tuple[str, list[str]] | None:
        if not self.pending:
            return None
        part = self.store.write_part(self.pending, self.provenance)
        written = (part, self.pending_ids)
        self.parts.append(part)
        self.pending, self.pending_bytes = [], 0
        return written
