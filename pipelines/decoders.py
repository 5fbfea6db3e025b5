"""Video decoders behind one interface: PyAV (the default), decord and torchcodec.

    get_decoder(name).iter_frames(uri, fps=..., chunk_frames=..., resize=...) -> (VideoInfo, chunks)

Every backend has exactly ``pipelines.video.iter_frames``' contract: the same ``VideoInfo``, the
same sampled frames numbered the same way (``start_index``/``stop_index`` included) and the same
``VideoDecodeError`` reasons. That is so by construction: each one starts from
``video.plan_frames``, PyAV's index pass (packet headers only), which checks the input, raises the
errors and names the native frames to hand out; a backend only decodes them.

decord (the ``decord2`` package) and torchcodec were each measured against PyAV on this machine
(``tests/pipelines/test_decoders.py``). Both are frame-exact, and without resizing bit-identical
to PyAV, on MP4/MOV and Matroska/WebM with H.264/H.265/VP9; both hand out the wrong frames on the
MPEG-PS file ``city_405p_mpeg2.mpg`` (frame ``i`` is the true frame ``i + 12``; torchcodec then
fails on the last frames). So they are used only for those containers and codecs, and only when
their frame count and frame times agree with PyAV's index; any other video, or a chunk whose
frame times disagree, or a backend error, is decoded by PyAV instead (from that frame on: the
ranges make this exact). Each fallback is logged and counted in the backend's ``used``
(``Counter`` of the engine that decoded each video or remainder), so it is never silent, and never
gives wrong frames.

* **decord**: imported only when the backend is first made, after ``torch`` (``import decord``
  first makes torch's first CPU matmul crash in ``libnvblas``) and after ``av`` (decord first
  changes which FFmpeg PyAV loads). After ``get_batch`` decord keeps decoding ahead in a
  background thread and grows in memory, so each chunk gets a fresh ``VideoReader`` that is
  dropped as soon as the chunk is decoded: nothing decodes while the caller works on a chunk.
  decord reads a file object whole into memory, so S3 and other non-local videos are decoded by
  PyAV (which streams them) instead.
* **torchcodec**: CPU by default. ``TorchcodecDecoder(device="cuda")`` decodes on NVIDIA GPUs
  (NVDEC) when CUDA is available; that path was not tested (this machine has no GPU) and its
  colour conversion differs from the CPU's. S3 videos are streamed through a file object. It needs
  FFmpeg's shared libraries (4 to 9) on the system: ``scripts/setup.sh`` installs Debian's.
* **Resize**: PyAV scales in FFmpeg's area scaler while converting YUV to RGB; the other two
  decode at full size and scale with OpenCV's area interpolation (``cv2.INTER_AREA``), to the same
  ``(W, H)``. The pixels then differ slightly from PyAV's (see the tolerance in the tests).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol

import cv2
import numpy as np

from pipelines import video
from pipelines.video import FrameChunk, FramePlan, VideoInfo

__all__ = ["DECODERS", "Decoder", "DecordDecoder", "PyAVDecoder", "TorchcodecDecoder", "get_decoder"]

DECODERS = ("pyav", "decord", "torchcodec")
INSTALL_HINT = "pip install 'tal-platform[decoders]'"

# where decord and torchcodec were measured frame-exact (FFmpeg's demuxer and decoder names)
FRAME_EXACT_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
FRAME_EXACT_CODECS = ("h264", "hevc", "vp9")

log = logging.getLogger(__name__)

Resize = tuple[int, int] | Callable[[int, int], tuple[int, int]] | None


class Decoder(Protocol):
    """Decodes a video into sampled RGB frames; ``iter_frames`` has ``pipelines.video.iter_frames``'
    contract exactly (arguments, frames, chunk numbering, errors)."""

    name: str

    def iter_frames(
        self,
        uri: str | os.PathLike,
        *,
        fps: float | None,
        chunk_frames: int = 128,
        resize: Resize = None,
        filesystem: Any = None,
        num_threads: int = 0,
        start_index: int = 0,
        stop_index: int | None = None,
    ) -> tuple[VideoInfo, Iterator[FrameChunk]]: ...


_instances: dict[str, Decoder] = {}


def get_decoder(name: str = "pyav") -> Decoder:
    """The decoder called ``name`` (one of ``DECODERS``), one per process (its ``used`` counts add
    up). Raises ``ValueError`` for an unknown name or a backend that is not installed."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}: choose one of {', '.join(DECODERS)}")
    if name not in _instances:
        match name:
            case "pyav":
                _instances[name] = PyAVDecoder()
            case "decord":
                _instances[name] = DecordDecoder()
            case "torchcodec":
                _instances[name] = TorchcodecDecoder()
    return _instances[name]


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"the {module} decoder is not installed: {INSTALL_HINT} (it brings {package})")


