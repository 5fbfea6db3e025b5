"""The synthetic archive (``tal synth``): real H.264 files that decode, ground truth that agrees
across both formats, deterministic content, classes that are visible, and clear argument errors."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from jobs.cli import synth as synth_cli
from jobs.errors import UsageError
from pipelines.annotations import read_activitynet, read_thumos14_json
from pipelines.synth import (
    MAX_CLASSES,
    SUBSETS,
    SynthResult,
    action_classes,
    opacity,
    plan_archive,
    synthesize,
)

FPS = 15.0
SIZE = (320, 240)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> SynthResult:
    out = tmp_path_factory.mktemp("synth")
    return synthesize(out, videos=5, seed=3, duration_range=(6.0, 12.0), size=SIZE, fps=FPS, workers=2, progress=False)


def decode(path: Path) -> np.ndarray:
    """[T, H, W, 3] uint8 RGB, every frame (PyAV, an independent reader of the files)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def keyframes_and_rate(path: Path) -> tuple[list[int], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]
        packets.sort(key=lambda p: p.pts)
        return [i for i, p in enumerate(packets) if p.is_keyframe], float(stream.average_rate)


def rows(video) -> list[tuple[float, float, int]]:
    return [(s, e, int(c)) for (s, e), c in zip(video.segments, video.labels)]


# --- the files ------------------------------------------------------------------------------------
def test_videos_decode_with_the_planned_frame_count_size_fps_and_keyframes(archive):
    assert len(archive.videos) == 5 and archive.workers == 2
    for vid, path in archive.videos.items():
        assert path.parent == archive.root / "videos" and path.name == f"{vid}.mp4"
        frames = decode(path)
        keyframes, rate = keyframes_and_rate(path)
        video = archive.annotations[vid]
        assert len(frames) == round(video.duration * FPS) and 6.0 - 1 / FPS <= video.duration <= 12.0 + 1 / FPS
        assert frames[0].shape == (SIZE[1], SIZE[0], 3)
        assert rate == pytest.approx(FPS)
        assert keyframes[:3] == [0, 30, 60]  # a keyframe every 2 s
    # written atomically: nothing but the final files is left behind
    assert sorted(p.name for p in (archive.root / "videos").iterdir()) == sorted(f"{v}.mp4" for v in archive.videos)
    assert archive.frames == sum(round(v.duration * FPS) for v in archive.annotations)
    assert archive.bytes_written == sum(p.stat().st_size for p in archive.videos.values())


def test_both_annotation_files_read_back_to_the_result(archive):
    anet = read_activitynet(archive.activitynet_json)
    thumos = read_thumos14_json(archive.thumos14_json)
    expected = archive.annotations
    # label ids follow the sorted names, so the ActivityNet reader's numbering is ours too
    assert anet.label_map == thumos.label_map == expected.label_map
    assert expected.label_map.names == [c.name for c in archive.classes] == sorted(c.name for c in archive.classes)
    assert list(anet.videos) == list(thumos.videos) == list(expected.videos) == list(archive.videos)
    for vid, video in expected.videos.items():
        for read in (anet[vid], thumos[vid]):
            assert rows(read) == rows(video)  # JSON floats round-trip exactly
            assert read.duration == pytest.approx(video.duration) and read.subset == video.subset
        assert thumos[vid].fps == FPS


def test_subsets_segments_and_classes(archive):
    ann = archive.annotations
    assert ann.subsets == sorted(SUBSETS)
    assert [sum(v.subset == s for v in ann) for s in SUBSETS] == [3, 1, 1]
    assert ann.num_instances > 0
    for video in ann:
        segments = video.segments.data
        assert (segments[:, 0] > 0).all() and (segments[:, 1] < video.duration).all()
        assert (segments[:, 1] - segments[:, 0] > 0).all()
        assert ((video.labels >= 0) & (video.labels < 5)).all()


# --- timelines --------------------------------------------------------------------------------------
def union_length(segments: np.ndarray) -> float:
    total, reach = 0.0, -np.inf
    for s, e in sorted(segments.tolist()):
        total += max(0.0, e - max(s, reach))
        reach = max(reach, e)
    return total


