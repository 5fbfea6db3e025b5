"""``tal synth``: write the synthetic demo archive, H.264 videos and their ground truth (``pipelines.synth``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.errors import UsageError

# pipelines.synth's, for the help (not imported: the parser stays light; a test keeps them equal)
ACTIVITYNET_JSON = "annotations_activitynet.json"
THUMOS14_JSON = "annotations_thumos14.json"
SUBSETS = ("train", "validation", "test")
MAX_CLASSES = 36


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write the synthetic demo archive: H.264 videos and their ground truth",
        description=(
            "Render videos of K visually distinct action classes (shape, motion, colour) on a cluttered, "
            "panning, noisy background, with soft boundaries and some overlapping instances, and write "
            f"their ground truth as {ACTIVITYNET_JSON} and {THUMOS14_JSON} (subsets {'/'.join(SUBSETS)}, "
            "60/20/20). The same seed gives the same archive."
        ),
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (videos/ and the two JSON files)")
    p.add_argument("--videos", required=True, type=int, metavar="N", help="number of videos")
    p.add_argument("--seed", required=True, type=int, metavar="S", help="random seed (>= 0)")
    p.add_argument("--classes", type=int, default=5, metavar="K", help=f"number of action classes, 1..{MAX_CLASSES} (default 5)")
    p.add_argument(
        "--duration-range",
        nargs=2,
        type=float,
        default=[20.0, 120.0],
        metavar=("MIN", "MAX"),
        help="video durations are uniform in [MIN, MAX] seconds (default 20 120)",
    )
    p.add_argument("--size", default="320x240", metavar="WxH", help="frame size, even numbers (default 320x240)")
    p.add_argument("--fps", type=float, default=15.0, help="frames per second (default 15)")
    p.add_argument("--workers", type=int, default=None, metavar="W", help="parallel processes (default: one per CPU)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    """Check the flags, write the archive, print a one-paragraph summary."""
    from pipelines.synth import _check_arguments, parse_size, summary, synthesize

    try:
        size = parse_size(args.size)
    except ValueError as e:
        raise UsageError(f"--size: {e}") from None
    kwargs = {
        "videos": args.videos,
        "seed": args.seed,
        "classes": args.classes,
        "duration_range": tuple(args.duration_range),
        "size": size,
        "fps": args.fps,
        "workers": args.workers,
    }
    try:
        _check_arguments(**kwargs)  # what synthesize checks first, here to name the flag of a bad value
    except ValueError as e:
        argument = str(e).split(" ", 1)[0]  # every message starts with the argument's name
        raise UsageError(f"--{argument.replace('_', '-')}: {e}") from None
    result = synthesize(args.out, progress=True, **kwargs)
    print(summary(result))
    return 0
