"""``tal demo``: the whole platform end to end on a synthetic archive, on this machine (``jobs.demo``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from jobs.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the platform end to end on a synthetic archive (local Ray, local MLflow, local files)",
        description=(
            "synth -> extract (Ray Data, MobileNetV2 ImageNet) -> train (Ray Train DDP, MLflow, registry champion) -> "
            "evaluate the champion on the test videos -> serve it (Ray Serve) and send one test video. A second run "
            "reuses the archive and the features."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="working folder (default out/demo)")
    p.add_argument("--videos", type=int, default=20, help="synthetic videos, split 60/20/20 into train/validation/test (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic archive (default 0)")
    p.add_argument(
        "--duration-range",
        nargs=2,
        type=float,
        default=[20.0, 40.0],
        metavar=("MIN", "MAX"),
        help="video lengths in seconds (default 20 40)",
    )
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 2), help="extraction actors (default: one per core)")
    p.add_argument(
        "--preset", default="demo-temporalmaxer", help="detector preset (default demo-temporalmaxer: the fastest to learn the demo)"
    )
    p.add_argument("--epochs", type=int, default=80, help="training epochs (default 80)")
    p.add_argument("--train-workers", type=int, default=min(2, os.cpu_count() or 1), help="DDP workers (default 2)")
    p.add_argument("--no-serve", action="store_true", help="stop after the evaluation (no Ray Serve step)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    if args.videos < 1:
        raise UsageError(f"--videos must be >= 1, got {args.videos}")
    from jobs.demo import DemoRequest, run_demo

    request = DemoRequest(
        out=args.out,
        videos=args.videos,
        seed=args.seed,
        duration_range=tuple(args.duration_range),
        workers=args.workers,
        preset=args.preset,
        epochs=args.epochs,
        train_workers=args.train_workers,
        serve=not args.no_serve,
    )
    return run_demo(request)
