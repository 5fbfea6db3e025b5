"""The pure helpers of ``benchmarks/weak.py``: video-level samples, pseudo labels as ground truth, their quality."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tal_models.structures import Detections, Segments
from tal_models.timing import FeatureTiming

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("weak_benchmark", REPO / "benchmarks" / "weak.py")
weak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(weak)


def _detections(video_id, segments, scores, labels) -> Detections:
    return Detections(video_id, Segments(np.asarray(segments, dtype=np.float64).reshape(-1, 2)), scores, labels)


def test_video_level_one_span_per_distinct_class():
    sample = {"video_id": "v", "features": np.zeros((40, 3), np.float32),
              "segments": np.array([[2, 5], [10, 12], [20, 30]], np.float32), "labels": np.array([4, 1, 4])}  # fmt: skip
    out = weak.video_level(sample)
    assert out["labels"].tolist() == [1, 4]
    np.testing.assert_array_equal(out["segments"], [[0, 40], [0, 40]])
    assert out["features"] is sample["features"] and sample["labels"].tolist() == [4, 1, 4]  # the sample itself is kept
    empty = weak.video_level(sample | {"segments": np.zeros((0, 2), np.float32), "labels": np.zeros(0, np.int64)})
    assert empty["segments"].shape == (0, 2) and empty["labels"].shape == (0,)


def test_known_classes_keeps_the_labelled_ones():
    found = _detections("v", [[0, 1], [1, 2], [2, 3]], [0.9, 0.8, 0.7], [3, 5, 3])
    kept = weak.known_classes(found, np.array([3]))
    assert kept.labels.tolist() == [3, 3] and kept.scores.tolist() == [0.9, 0.7]


def test_with_pseudo_labels_converts_seconds_to_steps_and_drops_unlabelled_videos():
    timing = FeatureTiming(30.0, 4, 16)  # step i is centred on (4 i + 8) / 30 s
    samples = [{"video_id": v, "features": np.zeros((100, 2), np.float32), "segments": np.array([[1.0, 2.0]], np.float32),
                "labels": np.array([0]), "timing": timing} for v in ("a", "b", "c")]  # fmt: skip
    pseudo = {"a": _detections("a", [[(4 * 10 + 8) / 30, (4 * 25 + 8) / 30]], [0.8], [7]), "b": Detections.empty("b")}
    out = weak.with_pseudo_labels(samples, pseudo)
    assert [s["video_id"] for s in out] == ["a"]  # b has none, c is not in the pseudo labels
    np.testing.assert_allclose(out[0]["segments"], [[10.0, 25.0]], atol=1e-5)
    assert out[0]["labels"].tolist() == [7] and out[0]["segments"].dtype == np.float32


def test_pseudo_label_quality_hand_counted():
    truth = {"a": (np.array([[0.0, 10.0], [20.0, 30.0]]), np.array([1, 2])), "b": (np.array([[5.0, 9.0]]), np.array([0]))}
    pseudo = {
        # tIoU 0.8 with a's class-1 segment: correct; a second hit on the same segment (lower score): a duplicate, wrong;
        # the right place with the wrong class: wrong
        "a": _detections("a", [[0.0, 8.0], [1.0, 9.0], [20.0, 30.0]], [0.9, 0.5, 0.7], [1, 1, 1]),
        # tIoU 2 / 6 < 0.5: wrong
        "b": _detections("b", [[3.0, 7.0]], [0.9], [0]),
    }
    q = weak.pseudo_label_quality(pseudo, truth)
    assert q["num_pseudo"] == 4 and q["num_true"] == 3 and q["videos_with_pseudo"] == 2
    assert q["precision"] == pytest.approx(1 / 4, abs=1e-4) and q["recall"] == pytest.approx(1 / 3, abs=1e-4)
    assert q["f1"] == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3), abs=1e-4)
    # the higher-scored one claims the segment though the other overlaps it better (tIoU 0.6 against 1.0) ...
    pseudo = {"a": _detections("a", [[0.0, 6.0], [0.0, 10.0]], [0.9, 0.8], [1, 1]), "b": _detections("b", [[5.0, 9.0]], [0.1], [0])}
    q = weak.pseudo_label_quality(pseudo, truth)
    assert (q["precision"], q["recall"]) == (pytest.approx(2 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4))
    # ... unless it is below the threshold: then the second claims it, and the count is the same for another reason
    q = weak.pseudo_label_quality({"a": pseudo["a"]}, truth, tiou_threshold=0.7)
    assert (q["precision"], q["recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 3, abs=1e-4))
    q = weak.pseudo_label_quality({"a": pseudo["a"][:1]}, truth, tiou_threshold=0.7)
    assert q["precision"] == 0.0 and q["recall"] == 0.0
    q = weak.pseudo_label_quality({}, truth)
    assert q == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "num_pseudo": 0, "num_true": 3, "videos_with_pseudo": 0}


def test_map_figures_averages_the_two_protocols():
    per_tiou = {t: 1.0 - t for t in weak.WEAK_TIOU}  # 0.9, 0.8, ..., 0.3
    out = weak.map_figures(per_tiou)
    assert out["average_mAP_0.1:0.7"] == pytest.approx(0.6)
    assert out["average_mAP_0.3:0.7"] == pytest.approx(0.5)
    assert out["mAP@0.5"] == pytest.approx(0.5)
