"""The arguments of the Serve application (``jobs.serve:build_app``), validated by pydantic, and ``tal serve``.

They are what ``tal serve`` flags, ``serve run jobs.serve:build_app key=value`` and the ``args:``
block of a Serve config file (``infra/serve/tal.yaml``, the RayService) all fill in. Light to import:
no Ray, no torch.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it), for a server started next."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --- tal serve --------------------------------------------------------------------------------------


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
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP with Ray Serve (features and videos)",
        description=(
            "Deploys the detector as a Ray Serve app: POST /v1/detect (a feature sequence as JSON or .npy), "
            'POST /v1/detect/video (an upload, or {"uri": ...} under --video-root), GET /healthz, GET /v1/model, '
            "OpenAPI at /docs. Runs on RAY_ADDRESS if set, else on a local Ray; stops on Ctrl-C. Settings: defaults < "
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
    p.add_argument("--backbone-weights", help=fields["backbone_weights"].description)
    p.add_argument("--mlflow-uri", help=fields["mlflow_uri"].description)
    p.add_argument("--s3-endpoint", help=fields["s3_endpoint"].description)
    p.set_defaults(func=_serve)


def resolve_args(config: str | None, flags: dict, overrides: list[str]) -> ServeArgs:
    """Defaults < ``config`` (a Serve config file: its one application's ``args``; or a plain mapping of
    ``ServeArgs`` fields) < ``flags`` (argparse dest -> value, None = not given) < ``overrides`` (``key=value``).
    Raises ``ValueError`` naming the file, flag or key."""
    from pathlib import Path

    import yaml
    from pydantic import ValidationError

    from tal_models.config import apply_overrides

    data: dict = {}
    where = "settings"
    if config:
        where = Path(config).name
        try:
            loaded = yaml.safe_load(Path(config).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{config}: not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{config}: expected a mapping of settings or a Serve config, got {type(loaded).__name__}")
        if "applications" in loaded:
            apps = [a for a in loaded["applications"] or [] if a.get("import_path") == APP_IMPORT_PATH]
            if len(apps) != 1:
                raise ValueError(
                    f"{config}: a Serve config needs exactly one application with import_path {APP_IMPORT_PATH}, found {len(apps)}"
                )
            loaded = apps[0].get("args") or {}
        data = dict(loaded)
    source = dict.fromkeys(data, where)  # field -> where its value came from, for the error message
    for dest, value in flags.items():
        if dest in _FLAG_FIELDS and value is not None:
            data[_FLAG_FIELDS[dest]] = value
            source[_FLAG_FIELDS[dest]] = "--" + dest.replace("_", "-")
    defaults = {name: None if f.is_required() else f.get_default(call_default_factory=True) for name, f in ServeArgs.model_fields.items()}
    full = {**defaults, **data}
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(defaults)}")
    for key in apply_overrides(full, overrides, example="max_batch_size=1"):
        source[key] = f"--set {key}"
    if full["model"] is None:
        raise ValueError("--model is required (or model: in --config)")
    try:
        return ServeArgs.model_validate(full)
    except ValidationError as e:
        first = e.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "settings"
        raise ValueError(f"{source.get(name, name)}: {name}: {first['msg']}") from None


def _serve(args: argparse.Namespace) -> int:
    from jobs.errors import UsageError
    from jobs.serve import describe_model, run_app

    try:
        serve_args = resolve_args(args.config, vars(args), args.set)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    try:
        info = describe_model(serve_args)  # a model that does not resolve is a one-line error before Ray starts
    except ValueError as e:
        raise UsageError(f"--model {serve_args.model}: {e}") from None
    from ray import serve

    from pipelines.ray_runtime import owns_ray

    try:
        url = run_app(serve_args, args.host, args.port, info=info)
    except KeyboardInterrupt:  # Ctrl-C while the replicas start: stop what started, no traceback
        print("interrupted while starting; stopping ...", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        if not owns_ray():  # a local Ray this process started ends with it, Serve included
            serve.shutdown()
        return 130
    print(f"serving {serve_args.model} at {url}  (OpenAPI: {url}/docs)")
    print(f"  curl {url}/v1/model")
    print(f"  curl -F video=@my_video.mp4 {url}/v1/detect/video")
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
