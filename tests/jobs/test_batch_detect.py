"""``tal detect --workers N``: the Ray Data pipeline over an archive (``jobs.batch_detect``).

Real MP4s (``pipelines.synth``), a corrupt file and a missing one, a checkpoint whose provenance is a
real mobilenet_v2 featurizer (a tiny detector fitted a little to the videos' ground truth), the session's real local Ray, a real S3 API (moto), and a real
driver process killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.batch_detect import MANIFEST_DIR, ROW_SCHEMA, BatchDetectRequest, Output, read_state, run
from jobs.cli import main
from pipelines.backbones import BackboneConfig, build_backbone
from pipelines.extract import SamplingConfig, features_for_video, provenance_for, settings_json
from pipelines.store import FeatureStore, Provenance
from pipelines.synth import synthesize
from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, save_checkpoint
from tal_models.detectors import build_detector
from tal_models.optim import OptimConfig, build_optimizer
from tal_models.presets import make_config
from tal_models.training import train_one_epoch

ROOT = Path(__file__).resolve().parents[2]
SAMPLING = SamplingConfig(fps=5.0, window=2, stride=2, chunk_frames=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    """Four 3-4 s videos and a corrupt one in ``videos/``; a CSV manifest naming them and a missing file;
    a checkpoint; each good video's features computed here; one in-process ``tal detect`` over the manifest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor: the same arithmetic, so the same detections to the last bit
    root = tmp_path_factory.mktemp("batch_detect")
    synth = synthesize(
        root / "synth", videos=4, seed=11, classes=3, duration_range=(3.0, 4.0), size=(160, 120), fps=10.0, workers=1, progress=False
    )
    videos = root / "videos"
    videos.mkdir()
    for p in synth.videos.values():
        shutil.copy(p, videos / p.name)
    (videos / "broken.mp4").write_text("this is not a video\n" * 50)
    manifest = root / "videos.csv"
    rows = [f"{p.stem},{p}" for p in sorted(videos.iterdir())] + [f"missing,{videos / 'missing.mp4'}"]
    manifest.write_text("video_id,uri\n" + "\n".join(rows) + "\n")

    backbone = build_backbone(BackboneConfig(), "cpu")
    provenance = provenance_for(backbone, SAMPLING, settings_json(BackboneConfig(), SAMPLING))
    good = sorted(synth.videos)
    sequences = {v: features_for_video(backbone, str(videos / f"{v}.mp4"), SAMPLING, video_id=v) for v in good}
    label_map = synth.annotations.label_map
    names = [label_map.name(i) for i in range(len(label_map))]
    checkpoint = Checkpoint.from_model(_train(sequences, synth.annotations, len(names)), names, provenance.to_dict())
    save_checkpoint(checkpoint, root / "model.pt")
    features = {v: s.features for v, s in sequences.items()}

    baseline = root / "in_process"
    code = main(["detect", str(manifest), "--model", str(root / "model.pt"), "--output", str(baseline), "--device", "cpu",
                 "--no-progress", "--score-threshold", "0", "--timeline-videos", "0"])  # fmt: skip
    assert code == 3
    yield {
        "root": root,
        "videos": videos,
        "manifest": manifest,
        "good": good,
        "model": root / "model.pt",
        "provenance": provenance,
        "features": features,
        "results": json.loads((baseline / "results.json").read_text())["results"],
        "failed": json.loads((baseline / "failed.json").read_text())["failed"],
    }
    torch.set_num_threads(threads)


