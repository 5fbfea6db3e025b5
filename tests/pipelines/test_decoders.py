"""Decoder backends (pipelines.decoders) and sampled-frame ranges (video.iter_frames' start_index /
stop_index), on real files: the two videos in ../shared/data/videos, a video of pipelines.synth
and small videos written here with PyAV (H.264 with B-frames, VP9 in Matroska, MPEG-4 in AVI).
No mocks: every backend decodes the files and is compared with PyAV's full decode."""

from __future__ import annotations

import fractions
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest

from pipelines import video
from pipelines.decoders import DECODERS, get_decoder
from pipelines.extract import SamplingConfig, extraction_settings, settings_json
from pipelines.video import FrameChunk, VideoDecodeError

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
VIDEOS = REPO.parent / "shared" / "data" / "videos"
BBB = VIDEOS / "bigbuckbunny_720p_h264.mp4"  # H.264 1280x720, 25 fps, 132 frames, one keyframe
CITY = VIDEOS / "city_405p_mpeg2.mpg"  # MPEG-PS / MPEG-2 720x405, 25 fps, 190 frames, a keyframe every 12
BACKENDS = ("decord", "torchcodec")

# cv2.INTER_AREA after RGB conversion (decord, torchcodec) against FFmpeg's area scaler on the YUV
# planes (PyAV), measured at fps=5 on Big Buck Bunny (224x126, 160x90, 340x192, 224x224) and the
# synthetic video (96x72, 112x112, 80x60): mean |difference| 0.98 - 1.79 levels, 99.9th percentile
# 19 - 24, single pixels at sharp colour edges up to 78 (chroma is scaled before, not after, RGB).
# It depends on the content: on pixel-sized colour noise (this file's write_video) the mean is 8 - 14.
RESIZE_MEAN_TOLERANCE = 2.5
RESIZE_P999_TOLERANCE = 32


def write_video(path: Path, n: int, *, codec: str = "libx264", fps: int = 25, size=(128, 96), options: dict | None = None) -> Path:
    """``n`` frames of a moving noise pattern whose top rows' red level is the frame number."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n):
            image = np.roll(base, 3 * i, axis=1)
            image[:8, :, 0] = (7 * i) % 256
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, fractions.Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    if not (BBB.is_file() and CITY.is_file()):
        pytest.skip(f"real videos not found in {VIDEOS} (the shared data folder beside the repository)")
    from pipelines.synth import synthesize

    d = tmp_path_factory.mktemp("decoders")
    synth = synthesize(d / "synth", videos=1, seed=3, duration_range=(12.0, 12.0), size=(160, 120), fps=15.0, workers=1, progress=False)
    return {
        "bbb": BBB,
        "city": CITY,
        # 180 frames at 15 fps, a keyframe every 30 (the test suite's synthetic archives)
        "synth": next(iter(synth.videos.values())),
        # B-frames (pts != dts) and a keyframe every 12
        "bframes": write_video(d / "bframes.mp4", 100, options={"g": "12", "keyint_min": "12", "sc_threshold": "0", "bf": "3"}),
        "vp9": write_video(d / "vp9.mkv", 60, codec="libvpx-vp9", options={"g": "15", "deadline": "realtime", "cpu-used": "8"}),
        "mpeg4": write_video(d / "mpeg4.avi", 50, codec="mpeg4", options={"g": "10"}),
        # decord2 3.4.0 fails on frames 96 pixels wide ("DECORDArrayCopyFromTo: The size must exactly match")
        "narrow": write_video(d / "narrow.mp4", 30, size=(96, 64)),
    }


def decode(decoder: str, uri, **kwargs) -> tuple[video.VideoInfo, list[FrameChunk]]:
    kwargs.setdefault("chunk_frames", 16)
    kwargs.setdefault("resize", None)
    info, chunks = get_decoder(decoder).iter_frames(uri, **kwargs)
    return info, list(chunks)


def frames_of(chunks: list[FrameChunk]) -> np.ndarray:
    return np.concatenate([c.frames for c in chunks]) if chunks else np.empty((0, 0, 0, 3), np.uint8)


def times_of(chunks: list[FrameChunk]) -> np.ndarray:
    return np.concatenate([c.times for c in chunks]) if chunks else np.empty(0)


def assert_same(got: list[FrameChunk], expected: list[FrameChunk]) -> None:
    assert [(c.start, len(c)) for c in got] == [(c.start, len(c)) for c in expected]
    np.testing.assert_array_equal(times_of(got), times_of(expected))
    np.testing.assert_array_equal(frames_of(got), frames_of(expected))


# --- choosing a decoder ------------------------------------------------------------------------
def test_get_decoder_knows_three_names():
    assert DECODERS == ("pyav", "decord", "torchcodec")
    assert get_decoder().name == "pyav" and get_decoder("pyav") is get_decoder()
    for name in DECODERS:
        assert get_decoder(name).name == name
    with pytest.raises(ValueError, match="unknown decoder 'opencv'.*pyav, decord, torchcodec"):
        get_decoder("opencv")


def test_importing_the_module_does_not_import_decord():
    code = "import sys, pipelines.decoders; print('decord' in sys.modules, 'torchcodec' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=100, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_decord_first_then_a_torch_matmul_does_not_crash():
    """decord imported before torch makes torch's first CPU matmul die (SIGSEGV in libnvblas):
    the backend imports torch first, so using it first is safe."""
    code = textwrap.dedent(
        f"""
        from pipelines.decoders import get_decoder
        info, chunks = get_decoder("decord").iter_frames({str(BBB)!r}, fps=5, chunk_frames=8, resize=(64, 36))
        n = sum(len(c) for c in chunks)
        import torch
        x = torch.randn(256, 256)
        print(n, float((x @ x).sum()) == float((x @ x).sum()), get_decoder("decord").used["decord"])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["27", "True", "1"]


