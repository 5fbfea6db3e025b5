"""Extraction at scale, on real files and a real local Ray: workers write the store themselves (the
driver receives metadata only), long videos are split into step ranges on several workers and
stitched back exactly, and a driver killed with SIGKILL loses nothing that was written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyFrameNet
from torch import nn

from pipelines.backbones import BackboneConfig, build_backbone
from pipelines.extract import ExtractConfig, SamplingConfig, VideoPlan, extract, features_for_range, features_for_video
from pipelines.store import MANIFEST_DIR, FeatureStore
from pipelines.synth import synthesize
from pipelines.video import probe

ROOT = Path(__file__).resolve().parents[2]


class TinyClipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3, 4)))


def _script(module: nn.Module, path: Path) -> str:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module.eval()), path)
    return str(path)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """One 30 s synthetic MP4 (10 fps, 160x120): long enough for several pieces of a few seconds."""
    root = tmp_path_factory.mktemp("long")
    synth = synthesize(root, videos=1, seed=3, classes=2, duration_range=(30.0, 30.0), size=(160, 120), fps=10.0, workers=1, progress=False)
    return str(next(iter(synth.videos.values())))


@pytest.fixture(scope="module")
def tiny_backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    frame = BackboneConfig(
        name="torchscript", weights=_script(TinyFrameNet(), root / "frame.pt"), kind="frame", input_size=(32, 40), batch_size=7
    )
    clip = BackboneConfig(
        name="torchscript",
        weights=_script(TinyClipNet(), root / "clip.pt"),
        kind="clip",
        input_size=(24, 24),
        clip_length=4,
        feature_dim=5,
        batch_size=3,
    )
    return {"frame": frame, "flow": BackboneConfig(**{**frame.__dict__, "flow": True}), "clip": clip}


@pytest.mark.parametrize(
    ("kind", "window", "stride"),
    [("frame", 4, 4), ("frame", 3, 2), ("frame", 2, 3), ("flow", 3, 2), ("flow", 2, 3), ("clip", 4, 2)],
)
def test_pieces_equal_the_whole_video(long_video, tiny_backbones, kind, window, stride):
    """Any split into step ranges (decoded from near each range's start) gives the rows of one pass:
    overlapping clips (window > stride), skipped frames (stride > window), the flow stream's motion
    across a cut, clip backbones; batch boundaries fall differently, hence a float tolerance."""
    backbone = build_backbone(tiny_backbones[kind], "cpu", num_threads=1)
    sampling = SamplingConfig(fps=7.0, window=window, stride=stride, chunk_frames=12)
    whole = features_for_video(backbone, long_video, sampling)
    plan = VideoPlan.of(probe(long_video), sampling)
    assert plan.num_steps == whole.features.shape[0] > 40
    for ranges in (plan.step_ranges(9.0), [(0, 1), (1, 17), (17, plan.num_steps - 1), (plan.num_steps - 1, plan.num_steps)]):
        assert ranges[0][0] == 0 and ranges[-1][1] == plan.num_steps and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        pieces = [features_for_range(backbone, long_video, sampling, a, b, plan=plan)[1] for a, b in ranges]
        assert [len(p) for p in pieces] == [b - a for a, b in ranges]
        np.testing.assert_allclose(np.concatenate(pieces), whole.features, rtol=1e-4, atol=1e-5)


def test_step_ranges_cover_the_video_evenly():
    from tal_models.timing import FeatureTiming

    plan = VideoPlan(
        duration=3600.0, num_frames=90_000, native_fps=25.0, timing=FeatureTiming(15.0, 4, 4), num_sampled=54_000, num_steps=13_500
    )
    ranges = plan.step_ranges(300.0)
    assert len(ranges) == 12 and {b - a for a, b in ranges} == {1125}
    assert plan.sampled_range(*ranges[3]) == (3 * 1125 * 4, 4 * 1125 * 4)
    with pytest.raises(ValueError, match="not within"):
        plan.sampled_range(10, 13_501)


def _manifests(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store / MANIFEST_DIR).glob("part-*.json"))]


def test_split_video_on_two_workers_equals_unsplit(long_video, tiny_backbones, ray_session, tmp_path):
    """Through Ray: the 30 s video in pieces of ~6 s on two workers, stitched by whichever is free,
    is the same sequence (steps, timestamps, features) as the unsplit extraction; the driver got
    only small replies, never the pieces' features."""
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "long.mp4").symlink_to(long_video)
    sampling = SamplingConfig(fps=7.0, window=3, stride=2, chunk_frames=12)
    common = {"videos": str(videos), "backbone": tiny_backbones["flow"], "sampling": sampling, "num_workers": 2, "progress": False}
    split = extract(ExtractConfig(out=str(tmp_path / "split"), split_seconds=6.0, **common))
    whole = extract(ExtractConfig(out=str(tmp_path / "whole"), split_seconds=None, **common))
    assert (split.split_videos, split.pieces, split.extracted, whole.split_videos, whole.extracted) == (1, 5, 1, 0, 1)
    a, b = FeatureStore(str(tmp_path / "split")).read_all()["long"], FeatureStore(str(tmp_path / "whole")).read_all()["long"]
    assert a.features.shape == b.features.shape and a.features.shape[0] > 90
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert (a.duration, a.num_frames, a.timing) == (b.duration, b.num_frames, b.timing)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
    assert split.steps == whole.steps == a.features.shape[0]
    assert split.driver_bytes_received / (split.pieces + 4) < 1024  # pings, the plan, pieces, stitch and flushes: small replies


