"""Temporal action detectors, one module per family.

- ``base``: the ``Detector`` protocol every family satisfies (``forward_training``,
  ``forward_inference``, ``detect``) and the shared body of ``detect``;
- ``one_stage``: multi-scale one-stage detectors (ActionFormer, TriDet, TemporalMaxer, ActionMamba,
  CausalTAD, DyFADet, G-TAD's blocks);
- ``dense``: frame-level multi-label detectors (MS-Temba, or any encoder with ``task: dense``);
- ``bmn``: BMN's boundary-matching proposals on fixed-scale pieces (resize or windows), with a
  proposal classifier when ``num_classes > 1`` (two-stage);
- ``tadtr``: TadTR, DETR-style set prediction on fixed-scale pieces (``tal_models.windows``);
- ``classifier``: a video-level multi-label classifier (task ``classification``) whose top classes
  name a class-agnostic detector's detections (``detectors.fused``, ``tal_models.postprocess.fuse_video_classifier``);
- ``online``: causal detectors for live streams (per-step scores, start / update / end events, an
  O(1) incremental state: ``tal_models.online``);
- ``weak``: weakly supervised localization from video-level labels only (BaS-Net style CAS,
  top-k MIL pooling, outer-inner contrast scoring: ``tal_models.cam``);
- ``build``: ``build_detector(config)``, the one place where a config's names become parts.

Presets (the papers' configurations) are in ``tal_models.presets``.
"""

from tal_models.detectors.base import Detector, DetectorModule, check_sequence, detect_sequence, run_sequence
from tal_models.detectors.bmn import BMNConfig, BMNDetector, BMNInferenceConfig, BMNLossConfig, bmn_config
from tal_models.detectors.build import CONFIG_TYPES, DetectorConfig, build_detector, build_encoder, config_type, encoder_blocks
from tal_models.detectors.classifier import ClassifierInferenceConfig, VideoClassifier, VideoClassifierConfig, video_classifier_config
from tal_models.detectors.one_stage import (
    ARCH_PARTS,
    ARCHS,
    ArchParts,
    DenseOutputs,
    InferenceConfig,
    LossConfig,
    OneStageConfig,
    OneStageDetector,
)
from tal_models.detectors.online import OnlineConfig, OnlineDetector, OnlineInferenceConfig, OnlineLossConfig, online_config
from tal_models.detectors.tadtr import TadTRConfig, TadTRDetector, TadTRInferenceConfig, TadTRLossConfig, tadtr_config
from tal_models.detectors.weak import WeakConfig, WeakDetector, WeakInferenceConfig, WeakLossConfig, weak_config

__all__ = [
    "ARCHS",
    "BMNConfig",
    "BMNDetector",
    "BMNInferenceConfig",
    "BMNLossConfig",
    "bmn_config",
    "ARCH_PARTS",
    "CONFIG_TYPES",
    "ArchParts",
    "ClassifierInferenceConfig",
    "DenseOutputs",
    "Detector",
    "DetectorModule",
    "DetectorConfig",
    "InferenceConfig",
    "LossConfig",
    "OneStageConfig",
    "OneStageDetector",
    "OnlineConfig",
    "OnlineDetector",
    "OnlineInferenceConfig",
    "OnlineLossConfig",
    "TadTRConfig",
    "TadTRDetector",
    "TadTRInferenceConfig",
    "TadTRLossConfig",
    "VideoClassifier",
    "VideoClassifierConfig",
    "build_detector",
    "build_encoder",
    "check_sequence",
    "config_type",
    "detect_sequence",
    "run_sequence",
    "encoder_blocks",
    "online_config",
    "tadtr_config",
    "video_classifier_config",
    "WeakConfig",
    "WeakDetector",
    "WeakInferenceConfig",
    "WeakLossConfig",
    "weak_config",
]
