"""``build_detector(config)``: the one place where the names in a config become parts.

Every ``match`` on a name lives here: the detector family (the config's type), the encoder's
blocks (``EncoderConfig.kind``), the regression head (``HeadConfig.regression``). The parts are
built in a fixed order (encoder, neck, classification head, regression head), so a seed gives
the same initial weights whatever the method.
"""

from __future__ import annotations

from torch import nn

from tal_models.dense import DenseHead
from tal_models.detectors.bmn import BMNConfig, BMNDetector
from tal_models.detectors.classifier import VideoClassifier, VideoClassifierConfig
from tal_models.detectors.dense import DenseDetector
from tal_models.detectors.one_stage import OneStageConfig, OneStageDetector
from tal_models.detectors.online import OnlineConfig, OnlineDetector
from tal_models.detectors.tadtr import TadTRConfig, TadTRDetector
from tal_models.detectors.weak import WeakConfig, WeakDetector
from tal_models.encoders import BlockFactory, EncoderConfig, PyramidEncoder
from tal_models.heads import ClassificationHead, OffsetRegressionHead
from tal_models.layers import (
    CausalHybridBlock,
    DilatedTCNBlock,
    DynamicAggregationBlock,
    GCNeXtBlock,
    MambaBlock,
    MaxPoolBlock,
    SGPBlock,
    TembaBlock,
    TransformerBlock,
)
from tal_models.necks import FPNConfig, FPNNeck
from tal_models.refine import build_refiner
from tal_models.targets import CenterSamplingAssigner, DynamicAssigner
from tal_models.trident import TridentHead, TridentHeadConfig

# The config type of every detector family; a checkpoint names its family, and old checkpoints
# (without the key) are one-stage.
DetectorConfig = OneStageConfig  # the one-stage family's (task "detection" -> OneStageDetector, "dense" -> DenseDetector)
CONFIG_TYPES: dict[str, type] = {
    c.family: c for c in (OneStageConfig, BMNConfig, TadTRConfig, VideoClassifierConfig, OnlineConfig, WeakConfig)
}  # fmt: skip


def build_detector(
    config: OneStageConfig | BMNConfig | TadTRConfig | VideoClassifierConfig | OnlineConfig | WeakConfig,
) -> OneStageDetector | DenseDetector | BMNDetector | TadTRDetector | VideoClassifier | OnlineDetector | WeakDetector:
    """The detector ``config`` describes, with fresh weights (seeded by the caller)."""
    match config:
        case OneStageConfig(task="dense"):
            return _dense(config)
        case OneStageConfig():
            return _one_stage(config)
        case BMNConfig():
            return BMNDetector(config)
        case TadTRConfig():
            return TadTRDetector(config)
        case VideoClassifierConfig():
            return VideoClassifier(config)
        case OnlineConfig():
            return OnlineDetector(config)
        case WeakConfig():
            return WeakDetector(config)
    raise TypeError(f"build_detector: no detector family takes a {type(config).__name__}")


def _one_stage(config: OneStageConfig) -> OneStageDetector:
    encoder = build_encoder(config.encoder)
    neck = build_neck(config.neck)
    cls_head = ClassificationHead(config.head, config.num_classes)
    match config.head.regression:
        case "offsets":
            reg_head: nn.Module = OffsetRegressionHead(config.head, config.encoder.levels)
        case "trident":
            h = config.head
            reg_head = TridentHead(
                TridentHeadConfig(
                    in_dim=h.in_dim, feat_dim=h.feat_dim, num_layers=h.num_layers, kernel_size=h.kernel_size, num_bins=h.num_bins,
                    levels=config.encoder.levels,
                )
            )  # fmt: skip
    match config.loss.assigner:
        case "dynamic":
            assigner = DynamicAssigner(config.num_classes, config.loss.center_radius, min_k=config.loss.dynamic_min_k)
        case _:
            assigner = CenterSamplingAssigner(config.num_classes, config.loss.center_sample, config.loss.center_radius)
    refiner = build_refiner(config.refine, config.head.in_dim, config.encoder.levels)
    return OneStageDetector(config, encoder=encoder, neck=neck, cls_head=cls_head, reg_head=reg_head, assigner=assigner, refiner=refiner)


