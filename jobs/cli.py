"""The ``tal`` command line. Each subcommand parses its flags, builds a request, calls one function.

Exit codes: 0 success, 2 unusable input (one line on stderr saying what and where), 1 a bug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.errors import UsageError

EXIT_BAD_INPUT = 2


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score predictions (ActivityNet results JSON) against ground truth",
        description=(
            "Detection mAP per tIoU, average mAP, per-class AP and Recall@k x with the ActivityNet "
            "reference semantics. Ground truth: ActivityNet JSON, ActionFormer-THUMOS14 JSON, THUMOS14 "
            "txt folder, MultiTHUMOS JSON or EPIC-Kitchens-100 CSV (detected automatically)."
        ),
    )
    p.add_argument("--ground-truth", required=True, type=Path, metavar="FILE")
    p.add_argument("--predictions", required=True, type=Path, metavar="FILE", help="ActivityNet results JSON")
    p.add_argument(
        "--tiou",
        nargs="+",
        metavar="T",
        help="thresholds, e.g. 0.3 0.4 0.5 or a range 0.5:0.95:0.05 (default: THUMOS-style ground "
        "truth 0.3:0.7:0.1, otherwise 0.5:0.95:0.05)",
    )
    p.add_argument("--subset", help="evaluate only this subset of the ground truth (e.g. validation, test)")
    p.add_argument("--ignore-ambiguous", action="store_true", help="drop false positives on THUMOS14 Ambiguous segments")
    p.add_argument("--top-k", nargs="+", type=int, default=[1, 5], metavar="K", help="Recall@k x values (default 1 5)")
    p.add_argument("--proposals", action="store_true", help="also report class-agnostic AR@AN and AUC")
    p.add_argument("--output", type=Path, metavar="metrics.json", help="write the metrics as JSON")
    p.add_argument("--plot", type=Path, metavar="pr.png", help="write precision/recall curves and per-class AP as PNG")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from jobs.evaluate import EvaluationRequest, format_report, run
    from tal_models.evaluation import parse_tiou

    try:
        tiou = parse_tiou(args.tiou) if args.tiou else None
    except ValueError as e:
        raise UsageError(f"--tiou: {e}") from None
    if any(k < 1 for k in args.top_k):
        raise UsageError(f"--top-k values must be >= 1, got {args.top_k}")
    request = EvaluationRequest(
        ground_truth=args.ground_truth,
        predictions=args.predictions,
        tiou=tiou,
        subset=args.subset,
        ignore_ambiguous=args.ignore_ambiguous,
        top_k=tuple(args.top_k),
        proposals=args.proposals,
        output=args.output,
        plot=args.plot,
    )
    report = run(request)
    print(format_report(report, request))
    if args.output:
        print(f"  metrics -> {args.output}")
    if args.plot:
        print(f"  plot    -> {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tal", description="Temporal action localization on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from jobs import demo, extract
    from pipelines.synth import add_synth_parser

    demo.add_parser(sub)
    add_synth_parser(sub)
    extract.add_parsers(sub)
    _add_evaluate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipelines.annotations import AnnotationFormatError

    try:
        return args.func(args)
    except (UsageError, AnnotationFormatError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename:
            message = f"no such file: {e.filename}"
        print(f"tal {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