def _train(sequences, annotations, num_classes: int, steps: int = 30):
    """A tiny TemporalMaxer fitted a little to the synthetic ground truth, so that it detects something."""
    torch.manual_seed(0)
    model = build_detector(make_config("temporalmaxer", num_classes=num_classes, input_dim=1280, max_seq_len=64, embed_dim=16, levels=3))
    samples = []
    for vid, seq in sequences.items():
        truth = annotations.videos[vid]
        segments = seq.timing.segments_to_steps(truth.segments).data.astype(np.float32)
        samples.append({"features": np.array(seq.features), "segments": segments, "labels": truth.labels, "video_id": vid})
    batch = collate(samples, model.pad_multiple)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=0, epochs=steps))
    for _ in range(steps):
        train_one_epoch(model, [batch], optimizer, None, clip_grad_norm=1.0)
    return model.eval()


def _assert_same_detections(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in want], atol=1e-6)
    np.testing.assert_allclose([d["segment"] for d in got], [d["segment"] for d in want], atol=1e-5)
    assert [d["label"] for d in got] == [d["label"] for d in want]


def _entries(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / MANIFEST_DIR).glob("results-*.json"))]


def test_equals_in_process_records_failures_and_a_rerun_retries_only_those(world, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["detect", str(world["manifest"]), "--model", str(world["model"]), "--output", str(out), "--workers", "2",
            "--device", "cpu", "--no-progress", "--score-threshold", "0", "--timeline-videos", "1", "--shard-videos", "2"]  # fmt: skip
    assert main(argv) == 3  # some failed, the others written: as in process
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"version", "results", "external_data"}
    assert list(results["results"]) == world["good"]  # listing order, as in process
    for vid in world["good"]:
        _assert_same_detections(results["results"][vid], world["results"][vid])
    failed = json.loads((out / "failed.json").read_text())["failed"]
    assert failed == world["failed"]  # the same records, message included
    assert sorted((f["video_id"], f["reason"]) for f in failed) == [("broken", "not_a_video"), ("missing", "missing")]

    # the shards and their manifest: every good video in exactly one complete shard, the failures with reasons
    entries = _entries(out)
    assert len(entries) >= 2  # a shard every 2 videos
    held = [vid for e in entries for vid in e["videos"]]
    assert sorted(held) == world["good"]
    for e in entries:
        shard = json.loads((out / e["shard"]).read_text())["results"]
        assert sorted(shard) == sorted(e["videos"])
    assert sorted((f["video_id"], f["reason"]) for e in entries for f in e["failed"]) == [("broken", "not_a_video"), ("missing", "missing")]
    assert (out / "timelines" / f"{world['good'][0]}.png").exists()
    assert not list(out.rglob(".tmp-*"))
    printed = capsys.readouterr().out
    assert "0 videos already in complete shards (skipped), 6 of 6 processed by 2 actors" in printed

    # a re-run skips the finished videos and retries only the failed ones (which fail again)
    assert main(argv) == 3
    assert "4 videos already in complete shards (skipped), 2 of 2 processed" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == results
    assert sorted(vid for e in _entries(out) for vid in e["videos"]) == world["good"]

    # other settings would mix incomparable detections: refused before any video
    assert main([*argv[:-6], "--score-threshold", "0.5", "--timeline-videos", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "score_threshold" in err[0], err


def test_s3_archive_to_s3_with_features_kept_by_the_actors(world, moto_s3, s3_bucket):
    bucket = s3_bucket("batch-detect")
    for p in sorted(world["videos"].iterdir()):
        moto_s3.fs.put_file(str(p), f"{bucket}/videos/{p.name}")
    options = {"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}}
    request = BatchDetectRequest(
        videos=f"s3://{bucket}/videos/",
        model=str(world["model"]),
        output=f"s3://{bucket}/out",
        workers=2,
        device="cpu",
        score_threshold=0.0,
        top_k=10,
        timeline_videos=0,
        storage_options=options,
        progress=False,
        features_out=f"s3://{bucket}/features",
    )
    report = run(request)
    assert report.exit_code == 3 and [f.video_id for f in report.failed] == ["broken"]
    with moto_s3.fs.open(f"{bucket}/out/results.json") as f:
        results = json.load(f)["results"]
    assert sorted(results) == world["good"]
    for vid in world["good"]:
        _assert_same_detections(results[vid], world["results"][vid][:10])

    # the store, written by the actors: readable, the checkpoint's provenance, the videos' features
    store = FeatureStore(f"s3://{bucket}/features", options=options)
    status = store.status()
    assert sorted(status.done) == world["good"] and list(status.failed) == ["broken"]
    assert store.provenance.differences(Provenance.from_dict(world["provenance"].to_dict())) == []
    stored = store.read_all()
    for vid in world["good"]:
        np.testing.assert_allclose(stored[vid].features, world["features"][vid], atol=1e-5)

    # the driver got only small rows: detections and timing, never a feature array
    assert "features" not in ROW_SCHEMA.names
    smallest_features = min(f.nbytes for f in world["features"].values())
    assert 0 < report.row_bytes_max < 2048 < smallest_features, (report.row_bytes_max, smallest_features)
    assert report.features_parts == len(world["good"])  # one part per call, one video per call


def test_resume_after_the_driver_is_killed(world, tmp_path, ray_session):
    """A driver process SIGKILLed once its first shard is complete; the re-run skips what that shard holds,
    does the rest once, and leaves every video in exactly one shard."""
    videos = tmp_path / "videos"
    videos.mkdir()
    ids = [f"v{i:02d}" for i in range(10)]
    for i, vid in enumerate(ids):
        shutil.copy(world["videos"] / f"{world['good'][i % 4]}.mp4", videos / f"{vid}.mp4")
    out = tmp_path / "out"
    common = ["--model", str(world["model"]), "--output", str(out), "--device", "cpu", "--score-threshold", "0", "--timeline-videos", "0"]
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "jobs.cli", "detect", str(videos), *common, "--workers", "1", "--shard-videos", "1", "--no-progress"]
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not list((out / MANIFEST_DIR).glob("results-*.json")):
            assert driver.poll() is None, f"the driver ended ({driver.returncode}): {(tmp_path / 'driver.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no shard within 180 s"
            time.sleep(0.02)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    killed_at = time.time()
    before = read_state(Output(str(out)))
    assert 0 < len(before.done) < len(ids), "the job finished before the kill: nothing to resume"

    report = run(BatchDetectRequest(videos=str(videos), model=str(world["model"]), output=str(out), workers=2, device="cpu",
                                    score_threshold=0.0, timeline_videos=0, progress=False, shard_videos=3))  # fmt: skip
    assert report.exit_code == 0
    assert report.skipped == len(before.done)
    assert report.submitted == report.processed == len(ids) - len(before.done)  # the finished ones were not sent again

    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ids
    held = [vid for e in _entries(out) for vid in e["videos"]]
    assert sorted(held) == ids  # each video in exactly one complete shard
    after = read_state(Output(str(out)))
    for vid, (shard, record) in before.done.items():
        assert after.done[vid] == (shard, record)  # untouched
    for vid in set(ids) - set(before.done):
        assert after.done[vid][1]["started"] > killed_at - 1.0  # computed by the second run (1 s for the kill's latency)
    for i, vid in enumerate(ids):  # copies of the good videos: their detections
        _assert_same_detections(results[vid], world["results"][world["good"][i % 4]])
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--features-out", "{tmp}/features"], "--features-out: only with --workers"),
        (["--output", "s3://bucket/out"], "an s3:// output needs --workers"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--workers", "2", "--device", "cuda:1"], "give cpu or cuda"),
        (["--workers", "2", "--shard-seconds", "0"], "--shard-seconds must be > 0"),
    ],
)
def test_flags_that_do_not_fit_are_refused_with_one_line(world, tmp_path, capsys, extra, needle):
    extra = [a.format(tmp=tmp_path) for a in extra]
    argv = ["detect", str(world["videos"]), "--model", str(world["model"]), "--output", str(tmp_path / "out"), "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "features").exists()
