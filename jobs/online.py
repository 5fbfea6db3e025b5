"""``tal detect --online``: an online checkpoint on a live source, its events printed and written as they happen.

    --model -> checkpoint (family "online", else refused) -> its featurizer, from its provenance (the backbone,
            weights sha256 and sampling of ``tal extract``; refused for imported features)
    SOURCE  -> frames (``pipelines.live``: a file at its own pace or as fast as it decodes, a growing file, a URL)
            -> IncrementalFeaturizer.push -> each feature step -> OnlineStream.push -> events
       or   -> a feature sequence (``.npy`` [T, C], or ``STORE#video_id`` of a feature store) fed step by step
            -> OnlineStream.push -> events
    each event: one line on stdout and one JSON line in ``--out`` (``Event.to_dict(labels)``, flushed per line);
    at the end of the source (or Ctrl-C) ``stream.close()`` ends the open instances, and the delay of every step
    (from the arrival of its last frame, or its release for features, to its scores) is summarised: p50/p90/p99.

``detect_online(source, model, **options) -> dict`` is the same run as a function (the benchmark's entry point).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from jobs.errors import UsageError

FEATURE_SUFFIXES = (".npy",)


@dataclass(frozen=True)
class OnlineDetectRequest:
    source: str  # a video file, a growing file (with idle_timeout), a URL, a .npy of features, or STORE#video_id
    model: str  # models:/name@alias, models:/name/N, runs:/<id>/path, a path or an s3:// URI: an online checkpoint
    out: Path = Path("events.jsonl")  # the events, one JSON object per line (appended: several runs can share it)
    realtime: bool = False  # a file (video or features) at its own pace; False: as fast as it is computed
    speed: float = 1.0  # with realtime: 2.0 plays twice as fast
    device: str | None = None  # backbone and detector; None: cuda when available
    backbone_weights: str | None = None  # None: where the extraction read them
    storage_options: dict[str, Any] | None = None
    idle_timeout: float | None = None  # SOURCE is a file still being written: it ends after this long without growth
    open_timeout: float = 10.0  # a URL: seconds to connect and read its headers
    print_events: bool = True  # one line per event on stdout


@dataclass
class OnlineReport:
    source: str
    model: str
    out: Path
    steps: int = 0
    events: int = 0
    instances: int = 0  # end events (closed instances)
    frames: int = 0  # decoded frames (0 for a feature source)
    seconds: float = 0.0
    stream_seconds: float = 0.0  # the source's time covered (the last step's centre)
    delays: list[float] = field(default_factory=list, repr=False)  # per step, seconds
    stopped: str = "end"  # "end" of the source, "interrupted" (Ctrl-C), or the source's error
    featurizer: str = ""

    def delay_percentiles(self) -> dict[str, float | None]:
        """Per-step delay (ms) from the arrival of a step's last frame to its scores: p50, p90, p99 (None without steps)."""
        if not self.delays:
            return {"p50": None, "p90": None, "p99": None}
        p50, p90, p99 = np.percentile(np.asarray(self.delays) * 1e3, [50, 90, 99])
        return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model": self.model,
            "out": str(self.out),
            "steps": self.steps,
            "events": self.events,
            "instances": self.instances,
            "frames": self.frames,
            "seconds": self.seconds,
            "stream_seconds": self.stream_seconds,
            "delay_ms": self.delay_percentiles(),
            "stopped": self.stopped,
            "featurizer": self.featurizer,
        }

    def format(self) -> str:
        d = self.delay_percentiles()
        delay = "no steps" if d["p50"] is None else f"p50 {d['p50']:.1f} ms, p90 {d['p90']:.1f} ms, p99 {d['p99']:.1f} ms"
        lines = [
            f"source         {self.source} ({'stopped: ' + self.stopped if self.stopped != 'end' else 'to its end'})",
            f"model          {self.model}" + (f"; featurizer {self.featurizer}" if self.featurizer else ""),
            f"stream         {self.steps} steps ({self.stream_seconds:.1f} s of stream"
            + (f", {self.frames} frames" if self.frames else "")
            + f") in {self.seconds:.1f} s",
            f"events         {self.events} ({self.instances} instances ended) -> {self.out}",
            f"step delay     {delay} (last frame's arrival -> scores)",
        ]
        return "\n".join(lines)

    @property
    def exit_code(self) -> int:
        return 0 if self.stopped in ("end", "interrupted") else 3


