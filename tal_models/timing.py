"""The one place where feature steps and seconds meet.

A feature sequence is sampled from a video at ``fps`` frames per second (after resampling the
native frame rate), in clips of ``window`` sampled frames whose starts are ``stride`` sampled
frames apart; step ``i`` covers sampled frames ``[i * stride, i * stride + window)`` and stands
for the centre of that span. ``offset`` (seconds) shifts everything, for features computed on a
trimmed part of a video.

    centre of step i (seconds) = offset + (i * stride + window / 2) / fps

This is ActionFormer's convention (``feat_offset = 0.5 * window / stride`` in steps). Training
targets, inference and the feature store all convert through ``FeatureTiming``; nothing else
converts steps to seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tal_models.structures import Segments, Unit


@dataclass(frozen=True)
class FeatureTiming:
    """Timing of a feature sequence: sampling ``fps``, clip ``window`` and ``stride`` (sampled
    frames), ``offset`` (seconds)."""

    fps: float
    stride: int
    window: int
    offset: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"FeatureTiming.fps must be a positive number, got {self.fps}")
        if int(self.stride) != self.stride or self.stride < 1:
            raise ValueError(f"FeatureTiming.stride must be a positive whole number of frames, got {self.stride}")
        if int(self.window) != self.window or self.window < 1:
            raise ValueError(f"FeatureTiming.window must be a positive whole number of frames, got {self.window}")
        if not math.isfinite(self.offset):
            raise ValueError(f"FeatureTiming.offset must be finite, got {self.offset}")
        object.__setattr__(self, "stride", int(self.stride))
        object.__setattr__(self, "window", int(self.window))

    @property
    def seconds_per_step(self) -> float:
        return self.stride / self.fps

    def centers(self, num_steps: int) -> np.ndarray:
        """[T] centre of each step in seconds (float64)."""
        return self.step_to_seconds(np.arange(num_steps, dtype=np.float64))

    def step_to_seconds(self, steps):
        """Fractional step positions (step ``i`` = the centre of clip ``i``) -> seconds, computed in
        float64; NumPy in, NumPy out; a torch tensor stays a tensor of its own dtype."""
        x = _float64(steps)
        out = self.offset + (x * self.stride + self.window / 2) / self.fps
        return out.to(steps.dtype) if isinstance(steps, torch.Tensor) else out

    def seconds_to_step(self, seconds):
        """Seconds -> fractional step positions; the inverse of ``step_to_seconds``."""
        x = _float64(seconds)
        out = ((x - self.offset) * self.fps - self.window / 2) / self.stride
        return out.to(seconds.dtype) if isinstance(seconds, torch.Tensor) else out

    def segments_to_seconds(self, segments: Segments) -> Segments:
        """Segments in feature steps -> seconds."""
        if segments.unit is not Unit.STEPS:
            raise ValueError(f"expected segments in steps, got {segments.unit.value}")
        return Segments(self.step_to_seconds(segments.data), Unit.SECONDS, check=False)

    def segments_to_steps(self, segments: Segments) -> Segments:
        """Segments in seconds -> fractional feature steps."""
        if segments.unit is not Unit.SECONDS:
            raise ValueError(f"expected segments in seconds, got {segments.unit.value}")
        return Segments(self.seconds_to_step(segments.data), Unit.STEPS, check=False)

    def num_steps(self, num_sampled_frames: int) -> int:
        """Number of clips in ``num_sampled_frames`` sampled frames: every full window, and one
        (padded) clip when the video is shorter than a window."""
        if num_sampled_frames <= 0:
            return 0
        if num_sampled_frames < self.window:
            return 1
        return (num_sampled_frames - self.window) // self.stride + 1


def _float64(x):
    return x.double() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


# Timing under which "seconds" are feature steps (step i -> i): for sequences given without timing.
STEP_TIMING = FeatureTiming(fps=1.0, stride=1, window=1, offset=-0.5)
