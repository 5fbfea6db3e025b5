"""``tal extract``, ``tal import-features``, ``tal export-features``: build a feature store.

Thin: settings and requests -> one call into ``pipelines``. The flags are ``jobs.cli.extract``'s.

``tal extract`` settings (backbone, sampling, actors) come from four layers, later ones winning:
built-in defaults < ``--config FILE.yaml`` < flags given on the command line < ``--set key=value``.
A flag left out never overrides the YAML. ``--print-config`` writes the effective settings as
YAML (an ``ExtractSettings``) and exits; that file loads back as ``--config`` unchanged. See
``examples/extract_mobilenet_v2.yaml``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from jobs.errors import UsageError
from pipelines.annotations import read_annotations
from pipelines.backbones import BackboneConfig
from pipelines.decoders import get_decoder
from pipelines.extract import ExtractConfig, ExtractSummary, SamplingConfig, extract
from pipelines.feature_import import ImportSummary, export_features, import_features
from pipelines.store import StoreError
from tal_models.config import apply_overrides, config_from_dict, config_to_dict, dump_yaml

# flag dest -> (section or None for the top level, ExtractSettings key)
_FLAG_KEYS = {
    "backbone": ("backbone", "name"),
    "weights": ("backbone", "weights"),
    "flow": ("backbone", "flow"),
    "dtype": ("backbone", "dtype"),
    "batch_size": ("backbone", "batch_size"),
    "fps": ("sampling", "fps"),
    "window": ("sampling", "window"),
    "stride": ("sampling", "stride"),
    "decoder": ("sampling", "decoder"),
    "num_workers": (None, "num_workers"),
    "cpus_per_worker": (None, "cpus_per_worker"),
    "num_gpus": (None, "gpus_per_worker"),
    "split_seconds": (None, "split_seconds"),
    "part_mb": (None, "part_mb"),
}
_SECTIONS = ("backbone", "sampling")


@dataclass(frozen=True)
class ExtractSettings:
    """What ``tal extract`` computes features with and how it spreads the work over Ray actors:
    everything of ``pipelines.extract.ExtractConfig`` but where the videos come from and go to.
    Its YAML form is what ``--config`` reads and ``--print-config`` writes (``load_settings``,
    ``dump_settings``); ``settings_from_dict`` rebuilds it from that form."""

    backbone: BackboneConfig
    sampling: SamplingConfig
    num_workers: int | None = None  # extraction actors; None: one per core of the machine running the job
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    split_seconds: float | None = 300.0  # a longer video is extracted in pieces of about this length on several actors; null: never
    part_mb: float = 64.0  # each actor writes Parquet parts of about this size (or what it has after 2 minutes)

    def __post_init__(self) -> None:
        whole = isinstance(self.num_workers, int) and not isinstance(self.num_workers, bool)
        if self.num_workers is not None and not (whole and self.num_workers >= 1):
            raise ValueError(f"num_workers must be a whole number >= 1 (or null for one per core); got {self.num_workers!r}")
        if isinstance(self.cpus_per_worker, bool) or not isinstance(self.cpus_per_worker, int | float) or not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be a positive number of CPUs; got {self.cpus_per_worker!r}")
        if isinstance(self.gpus_per_worker, bool) or not isinstance(self.gpus_per_worker, int | float) or not self.gpus_per_worker >= 0:
            raise ValueError(f"gpus_per_worker must be a number of GPUs >= 0 (e.g. 1, or 0.5 to share one); got {self.gpus_per_worker!r}")
        if self.split_seconds is not None and (isinstance(self.split_seconds, bool) or not isinstance(self.split_seconds, int | float) or not self.split_seconds > 0):
            raise ValueError(f"split_seconds must be a positive number of seconds (or null: never split); got {self.split_seconds!r}")
        if isinstance(self.part_mb, bool) or not isinstance(self.part_mb, int | float) or not self.part_mb > 0:
            raise ValueError(f"part_mb must be a positive number of megabytes; got {self.part_mb!r}")


def settings_from_dict(data: Mapping[str, Any], where: str = "") -> ExtractSettings:
    """Rebuild ``ExtractSettings`` from its dict / YAML form; missing keys take the defaults.
    Raises ``ValueError`` for unknown keys or invalid values, naming the dotted path (``where``
    prefixes it)."""
    name = where or "settings"
    if not isinstance(data, Mapping):
        raise ValueError(f"{name}: expected a mapping of fields, got {type(data).__name__}")
    known = [f.name for f in fields(ExtractSettings)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    sections = {"backbone": BackboneConfig, "sampling": SamplingConfig}
    kwargs: dict[str, Any] = {k: v for k, v in data.items() if k not in sections}
    for key, cls in sections.items():
        section = data.get(key) or {}
        if isinstance(section, Mapping) and section.get("fps") == 0:  # as --fps 0: the video's own rate
            section = {**section, "fps": None}
        kwargs[key] = config_from_dict(cls, section, where=f"{where}.{key}" if where else key)
    try:
        return ExtractSettings(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {exc}") from exc


def load_settings(path: str | Path) -> ExtractSettings:
    """Read ``ExtractSettings`` from a YAML file; errors name the file."""
    return settings_from_dict(_read_yaml(Path(path)), where=Path(path).name)


def dump_settings(settings: ExtractSettings) -> str:
    """The YAML form of ``settings`` (what ``--print-config`` writes and ``load_settings`` reads back)."""
    return dump_yaml(settings)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc


def resolve_settings(config: str | Path | None, flags: Mapping[str, Any], overrides: Sequence[str]) -> ExtractSettings:
    """Defaults < the ``config`` YAML < ``flags`` (argparse dest -> value, None = not given) <
    ``overrides`` (``key=value``, values parsed as YAML). Without ``backbone.dtype`` in any layer:
    float16 with GPUs, float32 without. Raises ``UsageError`` naming the layer and the key."""
    given = {dest: value for dest, value in flags.items() if dest in _FLAG_KEYS and value is not None}
    try:
        raw = _read_yaml(Path(config)) if config else {}
        settings = settings_from_dict(raw, where=Path(config).name if config else "")
        dtype_given = "dtype" in (raw.get("backbone") or {}) or "dtype" in given
        data = config_to_dict(settings)
        for dest, value in given.items():
            section, key = _FLAG_KEYS[dest]
            (data[section] if section else data)[key] = value
        settings_from_dict(data)  # a bad flag value fails here, not later under the name --set
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        dtype_given = "backbone.dtype" in apply_overrides(data, overrides, example="sampling.fps=10") or dtype_given
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not dtype_given:
        gpus = data["gpus_per_worker"]
        data["backbone"]["dtype"] = "float16" if isinstance(gpus, int | float) and gpus > 0 else "float32"
    try:
        return settings_from_dict(data, where="--set" if overrides else "")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@dataclass(frozen=True)
class ExtractRequest:
    """What ``tal extract`` was asked to do: where the videos come from and go to, and the resolved settings."""

    videos: str  # a directory, a glob, an s3:// prefix or a CSV manifest (video_id,uri)
    out: str  # the feature store: a directory or an s3:// prefix
    settings: ExtractSettings
    storage_options: dict[str, Any] | None = None  # fsspec options for s3://
    progress: bool = True


def run_extract(request: ExtractRequest) -> ExtractSummary:
    """Extract the features of every video not yet in the store (a re-run resumes); a store that
    cannot be used as asked (``StoreError``: wrong schema, other backbone) is a ``UsageError``."""
    settings = request.settings
    try:  # a decoder that is not installed fails here, once, not in every worker for every video
        get_decoder(settings.sampling.decoder)
    except ValueError as e:
        raise UsageError(str(e)) from None
    config = ExtractConfig(
        videos=request.videos,
        out=request.out,
        backbone=settings.backbone,
        sampling=settings.sampling,
        num_workers=settings.num_workers or max(1, os.cpu_count() or 2),
        cpus_per_worker=settings.cpus_per_worker,
        gpus_per_worker=settings.gpus_per_worker,
        storage_options=request.storage_options,
        progress=request.progress,
        split_seconds=settings.split_seconds,
        part_mb=settings.part_mb,
    )
    try:
        return extract(config)
    except StoreError as e:
        raise UsageError(str(e)) from None


@dataclass(frozen=True)
class ImportRequest:
    """What ``tal import-features`` was asked to do: ``<video_id>.npy`` files and their timing -> a feature store."""

    features: str  # folder of <video_id>.npy files, [T, C] ([C, T] with transpose)
    annotations: str  # the ground truth naming the videos and their durations
    out: str
    fps: float
    stride: int
    window: int
    backbone: str = "imported"
    transpose: bool = False
    storage_options: dict[str, Any] | None = None


def run_import(request: ImportRequest) -> ImportSummary:
    """Import the features of the annotated videos; a store or files that cannot be used are a ``UsageError``."""
    annotations = read_annotations(request.annotations)
    try:
        return import_features(
            request.features,
            annotations,
            request.out,
            fps=request.fps,
            stride=request.stride,
            window=request.window,
            backbone=request.backbone,
            transpose=request.transpose,
            storage_options=request.storage_options,
        )
    except (StoreError, ValueError) as e:
        raise UsageError(str(e)) from None


def run_export(features: str, out: str, storage_options: dict[str, Any] | None = None) -> int:
    """Write the store ``features`` as ``<video_id>.npy`` files under ``out``; returns the number of videos."""
    try:
        return export_features(features, out, storage_options=storage_options)
    except StoreError as e:
        raise UsageError(str(e)) from None
