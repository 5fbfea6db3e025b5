"""Ray Serve application: a trained detector over HTTP, for feature sequences and for raw videos.

    HTTP ─► Detector (FastAPI ingress: limits, parsing, validation, JSON errors; holds the model, batches)
              ├─ POST /v1/detect        ─► parse the body in place ─► the model (this replica's torch thread)
              ├─ POST /v1/detect/video  ─► VideoFeaturizer (decode + the checkpoint's ─► the model, here
              │                            backbone, as its provenance records)
              ├─ WS /v1/stream          ─► a StreamSession (jobs.stream_api) per connection: an OnlineStream here,
              │                            feature steps (or encoded video chunks) in, events out as they happen
              ├─ GET /, /viewer/{name}  ─► the web viewer (jobs/viewer: plain HTML/CSS/JS, docs/viewer.md)
              ├─ GET /v1/videos         ─► the videos under the video roots (bounded listing, root-checked)
              └─ GET /v1/videos/content ─► one of those videos' bytes (HTTP Range), for the viewer's player
            GET /healthz, GET /v1/model, OpenAPI at /docs

One replica both answers HTTP and runs the model: a feature request's body is parsed where the model is
(``np.frombuffer`` on the ``.npy`` bytes, no copy) and crosses no other actor, so an 18 MB request costs
no pickling and no hand-off (``docs/serving_overhead.md``). With Serve's direct ingress on
(``RAY_SERVE_ENABLE_DIRECT_INGRESS``, which ``run_app`` turns on for a local Ray it starts) the replica
itself listens for HTTP and the body does not pass through Serve's proxy either. Every torch call of a
replica runs on one thread of its own (``TorchThread``).

``build_app(ServeArgs)`` is the import path for ``serve run`` / ``serve deploy`` / a RayService
(``jobs.serve:build_app``); ``tal serve`` calls it and runs the app on local Ray or ``RAY_ADDRESS``.
The request contract (models, parsing, validation) lives in ``jobs.serve_api``, without Ray.
(No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` type of the
class-based ingress's methods, which Serve re-wraps outside this module's namespace.)

The model reference is pinned once, when the app is built (``models:/x@champion`` -> ``models:/x/7``),
and every Detector replica loads that version itself (from the MLflow registry, S3 or a path), so
no weights travel through the deployment's config.
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import LoggingConfig
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from jobs.export import ExportedModel, ExportError, build_for_runtime
from jobs.inference import detect_batch, load_runtime_model
from jobs.serve_api import (
    MAX_LIST_LIMIT,
    NPY_CONTENT_TYPES,
    VIDEO_EXTENSIONS,
    DetectFeaturesRequest,
    DetectOptions,
    DetectResponse,
    DetectVideoRequest,
    DynamicBatcher,
    ErrorResponse,
    Limits,
    ModelInfo,
    RequestError,
    check_video_uri,
    detections_payload,
    features_request,
    is_video_name,
    list_videos,
    options_from_query,
    parse_json_request,
    parse_npy,
    parse_range,
    request_classes,
    to_sequence,
    video_media_type,
)
from jobs.serve_config import APP_IMPORT_PATH, APP_NAME, ServeArgs
from jobs.stream_api import Disconnected, StreamLimits, StreamSessions, stream_model, to_json, video_inputs
from pipelines.ray_runtime import init_ray
from pipelines.store import FeatureSequence, filesystem_for, storage_options
from pipelines.video import VideoDecodeError
from tal_models.config import apply_overrides, config_from_dict, config_to_dict
from tal_models.detectors.fused import FusedDetector, is_class_agnostic
from tal_models.text import TextEncoderConfig, is_open_vocabulary

MB = 2**20
VIEWER_DIR = Path(__file__).resolve().parent / "viewer"  # the web viewer's files (package data: found installed or editable)
_VIEWER_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".svg": "image/svg+xml", ".png": "image/png", ".txt": "text/plain; charset=utf-8"}  # fmt: skip


# --- loading the checkpoint (driver and replicas) ----------------------------------------------


def load_served_checkpoint(reference: str, mlflow_uri: str | None, storage_options: dict[str, Any]):
    """``jobs.inference.load_runtime_model`` (a checkpoint, or a ``tal export`` file), with a registry download removed
    once read (replicas restart; copies would pile up)."""
    with tempfile.TemporaryDirectory(prefix="tal-serve-model-") as folder:
        return load_runtime_model(reference, storage_options, mlflow_uri, download_to=folder)[0]


def describe_model(args: ServeArgs) -> ModelInfo:
    """Pin ``args.model`` and read what the ingress needs to know about it (labels, width, provenance)."""
    # Here, not at the top: only the driver pins, and MLflow (~1 s, ~40 MB to import) would load in every replica.
    from jobs.tracking import pin_model

    if args.model.startswith("models:/"):
        pinned, registry = pin_model(args.model, args.mlflow_uri)
    elif "://" in args.model or args.model.startswith("runs:/"):  # a run's artifact never changes: pinned as it is
        pinned, registry = args.model, {}
    else:  # a local path: absolute, since replicas run in another working directory
        pinned, registry = str(Path(args.model).expanduser().resolve()), {}
    checkpoint = load_served_checkpoint(pinned, args.mlflow_uri, _storage_options(args))
    if args.runtime == "torch" and isinstance(checkpoint, ExportedModel):
        raise ExportError(f"{args.model} is an exported {checkpoint.info.format} file: serve it with runtime onnx (--runtime onnx)")
    open_vocabulary = is_open_vocabulary(checkpoint.config)
    if open_vocabulary and args.runtime != "torch":
        raise ExportError(f"{args.model} is an open-vocabulary model: serve it with runtime torch (class names are embedded per request)")
    metadata = {k: v for k, v in checkpoint.metadata.items() if isinstance(v, str | int | float | bool | type(None) | dict | list)}
    labels, classifier = list(checkpoint.labels), None
    if args.classifier is not None or is_class_agnostic(checkpoint):
        classifier = _describe_classifier(args, checkpoint)
        labels = classifier.pop("labels")
    return ModelInfo(
        reference=args.model,
        pinned=pinned,
        labels=labels,
        classifier=classifier,
        arch=checkpoint.config.arch,
        input_dim=checkpoint.config.input_dim,
        provenance=dict(checkpoint.provenance),
        registry=registry,
        metadata=metadata,
        open_vocabulary=open_vocabulary,
        text=config_to_dict(checkpoint.config.text) if open_vocabulary else None,
    )


def _describe_classifier(args: ServeArgs, checkpoint) -> dict[str, Any]:
    """The video classifier a class-agnostic ``checkpoint`` is fused with, pinned: ``{reference, pinned, registry, labels}``.
    Without ``args.classifier``, a model from the registry takes the registry's champion classifier."""
    from jobs.tracking import CLASSIFIER_MODEL, pin_model

    if not is_class_agnostic(checkpoint):
        raise ValueError(
            f"classifier: {args.model} names its own {checkpoint.config.num_classes} classes; a classifier labels class-agnostic models"
        )
    if args.runtime != "torch":
        raise ExportError("a class-agnostic model fused with a classifier is served with runtime torch")
    reference = args.classifier
    if reference is None:
        if not args.model.startswith("models:/"):
            raise ValueError(f"{args.model} is class-agnostic: give the video classifier that names its segments (--classifier)")
        reference = f"models:/{CLASSIFIER_MODEL}@champion"
    if reference.startswith("models:/"):
        pinned, registry = pin_model(reference, args.mlflow_uri)
    else:
        pinned, registry = (
            (reference if "://" in reference or reference.startswith("runs:/") else str(Path(reference).expanduser().resolve())),
            {},
        )
    classifier = load_served_checkpoint(pinned, args.mlflow_uri, _storage_options(args))
    if getattr(classifier.config, "task", None) != "classification":
        raise ValueError(f"classifier: {reference} is a {classifier.config.arch} detector, not a video classifier")
    classifier.check_features(checkpoint.config.input_dim, checkpoint.provenance)
    return {"reference": reference, "pinned": pinned, "registry": registry, "top_k": args.fuse_top_k, "labels": list(classifier.labels)}