class PyAVDecoder:
    """FFmpeg through PyAV: ``pipelines.video.iter_frames`` itself."""

    name = "pyav"

    def __init__(self) -> None:
        self.used: Counter[str] = Counter()

    def iter_frames(self, uri, *, fps, chunk_frames=128, resize=None, filesystem=None, num_threads=0, start_index=0, stop_index=None):
        self.used["pyav"] += 1
        return video.iter_frames(
            uri,
            fps=fps,
            chunk_frames=chunk_frames,
            resize=resize,
            filesystem=filesystem,
            num_threads=num_threads,
            start_index=start_index,
            stop_index=stop_index,
        )


class _IndexedBackend:
    """A backend that decodes native frames by index (decord, torchcodec), with PyAV where it is
    not known to be frame-exact. Subclasses open a reader and decode a batch of native indices."""

    name = ""

    def __init__(self) -> None:
        # the engine that decoded each video (or its remainder, after a fallback): "decord"/"torchcodec" or "pyav"
        self.used: Counter[str] = Counter()

    def iter_frames(self, uri, *, fps, chunk_frames=128, resize=None, filesystem=None, num_threads=0, start_index=0, stop_index=None):
        plan = video.plan_frames(
            uri, fps=fps, chunk_frames=chunk_frames, resize=resize, filesystem=filesystem, start_index=start_index, stop_index=stop_index
        )
        why = self._unsuitable(plan, filesystem)
        if why:
            return plan.info, self._pyav(plan, filesystem, chunk_frames, num_threads, why)
        return plan.info, self._chunks(plan, filesystem, chunk_frames, num_threads)

    def _unsuitable(self, plan: FramePlan, filesystem: Any) -> str:
        """Why this backend must not decode the video ("" if it may)."""
        if plan.container not in FRAME_EXACT_CONTAINERS or plan.codec not in FRAME_EXACT_CODECS:
            return f"{plan.codec} in a '{plan.container}' container is not among those where {self.name} is frame-exact"
        return ""

    def _pyav(self, plan: FramePlan, filesystem: Any, chunk_frames: int, num_threads: int, why: str) -> Iterator[FrameChunk]:
        """The plan's frames (from its ``start`` on) decoded by PyAV, with a log line saying why."""
        if not len(plan.native):  # an empty range: nothing to decode, nobody decodes it
            return iter(())
        self.used["pyav"] += 1
        log.info("%s: decoded by PyAV instead of %s from sampled frame %d: %s", plan.info.uri, self.name, plan.start, why)
        return video.decode_plan(plan, filesystem=filesystem, chunk_frames=chunk_frames, num_threads=num_threads)

    def _chunks(self, plan: FramePlan, filesystem: Any, chunk_frames: int, num_threads: int) -> Iterator[FrameChunk]:
        if not len(plan.native):
            return
        reader = None
        try:
            for i, j in plan.chunk_bounds(chunk_frames):
                unique, inverse = np.unique(plan.native[i:j], return_inverse=True)  # repeats: fps above the native rate
                try:
                    reader, frames, times = self._batch(reader, plan, filesystem, num_threads, unique)
                    why = _times_disagree(times, plan, unique)
                except _NotFrameExact as e:
                    why = str(e)
                except Exception as e:  # noqa: BLE001 - whatever the backend raises, PyAV decodes the rest (or names the fault)
                    why = f"{self.name} failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                if why:
                    self._close(reader)
                    reader = None
                    yield from self._pyav(_from(plan, i), filesystem, chunk_frames, num_threads, why)
                    return
                if i == 0:
                    self.used[self.name] += 1
                yield FrameChunk(start=plan.start + i, frames=_resized(frames, plan.size)[inverse], times=plan.times[i:j])
        finally:
            self._close(reader)  # drop the backend's reader (buffers, threads, file) as soon as the video is done

    def _batch(
        self, reader: Any, plan: FramePlan, filesystem: Any, num_threads: int, indices: np.ndarray
    ) -> tuple[Any, np.ndarray, np.ndarray]:
        """``(reader, [n, H, W, 3] uint8 frames, [n] presentation times in s on the stream's clock)``
        of native frames ``indices`` (sorted, unique). ``reader`` is what the previous batch returned
        (None at first): a backend may keep one open across batches."""
        raise NotImplementedError

    def _close(self, reader: Any) -> None:
        pass


class _NotFrameExact(Exception):
    """The backend's view of a video disagrees with PyAV's index (e.g. its frame count)."""


def _check_count(count: int, plan: FramePlan, name: str) -> None:
    if count != plan.info.num_frames:
        raise _NotFrameExact(f"{name} counts {count} frames where the container indexes {plan.info.num_frames}")


