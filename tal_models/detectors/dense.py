"""Dense (frame-level) multi-label detectors: MS-Temba, or any encoder with ``task: dense``.

Legend: B batch, C input channels, D channels, T steps (padded to ``pad_multiple``), L levels,
T_l steps at level l (``T`` for full-resolution encoders), K classes, F scored steps of a video.

MultiTHUMOS- and Charades-style labelling: many actions overlap at every moment, and the task
is to say, at every step, which are happening. The detector reuses a one-stage config (its
``encoder``, ``neck`` and ``head`` widths) with ``task: dense``::

    features [B, C, T] -> encoder (any kind)      -> L x [B, D, T_l]
                       -> neck                    -> L x [B, D, T_l]
                       -> dense head (fuse levels at T, conv tower) -> logits [B, K, T]
    training:  per-step multi-label targets from the segments -> BCE over valid steps
    inference: sigmoid scores per step; runs above ``inference.dense_threshold`` per class
               become ``Detections`` (scored by their mean probability), so serving, batch
               detection and ``tal evaluate`` take a dense model like any other

``step_scores(batch)`` gives the per-step probabilities themselves (``[T_i, K]`` per video), which
the per-frame mAP of ``tal evaluate --dense`` (``tal_models.evaluation.dense``) scores.
MS-Temba's fuser (a bidirectional Mamba over the concatenated scales) is ``head.fuser`` here;
an ``actionformer`` turned dense fuses its pyramid by upsampling and summing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from tal_models.batch import Batch
from tal_models.dense import DenseHead, dense_loss, dense_targets, segments_from_scores
from tal_models.detectors.base import detect_sequence, run_sequence
from tal_models.detectors.one_stage import OneStageConfig
from tal_models.encoders import PyramidEncoder
from tal_models.structures import Detections, Segments, Unit
from tal_models.timing import STEP_TIMING, FeatureTiming


class DenseDetector(nn.Module):
    """Features -> per-step multi-label logits (module docstring). Built by ``build_detector`` from a
    ``OneStageConfig`` with ``task == "dense"``; ``forward`` is the loss dict in training mode and one
    ``Detections`` per video in eval mode, as every detector (``tal_models.detectors.base``)."""

    def __init__(self, config: OneStageConfig, *, encoder: PyramidEncoder, neck: nn.Module, head: DenseHead):
        super().__init__()
        if config.task != "dense":
            raise ValueError(f"DenseDetector takes a config with task='dense', got task={config.task!r}")
        self.config = config
        self.encoder = encoder
        self.neck = neck
        self.head = head

    @property
    def pad_multiple(self) -> int:
        return self.config.encoder.total_stride

    def forward(self, batch: Batch) -> dict[str, Tensor] | list[Detections]:
        if self.training:
            return self.forward_training(batch)
        return self.forward_inference(batch)

    def logits(self, features: Tensor, mask: Tensor, zero_padded: bool = False) -> Tensor:
        """``[B, C, T]``, ``[B, 1, T]`` -> per-step class logits ``[B, K, T]`` (0 at invalid steps)."""
        torch._assert(
            features.shape[-1] % self.pad_multiple == 0,
            f"Detector: T = {features.shape[-1]} must be a multiple of {self.pad_multiple}; "
            f"batch with collate(..., pad_to_multiple=model.pad_multiple)",
        )
        feats, masks = self.encoder(features, mask, zero_padded)  # L x [B, D, T_l]
        feats, masks = self.neck(feats, masks)
        return self.head(feats, masks)  # [B, K, T]

    def forward_training(self, batch: Batch) -> dict[str, Tensor]:
        """The per-step BCE of a batch (labels were checked by ``collate``: nothing here waits for the device)."""
        cfg = self.config
        features = batch.features
        if cfg.loss.input_noise > 0:
            features = features + cfg.loss.input_noise * torch.randn_like(features).masked_fill_(~batch.mask, 0.0)
        logits = self.logits(features, batch.mask, zero_padded=True)
        T = logits.shape[-1]
        targets = torch.stack(
            [dense_targets(segs, labels, cfg.num_classes, T, check_labels=False) for segs, labels in zip(batch.segments, batch.labels)]
        ).to(logits.dtype)  # [B, K, T]
        losses = dense_loss(logits, targets, batch.mask)
        return {k: v for k, v in losses.items() if k != "num_valid"}

    @torch.no_grad()
    def step_scores(self, batch: Batch) -> list[np.ndarray]:
        """Per-step class probabilities of each video's valid steps: ``B`` arrays ``[T_i, K]`` float32."""
        probs = torch.sigmoid(self.logits(batch.features, batch.mask, zero_padded=True).float())  # [B, K, T]
        lengths = batch.lengths().tolist()
        return [probs[i, :, : int(n)].T.cpu().numpy() for i, n in enumerate(lengths)]

    @torch.no_grad()
    def forward_inference(self, batch: Batch) -> list[Detections]:
        inference = self.config.inference
        timings = batch.timings if batch.timings is not None else [STEP_TIMING] * len(batch)
        durations = batch.durations if batch.durations is not None else [None] * len(batch)
        out = []
        for vid, scores, timing, duration in zip(batch.video_ids, self.step_scores(batch), timings, durations):
            segs, seg_scores, labels = segments_from_scores(torch.from_numpy(scores), inference.dense_threshold)  # steps
            seconds = timing.segments_to_seconds(Segments(segs.double().reshape(-1, 2), Unit.STEPS, check=False))
            seconds = seconds.clip(
                0.0, float(duration) if duration is not None else math.inf
            )  # as decode: seconds, or steps under STEP_TIMING
            order = torch.argsort(-seg_scores, stable=True)[: inference.nms.max_detections]
            out.append(Detections(vid, Segments(seconds.data[order], Unit.SECONDS, check=False), seg_scores[order].double(), labels[order]))
        return out

    @torch.no_grad()
    def sequence_scores(self, features: Tensor | np.ndarray) -> np.ndarray:
        """Per-step class probabilities ``[T, K]`` of one feature sequence ``[T, C]`` (checked as ``detect``
        checks it); the model's mode is kept."""
        return run_sequence(self, features, self.config.input_dim, lambda batch: self.step_scores(batch)[0])

    def detect(
        self, features: Tensor | np.ndarray, timing: FeatureTiming | None = None, duration: float | None = None, video_id: str = "video"
    ) -> Detections:
        """Detections of one feature sequence ``[T, C]`` (the serving path); the model's mode is kept."""
        return detect_sequence(self, features, self.config.input_dim, timing, duration, video_id)