def _storage_options(args: ServeArgs) -> dict[str, Any]:
    return storage_options(args.s3_endpoint)


def _device(use_gpu: bool) -> str:
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


# --- deployments -------------------------------------------------------------------------------


class TorchThread:
    """One thread for every torch call of a replica (loading the model, every forward), ``num_threads`` set on it.

    ATen's CPU kernels run on OpenMP, which keeps a team of worker threads per thread that calls into it,
    and ``torch.set_num_threads`` applies to the calling thread's team. Measured with the 256-step forward
    of ``thumos14-actionformer`` on this 2-core machine, 2 torch threads (``docs/serving_overhead.md``):
    idle, 117 ms when one thread did all the torch work and 160-195 ms once a second thread had called
    torch (issue 6: the old Detector loaded on one thread and ran forwards on asyncio's pool); with other
    processes keeping the cores busy (load 5-9) the order reverses, 1.2-1.8 s against 0.2-0.45 s: one team's
    workers spin for cores they do not get. A replica owns its CPUs (``num_cpus``), so it is built for the
    first case; the benchmark's in-process forward is measured the same way (one thread does it all).
    """

    def __init__(self, num_threads: int):
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tal-torch")
        self.executor.submit(torch.set_num_threads, max(1, num_threads)).result()

    def run(self, fn, *args):
        """``fn(*args)`` on the torch thread, waited for (for ``__init__``)."""
        return self.executor.submit(fn, *args).result()


