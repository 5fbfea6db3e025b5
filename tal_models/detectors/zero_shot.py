"""Training-free zero-shot detection from a vision-language model's frame features and class-name embeddings.

Legend: B batch, C feature width (the VLM's joint embedding, e.g. 512 for CLIP ViT-B), T padded steps,
n valid steps of a video, K classes of the checkpoint (the buffer), K' classes of a request, R runs.

The training-free part of T3AL (Liberatori et al., "Test-Time Zero-Shot Temporal Action Localization",
CVPR 2024, arXiv 2404.05426) and of the training-free detectors that followed it (FreeZAD, arXiv
2501.13795, "Training-Free Zero-Shot Temporal Action Detection with Vision-Language Models"). Per video,
on its valid steps only (so padding and the rest of the batch never matter, and any length works)::

    frames [n, C], classes [K', C]  (both L2-normalised per row)
    1. cos [n, K'] = frames @ classes.T;  p [K'] = softmax(mean_t cos / temperature)
       -> the video's ``video_top_k`` most probable classes (T3AL: its video-level pseudo-label, top 1)
    2. per chosen class c: the similarity curve cos[:, c] (``remove_background``: of the frames minus
       the video's mean frame, T3AL's background removal)
    3. smoothed (Gaussian of ``smooth_sigma`` steps, or a moving average of ``smooth_window`` steps,
       edges replicated) and min-max normalised to [0, 1] over the video
    4. steps above ``mean + alpha * std`` of the curve (T3AL: the mean, alpha 0), or above its
       ``quantile``; runs of consecutive such steps, at least ``min_length`` steps long
    5. a run [s, e) scores p[c] * max(0, mean inside - mean of the outer neighbourhood), the
       neighbourhood ``inflation`` x its length on each side, inside the video (AutoLoc's outer-inner
       contrast; nothing outside it: mean 0, the curve's minimum)
    6. NMS (``inference.nms``), per class.

Left out: T3AL's test-time adaptation (a self-supervised refinement of the class embedding on each
video) and its caption-based refinement (needs a captioning model; the platform has none), and FreeZAD's
frequency-based actionness calibration. Segments are in feature steps, run [s, e) -> [s, e] (step i
covers [i, i + 1), as the training data's segments do), then seconds through the batch's timings.
The detector has no trainable weight: the class embeddings are a buffer (``set_class_embeddings``, or
``class_embeddings [K', C]`` per call), the temperature one frozen parameter (it gives the module a
device for ``run_sequence``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.batch import Batch
from tal_models.config import config_from_dict, require_positive_int
from tal_models.detectors.base import DetectorModule, run_sequence
from tal_models.open_vocab import normalized_class_embeddings
from tal_models.postprocess import NMSConfig
from tal_models.structures import Detections
from tal_models.text import TextEncoderConfig
from tal_models.timing import STEP_TIMING, FeatureTiming
from tal_models.windows import finish_video

SmoothingKind = Literal["gaussian", "moving_average", "none"]
ThresholdKind = Literal["std", "quantile"]


@dataclass(frozen=True)
class ZeroShotInferenceConfig:
    """Post-processing of the candidates (runs of one class are disjoint; NMS matters across overlapping classes)."""

    nms: NMSConfig = field(default_factory=lambda: NMSConfig(method="hard", iou_threshold=0.5, max_detections=100))


def _default_text() -> TextEncoderConfig:
    return TextEncoderConfig(kind="open_clip", model="ViT-B-32", prompt="a video of action {}")  # T3AL's prompt


@dataclass(frozen=True)
class ZeroShotConfig:
    """A training-free zero-shot detector (module docstring); stored as YAML in presets and checkpoints.

    ``input_dim`` is the VLM's embedding width: frame features and class-name embeddings share it.
    ``max_seq_len`` is unused (nothing is trained; inference takes any length) and kept for the family contract.
    """

    family: ClassVar[str] = "zero_shot"
    task: ClassVar[str] = "detection"

    arch: Literal["zero_shot"] = "zero_shot"
    num_classes: int = 20
    input_dim: int = 512
    text: TextEncoderConfig = field(default_factory=_default_text)
    temperature: float = 0.01  # CLIP's learnt logit scale is 100
    video_top_k: int = 1  # classes per video (T3AL: 1)
    remove_background: bool = False  # T3AL: subtract the video's mean frame before the per-step similarity
    smoothing: SmoothingKind = "gaussian"
    smooth_sigma: float = 2.0  # gaussian: std in steps
    smooth_window: int = 5  # moving_average: window in steps (odd)
    threshold: ThresholdKind = "std"
    alpha: float = 0.0  # std: steps above mean + alpha * std of the normalised curve (T3AL: the mean)
    quantile: float = 0.75  # quantile: steps above this quantile of the normalised curve
    min_length: int = 2  # steps; T3AL drops single-step runs
    inflation: float = 0.25  # outer neighbourhood, in lengths of the segment on each side (AutoLoc: 0.25)
    max_seq_len: int = 2304
    inference: ZeroShotInferenceConfig = field(default_factory=ZeroShotInferenceConfig)

    def __post_init__(self) -> None:
        if self.arch != "zero_shot":
            raise ValueError(f"ZeroShotConfig.arch must be 'zero_shot', got {self.arch!r}")
        require_positive_int(self.num_classes, "ZeroShotConfig.num_classes", " (THUMOS14: 20)")
        require_positive_int(self.input_dim, "ZeroShotConfig.input_dim", " (the VLM's embedding width, e.g. 512 for CLIP ViT-B)")
        require_positive_int(self.video_top_k, "ZeroShotConfig.video_top_k", " (T3AL: 1)")
        require_positive_int(self.min_length, "ZeroShotConfig.min_length", " (steps; T3AL: 2)")
        require_positive_int(self.max_seq_len, "ZeroShotConfig.max_seq_len", " (e.g. 2304)")
        require_positive_int(self.smooth_window, "ZeroShotConfig.smooth_window", " (steps, odd, e.g. 5)")
        if self.smooth_window % 2 == 0:
            raise ValueError(f"ZeroShotConfig.smooth_window must be odd (a centred window), got {self.smooth_window}")
        if not isinstance(self.text, TextEncoderConfig) or self.text.kind == "none":
            raise ValueError("ZeroShotConfig.text must name a text encoder for the class names (kind 'open_clip' or 'table'), not 'none'")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"ZeroShotConfig.temperature must be > 0, got {self.temperature!r} (CLIP: 0.01)")
        if self.smoothing not in ("gaussian", "moving_average", "none"):
            raise ValueError(f"ZeroShotConfig.smoothing must be 'gaussian', 'moving_average' or 'none', got {self.smoothing!r}")
        if not (math.isfinite(self.smooth_sigma) and self.smooth_sigma >= 0):
            raise ValueError(f"ZeroShotConfig.smooth_sigma must be >= 0 steps, got {self.smooth_sigma} (typical: 2)")
        if self.threshold not in ("std", "quantile"):
            raise ValueError(f"ZeroShotConfig.threshold must be 'std' (mean + alpha * std) or 'quantile', got {self.threshold!r}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"ZeroShotConfig.alpha must be a finite number, got {self.alpha} (T3AL: 0, the mean)")
        if not 0.0 <= self.quantile < 1.0:
            raise ValueError(f"ZeroShotConfig.quantile must be in [0, 1), got {self.quantile} (typical: 0.75)")
        if not (math.isfinite(self.inflation) and self.inflation > 0):
            raise ValueError(f"ZeroShotConfig.inflation must be > 0 (segment lengths each side), got {self.inflation} (AutoLoc: 0.25)")
        if not isinstance(self.inference, ZeroShotInferenceConfig):
            raise ValueError(f"ZeroShotConfig.inference must be a ZeroShotInferenceConfig, got {type(self.inference).__name__}")


def zero_shot_config(
    *, num_classes: int, input_dim: int, text: TextEncoderConfig | Mapping[str, Any], video_top_k: int = 1, max_seq_len: int = 2304
) -> ZeroShotConfig:
    """T3AL's training-free configuration at the given sizes: the top class per video, the curve thresholded at its
    mean (alpha 0), runs of at least 2 steps, Gaussian smoothing of 2 steps (T3AL: a moving average), hard NMS.
    ``text``: the class names' encoder (its stored form, a mapping, too: a preset's ``base``)."""
    if isinstance(text, Mapping):
        text = config_from_dict(TextEncoderConfig, text, where="ZeroShotConfig.text")
    return ZeroShotConfig(num_classes=num_classes, input_dim=input_dim, text=text, video_top_k=video_top_k, max_seq_len=max_seq_len)


# --- the curve: pure functions on one video's similarity curve [n] ---------------------------------
def smooth_curve(curve: Tensor, kind: SmoothingKind = "gaussian", sigma: float = 2.0, window: int = 5) -> Tensor:
    """``[n]`` -> ``[n]``: a Gaussian of std ``sigma`` steps (truncated at 3 sigma) or a centred moving average
    of ``window`` steps (odd); the ends are extended with their own values, so a constant curve stays constant."""
    if kind == "none" or (kind == "gaussian" and sigma == 0) or (kind == "moving_average" and window == 1):
        return curve
    if kind == "gaussian":
        radius = max(1, math.ceil(3.0 * sigma))
        offsets = torch.arange(-radius, radius + 1, dtype=curve.dtype, device=curve.device)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    else:
        radius = window // 2
        kernel = torch.ones(window, dtype=curve.dtype, device=curve.device)
    kernel = kernel / kernel.sum()
    padded = torch.cat([curve[:1].expand(radius), curve, curve[-1:].expand(radius)])  # replicate the ends
    return F.conv1d(padded[None, None], kernel[None, None])[0, 0]


def min_max_normalize(curve: Tensor) -> Tensor:
    """``[n]`` -> ``[n]`` in [0, 1]; a constant curve -> zeros (nothing stands out)."""
    low, high = curve.min(), curve.max()
    span = high - low
    return torch.where(span > 0, (curve - low) / span.clamp_min(torch.finfo(curve.dtype).tiny), torch.zeros_like(curve))


def curve_threshold(curve: Tensor, kind: ThresholdKind = "std", alpha: float = 0.0, quantile: float = 0.75) -> Tensor:
    """The level a step must exceed: ``mean + alpha * std`` (population std) or the ``quantile`` of ``curve [n]``."""
    if kind == "quantile":
        return torch.quantile(curve, quantile)
    return curve.mean() + alpha * curve.std(correction=0)


def runs_above(curve: Tensor, threshold: Tensor | float, min_length: int = 1) -> Tensor:
    """Runs of consecutive steps with ``curve > threshold``, at least ``min_length`` steps: ``[R, 2]`` int64
    (start, end exclusive), in time order."""
    above = (curve > threshold).to(torch.int8)
    edges = torch.diff(F.pad(above, (1, 1)))  # +1 where a run starts, -1 one past its end
    starts, ends = torch.nonzero(edges == 1)[:, 0], torch.nonzero(edges == -1)[:, 0]
    runs = torch.stack([starts, ends], dim=1)
    return runs[(ends - starts) >= min_length]


def outer_inner_contrast(curve: Tensor, runs: Tensor, inflation: float = 0.25) -> Tensor:
    """Per run ``[s, e)`` of ``runs [R, 2]``: mean of ``curve [n]`` inside minus the mean over the steps of
    ``[s - inflation * len, s)`` and ``[e, e + inflation * len)`` inside the video (at least one step each side
    where there is room; none at all: 0). ``[R]``."""
    n = curve.shape[0]
    csum = F.pad(torch.cumsum(curve, 0), (1, 0))  # csum[i] = sum of curve[:i]
    s, e = runs[:, 0], runs[:, 1]
    pad = torch.ceil(inflation * (e - s).to(curve.dtype)).long().clamp_min(1)
    lo, hi = (s - pad).clamp_min(0), (e + pad).clamp_max(n)
    inner = (csum[e] - csum[s]) / (e - s).to(curve.dtype)
    outer_sum = (csum[s] - csum[lo]) + (csum[hi] - csum[e])
    outer_count = ((s - lo) + (hi - e)).to(curve.dtype)
    outer = torch.where(outer_count > 0, outer_sum / outer_count.clamp_min(1), torch.zeros_like(inner))
    return inner - outer


class ZeroShotDetector(DetectorModule):
    """Training-free detection by frame-text similarity (module docstring). ``forward_inference(batch,
    class_embeddings=None)`` and ``detect(..., class_embeddings=None)`` score the classes of the buffer, or
    the ``class_embeddings [K', C]`` given (labels then index those); ``forward_training`` refuses."""

    def __init__(self, config: ZeroShotConfig):
        super().__init__()
        self.config = config
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature)), requires_grad=False)
        # zeros until set: every cosine is 0, so nothing is detected (set_class_embeddings with the class names' embeddings)
        self.register_buffer("class_embeddings", torch.zeros(config.num_classes, config.input_dim))

    @torch.no_grad()
    def set_class_embeddings(self, embeddings: Tensor) -> None:
        """The class names' text embeddings ``[K, input_dim]`` (stored L2-normalised)."""
        e = normalized_class_embeddings(embeddings, self.config.input_dim, "class_embeddings (ZeroShotConfig.input_dim)")
        if e.shape[0] != self.config.num_classes:
            raise ValueError(f"class_embeddings must have one row per class ({self.config.num_classes}), got {e.shape[0]}")
        self.class_embeddings.copy_(e)

    def forward_training(self, batch: Batch) -> dict[str, Tensor]:
        raise ValueError(
            "the zero_shot family is training-free: there is nothing to train; run inference (forward_inference / detect) "
            "with the class names' embeddings set (set_class_embeddings)"
        )

    @torch.no_grad()
    def forward_inference(self, batch: Batch, class_embeddings: Tensor | None = None) -> list[Detections]:
        """One ``Detections`` per video, in seconds when the batch carries timings (feature steps otherwise)."""
        device = batch.features.device
        if class_embeddings is None:
            classes = self.class_embeddings.float()
        else:
            classes = normalized_class_embeddings(class_embeddings, self.config.input_dim, "class_embeddings (ZeroShotConfig.input_dim)")
        classes = classes.to(device)  # [K', C]
        timings = batch.timings if batch.timings is not None else [STEP_TIMING] * len(batch)
        durations = batch.durations if batch.durations is not None else [None] * len(batch)
        out = []
        for i, n in enumerate(batch.lengths().tolist()):
            frames = batch.features[i, :, : int(n)].float().T  # [C, n] -> [n, C]: valid steps only
            segs, scores, labels = self.candidates_single_video(frames, classes)
            out.append(finish_video(batch.video_ids[i], segs, scores, labels, timings[i], durations[i], self.config.inference.nms))
        return out

    def candidates_single_video(self, frames: Tensor, classes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``frames [n, C]`` (float32), ``classes [K', C]`` (normalised) -> candidate segments ``[M, 2]`` in steps,
        scores ``[M]``, labels ``[M]`` (steps 1-5 of the module docstring)."""
        cfg = self.config
        n, device = frames.shape[0], frames.device
        empty = (torch.zeros(0, 2, device=device), torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device))
        if n == 0:
            return empty
        cos = F.normalize(frames, dim=1, eps=1e-6) @ classes.T  # [n, K']
        probs = torch.softmax(cos.mean(0) / self.temperature.float(), dim=0)  # [K']
        top = torch.topk(probs, min(cfg.video_top_k, classes.shape[0])).indices.tolist()
        if cfg.remove_background:
            cos = F.normalize(frames - frames.mean(0, keepdim=True), dim=1, eps=1e-6) @ classes.T
        segs, scores, labels = [], [], []
        for c in top:
            curve = smooth_curve(cos[:, c], cfg.smoothing, cfg.smooth_sigma, cfg.smooth_window)
            curve = min_max_normalize(curve)
            runs = runs_above(curve, curve_threshold(curve, cfg.threshold, cfg.alpha, cfg.quantile), cfg.min_length)  # [R, 2]
            if runs.shape[0] == 0:
                continue
            contrast = outer_inner_contrast(curve, runs, cfg.inflation)  # [R]
            segs.append(runs.float())
            scores.append(probs[c] * contrast.clamp_min(0.0))
            labels.append(torch.full((runs.shape[0],), c, dtype=torch.long, device=device))
        if not segs:
            return empty
        return torch.cat(segs), torch.cat(scores), torch.cat(labels)

    def detect(
        self,
        features: Tensor | np.ndarray,
        timing: FeatureTiming | None = None,
        duration: float | None = None,
        video_id: str = "video",
        class_embeddings: Tensor | None = None,
    ) -> Detections:
        """Detections of one feature sequence ``[T, C]`` (the serving path); ``class_embeddings [K', C]``: these classes."""
        return run_sequence(
            self,
            features,
            self.config.input_dim,
            lambda batch: self.forward_inference(batch, class_embeddings)[0],
            timing=timing,
            duration=duration,
            video_id=video_id,
        )
