"""``tal evaluate``: score a results JSON, or a checkpoint on a feature store, against ground truth (``jobs.evaluate``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jobs.errors import UsageError

AUTO_RAY_VIDEOS = 200  # jobs.evaluate.AUTO_RAY_VIDEOS, for the help (not imported: the parser stays light; a test keeps them equal)
_MODEL_ONLY = ("features", "workers", "batch_size", "timeline_videos", "s3_endpoint", "classifier", "fuse_top_k", "ceiling")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score predictions (ActivityNet results JSON), or a checkpoint on a feature store, against ground truth",
        description=(
            "Detection mAP per tIoU, average mAP, per-class AP and Recall@k x with the ActivityNet "
            "reference semantics. Two modes: --predictions FILE scores a results JSON; --model runs a "
            "checkpoint over the annotated videos of a feature store (--features) and writes predictions, "
            "metrics, plots and per-video timelines into --output DIR. Ground truth: ActivityNet JSON, "
            "ActionFormer-THUMOS14 JSON, THUMOS14 txt folder, MultiTHUMOS JSON or EPIC-Kitchens-100 CSV "
            "(detected automatically)."
        ),
    )
    p.add_argument(
        "--ground-truth",
        "--annotations",
        dest="ground_truth",
        required=True,
        type=Path,
        metavar="FILE",
        help="the ground truth (format detected)",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--predictions", type=Path, metavar="FILE", help="ActivityNet results JSON to score")
    mode.add_argument(
        "--model",
        metavar="MODEL",
        help="a checkpoint to run: models:/tal-detector@champion, models:/tal-detector/3, runs:/<id>/path, a path or an s3:// URI",
    )
    p.add_argument(
        "--tiou",
        nargs="+",
        metavar="T",
        help="thresholds, e.g. 0.3 0.4 0.5, a range 0.5:0.95:0.05, or a protocol: thumos14, weak (0.1:0.7:0.1), activitynet (default: THUMOS-style ground "
        "truth 0.3:0.7:0.1, otherwise 0.5:0.95:0.05)",
    )
    p.add_argument("--subset", help="evaluate only this subset of the ground truth (e.g. validation, test)")
    p.add_argument("--ignore-ambiguous", action="store_true", help="drop false positives on THUMOS14 Ambiguous segments")
    p.add_argument("--top-k", nargs="+", type=int, default=[1, 5], metavar="K", help="Recall@k x values (default 1 5)")
    p.add_argument("--proposals", action="store_true", help="also report class-agnostic AR@AN and AUC")
    p.add_argument(
        "--output",
        type=Path,
        metavar="PATH",
        help="with --predictions: write the metrics JSON to this file; with --model (required): the directory for "
        "predictions.json, metrics.json, precision_recall.png and timelines/",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="also write report.html, one self-contained HTML report (tal report): with --model into --output DIR, with "
        "--predictions beside the --output metrics file",
    )
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="also DETAD's error analysis (false-positive types, false negatives and AP sensitivity by instance length, coverage "
        "and instances per video): diagnosis.json and diagnosis/*.png in --output DIR (with --model) or beside --output FILE",
    )
    p.add_argument("--plot", type=Path, metavar="pr.png", help="with --predictions: write precision/recall curves and per-class AP as PNG")
    model = p.add_argument_group("with --model")
    model.add_argument("--features", metavar="STORE", help="the feature store (a directory or an s3:// prefix)")
    model.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=f"Ray actors for inference; 0 = in this process (default: 0 below {AUTO_RAY_VIDEOS} videos, else one per CPU)",
    )
    model.add_argument("--batch-size", type=int, metavar="B", help="videos per forward pass (default 8)")
    model.add_argument("--timeline-videos", type=int, metavar="N", help="draw timelines/<video>.png for the first N videos (default 10)")
    model.add_argument(
        "--dense",
        action="store_true",
        help="also the per-frame mAP of the MultiTHUMOS / Charades protocol (a dense, per-step multi-label model: task dense)",
    )
    model.add_argument(
        "--online",
        action="store_true",
        help="an online checkpoint (family online): also the per-frame mAP of the online action detection protocol, the "
        "detection latency and the instance mAP of its streamed events, into online_metrics.json (tIoUs default 0.3:0.7:0.1)",
    )
    model.add_argument(
        "--ceiling",
        metavar="MODEL",
        help="with --online: an offline detector (models:/..., a path, s3://) whose same figures bound the online model's",
    )
    model.add_argument(
        "--classifier",
        metavar="CLASSIFIER",
        help="name a class-agnostic model's segments with the video's classes: a video classifier (models:/tal-classifier@champion, "
        "a path, s3://) or an ActivityNet classification JSON (*.json)",
    )
    model.add_argument("--fuse-top-k", type=int, metavar="K", help="with --classifier: video classes per segment (default 2)")
    model.add_argument("--s3-endpoint", help="S3 endpoint URL for s3:// stores and checkpoints (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from tal_models.evaluation import parse_tiou

    try:
        tiou = parse_tiou(args.tiou) if args.tiou else None
    except ValueError as e:
        raise UsageError(f"--tiou: {e}") from None
    if any(k < 1 for k in args.top_k):
        raise UsageError(f"--top-k values must be >= 1, got {args.top_k}")
    if args.model is not None:
        return _handle_model(args, tiou)
    given = [f"--{name.replace('_', '-')}" for name in _MODEL_ONLY if getattr(args, name) is not None]
    given += [flag for flag, on in (("--dense", args.dense), ("--online", args.online)) if on]
    if given:
        raise UsageError(f"{', '.join(given)} only apply with --model; --predictions scores an existing results file")

    if args.diagnose and args.output is None:
        raise UsageError("--diagnose needs --output FILE: diagnosis.json and diagnosis/*.png are written beside it")
    from jobs.evaluate import EvaluationRequest, format_report, run

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
        report=args.report,
        diagnose=args.diagnose,
    )
    report = run(request)
    print(format_report(report, request))
    if args.output:
        print(f"  metrics -> {args.output}")
    if args.plot:
        print(f"  plot    -> {args.plot}")
    if args.report:
        print(f"  report  -> {args.output.parent / 'report.html'}")
    _print_diagnosis(report.diagnosis, report.diagnosis_outputs)
    return 0


def _print_diagnosis(diagnosis, paths) -> None:
    """``--diagnose``: the summary, and where the JSON and figures went."""
    if diagnosis is None:
        return
    from jobs.diagnosis import format_diagnosis

    print(format_diagnosis(diagnosis))
    for name, path in paths.items():
        print(f"  {name:<15} -> {path}")


def _handle_model(args: argparse.Namespace, tiou) -> int:
    if args.features is None:
        raise UsageError("--model needs --features STORE (the feature store to run it on)")
    if args.output is None:
        raise UsageError("--model needs --output DIR (predictions.json, metrics.json, plots and timelines are written there)")
    if args.plot is not None:
        raise UsageError(f"--plot applies to --predictions; with --model the plots are written into --output ({args.output})")

    from jobs.evaluate import ClassifierEvaluationReport, ModelEvaluationRequest, format_classifier_report, format_model_report, run_model
    from pipelines.store import storage_options

    request = ModelEvaluationRequest(
        model=args.model,
        features=args.features,
        annotations=args.ground_truth,
        output=args.output,
        subset=args.subset,
        workers=args.workers,
        batch_size=8 if args.batch_size is None else args.batch_size,
        timeline_videos=10 if args.timeline_videos is None else args.timeline_videos,
        tiou=tiou,
        ignore_ambiguous=args.ignore_ambiguous,
        top_k=tuple(args.top_k),
        proposals=args.proposals,
        storage_options=storage_options(args.s3_endpoint),
        dense=args.dense,
        classifier=args.classifier,
        fuse_top_k=2 if args.fuse_top_k is None else args.fuse_top_k,
        online=args.online,
        ceiling=args.ceiling,
        report=args.report,
        diagnose=args.diagnose,
    )
    report = run_model(request)
    if isinstance(report, ClassifierEvaluationReport):
        print(format_classifier_report(report, request))
    else:
        print(format_model_report(report, request))
        _print_diagnosis(report.diagnosis, {})  # the paths are among the report's outputs
    return 0
