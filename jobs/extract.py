"""``tal extract``, ``tal import-features``, ``tal export-features``: build a feature store.

Thin: flags -> configs -> one call into ``pipelines``.
"""

from __future__ import annotations

import argparse
import os

from jobs.errors import UsageError

DEFAULT_SAMPLING = {"fps": 15.0, "window": 4, "stride": 4}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="decode videos and write one feature sequence per video to a Parquet store (Ray Data)",
        description="Videos -> features, sharded over Ray actors. Re-running skips finished videos and retries failed ones.",
    )
    p.add_argument("--videos", required=True, help="a directory, a glob, an s3:// prefix, or a CSV manifest (video_id,uri)")
    p.add_argument("--out", required=True, help="the feature store: a directory or an s3:// prefix")
    p.add_argument("--backbone", default="mobilenet_v2", help="mobilenet_v2 (default), resnet50, r2plus1d_18, r3d_18, s3d, mvit_v2_s, swin3d_t, torchscript")
    p.add_argument("--weights", help="weights: a path or s3:// URI (default: the torch hub cache)")
    p.add_argument("--flow", action="store_true", help="add an optical-flow stream (frame backbones; doubles the feature dimension)")
    p.add_argument("--fps", type=float, default=DEFAULT_SAMPLING["fps"], help="sampling rate (default 15; 0 = the video's own rate)")
    p.add_argument("--window", type=int, default=DEFAULT_SAMPLING["window"], help="sampled frames per feature step (default 4)")
    p.add_argument("--stride", type=int, default=DEFAULT_SAMPLING["stride"], help="sampled frames between steps (default 4)")
    p.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2)), help="extraction actors (default: one per core)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (e.g. 1, or 0.5 to share)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on GPU, float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=64, help="frames or clips per forward pass")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_extract)

    p = sub.add_parser("import-features", help="turn ActionFormer/OpenTAD <video_id>.npy features into a feature store")
    p.add_argument("--features", required=True, help="folder of <video_id>.npy files, [T, C]")
    p.add_argument("--annotations", required=True, help="ground truth naming the videos and their durations")
    p.add_argument("--out", required=True)
    p.add_argument("--fps", type=float, required=True, help="frame rate the features were sampled at")
    p.add_argument("--stride", type=int, required=True, help="frames between feature steps")
    p.add_argument("--window", type=int, required=True, help="frames per feature step (clip length)")
    p.add_argument("--backbone", default="imported", help="a name for where the features came from, e.g. i3d_rgb_flow")
    p.add_argument("--transpose", action="store_true", help="files are [C, T]")
    p.add_argument("--s3-endpoint")
    p.set_defaults(func=run_import)

    p = sub.add_parser("export-features", help="write a feature store as <video_id>.npy files (ActionFormer layout)")
    p.add_argument("--features", required=True, help="the feature store")
    p.add_argument("--out", required=True, help="output folder (or s3:// prefix)")
    p.add_argument("--s3-endpoint")
    p.set_defaults(func=run_export)


def run_extract(args: argparse.Namespace) -> int:
    from pipelines.backbones import BackboneConfig
    from pipelines.extract import ExtractConfig, SamplingConfig, extract
    from pipelines.store import StoreError, storage_options

    dtype = args.dtype or ("float16" if args.num_gpus > 0 else "float32")
    try:
        backbone = BackboneConfig(name=args.backbone, weights=args.weights, flow=args.flow, dtype=dtype, batch_size=args.batch_size)
        sampling = SamplingConfig(fps=args.fps or None, window=args.window, stride=args.stride)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.num_workers < 1:
        raise UsageError(f"--num-workers must be >= 1, got {args.num_workers}")
    config = ExtractConfig(
        videos=args.videos,
        out=args.out,
        backbone=backbone,
        sampling=sampling,
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.num_gpus,
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
            args.features, annotations, args.out, fps=args.fps, stride=args.stride, window=args.window,
            backbone=args.backbone, transpose=args.transpose, storage_options=storage_options(args.s3_endpoint),
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
