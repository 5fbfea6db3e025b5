"""Multi-scale one-stage detectors: ActionFormer, TriDet and TemporalMaxer share this forward path.

Legend: B batch, C input channels, T steps (padded to a multiple of 2**(L-1)), L pyramid levels,
T_l = T / 2**l steps at level l, P = sum_l T_l points, K classes, N_i segments of video i.

    features [B, C, T] -> encoder (projection, stem, stride-2 blocks) -> L x [B, D, T_l]
                       -> neck (identity / FPN)                      -> L x [B, D, T_l]
                       -> points (one per step of every level)       -> P points
                       -> heads: classification [B, P, K], regression [B, P, 2] (in strides)
    training:  assign targets to the points -> focal + DIoU losses  -> {"cls_loss", "reg_loss", "final_loss"}
    inference: decode (top-k per level -> segments -> seconds -> NMS) -> list of Detections

The methods share this path and differ in their parts (``ARCH_PARTS``), which
``tal_models.detectors.build`` builds from the config and hands to ``OneStageDetector``:

| arch             | encoder blocks                                   | regression head          |
|------------------|--------------------------------------------------|--------------------------|
| ``actionformer`` | local-window self-attention                      | distances (``offsets``)  |
| ``tridet``       | SGP (instant + window-level branches)            | Trident (boundary bins)  |
| ``temporalmaxer``| max-pooling, no stem                             | distances (``offsets``)  |
| ``actionmamba``  | bidirectional selective SSM (DBM)                | distances (``offsets``)  |
| ``causaltad``    | hybrid causal attention + causal Mamba           | distances (``offsets``)  |
| ``dyfadet``      | dynamic feature aggregation (DFA); dynamic heads | distances (``offsets``)  |
| ``gtad``         | GCNeXt graph blocks (temporal + semantic kNN)    | distances (``offsets``)  |
| ``mstemba``      | Temba blocks at full resolution (dense task)     | none: per-step scores    |

``config.head.classifier = "text"`` makes it open-vocabulary (``tal_models.open_vocab``): the
classification head scores steps against class-name embeddings, the training classes' by default,
any others passed to ``forward_inference`` / ``detect`` as ``class_embeddings [K', E]``.

``config.task = "dense"`` makes a frame-level multi-label detector of the same encoder instead
(``tal_models.detectors.dense``): per-step sigmoid scores, MultiTHUMOS / Charades style. Any
arch can be made dense; ``mstemba`` is dense only. ``config.head.refine`` switches on boundary
refinement (``tal_models.refine``) for any detection arch.

A new one-stage method is a new block in ``tal_models.layers`` (or a head), a row of
``ARCH_PARTS``, a ``case`` in the builder, and a preset: nothing in this file's forward path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from tal_models.batch import Batch
from tal_models.config import require_positive_int
from tal_models.decode import decode
from tal_models.detectors.base import detect_sequence, run_sequence
from tal_models.encoders import EncoderConfig, EncoderKind, PyramidEncoder
from tal_models.heads import HeadConfig, RegressionKind, TowerKind
from tal_models.losses import LossNormalizer, RegLoss, detection_losses
from tal_models.necks import FPNConfig
from tal_models.open_vocab import TextClassificationHead
from tal_models.points import DEFAULT_REGRESSION_RANGES, Points, make_points
from tal_models.postprocess import NMSConfig
from tal_models.refine import BoundaryRefiner, RefineConfig, refine_losses
from tal_models.structures import Detections
from tal_models.targets import CenterSamplingAssigner, DynamicAssigner
from tal_models.text import TextEncoderConfig
from tal_models.timing import STEP_TIMING, FeatureTiming

Arch = Literal["actionformer", "tridet", "temporalmaxer", "actionmamba", "causaltad", "dyfadet", "gtad", "mstemba"]
AssignerKind = Literal["center", "dynamic"]
Task = Literal["detection", "dense"]


class ArchParts(NamedTuple):
    """The parts that make a method: its encoder's blocks, its regression head and its heads' towers."""

    encoder: EncoderKind
    regression: RegressionKind
    tower: TowerKind = "conv"


ARCH_PARTS: dict[str, ArchParts] = {
    "actionformer": ArchParts("transformer", "offsets"),
    "tridet": ArchParts("sgp", "trident"),
    "temporalmaxer": ArchParts("maxpool", "offsets"),
    "actionmamba": ArchParts("mamba", "offsets"),
    "causaltad": ArchParts("causal", "offsets"),
    "dyfadet": ArchParts("dfa", "offsets", "dynamic"),
    "gtad": ArchParts("graph", "offsets"),
    "mstemba": ArchParts("mstemba", "offsets"),
}
ARCHS: tuple[str, ...] = tuple(ARCH_PARTS)
DENSE_ONLY_ARCHS = ("mstemba",)  # full-resolution encoders: no pyramid of points to regress from


@dataclass(frozen=True)
class LossConfig:
    """Label assignment and losses (ActionFormer's THUMOS14 values)."""

    assigner: AssignerKind = "center"  # "dynamic": SimOTA-style, from the predictions (tal_models.targets.DynamicAssigner)
    center_sample: bool = True
    center_radius: float = 1.5  # dynamic: the candidates' centre region (TemporalMaxer / YOLOX: 2.5)
    dynamic_min_k: int = 1  # dynamic: positives per segment at least
    loss_weight: float = 1.0  # weight of the regression loss
    label_smoothing: float = 0.0
    reg_loss: RegLoss = "diou"
    init_loss_norm: float = 100.0
    loss_norm_momentum: float = 0.9
    iou_weight_power: float = 0.0  # TriDet: 0.2 on THUMOS14 (classification loss weighted by IoU ** power)
    input_noise: float = 0.0  # TriDet: Gaussian noise of this std added to the features in training

    def __post_init__(self) -> None:
        if self.assigner not in ("center", "dynamic"):
            raise ValueError(f"LossConfig.assigner must be 'center' (ActionFormer) or 'dynamic' (SimOTA-style), got {self.assigner!r}")
        require_positive_int(self.dynamic_min_k, "LossConfig.dynamic_min_k")
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
    dense_threshold: float = 0.5  # dense detectors: runs of steps scoring above it become detections
    nms: NMSConfig = field(default_factory=lambda: NMSConfig(method="soft_gaussian", sigma=0.5, max_detections=200, voting_threshold=0.7))


@dataclass(frozen=True)
class OneStageConfig:
    """Everything needed to rebuild a one-stage detector; stored as YAML in presets and checkpoints.

    ``arch`` names the method and must agree with its parts (``ARCH_PARTS``): a config whose
    ``encoder.kind`` or ``head.regression`` is another method's is refused.

    ``max_seq_len``: training sequences are cropped to it (ActivityNet-style presets resize every
    video to it instead, in the data pipeline); inference takes any length.
    ``regression_ranges``: per level, in input steps (``tal_models.points``).
    ``text``: how the class names are embedded when ``head.classifier`` is ``text`` (open vocabulary).
    """

    family: ClassVar[str] = "one_stage"

    arch: Arch = "actionformer"
    task: Task = "detection"  # "dense": per-step multi-label scores (tal_models.detectors.dense)
    num_classes: int = 20
    max_seq_len: int = 2304
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    neck: FPNConfig = field(default_factory=FPNConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    regression_ranges: tuple[tuple[float, float], ...] = DEFAULT_REGRESSION_RANGES
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)  # boundary refinement (BRN's scale-time features): off by default
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # open vocabulary (head.classifier "text"): the class-name encoder

    def __post_init__(self) -> None:
        if self.arch not in ARCH_PARTS:
            raise ValueError(f"DetectorConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        parts = ARCH_PARTS[self.arch]
        if (self.encoder.kind, self.head.regression, self.head.tower) != parts:
            raise ValueError(
                f"DetectorConfig: arch {self.arch!r} is encoder.kind={parts.encoder!r} with head.regression={parts.regression!r} "
                f"and head.tower={parts.tower!r}, but this config has encoder.kind={self.encoder.kind!r}, "
                f"head.regression={self.head.regression!r} and head.tower={self.head.tower!r}: change the arch or the parts "
                f"(archs: {', '.join(f'{a} = {p.encoder} + {p.regression} + {p.tower}' for a, p in ARCH_PARTS.items())})"
            )
        if self.task not in ("detection", "dense"):
            raise ValueError(f"DetectorConfig.task must be 'detection' or 'dense' (per-step multi-label scores), got {self.task!r}")
        if self.arch in DENSE_ONLY_ARCHS and self.task != "dense":
            raise ValueError(f"DetectorConfig: arch {self.arch!r} is a dense (per-step) detector: set task: dense")
        if self.task == "dense" and self.refine.kind != "none":
            raise ValueError(
                "DetectorConfig: boundary refinement (refine.kind) refines regressed distances; a dense detector has none: set refine.kind: none"
            )
        if self.head.classifier == "text" and self.text.kind == "none":
            raise ValueError(
                "DetectorConfig: head.classifier 'text' scores steps against class-name embeddings and needs a text encoder: "
                "set text.kind to 'open_clip' (e.g. text.model: ViT-B-32) or 'table'"
            )
        if self.head.classifier == "text" and self.task == "dense":
            raise ValueError("DetectorConfig: head.classifier 'text' is for task 'detection'; a dense detector has its own head")
        require_positive_int(self.num_classes, "DetectorConfig.num_classes", " (1 = class-agnostic)")
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


@dataclass
class DenseOutputs:
    """The heads' outputs over all points: ``cls_logits [B, P, K]``, ``reg_offsets [B, P, 2]``
    (distances in strides; refined ones when the detector has a refiner), ``valid [B, P]`` (False
    at padded steps); ``head_offsets [B, P, 2]`` the regression head's own distances before
    refinement (``None`` without a refiner)."""

    points: Points
    cls_logits: Tensor
    reg_offsets: Tensor
    valid: Tensor
    head_offsets: Tensor | None = None


def decode_outputs(out: DenseOutputs, batch: Batch, inference: InferenceConfig) -> list[Detections]:
    """The heads' outputs of ``batch`` -> one ``Detections`` per video (``tal_models.decode`` with the
    config's candidates and NMS), in seconds when the batch carries timings, else in feature steps.
    Shared by the PyTorch detector and the exported graph's ``RuntimeDetector``."""
    return decode(
        out.points,
        out.cls_logits,
        out.reg_offsets,
        out.valid,
        batch.timings if batch.timings is not None else STEP_TIMING,
        batch.durations if batch.durations is not None else [None] * len(batch),
        batch.video_ids,
        inference.nms,
        pre_nms_threshold=inference.pre_nms_threshold,
        pre_nms_topk=inference.pre_nms_topk,
        min_length=inference.min_length,
    )


class OneStageDetector(nn.Module):
    """A multi-scale one-stage temporal action detector (module docstring for the path).

    Built from parts, as torchvision's detectors take ``head=``: ``encoder`` (features -> pyramid),
    ``neck`` (pyramid -> pyramid), ``cls_head`` (pyramid -> ``L x [B, K, T_l]`` logits),
    ``reg_head`` (pyramid -> ``L x [B, 2, T_l]`` distances in strides), ``assigner`` (points +
    ground truth -> targets); ``config`` supplies the rest (classes, regression ranges, losses,
    decoding) and is what a checkpoint stores, so the parts must be the ones it names:
    ``tal_models.detectors.build_detector(config)`` makes them.

    ``forward(batch)``: in training mode the loss dict (``final_loss`` is back-propagated), in
    eval mode one ``Detections`` per video, in seconds when the batch carries timings.
    ``batch.features`` must be ``[B, input_dim, T]`` with ``T`` a multiple of
    ``pad_multiple`` (``collate(..., pad_to_multiple=model.pad_multiple)`` does it).
    """

    def __init__(
        self,
        config: OneStageConfig,
        *,
        encoder: PyramidEncoder,
        neck: nn.Module,
        cls_head: nn.Module,
        reg_head: nn.Module,
        assigner: CenterSamplingAssigner | DynamicAssigner,
        refiner: BoundaryRefiner | None = None,
    ):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.neck = neck
        self.cls_head = cls_head
        self.reg_head = reg_head
        self.assigner = assigner
        self.refiner = refiner
        self.loss_normalizer = LossNormalizer(config.loss.init_loss_norm, config.loss.loss_norm_momentum)

    @property
    def pad_multiple(self) -> int:
        return self.config.encoder.total_stride

    def forward(self, batch: Batch) -> dict[str, Tensor] | list[Detections]:
        if self.training:
            return self.forward_training(batch)
        return self.forward_inference(batch)

    @property
    def open_vocabulary(self) -> bool:
        """Whether the classification head scores class-name embeddings (``head.classifier`` "text")."""
        return isinstance(self.cls_head, TextClassificationHead)

    def set_class_embeddings(self, embeddings: Tensor) -> None:
        """The training classes' text embeddings ``[K, text_dim]``, before training (a text head only)."""
        if not self.open_vocabulary:
            raise ValueError("set_class_embeddings: this detector has a linear classifier (head.classifier 'linear'), not a text one")
        self.cls_head.set_class_embeddings(embeddings)

    def dense(self, features: Tensor, mask: Tensor, zero_padded: bool = False, class_embeddings: Tensor | None = None) -> DenseOutputs:
        """Features ``[B, C, T]`` and mask ``[B, 1, T]`` -> the heads' outputs at every point.
        ``zero_padded``: ``features`` is 0 at invalid steps (a ``Batch`` is); otherwise they may hold anything.
        ``class_embeddings [K', E]``: a text head scores these classes instead of the training ones (``cls_logits [B, P, K']``)."""
        if class_embeddings is not None and not self.open_vocabulary:
            raise ValueError("class_embeddings were given but this detector has a linear classifier (head.classifier 'linear')")
        torch._assert(
            features.shape[-1] % self.pad_multiple == 0,
            f"Detector: T = {features.shape[-1]} must be a multiple of {self.pad_multiple}; "
            f"batch with collate(..., pad_to_multiple=model.pad_multiple)",
        )
        feats, masks = self.encoder(features, mask, zero_padded)  # L x [B, D, T_l], L x [B, 1, T_l]
        feats, masks = self.neck(feats, masks)
        cfg = self.config
        points = make_points([f.shape[-1] for f in feats], cfg.strides, cfg.regression_ranges, device=features.device)
        cls_out = self.cls_head(feats, masks, class_embeddings) if class_embeddings is not None else self.cls_head(feats, masks)
        cls_logits = torch.cat([c.transpose(1, 2) for c in cls_out], dim=1)  # L x [B, K, T_l] -> [B, P, K]
        reg = self.reg_head(feats, masks)  # L x [B, 2, T_l]
        reg_offsets = torch.cat([r.transpose(1, 2) for r in reg], dim=1)  # L x [B, 2, T_l] -> [B, P, 2]
        valid = torch.cat([m[:, 0] for m in masks], dim=1)  # L x [B, 1, T_l] -> [B, P]
        if self.refiner is None:
            return DenseOutputs(points, cls_logits, reg_offsets, valid)
        refined = torch.cat([r.transpose(1, 2) for r in self.refiner(feats, masks, reg)], dim=1)  # [B, P, 2]
        return DenseOutputs(points, cls_logits, refined, valid, head_offsets=reg_offsets)

    def forward_training(self, batch: Batch) -> dict[str, Tensor]:
        """The losses of a batch (labels were checked by ``collate``: nothing here waits for the device)."""
        cfg = self.config
        features = batch.features
        if cfg.loss.input_noise > 0:  # TriDet's; none at padded steps, so the batch stays zero-padded
            features = features + cfg.loss.input_noise * torch.randn_like(features).masked_fill_(~batch.mask, 0.0)
        out = self.dense(features, batch.mask, zero_padded=True)
        head_offsets = out.reg_offsets if out.head_offsets is None else out.head_offsets
        targets = self.assigner(out.points, batch.segments, batch.labels, out.cls_logits, head_offsets)
        losses = detection_losses(
            out.cls_logits,
            head_offsets,
            targets.cls_targets,
            targets.reg_targets,
            out.valid,
            self.loss_normalizer,
            loss_weight=cfg.loss.loss_weight,
            label_smoothing=cfg.loss.label_smoothing,
            reg_loss=cfg.loss.reg_loss,
            iou_weight_power=cfg.loss.iou_weight_power,
        )
        if out.head_offsets is not None:  # the refined distances get the same regression loss, on the same normaliser
            positive = targets.positive() & out.valid
            norm = self.loss_normalizer.value  # updated once, by detection_losses
            norm = norm.to(out.reg_offsets.dtype) if isinstance(norm, Tensor) else norm
            refine = refine_losses(out.reg_offsets, targets.reg_targets, positive, norm)["refine_loss"]
            losses["refine_loss"] = refine
            losses["final_loss"] = losses["final_loss"] + cfg.refine.loss_weight * refine
        return losses

    @torch.no_grad()
    def forward_inference(self, batch: Batch, class_embeddings: Tensor | None = None) -> list[Detections]:
        """One ``Detections`` per video; ``class_embeddings [K', E]`` (a text head only): labels index these classes."""
        out = self.dense(batch.features, batch.mask, zero_padded=True, class_embeddings=class_embeddings)
        return decode_outputs(out, batch, self.config.inference)

    def detect(
        self,
        features: Tensor | np.ndarray,
        timing: FeatureTiming | None = None,
        duration: float | None = None,
        video_id: str = "video",
        class_embeddings: Tensor | None = None,
    ) -> Detections:
        """Detections of one feature sequence ``[T, C]`` (the serving path); the model's mode is kept.
        ``class_embeddings [K', E]`` (a text head only): detect these classes, labels index them."""
        if class_embeddings is None:
            return detect_sequence(self, features, self.config.input_dim, timing, duration, video_id)
        if not self.open_vocabulary:
            raise ValueError("class_embeddings were given but this detector has a linear classifier (head.classifier 'linear')")
        return run_sequence(
            self,
            features,
            self.config.input_dim,
            lambda batch: self.forward_inference(batch, class_embeddings)[0],
            timing=timing,
            duration=duration,
            video_id=video_id,
        )
