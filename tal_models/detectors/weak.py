"""Weakly supervised temporal action localization: trained from video-level labels only (BaS-Net style).

Legend: B batch, C input channels, D hidden channels, T steps, K classes (K + 1 with background,
background last), M thresholds.

The recipe of BaS-Net (Lee et al., AAAI 2020), with W-TALC / STPN's top-k multiple-instance
pooling and AutoLoc's outer-inner contrast (``tal_models.cam``)::

    features [B, C, T] -> masked conv k + ReLU + dropout                   -> x [B, D, T]
    x -> 1x1 conv to K + 1                                                 -> base CAS [B, K+1, T]
    x -> 1x1 conv, sigmoid                                                 -> attention a [B, 1, T]
    x * a -> the same 1x1 conv                                             -> suppressed CAS [B, K+1, T]
    training:  top-k pooling of each CAS (k = n // topk_ratio), softmax over K + 1, cross-entropy
               against normalized video-level multi-hot targets: background 1 for the base branch
               (every untrimmed video holds background), 0 for the suppressed one (the attention
               must filter it out); plus an L1 sparsity on the attention
    inference: video scores from the suppressed branch's pooling (softmax, background dropped);
               each class above ``class_threshold`` (the best one always) -> its step activations
               -> runs above each threshold -> outer-inner contrast + weighted video score -> NMS

Since the classifier is a 1x1 convolution, the suppressed CAS is ``a * (W x) + b``: the base CAS
scaled by the attention except for the bias, BaS-Net's background filtering moved after the
embedding (BaS-Net filters the input features and runs the whole CAS module twice).

Only ``batch.labels`` is read in training (the set of classes of each video); ``batch.segments``
is ignored, so any segments, even whole-video ones, give the same loss. Long training videos
should be subsampled with ``tal_models.cam.sample_video`` to ``max_seq_len`` steps (a crop could
lose an action the label promises). Inference runs on the whole video at once: the model is fully
convolutional (a receptive field of ``kernel_size`` steps), so no windows are needed and
``scale`` is None. Padding never reaches a valid output: the convolution reads zeros there, the
1x1 convolutions read nothing else, the pooling and the normalization read valid steps only.

Differences from the papers' code: one k3 convolution as UM's embedding (BaS-Net has two), ReLU
(BaS-Net: LeakyReLU), a classifier with a bias (theirs has none: here it is what a fully
suppressed step scores), the attention computed from the embedding (BaS-Net: from the input
features, 2048 -> 512 -> 1), ``k`` per video from its own valid length (BaS-Net: from the fixed
750-step sample), and the CAS thresholded at feature resolution (the papers upsample it 24 times
first, which only refines the boundaries between two steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.batch import Batch
from tal_models.cam import cam_segments, outer_inner_contrast, topk_mil_pool
from tal_models.config import require_positive_int
from tal_models.detectors.base import DetectorModule
from tal_models.layers import MaskedConv1d, check_odd
from tal_models.postprocess import NMSConfig
from tal_models.structures import Detections
from tal_models.timing import STEP_TIMING
from tal_models.windows import TemporalScaleConfig, finish_video

# BaS-Net / UM's act_thresh: np.arange(0.0, 0.25, 0.025)
PAPER_CAM_THRESHOLDS = tuple(round(0.025 * i, 3) for i in range(10))


def _require_weight(value: object, name: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value >= 0 and np.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}{hint}")


@dataclass(frozen=True)
class WeakLossConfig:
    """Weights of the three terms: the base branch's and the suppressed branch's MIL cross-entropy and
    the attention's L1 sparsity (BaS-Net: 1, 1, alpha = 1e-4, the L1 norm summed over a video's steps)."""

    base_weight: float = 1.0
    suppressed_weight: float = 1.0
    sparsity_weight: float = 1e-4

    def __post_init__(self) -> None:
        _require_weight(self.base_weight, "WeakLossConfig.base_weight", " (BaS-Net: 1.0)")
        _require_weight(self.suppressed_weight, "WeakLossConfig.suppressed_weight", " (BaS-Net: 1.0)")
        _require_weight(self.sparsity_weight, "WeakLossConfig.sparsity_weight", " (BaS-Net's alpha: 1e-4)")


@dataclass(frozen=True)
class WeakInferenceConfig:
    """How a video's CAS becomes detections (module docstring).

    What is thresholded: for each localized class, the suppressed CAS softmaxed over the K + 1
    classes at each step, that class's channel, min-max normalized over the video's valid steps
    (so in ``[0, 1]``; a constant activation normalizes to 0). Each run above a threshold is scored
    ``outer_inner_contrast(run, inflation) + score_weight * video score`` (BaS-Net / UM's gamma:
    0.2); candidates scoring <= 0 are dropped by the NMS's ``pre_nms_threshold``.
    """

    class_threshold: float = 0.2  # UM 0.2, BaS-Net 0.25: the video score a class needs (the best class always passes)
    cam_thresholds: tuple[float, ...] = PAPER_CAM_THRESHOLDS
    inflation: float = 0.25  # AutoLoc / BaS-Net's lambda
    score_weight: float = 0.2  # BaS-Net / UM's gamma
    nms: NMSConfig = field(default_factory=lambda: NMSConfig(method="hard", iou_threshold=0.6, max_detections=200))

    def __post_init__(self) -> None:
        if (
            isinstance(self.class_threshold, bool)
            or not isinstance(self.class_threshold, int | float)
            or not 0 <= self.class_threshold <= 1
        ):
            raise ValueError(f"WeakInferenceConfig.class_threshold must be in [0, 1], got {self.class_threshold!r} (UM: 0.2)")
        if not isinstance(self.cam_thresholds, tuple) or not self.cam_thresholds:
            raise ValueError(
                f"WeakInferenceConfig.cam_thresholds must be a non-empty tuple, got {self.cam_thresholds!r} (papers: 0.0 to 0.225)"
            )
        if any(isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < 1 for t in self.cam_thresholds):
            raise ValueError(f"WeakInferenceConfig.cam_thresholds must lie in [0, 1), got {self.cam_thresholds!r} (papers: 0.0 to 0.225)")
        _require_weight(self.inflation, "WeakInferenceConfig.inflation", " (AutoLoc: 0.25)")
        _require_weight(self.score_weight, "WeakInferenceConfig.score_weight", " (BaS-Net's gamma: 0.2)")
        if not isinstance(self.nms, NMSConfig):
            raise ValueError(f"WeakInferenceConfig.nms must be an NMSConfig, got {type(self.nms).__name__}")


@dataclass(frozen=True)
class WeakConfig:
    """Everything needed to rebuild a ``WeakDetector``; stored as YAML in presets and checkpoints.

    ``max_seq_len``: the training sample length (``tal_models.cam.sample_video``; BaS-Net / UM on
    THUMOS14: 750). ``scale`` is None: inference runs on whole videos (module docstring).
    """

    family: ClassVar[str] = "weak"
    task: ClassVar[str] = "detection"

    arch: Literal["weak"] = "weak"
    num_classes: int = 20
    input_dim: int = 2048  # feature width C (a field, as VideoClassifierConfig's)
    hidden_dim: int = 512  # BaS-Net / UM: 2048
    kernel_size: int = 3
    dropout: float = 0.7
    topk_ratio: int = 8  # k = max(1, n // 8) steps pooled per class (BaS-Net)
    max_seq_len: int = 750
    loss: WeakLossConfig = field(default_factory=WeakLossConfig)
    inference: WeakInferenceConfig = field(default_factory=WeakInferenceConfig)
    scale: TemporalScaleConfig | None = None

    def __post_init__(self) -> None:
        if self.arch != "weak":
            raise ValueError(f"WeakConfig.arch must be 'weak', got {self.arch!r}")
        require_positive_int(self.num_classes, "WeakConfig.num_classes", " (THUMOS14: 20)")
        require_positive_int(self.input_dim, "WeakConfig.input_dim", " (the feature width, e.g. 2048 for I3D RGB + flow)")
        require_positive_int(self.hidden_dim, "WeakConfig.hidden_dim", " (ours: 512; BaS-Net: 2048)")
        require_positive_int(self.kernel_size, "WeakConfig.kernel_size", " (BaS-Net: 3)")
        check_odd("WeakConfig.kernel_size", self.kernel_size)
        require_positive_int(self.topk_ratio, "WeakConfig.topk_ratio", " (BaS-Net: 8)")
        require_positive_int(self.max_seq_len, "WeakConfig.max_seq_len", " (BaS-Net / UM on THUMOS14: 750)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"WeakConfig.dropout must be in [0, 1), got {self.dropout!r} (BaS-Net: 0.7)")
        if not isinstance(self.loss, WeakLossConfig):
            raise ValueError(f"WeakConfig.loss must be a WeakLossConfig, got {type(self.loss).__name__}")
        if not isinstance(self.inference, WeakInferenceConfig):
            raise ValueError(f"WeakConfig.inference must be a WeakInferenceConfig, got {type(self.inference).__name__}")
        if self.scale is not None:
            raise ValueError("WeakConfig.scale must be None: the weak detector runs on whole videos (it is fully convolutional)")


def weak_config(
    *, num_classes: int, input_dim: int, hidden_dim: int = 512, max_seq_len: int = 750, class_threshold: float = 0.2
) -> WeakConfig:
    """The WTAL papers' THUMOS14 settings (BaS-Net / UM) at the given sizes: k = n // 8, dropout 0.7,
    750-step samples, CAS thresholds 0 to 0.225, inflation 0.25, gamma 0.2; class threshold 0.2 (UM;
    BaS-Net 0.25), hard NMS at 0.6 tIoU; hidden width 512 by default (the papers' 2048 on request)."""
    return WeakConfig(
        num_classes=num_classes,
        input_dim=input_dim,
        hidden_dim=hidden_dim,
        max_seq_len=max_seq_len,
        inference=WeakInferenceConfig(class_threshold=class_threshold),
    )


def video_targets(labels: list[Tensor], num_classes: int, background: float, device: torch.device | str) -> Tensor:
    """``B`` label tensors ``[N_i]`` -> ``[B, K + 1]`` float32 targets summing to 1: the classes present,
    and background with weight ``background`` (1 or 0); a video without labels is background only."""
    targets = torch.zeros(len(labels), num_classes + 1, device=device)
    for i, lab in enumerate(labels):
        targets[i, lab.to(device)] = 1.0
    targets[:, num_classes] = background
    targets[targets.sum(dim=1) == 0, num_classes] = 1.0
    return targets / targets.sum(dim=1, keepdim=True)


class WeakDetector(DetectorModule):
    """Video-level labels -> CAS -> detections (module docstring). ``forward`` is the loss dict in
    training mode and one ``Detections`` per video in eval mode, as every detector."""

    def __init__(self, config: WeakConfig):
        super().__init__()
        self.config = config
        self.embed = MaskedConv1d(config.input_dim, config.hidden_dim, config.kernel_size)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Conv1d(config.hidden_dim, config.num_classes + 1, 1)
        self.attention = nn.Conv1d(config.hidden_dim, 1, 1)

    def outputs(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``features [B, C, T]``, ``mask [B, 1, T]`` -> ``(base CAS [B, K+1, T], suppressed CAS [B, K+1, T],
        attention [B, 1, T])``, all zero at padded steps."""
        x, _ = self.embed(features, mask)
        x = self.dropout(F.relu(x))  # [B, D, T], still zero at padded steps
        attention = torch.sigmoid(self.attention(x)).masked_fill(~mask, 0.0)  # [B, 1, T]
        base = self.classifier(x).masked_fill(~mask, 0.0)  # [B, K+1, T]
        suppressed = self.classifier(x * attention).masked_fill(~mask, 0.0)  # [B, K+1, T]
        return base, suppressed, attention

    def forward_training(self, batch: Batch) -> dict[str, Tensor]:
        """The two branches' MIL cross-entropies and the attention's sparsity, from ``batch.labels`` only."""
        cfg, loss_cfg = self.config, self.config.loss
        base, suppressed, attention = self.outputs(batch.features, batch.mask)
        ratio = cfg.topk_ratio
        base_logp = F.log_softmax(topk_mil_pool(base, batch.mask, ratio), dim=1)  # [B, K+1], float32
        supp_logp = F.log_softmax(topk_mil_pool(suppressed, batch.mask, ratio), dim=1)
        K = cfg.num_classes
        base_loss = -(video_targets(batch.labels, K, 1.0, base.device) * base_logp).sum(dim=1).mean()
        supp_loss = -(video_targets(batch.labels, K, 0.0, base.device) * supp_logp).sum(dim=1).mean()
        sparsity = attention.float().sum(dim=(1, 2)).mean()  # L1 over each video's valid steps (padding holds 0)
        final = loss_cfg.base_weight * base_loss + loss_cfg.suppressed_weight * supp_loss + loss_cfg.sparsity_weight * sparsity
        return {"base_loss": base_loss, "suppressed_loss": supp_loss, "sparsity_loss": sparsity, "final_loss": final}

    def _scores(self, batch: Batch) -> tuple[Tensor, Tensor]:
        _, suppressed, _ = self.outputs(batch.features, batch.mask)
        suppressed = suppressed.float()
        video = F.softmax(topk_mil_pool(suppressed, batch.mask, self.config.topk_ratio), dim=1)[:, :-1]  # [B, K]
        steps = F.softmax(suppressed, dim=1)[:, :-1].masked_fill(~batch.mask, 0.0)  # [B, K, T]
        return video, steps

    @torch.no_grad()
    def video_scores(self, batch: Batch) -> Tensor:
        """``[B, K]`` float32: each video's class probabilities (suppressed branch, top-k pooled, softmax
        over K + 1, background dropped)."""
        return self._scores(batch)[0]

    @torch.no_grad()
    def cas(self, batch: Batch) -> Tensor:
        """``[B, K, T]`` float32: per-step class probabilities (the suppressed CAS softmaxed over K + 1 at
        each step, background dropped), zero at padded steps; not yet normalized per video."""
        return self._scores(batch)[1]

    @torch.no_grad()
    def forward_inference(self, batch: Batch) -> list[Detections]:
        """One ``Detections`` per video, in seconds (feature steps without timings), after NMS."""
        inference = self.config.inference
        video, steps = self._scores(batch)
        video, steps = video.cpu(), steps.cpu()
        timings = batch.timings if batch.timings is not None else [STEP_TIMING] * len(batch)
        durations = batch.durations if batch.durations is not None else [None] * len(batch)
        out = []
        for i, n in enumerate(batch.lengths().tolist()):
            segs, scores, labels = self._candidates_single_video(video[i], steps[i, :, : int(n)])
            out.append(finish_video(batch.video_ids[i], segs, scores, labels, timings[i], durations[i], inference.nms))
        return out

    def _candidates_single_video(self, video: Tensor, steps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``video [K]`` scores, ``steps [K, n]`` activations -> candidates: segments ``[N, 2]`` (fractional
        steps), scores ``[N]``, labels ``[N]``."""
        inference = self.config.inference
        segs: list[tuple[float, float]] = []
        scores: list[float] = []
        labels: list[int] = []
        if steps.shape[1] == 0:
            return torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        classes = set(torch.nonzero(video >= inference.class_threshold).flatten().tolist()) | {int(video.argmax())}
        for c in sorted(classes):
            cam = steps[c].double().numpy()
            low, high = cam.min(), cam.max()
            cam = (cam - low) / (high - low) if high > low else np.zeros_like(cam)
            for start, end in cam_segments(cam, inference.cam_thresholds):
                segs.append((start - 0.5, end - 0.5))  # the run of steps [start, end) covers these fractional steps
                scores.append(outer_inner_contrast(cam, start, end, inference.inflation) + inference.score_weight * float(video[c]))
                labels.append(c)
        return (
            torch.tensor(segs, dtype=torch.float64).reshape(-1, 2),
            torch.tensor(scores, dtype=torch.float64),
            torch.tensor(labels, dtype=torch.long),
        )
