"""The streaming protocol of ``/v1/stream`` (a WebSocket), without Ray: messages, limits, parsing, the session loop.

    client                                            server (one replica, one OnlineStream per connection)
    {"type": "open", "input": "features", ...}   ─►
                                                 ◄─   {"type": "opened", "session", "model", "input_dim", "labels", "timing",
                                                           "rule_overrides", "limits"}
    {"type": "features", "features": [[...]]}    ─►   push(steps) on the replica's torch thread
      or a binary .npy [n, C] / [C] float32
                                                 ◄─   {"type": "scores", "step", "time", "scores": [K]}   (options.scores)
                                                 ◄─   {"type": "event", "kind": "start"|"update"|"end", ...}  as they happen
    {"type": "close"}                            ─►   close(): the end events of every open instance
                                                 ◄─   {"type": "closed", "steps": n, "events": m}, then the socket closes (1000)

Connect to ``ws://HOST:PORT/v1/stream``. Every message the client sends is a JSON text message, except feature
steps as ``.npy`` bytes and encoded video chunks, which are binary.

Opening. The first message is ``{"type": "open", "model": NAME?, "input": "features" | "video", "options": {...}}``:

- ``model`` (optional): the name the client expects (the reference it was served as, the pinned reference,
  the registry name, ``NAME/VERSION``, ``models:/NAME/VERSION``); another one is an error ``model_mismatch``.
- ``input``: ``"features"`` (feature steps of the model's width C, as the model's backbone makes them) or
  ``"video"``: binary messages holding consecutive pieces of an MPEG-TS stream, split anywhere; the server
  decodes them as they come and featurizes with the checkpoint's own backbone and sampling (the features
  equal offline extraction's), then streams the steps. A chunk that breaks the packet structure (no sync
  byte where a 188-byte packet starts) is refused (``malformed_video``) and dropped: the stream goes on as
  if it never came. A stream FFmpeg cannot decode ends the video with ``malformed_video``; later chunks
  get ``video_ended``; ``close`` still sends the end events. On ``close`` the rest of the video is decoded
  and streamed before the end events.
- ``options.scores`` (bool, default false): also send every step's class probabilities (``scores`` messages).
- ``options.timing`` (feature input): ``{"fps", "stride", "window", "offset"}`` of the features, which sets the
  seconds of every step (centre of step i = offset + (i * stride + window / 2) / fps); default the checkpoint's.
  A sampling that differs from the checkpoint's is refused (``timing_mismatch``): the model only knows its own.
- ``options.rule``: overrides of the model's online event rule, ``{field: number}``; only the fields the model
  allows (its thresholds; the ``opened`` reply lists them as ``rule_overrides``).

Feature steps. ``{"type": "features", "features": [[...], ...] or [...], "timestamps": [...]?}`` or a binary
``.npy`` of ``[n, C]`` or ``[C]`` float32 (read with ``allow_pickle=False``). ``timestamps`` (seconds, one per
step, strictly increasing across the session) are the client's own clock for each step: they do not change the
stream's times, they are echoed as ``"timestamp"`` on the scores and events that step causes.

Server messages. ``event``: ``Event.to_dict(labels)`` (``kind``, ``instance``, ``label``, ``label_name``,
``start``, ``end`` (null until ``kind`` is ``end``), ``score``, ``time``, ``step``), in step order; ``scores``:
``{"step", "time", "scores": [K]}``, sent before the events of the same step; ``error``: ``{"code", "message"}``.

Errors. A bad message gets ``{"type": "error", "code": ..., "message": ...}`` and consumes nothing: the
session and the server go on (codes: ``malformed_json``, ``invalid_message``, ``unknown_type``, ``not_open``,
``already_open``, ``model_mismatch``, ``invalid_options``, ``timing_mismatch``, ``streaming_unsupported``,
``video_unsupported``, ``malformed_npy``, ``invalid_features``, ``wrong_feature_dim``, ``empty_features``,
``too_many_steps``, ``non_finite_features``, ``invalid_timestamps``, ``timestamps_out_of_order``,
``malformed_video``, ``video_ended``, ``payload_too_large``, ``wrong_input``). The server ends a session itself on:

- ``too_many_sessions``: the replica already holds ``max_sessions`` sessions; error, then close code 1013 (try again later);
- ``idle_timeout``: no message for ``idle_timeout_s``; the end events, the error, ``closed``, then close code 1008;
- ``session_expired``: the session is older than ``max_session_s``; the same.
- ``internal``: a bug in the server; the error, then close code 1011 (the replica and its other sessions go on).

Sticky routing. A WebSocket is one HTTP connection upgraded, and Serve hands it to one replica for its
whole life: the session's state (the ``OnlineStream``) lives in that replica's memory and never moves.
Two sessions share nothing but the replica's torch thread. A replica that dies takes its sessions with it:
their clients see the connection drop; every event sent before is the client's (``jobs.stream_client``
writes each to its file as it arrives), and a new session goes to a live replica.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.serve_api import ModelInfo, RequestError, parse_npy
from tal_models.timing import FeatureTiming

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008  # idle or expired: the server's limits ended the session
CLOSE_TRY_AGAIN = 1013  # too many sessions on this replica
CLOSE_INTERNAL = 1011  # a bug: the session cannot go on


@dataclass(frozen=True)
class StreamLimits:
    """What one replica accepts on ``/v1/stream`` (the ``opened`` reply reports them).

    ``max_message_bytes`` must stay below the WebSocket server's own frame limit (uvicorn: 16 MiB), above
    which the server closes the connection (1009) instead of answering ``payload_too_large``.
    """

    max_sessions: int = 16
    idle_timeout_s: float = 60.0
    max_session_s: float = 4 * 3600.0
    max_message_bytes: int = 8 * 2**20
    max_steps_per_message: int = 4096

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_steps_per_message < 1 or self.max_message_bytes < 1:
            raise ValueError(f"StreamLimits: max_sessions, max_message_bytes and max_steps_per_message must be >= 1, got {self}")
        if not (self.idle_timeout_s > 0 and self.max_session_s > 0):
            raise ValueError(f"StreamLimits: idle_timeout_s and max_session_s must be > 0, got {self}")


class StreamError(Exception):
    """A message the session refuses (``code``, ``message``); the session goes on unless the server ends it."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message

    def to_message(self) -> dict[str, Any]:
        return error_message(self.code, self.message)


