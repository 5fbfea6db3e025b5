"""The multi-scale one-stage detector: ActionFormer, TriDet and TemporalMaxer in one forward path.

Legend: B batch, C input channels, T steps (padded to a multiple of 2**(L-1)), L pyramid levels,
T_l = T / 2**l steps at level l, P = sum_l T_l points, K classes, N_i segments of video i.

    features [B, C, T] -> encoder (projection, stem, stride-2 blocks) -> L x [B, D, T_l]
                       -> neck (identity / FPN)                      -> L x [B, D, T_l]
                       -> points (one per step of every level)       -> P points
                       -> heads: classification [B, P, K], regression [B, P, 2] (in strides)
    training:  assign targets to the points -> focal + DIoU losses  -> {"cls_loss", "reg_loss", "final_loss"}
    inference: decode (top-k per level -> segments -> seconds -> NMS) -> list of Detections

The three papers share this path and differ in two parts, chosen by ``make_config``:

| arch            | encoder blocks                       | regression head             |
|-----------------|--------------------------------------|-----------------------------|
| ``actionformer``| local-window self-attention          | distances (``offsets``)     |
| ``tridet``      | SGP (instant + window-level branches)| Trident (boundary bins)     |
| ``temporalmaxer``| max-pooling, no stem                | distances (``offsets``)     |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from tal_models.blocks import EncoderConfig, FPNConfig, FPNNeck, PyramidEncoder
from tal_models.decode import decode
from tal_models.heads import ClassificationHead, HeadConfig, OffsetRegressionHead
from tal_models.losses import LossNormalizer, RegLoss, detection_losses
from tal_models.points import DEFAULT_REGRESSION_RANGES, Points, make_points
from tal_models.postprocess import NMSConfig
from tal_models.structures import Detections
from tal_models.targets import assign_targets
from tal_models.timing import STEP_TIMING, FeatureTiming
from tal_models.training import Batch, collate
from tal_models.trident import TridentHead, TridentHeadConfig

Arch = Literal["actionformer", "tridet", "temporalmaxer"]
ARCHS: tuple[str, ...] = ("actionformer", "tridet", "temporalmaxer")


@dataclass(frozen=True)
class LossConfig:
    """Label assignment and losses (ActionFormer's THUMOS14 values)."""

    center_sample: bool = True
    center_radius: float = 1.5
    loss_weight: float = 1.0  # weight of the regression loss
    label_smoothing: float = 0.0
    reg_loss: RegLoss = "diou"
    init_loss_norm: float = 100.0
    loss_norm_momentum: float = 0.9
    iou_weight_power: float = 0.0  # TriDet: 0.2 on THUMOS14 (classification loss weighted by IoU ** power)
    input_noise: float = 0.0  # TriDet: Gaussian noise of this std added to the features in training

    def __post_init__(self) -> None:
        if not self.center_radius > 0:
            raise ValueError(f"LossConfig.center_radius must be > 0 strides, got {self.center_radius} (ActionFormer: 1.5)")
        for name in ("loss_weight", "iou_weight_power", "input_noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"LossConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.reg_loss not in ("diou", "giou"):
            raise ValueError(f"LossConfig.reg_loss must be 'diou' or 'giou', got {self.reg_loss!r}")


@dataclass(frozen=True)
class InferenceConfig:
    """Decoding: per-level candidates, then ``nms`` (ActionFormer's THUMOS14 values)."""

    pre_nms_threshold: float = 0.001
    pre_nms_topk: int = 2000  # per level
    min_length: float = 0.05  # input steps
    nms: NMSConfig = field(default_factory=lambda: NMSConfig(method="soft_gaussian", sigma=0.5, max_detections=200, voting_threshold=0.7))


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to rebuild a detector; stored as YAML in presets and checkpoints.

    ``max_seq_len``: training sequences are cropped to it (ActivityNet-style presets resize every
    video to it instead, in the data pipeline); inference takes any length.
    ``regression_ranges``: per level, in input steps (``tal_models.points``).
    """

    arch: Arch = "actionformer"
    num_classes: int = 20
    max_seq_len: int = 2304
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    neck: FPNConfig = field(default_factory=FPNConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    regression_ranges: tuple[tuple[float, float], ...] = DEFAULT_REGRESSION_RANGES
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"DetectorConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"DetectorConfig.num_classes must be a positive int (1 = class-agnostic), got {self.num_classes!r}")
        levels = self.encoder.levels
        object.__setattr__(self, "regression_ranges", tuple((float(lo), float(hi)) for lo, hi in self.regression_ranges))
        if self.neck.levels != levels or len(self.regression_ranges) != levels:
            raise ValueError(
                f"DetectorConfig: the encoder has {levels} levels but the neck has {self.neck.levels}, "
                f"and there are {len(self.regression_ranges)} regression ranges; make them equal"
            )
        if self.neck.in_dim != self.encoder.embed_dim or self.head.in_dim != self.neck.out_dim:
            raise ValueError(
                f"DetectorConfig: widths disagree: encoder.embed_dim={self.encoder.embed_dim} -> neck.in_dim={self.neck.in_dim}, "
                f"neck.out_dim={self.neck.out_dim} -> head.in_dim={self.head.in_dim}"
            )
        if self.max_seq_len < 1 or self.max_seq_len % self.encoder.total_stride != 0:
            raise ValueError(
                f"DetectorConfig.max_seq_len ({self.max_seq_len}) must be a positive multiple of 2**(levels - 1) = {self.encoder.total_stride}"
            )

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2**level for level in range(self.encoder.levels))

    @property
    def input_dim(self) -> int:
        return self.encoder.input_dim


def make_config(
    arch: Arch,
    *,
    num_classes: int,
    input_dim: int,
    max_seq_len: int = 2304,
    embed_dim: int = 512,
    levels: int = 6,
    **overrides,
) -> DetectorConfig:
    """The paper's THUMOS14 configuration of ``arch`` at the given sizes; ``overrides`` replace
    top-level ``DetectorConfig`` fields (``loss=LossConfig(...)``, ``inference=...``)."""
    if levels > len(DEFAULT_REGRESSION_RANGES):
        raise ValueError(f"make_config: at most {len(DEFAULT_REGRESSION_RANGES)} levels have default regression ranges")
    # ActionFormer's ranges; the coarsest level takes everything longer
    ranges = DEFAULT_REGRESSION_RANGES[: levels - 1] + ((DEFAULT_REGRESSION_RANGES[levels - 1][0], math.inf),)
    neck = FPNConfig(in_dim=embed_dim, out_dim=embed_dim, levels=levels)
    match arch:
        case "actionformer":  # ActionFormer (ECCV 2022): 4 heads, window 19, MLP ratio 4
            encoder = EncoderConfig(kind="transformer", input_dim=input_dim, embed_dim=embed_dim, levels=levels, heads=4, window=19)
            head = HeadConfig(in_dim=embed_dim, feat_dim=embed_dim)
        case "tridet":  # TriDet (CVPR 2023), THUMOS14: SGP with k = 5, w = 1, MLP 768/512 = 1.5; 16 bins
            encoder = EncoderConfig(kind="sgp", input_dim=input_dim, embed_dim=embed_dim, levels=levels, kernel_size=1, sgp_k=5.0, mlp_ratio=1.5)
            head = HeadConfig(in_dim=embed_dim, feat_dim=embed_dim, regression="trident", num_bins=16)
            overrides.setdefault("loss", LossConfig(iou_weight_power=0.2, input_noise=0.0005))
        case "temporalmaxer":  # TemporalMaxer (2023): max-pooling blocks, no stem
            encoder = EncoderConfig(kind="maxpool", input_dim=input_dim, embed_dim=embed_dim, levels=levels, kernel_size=3)
            head = HeadConfig(in_dim=embed_dim, feat_dim=embed_dim)
        case _:
            raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    return DetectorConfig(
        arch=arch,
        num_classes=num_classes,
        max_seq_len=max_seq_len,
        encoder=encoder,
        neck=neck,
        head=head,
        regression_ranges=ranges,
        **overrides,
    )


@dataclass
class DenseOutputs:
    """The heads' outputs over all points: ``cls_logits [B, P, K]``, ``reg_offsets [B, P, 2]``
    (distances in strides), ``valid [B, P]`` (False at padded steps)."""

    points: Points
    cls_logits: Tensor
    reg_offsets: Tensor
    valid: Tensor


class Detector(nn.Module):
    """A multi-scale one-stage temporal action detector (module docstring for the path).

    ``forward(batch)``: in training mode the loss dict (``final_loss`` is back-propagated), in
    eval mode one ``Detections`` per video, in seconds when the batch carries timings.
    ``batch.features`` must be ``[B, input_dim, T]`` with ``T`` a multiple of
    ``pad_multiple`` (``collate(..., pad_to_multiple=model.pad_multiple)`` does it).
    """

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        self.encoder = PyramidEncoder(config.encoder)
        self.neck = FPNNeck(config.neck)
        self.cls_head = ClassificationHead(config.head, config.num_classes)
        match config.head.regression:
            case "offsets":
                self.reg_head = OffsetRegressionHead(config.head, config.encoder.levels)
            case "trident":
                h = config.head
                trident = TridentHeadConfig(
                    in_dim=h.in_dim, feat_dim=h.feat_dim, num_layers=h.num_layers, kernel_size=h.kernel_size, num_bins=h.num_bins,
                    levels=config.encoder.levels,
                )  # fmt: skip
                self.reg_head = TridentHead(trident)
        self.loss_normalizer = LossNormalizer(config.loss.init_loss_norm, config.loss.loss_norm_momentum)

    @property
    def pad_multiple(self) -> int:
        return self.config.encoder.total_stride

    def forward(self, batch: Batch) -> dict[str, Tensor] | list[Detections]:
        if self.training:
            return self.forward_training(batch)
        return self.forward_inference(batch)

    def dense(self, features: Tensor, mask: Tensor) -> DenseOutputs:
        """Features ``[B, C, T]`` and mask ``[B, 1, T]`` -> the heads' outputs at every point."""
        torch._assert(
            features.shape[-1] % self.pad_multiple == 0,
            f"Detector: T = {features.shape[-1]} must be a multiple of {self.pad_multiple}; "
            f"batch with collate(..., pad_to_multiple=model.pad_multiple)",
        )
        feats, masks = self.encoder(features, mask)  # L x [B, D, T_l], L x [B, 1, T_l]
        feats, masks = self.neck(feats, masks)
        cfg = self.config
        points = make_points([f.shape[-1] for f in feats], cfg.strides, cfg.regression_ranges, device=features.device)
        cls_logits = torch.cat([c.transpose(1, 2) for c in self.cls_head(feats, masks)], dim=1)  # L x [B, K, T_l] -> [B, P, K]
        reg_offsets = torch.cat([r.transpose(1, 2) for r in self.reg_head(feats, masks)], dim=1)  # L x [B, 2, T_l] -> [B, P, 2]
        valid = torch.cat([m[:, 0] for m in masks], dim=1)  # L x [B, 1, T_l] -> [B, P]
        return DenseOutputs(points, cls_logits, reg_offsets, valid)

    def forward_training(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.config
        features = batch.features
        if cfg.loss.input_noise > 0:
            features = features + cfg.loss.input_noise * torch.randn_like(features)  # padded steps are masked anyway
        out = self.dense(features, batch.mask)
        for i, labels in enumerate(batch.labels):
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes):
                raise ValueError(f"video {batch.video_ids[i]!r}: labels must lie in [0, {cfg.num_classes}), got {labels.tolist()}")
        targets = assign_targets(
            out.points, batch.segments, batch.labels, cfg.num_classes, center_sample=cfg.loss.center_sample, center_radius=cfg.loss.center_radius
        )
        return detection_losses(
            out.cls_logits,
            out.reg_offsets,
            targets.cls_targets,
            targets.reg_targets,
            out.valid,
            self.loss_normalizer,
            loss_weight=cfg.loss.loss_weight,
            label_smoothing=cfg.loss.label_smoothing,
            reg_loss=cfg.loss.reg_loss,
            iou_weight_power=cfg.loss.iou_weight_power,
        )

    @torch.no_grad()
    def forward_inference(self, batch: Batch) -> list[Detections]:
        out = self.dense(batch.features, batch.mask)
        inf = self.config.inference
        durations = batch.durations if batch.durations is not None else [None] * len(batch)
        return decode(
            out.points,
            out.cls_logits,
            out.reg_offsets,
            out.valid,
            batch.timings if batch.timings is not None else STEP_TIMING,
            durations,
            batch.video_ids,
            inf.nms,
            pre_nms_threshold=inf.pre_nms_threshold,
            pre_nms_topk=inf.pre_nms_topk,
            min_length=inf.min_length,
        )

    @torch.no_grad()
    def detect(
        self, features: Tensor | np.ndarray, timing: FeatureTiming | None = None, duration: float | None = None, video_id: str = "video"
    ) -> Detections:
        """Detections of one feature sequence ``[T, C]`` (the serving path); the model's mode is kept."""
        features = torch.as_tensor(features, dtype=torch.float32)
        if features.ndim != 2 or features.shape[1] != self.config.input_dim:
            raise ValueError(f"features must be [T, {self.config.input_dim}], got {tuple(features.shape)}")
        if features.shape[0] == 0:
            raise ValueError("features must have at least one step")
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN or infinite values")
        device = next(self.parameters()).device
        batch = collate([{"features": features, "video_id": video_id, "timing": timing, "duration": duration}], self.pad_multiple)
        was_training = self.training
        self.eval()
        try:
            return self.forward_inference(batch.to(device))[0]
        finally:
            self.train(was_training)


def build_detector(config: DetectorConfig) -> Detector:
    """The detector of ``config`` (one class for all archs; ``config.arch`` chose the parts)."""
    return Detector(config)
