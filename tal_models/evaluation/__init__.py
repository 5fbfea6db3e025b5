"""Evaluation with the ActivityNet reference semantics (see ../shared/DESIGN.md).

- ``evaluate_detection``: AP per class and tIoU, mAP, average mAP, Recall@k x.
- ``evaluate_classification``: video-level classification mAP and hit@k (ActivityNet's untrimmed
  classification task).
- ``evaluate_proposals``: AR@AN and the area under the AR-AN curve.
- ``evaluate_dense``: per-frame mAP of the dense multi-label protocols (MultiTHUMOS, Charades).
- ``diagnose``: DETAD's error analysis (false-positive types, false negatives and AP sensitivity by instance characteristics).
- ``parse_tiou``: threshold lists and ``start:stop:step`` ranges as the references build them.
"""

from tal_models.evaluation.classification import ClassificationMetrics, evaluate_classification
from tal_models.evaluation.dense import DenseMetrics, evaluate_dense, frame_labels, frame_times, scores_at
from tal_models.evaluation.detection import (
    ACTIVITYNET_TIOU,
    THUMOS14_TIOU,
    THUMOS14_WEAK_TIOU,
    DetectionMetrics,
    evaluate_detection,
    interpolated_ap,
)
from tal_models.evaluation.diagnosis import Diagnosis, diagnose
from tal_models.evaluation.proposals import ProposalMetrics, evaluate_proposals
from tal_models.evaluation.thresholds import PROTOCOLS, parse_tiou

__all__ = [
    "ACTIVITYNET_TIOU",
    "THUMOS14_TIOU",
    "THUMOS14_WEAK_TIOU",
    "ClassificationMetrics",
    "DenseMetrics",
    "DetectionMetrics",
    "Diagnosis",
    "ProposalMetrics",
    "diagnose",
    "evaluate_classification",
    "evaluate_dense",
    "evaluate_detection",
    "evaluate_proposals",
    "frame_labels",
    "frame_times",
    "interpolated_ap",
    "PROTOCOLS",
    "parse_tiou",
    "scores_at",
]
