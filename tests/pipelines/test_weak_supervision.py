"""Video-level supervision: every annotation format weakened to the classes each video contains, and the weak
evaluation protocol (THUMOS14's tIoU 0.1:0.7) on a weakly supervised method's real outputs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.annotations import read_annotations
from tal_models.evaluation import THUMOS14_WEAK_TIOU, evaluate_detection, parse_tiou

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")
FILES = {
    "thumos14_json": DATA / "thumos14" / "thumos14.json",
    "activitynet": DATA / "activitynet13" / "validation_ground_truth.json",
    "multithumos": DATA / "multithumos" / "multithumos.json",
    "epic_kitchens": DATA / "epic_kitchens_100" / "EPIC_100_validation.csv",
}


@needs_data
@pytest.mark.parametrize("fmt", sorted(FILES))
def test_every_format_weakens_to_the_classes_of_each_video(fmt):
    full = read_annotations(FILES[fmt])
    weak = read_annotations(FILES[fmt], supervision="video")
    assert full.format == weak.format == fmt and weak.supervision == "video" and full.supervision == "full"
    assert list(weak.videos) == list(full.videos) and weak.label_map == full.label_map
    for video in list(full)[:200]:
        w = weak[video.video_id]
        assert sorted(w.labels.tolist()) == sorted(set(video.labels.tolist()))  # each class once
        spans = np.asarray(w.segments.data, np.float64).reshape(-1, 2)
        end = video.duration or (float(np.asarray(video.segments.data).reshape(-1, 2)[:, 1].max()) if len(video) else 0.0)
        assert np.all(spans[:, 0] == 0.0) and np.allclose(spans[:, 1], end)  # the whole video
        assert len(w.ambiguous) == 0 and w.subset == video.subset and w.duration == video.duration
    assert weak.num_instances < full.num_instances


def test_unknown_supervision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown supervision 'frame'"):
        read_annotations(tmp_path / "x.json", supervision="frame")


def test_protocol_names():
    np.testing.assert_array_equal(parse_tiou("weak"), THUMOS14_WEAK_TIOU)
    np.testing.assert_array_equal(parse_tiou(["thumos14"]), np.linspace(0.3, 0.7, 5))
    np.testing.assert_array_equal(parse_tiou("ActivityNet"), np.linspace(0.5, 0.95, 10))
    with pytest.raises(ValueError):
        parse_tiou("weakest")


@needs_data
def test_weak_protocol_on_autoloc_matches_its_published_table(tmp_path):
    """AutoLoc (weakly supervised) on THUMOS14 test: its published mAP at 0.1 ... 0.7, through `tal evaluate --tiou weak`."""
    from pipelines.annotations import read_activitynet_results

    case = DATA / "eval_cases" / "autoloc_thumos14_test"
    expected = json.loads((case / "expected.json").read_text())
    published = dict(zip(np.round(expected["tiou"], 2), expected["mAP"]))
    gt = read_annotations(case / "ground_truth.json")
    metrics = evaluate_detection(gt, read_activitynet_results(case / "predictions.json", gt.label_map).detections, THUMOS14_WEAK_TIOU)
    np.testing.assert_array_equal(np.round(metrics.mAP, 3), [published[round(t, 2)] for t in THUMOS14_WEAK_TIOU])
    out = tmp_path / "metrics.json"
    exe = Path(sys.executable).parent / "tal"
    r = subprocess.run([str(exe), "evaluate", "--ground-truth", str(case / "ground_truth.json"), "--predictions",
                        str(case / "predictions.json"), "--tiou", "weak", "--output", str(out)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    np.testing.assert_allclose(got["tiou"], THUMOS14_WEAK_TIOU)
    assert abs(got["average_mAP"] - float(np.mean([published[round(t, 2)] for t in THUMOS14_WEAK_TIOU]))) < 0.0015
