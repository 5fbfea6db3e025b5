"""Live video: sources of decoded frames as they arrive, and features computed as soon as a step's frames are there.

Legend: H x W decoded frame size, D feature width (the backbone's ``feature_dim``).

    source (frames in presentation order, each (pts seconds, uint8 [H, W, 3] RGB), with .arrival)
        -> IncrementalFeaturizer.push(pts, frame) -> [(step, float32 [D], arrival of the step's last frame)]
        -> an online detector's stream (jobs.online)

Sources (every one an iterator of ``LiveFrame``, with ``close()``; a missing, unreachable, corrupt or
unsupported input is a ``SourceError`` from the constructor, or from the iterator if it shows later):

* ``FileSource(path, realtime=True, speed=1.0)``: a finished file played at its own pace (a frame shown
  at ``pts`` is handed out no earlier than ``pts / speed`` after the first): the simulated live source.
* ``GrowingFileSource(path, idle_timeout=...)``: an MPEG-TS / fragmented MP4 / Matroska file still being
  written; reading waits for it to grow and ends after ``idle_timeout`` s without growth.
* ``NetworkSource(url, open_timeout=...)``: whatever FFmpeg opens: rtsp://, http(s):// (HLS), udp://, tcp://, srt://.
* ``ChunkSource()``: encoded bytes of a stream handed over by ``feed(data)`` / ``finish()`` (e.g. MPEG-TS
  chunks arriving over a WebSocket), decoded in a background thread as they come.

Times: ``pts`` are seconds from the start of the stream's timeline (FFmpeg's ``start_time``, as
``pipelines.video`` counts for a file; for a live stream, where it was joined), so a file played by
``FileSource`` gives exactly the times offline extraction uses.

``IncrementalFeaturizer`` resamples the frames exactly as ``pipelines.extract`` does offline (the frame
on screen at each ``k / fps``, the same clip ``window`` and ``stride``, the same decode size and
scaler when the source resizes with ``featurizer.decode_size``), runs the backbone as soon as a step's
frames are all there, and ``finish()`` adds what offline extraction adds at the end (the last frame's
trailing samples, one padded clip for a video shorter than a window). Its features equal
``features_for_video``'s on the same file (tests/pipelines/test_live.py).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import av
import cv2
import numpy as np

from pipelines.backbones import Backbone
from pipelines.extract import SamplingConfig, build_featurizer, decode_size
from tal_models.timing import FeatureTiming

__all__ = [
    "NETWORK_SCHEMES",
    "ChunkSource",
    "FeatureStep",
    "FileSource",
    "GrowingFileSource",
    "IncrementalFeaturizer",
    "LiveFrame",
    "LiveSource",
    "NetworkSource",
    "SourceError",
    "open_source",
]

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp")
SOURCE_REASONS = ("missing", "unreachable", "timeout", "not_a_video", "unsupported_codec", "truncated", "unreadable", "closed")
# What FFmpeg reads to recognise a live stream before handing out its first frame: its defaults (5 MB, 5 s of
# stream) hold the first frames back for seconds, and a stream that has sent less waits until it sends more.
# Half a second of stream finds an H.264 stream's size and rate in MPEG-TS (measured on the tests' streams).
LIVE_PROBE = {"probesize": str(256 * 1024), "analyzeduration": str(500_000)}

Resize = tuple[int, int] | Callable[[int, int], tuple[int, int]] | None


class SourceError(Exception):
    """A source that cannot be read, with ``reason`` one of ``SOURCE_REASONS``: ``missing`` no such file
    (or an HTTP 404); ``unreachable`` nothing answers at the address (connection refused, unknown host);
    ``timeout`` no data within the time allowed; ``not_a_video`` no media container, or no video stream;
    ``unsupported_codec`` a video stream no decoder here reads; ``truncated`` decoding failed part-way;
    ``unreadable`` anything else; ``closed`` fed after ``finish()`` / ``close()``.
    ``str(e)`` is ``"{source}: {reason}: {detail}"``; it pickles."""

    def __init__(self, reason: str, source: str, detail: str):
        if reason not in SOURCE_REASONS:
            raise ValueError(f"SourceError reason must be one of {SOURCE_REASONS}, got {reason!r}")
        super().__init__(reason, source, detail)
        self.reason, self.source, self.detail = reason, source, detail

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}: {self.detail}"


class LiveFrame(tuple):
    """One decoded frame: unpacks as ``(pts, image)`` (``pts`` float seconds, ``image`` uint8 [H, W, 3]
    RGB); ``arrival`` is the ``time.monotonic()`` at which it was decoded (for a paced ``FileSource``: at
    which it was due); ``duration`` its display time in seconds when the stream states it (else None)."""

    def __new__(cls, pts: float, image: np.ndarray, arrival: float, duration: float | None = None):
        self = super().__new__(cls, (pts, image))
        self.arrival, self.duration = arrival, duration
        return self

    def __getnewargs__(self):  # pickling (a frame sent to another process) rebuilds it through __new__
        return (self[0], self[1], self.arrival, self.duration)

    @property
    def pts(self) -> float:
        return self[0]

    @property
    def image(self) -> np.ndarray:
        return self[1]


class LiveSource:
    """Frames of one stream, in presentation order, iterated once. ``fps``: the stream's stated rate (None if
    unknown); ``end``: seconds at which the last frame handed out stops being shown (None before any)."""

    name: str = ""
    fps: float | None = None
    end: float | None = None

    def __iter__(self) -> Iterator[LiveFrame]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> LiveSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- PyAV sources -------------------------------------------------------------------------------------


class _AVSource(LiveSource):
    """A source decoded by PyAV from one container opened at construction (so a bad input raises there).

    ``close()`` may come from any thread: FFmpeg's context must not be freed under a call in progress, so while
    one runs (a read, a decode) it only asks the decoding loop to stop, and the loop closes the container as
    soon as that call returns (for a network source, at most its ``read_timeout`` later)."""

    def __init__(self, name: str, resize: Resize, threads: int):
        self.name, self._resize, self._threads = name, resize, threads
        self._container = None
        self._iterated = False
        self._decoding = False  # a call into FFmpeg is in progress in the decoding loop
        self._stop = False
        self._lock = threading.Lock()

    def _start(self, media: Any, **open_options: Any) -> None:
        self._container = _open(self.name, media, **open_options)
        try:
            self._stream = _video_stream(self.name, self._container)
        except SourceError:
            self._container.close()
            raise
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else None
        # time 0 on the stream's clock: the container's start (as pipelines.video counts for a file), else the
        # stream's, else (None) the first frame's; read now, while nothing else can close the container
        tb = float(self._stream.time_base or 0)
        if self._container.start_time is not None:
            self._origin: float | None = self._container.start_time / av.time_base
        else:
            self._origin = self._stream.start_time * tb if self._stream.start_time is not None else None

    def _decoded(self) -> Iterator[LiveFrame]:
        """The container's frames as they decode, at the requested size, with their stream times."""
        with self._lock:
            if self._iterated:
                raise RuntimeError(f"{self.name}: a live source is read once; open it again to read it again")
            self._iterated = True
            if self._container is None or self._stop:
                return
            self._decoding = True
        container, stream = self._container, self._stream
        stream.thread_type = "SLICE"  # frame threading would hold frames back (a frame per thread) on a live stream
        stream.codec_context.thread_count = self._threads
        tb = float(stream.time_base or 0)
        packets = container.demux(stream)
        origin, count, size, last = None, 0, None, None
        try:
            while True:
                with self._lock:
                    if self._stop:
                        return
                    self._decoding = True
                try:  # inside FFmpeg: a close() now only asks to stop
                    packet = next(packets, None)
                    frames = packet.decode() if packet is not None else []
                except av.error.FFmpegError as e:
                    if self._stop:
                        return
                    raise _source_error(self.name, e, f"decoding failed after {count} frames") from None
                finally:
                    with self._lock:
                        self._decoding = False
                if packet is None:
                    return
                for frame in frames:
                    if self._stop:
                        return
                    if origin is None:
                        origin = self._origin if self._origin is not None else (frame.pts or 0) * tb
                    # float64 seconds, as pipelines.video computes frame times; frames without timestamps at the stated rate
                    pts = frame.pts * tb - origin if frame.pts is not None and tb > 0 else count / (self.fps or 25.0)
                    count += 1
                    if last is not None and pts <= last:
                        continue  # a frame shown before the last one (a timestamp jump back): nothing can show it now
                    last = pts
                    if size is None:
                        size = _size(self._resize, frame.width, frame.height)
                    if size == (frame.width, frame.height):
                        image = frame.to_ndarray(format="rgb24")
                    else:  # one swscale call, area averaging: what offline extraction decodes at
                        image = frame.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="AREA")
                    duration = frame.duration * tb if getattr(frame, "duration", None) and tb > 0 else None
                    self.end = pts + (duration or (1.0 / self.fps if self.fps else 0.0))
                    yield LiveFrame(pts, image, time.monotonic(), duration)
        finally:
            with self._lock:
                self._stop = True
                container, self._container = self._container, None
            if container is not None:
                container.close()

    def __iter__(self) -> Iterator[LiveFrame]:
        return self._decoded()

    def close(self) -> None:
        """Stop and free the decoder: at once, or (during a call into FFmpeg) as soon as that call returns."""
        with self._lock:
            self._stop = True
            if self._decoding:
                return  # the loop closes the container
            container, self._container = self._container, None
        if container is not None:
            container.close()


