"""tal_models.pseudo.select_pseudo_labels on hand-made detections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import one_thread, seed_zero  # noqa: F401  (autouse fixtures)

from tal_models.pseudo import select_pseudo_labels
from tal_models.structures import Detections, Segments, Unit


def dets(vid: str, rows: list[tuple[float, float, float, int]], unit: Unit = Unit.SECONDS) -> Detections:
    """``(start, end, score, label)`` rows -> NumPy ``Detections``."""
    a = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return Detections(vid, Segments(a[:, :2], unit), a[:, 2], a[:, 3].astype(np.int64))


def rows(d: Detections) -> list[tuple[float, float, float, int]]:
    return [(float(s), float(e), float(p), int(c)) for (s, e), p, c in zip(d.segments.data.tolist(), d.scores.tolist(), d.labels.tolist())]


def test_threshold_min_length_top_k_and_merge():
    video = dets(
        "a",
        [
            (0.0, 10.0, 0.90, 0),  # kept, the best of class 0
            (1.0, 10.0, 0.80, 0),  # tIoU 0.9 with the better one: merged away
            (20.0, 30.0, 0.70, 0),  # kept (class 0's second)
            (40.0, 50.0, 0.60, 0),  # class 0's fourth after the threshold: beyond top_k = 3
            (5.0, 15.0, 0.65, 0),  # tIoU 1/3 with the best: a separate instance, class 0's third
            (0.0, 10.0, 0.85, 1),  # another class at the same place: kept
            (60.0, 60.5, 0.95, 1),  # shorter than min_length_s = 1 s: dropped
            (70.0, 80.0, 0.20, 1),  # below the threshold
        ],
    )
    out = select_pseudo_labels({"a": video, "b": Detections.empty("b")}, threshold=0.5, top_k=3, min_length_s=1.0)
    assert set(out) == {"a", "b"} and len(out["b"]) == 0
    # top_k counts before the merge: class 0's best three are 0.90, 0.80, 0.70 (0.65 and 0.60 are out)
    assert rows(out["a"]) == [(0.0, 10.0, 0.90, 0), (0.0, 10.0, 0.85, 1), (20.0, 30.0, 0.70, 0)]
    assert out["a"].segments.unit is Unit.SECONDS and isinstance(out["a"].scores, np.ndarray)


def test_merge_is_strictly_above_the_tiou_and_top_k_per_class():
    # tIoU exactly 0.7 ([0, 10] vs [0, 7]): not a duplicate
    video = dets("v", [(0.0, 10.0, 0.9, 2), (0.0, 7.0, 0.8, 2), (0.0, 7.2, 0.7, 2)])
    out = select_pseudo_labels({"v": video}, threshold=0.0, top_k=10)["v"]
    assert rows(out) == [(0.0, 10.0, 0.9, 2), (0.0, 7.0, 0.8, 2)]  # [0, 7.2] has tIoU 0.72 with [0, 10]
    one = select_pseudo_labels({"v": video}, threshold=0.0, top_k=1)["v"]
    assert rows(one) == [(0.0, 10.0, 0.9, 2)]


def test_merge_keeps_a_detection_whose_only_cover_was_merged():
    # b overlaps a (> 0.7) and is merged; c overlaps b (> 0.7) but not a: c stays (greedy over kept ones only)
    video = dets("v", [(0.0, 10.0, 0.9, 0), (1.5, 11.5, 0.8, 0), (3.0, 13.0, 0.7, 0)])
    out = select_pseudo_labels({"v": video}, threshold=0.0, top_k=5)["v"]
    assert rows(out) == [(0.0, 10.0, 0.9, 0), (3.0, 13.0, 0.7, 0)]


def test_torch_detections_and_bad_arguments():
    video = dets("t", [(0.0, 4.0, 0.3, 1), (2.0, 9.0, 0.6, 0)], unit=Unit.STEPS).to_torch()
    out = select_pseudo_labels({"t": video}, threshold=0.25, top_k=2)["t"]
    assert out.segments.unit is Unit.STEPS and out.labels.tolist() == [0, 1]
    np.testing.assert_allclose(out.scores, [0.6, 0.3], rtol=1e-6)
    assert isinstance(out.scores, np.ndarray) and isinstance(video.scores, torch.Tensor)
    for kwargs, field in [
        ({"threshold": -1.0, "top_k": 1}, "threshold"),
        ({"threshold": 0.5, "top_k": 0}, "top_k"),
        ({"threshold": 0.5, "top_k": 1, "min_length_s": -1.0}, "min_length_s"),
        ({"threshold": 0.5, "top_k": 1, "merge_tiou": 0.0}, "merge_tiou"),
    ]:
        with pytest.raises(ValueError, match=field):
            select_pseudo_labels({"t": video}, **kwargs)
