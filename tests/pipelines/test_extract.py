"""The Ray Data extraction job on real files: synthetic MP4s, the two shared videos, broken inputs,
S3 through a real moto server. One Ray session for the module (see conftest ``ray_session``)."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.backbones import BackboneConfig, build_backbone
from pipelines.extract import ExtractConfig, SamplingConfig, extract, features_for_video, list_videos
from pipelines.store import FeatureStore
from pipelines.synth import synthesize
from pipelines.video import sample_times
from tal_models.timing import FeatureTiming

SHARED_VIDEOS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "videos"
SAMPLING = SamplingConfig(fps=5.0, window=2, stride=2, chunk_frames=16)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three short synthetic videos, the two shared real videos, and four broken inputs."""
    root = tmp_path_factory.mktemp("archive")
    synth = synthesize(root / "synth", videos=3, seed=7, classes=3, duration_range=(4.0, 6.0), size=(160, 120), fps=10.0, workers=1, progress=False)
    videos = root / "videos"
    videos.mkdir()
    good = {}
    for vid, p in synth.videos.items():
        shutil.copy(p, videos / p.name)
        good[vid] = videos / p.name
    for name in ("bigbuckbunny_720p_h264.mp4", "city_405p_mpeg2.mpg"):
        shutil.copy(SHARED_VIDEOS / name, videos / name)
        good[Path(name).stem] = videos / name
    (videos / "zero_bytes.mp4").write_bytes(b"")
    data = (SHARED_VIDEOS / "bigbuckbunny_720p_h264.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) * 2 // 5])
    (videos / "text_renamed.mp4").write_text("this is not a video\n" * 100)
    manifest = root / "videos.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "uri"])
        for p in sorted(videos.iterdir()):
            w.writerow([p.stem, str(p)])
        w.writerow(["gone", str(videos / "gone.mp4")])
    return {"root": root, "videos": videos, "manifest": manifest, "good": good, "synth": synth}


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(BackboneConfig(name="mobilenet_v2", batch_size=32), "cpu", num_threads=1)


def test_features_follow_the_sampled_frames(archive, backbone):
    uri = str(archive["good"]["bigbuckbunny_720p_h264"])
    seq = features_for_video(backbone, uri, SAMPLING)
    n_sampled = len(sample_times(seq.duration, SAMPLING.fps))
    timing = FeatureTiming(SAMPLING.fps, SAMPLING.stride, SAMPLING.window)
    assert seq.features.shape == (timing.num_steps(n_sampled), 1280)
    np.testing.assert_allclose(seq.timestamps, timing.centers(seq.features.shape[0]))
    assert seq.timestamps[-1] < seq.duration
    # Step i is the mean of its window's frame features: recompute step 1 from decoded frames.
    from pipelines.extract import decode_size
    from pipelines.video import iter_frames

    info, chunks = iter_frames(uri, fps=SAMPLING.fps, chunk_frames=64, resize=lambda w, h: decode_size(backbone, w, h))
    frames = np.concatenate([c.frames for c in chunks])
    assert len(frames) == n_sampled
    expected = backbone.frame_features(frames[2:4]).mean(axis=0)
    np.testing.assert_allclose(seq.features[1], expected, rtol=1e-4, atol=1e-4)


def test_archive_with_broken_videos_then_rerun(archive, ray_session, tmp_path):
    out = str(tmp_path / "store")
    config = ExtractConfig(videos=str(archive["manifest"]), out=out, sampling=SAMPLING, num_workers=2, progress=False)
    summary = extract(config)
    assert summary.listed == len(archive["good"]) + 4
    assert summary.extracted == len(archive["good"])
    reasons = {vid: f["reason"] for vid, f in summary.failed.items()}
    assert reasons == {"zero_bytes": "empty", "truncated": "truncated", "text_renamed": "not_a_video", "gone": "missing"}
    store = FeatureStore(out)
    sequences = store.read_all()
    assert set(sequences) == set(archive["good"])
    for vid, seq in sequences.items():
        assert seq.features.shape[1] == 1280 and np.isfinite(seq.features).all()
        assert seq.source == str(archive["good"][vid])
    assert store.provenance.backbone == "mobilenet_v2" and store.provenance.backbone_sha256.startswith("b0353104")
    parts_before = sorted(store.part_paths())
    # The features computed by Ray workers equal a plain local computation.
    local = features_for_video(build_backbone(BackboneConfig(), "cpu"), str(archive["good"]["city_405p_mpeg2"]), SAMPLING)
    np.testing.assert_allclose(sequences["city_405p_mpeg2"].features, local.features, rtol=1e-4, atol=1e-4)

    again = extract(config)
    assert again.skipped == len(archive["good"]) and again.extracted == 0
    assert set(again.failed) == set(reasons)  # failed ones are retried (and fail again)
    assert sorted(FeatureStore(out).part_paths()) == parts_before  # nothing finished was redone


def test_s3_archive_to_s3_store(archive, ray_session, moto_s3, s3_bucket):
    bucket = s3_bucket("extract-videos")
    for vid in ("city_405p_mpeg2", next(iter(archive["synth"].videos))):
        path = archive["good"][vid]
        moto_s3.fs.put_file(str(path), f"{bucket}/archive/{path.name}")
    options = {"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}, "key": "testing", "secret": "testing"}
    assert len(list_videos(f"s3://{bucket}/archive", options)) == 2
    out = f"s3://{bucket}/features"
    summary = extract(ExtractConfig(videos=f"s3://{bucket}/archive", out=out, sampling=SAMPLING, num_workers=1, storage_options=options, progress=False))
    assert summary.extracted == 2 and not summary.failed
    back = FeatureStore(out, options=options).read_all()
    local = features_for_video(build_backbone(BackboneConfig(), "cpu"), str(archive["good"]["city_405p_mpeg2"]), SAMPLING)
    np.testing.assert_allclose(back["city_405p_mpeg2"].features, local.features, rtol=1e-4, atol=1e-4)
    assert back["city_405p_mpeg2"].source == f"s3://{bucket}/archive/city_405p_mpeg2.mpg"


def test_store_as_ray_dataset(archive, ray_session, tmp_path):
    out = str(tmp_path / "store")
    extract(ExtractConfig(videos=str(archive["videos"] / "city_405p_mpeg2.mpg"), out=out, sampling=SAMPLING, num_workers=1, progress=False))
    rows = FeatureStore(out).to_ray_dataset().take_all()
    assert [r["video_id"] for r in rows] == ["city_405p_mpeg2"]
    assert np.asarray(rows[0]["features"]).shape[1] == 1280


def test_list_videos_rejects_duplicate_ids_and_missing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.mp4").write_bytes(b"1")
    (tmp_path / "b" / "x.mp4").write_bytes(b"2")
    with pytest.raises(ValueError, match="two videos share the id 'x'"):
        list_videos(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such video"):
        list_videos(str(tmp_path / "nope"))
    assert [v.video_id for v in list_videos(str(tmp_path / "a" / "*.mp4"))] == ["x"]


def _worker_pids() -> list[int]:
    """PIDs of live Ray actor processes running our extractor (Ray titles them ``ray::ExtractionWorker...``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if cmdline.startswith(b"ray::ExtractionWorker"):
                pids.append(int(entry.name))
    return pids


@pytest.mark.timeout(240)
def test_a_worker_killed_mid_job_costs_nothing(archive, ray_session, tmp_path):
    """A real fault: SIGKILL the extraction actor while it works; Ray restarts it, the video it held
    is retried, and every video ends up in the store exactly once."""
    import os
    import signal
    import threading
    import time

    out = str(tmp_path / "store")
    sampling = SamplingConfig(fps=10.0, window=1, stride=1, chunk_frames=8)  # every frame: each video takes a few seconds
    result = {}
    job = threading.Thread(target=lambda: result.update(summary=extract(ExtractConfig(videos=str(archive["videos"] / "*.mp4"), out=out, sampling=sampling, num_workers=1, progress=False))))
    job.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and job.is_alive() and time.monotonic() < deadline:
        pids = _worker_pids()
        if pids:
            time.sleep(3.0)  # let it get into a video
            for pid in _worker_pids():
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.2)
    replacements = set()
    while job.is_alive() and time.monotonic() < deadline + 60:
        replacements.update(p for p in _worker_pids() if p != killed)
        time.sleep(0.1)
    job.join(timeout=60)
    assert killed is not None, "never saw the extraction actor"
    assert replacements, "the killed actor was not replaced: the kill came after all the work"
    summary = result["summary"]
    good = sorted(p.stem for p in archive["videos"].glob("*.mp4") if p.stem in archive["good"])
    assert len(good) == 4 and sorted(FeatureStore(out).read_all()) == good
    assert summary.extracted == len(good)
    assert set(summary.failed) == {"zero_bytes", "truncated", "text_renamed"}  # the broken files, nothing else
