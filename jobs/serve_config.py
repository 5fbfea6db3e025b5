"""The arguments of the Serve application (``jobs.serve:build_app``), validated by pydantic.

They are what ``tal serve`` flags (``jobs.cli.serve``, merged by ``jobs.serve.resolve_args``),
``serve run jobs.serve:build_app key=value`` and the ``args:`` block of a Serve config file
(``infra/serve/tal.yaml``, the RayService) all fill in. Light to import: no Ray, no torch
(the ``tal serve`` parser reads its help from the field descriptions).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

APP_IMPORT_PATH = "jobs.serve:build_app"
APP_NAME = "tal"
DEPLOYMENTS = ("Detector", "VideoFeaturizer")  # the Detector is the HTTP ingress too


class ServeArgs(BaseModel):
    """Everything the application needs; unknown keys are refused (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="models:/tal-detector@champion, models:/NAME/VERSION, runs:/ID/PATH, a local path or an s3:// URI")
    classifier: str | None = Field(
        None,
        description="the video classifier that names a class-agnostic model's segments (models:/tal-classifier@champion, a path, "
        "s3://); default for a class-agnostic model from the registry: models:/tal-classifier@champion",
    )
    fuse_top_k: int = Field(2, ge=1, description="video classes each class-agnostic segment is labelled with")
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
    runtime: Literal["torch", "onnx"] = Field(
        "torch",
        description="torch, or onnx: the detector's dense part in ONNX Runtime (CPU, cpus_per_replica threads); "
        "model may then be a .onnx file of tal export, a checkpoint is exported when the replica starts",
    )
    stream_max_sessions: int = Field(
        16, ge=1, description="/v1/stream WebSocket sessions per Detector replica (a new one over it: close code 1013)"
    )
    stream_idle_timeout_s: float = Field(
        60.0, gt=0, description="a /v1/stream session with no message for this long is closed (its end events sent first)"
    )
    stream_max_session_s: float = Field(14400.0, gt=0, description="longest /v1/stream session, seconds (then closed like an idle one)")
    stream_max_message_mb: float = Field(
        8.0, gt=0, le=15.0, description="largest /v1/stream message (error payload_too_large above; under the WebSocket server's 16 MiB)"
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