def test_sampling_config_records_the_decoder():
    assert SamplingConfig().decoder == "pyav"
    with pytest.raises(ValueError, match="decoder must be one of"):
        SamplingConfig(decoder="opencv")
    from pipelines.backbones import BackboneConfig

    backbone = BackboneConfig(name="mobilenet_v2")
    recorded = {"extract_config": settings_json(backbone, SamplingConfig(fps=5.0, decoder="torchcodec"))}
    assert extraction_settings(recorded)[1].decoder == "torchcodec"
    # provenance written before the decoder was a setting reads back as PyAV
    old = json.loads(recorded["extract_config"])
    del old["sampling"]["decoder"]
    assert extraction_settings({"extract_config": json.dumps(old)})[1] == SamplingConfig(fps=5.0)


# --- the backends against PyAV -----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name, fps",
    [
        ("bbb", None),
        ("bbb", 5),
        ("synth", None),
        ("synth", 5),
        ("synth", 60),
        ("bframes", None),
        ("bframes", 60),
        ("vp9", None),
        ("vp9", 60),
    ],
)
def test_backend_frames_equal_pyav_exactly(files, backend, name, fps):
    """Where a backend is used (MP4/MKV, H.264/VP9) its frames are PyAV's, bit for bit (fps=60:
    every frame repeated, from 15 or 25 fps)."""
    info, expected = decode("pyav", files[name], fps=fps, chunk_frames=64)
    before = get_decoder(backend).used[backend]
    got_info, got = decode(backend, files[name], fps=fps, chunk_frames=64)
    assert got_info == info
    assert_same(got, expected)
    assert get_decoder(backend).used[backend] == before + 1  # it decoded the video itself


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, size", [("bbb", (224, 126)), ("bbb", (160, 90)), ("synth", (96, 72)), ("synth", (112, 112))])
def test_backend_resize_is_pyavs_size_and_close_to_its_pixels(files, backend, name, size):
    _, expected = decode("pyav", files[name], fps=5, resize=size)
    _, got = decode(backend, files[name], fps=5, resize=size)
    a, b = frames_of(got).astype(np.int16), frames_of(expected).astype(np.int16)
    assert a.shape == b.shape == (len(a), size[1], size[0], 3)
    diff = np.abs(a - b)
    assert diff.mean() <= RESIZE_MEAN_TOLERANCE and np.percentile(diff, 99.9) <= RESIZE_P999_TOLERANCE, (diff.mean(), diff.max())
    # a size function of the native size gives the same
    _, by_function = decode(backend, files[name], fps=5, resize=lambda w, h: size)
    np.testing.assert_array_equal(frames_of(by_function), frames_of(got))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["city", "mpeg4"])