class FileSource(_AVSource):
    """A finished video file read as a live source: with ``realtime`` a frame shown at ``pts`` is handed out
    no earlier than ``pts / speed`` seconds after the first one was (``speed`` 2.0 plays twice as fast);
    without it, as fast as it decodes. ``resize``: (W, H), or a function of the native (W, H) giving it
    (e.g. ``IncrementalFeaturizer.decode_size``), else the native size. ``threads``: FFmpeg's decoding threads."""

    def __init__(self, path: str | os.PathLike, *, realtime: bool = True, speed: float = 1.0, resize: Resize = None, threads: int = 1):
        path = os.fspath(path)
        super().__init__(path, resize, threads)
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a positive factor of real time, got {speed}")
        self.realtime, self.speed = realtime, speed
        local = path[len("file://") :] if path.startswith("file://") else path
        if os.path.isdir(local):
            raise SourceError("not_a_video", path, "it is a directory, not a video file")
        if not os.path.exists(local):
            raise SourceError("missing", path, "no such file")
        if os.path.getsize(local) == 0:
            raise SourceError("not_a_video", path, "the file has 0 bytes")
        self._start(local)

    def __iter__(self) -> Iterator[LiveFrame]:
        if not self.realtime:
            return self._decoded()
        return self._paced()

    def _paced(self) -> Iterator[LiveFrame]:
        start = None
        for frame in self._decoded():
            now = time.monotonic()
            if start is None:
                start = now - frame.pts / self.speed  # the clock on which frame pts is due at start + pts / speed
            due = start + frame.pts / self.speed
            if due > now:
                time.sleep(due - now)
            # arrival: when a live source would have delivered it, so that a consumer that falls behind counts its backlog
            yield LiveFrame(frame.pts, frame.image, due, frame.duration)