def detect_online(source: str, model: str, **options: Any) -> dict[str, Any]:
    """Run ``model`` on ``source`` (``OnlineDetectRequest``'s fields as keywords) -> ``OnlineReport.to_dict()``:
    counts, ``delay_ms`` {p50, p90, p99} and how the source stopped."""
    return run(OnlineDetectRequest(source=source, model=model, **options)).to_dict()


def run(request: OnlineDetectRequest) -> OnlineReport:
    """The run (module docstring). Refused before any frame (``UsageError``): a checkpoint that cannot be read or is
    not an online one, a video source for a model without a featurizer, a source that cannot be opened."""
    import torch

    from jobs.detect import _device

    if not (math.isfinite(request.speed) and request.speed > 0):
        raise UsageError(f"--speed must be a positive factor of real time, got {request.speed}")
    device = _device(request.device)
    checkpoint = _open_online_model(request)
    model = checkpoint.build(device).eval()
    labels = list(checkpoint.labels)
    report = OnlineReport(source=request.source, model=request.model, out=request.out)
    if _is_features(request.source):
        steps, timing, close = _feature_steps(request, checkpoint)
    else:
        steps, timing, close, report.featurizer = _video_steps(request, checkpoint, device, report)
    stream = model.stream(timing=timing, keep_scores=False)
    request.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(request.out, "a", encoding="utf-8") as out, torch.inference_mode():
        try:
            for index, feature, arrival in steps:
                events = stream.push(feature)
                report.delays.append(time.monotonic() - arrival)
                report.steps = index + 1
                _emit(events, labels, out, report, request.print_events)
        except KeyboardInterrupt:
            report.stopped = "interrupted"
        except _SourceFailed as e:
            report.stopped = str(e)
            print(f"tal detect --online: the source failed: {e}", file=sys.stderr)
        finally:
            close()
            _emit(stream.close(), labels, out, report, request.print_events)
    report.seconds = time.perf_counter() - started
    report.stream_seconds = stream.time_of(report.steps - 1) if report.steps else 0.0
    return report


class _SourceFailed(Exception):
    """The source broke part-way (its ``SourceError``): the events so far stand, the open instances are ended."""


def _open_online_model(request: OnlineDetectRequest):
    from jobs.inference import load_model

    try:
        checkpoint, _ = load_model(request.model, request.storage_options)
    except FileNotFoundError as e:
        raise UsageError(f"--model {request.model}: no such checkpoint file {e.filename or request.model}") from None
    except ValueError as e:  # CheckpointError, registry errors
        raise UsageError(f"--model {request.model}: {e}") from None
    if checkpoint.config.family != "online":
        raise UsageError(
            f"--model {request.model} is a {checkpoint.config.arch} detector (family {checkpoint.config.family}), not an online one: "
            "--online needs a causal model (config family online, e.g. the demo-online or thumos14-online preset); "
            "run an offline model without --online"
        )
    return checkpoint


def _is_features(source: str) -> bool:
    """A ``.npy`` file, or ``STORE#video_id`` (a local or s3:// feature store; a network URL's ``#`` is its own)."""
    from pipelines.live import NETWORK_SCHEMES

    if source.lower().endswith(FEATURE_SUFFIXES):
        return True
    head = source.split("#", 1)[0]
    return "#" in source and not (head.split("://", 1)[0].lower() in NETWORK_SCHEMES and "://" in head)


StepIter = Iterator[tuple[int, np.ndarray, float]]


