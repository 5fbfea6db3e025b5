"""``tal train``: a detector preset on a feature store, with Ray Train (DDP) and MLflow (``jobs.train``)."""

from __future__ import annotations

import argparse

from jobs.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a detector on a feature store (Ray Train, MLflow)",
        description="Train a detector preset on a feature store with Ray Train (DDP), tracked in MLflow; the best checkpoint is "
        "registered as tal-detector and becomes the champion when it beats the current one on the same validation set.",
    )
    p.add_argument("--config", required=True, help="preset name (e.g. thumos14-actionformer, demo-actionformer) or a preset YAML")
    p.add_argument("--features", help="feature store (local folder or s3://...); required unless --print-config")
    p.add_argument(
        "--annotations", help="ground truth (ActivityNet / THUMOS14 / MultiTHUMOS / EPIC formats); required unless --print-config"
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the full effective preset (--set, --epochs, --batch-size applied) as YAML and exit; a file to edit or pass to --config",
    )
    p.add_argument("--out", default="out/train", help="Ray Train run folders (default out/train; s3:// on a cluster)")
    p.add_argument("--workers", type=int, default=1, help="DDP workers (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default 0: CPU, gloo; >0: NCCL, bf16)")
    p.add_argument("--epochs", type=int, help="default: the preset's")
    p.add_argument("--batch-size", type=int, help="videos per worker and step (default: the preset's)")
    p.add_argument("--run-name", help="name of the run folder and MLflow run (default: preset + time + random suffix; must be new)")
    p.add_argument("--resume", metavar="RUN_NAME", help="continue an interrupted run (same Ray Train folder and MLflow run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset value, e.g. optim.lr=3e-4")
    p.add_argument("--train-subset", help="annotation subset to train on (default: training / Validation / train by format)")
    p.add_argument("--val-subset", help="annotation subset to validate on (default: validation / Test by format)")
    p.add_argument("--val-every", type=int, default=1, metavar="K", help="validate every K epochs (and at the last)")
    p.add_argument("--keep-best", type=int, default=2, metavar="K", help="checkpoints kept, by validation average mAP")
    p.add_argument("--max-failures", type=int, default=1, help="worker failures survived by restarting from the last checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, crops and shuffling (default 0)")
    p.add_argument("--stop-after", type=int, metavar="E", help="stop once E epochs are done (continue later with --resume)")
    p.add_argument("--mlflow-uri", help="default: $MLFLOW_TRACKING_URI, else a local sqlite store under ./mlruns")
    p.add_argument("--experiment", default="tal", help="MLflow experiment (default tal)")
    p.add_argument("--no-register", action="store_true", help="do not register the best checkpoint")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL for the feature store (e.g. MinIO)")
    p.add_argument(
        "--cache-gb",
        type=float,
        metavar="G",
        help="decoded features each worker keeps in memory: a shard that fits is read once and kept, a larger one is streamed "
        "by row group through an LRU cache of G GB (same batches); default: a quarter of the machine's memory split among its workers",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="local disk cache of an S3 store's part files (each worker at most its shard's parts; keeps 10%% of the disk free)",
    )
    weak = p.add_argument_group("learning with less: video-level labels and pseudo labels")
    weak.add_argument(
        "--supervision",
        choices=("full", "video"),
        default="full",
        help="video: train on video-level labels only (the classes each training video contains; the annotations are weakened "
        "whatever their format) with a weakly supervised preset, e.g. thumos14-weak (default full)",
    )
    weak.add_argument(
        "--pseudo-labels",
        metavar="RESULTS.json",
        help="train on the confident detections of this results file (a weak or zero-shot model's, on the training videos) "
        "instead of the training ground truth; validation still uses the real annotations",
    )
    weak.add_argument("--pseudo-threshold", type=float, default=0.3, metavar="S", help="pseudo labels score at least S (default 0.3)")
    weak.add_argument("--pseudo-top-k", type=int, default=10, metavar="K", help="at most K pseudo labels per class and video (default 10)")
    weak.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="R",
        help="self-training rounds: each round's best model labels the training videos of the next (default 1); "
        "each round is an MLflow run nested under one parent run",
    )
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    if args.workers < 1 or args.val_every < 1 or args.keep_best < 1:
        raise UsageError("--workers, --val-every and --keep-best must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.cache_gb is not None and not args.cache_gb > 0:
        raise UsageError(f"--cache-gb must be > 0, got {args.cache_gb}")
    from jobs.train import TrainJob, effective_preset, train
    from tal_models.config import dump_yaml

    if args.print_config:
        print(dump_yaml(effective_preset(args.config, args.set, args.epochs, args.batch_size)), end="")
        return 0
    missing = [flag for flag, value in (("--features", args.features), ("--annotations", args.annotations)) if value is None]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)} (or --print-config)")
    from pipelines.store import storage_options

    job = TrainJob(
        config=args.config,
        features=args.features,
        annotations=args.annotations,
        out=args.out,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        epochs=args.epochs,
        batch_size=args.batch_size,
        run_name=args.run_name,
        resume=args.resume,
        overrides=tuple(args.set),
        train_subset=args.train_subset,
        val_subset=args.val_subset,
        val_every=args.val_every,
        keep_best=args.keep_best,
        max_failures=args.max_failures,
        seed=args.seed,
        mlflow_uri=args.mlflow_uri,
        experiment=args.experiment,
        register=not args.no_register,
        stop_after=args.stop_after,
        storage_options=storage_options(args.s3_endpoint) if args.s3_endpoint else {},
        cache_gb=args.cache_gb,
        cache_dir=args.cache_dir,
        supervision=args.supervision,
        pseudo_labels=args.pseudo_labels,
        pseudo_threshold=args.pseudo_threshold,
        pseudo_top_k=args.pseudo_top_k,
        rounds=args.rounds,
    )
    train(job)
    return 0