def test_timelines_are_background_dominated_with_short_long_and_overlapping_instances():
    plans = plan_archive(videos=200, seed=0, duration_range=(20.0, 120.0))  # no pixels: fast
    lengths, coverage, overlaps = [], [], 0
    for plan in plans:
        seg = np.array([[x.start, x.end] for x in plan.instances])
        lengths += (seg[:, 1] - seg[:, 0]).tolist()
        coverage.append(union_length(seg) / plan.duration)
        for a, b in itertools.combinations(plan.instances, 2):
            if min(a.end, b.end) > max(a.start, b.start):
                overlaps += 1
        for x in plan.instances:  # the whole fade fits in the video; fades of 0.3-0.5 s unless the instance is shorter
            assert x.start - x.fade_in / 2 >= -1e-3 and x.end + x.fade_out / 2 <= plan.duration + 1e-3
            for fade in (x.fade_in, x.fade_out):
                assert 0.3 <= fade <= 0.5 or fade == pytest.approx(x.end - x.start, abs=1e-3)
    lengths, coverage = np.array(lengths), np.array(coverage)
    assert lengths.min() < 1.0 and lengths.max() > 20.0
    assert 0.15 < (lengths < 1.0).mean() < 0.4
    assert coverage.min() >= 0.15 and coverage.max() <= 0.5 + 1e-3 and 0.25 < coverage.mean() < 0.45
    assert overlaps > 50
    # a video's timeline depends on its index and the seed, not on how many videos there are
    assert [p.instances for p in plan_archive(videos=3, seed=0)] == [p.instances for p in plans[:3]]


def test_the_annotated_segment_is_where_the_object_is_at_least_half_visible():
    start, end, fade_in, fade_out = 2.0, 5.0, 0.4, 0.3
    t = np.linspace(0.0, 7.0, 7001)
    alpha = opacity(t, start, end, fade_in, fade_out)
    half = alpha >= 0.5
    assert t[half].min() == pytest.approx(start, abs=1e-3) and t[half].max() == pytest.approx(end, abs=1e-3)
    assert opacity(start, start, end, fade_in, fade_out) == 0.5 == opacity(end, start, end, fade_in, fade_out)
    # it appears over fade_in around the start, and disappears over fade_out around the end
    assert opacity(start - fade_in / 2, start, end, fade_in, fade_out) == pytest.approx(0.0, abs=1e-12)
    assert opacity(start + fade_in / 2, start, end, fade_in, fade_out) == pytest.approx(1.0, abs=1e-12)
    assert opacity(end + fade_out / 2, start, end, fade_in, fade_out) == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(alpha[t <= 3.0]) >= 0) and np.all(np.diff(alpha[t >= 4.0]) <= 0)


def test_class_designs_are_distinct():
    designs = action_classes(MAX_CLASSES)
    assert len({(d.shape, d.motion) for d in designs}) == MAX_CLASSES
    first = [d for d in designs if d.name in {c.name for c in action_classes(6)}]
    for attribute in ("shape", "motion", "colour"):  # the first six differ in every attribute
        assert len({getattr(d, attribute) for d in first}) == 6


