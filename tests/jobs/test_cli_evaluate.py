"""``tal evaluate`` as a user runs it: the installed console script (the first test), then the same CLI in process
(``helpers.run_tal``), real files, exit codes and stderr."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_tal

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")
CASE = DATA / "eval_cases" / "mmaction2_two_videos"


def tal(*args, cwd=None):
    exe = shutil.which("tal", path=str(Path(sys.executable).parent))
    assert exe, "the tal console script is not installed in this venv"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


@needs_data
def test_evaluate_writes_metrics_json_and_plot(tmp_path):
    out, plot = tmp_path / "m" / "metrics.json", tmp_path / "pr.png"
    r = tal(
        "evaluate", "--ground-truth", CASE / "ground_truth.json", "--predictions", CASE / "predictions.json",
        "--tiou", "0.5:0.95:0.05", "--output", out, "--plot", plot,
    )
    assert r.returncode == 0, r.stderr
    expected = json.loads((CASE / "expected.json").read_text())
    metrics = json.loads(out.read_text())
    for key in ("tiou", "mAP", "average_mAP", "per_class_AP", "num_ground_truth", "num_predictions"):
        assert key in metrics
    np.testing.assert_allclose(metrics["tiou"], expected["tiou"])
    np.testing.assert_allclose(metrics["mAP"], expected["mAP"], atol=1e-8)
    assert metrics["average_mAP"] == pytest.approx(expected["average_mAP"], abs=1e-12)
    assert set(metrics["per_class_AP"]) == {"Wakeboarding", "Zumba"} or len(metrics["per_class_AP"]) == 2
    assert metrics["num_ground_truth"] == 4 and metrics["num_predictions"] == 14
    assert "average mAP: 61.78%" in r.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


@needs_data
def test_evaluate_thumos_defaults_and_ambiguous(tmp_path):
    gt = DATA / "thumos14" / "thumos14.json"
    # A tiny submission: two ground-truth instances of one test video, plus an unknown label.
    db = json.loads(gt.read_text())["database"]["video_test_0000004"]
    results = {"video_test_0000004": [{"label": a["label"], "score": 0.9, "segment": a["segment"]} for a in db["annotations"][:2]]}
    results["video_test_0000004"].append({"label": "Juggling", "score": 0.5, "segment": [1, 2]})
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({"version": "x", "results": results}))
    out = tmp_path / "metrics.json"
    r = run_tal("evaluate", "--ground-truth", gt, "--predictions", pred, "--subset", "test", "--output", out)
    assert r.returncode == 0, r.stderr
    metrics = json.loads(out.read_text())
    assert metrics["tiou"] == [0.3, 0.4, 0.5, 0.6, 0.7]  # THUMOS default
    assert metrics["unknown_labels"] == {"Juggling": 1}
    assert "'Juggling' (1)" in r.stdout
    assert 0 < metrics["average_mAP"] < 0.1  # two of 3,000-odd instances


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "predictions.json"),
        ('{"results": {"v": [{"label": "Zumba", "score": 0.5, "segment": [3, 1]}]}}', "segment"),
        ('{"results": {"v": [{"label": "Zumba", "score": "high", "segment": [1, 3]}]}}', "score"),
        ('{"version": 1}', "results"),
    ],
)
@needs_data
def test_unusable_predictions_exit_2_with_one_line(tmp_path, content, needle):
    pred = tmp_path / "predictions.json"
    pred.write_text(content)
    r = run_tal("evaluate", "--ground-truth", CASE / "ground_truth.json", "--predictions", pred)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tal evaluate: error:") and needle in lines[0]


@needs_data
def test_bad_flags_and_missing_files_exit_2(tmp_path):
    gt, pred = CASE / "ground_truth.json", CASE / "predictions.json"
    cases = [
        (("--ground-truth", tmp_path / "nope.json", "--predictions", pred), "nope.json"),
        (("--ground-truth", gt, "--predictions", pred, "--tiou", "0.5:0.1:0.1"), "--tiou"),
        (("--ground-truth", gt, "--predictions", pred, "--subset", "training"), "training"),
    ]
    for args, needle in cases:
        r = run_tal("evaluate", *args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_a_model_without_any_detection_still_gets_its_plot(tmp_path):
    """A young dense model may report no segment at all: the plot is drawn (empty curves, AP 0), not an error."""
    from jobs.plots import plot_detection_metrics
    from tal_models.evaluation import evaluate_detection
    from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation

    gt = AnnotationSet({"v": VideoAnnotation("v", Segments(np.array([[1.0, 2.0]])), np.array([0]), 5.0)}, LabelMap.from_names(["a"]))
    metrics = evaluate_detection(gt, {}, [0.5], keep_curves=True)
    assert metrics.num_predictions == 0 and float(metrics.mAP[0]) == 0.0
    plot_detection_metrics(metrics, tmp_path / "pr.png")
    assert (tmp_path / "pr.png").stat().st_size > 0
