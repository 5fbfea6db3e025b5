"""A class-agnostic detector named by a video-level classifier: ActivityNet's two models as one detector.

Legend: B batch, K the classifier's classes, N detections of a video.

ActivityNet-style detectors (``Preset.class_agnostic``) find action segments without naming them;
a video classifier (``tal_models.detectors.classifier``) names what happens in the whole video.
``FusedDetector`` runs both on the same batch and labels every segment with the video's ``top_k``
classes, scored ``segment score x class probability`` (``tal_models.postprocess.fuse_video_classifier``)::

    batch -> detector.forward_inference   -> B x Detections (label 0: "action")
          -> classifier.class_scores      -> [B, K] probabilities
          -> fuse_video_classifier(top_k) -> B x Detections labelled 0..K-1 (the classifier's labels)

It satisfies the ``Detector`` protocol (inference only), so serving, batch detection and
``tal evaluate`` take it like any detector; its labels are the classifier's.
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor, nn

from tal_models.batch import Batch
from tal_models.config import require_positive_int
from tal_models.detectors.base import detect_sequence
from tal_models.postprocess import fuse_video_classifier
from tal_models.structures import Detections
from tal_models.timing import FeatureTiming


def is_class_agnostic(checkpoint) -> bool:
    """Whether a checkpoint's detector was trained class-agnostic (``tal train`` with ``class_agnostic: true``)."""
    return bool(checkpoint.metadata.get("class_agnostic")) and checkpoint.config.num_classes == 1


class FusedDetector(nn.Module):
    """``detector``'s segments labelled by ``classifier``'s ``top_k`` video classes (module docstring)."""

    def __init__(self, detector: nn.Module, classifier: nn.Module, top_k: int = 2):
        super().__init__()
        require_positive_int(top_k, "top_k", " (ActivityNet practice: 2)")
        if detector.config.num_classes != 1:
            raise ValueError(
                f"FusedDetector labels class-agnostic detectors; this {detector.config.arch} has {detector.config.num_classes} classes"
            )
        if getattr(classifier.config, "task", None) != "classification":
            raise ValueError(f"FusedDetector needs a video classifier, got a {classifier.config.arch} ({classifier.config.task})")
        if detector.config.input_dim != classifier.config.input_dim:
            raise ValueError(
                f"the detector takes {detector.config.input_dim}-dim features but the classifier {classifier.config.input_dim}-dim ones"
            )
        self.detector = detector
        self.classifier = classifier
        self.top_k = top_k

    @property
    def config(self):
        """The detector's config (its arch and input width are what the jobs print and check)."""
        return self.detector.config

    @property
    def pad_multiple(self) -> int:
        return math.lcm(self.detector.pad_multiple, self.classifier.pad_multiple)

    def forward(self, batch: Batch) -> list[Detections]:
        return self.forward_inference(batch)

    def forward_inference(self, batch: Batch) -> list[Detections]:
        detections = self.detector.forward_inference(batch)
        scores: Tensor = self.classifier.class_scores(batch)  # [B, K]
        return [fuse_video_classifier(d, scores[i].to(d.scores.device), self.top_k) for i, d in enumerate(detections)]

    def detect(
        self, features: Tensor | np.ndarray, timing: FeatureTiming | None = None, duration: float | None = None, video_id: str = "video"
    ) -> Detections:
        return detect_sequence(self, features, self.config.input_dim, timing, duration, video_id)