# --- determinism --------------------------------------------------------------------------------------
def test_same_seed_same_archive_whatever_the_workers_and_another_seed_differs(tmp_path):
    kwargs = dict(videos=2, duration_range=(3.0, 4.0), size=(160, 120), fps=FPS, progress=False)
    a = synthesize(tmp_path / "a", seed=11, workers=1, **kwargs)
    b = synthesize(tmp_path / "b", seed=11, workers=2, **kwargs)
    c = synthesize(tmp_path / "c", seed=12, workers=1, **kwargs)
    for name in ("annotations_activitynet.json", "annotations_thumos14.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    vid = next(iter(a.videos))
    frames_a = decode(a.videos[vid])
    np.testing.assert_array_equal(frames_a, decode(b.videos[vid]))
    assert a.videos[vid].read_bytes() == b.videos[vid].read_bytes()
    frames_c = decode(c.videos[vid])
    n = min(len(frames_a), len(frames_c))
    assert np.abs(frames_a[:n].astype(np.int16) - frames_c[:n]).mean() > 10


# --- the classes can be seen --------------------------------------------------------------------------
def colour_signature(frames: np.ndarray) -> np.ndarray:
    """[T, 12]: per frame, the fraction of its pixels that are strongly saturated, by hue (30 deg bins).

    The background is muted and its clutter is small, so this barely moves over background frames
    and jumps with an action object's colour."""
    out = []
    for f in frames:
        hsv = cv2.cvtColor(f, cv2.COLOR_RGB2HSV)  # H in 0..179
        saturated = (hsv[..., 1] > 140) & (hsv[..., 2] > 90)
        out.append(np.bincount(hsv[..., 0][saturated] // 15, minlength=12)[:12] / saturated.size)
    return np.array(out)


def test_classes_differ_from_each_other_more_than_background_differs_from_itself(tmp_path):
    result = synthesize(tmp_path, videos=4, seed=5, classes=5, duration_range=(30.0, 30.0), size=(160, 120), workers=2, progress=False)
    per_class: dict[int, list[np.ndarray]] = {}
    background = []
    for video in result.annotations:
        signature = colour_signature(decode(result.videos[video.video_id]))
        t = (np.arange(len(signature)) + 0.5) / FPS
        seg = video.segments.data
        near = (t[None, :] > seg[:, :1] - 0.4) & (t[None, :] < seg[:, 1:] + 0.4)  # [N, T] incl. fades
        for i, label in enumerate(video.labels.tolist()):
            alone = (t > seg[i, 0] + 0.3) & (t < seg[i, 1] - 0.3) & (near.sum(axis=0) == 1)
            if alone.any():
                per_class.setdefault(label, []).append(signature[alone])
        background.append(signature[~near.any(axis=0)].mean(axis=0))
    class_means = {c: np.concatenate(s).mean(axis=0) for c, s in per_class.items()}
    assert len(class_means) >= 4, f"only classes {sorted(class_means)} appear alone"
    background_spread = max(np.linalg.norm(a - b) for a, b in itertools.combinations(background, 2))
    background_mean = np.mean(background, axis=0)
    for c, mean in class_means.items():
        assert np.linalg.norm(mean - background_mean) > 3 * background_spread, result.classes[c].name
    for a, b in itertools.combinations(class_means, 2):
        assert np.linalg.norm(class_means[a] - class_means[b]) > 3 * background_spread, (result.classes[a].name, result.classes[b].name)


# --- arguments and the command line ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"videos": 0}, r"videos must be a whole number >= 1, got 0"),
        ({"videos": 2.5}, r"videos must be a whole number"),
        ({"classes": 0}, r"classes must be a whole number in 1\.\.36, got 0"),
        ({"classes": MAX_CLASSES + 1}, r"classes must be a whole number in 1\.\.36"),
        ({"seed": -1}, r"seed must be a whole number >= 0"),
        (
            {"duration_range": (30.0, 20.0)},
            r"duration_range must be \(min_seconds, max_seconds\) with 2 <= min <= max, got \(30\.0, 20\.0\)",
        ),
        ({"duration_range": (1.0, 5.0)}, r"2 <= min <= max"),
        ({"duration_range": (5.0,)}, r"duration_range must be \(min_seconds, max_seconds\)"),
        ({"size": (321, 240)}, r"size must be \(width, height\), two even whole numbers >= 32"),
        ({"size": (320, 0)}, r"size must be"),
        ({"size": "320x240"}, r"size must be"),
        ({"fps": 0.0}, r"fps must be a number in 1\.\.120, got 0\.0"),
        ({"workers": 0}, r"workers must be a whole number >= 1"),
    ],
)
def test_bad_arguments_are_value_errors_that_say_what_to_fix(tmp_path, kwargs, message):
    args = {"videos": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        synthesize(tmp_path / "out", progress=False, **args)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tal")
    synth_cli.add_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_handler_writes_the_archive_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    args = parser().parse_args(
        ["synth", "--out", str(out), "--videos", "2", "--seed", "4", "--classes", "2", "--duration-range", "3", "3",
         "--size", "112x64", "--fps", "10", "--workers", "1"]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "Wrote 2 videos" in printed and "112x64 at 10 fps" in printed and str(out / "annotations_thumos14.json") in printed
    assert len(printed.strip().splitlines()) == 1
    frames = decode(out / "videos" / "synth_00000.mp4")
    assert len(frames) == 30 and frames[0].shape == (64, 112, 3)
    # every class appears once there are as many videos as classes, so both files name them all
    assert read_activitynet(out / "annotations_activitynet.json").label_map.names == [c.name for c in action_classes(2)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--size", "320by240"], r"--size: expected WIDTHxHEIGHT"),
        (["--size", "321x240"], r"--size: size must be \(width, height\), two even"),
        (["--videos", "0"], r"--videos: videos must be a whole number >= 1"),
        (["--duration-range", "20", "10"], r"--duration-range: duration_range must be"),
        (["--classes", "99"], r"--classes: classes must be a whole number in 1\.\.36"),
        (["--workers", "0"], r"--workers: workers must be"),
        (["--fps", "-3"], r"--fps: fps must be"),
    ],
)
def test_cli_bad_flag_values_are_usage_errors(tmp_path, flags, message):
    argv = ["synth", "--out", str(tmp_path / "x"), "--videos", "1", "--seed", "0", *flags]
    args = parser().parse_args(argv)
    with pytest.raises(UsageError, match=message):
        args.func(args)
    assert not (tmp_path / "x").exists()