class _TimedBackbone:
    """The backbone, counting the seconds spent in its forward passes (the rest of featurizing is decoding)."""

    def __init__(self, backbone):
        self._backbone = backbone
        self.seconds = 0.0

    def __getattr__(self, name: str):
        return getattr(self._backbone, name)

    def frame_features(self, *args, **kwargs):
        return self._timed(self._backbone.frame_features, *args, **kwargs)

    def clip_features(self, *args, **kwargs):
        return self._timed(self._backbone.clip_features, *args, **kwargs)

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


@serve.deployment(name="VideoFeaturizer", max_ongoing_requests=4)
class VideoFeaturizer:
    """Decodes a video and computes its features exactly as the checkpoint's training features were made.

    If the backbone cannot be rebuilt (features imported from elsewhere, weights missing or different),
    the replica still starts and every video request gets a 501 saying why; feature requests are unaffected.
    """

    def __init__(
        self,
        provenance: dict[str, Any],
        backbone_weights: str | None,
        storage_options: dict[str, Any],
        video_roots: list[str],
        num_threads: int,
        use_gpu: bool,
    ):
        # Here and in _featurize, not at the top: the backbones (torchvision, OpenCV: ~2 s and ~190 MB to import)
        # are this deployment's alone, and the Detector replicas import this module too.
        from pipelines.extract import build_featurizer

        self.storage_options = storage_options
        self.video_roots = list(video_roots)
        self.unavailable: str | None = None
        try:
            self.backbone, self.sampling = build_featurizer(
                provenance, _device(use_gpu), weights=backbone_weights, storage_options=storage_options, num_threads=max(1, num_threads)
            )
        except Exception as e:  # noqa: BLE001 - reported on each video request, the app keeps serving features
            self.unavailable = f"{type(e).__name__}: {e}"

    async def featurize(self, video_id: str, data: bytes | None = None, uri: str | None = None) -> dict[str, Any]:
        return await asyncio.to_thread(self._featurize, video_id, data, uri)

    def _featurize(self, video_id: str, data: bytes | None, uri: str | None) -> dict[str, Any]:
        from pipelines.extract import features_for_video  # see __init__

        if self.unavailable is not None:
            return _failure(501, "video_unsupported", f"this model cannot featurize videos: {self.unavailable}")
        start = time.perf_counter()
        backbone = _TimedBackbone(self.backbone)
        path = None
        try:
            if data is not None:
                with tempfile.NamedTemporaryFile(prefix="tal-upload-", suffix=".video", delete=False) as f:
                    f.write(data)
                    path = f.name
                source, fs = path, None
            else:
                source = check_video_uri(uri, self.video_roots)  # checked again here: the ingress is not the only caller
                fs = filesystem_for(source, self.storage_options)[0] if source.startswith("s3://") else None
            seq = features_for_video(backbone, source, self.sampling, video_id=video_id, filesystem=fs)
        except RequestError as e:
            return _failure(e.status, e.code, e.message)
        except VideoDecodeError as e:
            where = "the upload" if data is not None else uri
            status = 404 if e.reason == "missing" else 422
            return _failure(status, f"video_{e.reason}", f"{where}: {e.reason}: {e.detail}")
        except Exception as e:  # noqa: BLE001 - decoders fail in many ways on hostile input; never a 500
            where = "the upload" if data is not None else uri
            return _failure(422, "video_unreadable", f"{where}: cannot be featurized ({type(e).__name__}: {str(e)[:300]})")
        finally:
            if path is not None:
                os.unlink(path)
        total = time.perf_counter() - start
        return {"ok": True, "sequence": seq, "timing": {"decode_s": total - backbone.seconds, "features_s": backbone.seconds}}


def _failure(status: int, code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "status": status, "error": code, "message": message}


# --- the HTTP ingress ----------------------------------------------------------------------------

