"""The arguments of the Serve application (``jobs.serve:build_app``), validated by pydantic, and ``tal serve``.

They are what ``tal serve`` flags, ``serve run jobs.serve:build_app key=value`` and the ``args:``
block of a Serve config file (``infra/serve/tal.yaml``, the RayService) all fill in. Light to import:
no Ray, no torch.
"""

from __future__ import annotations

import argparse
import signal
import threading

from pydantic import BaseModel, ConfigDict, Field, field_validator

APP_IMPORT_PATH = "jobs.serve:build_app"
APP_NAME = "tal"
DEPLOYMENTS = ("Ingress", "Detector", "VideoFeaturizer")


class ServeArgs(BaseModel):
    """Everything the application needs; unknown keys are refused (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="models:/tal-detector@champion, models:/NAME/VERSION, runs:/ID/PATH, a local path or an s3:// URI")
    mlflow_uri: str | None = Field(None, description="tracking/registry URI for models:/ and runs:/ (default: $MLFLOW_TRACKING_URI)")
    s3_endpoint: str | None = Field(None, description="S3 endpoint URL (default: $AWS_ENDPOINT_URL or AWS)")
    video_roots: list[str] = Field(
        default_factory=list,
        description="prefixes /v1/detect/video may read by URI (s3://bucket/prefix/ or a local folder); empty: URIs refused",
    )
    backbone_weights: str | None = Field(
        None, description="where the video featurizer finds the backbone weights, if not where training recorded"
    )
    max_body_mb: float = Field(64.0, gt=0, description="largest /v1/detect body (413 above)")
    max_upload_mb: float = Field(512.0, gt=0, description="largest /v1/detect/video upload (413 above)")
    max_steps: int = Field(16384, ge=1, description="longest feature sequence accepted (422 above)")
    max_batch_size: int = Field(8, ge=1, description="feature requests per forward pass (1 = no batching)")
    batch_wait_timeout_s: float = Field(
        0.002,
        ge=0,
        description="how long a request that finds the model idle waits for others to batch with (requests arriving while a batch runs join the next one anyway)",
    )
    detector_replicas: int = Field(1, ge=1)
    featurizer_replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs of each Detector / VideoFeaturizer replica (also its torch threads)")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs of each Detector / VideoFeaturizer replica")

    @field_validator("model")
    @classmethod
    def _model_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model must name a checkpoint (models:/..., runs:/..., a path or s3:// URI)")
        return value.strip()


# --- tal serve --------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP with Ray Serve (features and videos)",
        description=(
            "Deploys the detector as a Ray Serve app: POST /v1/detect (a feature sequence as JSON or .npy), "
            'POST /v1/detect/video (an upload, or {"uri": ...} under --video-root), GET /healthz, GET /v1/model, '
            "OpenAPI at /docs. Runs on RAY_ADDRESS if set, else on a local Ray; stops on Ctrl-C. For a cluster, "
            "deploy infra/serve/tal.yaml with `serve deploy` instead."
        ),
    )
    fields = ServeArgs.model_fields
    p.add_argument("--model", required=True, help=fields["model"].description)
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1; 0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="Detector replicas (default 1)")
    p.add_argument("--featurizer-replicas", type=int, default=1, help="VideoFeaturizer replicas (default 1)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help=fields["cpus_per_replica"].description + " (default 1)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help=fields["gpus_per_replica"].description + " (default 0)")
    p.add_argument("--video-root", action="append", default=[], metavar="PREFIX", help=fields["video_roots"].description + "; repeatable")
    p.add_argument("--max-batch-size", type=int, default=8, help=fields["max_batch_size"].description + " (default 8)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help=fields["max_body_mb"].description + " (default 64)")
    p.add_argument("--max-upload-mb", type=float, default=512.0, help=fields["max_upload_mb"].description + " (default 512)")
    p.add_argument("--max-steps", type=int, default=16384, help=fields["max_steps"].description + " (default 16384)")
    p.add_argument("--backbone-weights", help=fields["backbone_weights"].description)
    p.add_argument("--mlflow-uri", help=fields["mlflow_uri"].description)
    p.add_argument("--s3-endpoint", help=fields["s3_endpoint"].description)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from jobs.errors import UsageError
    from jobs.serve import describe_model, run_app

    try:
        serve_args = ServeArgs(
            model=args.model,
            mlflow_uri=args.mlflow_uri,
            s3_endpoint=args.s3_endpoint,
            video_roots=args.video_root,
            backbone_weights=args.backbone_weights,
            max_body_mb=args.max_body_mb,
            max_upload_mb=args.max_upload_mb,
            max_steps=args.max_steps,
            max_batch_size=args.max_batch_size,
            detector_replicas=args.replicas,
            featurizer_replicas=args.featurizer_replicas,
            cpus_per_replica=args.cpus_per_replica,
            gpus_per_replica=args.gpus_per_replica,
        )
    except ValidationError as e:
        first = e.errors()[0]
        raise UsageError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    try:
        describe_model(serve_args)  # a model that does not resolve is a one-line error before Ray starts
    except ValueError as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    url = run_app(serve_args, args.host, args.port)
    print(f"serving {serve_args.model} at {url}  (OpenAPI: {url}/docs)")
    print(f"  curl {url}/v1/model")
    print(f"  curl -F video=@my_video.mp4 {url}/v1/detect/video")
    print("Ctrl-C stops it.")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("stopping ...")
    from ray import serve

    serve.shutdown()
    return 0
