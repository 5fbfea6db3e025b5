"""Video decoding: the two real videos in ../shared/data/videos, small videos written here with
PyAV (constant and variable frame rate, odd sizes), real damaged files made from them, and S3
through a local moto server."""

from __future__ import annotations

import fractions
import inspect
import pickle
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from pipelines.video import (
    REASONS,
    FrameChunk,
    VideoDecodeError,
    VideoInfo,
    iter_frames,
    open_uri,
    probe,
    sample_indices,
    sample_times,
)

# every test decodes something: a hang (FFmpeg on a damaged file) must fail, not stall the suite
pytestmark = pytest.mark.timeout(60)

VIDEOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "videos"
BBB = VIDEOS / "bigbuckbunny_720p_h264.mp4"  # H.264 1280x720, 25 fps, 132 frames, AAC audio, 'moov' at the end
CITY = VIDEOS / "city_405p_mpeg2.mpg"  # MPEG-PS / MPEG-2 720x405, 25 fps, 190 frames, first pts 0.54 s


@pytest.fixture(scope="module")
def real() -> Path:
    if not (BBB.is_file() and CITY.is_file()):
        pytest.skip(f"real videos not found in {VIDEOS} (the shared data folder beside the repository)")
    return VIDEOS


# --- writing small videos ---------------------------------------------------------------------------
def write_video(
    path: Path, frames: list[np.ndarray], *, fps: int = 10, codec: str = "libx264", pix_fmt: str = "yuv420p", pts_ms=None
) -> Path:
    """Encode RGB frames at high quality; ``pts_ms`` gives each frame's presentation time in ms
    (variable rate)."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.bit_rate = 4_000_000  # near lossless at these sizes, so a frame's colour names it
        if pts_ms is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def solid(level: int, width: int = 64, height: int = 48) -> np.ndarray:
    """A frame whose red level names it (green and blue fixed)."""
    image = np.empty((height, width, 3), np.uint8)
    image[...] = (level, 128, 64)
    return image


def red(frames: np.ndarray) -> np.ndarray:
    """[n] mean red level of each frame."""
    return frames[..., 0].reshape(len(frames), -1).mean(axis=1)


def remux(src: Path, dst: Path, *, kind: str = "video", options: dict | None = None) -> Path:
    """Copy one stream of ``src`` into a new container (no re-encoding)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options=options or {}) as out:
        stream = inp.streams.video[0] if kind == "video" else inp.streams.audio[0]
        copy = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is None:
                continue
            packet.stream = copy
            out.mux(packet)
    return dst


def cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def decode_all(uri, **kwargs) -> tuple[VideoInfo, list[FrameChunk]]:
    info, chunks = iter_frames(uri, **kwargs)
    return info, list(chunks)


