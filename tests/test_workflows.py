"""Workflows that cross packages, on real files: read -> fuse -> write -> read -> evaluate."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.annotations import (
    read_activitynet,
    read_activitynet_results,
    read_video_classification,
    write_activitynet_results,
)
from tal_models.evaluation import ACTIVITYNET_TIOU, evaluate_detection
from tal_models.postprocess import fuse_video_classifier
from tal_models.structures import Detections

ANET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "activitynet13"
pytestmark = pytest.mark.skipif(not ANET.exists(), reason=f"shared data not found at {ANET}")


def test_class_agnostic_proposals_fused_with_the_official_classifier_sample(tmp_path):
    """ActivityNet practice: class-agnostic segments + a video classifier -> labelled detections.

    The official sample files are the validation ground truth written as a perfect submission,
    so stripping the labels and fusing with the sample classifier must give mAP 1 again; any
    slip in label ids, score products, ordering or I/O breaks that.
    """
    gt = read_activitynet(ANET / "validation_ground_truth.json")
    perfect = read_activitynet_results(ANET / "sample_detection_prediction.json", gt.label_map).detections
    classifier = read_video_classification(ANET / "sample_classification_prediction.json")
    fused = []
    for vid, det in list(perfect.items())[:600]:
        agnostic = Detections(vid, det.segments, det.scores * 0.9, np.zeros(len(det), np.int64))
        class_scores = torch.zeros(len(gt.label_map), dtype=torch.float64)
        for name, score in classifier[vid].items():
            class_scores[gt.label_map.id(name)] = score
        fused.append(fuse_video_classifier(agnostic, class_scores, top_k=2))
    path = tmp_path / "fused.json"
    write_activitynet_results(path, fused, gt.label_map)
    reread = read_activitynet_results(path, gt.label_map)
    assert reread.num_predictions == 2 * sum(len(perfect[d.video_id]) for d in fused)
    subset = type(gt)({d.video_id: gt.videos[d.video_id] for d in fused}, gt.label_map)
    metrics = evaluate_detection(subset, reread.detections, ACTIVITYNET_TIOU)
    np.testing.assert_array_equal(metrics.mAP, np.ones(10))
