"""The open-vocabulary benchmark's protocol pieces (``benchmarks/open_vocab.py``): seen-class training data and the
mAP restricted to a class set."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import open_vocab
from tal_models.structures import AnnotationSet, Detections, LabelMap, Segments, VideoAnnotation

NAMES = ["a", "b", "c"]


@pytest.fixture
def gt() -> AnnotationSet:
    videos = {
        "v1": VideoAnnotation("v1", Segments(np.array([[0.0, 10.0], [20.0, 30.0]])), np.array([0, 1]), duration=40.0, subset="Test"),
        "v2": VideoAnnotation("v2", Segments(np.array([[5.0, 15.0]])), np.array([2]), duration=40.0, subset="Test"),
    }
    return AnnotationSet(videos, LabelMap.from_names(NAMES))


def _det(vid: str, segments: list, scores: list, labels: list) -> Detections:
    return Detections(vid, Segments(np.array(segments, dtype=np.float64).reshape(-1, 2)), np.array(scores), np.array(labels))


def test_seen_only_drops_unseen_segments_and_renumbers():
    samples = [{"video_id": "v", "segments": np.array([[0, 4], [5, 9], [10, 12]], np.float32), "labels": np.array([2, 0, 1])}]
    (out,) = open_vocab.seen_only(samples, NAMES, ["c", "a"])
    np.testing.assert_array_equal(out["segments"], [[0, 4], [5, 9]])
    np.testing.assert_array_equal(out["labels"], [0, 1])  # c -> 0, a -> 1 (the seen list's order)
    assert samples[0]["labels"].tolist() == [2, 0, 1]  # the input is left as it is
    (only_b,) = open_vocab.seen_only(samples, NAMES, ["b"])
    assert only_b["labels"].tolist() == [0] and only_b["segments"].shape == (1, 2)


def test_restricted_map_scores_only_the_named_classes(gt):
    found = {"v1": _det("v1", [[20.0, 30.0], [0.0, 10.0]], [0.9, 0.8], [0, 1])}  # labels index ["b", "a"]
    assert open_vocab.restricted_map(gt, found, ["b", "a"])["average_mAP"] == pytest.approx(1.0)
    only_b = {"v1": _det("v1", [[20.0, 30.0]], [0.9], [0])}
    result = open_vocab.restricted_map(gt, only_b, ["b"])
    assert result["average_mAP"] == pytest.approx(1.0) and result["num_ground_truth"] == 1  # "a" and "c" are not ground truth here
    assert open_vocab.restricted_map(gt, only_b, ["b", "a"])["average_mAP"] == pytest.approx(0.5)  # "a" missed


def test_restricted_map_counts_detections_on_videos_without_the_class(gt):
    # v2 holds no "b": a higher-scored "b" there is a false positive ranked first (AP 1/2), not ignored
    found = {"v1": _det("v1", [[20.0, 30.0]], [0.5], [0]), "v2": _det("v2", [[5.0, 15.0]], [0.9], [0])}
    assert open_vocab.restricted_map(gt, found, ["b"])["average_mAP"] == pytest.approx(0.5)