def cat(chunks: list[FrameChunk]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([c.frames for c in chunks]), np.concatenate([c.times for c in chunks])


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Small videos written for these tests."""
    d = tmp_path_factory.mktemp("videos")
    return {
        # 3 s, 64x48, 10 fps: frame i has red level 8 i
        "cfr10": write_video(d / "cfr10.mp4", [solid(8 * i) for i in range(30)], fps=10),
        # 2 s at 25 fps: frame i has red level 5 i
        "cfr25": write_video(d / "cfr25.mp4", [solid(5 * i) for i in range(50)], fps=25),
        # 97x55: odd sizes with 4:2:0 chroma (x264 refuses odd 4:2:0, MPEG-4 part 2 takes it)
        "odd": write_video(d / "odd.mp4", [solid(8 * i, 97, 55) for i in range(30)], fps=10, codec="mpeg4"),
        # 12 frames at irregular times; frame i has red level 20 i
        "vfr": write_video(
            d / "vfr.mp4",
            [solid(20 * i) for i in range(12)],
            pts_ms=[0, 100, 150, 400, 450, 500, 900, 1000, 1033, 1066, 1500, 2000],
        ),
    }


# --- sampling -------------------------------------------------------------------------------------
def test_sample_times_are_k_over_fps_before_the_end():
    np.testing.assert_allclose(sample_times(3.0, 10), np.arange(30) / 10)  # 3.0 * 10 = 30.000000000000004
    assert len(sample_times(5.28, 5)) == 27  # 0 .. 5.2
    assert len(sample_times(7.6, 5)) == 38  # 7.6 itself is not before the end
    assert len(sample_times(2.2000000477, 10)) == 22  # a float32 duration a hair above 2.2
    assert len(sample_times(0.05, 5)) == 1  # t = 0 always, for any video with a frame
    assert len(sample_times(0.0, 5)) == 0
    np.testing.assert_allclose(sample_times(1.0, 3), [0, 1 / 3, 2 / 3])


@pytest.mark.parametrize("fps", [0, -5, float("nan"), float("inf"), True, "5"])
def test_sample_times_refuses_a_bad_rate(fps):
    with pytest.raises(ValueError, match="fps"):
        sample_times(3.0, fps)


def test_sample_indices_at_a_constant_rate():
    info = VideoInfo("x", num_frames=132, native_fps=25.0, duration=5.28, width=1, height=1)
    np.testing.assert_array_equal(sample_indices(info, 5), np.arange(0, 132, 5))
    np.testing.assert_array_equal(sample_indices(info, None), np.arange(132))
    # above the native rate every frame repeats: 50 fps from 25 fps -> 0, 0, 1, 1, ...
    np.testing.assert_array_equal(sample_indices(info, 50), np.repeat(np.arange(132), 2))
    # rates that do not divide take the frame on screen: t = 0, 1/3, 2/3, ... -> floor(25 t)
    np.testing.assert_array_equal(sample_indices(info, 3)[:4], [0, 8, 16, 25])


def test_sample_indices_follow_the_frame_times():
    starts = np.array([0, 0.1, 0.15, 0.4, 0.45, 0.5, 0.9, 1.0, 1.033, 1.066, 1.5, 2.0])
    info = VideoInfo("x", num_frames=12, native_fps=12 / 2.033, duration=2.033, width=1, height=1)
    # t = 0.0 0.1 0.2 ... 2.0: the last frame that started at or before t
    expected = [0, 1, 2, 2, 3, 5, 5, 5, 5, 6, 7, 9, 9, 9, 9, 10, 10, 10, 10, 10, 11]
    np.testing.assert_array_equal(sample_indices(info, 10, frame_times=starts), expected)
    with pytest.raises(ValueError, match="shape"):
        sample_indices(info, 10, frame_times=starts[:5])


# --- the real videos --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, frames, duration, size",
    [("bigbuckbunny_720p_h264.mp4", 132, 5.28, (1280, 720)), ("city_405p_mpeg2.mpg", 190, 7.6, (720, 405))],
)
def test_probe_real_videos(real, name, frames, duration, size):
    info = probe(real / name)
    assert (info.num_frames, (info.width, info.height)) == (frames, size)
    assert info.native_fps == pytest.approx(25.0)
    assert info.duration == pytest.approx(duration, abs=1e-9)
    assert info.uri == str(real / name)


@pytest.mark.parametrize("name", ["bigbuckbunny_720p_h264.mp4", "city_405p_mpeg2.mpg"])
def test_fps5_from_25fps_takes_every_fifth_frame(real, name):
    info, native = decode_all(real / name, fps=None, chunk_frames=64)
    all_frames, all_times = cat(native)
    assert len(all_frames) == info.num_frames
    np.testing.assert_allclose(all_times, np.arange(info.num_frames) / 25, atol=1e-9)  # MPEG-PS's 0.54 s start is time 0

    info5, chunks = decode_all(real / name, fps=5, chunk_frames=8)
    frames, times = cat(chunks)
    expected = sample_times(info5.duration, 5)
    assert len(frames) == len(expected) == len(sample_indices(info5, 5))
    np.testing.assert_allclose(times, expected, atol=1e-9)
    np.testing.assert_array_equal(frames, all_frames[::5])


def test_frames_match_an_independent_decoder(real):
    """OpenCV's FFmpeg agrees frame for frame. (decord2 3.4.0 does not on this file: its frame i is
    the true frame i + 12, and its last 13 frames repeat one picture.)"""
    capture = cv2.VideoCapture(str(CITY))
    reference = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        reference.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    _, chunks = decode_all(CITY, fps=5, chunk_frames=16)
    frames, _ = cat(chunks)
    assert len(reference) == 190
    for k, frame in enumerate(frames):
        i = 5 * k
        diffs = {j: np.abs(frame.astype(np.int16) - reference[j]).mean() for j in range(max(0, i - 12), min(190, i + 13))}
        assert min(diffs, key=diffs.get) == i and diffs[i] < 3, f"sampled frame {k}: best match {min(diffs, key=diffs.get)}, want {i}"


def test_resize_is_done_while_decoding_and_close_to_area_averaging(real):
    _, full = decode_all(BBB, fps=5, chunk_frames=32)
    _, small = decode_all(BBB, fps=5, chunk_frames=32, resize=(224, 160))
    full_frames, _ = cat(full)
    small_frames, small_times = cat(small)
    assert small_frames.shape == (27, 160, 224, 3) and small_frames.dtype == np.uint8
    reference = np.stack([cv2.resize(f, (224, 160), interpolation=cv2.INTER_AREA) for f in full_frames])
    assert np.abs(small_frames.astype(np.int16) - reference).mean() < 2
    np.testing.assert_allclose(small_times, sample_times(5.28, 5), atol=1e-9)


# --- small videos written here ---------------------------------------------------------------------
def test_native_rate_keeps_every_frame(made):
    info, chunks = decode_all(made["cfr10"], fps=None)
    assert (info.num_frames, info.native_fps, info.duration, info.width, info.height) == (30, 10.0, 3.0, 64, 48)
    frames, times = cat(chunks)
    assert frames.shape == (30, 48, 64, 3) and frames.dtype == np.uint8 and frames.flags.c_contiguous
    np.testing.assert_allclose(times, np.arange(30) / 10, atol=1e-9)
    np.testing.assert_allclose(red(frames), 8 * np.arange(30), atol=3)


def test_fps5_from_25fps_by_content(made):
    info, chunks = decode_all(made["cfr25"], fps=5)
    frames, times = cat(chunks)
    assert len(frames) == len(sample_times(info.duration, 5)) == 10
    np.testing.assert_allclose(red(frames), 5 * np.arange(0, 50, 5), atol=3)  # frames 0, 5, 10, ...
    np.testing.assert_allclose(times, sample_times(2.0, 5), atol=1e-9)


def test_rates_that_do_not_divide_and_upsampling(made):
    _, chunks = decode_all(made["cfr10"], fps=3)  # t = k / 3 -> frames 0, 3, 6, 10, 13, ...
    frames, times = cat(chunks)
    np.testing.assert_allclose(red(frames), 8 * np.array([0, 3, 6, 10, 13, 16, 20, 23, 26]), atol=3)
    np.testing.assert_allclose(times, [0, 0.3, 0.6, 1.0, 1.3, 1.6, 2.0, 2.3, 2.6], atol=1e-9)  # the frames' own times

    _, chunks = decode_all(made["cfr10"], fps=20, chunk_frames=7)  # every frame twice
    frames, _ = cat(chunks)
    assert len(frames) == 60
    np.testing.assert_array_equal(frames[0::2], frames[1::2])
    np.testing.assert_allclose(red(frames[0::2]), 8 * np.arange(30), atol=3)


def test_variable_frame_rate_maps_by_timestamps(made):
    info, chunks = decode_all(made["vfr"], fps=10, chunk_frames=5)
    assert info.num_frames == 12 and 2.0 < info.duration < 2.2
    frames, times = cat(chunks)
    # the frames of test_sample_indices_follow_the_frame_times
    expected = np.array([0, 1, 2, 2, 3, 5, 5, 5, 5, 6, 7, 9, 9, 9, 9, 10, 10, 10, 10, 10, 11])
    assert len(frames) == len(sample_times(info.duration, 10)) == len(expected)
    np.testing.assert_allclose(red(frames), 20 * expected, atol=3)
    starts = np.array([0, 0.1, 0.15, 0.4, 0.45, 0.5, 0.9, 1.0, 1.033, 1.066, 1.5, 2.0])
    np.testing.assert_allclose(times, starts[expected], atol=1e-9)
    # assuming a constant rate would have taken other frames
    assert not np.array_equal(sample_indices(info, 10), expected)


def test_odd_sizes(made):
    info = probe(made["odd"])
    assert (info.width, info.height, info.num_frames) == (97, 55, 30)
    _, chunks = decode_all(made["odd"], fps=None, chunk_frames=8)
    frames, _ = cat(chunks)
    assert frames.shape == (30, 55, 97, 3)
    np.testing.assert_allclose(red(frames), 8 * np.arange(30), atol=4)
    _, chunks = decode_all(made["odd"], fps=5, resize=(33, 21))
    assert cat(chunks)[0].shape == (15, 21, 33, 3)
    # a resize computed from the native size: the short side to 20 pixels
    _, chunks = decode_all(made["odd"], fps=5, resize=lambda w, h: (round(w * 20 / h), 20))
    assert cat(chunks)[0].shape == (15, 20, 35, 3)


def test_chunks_are_bounded_contiguous_and_independent_of_the_chunk_size(made):
    _, one = decode_all(made["cfr10"], fps=None, chunk_frames=1000)
    _, many = decode_all(made["cfr10"], fps=None, chunk_frames=7)
    assert [len(c) for c in many] == [7, 7, 7, 7, 2]
    assert [c.start for c in many] == [0, 7, 14, 21, 28]
    np.testing.assert_array_equal(cat(many)[0], cat(one)[0])
    np.testing.assert_array_equal(cat(many)[1], cat(one)[1])


def test_iteration_is_lazy(made):
    info, chunks = iter_frames(made["cfr10"], fps=None, chunk_frames=4)
    assert inspect.getgeneratorstate(chunks) == inspect.GEN_CREATED  # nothing decoded yet
    first = next(chunks)
    assert (first.start, len(first)) == (0, 4)
    chunks.close()  # stopping early is fine and frees the decoder


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_memory_stays_at_one_chunk_however_long_the_video(tmp_path):
    """RSS (decoders' C buffers included, which tracemalloc cannot see) while 340 MiB of frames
    pass through in 3.7 MiB chunks, and while the consumer pauses between chunks (decord decodes
    ahead during such pauses: 1.7 GB after a 3 s pause on a 640x480 video)."""
    width, height, n = 320, 240, 1600
    base = np.zeros((height, width, 3), np.uint8)
    base[..., 0] = np.arange(width)[None, :] % 256
    base[..., 1] = np.arange(height)[:, None]
    path = tmp_path / "long.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1), format="rgb24")))
        container.mux(stream.encode())

    info, chunks = iter_frames(path, fps=None, chunk_frames=16)
    before = _rss_mib()
    growth, total, count = [], 0, 0
    for chunk in chunks:
        assert len(chunk) <= 16
        total += chunk.frames.nbytes
        count += len(chunk)
        if chunk.start == 16 * 10:
            paused = _rss_mib()
            time.sleep(0.5)  # a slow consumer: nothing may decode meanwhile
            assert _rss_mib() - paused < 4
        growth.append(_rss_mib() - before)
    assert count == info.num_frames == n
    assert total > 300 * 2**20
    assert max(growth) < 64, f"RSS grew by {max(growth):.0f} MiB while decoding {total / 2**20:.0f} MiB of frames"
    half = len(growth) // 2
    assert max(growth[half:]) < max(growth[:half]) + 8, "memory keeps growing with the video"


# --- bad inputs --------------------------------------------------------------------------------------
def raises(reason: str, uri, **kwargs) -> VideoDecodeError:
    with pytest.raises(VideoDecodeError) as caught:
        probe(uri, **kwargs)
    assert caught.value.reason == reason, str(caught.value)
    assert str(caught.value).startswith(f"{uri}: {reason}: ")
    with pytest.raises(VideoDecodeError) as again:  # iter_frames refuses the same input the same way
        iter_frames(uri, fps=5, **kwargs)
    assert again.value.reason == reason
    return caught.value


def test_missing_empty_text_and_directory(tmp_path):
    raises("missing", tmp_path / "nope.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    raises("empty", tmp_path / "empty.mp4")
    (tmp_path / "notes.mp4").write_text("these are meeting notes, not a video\n" * 50)
    e = raises("not_a_video", tmp_path / "notes.mp4")
    assert "text" in e.detail and "meeting notes" in e.detail
    raises("not_a_video", tmp_path)


def test_binary_garbage_is_not_a_video(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    raises("not_a_video", tmp_path / "noise.mp4")


@pytest.mark.parametrize("fraction", [0.4, 0.95])
def test_cut_mp4_with_the_index_at_the_end(real, tmp_path, fraction):
    """bigbuckbunny keeps its 'moov' index after the media: any cut loses it, so not a frame can
    be found; the message says so instead of FFmpeg's "moov atom not found"."""
    e = raises("truncated", cut(BBB, tmp_path / "cut.mp4", fraction))
    assert "'moov' index" in e.detail and "cut short" in e.detail and f"{round(100 * fraction)}% present" in e.detail


@pytest.mark.parametrize("fraction", [0.4, 0.95])
def test_cut_mp4_with_the_index_first_and_cut_matroska(real, tmp_path, fraction):
    """With the index first (faststart) FFmpeg would decode the part that is there; the box sizes
    show the cut, so the video is refused before any work."""
    fast = remux(BBB, tmp_path / "fast.mp4", options={"movflags": "faststart"})
    assert probe(fast).num_frames == 132
    e = raises("truncated", cut(fast, tmp_path / "fastcut.mp4", fraction))
    assert "'mdat' box" in e.detail and "'moov'" not in e.detail
    mkv = remux(BBB, tmp_path / "bbb.mkv")
    assert probe(mkv).num_frames == 132
    e = raises("truncated", cut(mkv, tmp_path / "cut.mkv", fraction))
    assert "Matroska Segment" in e.detail


def test_corrupt_data_fails_from_the_iterator_after_the_good_part(real, tmp_path):
    fast = remux(BBB, tmp_path / "fast.mp4", options={"movflags": "faststart"})
    data = bytearray(fast.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 20_000] = b"\xff" * 20_000
    (tmp_path / "corrupt.mp4").write_bytes(bytes(data))
    info, chunks = iter_frames(tmp_path / "corrupt.mp4", fps=None, chunk_frames=8)  # the structure is intact
    assert info.num_frames == 132
    good = []
    with pytest.raises(VideoDecodeError) as caught:
        for chunk in chunks:
            good.append(chunk)
    assert caught.value.reason == "truncated"
    assert "corrupt" in caught.value.detail
    assert len(good) >= 1  # the frames before the damage came out first
    _, clean = decode_all(fast, fps=None, chunk_frames=8)
    np.testing.assert_array_equal(good[0].frames, clean[0].frames)


def test_media_that_ends_before_its_index_fails_from_the_iterator(real, tmp_path):
    """A cut faststart MP4 whose 'mdat' says "to the end of the file" (size 0, as a writer that
    never finished leaves it): nothing shows the cut until the decoder runs out of data."""
    fast = remux(BBB, tmp_path / "fast.mp4", options={"movflags": "faststart"})
    data = bytearray(cut(fast, tmp_path / "cut.mp4", 0.95).read_bytes())
    mdat = data.find(b"mdat") - 4
    data[mdat : mdat + 4] = b"\0\0\0\0"
    (tmp_path / "open_ended.mp4").write_bytes(bytes(data))
    info, chunks = iter_frames(tmp_path / "open_ended.mp4", fps=None, chunk_frames=16)
    with pytest.raises(VideoDecodeError) as caught:
        for _ in chunks:
            pass
    assert caught.value.reason == "truncated" and f"indexes {info.num_frames}" in caught.value.detail


def test_cut_mpeg_ps_decodes_as_a_shorter_video(real, tmp_path):
    """A known limit: MPEG-PS states no length anywhere, so a cut one is a valid shorter video."""
    info, chunks = decode_all(cut(CITY, tmp_path / "cut.mpg", 0.4), fps=5)
    assert 60 < info.num_frames < 80 and len(cat(chunks)[0]) == len(sample_times(info.duration, 5))


def test_audio_only_still_image_no_streams_and_unknown_codec(real, made, tmp_path):
    e = raises("not_a_video", remux(BBB, tmp_path / "audio.m4a", kind="audio"))
    assert "no video stream" in e.detail and "aac" in e.detail

    with av.open(str(tmp_path / "still.png"), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(solid(10), format="rgb24")))
        container.mux(stream.encode())
    assert "still image" in raises("not_a_video", tmp_path / "still.png").detail

    with av.open(str(tmp_path / "nothing.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    raises("empty", tmp_path / "nothing.mp4")

    # a real MP4 whose sample entry names a codec nobody implements (as a proprietary one would)
    (tmp_path / "unknown.mp4").write_bytes(made["cfr10"].read_bytes().replace(b"avc1", b"zzz1"))
    raises("unsupported_codec", tmp_path / "unknown.mp4")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"fps": 0}, "fps"), ({"fps": -5}, "fps"), ({"fps": 5, "chunk_frames": 0}, "chunk_frames"), ({"fps": 5, "resize": (0, 10)}, "resize")],
)
def test_bad_arguments_are_value_errors(made, kwargs, match):
    with pytest.raises(ValueError, match=match):
        iter_frames(made["cfr10"], **kwargs)