class NetworkSource(_AVSource):
    """A stream FFmpeg opens from a URL (rtsp://, http(s):// incl. HLS playlists, udp://, tcp://, srt://).
    ``open_timeout``: seconds to wait for the connection and the stream's headers; ``read_timeout``: for
    each later read (a stalled stream then ends with ``SourceError("timeout")``). ``options``: FFmpeg's
    (e.g. ``{"rtsp_transport": "tcp"}``); ``format`` forces a demuxer (e.g. ``"mpegts"``)."""

    def __init__(
        self,
        url: str,
        *,
        open_timeout: float = 10.0,
        read_timeout: float = 10.0,
        resize: Resize = None,
        options: dict[str, str] | None = None,
        format: str | None = None,
        threads: int = 1,
    ):
        super().__init__(url, resize, threads)
        opts = {**LIVE_PROBE, **(options or {})}
        self._start(url, format=format, options=opts, timeout=(open_timeout, read_timeout))


class _GrowingReader:
    """A file object over a file that is still being written: a read at its current end waits for more
    (polling every ``poll`` s) and returns b"" (the end) after ``idle_timeout`` s without growth or once closed."""

    def __init__(self, path: str, idle_timeout: float, poll: float):
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.idle_timeout, self.poll = idle_timeout, poll
        self.closed = False
        self._lock = threading.Lock()  # close() from another thread never closes the file under a read

    def read(self, n: int = -1) -> bytes:
        waited_since = None
        while True:
            with self._lock:
                if self.closed:
                    return b""
                data = self._f.read(n if n and n > 0 else 1 << 16)
            if data:
                return data
            now = time.monotonic()
            waited_since = waited_since or now
            if now - waited_since >= self.idle_timeout:
                self.closed = True  # FFmpeg reads again after an end: it stays the end
                return b""
            time.sleep(self.poll)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._f.close()


