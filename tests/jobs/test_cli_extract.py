"""``tal synth``, ``tal extract``, ``tal import-features``, ``tal export-features`` and ``tal demo``
through the real entry point (in-process, sharing the session's Ray; the first demo in a process of its own)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import main
from pipelines.store import FeatureStore


def test_synth_extract_export_import_round_trip(tmp_path, ray_session, capsys):
    archive, store, exported, reimported = (tmp_path / n for n in ("archive", "store", "npy", "store2"))
    assert main(["synth", "--out", str(archive), "--videos", "2", "--seed", "1", "--duration-range", "4", "5", "--size", "160x120", "--workers", "1"]) == 0
    assert main(["extract", "--videos", str(archive / "videos"), "--out", str(store), "--fps", "5", "--window", "2", "--stride", "2", "--num-workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 extracted, 0 failed" in out
    assert main(["export-features", "--features", str(store), "--out", str(exported)]) == 0
    assert sorted(p.name for p in exported.glob("*.npy")) == ["synth_00000.npy", "synth_00001.npy"]
    meta = json.loads((exported / "features.json").read_text())
    assert main(
        ["import-features", "--features", str(exported), "--annotations", str(archive / "annotations_activitynet.json"),
         "--out", str(reimported), "--fps", "5", "--stride", "2", "--window", "2", "--backbone", "mobilenet_v2_reimported"]
    ) == 0  # fmt: skip
    original, back = FeatureStore(str(store)).read_all(), FeatureStore(str(reimported)).read_all()
    for vid in original:
        np.testing.assert_array_equal(back[vid].features, original[vid].features)
        np.testing.assert_allclose(back[vid].timestamps, original[vid].timestamps)
        assert meta["videos"][vid]["num_steps"] == original[vid].features.shape[0]
    # A second extract into the same store with another sampling is refused, naming the difference.
    capsys.readouterr()
    code = main(["extract", "--videos", str(archive / "videos"), "--out", str(store), "--fps", "10", "--num-workers", "1", "--no-progress"])
    assert code == 2 and "fps: 5.0 vs 10.0" in capsys.readouterr().err


def test_extract_s3_to_s3_with_endpoint_flag(tmp_path, ray_session, moto_s3, s3_bucket, capsys):
    archive = tmp_path / "archive"
    assert main(["synth", "--out", str(archive), "--videos", "1", "--seed", "2", "--duration-range", "3", "3", "--size", "160x120", "--workers", "1"]) == 0
    bucket = s3_bucket("cli")
    moto_s3.fs.put_file(str(archive / "videos" / "synth_00000.mp4"), f"{bucket}/in/synth_00000.mp4")
    argv = ["extract", "--videos", f"s3://{bucket}/in", "--out", f"s3://{bucket}/features", "--s3-endpoint", moto_s3.endpoint_url,
            "--fps", "5", "--window", "2", "--stride", "2", "--num-workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "1 extracted, 0 failed" in capsys.readouterr().out
    store = FeatureStore(f"s3://{bucket}/features", options={"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}})
    assert list(store.read_all()) == ["synth_00000"]
    assert moto_s3.fs.exists(f"{bucket}/features/manifest.json")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["extract", "--videos", "/nonexistent/dir", "--out", "/tmp/x"], "no such video"),
        (["extract", "--videos", ".", "--out", "/tmp/x", "--window", "0"], "window"),
        (["extract", "--videos", ".", "--out", "/tmp/x", "--backbone", "alexnet"], "alexnet"),
        (["synth", "--out", "/tmp/x", "--videos", "0", "--seed", "1"], "--videos"),
        (["import-features", "--features", "/nonexistent", "--annotations", "/nonexistent.json", "--out", "/tmp/x", "--fps", "30", "--stride", "4", "--window", "16"], "nonexistent"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


# What Ray and its libraries print by themselves; none of it is the user's business (each has its cause in jobs/ or
# pipelines/ray_runtime.py): Ray Data's per-run INFO lines, the C++ core worker's ERROR copy on the driver's stderr,
# Serve's shutdown notice, Ray Train's per-report INFO line, forwarded worker output, a warning from our own code,
# MLflow's progress bar for downloading a one-file checkpoint.
RAY_NOISE = ("streaming_executor", "core_worker.cc", "graceful_shutdown", "Reporting training result", "UserWarning",
             "(RayTrainWorker", "(TrainController", "(raylet)", "(ServeController", "(ProxyActor", "Progress bars disabled",
             "Downloading artifacts")  # fmt: skip
DEMO = ["demo", "--videos", "3", "--duration-range", "4", "6", "--workers", "2"]


def _assert_quiet(printed: str) -> list[str]:
    noisy = [line for line in printed.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noisy, noisy
    lines = printed.splitlines()
    progress = [line for line in lines if line.startswith("epoch ")]
    assert len(progress) == len(set(progress)), progress  # each progress line once
    return lines


def test_demo_end_to_end(tmp_path, ray_session, capsys):
    """The short demo as a user runs it: a process of its own with its own Ray (so that what Ray writes to the
    terminal from C++ and from its workers would show), then again in this process on the session's Ray."""
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}  # its own Ray, not the test session's
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *DEMO, "--out", str(out), "--epochs", "4"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-4000:]
    lines = _assert_quiet(printed)
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert sum(line.startswith(stage) for line in lines) == 1, stage
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/4", "2/4", "3/4", "4/4"]
    ray_logs = [line.removeprefix("Ray logs: ") for line in lines if line.startswith("Ray logs: ")]
    assert len(ray_logs) == 1 and Path(ray_logs[0]).is_dir(), ray_logs
    assert any(line.startswith("extract:") for line in lines) and any("tal synth:" in line for line in lines)  # our progress bars
    assert "3 videos" in printed and "1280 dims" in printed
    assert len(FeatureStore(str(out / "features")).read_all()) == 3
    # trained, registered as the champion, evaluated on the test video
    assert "registered tal-detector version 1" in printed and "average mAP (tIoU 0.3:0.7) on the 1 test videos" in printed
    assert (out / "eval" / "predictions.json").exists() and (out / "eval" / "metrics.json").exists()
    report = out / "eval" / "report.html"  # the HTML report, its path printed; the viewer's command printed
    assert f"report       {report}" in printed and 'id="error-analysis"' in report.read_text()
    assert "viewer       .venv/bin/tal serve" in printed and "--video-root" in printed
    # served: one test video through /v1/detect/video, its detections printed beside the ground truth
    assert "POST synth_" in printed and "feature steps; decode" in printed and "best detection of the same class" in printed

    # Running it again reuses the archive and skips finished videos; on a Ray it did not start, it leaves it running.
    capsys.readouterr()
    assert main([*DEMO, "--out", str(out), "--epochs", "2", "--no-serve"]) == 0
    again = capsys.readouterr().out
    assert "reusing it" in again and "3 already done, 0 extracted" in again
    assert [line.split()[1] for line in _assert_quiet(again) if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert ray_session.is_initialized()
