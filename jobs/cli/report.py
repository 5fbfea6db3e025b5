"""``tal report``: one self-contained HTML report of what ``tal evaluate`` wrote (``jobs.report``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML report of an evaluation (tal evaluate --output)",
        description=(
            "Reads the metrics.json that tal evaluate wrote, the ground truth and predictions it records, evaluates "
            "again with the precision/recall curves and writes one HTML file (inline SVG and CSS, no network): summary, "
            "mAP per tIoU, precision/recall curves, per-class AP, per-video timelines and the error analysis "
            "(diagnosis.json, from tal evaluate --diagnose)."
        ),
    )
    p.add_argument(
        "eval_dir", type=Path, metavar="EVAL_DIR", help="the evaluation: a directory holding metrics.json, or a metrics JSON file"
    )
    p.add_argument("--output", type=Path, metavar="FILE", help="the HTML file (default: EVAL_DIR/report.html, or beside the metrics file)")
    p.add_argument("--videos", type=int, default=30, metavar="N", help="timelines for the N videos of lowest AP (default 30)")
    p.add_argument("--title", help="the report's heading (default: the model or the predictions file)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from jobs.report import build_report

    print(build_report(args.eval_dir, output=args.output, max_videos=args.videos, title=args.title))
    return 0