class GrowingFileSource(_AVSource):
    """A video file that is still being written (a recorder's MPEG-TS, fragmented MP4 or Matroska output):
    frames come as the file grows; the stream ends after ``idle_timeout`` s without growth. A plain MP4
    (its index written last) cannot be read while it grows. ``format`` forces a demuxer (e.g. ``"mpegts"``)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        idle_timeout: float = 5.0,
        poll: float = 0.05,
        resize: Resize = None,
        format: str | None = None,
        threads: int = 1,
    ):
        path = os.fspath(path)
        super().__init__(path, resize, threads)
        if not (idle_timeout > 0 and poll > 0):
            raise ValueError(f"idle_timeout and poll must be positive seconds, got {idle_timeout} and {poll}")
        if not os.path.isfile(path):
            raise SourceError("missing", path, "no such file" if not os.path.exists(path) else "not a regular file")
        self._reader = _GrowingReader(path, idle_timeout, poll)
        try:
            self._start(self._reader, format=format, options=dict(LIVE_PROBE))
        except BaseException:
            self._reader.close()
            raise

    def close(self) -> None:
        self._reader.close()  # a read waiting for growth returns the end at once
        super().close()


class _Pipe:
    """Bytes handed over by ``write`` and read, in order, by FFmpeg in another thread: a read waits for data;
    after ``finish`` it returns what is left, then b"" (the end)."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._cond = threading.Condition()
        self.finished = False
        self.closed = False
        self.received = 0

    def write(self, data: bytes) -> None:
        with self._cond:
            self._chunks.append(bytes(data))
            self.received += len(data)
            self._cond.notify_all()

    def finish(self, close: bool = False) -> None:
        with self._cond:
            self.finished = True
            self.closed = self.closed or close
            self._cond.notify_all()

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            while not self._chunks and not self.finished:
                self._cond.wait()
            if self.closed or not self._chunks:
                return b""
            n = n if n and n > 0 else 1 << 16
            out = bytearray()
            while self._chunks and len(out) < n:
                chunk = self._chunks.popleft()
                take = n - len(out)
                out += chunk[:take]
                if len(chunk) > take:
                    self._chunks.appendleft(chunk[take:])
            return bytes(out)


_END = object()


class ChunkSource(LiveSource):
    """A stream of encoded bytes handed over piece by piece: ``feed(data)`` (any split: MPEG-TS packets,
    fragments, arbitrary chunks), then ``finish()`` at its end. A background thread decodes as the bytes come;
    the iterator hands out frames as they decode (errors in the data are raised from it as ``SourceError``).
    The container must be readable front to back: MPEG-TS, fragmented MP4, Matroska/WebM (``format`` forces
    one, e.g. ``"mpegts"``, and saves probing). ``max_frames`` decoded frames wait at most (then decoding
    waits for the reader). ``name`` is what errors call the stream."""

    def __init__(self, *, name: str = "stream", format: str | None = None, resize: Resize = None, max_frames: int = 64, threads: int = 1):
        self.name, self._format, self._resize, self._threads = name, format, resize, threads
        self._pipe = _Pipe()
        self._frames: queue.Queue = queue.Queue(maxsize=max_frames)
        self._source: _AVSource | None = None
        self._thread = threading.Thread(target=self._run, name=f"ChunkSource({name})", daemon=True)
        self._thread.start()

    def feed(self, data: bytes) -> None:
        """Hand over the next bytes of the stream (never blocks)."""
        if self._pipe.finished:
            raise SourceError("closed", self.name, "fed after finish() or close()")
        if data:
            self._pipe.write(data)

    def finish(self) -> None:
        """The stream has ended: decode what is left, then the iterator stops."""
        self._pipe.finish()

    def close(self) -> None:
        """Stop decoding now (what is not decoded is dropped) and end the iterator. The decoding thread closes
        its container itself: FFmpeg's context must not be freed under a call running in another thread."""
        self._pipe.finish(close=True)  # its reads now return the end at once
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # make room for a decoder waiting to hand out a frame
                self._frames.get(timeout=0.05)
        while True:  # what was decoded and not taken is dropped
            try:
                self._frames.get_nowait()
            except queue.Empty:
                break
        self._frames.put(_END)

    def _run(self) -> None:
        source = _AVSource(self.name, self._resize, self._threads)
        try:
            source._start(self._pipe, format=self._format, options=dict(LIVE_PROBE))
            self._source = source
            for frame in source:
                if self._pipe.closed or not self._put(frame):
                    break
            self._put(_END)
        except SourceError as e:
            if self._pipe.closed:
                self._put(_END)
            elif self._pipe.received == 0:
                self._put(SourceError("not_a_video", self.name, "the stream ended before any data came"))
            else:
                self._put(e)
        except Exception as e:  # noqa: BLE001 - handed to the reader, whatever it is
            self._put(e)
        finally:
            source.close()

    def _put(self, item: Any) -> bool:
        while True:
            try:
                self._frames.put(item, timeout=0.1)
                return True
            except queue.Full:
                if self._pipe.closed:
                    return False

    def __iter__(self) -> Iterator[LiveFrame]:
        while True:
            item = self._frames.get()
            if item is _END:
                self._put(_END)  # a second iterator (or a late close) ends too
                return
            if isinstance(item, BaseException):
                self._put(_END)
                raise item
            if self._source is not None:
                self.fps = self._source.fps
            self.end = item.pts + (item.duration or (1.0 / self.fps if self.fps else 0.0))
            yield item