def _dense(config: OneStageConfig) -> DenseDetector:
    """A frame-level detector: the config's encoder and neck, then a dense head (MS-Temba's fuser for ``mstemba``)."""
    encoder = build_encoder(config.encoder)
    neck = build_neck(config.neck)
    h = config.head
    fuser = None
    if config.arch == "mstemba":  # MS-Temba's Scale-aware State Fuser: a bidirectional Mamba over the fused scales
        e = config.encoder
        fuser = MambaBlock(h.feat_dim, 1, "bidirectional", state_dim=e.ssm_state, expand=e.ssm_expand)
    head = DenseHead(
        h.in_dim, config.num_classes, config.encoder.levels, fused_dim=h.feat_dim, fuser=fuser, num_layers=h.num_layers,
        kernel_size=h.kernel_size, with_ln=h.with_ln, prior_prob=h.prior_prob,
    )  # fmt: skip
    return DenseDetector(config, encoder=encoder, neck=neck, head=head)


def build_encoder(config: EncoderConfig) -> PyramidEncoder:
    """The pyramid encoder with the blocks ``config.kind`` names."""
    return PyramidEncoder(config, encoder_blocks(config))


def encoder_blocks(cfg: EncoderConfig) -> BlockFactory:
    """``(level, stride, index in the stem) -> block`` for ``cfg.kind``."""
    C = cfg.embed_dim

    def make(level: int, stride: int, index: int) -> nn.Module:
        match cfg.kind:
            case "transformer":  # ActionFormer
                return TransformerBlock(C, cfg.heads, cfg.windows()[level], stride, cfg.mlp_ratio, cfg.dropout, cfg.drop_path)
            case "sgp":  # TriDet
                return SGPBlock(C, cfg.kernel_size, cfg.sgp_k, stride, cfg.mlp_ratio, cfg.dropout, cfg.drop_path, cfg.sgp_groups)
            case "maxpool":  # TemporalMaxer
                return MaxPoolBlock(C, stride, cfg.kernel_size)
            case "conv":  # dilated TCN: the stem's dilations are 1, 2, 4, ...
                return DilatedTCNBlock(C, cfg.kernel_size, 2**index if stride == 1 else 1, stride, cfg.dropout, cfg.drop_path)
            case "mamba":  # ActionMamba: bidirectional (DBM) selective-SSM blocks
                return MambaBlock(C, stride, "bidirectional", state_dim=cfg.ssm_state, expand=cfg.ssm_expand, drop_path=cfg.drop_path)
            case "causal":  # CausalTAD: causal attention + causal Mamba, past and future branches
                return CausalHybridBlock(
                    C, cfg.heads, cfg.windows()[level], stride, cfg.mlp_ratio, cfg.drop_path, state_dim=cfg.ssm_state, expand=cfg.ssm_expand
                )
            case "dfa":  # DyFADet's DynE layer
                return DynamicAggregationBlock(
                    C, cfg.kernel_size, stride, cfg.mlp_ratio, cfg.drop_path, k=cfg.sgp_k, groups=cfg.sgp_groups, dropout=cfg.dropout
                )
            case "graph":  # G-TAD's GCNeXt
                return GCNeXtBlock(C, cfg.graph_k, cfg.graph_groups, stride=stride, drop_path=cfg.drop_path)
            case "mstemba":  # MS-Temba: full resolution, level l at dilation 2**l
                return TembaBlock(
                    C,
                    2**level,
                    cfg.kernel_size,
                    mlp_ratio=cfg.mlp_ratio,
                    drop_path=cfg.drop_path,
                    state_dim=cfg.ssm_state,
                    expand=cfg.ssm_expand,
                )
        raise ValueError(f"unknown encoder kind {cfg.kind!r}")

    return make


def build_neck(config: FPNConfig) -> FPNNeck:
    return FPNNeck(config)


def config_type(family: str) -> type:
    """The config dataclass of a detector family (``"one_stage"``, ...), e.g. to read a checkpoint."""
    if family not in CONFIG_TYPES:
        raise ValueError(f"unknown detector family {family!r}; known: {sorted(CONFIG_TYPES)}")
    return CONFIG_TYPES[family]
