"""``tal serve``: a checkpoint over HTTP with Ray Serve, in the foreground until Ctrl-C (``jobs.serve``)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from jobs.errors import UsageError
from jobs.serve_config import ServeArgs

# flag dest -> ServeArgs field, for the flags whose default is None ("not given": the config file's value stands)
_FLAG_FIELDS = {
    "model": "model",
    "replicas": "detector_replicas",
    "featurizer_replicas": "featurizer_replicas",
    "cpus_per_replica": "cpus_per_replica",
    "gpus_per_replica": "gpus_per_replica",
    "video_root": "video_roots",
    "max_batch_size": "max_batch_size",
    "max_body_mb": "max_body_mb",
    "max_upload_mb": "max_upload_mb",
    "max_steps": "max_steps",
    "backbone_weights": "backbone_weights",
    "mlflow_uri": "mlflow_uri",
    "s3_endpoint": "s3_endpoint",
    "runtime": "runtime",
    "classifier": "classifier",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP with Ray Serve (features and videos)",
        description=(
            "Deploys the detector as a Ray Serve app: POST /v1/detect (a feature sequence as JSON or .npy), "
            'POST /v1/detect/video (an upload, or {"uri": ...} under --video-root), GET /healthz, GET /v1/model, '
            "OpenAPI at /docs, and a web viewer at / (a video with its detections; the videos under --video-root are listed). "
            "Runs on RAY_ADDRESS if set, else on a local Ray; stops on Ctrl-C. Settings: defaults < "
            "--config < flags given < --set. For a cluster, deploy infra/serve/tal.yaml with `serve deploy` instead."
        ),
    )
    fields = ServeArgs.model_fields
    p.add_argument("--model", help=fields["model"].description + " (required, here or in --config)")
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="a Serve config file (the args of its application, e.g. infra/serve/tal.yaml) or a YAML of these settings",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. max_batch_size=1")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1; 0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, help="Detector replicas (default 1)")
    p.add_argument("--featurizer-replicas", type=int, help="VideoFeaturizer replicas (default 1)")
    p.add_argument("--cpus-per-replica", type=float, help=fields["cpus_per_replica"].description + " (default 1)")
    p.add_argument("--gpus-per-replica", type=float, help=fields["gpus_per_replica"].description + " (default 0)")
    p.add_argument("--video-root", action="append", metavar="PREFIX", help=fields["video_roots"].description + "; repeatable")
    p.add_argument("--max-batch-size", type=int, help=fields["max_batch_size"].description + " (default 8)")
    p.add_argument("--max-body-mb", type=float, help=fields["max_body_mb"].description + " (default 64)")
    p.add_argument("--max-upload-mb", type=float, help=fields["max_upload_mb"].description + " (default 512)")
    p.add_argument("--max-steps", type=int, help=fields["max_steps"].description + " (default 16384)")
    p.add_argument("--runtime", choices=("torch", "onnx"), help=fields["runtime"].description + " (default torch)")
    p.add_argument("--classifier", help=fields["classifier"].description)
    p.add_argument("--backbone-weights", help=fields["backbone_weights"].description)
    p.add_argument("--mlflow-uri", help=fields["mlflow_uri"].description)
    p.add_argument("--s3-endpoint", help=fields["s3_endpoint"].description)
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ray import serve

    from jobs.serve import describe_model, resolve_args, run_app
    from pipelines.ray_runtime import owns_ray

    given = {field: getattr(args, dest) for dest, field in _FLAG_FIELDS.items()}
    given_as = {field: "--" + dest.replace("_", "-") for dest, field in _FLAG_FIELDS.items()}
    try:
        serve_args = resolve_args(args.config, given, args.set, given_as=given_as)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    try:
        info = describe_model(serve_args)  # a model that does not resolve is a one-line error before Ray starts
    except ValueError as e:
        raise UsageError(f"--model {serve_args.model}: {e}") from None
    try:
        url = run_app(serve_args, args.host, args.port, info=info)
    except KeyboardInterrupt:  # Ctrl-C while the replicas start: stop what started, no traceback
        print("interrupted while starting; stopping ...", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        if not owns_ray():  # a local Ray this process started ends with it, Serve included
            serve.shutdown()
        return 130
    print(f"serving {serve_args.model} at {url}  (viewer: {url}/ , OpenAPI: {url}/docs)")
    print(f"  curl {url}/v1/model")
    print(f"  curl -F video=@my_video.mp4 {url}/v1/detect/video")
    print(f"  python -m jobs.stream_client --url {url} --features steps.npy  (an online model: WebSocket ws{url[4:]}/v1/stream)")
    print("Ctrl-C stops it.")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("stopping ...")
    # serve.shutdown() makes Ray print "Task ServeController.graceful_shutdown failed ... will be retried": a local Ray
    # this process started ends with it (Serve included) at exit; only a cluster's Serve is shut down here
    if not owns_ray():
        serve.shutdown()
    return 0
