"""Fixed-scale detectors on sequences of any length: resize to the scale, or slide windows of it.

Legend: B batch, C channels, T padded steps, n valid steps of a video, L the model's temporal
scale (``TemporalScaleConfig.length``), M pieces (model inputs) of a batch, N segments.

BMN and TadTR see a fixed number of steps ``L``, in unit time ``u`` in ``[0, 1]``. A video of
``n`` steps meets them under one of two protocols (the papers'):

- ``resize`` (ActivityNet): the whole video, linearly interpolated to ``L`` steps (one piece);
- ``window`` (THUMOS14): windows of ``L`` steps, ``overlap`` of them shared by consecutive windows,
  the last one ending at the video's end; a video of ``n <= L`` steps is one window, padded.

A ``Piece`` says which video a model input came from and how its unit time maps back to the
video's steps (step ``i`` is the centre of clip ``i``, so a video covers steps ``[-0.5, n - 0.5]``):
``steps = start - 0.5 + u * extent``, ``extent`` being ``n`` (resize) or ``L`` (window). Model
cell ``k`` is centred on ``u = (k + 0.5) / L``, as ``F.interpolate(align_corners=False)`` places
it, so for a window it is exactly video step ``start + k``.

``split`` makes the pieces of a padded batch (only valid steps are read: padding never changes a
piece), ``targets_for_piece`` the unit-time targets of one piece, ``finish_video`` turns a video's
candidates gathered over its pieces (in steps) into ``Detections`` in seconds, after NMS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tal_models.config import require_positive_int
from tal_models.postprocess import NMSConfig, postprocess
from tal_models.structures import Detections, Segments, Unit
from tal_models.timing import FeatureTiming

ScaleProtocol = Literal["resize", "window"]


@dataclass(frozen=True)
class TemporalScaleConfig:
    """How a video meets a fixed-scale model (module docstring). BMN: ``resize`` to 100 steps on
    ActivityNet-1.3, windows of 128 steps on THUMOS14; TadTR: the same sizes."""

    protocol: ScaleProtocol = "resize"
    length: int = 100
    overlap: float = 0.5  # window: the fraction of a window its successor shares

    def __post_init__(self) -> None:
        if self.protocol not in ("resize", "window"):
            raise ValueError(f"TemporalScaleConfig.protocol must be 'resize' (ActivityNet) or 'window' (THUMOS14), got {self.protocol!r}")
        require_positive_int(self.length, "TemporalScaleConfig.length", " (BMN: 100 on ActivityNet, 128 on THUMOS14)")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"TemporalScaleConfig.overlap must be in [0, 1), got {self.overlap}")

    @property
    def hop(self) -> int:
        """Steps between consecutive windows' starts (at least 1)."""
        return max(1, int(round(self.length * (1.0 - self.overlap))))


@dataclass(frozen=True)
class Piece:
    """One model input: from video ``video`` (its index in the batch), starting at its step ``start``,
    ``extent`` video steps per unit time, ``valid`` valid model steps (``L`` but for a short window)."""

    video: int
    start: int
    extent: float
    valid: int

    def to_steps(self, u: Tensor) -> Tensor:
        """Unit time of this piece -> fractional steps of its video."""
        return self.start - 0.5 + u * self.extent

    def to_unit(self, steps: Tensor) -> Tensor:
        """Fractional steps of the video -> unit time of this piece."""
        return (steps - self.start + 0.5) / self.extent


def window_starts(n: int, length: int, hop: int) -> list[int]:
    """First steps of the windows that cover ``n`` steps: every ``hop`` steps, the last one ending at ``n``."""
    if n <= length:
        return [0]
    starts = list(range(0, n - length + 1, hop))
    if starts[-1] + length < n:
        starts.append(n - length)
    return starts


def split(features: Tensor, mask: Tensor, config: TemporalScaleConfig) -> tuple[Tensor, Tensor, list[Piece]]:
    """A padded batch ``[B, C, T]``, ``[B, 1, T]`` -> pieces ``[M, C, L]``, their masks ``[M, 1, L]`` and ``Piece``s
    (videos in batch order, each video's pieces in time order). Only valid steps are read."""
    L = config.length
    lengths = mask[:, 0, :].sum(-1).tolist()
    inputs, masks, pieces = [], [], []
    for b, n in enumerate(int(n) for n in lengths):
        if n < 1:
            raise ValueError(f"video {b} of the batch has no valid step")
        x = features[b, :, :n]
        if config.protocol == "resize":
            y = x if n == L else F.interpolate(x[None], size=L, mode="linear", align_corners=False)[0]
            inputs.append(y)
            masks.append(torch.ones(1, L, dtype=torch.bool, device=features.device))
            pieces.append(Piece(b, 0, float(n), L))
            continue
        for start in window_starts(n, L, config.hop):
            valid = min(L, n - start)
            window = x[:, start : start + valid]
            if valid < L:
                window = F.pad(window, (0, L - valid))
            inputs.append(window)
            m = torch.zeros(1, L, dtype=torch.bool, device=features.device)
            m[:, :valid] = True
            masks.append(m)
            pieces.append(Piece(b, start, float(L), valid))
    return torch.stack(inputs), torch.stack(masks), pieces


def targets_for_piece(segments: Tensor, labels: Tensor, piece: Piece, min_fraction: float = 0.5) -> tuple[Tensor, Tensor]:
    """A video's segments ``[N, 2]`` (fractional steps) and labels ``[N]`` -> those of ``piece`` in unit time,
    clipped to ``[0, 1]``: a segment is kept when at least ``min_fraction`` of its length lies in the piece."""
    u = piece.to_unit(segments.reshape(-1, 2).to(torch.float32))
    clipped = u.clamp(0.0, 1.0)
    length = (u[:, 1] - u[:, 0]).clamp_min(1e-6)
    keep = (clipped[:, 1] - clipped[:, 0]) >= min_fraction * length
    keep &= clipped[:, 1] > clipped[:, 0]
    return clipped[keep], labels.reshape(-1)[keep]


def finish_video(
    video_id: str,
    segments: Tensor,
    scores: Tensor,
    labels: Tensor,
    timing: FeatureTiming,
    duration: float | None,
    nms: NMSConfig,
    min_length: float = 0.0,
) -> Detections:
    """A video's candidates over all its pieces (segments ``[N, 2]`` in fractional steps, scores ``[N]``, labels ``[N]``)
    -> ``Detections`` in seconds: clipped to ``[0, duration]`` (``duration`` None: not clipped at the end), candidates
    no longer than ``min_length`` steps or left without length dropped, then ``postprocess(..., nms)``."""
    segments = segments.reshape(-1, 2).double()
    keep = (segments[:, 1] - segments[:, 0]) > min_length
    segments, scores, labels = segments[keep], scores[keep], labels[keep]
    seconds = timing.segments_to_seconds(Segments(segments, Unit.STEPS, check=False)).data
    seconds = seconds.clamp(0.0, float(duration) if duration is not None else math.inf)
    keep = seconds[:, 1] > seconds[:, 0]
    candidates = Detections(video_id, Segments(seconds[keep], Unit.SECONDS, check=False), scores[keep].double(), labels[keep].long())
    return postprocess(candidates, nms)
