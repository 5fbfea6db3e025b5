"""``tal detect``: run a checkpoint on video files in this process (``jobs.detect``), or with ``--workers N``
as a resumable Ray Data pipeline over an archive (``jobs.batch_detect``), or with ``--online SOURCE`` an online
checkpoint on a live source, events as they happen (``jobs.online``).

Exit codes: 0 every video detected; 3 some videos failed (each in failed.json), the others written;
2 nothing usable (no videos, a model that cannot run on videos, not one video processed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.errors import UsageError

# jobs.detect's, for the defaults and the help (not imported: the parser stays light; a test keeps them equal)
DEFAULT_SCORE_THRESHOLD = 0.1
DEFAULT_TIMELINE_VIDEOS = 20
# jobs.batch_detect's
DEFAULT_SHARD_VIDEOS = 100
DEFAULT_SHARD_SECONDS = 60.0
# flags of the Ray pipeline only: (flag, attribute)
RAY_ONLY = (("--cpus-per-worker", "cpus_per_worker"), ("--videos-per-call", "videos_per_call"), ("--shard-videos", "shard_videos"),
            ("--shard-seconds", "shard_seconds"), ("--features-out", "features_out"))  # fmt: skip
# flags of --online only, and the offline ones it does not take (those whose default is None)
ONLINE_ONLY = (("--out", "out"), ("--speed", "speed"), ("--idle-timeout", "idle_timeout"), ("--open-timeout", "open_timeout"))
OFFLINE_ONLY = (("--top-k", "top_k"), ("--workers", "workers"), ("--classes", "classes"), *RAY_ONLY)
DEFAULT_EVENTS = "events.jsonl"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="run a checkpoint on video files in this process: ActivityNet results JSON and a timeline per video",
        description=(
            "Featurize each video exactly as the checkpoint's training features were extracted (same backbone, "
            "weights sha256, sampling), detect, and write OUTPUT/results.json (ActivityNet results format, labels "
            "are the checkpoint's class names), OUTPUT/timelines/<video>.png and OUTPUT/failed.json (videos that "
            "could not be decoded, with the reason). Without --workers: no Ray cluster and no server, everything runs "
            "here, one video at a time. With --workers N: one Ray Data pipeline (the local Ray, or the cluster of "
            "RAY_ADDRESS) in which N actors each load the backbone and the detector once and process one video per "
            "call; OUTPUT (local or s3://) gets results-<n>.json shards as videos finish and a manifest of them "
            "(_manifest/), so that a re-run with the same OUTPUT skips finished videos and retries failed ones. "
            "A broken video is reported and the others go on."
        ),
        epilog="exit codes: 0 all videos detected; 3 some videos failed (see failed.json), the others written; "
        "2 nothing usable (no videos found, a model that cannot run on videos, not one video processed).",
    )
    p.add_argument(
        "videos",
        metavar="VIDEO_OR_DIR",
        nargs="?",
        help="a video file, a directory (searched recursively), a glob, an s3:// prefix, or a CSV manifest (video_id,uri); "
        "not with --online",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="the checkpoint: models:/tal-detector@champion, models:/tal-detector/3, runs:/<id>/path (MLflow at "
        "$MLFLOW_TRACKING_URI), a path or an s3:// URI; it must have been trained on features of tal extract",
    )
    p.add_argument(
        "--output",
        default="out/detect",
        metavar="DIR",
        help="where results.json, failed.json and timelines/ go (default out/detect); with --workers also an s3:// prefix, "
        "and the shards and their manifest go there too",
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=DEFAULT_SCORE_THRESHOLD,
        metavar="S",
        help=f"write only detections scoring >= S (default {DEFAULT_SCORE_THRESHOLD:g}; 0 keeps all the model's, as evaluation wants); "
        "the model computes the same either way",
    )
    p.add_argument(
        "--top-k", type=int, metavar="K", help="at most K detections per video, the best first (default: all above the threshold)"
    )
    p.add_argument(
        "--device", metavar="DEVICE", help="cpu, cuda or cuda:N for the backbone and the detector (default: cuda when available)"
    )
    p.add_argument(
        "--backbone-weights",
        metavar="PATH",
        help="where the backbone's weights are, if not where extraction read them (a path or s3:// URI); their sha256 must match the checkpoint's",
    )
    p.add_argument("--s3-endpoint", help="S3 endpoint URL for s3:// videos, checkpoints and weights (default: $AWS_ENDPOINT_URL)")
    p.add_argument(
        "--timeline-videos",
        type=int,
        default=DEFAULT_TIMELINE_VIDEOS,
        metavar="N",
        help=f"draw timelines/<video>.png for the first N videos (default {DEFAULT_TIMELINE_VIDEOS})",
    )
    p.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        default="torch",
        help="run the detector in PyTorch (default) or its dense part in ONNX Runtime (CPU, as many threads as torch); "
        "with onnx, --model may also be a .onnx file of tal export (a checkpoint is exported on the fly)",
    )
    p.add_argument(
        "--classes",
        metavar="NAMES",
        help='an open-vocabulary model: the comma-separated class names to detect, e.g. "long jump,high jump" (seen in '
        "training or not; default: the classes it was trained on); not with --workers",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("on Ray (with --workers)")
    ray.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run as a Ray Data pipeline with N actors, each with its own backbone and detector (default: in this process); "
        "--device is then cpu or cuda (one GPU per actor; default cuda when the cluster has GPUs)",
    )
    ray.add_argument("--cpus-per-worker", type=float, metavar="C", help="Ray CPUs per actor, and its torch threads (default 1)")
    ray.add_argument("--videos-per-call", type=int, metavar="B", help="videos per actor call and per --features-out part (default 1)")
    ray.add_argument(
        "--shard-videos",
        type=int,
        metavar="K",
        help=f"write a results-<n>.json shard every K finished videos (default {DEFAULT_SHARD_VIDEOS}) ...",
    )
    ray.add_argument(
        "--shard-seconds",
        type=float,
        metavar="T",
        help=f"... or when the oldest unwritten video has waited T seconds (default {DEFAULT_SHARD_SECONDS:g}): what a killed job can lose",
    )
    ray.add_argument(
        "--features-out",
        metavar="STORE",
        help="also keep the videos' features in this feature store (local or s3://; the checkpoint's backbone and "
        "sampling), written by the actors",
    )
    online = p.add_argument_group("live (with --online)")
    online.add_argument(
        "--online",
        metavar="SOURCE",
        help="run an online checkpoint (config family online) on a live source instead of VIDEO_OR_DIR, printing each event "
        "(start, update, end) as it happens and appending it to --out as a JSON line: a video file (as fast as it decodes, "
        "or at its own pace with --realtime), a file still being written (with --idle-timeout), a URL FFmpeg opens "
        "(rtsp://, http(s):// HLS, udp://, tcp://, srt://), or features: a .npy [T, C] or STORE#VIDEO_ID of a feature store. "
        "Ctrl-C ends the stream (open instances get their end events). Prints the per-step delay p50/p90/p99 at the end",
    )
    online.add_argument("--out", metavar="FILE", help=f"where the events go, one JSON object per line, appended (default {DEFAULT_EVENTS})")
    online.add_argument(
        "--realtime",
        action="store_true",
        help="feed a file (video or features) at its own rate, as a live source would (default: as fast as possible)",
    )
    online.add_argument("--speed", type=float, metavar="X", help="with --realtime: X times real time (default 1)")
    online.add_argument(
        "--idle-timeout",
        type=float,
        metavar="S",
        help="SOURCE is a file still being written (MPEG-TS, fragmented MP4): it ends after S s without growth",
    )
    online.add_argument("--open-timeout", type=float, metavar="S", help="a URL: seconds to connect and read its headers (default 10)")
    online.add_argument("--quiet", action="store_true", help="do not print each event (they still go to --out)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    if args.online is not None:
        return _handle_online(args)
    given = [flag for flag, attribute in ONLINE_ONLY if getattr(args, attribute) is not None]
    given += [flag for flag, on in (("--realtime", args.realtime), ("--quiet", args.quiet)) if on]
    if given:
        raise UsageError(f"{', '.join(given)}: only with --online SOURCE")
    if args.videos is None:
        raise UsageError("give VIDEO_OR_DIR (or --online SOURCE for a live source)")
    from pipelines.store import storage_options

    common = dict(
        videos=args.videos,
        model=args.model,
        score_threshold=args.score_threshold,
        top_k=args.top_k,
        device=args.device,
        backbone_weights=args.backbone_weights,
        timeline_videos=args.timeline_videos,
        storage_options=storage_options(args.s3_endpoint),
        progress=not args.no_progress,
        runtime=args.runtime,
    )
    if args.classes is not None and args.workers is not None:
        raise UsageError("--classes: not with --workers yet (run it in this process)")
    if args.workers is None:
        given = [flag for flag, attribute in RAY_ONLY if getattr(args, attribute) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --workers N (the Ray pipeline)")
        if "://" in args.output:
            raise UsageError(f"--output {args.output}: in this process the output is a local folder; an s3:// output needs --workers N")
        from jobs.detect import DetectRequest, format_report, run

        classes = tuple(c.strip() for c in args.classes.split(",")) if args.classes is not None else None
        request = DetectRequest(output=Path(args.output), classes=classes, **common)
        report = run(request)
        print(format_report(report, request))
    else:
        from jobs.batch_detect import BatchDetectRequest, format_batch_report, run

        ray_flags = {attribute: getattr(args, attribute) for _, attribute in RAY_ONLY if getattr(args, attribute) is not None}
        request = BatchDetectRequest(output=args.output, workers=args.workers, **ray_flags, **common)
        report = run(request)
        print(format_batch_report(report, request))
    if not report.videos:
        print(
            f"tal detect: error: none of the {len(report.failed)} videos could be processed (reasons in {report.outputs['failed']})",
            file=sys.stderr,
        )
    return report.exit_code


def _handle_online(args: argparse.Namespace) -> int:
    if args.videos is not None:
        raise UsageError(f"--online {args.online} takes its source from --online: drop {args.videos}")
    given = [flag for flag, attribute in OFFLINE_ONLY if getattr(args, attribute) is not None]
    if args.runtime != "torch":
        given.append("--runtime")
    if given:
        raise UsageError(f"{', '.join(given)}: not with --online (an online model runs step by step in PyTorch)")
    if args.speed is not None and not args.realtime:
        raise UsageError("--speed applies with --realtime")
    from jobs.online import OnlineDetectRequest, run
    from pipelines.store import storage_options

    request = OnlineDetectRequest(
        source=args.online,
        model=args.model,
        out=Path(args.out or DEFAULT_EVENTS),
        realtime=args.realtime,
        speed=1.0 if args.speed is None else args.speed,
        device=args.device,
        backbone_weights=args.backbone_weights,
        storage_options=storage_options(args.s3_endpoint),
        idle_timeout=args.idle_timeout,
        open_timeout=10.0 if args.open_timeout is None else args.open_timeout,
        print_events=not args.quiet,
    )
    report = run(request)
    print(report.format())
    return report.exit_code
