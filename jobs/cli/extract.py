"""``tal extract``, ``tal import-features``, ``tal export-features``: build a feature store (``jobs.extract``).

``tal extract`` settings, later ones winning: built-in defaults < ``--config FILE.yaml`` < flags given
< ``--set key=value`` (``jobs.extract.resolve_settings``): its setting flags default to None, "not given".
"""

from __future__ import annotations

import argparse

from jobs.errors import UsageError

# pipelines.extract.SamplingConfig's defaults, for the help (not imported: the parser stays light; a test keeps them equal)
DEFAULT_SAMPLING = {"fps": 15.0, "window": 4, "stride": 4, "decoder": "pyav"}
# pipelines.decoders.DECODERS (a test keeps them equal)
DECODERS = ("pyav", "decord", "torchcodec")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="decode videos and write one feature sequence per video to a Parquet store (Ray actors)",
        description=(
            "Videos -> features, sharded over Ray actors that write the store themselves; long videos are split across actors. Re-running skips finished videos and retries failed ones. "
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
    p.add_argument(
        "--backbone",
        help="mobilenet_v2 (default), resnet50, r2plus1d_18, r3d_18, s3d, mvit_v2_s, swin3d_t, torchscript, or clip:ARCH "
        "(an open_clip image tower, e.g. clip:ViT-B-32 or clip:/path/model_config.json: unit image embeddings)",
    )
    p.add_argument("--weights", help="weights: a path or s3:// URI (default: the torch hub cache)")
    p.add_argument("--flow", action="store_true", default=None, help="add an optical-flow stream (frame backbones; doubles the features)")
    p.add_argument("--fps", type=float, help=f"sampling rate (default {DEFAULT_SAMPLING['fps']:g}; 0 = the video's own rate)")
    p.add_argument("--window", type=int, help=f"sampled frames per feature step (default {DEFAULT_SAMPLING['window']})")
    p.add_argument("--stride", type=int, help=f"sampled frames between steps (default {DEFAULT_SAMPLING['stride']})")
    p.add_argument(
        "--decoder",
        choices=DECODERS,
        help=f"video decoder (default {DEFAULT_SAMPLING['decoder']}); decord and torchcodec need "
        "pip install 'tal-platform[decoders]' and decode with PyAV where they are not frame-exact (e.g. MPEG-PS); "
        "recorded in the store, so tal detect/serve decode alike",
    )
    p.add_argument("--num-workers", type=int, help="extraction actors (default: one per core)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per actor (default 1)")
    p.add_argument("--num-gpus", "--gpus-per-worker", dest="num_gpus", type=float, help="GPUs per actor (1, or 0.5 to share; default 0)")
    p.add_argument(
        "--split-seconds",
        type=float,
        help="extract a video longer than this in pieces of about this length on several actors, stitched into one sequence (default 300)",
    )
    p.add_argument("--part-mb", type=float, help="each actor writes Parquet parts of about this size (default 64)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float16 on GPU, float32 on CPU)")
    p.add_argument("--batch-size", type=int, help="frames or clips per forward pass (default 64)")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.set_defaults(func=handle_extract)

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
    p.set_defaults(func=handle_import)

    p = sub.add_parser(
        "export-features",
        help="write a feature store as <video_id>.npy files (ActionFormer layout)",
        description="Writes <video_id>.npy [T, C] per video and features.json (timing and provenance) for other TAL code bases.",
    )
    p.add_argument("--features", required=True, help="the feature store")
    p.add_argument("--out", required=True, help="output folder (or s3:// prefix)")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(func=handle_export)


def handle_extract(args: argparse.Namespace) -> int:
    from jobs.extract import ExtractRequest, dump_settings, resolve_settings, run_extract
    from pipelines.store import storage_options

    settings = resolve_settings(args.config, vars(args), args.set)
    if args.print_config:
        print(dump_settings(settings), end="")
        return 0
    missing = [flag for flag, value in (("--videos", args.videos), ("--out", args.out)) if not value]
    if missing:
        raise UsageError(f"{' and '.join(missing)} {'are' if len(missing) > 1 else 'is'} required (only --print-config runs without)")
    request = ExtractRequest(
        videos=args.videos,
        out=args.out,
        settings=settings,
        storage_options=storage_options(args.s3_endpoint),
        progress=not args.no_progress,
    )
    summary = run_extract(request)
    print(summary.format())
    if summary.listed == 0:
        print("nothing to extract: no videos found")
        return 1
    if summary.extracted == 0 and summary.skipped == 0:
        print("no video could be extracted")
        return 1
    return 0


def handle_import(args: argparse.Namespace) -> int:
    from jobs.extract import ImportRequest, run_import
    from pipelines.store import storage_options

    request = ImportRequest(
        features=args.features,
        annotations=args.annotations,
        out=args.out,
        fps=args.fps,
        stride=args.stride,
        window=args.window,
        backbone=args.backbone,
        transpose=args.transpose,
        storage_options=storage_options(args.s3_endpoint),
    )
    summary = run_import(request)
    print(summary.format())
    return 0 if summary.imported or summary.skipped else 1


def handle_export(args: argparse.Namespace) -> int:
    from jobs.extract import run_export
    from pipelines.store import storage_options

    n = run_export(args.features, args.out, storage_options(args.s3_endpoint))
    print(f"exported {n} videos to {args.out}")
    return 0
