"""A video-level multi-label classifier: which actions a whole video contains.

Legend: B batch, C input channels, D hidden channels, T steps, K classes.

Class-agnostic ActivityNet-style detectors name their detections by fusing them with a
video-level classifier (``tal_models.postprocess.fuse_video_classifier``); this is ours::

    features [B, C, T] -> num_layers x (masked conv k, LayerNorm over channels, ReLU) -> [B, D, T]
                       -> masked mean and masked max over the valid steps             -> [B, 2D]
                       -> dropout, linear                                             -> logits [B, K]
    training:  multi-hot targets of the labels present in each (cropped) sample -> BCE (mean)
    inference: sigmoid probabilities; the ``inference.top_k`` best classes of each video become
               whole-video ``Detections`` (scored by their probability), so the classifier is
               a ``Detector`` that training, batch inference and serving take as any other

``class_scores(batch)`` (``[B, K]``) and ``classify(features [T, C])`` (``[K]``) give the
probabilities themselves, which ``pipelines.annotations.write_video_classification`` writes and
``tal_models.evaluation.evaluate_classification`` scores. Padding never reaches a valid output:
the convolutions read zeros there, the mean counts valid steps, the max reads ``-inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.batch import Batch
from tal_models.config import require_positive_int
from tal_models.detectors.base import DetectorModule, run_sequence
from tal_models.layers import LayerNormC, MaskedConv1d, check_odd, masked_mean
from tal_models.structures import Detections, Segments, Unit
from tal_models.timing import STEP_TIMING, FeatureTiming


@dataclass(frozen=True)
class ClassifierInferenceConfig:
    """What a video's ``Detections`` hold: its ``top_k`` most probable classes."""

    top_k: int = 3  # ActivityNet's classification task scores the top 3 (hit@3)

    def __post_init__(self) -> None:
        require_positive_int(self.top_k, "VideoClassifierConfig.inference.top_k", " (classes reported per video; ActivityNet: 3)")


@dataclass(frozen=True)
class VideoClassifierConfig:
    """Everything needed to rebuild a ``VideoClassifier``; stored as YAML in presets and checkpoints.

    ``max_seq_len``: training sequences are cropped to it (the train job's ``random_crop``);
    inference takes any length, the pooling is over the whole video.
    """

    family: ClassVar[str] = "video_classifier"
    task: ClassVar[str] = "classification"

    arch: Literal["video_classifier"] = "video_classifier"
    num_classes: int = 200
    input_dim: int = 2048  # feature width C (the property the other families derive is a field here)
    hidden_dim: int = 256
    num_layers: int = 2  # masked temporal convolutions before the pooling
    kernel_size: int = 3
    dropout: float = 0.5  # on the pooled vector
    max_seq_len: int = 2304
    inference: ClassifierInferenceConfig = field(default_factory=ClassifierInferenceConfig)

    def __post_init__(self) -> None:
        if self.arch != "video_classifier":
            raise ValueError(f"VideoClassifierConfig.arch must be 'video_classifier', got {self.arch!r}")
        require_positive_int(self.num_classes, "VideoClassifierConfig.num_classes", " (ActivityNet-1.3: 200)")
        require_positive_int(self.input_dim, "VideoClassifierConfig.input_dim", " (the feature width, e.g. 2048 for TSP/I3D)")
        require_positive_int(self.hidden_dim, "VideoClassifierConfig.hidden_dim", " (typical: 256)")
        require_positive_int(self.num_layers, "VideoClassifierConfig.num_layers", " (typical: 2)")
        require_positive_int(self.max_seq_len, "VideoClassifierConfig.max_seq_len", " (the training crop in steps, e.g. 2304)")
        require_positive_int(self.kernel_size, "VideoClassifierConfig.kernel_size", " (typical: 3)")
        check_odd("VideoClassifierConfig.kernel_size", self.kernel_size)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VideoClassifierConfig.dropout must be in [0, 1), got {self.dropout!r} (typical: 0.5)")
        if not isinstance(self.inference, ClassifierInferenceConfig):
            raise ValueError(f"VideoClassifierConfig.inference must be a ClassifierInferenceConfig, got {type(self.inference).__name__}")


def video_classifier_config(*, num_classes: int, input_dim: int, max_seq_len: int = 2304, top_k: int = 3) -> VideoClassifierConfig:
    """Our default classifier at the given sizes (no paper fixes one): two conv layers of 256
    channels, mean+max pooling, dropout 0.5."""
    return VideoClassifierConfig(
        num_classes=num_classes, input_dim=input_dim, max_seq_len=max_seq_len, inference=ClassifierInferenceConfig(top_k=top_k)
    )


