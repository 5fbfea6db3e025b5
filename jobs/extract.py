"""``tal extract``, ``tal import-features``, ``tal export-features``: build a feature store.

Thin: flags -> configs -> one call into ``pipelines``.

``tal extract`` settings (backbone, sampling, actors) come from four layers, later ones winning:
built-in defaults < ``--config FILE.yaml`` < flags given on the command line < ``--set key=value``.
A flag left out never overrides the YAML. ``--print-config`` writes the effective settings as
YAML (an ``ExtractSettings``) and exits; that file loads back as ``--config`` unchanged. See
``examples/extract_mobilenet_v2.yaml``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.errors import UsageError

if TYPE_CHECKING:  # not imported at parse time: they pull in torch
    from pipelines.backbones import BackboneConfig
    from pipelines.extract import SamplingConfig

DEFAULT_SAMPLING = {"fps": 15.0, "window": 4, "stride": 4}

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
    "num_workers": (None, "num_workers"),
    "cpus_per_worker": (None, "cpus_per_worker"),
    "num_gpus": (None, "gpus_per_worker"),
}
_SECTIONS = ("backbone", "sampling")


@dataclass(frozen=True)
class ExtractSettings:
    """What ``tal extract`` computes features with and how it spreads the work over Ray actors:
    everything of ``pipelines.extract.ExtractConfig`` but where the videos come from and go to.
    Its YAML form is what ``--config`` reads and ``--print-config`` writes. ``settings_from_dict``
    rebuilds it (not ``config_from_dict``: the section types are imported only when used, so
    building the ``tal`` parser does not load torch)."""

    backbone: BackboneConfig
    sampling: SamplingConfig
    num_workers: int | None = None  # extraction actors; None: one per core of the machine running the job
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        whole = isinstance(self.num_workers, int) and not isinstance(self.num_workers, bool)
        if self.num_workers is not None and not (whole and self.num_workers >= 1):
            raise ValueError(f"num_workers must be a whole number >= 1 (or null for one per core); got {self.num_workers!r}")
        if isinstance(self.cpus_per_worker, bool) or not isinstance(self.cpus_per_worker, int | float) or not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be a positive number of CPUs; got {self.cpus_per_worker!r}")
        if isinstance(self.gpus_per_worker, bool) or not isinstance(self.gpus_per_worker, int | float) or not self.gpus_per_worker >= 0:
            raise ValueError(f"gpus_per_worker must be a number of GPUs >= 0 (e.g. 1, or 0.5 to share one); got {self.gpus_per_worker!r}")


def settings_from_dict(data: Mapping[str, Any], where: str = "") -> ExtractSettings:
    """Rebuild ``ExtractSettings`` from its dict / YAML form; missing keys take the defaults.
    Raises ``ValueError`` for unknown keys or invalid values, naming the dotted path (``where``
    prefixes it)."""
    from pipelines.backbones import BackboneConfig
    from pipelines.extract import SamplingConfig
    from tal_models.config import config_from_dict

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


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc


def resolve_settings(config: str | Path | None, flags: Mapping[str, Any], overrides: Sequence[str]) -> ExtractSettings:
    """Defaults < the ``config`` YAML < ``flags`` (argparse dest -> value, None = not given) <
    ``overrides`` (``key=value``, values parsed as YAML). Without ``backbone.dtype`` in any layer:
    float16 with GPUs, float32 without. Raises ``UsageError`` naming the layer and the key."""
    from tal_models.config import apply_overrides, config_to_dict

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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="decode videos and write one feature sequence per video to a Parquet store (Ray Data)",
        description=(
            "Videos -> features, sharded over Ray actors. Re-running skips finished videos and retries failed ones. "
            "Settings, later ones winning: built-in defaults < --config YAML < flags given on the command line < --set. "
            "--print-config writes the effective settings as YAML, a start for a --config file."
        ),
    )
    p.add_argument("--videos", help="a directory, a glob, an s3:// prefix, or a CSV manifest (video_id,uri); needed unless --print-config")
    p.add_argument("--out", help="the feature store: a directory or an s3:// prefix; needed unless --print-config")
    p.add_argument("--config", metavar="FILE.yaml", help="settings YAML: backbone, sampling, num_workers, cpus_per_worker, gpus_per_worker")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (YAML value), e.g. sampling.fps=10")
    p.add_argument("--print-config", action="store_true", help="write the effective settings as YAML to stdout and exit")
    # Defaults are None (= not given) so that a flag left out keeps the --config value; the help states the built-in default.
    p.add_argument("--backbone", help="mobilenet_v2 (default), resnet50, r2plus1d_18, r3d_18, s3d, mvit_v2_s, swin3d_t, torchscript")
    p.add_argument("--weights", help="weights: a path or s3:// URI (default: the torch hub cache)")
    p.add_argument("--flow", action="store_true", default=None, help="add an optical-flow stream (frame backbones; doubles the features)")
    p.add_argument("--fps", type=float, help=f"sampling rate (default {DEFAULT_SAMPLING['fps']:g}; 0 = the video's own rate)")
    p.add_argument("--window", type=int, help=f"sampled frames per feature step (default {DEFAULT_SAMPLING['window']})")
    p.add_argument("--stride", type=int, help=f"sampled frames between steps (default {DEFAULT_SAMPLING['stride']})")
    p.add_argument("--num-workers", type=int, help="extraction actors (default: one per core)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per actor (default 1)")
    p.add_argument("--num-gpus", "--gpus-per-worker", dest="num_gpus", type=float, help="GPUs per actor (1, or 0.5 to share; default 0)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float16 on GPU, float32 on CPU)")
    p.add_argument("--batch-size", type=int, help="frames or clips per forward pass (default 64)")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.set_defaults(func=run_extract)

    p = sub.add_parser(
        "import-features",
        help="turn ActionFormer/OpenTAD <video_id>.npy features into a feature store",
        description="Reads one <video_id>.npy [T, C] per annotated video and writes a feature store with the timing you give; "
        "models trained on it serve feature requests but cannot featurize videos (their backbone is unknown).",
    )
    p.add_argument("--features", required=True, help="folder of <video_id>.npy files, [T, C]")
    p.add_argument("--annotations", required=True, help="ground truth naming the videos and their durations")
    p.add_argument("--out", required=True, help="the feature store to write: a directory or an s3:// prefix")
    p.add_argument("--fps", type=float, required=True, help="frame rate the features were sampled at")
    p.add_argument("--stride", type=int, required=True, help="frames between feature steps")
    p.add_argument("--window", type=int, required=True, help="frames per feature step (clip length)")
    p.add_argument("--backbone", default="imported", help="a name for where the features came from, e.g. i3d_rgb_flow")
    p.add_argument("--transpose", action="store_true", help="files are [C, T]")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(func=run_import)

    p = sub.add_parser(
        "export-features",
        help="write a feature store as <video_id>.npy files (ActionFormer layout)",
        description="Writes <video_id>.npy [T, C] per video and features.json (timing and provenance) for other TAL code bases.",
    )
    p.add_argument("--features", required=True, help="the feature store")
    p.add_argument("--out", required=True, help="output folder (or s3:// prefix)")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(func=run_export)


def run_extract(args: argparse.Namespace) -> int:
    from pipelines.extract import ExtractConfig, extract
    from pipelines.store import StoreError, storage_options
    from tal_models.config import dump_yaml

    settings = resolve_settings(args.config, vars(args), args.set)
    if args.print_config:
        print(dump_yaml(settings), end="")
        return 0
    missing = [flag for flag, value in (("--videos", args.videos), ("--out", args.out)) if not value]
    if missing:
        raise UsageError(f"{' and '.join(missing)} {'are' if len(missing) > 1 else 'is'} required (only --print-config runs without)")
    config = ExtractConfig(
        videos=args.videos,
        out=args.out,
        backbone=settings.backbone,
        sampling=settings.sampling,
        num_workers=settings.num_workers or max(1, os.cpu_count() or 2),
        cpus_per_worker=settings.cpus_per_worker,
        gpus_per_worker=settings.gpus_per_worker,
        storage_options=storage_options(args.s3_endpoint),
        progress=not args.no_progress,
    )
    try:
        summary = extract(config)
    except StoreError as e:
        raise UsageError(str(e)) from None
    print(summary.format())
    if summary.listed == 0:
        print("nothing to extract: no videos found")
        return 1
    if summary.extracted == 0 and summary.skipped == 0:
        print("no video could be extracted")
        return 1
    return 0


def run_import(args: argparse.Namespace) -> int:
    from pipelines.annotations import read_annotations
    from pipelines.feature_import import import_features
    from pipelines.store import StoreError, storage_options

    annotations = read_annotations(args.annotations)
    try:
        summary = import_features(
            args.features,
            annotations,
            args.out,
            fps=args.fps,
            stride=args.stride,
            window=args.window,
            backbone=args.backbone,
            transpose=args.transpose,
            storage_options=storage_options(args.s3_endpoint),
        )
    except (StoreError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(summary.format())
    return 0 if summary.imported or summary.skipped else 1


def run_export(args: argparse.Namespace) -> int:
    from pipelines.feature_import import export_features
    from pipelines.store import StoreError, storage_options

    try:
        n = export_features(args.features, args.out, storage_options=storage_options(args.s3_endpoint))
    except StoreError as e:
        raise UsageError(str(e)) from None
    print(f"exported {n} videos to {args.out}")
    return 0
