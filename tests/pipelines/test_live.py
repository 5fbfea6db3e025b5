"""Live sources and the incremental featurizer on small real videos the tests encode (H.264 in MP4 and MPEG-TS).

The featurizer's steps must equal offline extraction's (``features_for_video``, what ``tal extract``'s
workers run) on the same file, for frame and clip backbones, sampled below, at and off the native rate.
"""

from __future__ import annotations

import http.server
import pickle
import socket
import threading
import time
import warnings
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from helpers import TinyFrameNet, free_port
from torch import nn

from pipelines.backbones import BackboneConfig, build_backbone
from pipelines.extract import SamplingConfig, features_for_video, provenance_for, settings_json
from pipelines.live import (
    ChunkSource,
    FileSource,
    GrowingFileSource,
    IncrementalFeaturizer,
    LiveFrame,
    NetworkSource,
    SourceError,
    open_source,
)

FPS = 10  # native rate of the test videos


def write_video(path, fmt: str, frames: int = 30, size=(96, 64), fps: int = FPS, gop: int = 10, options=None) -> str:
    """A moving colour pattern, H.264, a keyframe every ``gop`` frames."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        for k in range(frames):
            image = np.stack([(xx * 3 + k * 9) % 256, (yy * 4 + k * 5) % 256, ((xx + yy) * 2 + k * 13) % 256], -1).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    return {
        "mp4": write_video(root / "a.mp4", "mp4"),
        "ts": write_video(root / "a.ts", "mpegts"),
        "fmp4": write_video(root / "f.mp4", "mp4", options={"movflags": "frag_keyframe+empty_moov+default_base_moof"}),
        "mkv": write_video(root / "a.mkv", "matroska"),
        "short": write_video(root / "short.mp4", "mp4", frames=3),
        "root": root,
    }


def decode_all(path) -> list[LiveFrame]:
    with FileSource(path, realtime=False) as source:
        return list(source)


# --- sources ---------------------------------------------------------------------------------------


def test_file_source_frames_and_times(videos):
    frames = decode_all(videos["mp4"])
    assert len(frames) == 30
    pts = np.array([f.pts for f in frames])
    np.testing.assert_allclose(pts, np.arange(30) / FPS, atol=1e-9)
    assert all(f.image.shape == (64, 96, 3) and f.image.dtype == np.uint8 for f in frames)
    pts0, image0 = frames[0]  # unpacks as (pts, image)
    assert pts0 == 0.0 and image0 is frames[0].image
    copy = pickle.loads(pickle.dumps(frames[3]))
    assert (copy.pts, copy.arrival, copy.duration) == (frames[3].pts, frames[3].arrival, frames[3].duration)
    assert np.array_equal(copy.image, frames[3].image)
    assert not np.array_equal(frames[0].image, frames[1].image)  # the pattern moves
    with FileSource(videos["mp4"], realtime=False, resize=(48, 32)) as source:
        small = list(source)
        assert source.end == pytest.approx(3.0) and source.fps == FPS
    assert small[0].image.shape == (32, 48, 3)


@pytest.mark.parametrize("speed", [1.0, 3.0])
def test_file_source_does_not_run_ahead_of_real_time(videos, speed):
    path = write_video(videos["root"] / f"pace{speed}.mp4", "mp4", frames=8)
    with FileSource(path, realtime=True, speed=speed) as source:
        start = time.monotonic()
        seen = []
        for frame in source:
            seen.append((frame.pts, time.monotonic(), frame.arrival))
    assert len(seen) == 8
    for pts, received, arrival in seen:
        # frame k (shown at k / fps) is handed out no earlier than k / fps / speed after the start: a lower bound only
        assert received - start >= pts / speed - 1e-3
        assert arrival - start >= pts / speed - 1e-3
    images = [f.image for f in FileSource(path, realtime=True, speed=100.0)]
    assert all(np.array_equal(a, b) for a, b in zip(images, [f.image for f in decode_all(path)]))


def test_growing_file_source_reads_while_the_file_is_written(videos, tmp_path):
    data = Path(videos["ts"]).read_bytes()
    path = tmp_path / "growing.ts"
    path.write_bytes(data[: 188 * 20])  # the headers and the start of the first frame
    written = threading.Event()

    def writer():
        with open(path, "ab") as f:
            for i in range(188 * 20, len(data), 188 * 10):
                f.write(data[i : i + 188 * 10])
                f.flush()
                time.sleep(0.01)
        written.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with GrowingFileSource(path, idle_timeout=1.0, poll=0.01) as source:
            frames = list(source)
            done_at = time.monotonic()
    finally:
        thread.join()
    assert written.is_set()
    whole = decode_all(videos["ts"])
    assert [f.pts for f in frames] == [f.pts for f in whole]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, whole))
    assert frames[0].arrival < done_at - 0.5  # the first frame came long before the idle timeout ended the stream


def test_close_from_another_thread_ends_a_waiting_source(videos, tmp_path):
    data = Path(videos["ts"]).read_bytes()
    path = tmp_path / "stalled.ts"
    path.write_bytes(data[: len(data) // 2])  # a recorder that stopped writing, with a long idle timeout
    source = GrowingFileSource(path, idle_timeout=60.0, poll=0.01)
    frames = []
    closer = threading.Timer(0.5, source.close)
    closer.start()
    frames.extend(source)  # waits for growth until the other thread closes the source
    closer.join()
    assert 0 < len(frames) < 30 and source._container is None  # ended, decoder freed, no error


def test_network_source_tcp_and_http(videos):
    data = Path(videos["ts"]).read_bytes()
    whole = decode_all(videos["ts"])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def send():
        conn, _ = server.accept()
        with conn:
            for i in range(0, len(data), 4096):
                conn.sendall(data[i : i + 4096])

    thread = threading.Thread(target=send)
    thread.start()
    try:
        with NetworkSource(f"tcp://127.0.0.1:{server.getsockname()[1]}", open_timeout=10) as source:
            frames = list(source)
    finally:
        thread.join()
        server.close()
    assert [f.pts for f in frames] == [f.pts for f in whole]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, whole))

    handler = partial(_QuietHandler, directory=str(videos["root"]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/a.ts"
        with open_source(url, open_timeout=10) as source:
            assert isinstance(source, NetworkSource)
            frames = list(source)
        with pytest.raises(SourceError) as missing:
            open_source(f"http://127.0.0.1:{httpd.server_address[1]}/nothing.ts", open_timeout=10)
        assert missing.value.reason == "missing"
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert len(frames) == len(whole) and all(np.array_equal(a.image, b.image) for a, b in zip(frames, whole))


def test_network_source_that_stalls_ends_with_a_timeout(videos):
    data = Path(videos["ts"]).read_bytes()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    done = threading.Event()

    def send_half_then_stall():
        conn, _ = server.accept()
        with conn:
            conn.sendall(data[: len(data) // 2])
            done.wait(20)

    thread = threading.Thread(target=send_half_then_stall)
    thread.start()
    frames = []
    try:
        source = NetworkSource(f"tcp://127.0.0.1:{server.getsockname()[1]}", open_timeout=10, read_timeout=1.0)
        with pytest.raises(SourceError) as e:
            frames.extend(source)
        source.close()
    finally:
        done.set()
        thread.join()
        server.close()
    assert e.value.reason == "timeout" and "no data came" in str(e.value)
    assert 0 < len(frames) < 30  # what came before the stall was handed out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(("container", "seed"), [("ts", 0), ("ts", 1), ("fmp4", 2), ("mkv", 3)])
def test_chunk_source_in_random_chunks_equals_the_whole_file(videos, container, seed):
    data = Path(videos[container]).read_bytes()
    rng = np.random.default_rng(seed)
    source = ChunkSource(name="upload")

    def feed():
        i = 0
        while i < len(data):
            n = int(rng.integers(1, 5000))
            source.feed(data[i : i + n])
            i += n
        source.finish()

    thread = threading.Thread(target=feed)
    thread.start()
    frames = list(source)
    thread.join()
    whole = decode_all(videos[container])
    assert len(whole) == 30
    assert [f.pts for f in frames] == [f.pts for f in whole]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, whole))
    assert source.end == pytest.approx(3.0)
    with pytest.raises(SourceError, match="closed"):
        source.feed(b"more")


def test_chunk_source_hands_out_frames_before_the_stream_ends(videos):
    data = Path(videos["ts"]).read_bytes()
    source = ChunkSource(format="mpegts")
    source.feed(data[: len(data) // 2])
    first = next(iter(source))  # decoded from the first half alone, while finish() has not been called
    assert first.pts == 0.0
    source.close()  # stops decoding; the iterator ends instead of waiting for the rest
    assert list(source) == []


def test_clear_errors(videos, tmp_path):
    with pytest.raises(SourceError) as e:
        FileSource(tmp_path / "gone.mp4")
    assert e.value.reason == "missing" and "gone.mp4" in str(e.value)
    with pytest.raises(SourceError) as e:
        GrowingFileSource(tmp_path / "gone.ts", idle_timeout=0.1)
    assert e.value.reason == "missing"
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(SourceError) as e:
        FileSource(garbage)
    assert e.value.reason == "not_a_video"
    chunks = ChunkSource()
    chunks.feed(garbage.read_bytes() * 20)
    chunks.finish()
    with pytest.raises(SourceError) as e:
        list(chunks)
    assert e.value.reason == "not_a_video"
    with pytest.raises(SourceError) as e:
        NetworkSource(f"tcp://127.0.0.1:{free_port()}", open_timeout=5)
    assert e.value.reason == "unreachable" and "refused" in str(e.value).lower()
    audio = tmp_path / "audio.ts"
    with av.open(str(audio), "w", format="mpegts") as container:
        stream = container.add_stream("mp2", rate=44100)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1152
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(SourceError) as e:
        FileSource(audio)
    assert e.value.reason == "not_a_video" and "no video stream" in str(e.value)
    again = pickle.loads(pickle.dumps(e.value))  # it crosses processes (Ray, Serve replicas)
    assert (again.reason, str(again)) == (e.value.reason, str(e.value))
    with pytest.raises(SourceError, match="unsupported scheme"):
        open_source("gopher://example/video")
    with pytest.raises(ValueError, match="does not take open_timeout"):
        open_source(videos["mp4"], open_timeout=3)
    assert isinstance(open_source(videos["mp4"], realtime=False), FileSource)


# --- the incremental featurizer ------------------------------------------------------------------------


class TinyClipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, L, H, W] -> [B, 5]
        return self.fc(torch.relu(self.conv(x)).mean((2, 3, 4)))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    root = tmp_path_factory.mktemp("nets")
    paths = {}
    for name, net in (("frame", TinyFrameNet()), ("clip", TinyClipNet())):
        torch.manual_seed(0)
        net.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.script(net.eval()), root / f"{name}.pt")
        paths[name] = str(root / f"{name}.pt")
    return paths


def _config(scripted, kind: str, flow: bool = False) -> BackboneConfig:
    extra = {"clip_length": 4} if kind == "clip" else {}
    return BackboneConfig(name="torchscript", weights=scripted[kind], kind=kind, input_size=(32, 40), flow=flow, batch_size=8, **extra)


def _push_all(featurizer: IncrementalFeaturizer, path: str) -> tuple[list, list]:
    """Push a file's frames (decoded at the featurizer's size) one by one: (steps in push order, steps of finish())."""
    pushed = []
    with FileSource(path, realtime=False, resize=featurizer.decode_size) as source:
        for frame in source:
            pushed += featurizer.push(frame.pts, frame.image, frame.arrival)
        end = source.end
    return pushed, featurizer.finish(end)


CASES = {
    # name: (backbone kind, flow, sampling, video)
    "frame-5fps-w3s2": ("frame", False, SamplingConfig(fps=5.0, window=3, stride=2, chunk_frames=8), "mp4"),
    "frame-4fps-offgrid": ("frame", False, SamplingConfig(fps=4.0, window=2, stride=3, chunk_frames=8), "mp4"),
    "frame-flow-7.5fps": ("frame", True, SamplingConfig(fps=7.5, window=2, stride=2, chunk_frames=8), "mp4"),
    "frame-native-ts": ("frame", False, SamplingConfig(fps=None, window=4, stride=4, chunk_frames=8), "ts"),
    "clip-10fps-w6s4": ("clip", False, SamplingConfig(fps=10.0, window=6, stride=4, chunk_frames=8), "mp4"),
    "clip-25fps-above-native": ("clip", False, SamplingConfig(fps=25.0, window=4, stride=4, chunk_frames=16), "mp4"),
    "frame-short-video": ("frame", False, SamplingConfig(fps=5.0, window=4, stride=4, chunk_frames=8), "short"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_incremental_features_equal_offline_extraction(case, videos, scripted, one_thread_here):
    kind, flow, sampling, video = CASES[case]
    config = _config(scripted, kind, flow)
    backbone = build_backbone(config, "cpu", num_threads=1)
    offline = features_for_video(backbone, videos[video], sampling)  # what tal extract's workers run per video
    provenance = provenance_for(backbone, sampling, settings_json(config, sampling))
    featurizer = IncrementalFeaturizer(provenance.to_dict(), "cpu", num_threads=1, native_fps=FPS)
    assert featurizer.timing == offline.timing
    pushed, tail = _push_all(featurizer, videos[video])
    steps = pushed + tail
    assert [s.step for s in steps] == list(range(len(offline.features)))
    assert len(steps) == offline.features.shape[0] > 0
    got = np.stack([s.feature for s in steps])
    assert got.dtype == np.float32 and got.shape[1] == backbone.feature_dim
    np.testing.assert_allclose(got, offline.features, rtol=0, atol=1e-4)
    if video != "short":
        assert np.abs(np.diff(got, axis=0)).max() > 1e-3  # the steps differ: the comparison is not vacuous
        assert len(tail) <= 2 and len(pushed) >= len(steps) - 2  # computed as the frames came, not at the end
        arrivals = [s.arrival for s in steps]
        assert arrivals == sorted(arrivals)


def test_a_step_is_ready_as_soon_as_its_frames_are(scripted, videos):
    sampling = SamplingConfig(fps=10.0, window=4, stride=2, chunk_frames=8)
    featurizer = IncrementalFeaturizer.from_parts(build_backbone(_config(scripted, "frame"), "cpu", num_threads=1), sampling)
    frames = decode_all(videos["mp4"])
    ready_after = {}
    for k, (pts, image) in enumerate(frames):
        for step in featurizer.push(pts, featurizer._at_decode_size(image), arrival=float(k)):
            ready_after[step.step] = (k, step.arrival)
    # at the native rate, step i's last frame 2i + 3 is known the moment it is pushed (its pts is exactly (2i + 3) / fps)
    assert ready_after == {i: (2 * i + 3, float(2 * i + 3)) for i in range(14)}
    assert [s.step for s in featurizer.finish()] == []  # (30 - 4) // 2 + 1 = 14 steps, all out already
    with pytest.raises(RuntimeError, match="finished"):
        featurizer.push(3.0, frames[0].image)


def test_featurizer_rejects_bad_frames_and_skips_frames_out_of_order(scripted):
    featurizer = IncrementalFeaturizer.from_parts(
        build_backbone(_config(scripted, "frame"), "cpu", num_threads=1), SamplingConfig(fps=10.0, window=1, stride=1)
    )
    with pytest.raises(ValueError, match="uint8 RGB"):
        featurizer.push(0.0, np.zeros((32, 48), np.uint8))
    with pytest.raises(ValueError, match="finite"):
        featurizer.push(float("nan"), np.zeros((32, 48, 3), np.uint8))
    assert len(featurizer.push(0.0, np.zeros((32, 48, 3), np.uint8))) == 1
    assert featurizer.push(0.0, np.ones((32, 48, 3), np.uint8)) == [] and featurizer.skipped == 1
    with pytest.raises(ValueError, match="native_fps"):
        IncrementalFeaturizer.from_parts(featurizer.backbone, SamplingConfig(fps=None, window=1, stride=1))


@pytest.fixture
def one_thread_here():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_imported_features_have_no_featurizer():
    from pipelines.extract import FeaturizerUnavailable

    with pytest.raises(FeaturizerUnavailable, match="not extracted by tal extract"):
        IncrementalFeaturizer({"backbone": "i3d", "feature_dim": 2048, "extract_config": ""})
