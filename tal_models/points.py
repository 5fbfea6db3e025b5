"""Anchor points of a multi-scale one-stage detector: one point per step of every pyramid level.

Legend: L pyramid levels, T_l steps at level l, P = sum_l T_l points (level 0 first).

Conventions (ActionFormer's ``PointGenerator`` with ``use_offset=False``):
- Positions are in *input steps*, i.e. steps of the level-0 grid, which is the feature sequence
  handed to the model: point ``i`` of level ``l`` sits at ``i * stride_l``. Step ``i`` of that
  sequence is the centre of feature clip ``i``, so ``FeatureTiming`` maps positions to seconds
  directly (see ``tal_models.decode``).
- A level's regression range ``(lo, hi)`` is in input steps as well (not in steps of the level):
  a point of level ``l`` may learn a segment whose larger distance to the point,
  ``max(position - start, end - position)``, lies in ``[lo, hi]`` (both ends inclusive, so
  ActionFormer's touching ranges (0, 4), (4, 8), ... share their boundary values).
- Regression *outputs and targets* are those distances divided by the point's stride
  (``tal_models.targets``), so every level regresses numbers of similar size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# ActionFormer's default: six levels of strides 1, 2, ..., 32 (it writes the last bound as 10000).
DEFAULT_STRIDES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
DEFAULT_REGRESSION_RANGES: tuple[tuple[float, float], ...] = ((0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, math.inf))


@dataclass(frozen=True)
class Points:
    """The ``P`` points of a pyramid, level 0 first, then level 1, ... (each level in time order).

    Fields:
        position: ``[P]`` float, in input steps (``i * stride`` for point ``i`` of its level).
        stride: ``[P]`` float, the stride of the point's level, in input steps.
        level: ``[P]`` int64, the point's pyramid level.
        reg_range: ``[P, 2]`` float, (min, max) regression distance of its level, in input steps.
        level_lengths: ``T_l`` of every level, so that ``sum(level_lengths) == P``.
    """

    position: Tensor
    stride: Tensor
    level: Tensor
    reg_range: Tensor
    level_lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        p = self.position.shape[0]
        object.__setattr__(self, "level_lengths", tuple(int(t) for t in self.level_lengths))
        if self.position.ndim != 1 or self.stride.shape != (p,) or self.level.shape != (p,) or self.reg_range.shape != (p, 2):
            raise ValueError(
                f"Points fields disagree: position {tuple(self.position.shape)}, stride {tuple(self.stride.shape)}, "
                f"level {tuple(self.level.shape)}, reg_range {tuple(self.reg_range.shape)} (want [P], [P], [P], [P, 2])"
            )
        if sum(self.level_lengths) != p:
            raise ValueError(f"Points.level_lengths {self.level_lengths} sum to {sum(self.level_lengths)}, not P = {p}")

    def __len__(self) -> int:
        return int(self.position.shape[0])

    def __repr__(self) -> str:
        return f"Points(P={len(self)}, level_lengths={self.level_lengths}, device={self.device})"

    @property
    def num_levels(self) -> int:
        return len(self.level_lengths)

    @property
    def device(self) -> torch.device:
        return self.position.device

    def level_slices(self) -> list[slice]:
        """The slice of ``[P]`` that holds each level, in level order."""
        bounds, start = [], 0
        for t in self.level_lengths:
            bounds.append(slice(start, start + t))
            start += t
        return bounds

    def to(self, device: torch.device | str) -> Points:
        return Points(
            self.position.to(device), self.stride.to(device), self.level.to(device), self.reg_range.to(device), self.level_lengths
        )


def make_points(
    level_lengths: Sequence[int],
    strides: Sequence[int],
    regression_ranges: Sequence[tuple[float, float]],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Points:
    """Points of a pyramid whose level ``l`` has ``level_lengths[l]`` steps of ``strides[l]`` input steps.

    Args:
        level_lengths: ``T_l`` per level (e.g. ``T // stride_l`` for a padded input of ``T`` steps).
        strides: stride of each level in input steps (ActionFormer: ``2 ** l``).
        regression_ranges: ``(min, max)`` regression distance per level, in input steps; ``math.inf``
            is allowed as the last maximum.
        device: where the tensors live.
        dtype: floating dtype of ``position``, ``stride`` and ``reg_range``.

    Returns:
        ``Points`` with ``P = sum(level_lengths)``.
    """
    if not (len(level_lengths) == len(strides) == len(regression_ranges)) or not level_lengths:
        raise ValueError(
            f"make_points needs one length, stride and regression range per level, got {len(level_lengths)} lengths, "
            f"{len(strides)} strides and {len(regression_ranges)} ranges"
        )
    for lvl, (t, s, rr) in enumerate(zip(level_lengths, strides, regression_ranges)):
        if isinstance(t, bool) or int(t) != t or t < 0:
            raise ValueError(f"level {lvl}: length must be a whole number >= 0, got {t!r}")
        if isinstance(s, bool) or int(s) != s or s < 1:
            raise ValueError(f"level {lvl}: stride must be a whole number >= 1 of input steps, got {s!r}")
        if len(rr) != 2 or math.isnan(rr[0]) or math.isnan(rr[1]) or not 0 <= rr[0] <= rr[1]:
            raise ValueError(f"level {lvl}: regression range must be (min, max) with 0 <= min <= max, got {tuple(rr)!r}")
    position, stride, level, reg_range = [], [], [], []
    for lvl, (t, s, rr) in enumerate(zip(level_lengths, strides, regression_ranges)):
        t = int(t)
        position.append(torch.arange(t, device=device, dtype=dtype) * int(s))  # [T_l], exact for whole numbers
        stride.append(torch.full((t,), float(s), device=device, dtype=dtype))
        level.append(torch.full((t,), lvl, device=device, dtype=torch.long))
        reg_range.append(torch.tensor([float(rr[0]), float(rr[1])], device=device, dtype=dtype).expand(t, 2))
    return Points(
        position=torch.cat(position),  # [P]
        stride=torch.cat(stride),  # [P]
        level=torch.cat(level),  # [P]
        reg_range=torch.cat(reg_range),  # [P, 2]
        level_lengths=tuple(int(t) for t in level_lengths),
    )