api = FastAPI(
    title="TAL detector",
    version="1",
    description="Temporal action localization: where in a video each action happens (start, end, class, score). "
    "POST a feature sequence to /v1/detect or a video to /v1/detect/video. A web viewer (a video with its detections "
    "under it) is served at / (its files under /viewer/), with the videos of the server's roots from /v1/videos.",
)

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 403, 404, 413, 415, 422)}
_JSON_FEATURES = DetectFeaturesRequest.model_json_schema()
_NPY_BODY = {"schema": {"type": "string", "format": "binary"}}
_QUERY_OPTIONS = [
    {"name": "video_id", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 512}},
    {"name": "score_threshold", "in": "query", "required": False, "schema": {"type": "number", "minimum": 0, "maximum": 1}},
    {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 100000}},
]


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse({"error": code, "message": f"{request.method} {request.url.path}: {exc.detail}"}, status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "request"
    return JSONResponse({"error": "invalid_request", "message": f"{where}: {first.get('msg')}"}, status_code=422)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: say so, in JSON, and keep serving
    return JSONResponse({"error": "internal", "message": f"{type(exc).__name__}: {str(exc)[:300]}"}, status_code=500)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _options(fields: dict[str, Any]) -> DetectOptions:
    unknown = sorted(set(fields) - set(DetectOptions.model_fields))
    if unknown:
        raise RequestError(422, "invalid_request", f"unknown parameters {unknown} for a video; known: {sorted(DetectOptions.model_fields)}")
    try:
        return DetectOptions.model_validate(fields)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, reported as the request's fault
        raise RequestError(422, "invalid_request", str(e).splitlines()[-1].strip() if str(e) else "invalid options") from None


async def _limited_stream(request: Request, limit: int):
    """The body's chunks, refusing (413) as soon as more than ``limit`` bytes arrive: Content-Length is checked
    first, and counted anyway (a chunked body has none, and a client may lie)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, "bad_content_length", f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise RequestError(413, "payload_too_large", f"the body has {size:,} bytes; this server accepts at most {limit:,} here")
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise RequestError(413, "payload_too_large", f"the body exceeds {limit:,} bytes, the most this server accepts here")
        yield chunk


async def _read_limited(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _limited_stream(request, limit)])


async def _read_upload(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The one file of a multipart upload (field ``video``), with the body size bounded while it streams."""
    parser = MultiPartParser(request.headers, _limited_stream(request, limit), max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise RequestError(400, "malformed_multipart", f"the multipart body cannot be parsed: {e.message}") from None
    try:
        upload = form.get("video")
        if upload is None or isinstance(upload, str):
            raise RequestError(
                422, "missing_video", f"the multipart body needs a file field named 'video' (got fields {sorted(form.keys())})"
            )
        return await upload.read(), upload.filename
    finally:
        await form.close()


# --- the viewer and the videos it plays ------------------------------------------------------------------


def _viewer_file(name: str) -> Path:
    """A file of the viewer's folder (no sub-folders, no dot files, known types only), or 404."""
    path = VIEWER_DIR / name
    if "/" in name or "\\" in name or name.startswith(".") or path.suffix not in _VIEWER_TYPES or not path.is_file():
        raise RequestError(404, "not_found", f"the viewer has no file {name!r}")
    return path


def _video_path(uri: str, roots: list[str]) -> str:
    """``uri`` checked against the roots (403 outside them) and named as a video file (415 otherwise)."""
    checked = check_video_uri(uri, roots)
    if not is_video_name(checked):
        raise RequestError(415, "not_a_video", f"{uri}: only video files are served ({' '.join(VIDEO_EXTENSIONS)})")
    return checked


def _s3_video_response(uri: str, fs, range_header: str | None) -> StreamingResponse:
    """The bytes of ``uri`` on S3, or the one range the ``Range`` header asks for (206), streamed in 1 MiB chunks."""
    try:
        size = int(fs.info(uri)["size"])
    except FileNotFoundError:
        raise RequestError(404, "video_missing", f"{uri}: no such object") from None
    span = parse_range(range_header, size)
    start, end = span if span is not None else (0, size - 1)

    def chunks():
        with fs.open(uri, "rb", block_size=MB) as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(MB, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    headers = {"Accept-Ranges": "bytes", "Content-Length": str(max(0, end - start + 1))}
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(chunks(), status_code=206 if span else 200, media_type=video_media_type(uri), headers=headers)


class _WebSocketTransport:
    """A Starlette WebSocket as ``jobs.stream_api.Transport``: JSON text out, text or bytes in."""

    def __init__(self, websocket: WebSocket):
        self.websocket = websocket

    async def receive(self) -> str | bytes:
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise Disconnected()
        return message["text"] if message.get("text") is not None else message.get("bytes") or b""

    async def send(self, message: dict[str, Any]) -> None:
        try:
            await self.websocket.send_text(to_json(message))
        except (WebSocketDisconnect, RuntimeError, OSError) as e:  # RuntimeError: Starlette's "after close", the client went
            raise Disconnected() from e

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(RuntimeError, OSError):  # closed already: the client went first
            await self.websocket.close(code, reason)


# Everything the ingress's methods call must be defined above it: serve.ingress pickles the FastAPI app
# (and with it the endpoints and the globals they name) when the class is decorated.
@serve.deployment(name="Detector", max_ongoing_requests=64)
@serve.ingress(api)
class DetectorIngress:
    """The HTTP ingress and the model: parses and checks every request before the model sees it (errors as
    ``{"error", "message"}``), detects feature sequences in batches (``DynamicBatcher``: whatever waits when
    the model becomes free, up to ``max_batch_size``), sends videos to the ``VideoFeaturizer`` first."""

    def __init__(
        self,
        featurizer: DeploymentHandle,
        info: ModelInfo,
        limits: Limits,
        video_roots: list[str],
        mlflow_uri: str | None,
        storage_options: dict[str, Any],
        batch_wait_timeout_s: float,
        num_threads: int,
        use_gpu: bool,
        runtime: str = "torch",
        stream_limits: StreamLimits | None = None,
        backbone_weights: str | None = None,
    ):
        self.featurizer = featurizer
        self.info = info
        self.limits = limits
        self.video_roots = list(video_roots)
        self.storage_options = storage_options
        self.torch = TorchThread(num_threads)

        def load_model():
            checkpoint = load_served_checkpoint(info.pinned, mlflow_uri, storage_options)
            # onnx: ONNX Runtime with as many intra-op threads as torch has here (a checkpoint is exported in memory first)
            model = build_for_runtime(checkpoint, runtime, _device(use_gpu), num_threads=max(1, num_threads))
            if info.classifier is None:
                return model
            classifier = load_served_checkpoint(info.classifier["pinned"], mlflow_uri, storage_options).build(_device(use_gpu))
            return FusedDetector(model, classifier, info.classifier["top_k"]).eval()

        self.model = self.torch.run(load_model)
        # an open-vocabulary model: its text encoder embeds the class names requests give (each name once per replica)
        self.text = None
        if info.open_vocabulary:
            from pipelines.vlm import load_text_encoder  # here: open_clip is slow to import, and most models are closed-set

            text = config_from_dict(TextEncoderConfig, info.text or {}, where="the model's text encoder")
            self.text = self.torch.run(lambda: load_text_encoder(text, storage_options or None))
        self.class_embeddings: dict[str, torch.Tensor] = {}
        self.arriving = 0  # feature requests being received or parsed: a batch may wait for them, never for nobody
        self.batcher = DynamicBatcher(
            self._detect_batch, limits.max_batch_size, batch_wait_timeout_s, executor=self.torch.executor, arriving=lambda: self.arriving
        )
        video = video_inputs(info.provenance, _device(use_gpu), backbone_weights, storage_options, num_threads, self.torch.run)
        self.stream_model = stream_model(self.model, info, self.torch.executor, video)
        self.sessions = StreamSessions(stream_limits or StreamLimits())

    async def _detect(
        self, seq: FeatureSequence, score_threshold: float | None, top_k: int | None, classes: list[str] | None = None
    ) -> dict[str, Any]:
        if classes:  # embedded before batching: a name the text encoder refuses fails this request only
            await asyncio.get_running_loop().run_in_executor(self.torch.executor, self._embed, tuple(classes))
        return await self.batcher.submit((seq, score_threshold, top_k, tuple(classes) if classes else None))

    def _detect_batch(self, items: list[tuple[FeatureSequence, float | None, int | None, tuple[str, ...] | None]]) -> list[dict[str, Any]]:
        """One forward pass per class set in the batch (the model's own classes, and each set requests named)."""
        start = time.perf_counter()
        results: list[dict[str, Any] | None] = [None] * len(items)
        for classes in dict.fromkeys(item[3] for item in items):
            picked = [i for i, item in enumerate(items) if item[3] == classes]
            embeddings = None if classes is None else self._embed(classes)
            detections = detect_batch(self.model, [items[i][0] for i in picked], class_embeddings=embeddings)
            labels = self.info.labels if classes is None else list(classes)
            for i, d in zip(picked, detections):
                results[i] = {"detections": detections_payload(d, labels, items[i][1], items[i][2])}
        seconds = time.perf_counter() - start
        return [{**r, "detect_s": seconds, "batch_size": len(items)} for r in results]

    def _embed(self, classes: tuple[str, ...]) -> torch.Tensor:
        """The text embeddings ``[K', E]`` of ``classes``, each name embedded once per replica (at most 10,000 kept)."""
        new = [c for c in classes if c not in self.class_embeddings]
        if new:
            try:
                embedded = torch.as_tensor(self.text.encode(new))
            except ValueError as exc:  # e.g. a name an embedding table does not hold
                raise RequestError(422, "invalid_classes", str(exc)) from None
            if len(self.class_embeddings) + len(new) > 10_000:
                self.class_embeddings.clear()
            self.class_embeddings.update(zip(new, embedded))
        return torch.stack([self.class_embeddings[c] for c in classes])

    @api.get("/healthz", summary="liveness: the app is up and which model it serves")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.info.summary()}

    @api.get(
        "/v1/model", summary="the served checkpoint (registry name, version, alias, labels, feature provenance) and the server's limits"
    )
    async def model(self) -> dict[str, Any]:
        return {**self.info.describe(), "server": dataclasses.asdict(self.limits)}

    # the page and its files are no API: out of the OpenAPI (whose every answer is JSON), named in its description
    @api.get("/", include_in_schema=False)
    async def viewer(self) -> HTMLResponse:
        return HTMLResponse(_viewer_file("index.html").read_text())

    @api.get("/viewer/{name}", include_in_schema=False)
    async def viewer_file(self, name: str) -> FileResponse:
        path = _viewer_file(name)
        return FileResponse(path, media_type=_VIEWER_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})

    @api.get(
        "/v1/videos",
        summary="the video files under the server's video roots (bounded listing)",
        description="Each root (--video-root) walked in name order, at most 8 folders deep, until `limit` videos are found; "
        "`truncated` says whether there were more. `prefix` keeps the videos whose path under their root starts with it. "
        "Every `uri` passes the same root checks as POST /v1/detect/video, which reads it, and GET /v1/videos/content, "
        "which serves its bytes. A server without video roots answers 200 with no videos and a `message`.",
        responses={422: {"model": ErrorResponse}},
    )
    async def videos(
        self,
        limit: int = Query(200, ge=1, le=MAX_LIST_LIMIT, description=f"most videos listed (at most {MAX_LIST_LIMIT})"),
        prefix: str = Query("", max_length=1024, description="only videos whose path under their root starts with this"),
    ) -> dict[str, Any]:
        if not self.video_roots:
            return {"videos": [], "truncated": False, "roots": [], "message": "this server has no video roots (tal serve --video-root DIR)"}
        listing = await asyncio.to_thread(list_videos, self.video_roots, limit, prefix, self._s3)
        return {**listing, "roots": self.video_roots}

    @api.get(
        "/v1/videos/content",
        summary="the bytes of a video under the video roots (HTTP Range supported), for the viewer's player",
        description="`uri` as GET /v1/videos lists it; 403 outside the roots (`..` escapes included), 415 for a file that is not a video, "
        "404 if missing. A `Range: bytes=START-END` header gets 206 with those bytes.",
        responses={**_ERRORS, 416: {"model": ErrorResponse}},
    )
    async def video_content(self, request: Request, uri: str = Query(min_length=1, max_length=4096)):
        path = _video_path(uri, self.video_roots)
        if path.startswith("s3://"):
            fs = self._s3(path)
            return await asyncio.to_thread(_s3_video_response, path, fs, request.headers.get("range"))
        if not os.path.isfile(path):
            raise RequestError(404, "video_missing", f"{uri}: no such file")
        return FileResponse(path, media_type=video_media_type(path))

    def _s3(self, uri: str):
        return filesystem_for(uri, self.storage_options)[0]

    @api.post(
        "/v1/detect",
        summary="detect actions in a feature sequence [T, C]",
        response_model=DetectResponse,
        responses=_ERRORS,
        openapi_extra={
            "parameters": _QUERY_OPTIONS,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _JSON_FEATURES}, "application/x-npy": _NPY_BODY}},
        },
    )
    async def detect(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        self.arriving += 1
        try:
            seq, req, received, parsed = await self._read_features(request)
        finally:
            self.arriving -= 1
        result = await self._detect(seq, req.score_threshold, req.top_k, request_classes(req.classes, self.info))
        timing = {
            "receive_s": received - start,  # the body, from the client (direct ingress) or from Serve's proxy
            "parse_s": parsed - received,  # JSON / .npy -> checked FeatureSequence
            "detect_s": result["detect_s"],  # the model's forward + post-processing for the whole batch
            "total_s": time.perf_counter() - start,  # the rest: batching wait, the hop to the torch thread
        }
        return self._response(seq, result, timing)

    async def _read_features(self, request: Request) -> tuple[FeatureSequence, DetectFeaturesRequest, float, float]:
        """The checked sequence and options of a ``/v1/detect`` request, with the times its body was in and parsed."""
        kind = _content_type(request)
        if kind == "application/json":
            if request.query_params:
                raise RequestError(422, "invalid_request", "with a JSON body, give the options in the body, not the query string")
            body = await _read_limited(request, self.limits.max_body_bytes)
            received = time.perf_counter()
            req = parse_json_request(body, DetectFeaturesRequest)
        elif kind in NPY_CONTENT_TYPES:
            fields = options_from_query(request.query_params)
            body = await _read_limited(request, self.limits.max_body_bytes)
            received = time.perf_counter()
            req = features_request(parse_npy(body), fields)
        else:
            raise RequestError(
                415, "unsupported_media_type", f"content type {kind or 'none'!r}: send application/json or application/x-npy"
            )
        seq = to_sequence(req, self.info, self.limits)
        return seq, req, received, time.perf_counter()

    @api.post(
        "/v1/detect/video",
        summary="decode a video, featurize it with the model's backbone, detect actions",
        response_model=DetectResponse,
        responses={**_ERRORS, 501: {"model": ErrorResponse}},
        openapi_extra={
            "parameters": _QUERY_OPTIONS,
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {"type": "object", "properties": {"video": {"type": "string", "format": "binary"}}, "required": ["video"]}
                    },
                    "application/json": {"schema": DetectVideoRequest.model_json_schema()},
                },
            },
        },
    )
    async def detect_video(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        kind = _content_type(request)
        data, uri = None, None
        if kind == "application/json":
            if request.query_params:
                raise RequestError(422, "invalid_request", "with a JSON body, give the options in the body, not the query string")
            req = parse_json_request(await _read_limited(request, self.limits.max_body_bytes), DetectVideoRequest)
            uri = check_video_uri(req.uri, self.video_roots)
            options: DetectOptions = req
            video_id = req.video_id or os.path.splitext(os.path.basename(uri.rstrip("/")))[0] or "video"
        elif kind == "multipart/form-data":
            options = _options(options_from_query(request.query_params))
            data, filename = await _read_upload(request, self.limits.max_upload_bytes)
            video_id = options.video_id or os.path.splitext(os.path.basename(filename or ""))[0] or "video"
        elif kind.startswith("video/") or kind in NPY_CONTENT_TYPES[1:]:
            options = _options(options_from_query(request.query_params))
            data = await _read_limited(request, self.limits.max_upload_bytes)
            video_id = options.video_id or "video"
        else:
            raise RequestError(
                415,
                "unsupported_media_type",
                f"content type {kind or 'none'!r}: send multipart/form-data (field 'video'), video/*, or JSON {{\"uri\": ...}}",
            )
        if data is not None and not data:
            raise RequestError(422, "video_empty", "the uploaded video has 0 bytes")
        classes = request_classes(options.classes, self.info)
        received = time.perf_counter()
        features = await self.featurizer.featurize.remote(video_id, data=data, uri=uri)
        if not features["ok"]:
            raise RequestError(features["status"], features["error"], features["message"])
        seq: FeatureSequence = features["sequence"]
        if seq.features.shape[0] > self.limits.max_steps:
            raise RequestError(
                422,
                "sequence_too_long",
                f"the video gives {seq.features.shape[0]} feature steps; this server accepts at most {self.limits.max_steps}",
            )
        result = await self._detect(seq, options.score_threshold, options.top_k, classes)
        timing = {
            "receive_s": received - start,
            **features["timing"],
            "detect_s": result["detect_s"],
            "total_s": time.perf_counter() - start,
        }
        return self._response(seq, result, timing)

    @api.websocket("/v1/stream")
    async def stream(self, websocket: WebSocket) -> None:
        """Online detection over a WebSocket (protocol: ``jobs.stream_api``); the session lives in this replica."""
        await websocket.accept()
        await self.sessions.serve(self.stream_model, _WebSocketTransport(websocket))

    def _response(self, seq: FeatureSequence, result: dict[str, Any], timing: dict[str, float]) -> JSONResponse:
        return JSONResponse(
            {
                "video_id": seq.video_id,
                "detections": result["detections"],
                "duration": float(seq.duration),
                "num_steps": int(seq.features.shape[0]),
                "model": self.info.summary(),
                "timing": {**timing, "batch_size": result["batch_size"]},
            }
        )


# --- building and running the app ----------------------------------------------------------------


def resolve_args(
    config: str | None, given: Mapping[str, Any], overrides: Sequence[str], *, given_as: Mapping[str, str] | None = None
) -> ServeArgs:
    """Defaults < ``config`` (a Serve config file: its one application's ``args``; or a plain mapping of
    ``ServeArgs`` fields) < ``given`` (field -> value, None = not given) < ``overrides`` (``key=value``).
    Raises ``ValueError`` naming the file, the value's source (``given_as``: field -> e.g. ``--replicas``;
    default the field's name) or the key."""
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
    for name, value in given.items():
        if value is not None:
            data[name] = value
            source[name] = (given_as or {}).get(name, name)
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


def build_app(args: ServeArgs) -> serve.Application:
    """The Serve application for ``args`` (the import path ``jobs.serve:build_app``)."""
    if isinstance(args, dict):  # called directly with a dict rather than through Serve's typed-builder validation
        args = ServeArgs.model_validate(args)
    return _application(args, describe_model(args))


def _application(args: ServeArgs, info: ModelInfo) -> serve.Application:
    storage = _storage_options(args)
    threads = max(1, int(args.cpus_per_replica))
    resources = {"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica}
    use_gpu = args.gpus_per_replica > 0
    # every HTTP request in flight counts (a video one while it is featurized); 4 x max_batch_size at least, so a batch can fill;
    # an open /v1/stream WebSocket counts for its whole life: room for stream_max_sessions of them on top, so they never starve HTTP
    ongoing = max(64, 4 * args.max_batch_size) + args.stream_max_sessions
    detector_options: dict[str, Any] = {"ray_actor_options": resources, "max_ongoing_requests": ongoing}
    featurizer_options: dict[str, Any] = {"ray_actor_options": resources}
    if args.detector_replicas != 1:  # left unset otherwise, so a config file's autoscaling_config can apply
        detector_options["num_replicas"] = args.detector_replicas
    if args.featurizer_replicas != 1:
        featurizer_options["num_replicas"] = args.featurizer_replicas
    # local roots absolute, as the model's path: replicas run in another working folder (a relative root would name another place)
    roots = [r if "://" in r else str(Path(r).expanduser().resolve()) for r in args.video_roots]
    featurizer = VideoFeaturizer.options(**featurizer_options).bind(
        info.provenance, args.backbone_weights, storage, roots, threads, use_gpu
    )
    limits = Limits(int(args.max_body_mb * MB), int(args.max_upload_mb * MB), args.max_steps, args.max_batch_size, bool(args.video_roots))
    stream_limits = StreamLimits(
        args.stream_max_sessions, args.stream_idle_timeout_s, args.stream_max_session_s, int(args.stream_max_message_mb * MB)
    )
    return DetectorIngress.options(**detector_options).bind(
        featurizer, info, limits, roots, args.mlflow_uri, storage, args.batch_wait_timeout_s, threads, use_gpu, args.runtime,
        stream_limits, args.backbone_weights,
    )  # fmt: skip


def serve_env(port: int | None = None) -> dict[str, str]:
    """The environment of a Ray whose Serve ingress replicas listen for HTTP themselves (Ray's processes read it
    when they start; Ray 2.60, experimental there):

    - ``RAY_SERVE_ENABLE_DIRECT_INGRESS``: the Detector replica runs its own HTTP server; Serve's proxy still
      runs, on the head node, but requests sent to the replica's port skip it (an 18 MB body: 44 ms less);
    - ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``: the app's handlers run on the replica's own event loop,
      where that server is, so the body's chunks do not cross to a second loop (18 MB: ~8 ms less). A handler
      that blocks then blocks the replica's health checks too: the model runs on its ``TorchThread``;
    - a replica's port is free again as soon as it stops (no quarantine, 1 s of draining: nothing but clients
      is in front of it here). ``port``: the one port the replicas may take (one replica per node then);
      default Serve's range, 30000-30999.
    """
    env = {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }
    if port is not None:
        env |= {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port), "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1)}
    return env


def run_app(
    args: ServeArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    quiet: bool = False,
    info: ModelInfo | None = None,
    direct_ingress: bool = True,
) -> str:
    """Deploy the app on the Ray cluster this process is connected to, or a new local one, with HTTP on ``host``;
    returns its base URL once every replica is up. ``quiet``: warnings only, from the replicas (no access log)
    and from Serve in this process. ``info``: ``describe_model(args)`` if the caller has it already (it reads
    the whole checkpoint).

    ``direct_ingress`` and a local Ray that this call starts, with one Detector replica: the replica itself
    listens on ``port`` (``serve_env``) and Serve's proxy on a spare port. Otherwise Serve's proxy
    listens on ``port`` unless Serve runs already. The URL returned is the replica's own where the cluster
    has direct ingress on, else the proxy's."""
    import ray

    from pipelines.ray_runtime import owns_ray

    if direct_ingress and args.detector_replicas == 1 and not ray.is_initialized():
        for key, value in serve_env(port).items():
            os.environ.setdefault(key, value)  # read by the processes of a Ray started now; a cluster joined keeps its own
    init_ray()
    direct = owns_ray() and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"
    if quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": _free_port(host) if direct else port})
    logging_config = LoggingConfig(log_level="WARNING", enable_access_log=False) if quiet else None
    app = _application(args, info if info is not None else describe_model(args))
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=logging_config)
    return f"http://{host}:{_http_port(APP_NAME, direct)}"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _http_port(app_name: str, direct: bool) -> int:
    """The port that serves ``app_name`` over HTTP: its ingress replica's where Serve's direct ingress is on (waited
    for up to 10 s if ``direct``), else Serve's proxy's. Ray 2.60 says the replica's only in the controller's target
    groups (``ServeInstanceDetails.target_groups``)."""
    from ray.serve.context import _get_global_client

    deadline = time.monotonic() + (10.0 if direct else 0.0)
    while True:
        details = _get_global_client().get_serve_details()
        for group in details.get("target_groups") or []:
            if group.get("app_name") == app_name and group.get("protocol") == "HTTP":
                replicas = [t["port"] for t in group.get("targets", []) if str(t.get("name", "")).startswith("SERVE_REPLICA")]
                if replicas:
                    return int(replicas[0])
        if time.monotonic() >= deadline:
            return int(details["http_options"]["port"])
        time.sleep(0.2)