def error_message(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def to_json(message: dict[str, Any]) -> str:
    """A server message as JSON text (NumPy scalars and arrays as numbers and lists)."""
    return json.dumps(message, default=_plain)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# --- client messages ---------------------------------------------------------------------------


class TimingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fps: float | None = Field(None, gt=0, description="clip sampling rate, frames/s")
    stride: int | None = Field(None, ge=1, description="sampled frames between clip starts")
    window: int | None = Field(None, ge=1, description="sampled frames per clip")
    offset: float = Field(0.0, description="seconds added to every step time")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scores: bool = False
    timing: TimingOptions | None = None
    rule: dict[str, float] = Field(default_factory=dict, description="event-rule overrides the model allows")


class OpenMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["open"]
    model: str | None = Field(None, max_length=1024)
    input: Literal["features", "video"] = "features"
    options: StreamOptions = Field(default_factory=StreamOptions)


def parse_text(text: str) -> dict[str, Any]:
    """A text message -> its JSON object (with a string ``type``)."""
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise StreamError("malformed_json", f"the message is not valid JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise StreamError("invalid_message", 'a text message must be a JSON object with a "type" ("open", "features" or "close")')
    return message


def parse_open(message: dict[str, Any]) -> OpenMessage:
    try:
        return OpenMessage.model_validate(message)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "open"
        raise StreamError("invalid_options", f"open: {where}: {first['msg']}") from None


def features_from_json(message: dict[str, Any]) -> tuple[Any, Any]:
    """A ``features`` message -> (its raw features, its timestamps or None), before any check."""
    unknown = sorted(set(message) - {"type", "features", "timestamps"})
    if unknown:
        raise StreamError("invalid_message", f"features: unknown fields {unknown}; known: features, timestamps")
    if "features" not in message:
        raise StreamError("invalid_message", 'features: the message needs "features": [[...], ...] (steps x channels)')
    return message["features"], message.get("timestamps")


def features_from_npy(data: bytes) -> np.ndarray:
    try:
        return parse_npy(data)
    except RequestError as e:
        raise StreamError(e.code, e.message) from None


def check_features(raw: Any, input_dim: int, max_steps: int) -> np.ndarray:
    """Features as sent (nested lists or an array; ``[n, C]`` or one step ``[C]``) -> float32 ``[n, C]``, checked."""
    try:
        features = np.asarray(raw, dtype=np.float32)
    except (ValueError, TypeError):
        raise StreamError("invalid_features", f"features must be a rectangular array of numbers [n, {input_dim}]") from None
    if features.size == 0:
        raise StreamError("empty_features", "features have 0 steps; send at least one")
    if features.ndim == 1:
        features = features[None]
    if features.ndim != 2:
        raise StreamError(
            "invalid_features", f"features must be [n, {input_dim}] or one step [{input_dim}]; got shape {list(features.shape)}"
        )
    steps, dim = features.shape
    if dim != input_dim:
        raise StreamError("wrong_feature_dim", f"features have {dim} channels; the model takes {input_dim}: shape must be [n, {input_dim}]")
    if steps > max_steps:
        raise StreamError("too_many_steps", f"{steps} steps in one message; this server takes at most {max_steps} per message")
    finite = np.isfinite(features)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        raise StreamError(
            "non_finite_features", f"features contain NaN or infinity (first at step {bad[0]} of the message, channel {bad[1]})"
        )
    features = np.ascontiguousarray(features)
    # an .npy message is a read-only view of its bytes, which torch cannot wrap: a copy (one message's worth)
    return features if features.flags.writeable else features.copy()


def check_timestamps(raw: Any, steps: int, after: float | None) -> np.ndarray | None:
    """Client timestamps of ``steps`` steps -> float64 ``[steps]``: finite, strictly increasing, all after ``after``."""
    if raw is None:
        return None
    try:
        ts = np.asarray(raw, dtype=np.float64)
    except (ValueError, TypeError):
        raise StreamError("invalid_timestamps", "timestamps must be a list of numbers (seconds)") from None
    if ts.shape != (steps,):
        raise StreamError("invalid_timestamps", f"timestamps has shape {list(ts.shape)} for {steps} feature steps")
    if not np.isfinite(ts).all():
        raise StreamError("invalid_timestamps", "timestamps contain NaN or infinity")
    if (np.diff(ts) <= 0).any() or (after is not None and ts[0] <= after):
        last = "" if after is None else f" (the last step so far: {after})"
        raise StreamError("timestamps_out_of_order", f"timestamps must increase strictly across the session{last}")
    return ts


def resolve_timing(given: TimingOptions | None, trained: FeatureTiming | None) -> FeatureTiming | None:
    """The session's timing: the checkpoint's unless the client gives one (which must agree with it); None: steps."""
    if given is None:
        return trained
    values = {k: getattr(given, k) for k in ("fps", "stride", "window") if getattr(given, k) is not None}
    if trained is None and len(values) < 3:
        raise StreamError("invalid_options", "the model records no sampling: give fps, stride and window in options.timing")
    if trained is not None:
        diffs = [f"{k} {v} (model: {getattr(trained, k)})" for k, v in values.items() if abs(float(v) - float(getattr(trained, k))) > 1e-9]
        if diffs:
            raise StreamError("timing_mismatch", "the features are sampled differently from the model's: " + ", ".join(diffs))
        values = {"fps": trained.fps, "stride": trained.stride, "window": trained.window, **values}
    try:
        return FeatureTiming(float(values["fps"]), int(values["stride"]), int(values["window"]), float(given.offset))
    except ValueError as e:
        raise StreamError("invalid_options", str(e)) from None


# --- what the session needs from the server ------------------------------------------------------


class Transport(Protocol):
    """One WebSocket, seen by the session. ``receive`` raises ``Disconnected`` once the client is gone."""

    async def receive(self) -> str | bytes: ...

    async def send(self, message: dict[str, Any]) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class Disconnected(Exception):
    """The client closed the connection or it dropped."""


class VideoInput(Protocol):
    """Encoded chunks in, feature steps out (the checkpoint's backbone), built by ``StreamModel.new_video(deliver)``
    (``jobs.serve``). It decodes and featurizes in the background and hands each batch of new steps to
    ``deliver`` (from any thread): a float32 ``[n, C]`` array, then ``None`` at the end of the stream, or a
    ``StreamError`` if the stream cannot be decoded (then nothing more)."""

    def feed(self, data: bytes) -> None: ...  # never blocks; StreamError for a chunk it refuses (then nothing of it is fed)

    def finish(self) -> None: ...  # the stream has ended: decode the rest, deliver the last steps, then None

    def close(self) -> None: ...  # stop now (the client went)


class MpegTsChecker:
    """Refuses a chunk that would break an MPEG-TS byte stream (every 188-byte packet starts with the sync byte
    0x47), before it is fed: a wrong chunk is reported and dropped, and the stream decodes on as if it never came.
    Chunks may split packets anywhere; the check follows the packet boundaries across chunks."""

    PACKET, SYNC = 188, 0x47

    def __init__(self) -> None:
        self.fed = 0  # bytes accepted so far

    def check(self, data: bytes) -> None:
        if not data:
            raise StreamError("malformed_video", "an empty video chunk")
        syncs = data[(-self.fed) % self.PACKET :: self.PACKET]  # the bytes of data that start a packet
        if syncs.count(self.SYNC) != len(syncs):
            where = self.fed + (-self.fed) % self.PACKET + self.PACKET * next(i for i, b in enumerate(syncs) if b != self.SYNC)
            raise StreamError(
                "malformed_video",
                f"the chunk is not the next piece of an MPEG-TS stream (no sync byte 0x47 at stream byte {where:,}); it was dropped",
            )
        self.fed += len(data)


@dataclass
class StreamModel:
    """The served model, as ``/v1/stream`` needs it.

    ``new_stream(timing, rule, keep_scores)`` -> an ``OnlineStream`` (``timing``: None = the stream's own); raises
    ``StreamError`` for a rule override the model does not allow. ``run(fn, *args)`` runs ``fn`` where the
    model's torch calls run (the replica's torch thread) and is awaited. ``new_video(deliver)`` builds a ``VideoInput``
    for a session with video input (None: the server cannot featurize videos, ``video_unsupported``).
    """

    labels: list[str]
    input_dim: int
    summary: dict[str, Any]
    names: set[str]
    timing: FeatureTiming | None
    new_stream: Callable[[FeatureTiming | None, dict[str, float], bool], Any]
    run: Callable[..., Awaitable[Any]]
    rule_overrides: list[str] = field(default_factory=list)
    new_video: Callable[[Callable[[Any], None]], VideoInput] | None = None
    unsupported: str | None = None  # why this model cannot stream at all (an offline checkpoint)


def model_names(summary: dict[str, Any]) -> set[str]:
    """The names an ``open`` may check the served model against (``ModelInfo.summary()`` -> names)."""
    names = {str(summary[k]) for k in ("reference", "pinned") if summary.get(k)}
    if "name" in summary:
        names.add(str(summary["name"]))
        if "version" in summary:
            names |= {f"{summary['name']}/{summary['version']}", f"models:/{summary['name']}/{summary['version']}"}
        if "alias" in summary:
            names.add(f"models:/{summary['name']}@{summary['alias']}")
    return names


# --- the served model and its video input ------------------------------------------------------------


def stream_model(model, info: ModelInfo, executor: concurrent.futures.Executor, new_video=None) -> StreamModel:
    """What ``/v1/stream`` needs of a replica's model (``info``: ``jobs.serve_api.ModelInfo``): its streams,
    made and pushed on ``executor`` (the replica's torch thread). A model without ``stream()`` (an offline
    detector) answers every ``open`` with ``streaming_unsupported``."""

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    unsupported = None
    if not callable(getattr(model, "stream", None)):
        unsupported = f"{info.arch} is an offline detector: /v1/stream needs an online checkpoint (family online)"
    inference = getattr(getattr(model, "config", None), "inference", None)
    rule_config = getattr(inference, "rule", None)  # an OnlineDetector's EventRuleConfig
    overridable = sorted(f.name for f in dataclasses.fields(rule_config) if f.name.endswith("threshold")) if rule_config else []

    def new_stream(timing, overrides: dict[str, float], keep_scores: bool):
        rule = None
        if overrides:
            try:
                rule = dataclasses.replace(rule_config, **overrides)
            except (TypeError, ValueError) as e:
                raise StreamError("invalid_options", f"options.rule: {e}") from None
        return model.stream(timing=timing, rule=rule, keep_scores=keep_scores)

    return StreamModel(
        labels=list(info.labels),
        input_dim=info.input_dim,
        summary=info.summary(),
        names=model_names(info.summary()),
        timing=info.timing,
        new_stream=new_stream,
        run=run,
        rule_overrides=overridable,
        new_video=new_video,
        unsupported=unsupported,
    )


def video_inputs(
    provenance: dict[str, Any],
    device: str,
    weights: str | None,
    storage_options: dict[str, Any],
    num_threads: int,
    run: Callable[..., Any],
) -> Callable[[Callable[[Any], None]], VideoInput]:
    """``StreamModel.new_video`` for MPEG-TS input: the checkpoint's backbone (``provenance``) is built at the
    replica's first video session (on the thread that calls it: the torch thread) and shared by the next
    ones; ``run(fn, *args)`` runs ``fn`` on that thread and waits. A backbone that cannot be built (features
    imported from elsewhere, weights missing) makes ``video_unsupported``; feature input is unaffected."""
    built: dict[str, Any] = {}

    def new_video(deliver: Callable[[Any], None]) -> MpegTsVideoInput:
        from pipelines.extract import build_featurizer  # torchvision, OpenCV: only once a video comes

        if "featurizer" not in built:
            try:
                built["featurizer"] = build_featurizer(
                    provenance, device, weights=weights, storage_options=storage_options, num_threads=num_threads
                )
            except Exception as e:  # noqa: BLE001 - many ways for a backbone not to build; reported at each video open
                built["featurizer"] = e
        featurizer = built["featurizer"]
        if isinstance(featurizer, Exception):
            reason = f"{type(featurizer).__name__}: {featurizer}"
            raise StreamError("video_unsupported", f"this model cannot featurize videos ({reason}): send feature steps")
        return MpegTsVideoInput(*featurizer, run, deliver)

    return new_video


class MpegTsVideoInput:
    """``VideoInput`` for MPEG-TS chunks: ``pipelines.live.ChunkSource`` (decoding in its own thread) ->
    ``IncrementalFeaturizer`` (the checkpoint's backbone, through ``run``: the replica's torch thread) ->
    ``deliver``. A thread of its own waits for the decoded frames, so the replica's event loop never does."""

    def __init__(self, backbone, sampling, run: Callable[..., Any], deliver: Callable[[Any], None]):
        from pipelines.live import ChunkSource, IncrementalFeaturizer  # PyAV, OpenCV: only where videos come

        self.featurizer = IncrementalFeaturizer.from_parts(backbone, sampling)
        self.source = ChunkSource(name="the video stream", format="mpegts", resize=self.featurizer.decode_size)
        self.checker = MpegTsChecker()
        self.run, self.deliver = run, deliver
        self.thread = threading.Thread(target=self._decode, name="tal-stream-video", daemon=True)
        self.thread.start()

    def feed(self, data: bytes) -> None:
        from pipelines.live import SourceError

        self.checker.check(data)
        try:
            self.source.feed(data)
        except SourceError as e:
            raise StreamError("video_ended", str(e)) from None

    def finish(self) -> None:
        self.source.finish()

    def close(self) -> None:
        self.source.close()

    def _deliver_steps(self, steps) -> None:
        if steps:
            self.deliver(np.stack([s.feature for s in steps]).astype(np.float32, copy=False))  # [n, C]

    def _decode(self) -> None:
        from pipelines.live import SourceError

        try:
            for frame in self.source:
                self._deliver_steps(self.run(self.featurizer.push, frame.pts, frame.image, frame.arrival))
            self._deliver_steps(self.run(self.featurizer.finish, getattr(self.source, "end", None)))
            self.deliver(None)
        except SourceError as e:
            self.deliver(StreamError("malformed_video", f"the video stream cannot be decoded: {e}"))
        except Exception as e:  # noqa: BLE001 - reported to the session, the replica goes on
            self.deliver(StreamError("malformed_video", f"the video stream cannot be featurized ({type(e).__name__}: {str(e)[:300]})"))


# --- one session ----------------------------------------------------------------------------------


class StreamSession:
    """One ``/v1/stream`` connection: its ``OnlineStream``, read and answered message by message (``run``).

    Messages are handled one at a time, in order; a model call runs on ``model.run`` and is awaited before
    the next message is read, so the client's sends queue in the socket while the model works.
    """

    def __init__(self, model: StreamModel, limits: StreamLimits, transport: Transport, clock: Callable[[], float] = time.monotonic):
        self.model, self.limits, self.transport, self.clock = model, limits, transport, clock
        self.id = uuid.uuid4().hex[:16]
        self.stream = None
        self.video: VideoInput | None = None
        self.video_task: asyncio.Task | None = None  # pushes the video's steps as they are made
        self.scores_on = False
        self.events_sent = 0
        self.last_timestamp: float | None = None
        self.started = clock()

    async def run(self) -> str:
        """Serve the connection until it ends; returns why (``closed``, ``disconnected``, ``idle_timeout``, ``session_expired``)."""
        while True:
            idle = self.limits.idle_timeout_s
            left = self.started + self.limits.max_session_s - self.clock()
            try:
                data = await asyncio.wait_for(self.transport.receive(), timeout=max(0.0, min(idle, left)))
            except TimeoutError:
                expired = self.clock() >= self.started + self.limits.max_session_s
                code = "session_expired" if expired else "idle_timeout"
                why = f"the session reached its {self.limits.max_session_s:g} s limit" if expired else f"no message for {idle:g} s"
                await self._finish(error_message(code, f"{why}: the stream was closed (its end events sent)"), CLOSE_POLICY, code)
                return code
            except Disconnected:
                return "disconnected"
            try:
                if await self._handle(data):
                    return "closed"
            except StreamError as e:
                await self.transport.send(e.to_message())

    def stop(self) -> None:
        """Release what the session holds outside this loop (its video decoding thread)."""
        if self.video is not None:  # in a thread: closing waits for the decoder to let go
            threading.Thread(target=self.video.close, name="tal-stream-video-close", daemon=True).start()
        if self.video_task is not None:
            self.video_task.cancel()

    async def _handle(self, data: str | bytes) -> bool:
        """One client message; True once the session is closed."""
        if len(data) > self.limits.max_message_bytes or (isinstance(data, str) and len(data.encode()) > self.limits.max_message_bytes):
            raise StreamError(
                "payload_too_large", f"the message exceeds {self.limits.max_message_bytes:,} bytes, the most this server takes"
            )
        if isinstance(data, bytes):
            if self.stream is None:
                raise StreamError("not_open", 'send {"type": "open", ...} first')
            if self.video is not None:
                if self.video_task.done():
                    raise StreamError("video_ended", "the video stream ended (see the error before): close the session")
                self.video.feed(data)
            else:
                await self._push(features_from_npy(data), None)
            return False
        message = parse_text(data)
        match message["type"]:
            case "open":
                await self._open(parse_open(message))
            case "features":
                if self.stream is None:
                    raise StreamError("not_open", 'send {"type": "open", ...} first')
                if self.video is not None:
                    raise StreamError("wrong_input", "this session's input is video: send the encoded stream as binary messages")
                raw, timestamps = features_from_json(message)
                await self._push(raw, timestamps)
            case "close":
                await self._finish(None, CLOSE_NORMAL, "closed")
                return True
            case other:
                raise StreamError("unknown_type", f"unknown message type {other[:40]!r}; known: open, features, close")
        return False

    async def _open(self, request: OpenMessage) -> None:
        model = self.model
        if self.stream is not None:
            raise StreamError("already_open", f"session {self.id} is open already")
        if model.unsupported is not None:
            raise StreamError("streaming_unsupported", model.unsupported)
        if request.model is not None and request.model not in model.names:
            raise StreamError("model_mismatch", f"this server serves {model.summary.get('reference')!r}, not {request.model!r}")
        unknown = sorted(set(request.options.rule) - set(model.rule_overrides))
        if unknown:
            raise StreamError("invalid_options", f"options.rule: {unknown} cannot be overridden; allowed: {model.rule_overrides}")
        if any(not math.isfinite(v) for v in request.options.rule.values()):
            raise StreamError("invalid_options", "options.rule: values must be finite numbers")
        if request.input == "video":
            if model.new_video is None:
                raise StreamError("video_unsupported", "this server cannot featurize video for this model: send feature steps")
            if request.options.timing is not None:
                raise StreamError("invalid_options", "options.timing is for feature input; video is sampled as the model's features were")
            timing = model.timing
        else:
            timing = resolve_timing(request.options.timing, model.timing)
        stream = await model.run(model.new_stream, timing, dict(request.options.rule), request.options.scores)
        if request.input == "video":
            steps: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            self.video = await model.run(model.new_video, lambda item: loop.call_soon_threadsafe(steps.put_nowait, item))
            self.video_task = asyncio.create_task(self._push_video(steps))
        self.stream, self.scores_on = stream, request.options.scores
        await self.transport.send(
            {
                "type": "opened",
                "session": self.id,
                "model": model.summary,
                "input": request.input,
                "input_dim": model.input_dim,
                "labels": model.labels,
                "timing": None if timing is None else dataclasses.asdict(timing),
                "rule_overrides": model.rule_overrides,
                "limits": dataclasses.asdict(self.limits),
            }
        )

    async def _push(self, raw: Any, raw_timestamps: Any, max_steps: int | None = None) -> None:
        features = check_features(raw, self.model.input_dim, max_steps or self.limits.max_steps_per_message)
        timestamps = check_timestamps(raw_timestamps, len(features), self.last_timestamp)
        first = self.stream.steps
        try:
            events, scores, times = await self.model.run(self._push_on_model_thread, features)
        except ValueError as e:  # the stream's own check: it consumed nothing
            raise StreamError("invalid_features", str(e)) from None
        if timestamps is not None:
            self.last_timestamp = float(timestamps[-1])
        await self._send_results(first, events, scores, times, timestamps)

    def _push_on_model_thread(self, features: np.ndarray):
        """push, then the new steps' scores and times, in one trip to the model's thread."""
        first = self.stream.steps
        events = self.stream.push(features)
        steps = range(first, self.stream.steps)
        scores = self.stream.scores(first) if self.scores_on else None
        return events, scores, [self.stream.time_of(i) for i in steps]

    async def _push_video(self, steps: asyncio.Queue) -> None:
        """The video's feature steps into the stream as they are made, until its end (or its error)."""
        while (item := await steps.get()) is not None:
            if isinstance(item, StreamError):
                await self.transport.send(item.to_message())
                return
            try:
                await self._push(item, None, max_steps=len(item))
            except StreamError as e:
                await self.transport.send(e.to_message())

    async def _send_results(self, first: int, events: Sequence, scores, times: list[float], timestamps: np.ndarray | None) -> None:
        by_step: dict[int, list] = {}
        for event in events:
            by_step.setdefault(event.step, []).append(event)
        for i, t in enumerate(times):
            step = first + i
            stamp = {} if timestamps is None else {"timestamp": float(timestamps[i])}
            if scores is not None:
                await self.transport.send({"type": "scores", "step": step, "time": float(t), "scores": scores[i].tolist(), **stamp})
            for event in by_step.pop(step, []):
                await self._send_event(event, stamp)
        for leftover in by_step.values():  # an event of a step outside this push (a rule may report late): still sent, in order
            for event in leftover:
                await self._send_event(event, {})

    async def _send_event(self, event, extra: dict[str, Any]) -> None:
        await self.transport.send({"type": "event", **event.to_dict(self.model.labels), **extra})
        self.events_sent += 1

    async def _finish(self, error: dict[str, Any] | None, code: int, reason: str) -> None:
        """The end of the session: the remaining steps and end events, ``error`` if any, ``closed``, then close."""
        if self.stream is not None:
            if self.video is not None:  # the rest of the video first: decoded, featurized, pushed
                self.video.finish()
                await self.video_task
            for event in await self.model.run(self.stream.close):
                await self._send_event(event, {})
        if error is not None:
            await self.transport.send(error)
        steps = 0 if self.stream is None else self.stream.steps
        await self.transport.send({"type": "closed", "session": self.id, "steps": steps, "events": self.events_sent, "reason": reason})
        await self.transport.close(code, reason)


class StreamSessions:
    """The sessions of one replica, at most ``limits.max_sessions`` at a time."""

    def __init__(self, limits: StreamLimits):
        self.limits = limits
        self.active: dict[str, StreamSession] = {}

    async def serve(self, model: StreamModel, transport: Transport) -> str:
        """Run one connection (accepted already) to its end; returns why it ended (``too_many_sessions``, or ``StreamSession.run``'s)."""
        if len(self.active) >= self.limits.max_sessions:
            message = f"this replica holds {self.limits.max_sessions} sessions, its limit: try again later"
            await transport.send(error_message("too_many_sessions", message))
            await transport.close(CLOSE_TRY_AGAIN, "too_many_sessions")
            return "too_many_sessions"
        session = StreamSession(model, self.limits, transport)
        self.active[session.id] = session
        try:
            return await session.run()
        except Disconnected:  # gone while the server was sending
            return "disconnected"
        except Exception as e:  # a bug: say so to the client (the replica and its other sessions go on)
            try:
                await transport.send(error_message("internal", f"{type(e).__name__}: {str(e)[:300]}"))
                await transport.close(CLOSE_INTERNAL, "internal")
            except Disconnected:
                pass
            raise
        finally:
            del self.active[session.id]
            session.stop()