def test_the_error_pickles_and_names_its_reason():
    e = VideoDecodeError("truncated", "s3://b/v.mp4", "cut at 40%")
    assert str(e) == "s3://b/v.mp4: truncated: cut at 40%"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is VideoDecodeError and (back.reason, back.uri, back.detail) == (e.reason, e.uri, e.detail)
    assert str(back) == str(e)
    assert set(REASONS) == {"missing", "empty", "not_a_video", "truncated", "unsupported_codec", "unreadable"}
    with pytest.raises(ValueError, match="reason"):
        VideoDecodeError("weird", "x", "y")


# --- S3 ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bucket(moto_s3, real) -> str:
    moto_s3.fs.mkdir("video-tests")
    moto_s3.fs.put_file(str(BBB), "video-tests/bbb.mp4")
    moto_s3.fs.put_file(str(CITY), "video-tests/clips/city.mpg")
    return "s3://video-tests"


def test_s3_probe_and_frames_equal_the_local_file(moto_s3, bucket):
    for key, local in (("bbb.mp4", BBB), ("clips/city.mpg", CITY)):
        uri = f"{bucket}/{key}"
        info = probe(uri, filesystem=moto_s3.fs)
        assert info == VideoInfo(**{**probe(local).__dict__, "uri": uri})
        s3_info, s3_chunks = decode_all(uri, fps=5, chunk_frames=10, resize=(160, 90), filesystem=moto_s3.fs)
        _, local_chunks = decode_all(local, fps=5, chunk_frames=10, resize=(160, 90))
        assert s3_info == info
        np.testing.assert_array_equal(cat(s3_chunks)[0], cat(local_chunks)[0])
        np.testing.assert_array_equal(cat(s3_chunks)[1], cat(local_chunks)[1])
    with open_uri(f"{bucket}/bbb.mp4", moto_s3.fs) as f:
        assert f.read(12)[4:8] == b"ftyp"


def test_s3_bad_objects(moto_s3, bucket, tmp_path):
    fs = moto_s3.fs
    raises("missing", f"{bucket}/no-such-video.mp4", filesystem=fs)
    raises("missing", "s3://no-such-bucket/v.mp4", filesystem=fs)
    fs.pipe_file("video-tests/empty.mp4", b"")
    raises("empty", f"{bucket}/empty.mp4", filesystem=fs)
    fs.pipe_file("video-tests/notes.mp4", b"not a video\n" * 100)
    raises("not_a_video", f"{bucket}/notes.mp4", filesystem=fs)
    fs.pipe_file("video-tests/cut.mp4", BBB.read_bytes()[:400_000])
    assert "'moov' index" in raises("truncated", f"{bucket}/cut.mp4", filesystem=fs).detail
