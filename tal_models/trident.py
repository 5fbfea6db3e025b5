"""TriDet's Trident head: boundary distances as expectations of relative boundary distributions.

Legend: B batch, C channels, T_l steps at pyramid level l, N = ``num_bins``, i = 0..N a distance
in steps of the level (input steps / stride).

TriDet ("TriDet: Temporal Action Detection with Relative Boundary Modeling", Shi et al., CVPR
2023) does not regress a point's distances to the start and end of its action directly. Three
branches of masked convolutions read the same pyramid features, with the same weights at every
level:

- the start branch scores each step as a start boundary: ``s [B, T_l]``, one logit per step;
- the end branch does the same for ends: ``e [B, T_l]``;
- the centre-offset branch gives each point its own logits for each distance and side:
  ``c_start, c_end [B, T_l, N + 1]``, the ReLU of a learnt per-level scale times the convolution
  (as the ordinary regression head, ``tal_models.heads``).

The start distance of point ``t`` is the expected value of a distribution over the N + 1 steps
at or before it, and the end distance likewise over the steps at or after it::

    p_start(i | t) = softmax_i(s[t - i] + c_start[t, i]),   d_start(t) = sum_i i * p_start(i | t)
    p_end(i | t)   = softmax_i(e[t + i] + c_end[t, i]),     d_end(t)   = sum_i i * p_end(i | t)

A step's boundary logit is shared by every point within N steps of it, so a point weighs its
neighbours' boundary evidence (relative to each other) with its own view of the action's extent.
The expectation is differentiable, so the detector trains ``[d_start, d_end]`` with the same
IoU loss as directly regressed distances. Distances lie in ``[0, N]`` steps of the level.

Boundaries: a neighbour step before 0, after the end of the sequence or invalid (padded) gets
the lowest finite logit, i.e. zero weight; the point's own step (i = 0) is always there, so a
valid point's distribution is never empty, and its distances never reach outside the valid
steps. The output is zero at invalid steps, and appending padding, whatever it holds, changes
no output at a valid step.

Differences from TriDet's code:
- class-agnostic boundary branches (one logit per step, output ``[B, 2, T_l]``); TriDet's start
  and end heads predict one logit per class and step, decode one (start, end) pair per class,
  train the pair of the ground-truth class and, at inference, use the pair of each candidate's
  class;
- TriDet pads the boundary logits with 0 beyond the sequence, and its masked convolutions give 0
  at padded steps, so those steps keep weight ``exp(0 + c)`` in the softmax (more than the real
  steps at initialisation, whose logits start near -4.6 from the focal prior); here they get
  none. A constant added to all of a point's boundary logits cancels in the softmax, so the
  boundary output convolutions have no bias (TriDet's prior bias only matters against its zero
  padding);
- the centre-offset channels are ordered by distance for both sides (channel ``i`` and
  ``N + 1 + i`` are distance ``i``); TriDet orders the start channels backwards. Equivalent up
  to a permutation of the output convolution's channels.
As in TriDet, the boundary branches read detached features by default (``detach_boundary``):
their gradients train the head, not the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.config import require_positive_int
from tal_models.heads import ConvTower
from tal_models.layers import check_odd

Side = Literal["start", "end"]


# --- the relative boundary distributions ----------------------------------------------------
def neighbours(x: Tensor, num_bins: int, side: Side) -> Tensor:
    """``[B, T]`` -> ``[B, T, N + 1]``: entry ``[b, t, i]`` is ``x[b, t - i]`` (``start``) or
    ``x[b, t + i]`` (``end``); 0 (False for bool) beyond the ends of the sequence."""
    if side == "start":
        return F.pad(x, (num_bins, 0)).unfold(-1, num_bins + 1, 1).flip(-1)  # [B, T + N] -> [B, T, N + 1]
    if side == "end":
        return F.pad(x, (0, num_bins)).unfold(-1, num_bins + 1, 1)
    raise ValueError(f"side must be 'start' or 'end', got {side!r}")


def relative_boundary_distance(boundary: Tensor, offsets: Tensor, mask: Tensor, side: Side) -> Tensor:
    """Expected distance of every point to its start (or end) boundary, in steps.

    Args:
        boundary: ``[B, T]`` logits of each step being a start (or end) boundary.
        offsets: ``[B, T, N + 1]`` each point's own logits for distances ``0..N``.
        mask: bool ``[B, T]``, True = a valid step.
        side: ``start`` (point ``t`` looks at steps ``t - i``) or ``end`` (steps ``t + i``).

    Returns:
        ``[B, T]`` in ``[0, N]``: ``sum_i i * softmax_i(boundary[t -/+ i] + offsets[t, i])`` over
        the neighbour steps that exist and are valid; exactly 0 at invalid steps.
    """
    torch._assert(boundary.shape == mask.shape == offsets.shape[:-1], "boundary and mask must be [B, T], offsets [B, T, N + 1]")
    num_bins = offsets.shape[-1] - 1
    valid = neighbours(mask, num_bins, side)  # [B, T, N + 1]
    # The lowest finite value, not -inf: exp() of it is exactly 0 beside a valid neighbour (the
    # point itself, when valid), and a row with none (an invalid point) is uniform, not NaN.
    # masked_fill after the sum, so that garbage (inf, NaN) read at invalid steps is dropped too.
    logits = (neighbours(boundary, num_bins, side) + offsets).masked_fill(~valid, torch.finfo(offsets.dtype).min)
    bins = torch.arange(num_bins + 1, dtype=logits.dtype, device=logits.device)  # [N + 1] distance of each bin
    return (logits.softmax(dim=-1) @ bins).masked_fill(~mask, 0.0)  # [B, T, N + 1] @ [N + 1] -> [B, T]


# --- the head -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TridentHeadConfig:
    """The Trident head; defaults are TriDet's (THUMOS14 and every other dataset)."""

    in_dim: int = 512  # channels of the pyramid features
    feat_dim: int = 512  # channels of the hidden convolutions
    num_layers: int = 3  # convolutions of each branch, the output one included (TriDet's head_num_layers)
    kernel_size: int = 3  # the centre-offset branch's (TriDet's head_kernel_size)
    num_bins: int = 16  # distances 0..num_bins steps of the level
    levels: int = 6
    boundary_kernel_size: int = 3  # the start and end branches' (TriDet's boudary_kernel_size)
    with_ln: bool = True  # layer norm after each hidden convolution (TriDet's head_with_ln)
    detach_boundary: bool = True  # the boundary branches read detached features (TriDet's detach_feat)

    def __post_init__(self) -> None:
        for name in ("in_dim", "feat_dim", "num_layers", "num_bins", "levels"):
            value = getattr(self, name)
            require_positive_int(value, f"TridentHeadConfig.{name}")
        check_odd("TridentHeadConfig.kernel_size", self.kernel_size)
        check_odd("TridentHeadConfig.boundary_kernel_size", self.boundary_kernel_size)
        for name in ("with_ln", "detach_boundary"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TridentHeadConfig.{name} must be True or False, got {getattr(self, name)!r}")


def _branch(config: TridentHeadConfig, out_dim: int, kernel_size: int, out_bias: bool) -> ConvTower:
    return ConvTower(config.in_dim, config.feat_dim, out_dim, config.num_layers, kernel_size, config.with_ln, out_bias)


class TridentHead(nn.Module):
    """Per-level features -> (start, end) distances in steps of the level, from relative boundary distributions.

    ``forward(feats, masks)``: ``levels`` tensors ``[B, in_dim, T_l]`` and bool ``[B, 1, T_l]`` ->
    ``levels`` tensors ``[B, 2, T_l]`` in ``[0, num_bins]``, exactly 0 at invalid steps (see the
    module docstring). The same weights serve every level, with one learnt scale per level on the
    centre offsets.
    """

    def __init__(self, config: TridentHeadConfig):
        super().__init__()
        self.config = config
        self.start_branch = _branch(config, 1, config.boundary_kernel_size, out_bias=False)
        self.end_branch = _branch(config, 1, config.boundary_kernel_size, out_bias=False)
        self.offset_branch = _branch(config, 2 * (config.num_bins + 1), config.kernel_size, out_bias=True)
        self.scales = nn.Parameter(torch.ones(config.levels))  # one learnt scale per level

    def forward(self, feats: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        cfg = self.config
        torch._assert(
            len(feats) == cfg.levels and len(masks) == cfg.levels,
            f"TridentHead: expected {cfg.levels} levels, got {len(feats)}, {len(masks)}",
        )
        outs = []
        for level, (x, mask) in enumerate(zip(feats, masks)):
            torch._assert(
                x.ndim == 3 and x.shape[1] == cfg.in_dim, f"TridentHead: level {level} must be [B, {cfg.in_dim}, T_l], got {tuple(x.shape)}"
            )
            torch._assert(
                mask.dtype == torch.bool and mask.shape == (x.shape[0], 1, x.shape[2]),
                f"TridentHead: level {level} mask must be bool [B, 1, T_l], got {mask.dtype} {tuple(mask.shape)}",
            )
            x_boundary = x.detach() if cfg.detach_boundary else x
            start = self.start_branch(x_boundary, mask)[:, 0]  # [B, 1, T_l] -> [B, T_l]
            end = self.end_branch(x_boundary, mask)[:, 0]
            offsets = torch.relu(self.offset_branch(x, mask) * self.scales[level])  # [B, 2 (N + 1), T_l]
            offsets = offsets.unflatten(1, (2, cfg.num_bins + 1)).transpose(2, 3)  # -> [B, 2, N + 1, T_l] -> [B, 2, T_l, N + 1]
            valid = mask[:, 0]  # [B, T_l]
            d_start = relative_boundary_distance(start, offsets[:, 0], valid, "start")
            d_end = relative_boundary_distance(end, offsets[:, 1], valid, "end")
            outs.append(torch.stack((d_start, d_end), dim=1))  # [B, 2, T_l]
        return outs