def _from(plan: FramePlan, i: int) -> FramePlan:
    """The plan from its ``i``-th frame on."""
    return replace(plan, start=plan.start + i, native=plan.native[i:], times=plan.times[i:])


def _times_disagree(times: np.ndarray, plan: FramePlan, indices: np.ndarray) -> str:
    """Why a backend's frame times show that it numbered the frames otherwise than PyAV's index
    ("" when they agree to a millisecond)."""
    expected = plan.index.frame_times[indices] + plan.index.origin
    if times.shape != expected.shape or not np.allclose(times, expected, rtol=0, atol=1e-3):
        worst = int(np.argmax(np.abs(times - expected))) if times.shape == expected.shape else 0
        return f"its frame times disagree with the container's (native frame {int(indices[worst])})"
    return ""


def _resized(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[n, H, W, 3]`` frames at ``size`` = (W, H), area-averaged (as PyAV's scaler, not bit-equal)."""
    width, height = size
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for k, frame in enumerate(frames):
        cv2.resize(frame, (width, height), dst=out[k], interpolation=cv2.INTER_AREA)
    return out


def _is_local(uri: str, filesystem: Any) -> bool:
    return filesystem is None and ("://" not in uri or uri.startswith("file://"))


def _local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


class DecordDecoder(_IndexedBackend):
    """decord (``decord2``) for local MP4/MOV/MKV/WebM files with H.264/H.265/VP9; PyAV for the rest."""

    name = "decord"
    batch_frames = 32  # frames per get_batch: bounds the full-size frames held before resizing

    def __init__(self) -> None:
        super().__init__()
        _require("decord", "decord2")
        import torch  # noqa: F401 - before decord, always: decord first crashes torch's first CPU matmul

        # imported by name so that no import sorter can move it above torch
        self._decord = importlib.import_module("decord")

    def _unsuitable(self, plan: FramePlan, filesystem: Any) -> str:
        if not _is_local(plan.info.uri, filesystem):
            return "decord reads a file object whole into memory; PyAV streams it"
        return super()._unsuitable(plan, filesystem)

    def _batch(self, reader, plan, filesystem, num_threads, indices):
        decord = self._decord
        # a fresh reader per chunk, dropped before the chunk is handed out: while a reader lives,
        # decord decodes ahead in a background thread and its memory grows
        reader = decord.VideoReader(_local_path(plan.info.uri), ctx=decord.cpu(0), num_threads=num_threads)
        try:
            _check_count(len(reader), plan, self.name)
            times = reader.get_frame_timestamp(indices.tolist())[:, 0].astype(np.float64)
            frames = np.concatenate(
                [_resized(reader.get_batch(part.tolist()).asnumpy(), plan.size) for part in _parts(indices, self.batch_frames)]
            )
        finally:
            del reader
        return None, frames, times


def _parts(indices: np.ndarray, n: int) -> list[np.ndarray]:
    return [indices[i : i + n] for i in range(0, len(indices), n)]


class TorchcodecDecoder(_IndexedBackend):
    """torchcodec (CPU, or ``device="cuda"``: NVDEC) for MP4/MOV/MKV/WebM with H.264/H.265/VP9; PyAV for the rest."""

    name = "torchcodec"

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        _require("torchcodec", "torchcodec")
        import torch
        from torchcodec.decoders import VideoDecoder

        if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
            raise ValueError(f"torchcodec decodes on 'cpu' or, with CUDA available, 'cuda'; got device={device!r}")
        try:  # torchcodec loads FFmpeg's shared libraries on first use: check them here, not per video
            VideoDecoder(b"\0" * 64)
        except RuntimeError as e:
            if "libtorchcodec" in str(e):
                raise ValueError(
                    "torchcodec cannot load FFmpeg's shared libraries (it needs FFmpeg 4 to 9 on the system, "
                    "e.g. apt-get install libavdevice59; scripts/setup.sh does it)"
                ) from None
        self._torch, self._video_decoder, self.device = torch, VideoDecoder, device

    def _batch(self, reader, plan, filesystem, num_threads, indices):
        if reader is None:  # one decoder for the whole video (it does not decode ahead)
            uri = plan.info.uri
            file = None if _is_local(uri, filesystem) else video.open_uri(uri, filesystem)
            try:
                decoder = self._video_decoder(
                    _local_path(uri) if file is None else file,
                    dimension_order="NHWC",
                    num_ffmpeg_threads=num_threads,
                    device=self.device,
                    seek_mode="exact",
                )
            except Exception:
                if file is not None:
                    file.close()
                raise
            reader = (decoder, file)
            _check_count(len(decoder), plan, self.name)
        batch = reader[0].get_frames_at(indices.tolist())
        return reader, batch.data.cpu().numpy(), batch.pts_seconds.numpy().astype(np.float64)

    def _close(self, reader) -> None:
        if reader is not None and reader[1] is not None:
            reader[1].close()