def test_workers_write_parts_and_the_driver_gets_metadata(tmp_path, ray_session):
    """Twelve short videos on two workers, parts of at most ~4 videos: each part written by a worker
    (with its manifest), every video in exactly one part, and what reached the driver is a few
    hundred bytes per video while the features weigh a quarter of a megabyte each."""
    synth = synthesize(
        tmp_path / "synth", videos=12, seed=5, classes=2, duration_range=(2.0, 4.0), size=(96, 64), fps=8.0, workers=1, progress=False
    )
    config = BackboneConfig(name="torchscript", weights=_script(TinyFrameNet(2048), tmp_path / "f.pt"), kind="frame", input_size=(32, 40))
    sampling = SamplingConfig(fps=8.0, window=1, stride=1, chunk_frames=16)
    # a part holds ~4 videos: about 24 steps x 2048 floats x 4 bytes each
    part_mb = 4 * 24 * 2048 * 4 / 2**20
    summary = extract(
        ExtractConfig(
            videos=str(tmp_path / "synth" / "videos"),
            out=str(tmp_path / "store"),
            backbone=config,
            sampling=sampling,
            num_workers=2,
            part_mb=part_mb,
            progress=False,
        )
    )
    manifests = _manifests(tmp_path / "store")
    videos = [v for m in manifests for v in m["videos"]]
    assert sorted(videos) == sorted(synth.videos) and len(set(videos)) == 12
    assert 2 <= len(manifests) <= 8 and sorted(summary.parts) == sorted(m["part"] for m in manifests)
    assert summary.extracted == 12 and summary.steps == sum(len(s.features) for s in FeatureStore(str(tmp_path / "store")))
    feature_bytes = sum(s.features.nbytes for s in FeatureStore(str(tmp_path / "store")))
    assert feature_bytes / 12 > 100_000 and summary.driver_bytes_received / 12 < 1000


@pytest.mark.timeout(300)
def test_driver_killed_mid_job_then_rerun(tmp_path, ray_session):
    """A real fault: SIGKILL the ``tal extract`` driver process once workers have written parts. Every
    part it wrote stays (no part is half-written or unlisted), the re-run extracts only the rest, and
    every video is in exactly one part."""
    synth = synthesize(
        tmp_path / "synth", videos=10, seed=9, classes=2, duration_range=(3.0, 5.0), size=(96, 64), fps=10.0, workers=1, progress=False
    )
    store = tmp_path / "store"
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    # one video per part; mobilenet at 10 fps: each video takes a second or two
    argv = [sys.executable, "-m", "jobs.cli", "extract", "--videos", str(tmp_path / "synth" / "videos"), "--out", str(store)]
    argv += ["--fps", "10", "--window", "1", "--stride", "1", "--num-workers", "1", "--part-mb", "0.000001", "--no-progress"]
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 200
        while len(_manifests(store) if (store / MANIFEST_DIR).exists() else []) < 2:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no part appeared"
            time.sleep(0.1)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    time.sleep(1.0)  # a worker's write in flight at the kill lands or not, atomically
    before = {m["part"]: m["videos"] for m in _manifests(store)}
    done_before = {v for vs in before.values() for v in vs}
    assert 2 <= len(done_before) < 10, "the kill came after all the work"
    assert not (store / "manifest.json").exists()  # the killed driver never wrote its summary

    summary = extract(
        ExtractConfig(
            videos=str(tmp_path / "synth" / "videos"),
            out=str(store),
            sampling=SamplingConfig(fps=10.0, window=1, stride=1),
            num_workers=1,
            progress=False,
        )
    )
    after = {m["part"]: m["videos"] for m in _manifests(store)}
    assert all(after[p] == v for p, v in before.items())  # the killed run's parts are kept as they were
    assert summary.skipped == len(done_before) and summary.extracted == 10 - len(done_before)
    videos = [v for vs in after.values() for v in vs]
    assert sorted(videos) == sorted(synth.videos)  # each exactly once
    assert sorted(FeatureStore(str(store)).read_all()) == sorted(synth.videos)


@pytest.mark.timeout(300)
def test_ctrl_c_keeps_what_the_workers_finished(tmp_path, ray_session):
    """SIGINT to a ``tal extract`` driver whose workers hold finished videos in their buffers (parts of
    1 GB: nothing written yet): the interrupted driver has them written before it exits."""
    synth = synthesize(
        tmp_path / "synth", videos=8, seed=4, classes=2, duration_range=(3.0, 5.0), size=(96, 64), fps=10.0, workers=1, progress=False
    )
    store = tmp_path / "store"
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "jobs.cli", "extract", "--videos", str(tmp_path / "synth" / "videos"), "--out", str(store)]
    argv += ["--fps", "10", "--window", "1", "--stride", "1", "--num-workers", "1", "--part-mb", "1000"]
    log_path = tmp_path / "driver.log"
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 200
        while " 2/8 " not in log_path.read_text(errors="replace").replace("|", " "):  # the progress bar: two videos done
            assert driver.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.1)
        assert not (store / MANIFEST_DIR).exists() or not _manifests(store)  # buffered, not written
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) != 0
    finally:
        if driver.poll() is None:
            driver.kill()
    written = [v for m in _manifests(store) for v in m["videos"]]
    assert 2 <= len(written) < 8 and len(set(written)) == len(written)
    assert set(written) <= set(synth.videos)