def test_backend_hands_containers_it_misreads_to_pyav(files, backend, name, caplog):
    """On MPEG-PS both backends give wrong frames (frame i is the true i + 12): PyAV decodes it,
    visibly (a log line and the ``used`` count), and the frames are PyAV's."""
    decoder = get_decoder(backend)
    before = decoder.used.copy()
    _, expected = decode("pyav", files[name], fps=None, resize=(160, 90))
    with caplog.at_level(logging.INFO, logger="pipelines.decoders"):
        _, got = decode(backend, files[name], fps=None, resize=(160, 90))
    assert_same(got, expected)
    assert decoder.used["pyav"] == before["pyav"] + 1 and decoder.used[backend] == before[backend]
    assert f"decoded by PyAV instead of {backend}" in caplog.text and "is not among those" in caplog.text


def test_a_backend_error_hands_the_rest_to_pyav(files, caplog):
    decoder = get_decoder("decord")
    before = decoder.used.copy()
    _, expected = decode("pyav", files["narrow"], fps=None)
    with caplog.at_level(logging.INFO, logger="pipelines.decoders"):
        _, got = decode("decord", files["narrow"], fps=None)
    assert_same(got, expected)
    assert decoder.used["pyav"] == before["pyav"] + 1 and decoder.used["decord"] == before["decord"]
    assert "decoded by PyAV instead of decord from sampled frame 0: decord failed (DECORDError" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bad, reason",
    [("missing", "missing"), ("truncated", "truncated"), ("text", "not_a_video"), ("empty", "empty")],
)
def test_bad_inputs_give_pyavs_reasons(files, tmp_path, backend, bad, reason):
    path = tmp_path / {"missing": "nope.mp4", "truncated": "cut.mp4", "text": "notes.mp4", "empty": "empty.mp4"}[bad]
    if bad == "truncated":
        data = files["synth"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif bad == "text":
        path.write_text("id,label\nv1,3\n")
    elif bad == "empty":
        path.write_bytes(b"")
    errors = {}
    for name in ("pyav", backend):
        with pytest.raises(VideoDecodeError) as e:
            decode(name, path, fps=5)
        errors[name] = (e.value.reason, str(e.value))
    assert errors[backend] == errors["pyav"] and errors["pyav"][0] == reason


# --- ranges of sampled frames ------------------------------------------------------------------
def ranges(n: int) -> list[tuple[int, int | None]]:
    """Ranges of a sequence of ``n`` sampled frames: from the start, mid-way (mid-GOP), to the
    end, past the end, one frame, empty ones."""
    return [
        (0, 7),
        (1, 5),
        (13, 40),
        (n // 2, None),
        (n // 2 + 3, n - 4),
        (n - 3, n),
        (n - 1, n + 10),
        (n, None),
        (9, 9),
        (30, 20),
        (n + 5, None),
    ]


@pytest.mark.parametrize("name", ["synth", "bframes", "city", "bbb", "vp9"])
@pytest.mark.parametrize("fps", [None, 5, 60])
def test_pyav_range_equals_the_full_decode_bit_for_bit(files, name, fps):
    info, full = decode("pyav", files[name], fps=fps, resize=(160, 90) if name in ("bbb", "city") else None)
    frames, times = frames_of(full), times_of(full)
    n = len(frames)
    for start, stop in ranges(n):
        got_info, got = decode(
            "pyav", files[name], fps=fps, start_index=start, stop_index=stop, resize=(160, 90) if name in ("bbb", "city") else None
        )
        assert got_info == info  # the whole video's
        expected = slice(start, stop)
        assert sum(len(c) for c in got) == len(frames[expected]), (start, stop)
        if got:
            assert got[0].start == start and all(b.start == a.start + len(a) for a, b in zip(got, got[1:]))
            np.testing.assert_array_equal(frames_of(got), frames[expected])
            np.testing.assert_array_equal(times_of(got), times[expected])


@pytest.mark.parametrize("name, decodes_from", [("synth", "seeked"), ("bframes", "seeked"), ("city", "seeked"), ("bbb", "from_start")])
def test_a_late_range_seeks_to_a_keyframe(files, name, decodes_from):
    """A range in the second half starts at a keyframe (SEEK_STATS counts how each range was
    decoded): in MP4 and MPEG-PS alike. Big Buck Bunny's only keyframe is its first frame."""
    before = video.SEEK_STATS.copy()
    _, chunks = decode("pyav", files[name], fps=None, start_index=70, stop_index=80)
    assert sum(len(c) for c in chunks) == 10
    changed = {k: v - before[k] for k, v in video.SEEK_STATS.items() if v != before[k]}
    assert set(changed) - {"retried"} == {decodes_from}


def test_a_range_decodes_only_from_its_keyframe(files):
    """The seek starts at the last keyframe at or before the range (mid-GOP here), and packets
    before it are never decoded: the synthetic video's keyframes are every 30 frames."""
    plan = video.plan_frames(files["synth"], fps=None, start_index=100, stop_index=110)
    keys = plan.index.keys
    key = keys.start_for(float(plan.times[0]))
    assert keys.time[key] == pytest.approx(90 / 15) and keys.time[key + 1] > plan.times[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["synth", "bframes", "city"])
def test_backend_range_equals_its_full_decode(files, backend, name):
    """Ranges decoded by the backend itself (PyAV for MPEG-PS) equal its full decode."""
    engine = "pyav" if name == "city" else backend
    before = get_decoder(backend).used[engine]
    _, full = decode(backend, files[name], fps=10)
    frames = frames_of(full)
    n = len(frames)
    cases = [(1, 5), (n // 2, None), (n - 3, n + 4), (n, None), (6, 2)]
    for start, stop in cases:
        _, got = decode(backend, files[name], fps=10, start_index=start, stop_index=stop)
        assert sum(len(c) for c in got) == len(frames[start:stop])
        if got:
            assert got[0].start == start
            np.testing.assert_array_equal(frames_of(got), frames[start:stop])
    assert get_decoder(backend).used[engine] == before + 1 + sum(len(frames[a:b]) > 0 for a, b in cases)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("start, stop", [(-1, None), (0, -2), (1.5, None), (True, None)])
def test_bad_ranges_are_value_errors(files, decoder, start, stop):
    with pytest.raises(ValueError, match="start_index|stop_index"):
        get_decoder(decoder).iter_frames(files["bbb"], fps=5, chunk_frames=8, resize=None, start_index=start, stop_index=stop)


def test_s3_videos(moto_s3, files):
    """From S3 (a local moto server): torchcodec streams the object through a file object and
    gives PyAV's frames, a range included; decord would read it whole, so PyAV decodes it."""
    fs = moto_s3.fs
    fs.mkdir("decoder-tests")
    fs.put_file(str(files["synth"]), "decoder-tests/synth.mp4")
    uri = "s3://decoder-tests/synth.mp4"
    _, expected = decode("pyav", files["synth"], fps=5)
    for backend, engine in (("torchcodec", "torchcodec"), ("decord", "pyav")):
        before = get_decoder(backend).used[engine]
        _, got = decode(backend, uri, fps=5, filesystem=fs)
        assert_same(got, expected)
        _, part = decode(backend, uri, fps=5, filesystem=fs, start_index=40)
        assert [c.start for c in part][:1] == [40]
        np.testing.assert_array_equal(frames_of(part), frames_of(expected)[40:])
        assert get_decoder(backend).used[engine] == before + 2