def open_source(spec: str | os.PathLike, **options: Any) -> LiveSource:
    """The source ``spec`` names: a URL with a network scheme (``NETWORK_SCHEMES``) or a local ``.m3u8`` /
    ``.sdp`` -> ``NetworkSource``; a path with ``idle_timeout`` among ``options`` -> ``GrowingFileSource``;
    any other path -> ``FileSource``. ``options`` go to that class (e.g. ``realtime=False``, ``resize=...``,
    ``open_timeout=...``); those it does not take are an error naming them."""
    spec = os.fspath(spec)
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else ""
    if scheme in NETWORK_SCHEMES or (not scheme and spec.lower().endswith((".m3u8", ".sdp"))):
        cls: type = NetworkSource
    elif scheme not in ("", "file"):
        raise SourceError("unreadable", spec, f"unsupported scheme {scheme!r}: give a path or one of {', '.join(NETWORK_SCHEMES)}")
    elif "idle_timeout" in options:
        cls = GrowingFileSource
    else:
        cls = FileSource
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"{cls.__name__} ({spec}) does not take {', '.join(unknown)}; it takes {', '.join(sorted(accepted - {'path', 'url'}))}"
        )
    return cls(spec, **options)


# --- opening, errors ----------------------------------------------------------------------------------


def _open(name: str, media: Any, **options: Any):
    try:
        return av.open(media, metadata_errors="ignore", **{k: v for k, v in options.items() if v is not None})
    except av.error.FFmpegError as e:
        raise _source_error(name, e, "opening it failed") from None


def _source_error(name: str, e: BaseException, what: str) -> SourceError:
    message = f"{what} ({getattr(e, 'strerror', None) or str(e) or type(e).__name__})"
    if isinstance(e, (FileNotFoundError, av.error.HTTPNotFoundError)):
        return SourceError("missing", name, message)
    if isinstance(e, (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError)):
        return SourceError("unreachable", name, message)
    if isinstance(e, (TimeoutError, av.error.ExitError)) or "timed out" in message.lower():  # ExitError: PyAV's timeout fired
        return SourceError("timeout", name, f"{message}: no data came within the time allowed")
    if isinstance(e, av.error.InvalidDataError):
        reason = "not_a_video" if what.startswith("opening") else "truncated"
        return SourceError(reason, name, message + ("" if reason == "truncated" else ": FFmpeg recognises no media stream in it"))
    if isinstance(e, av.error.DecoderNotFoundError):
        return SourceError("unsupported_codec", name, message)
    if isinstance(e, OSError) and "resolve" in message.lower():
        return SourceError("unreachable", name, message)
    return SourceError("unreadable" if what.startswith("opening") else "truncated", name, message)