def multi_hot(labels: list[Tensor], num_classes: int, device: torch.device | str) -> Tensor:
    """``B`` label tensors ``[N_i]`` -> ``[B, K]`` float32 targets: 1 for each class present (a sample
    without segments is all zero)."""
    targets = torch.zeros(len(labels), num_classes, device=device)
    for i, lab in enumerate(labels):
        targets[i, lab.to(device)] = 1.0
    return targets


class VideoClassifier(DetectorModule):
    """Features -> video-level multi-label logits (module docstring). ``forward`` is the loss dict
    in training mode and one ``Detections`` per video in eval mode, as every detector
    (``tal_models.detectors.base``)."""

    def __init__(self, config: VideoClassifierConfig):
        super().__init__()
        self.config = config
        dims = [config.input_dim] + [config.hidden_dim] * config.num_layers
        self.convs = nn.ModuleList(MaskedConv1d(i, o, config.kernel_size) for i, o in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(LayerNormC(config.hidden_dim) for _ in range(config.num_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(2 * config.hidden_dim, config.num_classes)

    def logits(self, features: Tensor, mask: Tensor) -> Tensor:
        """``features [B, C, T]``, ``mask [B, 1, T]`` -> class logits ``[B, K]``. A video's logits do not
        depend on its padding (whatever it holds) nor on the rest of its batch."""
        x = features
        for conv, norm in zip(self.convs, self.norms):
            x, _ = conv(x, mask)  # reads zeros at padded steps (masked_fill: NaN padding too)
            x = F.relu(norm(x)).masked_fill(~mask, 0.0)  # [B, D, T]
        x = x.float()  # pooled statistics in float32 under autocast
        mean = masked_mean(x, mask)[..., 0]  # [B, D]
        peak = x.masked_fill(~mask, -math.inf).amax(dim=-1)  # [B, D]
        peak = peak.masked_fill(~mask.any(dim=-1), 0.0)  # a video without steps: 0, not -inf
        return self.fc(self.dropout(torch.cat([mean, peak], dim=1)))  # [B, 2D] -> [B, K]

    def forward_training(self, batch: Batch) -> dict[str, Tensor]:
        """BCE (mean over videos and classes) against the labels present in each sample."""
        logits = self.logits(batch.features, batch.mask).float()
        targets = multi_hot(batch.labels, self.config.num_classes, logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        return {"cls_loss": loss, "final_loss": loss}

    @torch.no_grad()
    def class_scores(self, batch: Batch) -> Tensor:
        """Class probabilities ``[B, K]`` float32 of each video of ``batch``."""
        return torch.sigmoid(self.logits(batch.features, batch.mask).float())

    @torch.no_grad()
    def classify(self, features: Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities ``[K]`` float32 of one feature sequence ``[T, C]`` (checked as ``detect``
        checks it); the model's mode is kept."""
        return run_sequence(self, features, self.config.input_dim, lambda batch: self.class_scores(batch)[0].cpu().numpy())

    @torch.no_grad()
    def forward_inference(self, batch: Batch) -> list[Detections]:
        """Per video, its ``inference.top_k`` most probable classes as whole-video detections: ``[0,
        duration]`` seconds, or, without a duration, the span its steps cover under its timing
        (feature steps under ``STEP_TIMING``)."""
        probs = self.class_scores(batch).cpu()  # [B, K]
        k = min(self.config.inference.top_k, self.config.num_classes)
        top = torch.sort(probs, dim=1, descending=True, stable=True)  # best first; ties to the lower id, as fuse_video_classifier
        timings = batch.timings if batch.timings is not None else [STEP_TIMING] * len(batch)
        durations = batch.durations if batch.durations is not None else [None] * len(batch)
        out = []
        for i, (vid, n) in enumerate(zip(batch.video_ids, batch.lengths().tolist())):
            start, end = video_span(int(n), timings[i], durations[i])
            segments = Segments(np.tile([[start, end]], (k, 1)), Unit.SECONDS, check=False)
            out.append(Detections(vid, segments, top.values[i, :k].double().numpy(), top.indices[i, :k].numpy()))
        return out


def video_span(num_steps: int, timing: FeatureTiming, duration: float | None) -> tuple[float, float]:
    """``(start, end)`` in seconds of a whole video: ``(0, duration)`` when known, else from the first
    clip's first frame to the last clip's last frame (clipped at 0, as every detector clips)."""
    if duration is not None:
        return 0.0, float(duration)
    half = timing.window / (2 * timing.fps)
    start = float(timing.step_to_seconds(0.0)) - half
    end = float(timing.step_to_seconds(float(max(num_steps - 1, 0)))) + half
    return max(start, 0.0), max(end, 0.0)
