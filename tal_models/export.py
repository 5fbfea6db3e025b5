"""The dense part of a one-stage detector as a self-contained graph, and detectors that run such a graph.

Legend: B batch, C input channels, T steps (a multiple of ``pad_multiple``), L pyramid levels,
T_l = T / 2**l, P = sum_l T_l points, K classes.

An exported model (ONNX, TorchScript: ``jobs.export`` writes them) is ``DenseGraph``: everything
up to the heads, with tensors only at its edges::

    features [B, C, T] float32, mask [B, T] bool
        -> cls_logits [B, P, K] float32, reg_offsets [B, P, 2] float32 (strides), valid [B, P] bool

Decoding (top-k per level, segments, seconds, NMS) stays in Python and is the same code as
PyTorch inference: ``RuntimeDetector`` turns a runtime's three arrays back into ``DenseOutputs``
(``dense_outputs``: the points are a function of ``T`` and the config) and hands them to
``tal_models.decode``. The per-level outputs are concatenated level 0 first (as ``decode`` takes
them); level ``l`` is the slice ``points.level_slices()[l]``.

Nothing here imports an exporter or a runtime: a runtime is any callable
``(features ndarray [B, C, T], mask ndarray [B, T]) -> (cls_logits, reg_offsets, valid)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tal_models.batch import Batch, collate
from tal_models.detectors.base import check_sequence
from tal_models.detectors.one_stage import DenseOutputs, OneStageConfig, OneStageDetector, decode_outputs
from tal_models.points import make_points
from tal_models.structures import Detections
from tal_models.timing import FeatureTiming

INPUT_NAMES = ("features", "mask")
OUTPUT_NAMES = ("cls_logits", "reg_offsets", "valid")

# (features [B, C, T] float32, mask [B, T] bool) -> (cls_logits [B, P, K], reg_offsets [B, P, 2], valid [B, P])
DenseRuntime = Callable[[np.ndarray, np.ndarray], Sequence[np.ndarray]]


class DenseGraph(nn.Module):
    """``detector.dense`` with plain tensors in and out (the module docstring's contract).

    ``mask`` may be bool or a float ``[B, T]`` (``> 0.5`` is valid); the caller pads ``T`` to a
    multiple of ``detector.pad_multiple``. Goes through the detector's public ``dense``, so it
    follows whatever layout the layers use inside.
    """

    def __init__(self, detector: OneStageDetector):
        super().__init__()
        if not isinstance(detector, OneStageDetector):
            raise TypeError(f"DenseGraph exports one-stage detectors, got a {type(detector).__name__}")
        self.detector = detector

    def forward(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if mask.dtype != torch.bool:
            mask = mask > 0.5
        out = self.detector.dense(features, mask[:, None, :])  # [B, T] -> [B, 1, T]
        return out.cls_logits, out.reg_offsets, out.valid


def example_inputs(config: OneStageConfig, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Inputs to trace with: two videos, the second padded over its last quarter (so every
    masking path is taken), ``length`` steps (default 4 x ``pad_multiple``, at least 64)."""
    multiple = config.encoder.total_stride
    t = length if length is not None else max(64, 4 * multiple)
    if t % multiple:
        raise ValueError(f"example length {t} must be a multiple of {multiple}")
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, config.input_dim, t, generator=generator)  # [2, C, T]
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, t - t // 4 :] = False
    return features.masked_fill(~mask[:, None, :], 0.0), mask


def dense_outputs(config: OneStageConfig, length: int, cls_logits: Any, reg_offsets: Any, valid: Any) -> DenseOutputs:
    """A runtime's arrays for an input of ``length`` steps -> the ``DenseOutputs`` ``decode`` takes.

    Checks the shapes against the config (``P`` from ``length``), so a graph exported from another
    model is an error here rather than wrong detections.
    """
    strides = config.strides
    lengths = [length // s for s in strides]
    points = make_points(lengths, strides, config.regression_ranges)
    cls_logits, reg_offsets, valid = (torch.as_tensor(np.asarray(a)) for a in (cls_logits, reg_offsets, valid))
    b, p, k = cls_logits.shape[0], len(points), config.num_classes
    if cls_logits.shape != (b, p, k) or reg_offsets.shape != (b, p, 2) or valid.shape != (b, p):
        raise ValueError(
            f"the exported graph gave cls_logits {tuple(cls_logits.shape)}, reg_offsets {tuple(reg_offsets.shape)}, "
            f"valid {tuple(valid.shape)} for T = {length}; this config wants [B, {p}, {k}], [B, {p}, 2], [B, {p}]"
        )
    return DenseOutputs(points, cls_logits.float(), reg_offsets.float(), valid.bool())


class RuntimeDetector:
    """A one-stage detector whose dense part runs elsewhere (ONNX Runtime, TorchScript): the
    inference half of the ``Detector`` protocol, with the same decoding as ``OneStageDetector``.

    ``forward_inference(batch)`` -> one ``Detections`` per video; ``detect(features [T, C], ...)``
    -> the ``Detections`` of one sequence. Always on the CPU (``device``); not trainable.
    """

    device = torch.device("cpu")
    training = False

    def __init__(self, config: OneStageConfig, run: DenseRuntime, name: str = "runtime"):
        self.config = config
        self.run = run
        self.name = name

    @property
    def pad_multiple(self) -> int:
        return self.config.encoder.total_stride

    def __repr__(self) -> str:
        return f"RuntimeDetector({self.config.arch}, {self.name})"

    def dense(self, features: Tensor | np.ndarray, mask: Tensor | np.ndarray) -> DenseOutputs:
        """Features ``[B, C, T]`` and mask ``[B, T]`` or ``[B, 1, T]`` (bool, or float: ``> 0.5`` is valid, as
        ``DenseGraph``) through the runtime -> ``DenseOutputs``."""
        features = np.ascontiguousarray(_numpy(features), dtype=np.float32)
        mask = _numpy(mask)
        mask = mask > 0.5 if np.issubdtype(mask.dtype, np.floating) else mask.astype(bool, copy=False)
        if mask.ndim == 3:
            mask = mask[:, 0]  # [B, 1, T] -> [B, T]
        c = self.config.input_dim
        if features.ndim != 3 or features.shape[1] != c:
            raise ValueError(f"features must be [B, {c}, T], got {tuple(features.shape)}")
        if mask.shape != (features.shape[0], features.shape[2]):
            raise ValueError(f"mask must be [B, T] = {[features.shape[0], features.shape[2]]}, got {tuple(mask.shape)}")
        if features.shape[2] % self.pad_multiple:
            raise ValueError(f"T = {features.shape[2]} must be a multiple of {self.pad_multiple}; pad the batch")
        outputs = self.run(features, np.ascontiguousarray(mask))
        return dense_outputs(self.config, features.shape[2], *outputs)

    def forward_inference(self, batch: Batch) -> list[Detections]:
        return decode_outputs(self.dense(batch.features, batch.mask), batch, self.config.inference)

    def forward_training(self, batch: Batch) -> dict[str, Tensor]:
        raise TypeError(f"{self!r} runs an exported graph for inference only; train the PyTorch model")

    def detect(
        self, features: Tensor | np.ndarray, timing: FeatureTiming | None = None, duration: float | None = None, video_id: str = "video"
    ) -> Detections:
        """Detections of one feature sequence ``[T, C]`` (as ``OneStageDetector.detect``)."""
        features = check_sequence(features, self.config.input_dim)
        batch = collate([{"features": features, "video_id": video_id, "timing": timing, "duration": duration}], self.pad_multiple)
        return self.forward_inference(batch)[0]


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