def _video_stream(name: str, container):
    videos = [s for s in container.streams if s.type == "video" and not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        held = ", ".join(s.type for s in container.streams) or "no streams"
        raise SourceError("not_a_video", name, f"it has no video stream ({container.format.name}: {held})")
    decodable = [s for s in videos if s.codec_context is not None]
    if not decodable:
        raise SourceError("unsupported_codec", name, "its video stream's codec has no decoder in this FFmpeg build")
    return decodable[0]


def _size(resize: Resize, width: int, height: int) -> tuple[int, int]:
    if resize is None:
        return width, height
    w, h = resize(width, height) if callable(resize) else resize
    return int(w), int(h)


# --- the incremental featurizer -------------------------------------------------------------------------


class FeatureStep(NamedTuple):
    """One feature step: ``step`` its index, ``feature`` float32 [D], ``arrival`` the ``time.monotonic()``
    at which the frame that completed its clip arrived (its delay is measured from there)."""

    step: int
    feature: np.ndarray
    arrival: float


def _slack(t: float) -> float:
    """``pipelines.video``'s tolerance between two float computations of one instant (a microsecond)."""
    return 1e-6 + 1e-9 * abs(t)


class IncrementalFeaturizer:
    """Features of a live stream, step by step, equal to offline extraction's (``pipelines.extract``).

    ``IncrementalFeaturizer(provenance, device, weights=...)`` builds the backbone and sampling that made a
    checkpoint's (or store's) features (``build_featurizer``; ``FeaturizerUnavailable`` for imported
    features); ``IncrementalFeaturizer.from_parts(backbone, sampling)`` takes them built. ``native_fps``
    is needed only when ``sampling.fps`` is None (every native frame sampled; the timing's rate).

    ``push(pts, frame)`` takes frames in presentation order (uint8 [H, W, 3] RGB; at ``decode_size`` of the
    native size, as a source with ``resize=featurizer.decode_size`` gives them; other sizes are area-resized
    here, which matches offline only to within the resize's rounding) and returns the steps they complete.
    ``finish(end)`` (``end``: seconds at which the stream's last frame stops, e.g. ``source.end``; default
    its ``pts`` plus the last frame interval) returns the rest. Memory: one clip of frames (and features).
    """

    def __init__(
        self,
        provenance: Any = None,
        device: str = "cpu",
        weights: str | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        num_threads: int | None = None,
        native_fps: float | None = None,
        backbone: Backbone | None = None,
        sampling: SamplingConfig | None = None,
    ):
        if backbone is None or sampling is None:
            if provenance is None:
                raise ValueError("give a provenance (a checkpoint's or a store's), or a built backbone and sampling")
            backbone, sampling = build_featurizer(
                provenance, device, weights=weights, storage_options=storage_options, num_threads=num_threads
            )
        fps = sampling.fps or native_fps
        if not fps or not fps > 0:
            raise ValueError("the sampling keeps the native frame rate (fps=None): give native_fps, the stream's rate")
        self.backbone, self.sampling = backbone, sampling
        self.timing = FeatureTiming(fps, sampling.stride, sampling.window)
        self.feature_dim = backbone.feature_dim
        self._every_frame = sampling.fps is None
        if backbone.kind == "clip":
            length = backbone.clip_length or sampling.window
            self._pick = np.linspace(0, sampling.window - 1, length).round().astype(int)  # window frames -> clip length
        self.steps = 0  # feature steps handed out
        self.sampled = 0  # sampled frames so far
        self.skipped = 0  # frames pushed out of order (dropped)
        self._frames: dict[int, np.ndarray] = {}  # sampled index -> frame, for clips not yet complete
        self._features: dict[int, np.ndarray] = {}  # sampled index -> frame feature (frame backbones)
        self._previous: np.ndarray | None = None  # the last needed frame featurized (the flow stream's previous)
        self._last: tuple[float, np.ndarray, float] | None = None  # the last frame pushed: (pts, frame, arrival)
        self._interval: float | None = None  # between the last two frames pushed
        self._finished = False

    @classmethod
    def from_parts(cls, backbone: Backbone, sampling: SamplingConfig, native_fps: float | None = None) -> IncrementalFeaturizer:
        """From ``build_featurizer``'s output (or any backbone and sampling)."""
        return cls(backbone=backbone, sampling=sampling, native_fps=native_fps)

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """``(W, H)`` to decode a ``width`` x ``height`` stream at: offline extraction's (``pipelines.extract.decode_size``)."""
        return decode_size(self.backbone, width, height)

    def push(self, pts: float, frame: np.ndarray, arrival: float | None = None) -> list[FeatureStep]:
        """Take the next frame (shown from ``pts`` seconds): the steps it completes, in order. ``arrival``:
        when it arrived (default ``frame.arrival`` for a ``LiveFrame``'s image, else now)."""
        if self._finished:
            raise RuntimeError("the featurizer is finished: make a new one for a new stream")
        pts = float(pts)
        if not math.isfinite(pts):
            raise ValueError(f"pts must be a finite number of seconds, got {pts}")
        if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3):
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"a frame is a uint8 RGB array [H, W, 3], got {got}")
        arrival = time.monotonic() if arrival is None else float(arrival)
        if self._last is not None and pts <= self._last[0]:
            self.skipped += 1  # shown before the last frame: it can no longer be on screen at any sample time
            return []
        frame = self._at_decode_size(frame)
        out: list[FeatureStep] = []
        if self._every_frame:
            out += self._sample(frame, arrival)
        else:
            # sample k is the frame on screen at k / fps: the last one shown at or before it (pipelines.video)
            while self._last is not None and pts > self._time(self.sampled) + _slack(self._time(self.sampled)):
                out += self._sample(self._last[1], arrival)  # known now: this frame comes after k / fps
            # shown exactly at k / fps: no later frame can be (frames are far more than 2 us apart), so it is known now
            while abs(pts - self._time(self.sampled)) <= _slack(self._time(self.sampled)) or (
                self._last is None and pts > self._time(self.sampled)
            ):
                out += self._sample(frame, arrival)  # (before the first frame, the first is on screen)
        if self._last is not None:
            self._interval = pts - self._last[0]
        self._last = (pts, frame, arrival)
        return out

    def finish(self, end: float | None = None) -> list[FeatureStep]:
        """The stream has ended (its last frame shown until ``end`` s): the steps offline extraction of the same
        video would still produce. The featurizer takes no more frames after."""
        if self._finished:
            return []
        self._finished = True
        if self._last is None:
            return []
        pts, frame, arrival = self._last
        out: list[FeatureStep] = []
        if not self._every_frame:
            if end is None:
                end = pts + (self._interval or 1.0 / self.timing.fps)
            n = max(0, math.ceil((end - _slack(end)) * self.timing.fps))  # pipelines.video.sample_times' count
            while self.sampled < n:
                out += self._sample(frame, arrival)
        if self.steps == 0 and self.sampled > 0:  # shorter than a window: one clip, its last frame repeated
            out.append(self._step(self.steps, arrival))
        self._frames.clear()
        self._features.clear()
        return out

    # --- internals

    def _time(self, k: int) -> float:
        return k / self.timing.fps

    def _at_decode_size(self, frame: np.ndarray) -> np.ndarray:
        width, height = self.decode_size(frame.shape[1], frame.shape[0])
        if (height, width) == frame.shape[:2]:
            return frame
        return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)

    def _needed(self, k: int) -> bool:
        return k % self.timing.stride < self.timing.window

    def _sample(self, frame: np.ndarray, arrival: float) -> list[FeatureStep]:
        """Sampled frame ``self.sampled`` is ``frame``: keep it if a clip uses it; the step it completes."""
        k = self.sampled
        self.sampled += 1
        if self._needed(k):
            self._frames[k] = frame
        last = self.steps * self.timing.stride + self.timing.window - 1  # the next step's last frame
        return [self._step(self.steps, arrival)] if k == last else []

    def _clip(self, step: int) -> list[int]:
        """Sampled-frame indices of clip ``step`` (a short last clip repeats its final frame), as offline."""
        return np.minimum(step * self.timing.stride + np.arange(self.timing.window), self.sampled - 1).tolist()

    def _step(self, step: int, arrival: float) -> FeatureStep:
        clip = self._clip(step)
        if self.backbone.kind == "frame":
            todo = sorted({i for i in clip if i not in self._features})
            if todo:
                frames = np.stack([self._frames[i] for i in todo])
                if self.backbone.flow:
                    feats = self.backbone.frame_features(frames, previous=self._previous)
                else:
                    feats = self.backbone.frame_features(frames)
                self._previous = frames[-1]
                self._features.update(zip(todo, feats))
            feature = np.mean([self._features[i] for i in clip], axis=0)
        else:
            feature = self.backbone.clip_features(np.stack([self._frames[clip[int(j)]] for j in self._pick])[None])[0]
        self.steps = step + 1
        first_needed = self.steps * self.timing.stride  # frames before the next clip are done with
        for store in (self._frames, self._features):
            for i in [i for i in store if i < first_needed]:
                del store[i]
        return FeatureStep(step, np.asarray(feature, np.float32), arrival)