def _feature_steps(request: OnlineDetectRequest, checkpoint):
    """A feature sequence's steps, released at the model's step rate (``realtime``) or at once: (steps, timing, close)."""
    from tal_models.timing import STEP_TIMING, FeatureTiming

    if "#" in request.source and not request.source.lower().endswith(FEATURE_SUFFIXES):
        store_uri, video_id = request.source.rsplit("#", 1)
        features, timing = _store_video(store_uri, video_id, request)
    else:
        try:
            features = np.load(request.source, allow_pickle=False)
        except FileNotFoundError:
            raise UsageError(f"{request.source}: no such feature file") from None
        except ValueError as e:
            raise UsageError(f"{request.source}: not a NumPy array file ({e})") from None
        prov = checkpoint.provenance
        fps = float(prov.get("fps") or 0.0)
        timing = (
            FeatureTiming(fps, int(prov["stride"]), int(prov["window"]))
            if fps > 0 and prov.get("stride") and prov.get("window")
            else STEP_TIMING
        )
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != checkpoint.config.input_dim:
        raise UsageError(
            f"{request.source}: features must be [T, {checkpoint.config.input_dim}] for this model, got {list(features.shape)}"
        )
    if not np.isfinite(features).all():
        raise UsageError(f"{request.source}: the features hold NaN or infinite values")
    features = np.array(features, dtype=np.float32)  # a writable copy: a store's arrays are read-only Arrow views
    period = timing.seconds_per_step / request.speed if request.realtime else 0.0

    def steps() -> StepIter:
        start = time.monotonic()
        for i, row in enumerate(features):
            due = start + i * period
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            yield i, row, max(time.monotonic(), due)

    return steps(), timing, lambda: None


def _store_video(store_uri: str, video_id: str, request: OnlineDetectRequest):
    from pipelines.store import FeatureStore

    try:
        store = FeatureStore(store_uri, options=request.storage_options)
        sequence = store.read_videos([video_id])[video_id]
    except KeyError:
        raise UsageError(f"{store_uri} holds no video {video_id!r}") from None
    except (OSError, ValueError) as e:
        raise UsageError(
            f"{store_uri}: cannot read video {video_id!r} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    return np.asarray(sequence.features), sequence.timing


def _video_steps(request: OnlineDetectRequest, checkpoint, device: str, report: OnlineReport):
    """A video source's feature steps as its frames come: (steps, timing, close, the featurizer in one line)."""
    from pipelines.extract import FeaturizerUnavailable
    from pipelines.live import IncrementalFeaturizer, SourceError, open_source
    from pipelines.weights import WeightsNotFoundError

    try:
        featurizer = IncrementalFeaturizer(
            checkpoint.provenance, device, weights=request.backbone_weights, storage_options=request.storage_options
        )
    except (FeaturizerUnavailable, WeightsNotFoundError) as e:
        raise UsageError(f"--model {request.model} cannot run on videos: {e}") from None
    if featurizer.feature_dim != checkpoint.config.input_dim:
        raise UsageError(
            f"--model {request.model}: its backbone gives {featurizer.feature_dim}-d features, the model takes {checkpoint.config.input_dim}"
        )
    options: dict[str, Any] = {"resize": featurizer.decode_size}
    spec = request.source
    if "://" in spec and not spec.startswith("file://"):
        options["open_timeout"] = request.open_timeout
    elif request.idle_timeout is not None:
        options["idle_timeout"] = request.idle_timeout
    else:
        options.update(realtime=request.realtime, speed=request.speed)
    try:
        source = open_source(spec, **options)
    except SourceError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"{spec}: {e}") from None
    backbone = featurizer.backbone
    sampling = featurizer.sampling
    described = (
        f"{checkpoint.provenance.get('backbone')} ({backbone.weights_name}, sha256 {backbone.weights_sha256[:12]}...), "
        f"{sampling.fps or 'native'} fps, window {sampling.window}, stride {sampling.stride}, on {device}"
    )

    def steps() -> StepIter:
        try:
            for frame in source:
                report.frames += 1
                yield from featurizer.push(frame.pts, frame.image, frame.arrival)
        except SourceError as e:
            raise _SourceFailed(str(e)) from None
        yield from featurizer.finish(source.end)

    return steps(), featurizer.timing, source.close, described


def _emit(events, labels: list[str], out: IO[str], report: OnlineReport, echo: bool) -> None:
    for event in events:
        out.write(json.dumps(event.to_dict(labels)) + "\n")
        out.flush()
        report.events += 1
        report.instances += event.kind == "end"
        if echo:
            print(format_event(event, labels), flush=True)


def format_event(event, labels: list[str]) -> str:
    """One readable line: stream time, kind, class, segment so far (or final), score."""
    end = f"{event.end:7.2f}" if event.end is not None else "    ..."
    return f"{event.time:8.2f} s  {event.kind:<6}  #{event.instance:<3} {labels[event.label]:<20} [{event.start:7.2f}, {end}] s  score {event.score:.3f}"
