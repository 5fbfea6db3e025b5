"""Boundary refinement on top of any one-stage detector's pyramid: BRN's scale-time features.

Legend: B batch, D pyramid channels, C = ``hidden_dim`` refiner channels, L pyramid levels,
T_l = T_0 / 2**l steps at level l (stride 2**l input steps), P = sum_l T_l points, K branches
of a scale-time block.

Chosen method: BRN, "Boundary-Recovering Network for Temporal Action Detection" (Kim, Choi,
Jeon, Heo; arXiv 2408.09354). Its diagnosis is the *vanishing boundary problem*: in a
coarse-to-fine pyramid built by pooling, the few background steps between two short adjoining
actions are pooled away at coarse levels, so a coarse point cannot see where one action ends and
the next begins. Its cure lets the levels exchange information across scales:

1. **Scale-time features** (STF): every level is interpolated back to the finest length ``T_0``
   and the levels are stacked along a new *scale* axis: ``L x [B, D, T_l] -> [B, C, L, T_0]``.
2. **Scale-time blocks** (STB): 2-D convolutions over (scale, time), dilated along both axes,
   in parallel branches that a *selection* module weighs (softmax over the branches, per
   channel, from the block's pooled response, as selective-kernel networks do); residual.
3. Back to the pyramid: level ``l`` reads its own scale row at its own points (step ``i`` sits
   at input step ``i * 2**l``, ``tal_models.points``), so an STF built and read back without a
   block in between returns every level exactly.

Why BRN and not FDDet (arXiv 2504.00647, "frequency decoupling"): FDDet's contributions are
feature processors in the *encoder* (a DFT low-pass "global frequency decoupling" of the input
sequence, temporal-variation modelling and a long/short-term category-aware relation network,
inside Mamba/attention hybrid blocks; its public code needs ``mamba_ssm``), and its detection
head is TriDet's Trident head, which we already have (``tal_models.trident``). Nothing of it acts
on per-level features and distances, so it is not a head option. BRN acts on the pyramid any
one-stage detector already produces, and was evaluated on top of FCOS-style and ActionFormer
detectors with I3D features on THUMOS14 and ActivityNet-1.3.

How it becomes a head option here (our adaptation, not the paper's wiring): in the paper the
recovered pyramid replaces the neck's output for both heads. Here the refiner predicts a
**residual correction of the regression head's distances** from the recovered features:
``refined = relu(offsets + scale_l * delta_l)`` with ``delta`` from a small masked-conv tower
whose last convolution starts at zero, so a freshly built refiner returns its input distances
exactly and switching it on cannot change a model at step 0. ``refine_features`` exposes the
recovered pyramid itself for a caller that wants BRN's original use (feeding the heads).

Simplified / ours (the paper's body was not available to us; only its abstract and summary):
- the STB hyper-parameters (``hidden_dim``, ``num_blocks``, dilations, kernel, selection
  reduction) are our defaults, not values read from the paper;
- interpolation is linear between a level's points (positions ``i * 2**l``), renormalised over
  valid neighbours so padding never enters; the paper's exact interpolation is not known to us;
- the levels are first projected ``D -> C`` (1x1) and tagged with a learnt per-scale embedding,
  since a convolution along the scale axis is otherwise blind to which scale it is at;
- no auxiliary loss of the paper's: the refined distances get the detector's own DIoU loss,
  ``refine_losses`` (the head's loss keeps training the head).

Masking (``tal_models.layers`` conventions): the STF is valid where the level-0 mask is; every
convolution reads zeros at invalid steps; the selection statistics average valid (scale, time)
cells only. So padding, whatever it holds, changes no refined distance at a valid step, and
refined distances are exactly 0 at invalid steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.config import require_positive_int
from tal_models.layers import LayerNormC, MaskedConv1d, check_odd
from tal_models.losses import diou_loss_1d

RefineKind = Literal["none", "brn"]
_KINDS = ("none", "brn")


@dataclass(frozen=True)
class RefineConfig:
    """The boundary refiner: ``kind="none"`` (off: distances pass through) or ``"brn"``.

    ``hidden_dim``: channels ``C`` of the scale-time features (the pyramid's ``D`` is projected to it).
    ``num_blocks``: scale-time blocks. ``scale_dilations`` x ``time_dilations``: the branches of
    every block, one dilated ``kernel_size x kernel_size`` depthwise convolution over (scale, time)
    per pair. ``selection_reduction``: the selection module's bottleneck is ``C / reduction``
    (at least 8). ``loss_weight``: weight of ``refine_loss`` in the detector's ``final_loss``.
    """

    kind: RefineKind = "none"
    hidden_dim: int = 128
    num_blocks: int = 2
    kernel_size: int = 3
    scale_dilations: tuple[int, ...] = (1, 2)
    time_dilations: tuple[int, ...] = (1, 3)
    selection_reduction: int = 4
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            hint = " (FDDet is an encoder-side method, not a head option: see tal_models.refine)" if self.kind == "fddet" else ""
            raise ValueError(f"RefineConfig.kind must be one of {_KINDS}, got {self.kind!r}{hint}")
        for name in ("hidden_dim", "num_blocks", "selection_reduction"):
            require_positive_int(getattr(self, name), f"RefineConfig.{name}")
        check_odd("RefineConfig.kernel_size", self.kernel_size)
        object.__setattr__(self, "scale_dilations", tuple(self.scale_dilations))
        object.__setattr__(self, "time_dilations", tuple(self.time_dilations))
        for name in ("scale_dilations", "time_dilations"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"RefineConfig.{name} must name at least one dilation, got ()")
            for d in values:
                require_positive_int(d, f"RefineConfig.{name} entries")
            if len(set(values)) != len(values):
                raise ValueError(f"RefineConfig.{name} must not repeat a dilation (two branches would be alike), got {values}")
        if not (self.loss_weight >= 0 and math.isfinite(self.loss_weight)):
            raise ValueError(f"RefineConfig.loss_weight must be a finite number >= 0, got {self.loss_weight}")

    @property
    def branches(self) -> tuple[tuple[int, int], ...]:
        """(scale dilation, time dilation) of each branch of a block."""
        return tuple((s, t) for s in self.scale_dilations for t in self.time_dilations)


# --- scale-time features ---------------------------------------------------------------------
def _check_pyramid(feats: list[Tensor], masks: list[Tensor]) -> int:
    """-> ``T_0``; asserts ``L x [B, *, T_0 / 2**l]`` features and bool ``[B, 1, T_l]`` masks."""
    torch._assert(len(feats) == len(masks) and len(feats) > 0, f"need one mask per level, got {len(feats)} feats and {len(masks)} masks")
    t0 = feats[0].shape[-1]
    for level, (x, m) in enumerate(zip(feats, masks)):
        torch._assert(
            x.ndim == 3 and x.shape[-1] * 2**level == t0,
            f"level {level}: features must be [B, D, T_0 / 2**{level}] = [.., .., {t0 / 2**level:g}], got {tuple(x.shape)}",
        )
        torch._assert(
            m.dtype == torch.bool and m.shape == (x.shape[0], 1, x.shape[-1]),
            f"level {level}: mask must be bool [B, 1, T_l], got {m.dtype} {tuple(m.shape)}",
        )
    return t0


def upsample_level(x: Tensor, mask: Tensor, stride: int, length: int) -> Tensor:
    """One level ``[B, C, T_l]`` -> ``[B, C, length]`` on the input-step grid, ``length = T_l * stride``.

    Point ``i`` sits at input step ``i * stride``; step ``t`` between points ``i`` and ``i + 1``
    is their linear interpolation, with each neighbour's weight zeroed where it is invalid and the
    rest renormalised: a valid step next to the padding takes its one valid neighbour, padding
    (whatever it holds) is never read, and step ``i * stride`` is point ``i`` exactly. 0 where
    neither neighbour is valid.
    """
    x = x.masked_fill(~mask, 0.0)  # masked_fill, not a product: padding may hold NaN
    if stride == 1:
        return x
    t_l = x.shape[-1]
    t = torch.arange(length, device=x.device)
    left = torch.div(t, stride, rounding_mode="floor")  # [length]
    right = (left + 1).clamp(max=t_l - 1)
    frac = (t - left * stride).to(x.dtype) / stride  # [length], in [0, 1)
    frac = torch.where(right == left, torch.zeros_like(frac), frac)  # the last point has no right neighbour
    w_left = (1.0 - frac) * mask[..., left]  # [B, 1, length]
    w_right = frac * mask[..., right]
    total = w_left + w_right
    out = w_left * x[..., left] + w_right * x[..., right]  # [B, C, length]
    return torch.where(total > 0, out / total.clamp(min=1e-12), torch.zeros_like(out))


def to_scale_time(feats: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Pyramid ``L x [B, C, T_l]`` -> scale-time features ``[B, C, L, T_0]`` and their mask
    ``[B, 1, 1, T_0]`` (the level-0 mask: a video's steps are valid at every scale). Zero where invalid."""
    t0 = _check_pyramid(feats, masks)
    mask = masks[0][:, :, None]  # [B, 1, T_0] -> [B, 1, 1, T_0]
    rows = [upsample_level(x, m, 2**level, t0) for level, (x, m) in enumerate(zip(feats, masks))]
    return torch.stack(rows, dim=2).masked_fill(~mask, 0.0), mask  # L x [B, C, T_0] -> [B, C, L, T_0]


def from_scale_time(stf: Tensor, masks: list[Tensor]) -> list[Tensor]:
    """``[B, C, L, T_0]`` -> ``L x [B, C, T_l]``: level ``l`` reads row ``l`` at its points ``i * 2**l``."""
    return [stf[:, :, level, :: 2**level].masked_fill(~m, 0.0) for level, m in enumerate(masks)]


class ScaleTimeBlock(nn.Module):
    """BRN's scale-time block: ``[B, C, L, T_0]``, mask ``[B, 1, 1, T_0]`` -> ``[B, C, L, T_0]``.

    ``x + pointwise(GELU(sum_k a_k * branch_k(LN(x))))``: each branch a depthwise convolution over
    (scale, time) with its own dilations; ``a [B, K, C]`` the selection weights, a softmax over the
    branches per channel, computed from the mean of the branches' summed response over the valid
    cells (two linear layers with a ReLU between, as a selective-kernel unit). Zero at invalid steps.
    """

    def __init__(self, channels: int, kernel_size: int, branches: tuple[tuple[int, int], ...], reduction: int):
        super().__init__()
        pad = kernel_size // 2
        self.norm = LayerNormC(channels)
        self.branches = nn.ModuleList(
            nn.Conv2d(channels, channels, kernel_size, padding=(ds * pad, dt * pad), dilation=(ds, dt), groups=channels)
            for ds, dt in branches
        )
        squeezed = max(8, channels // reduction)
        self.squeeze = nn.Linear(channels, squeezed)
        self.select = nn.Linear(squeezed, len(branches) * channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, c, s, t = x.shape
        h = self.norm(x.reshape(b, c, s * t)).reshape(b, c, s, t).masked_fill(~mask, 0.0)
        u = torch.stack([conv(h) for conv in self.branches], dim=1).masked_fill(~mask[:, None], 0.0)  # [B, K, C, S, T]
        cells = (mask.sum(dim=-1) * s).clamp(min=1)  # [B, 1, 1] valid (scale, time) cells
        pooled = u.sum(dim=1).sum(dim=(-2, -1)) / cells[:, :, 0]  # [B, C]
        a = self.select(F.relu(self.squeeze(pooled))).view(b, len(self.branches), c).softmax(dim=1)  # [B, K, C]
        v = (a[..., None, None] * u).sum(dim=1)  # [B, K, C, S, T] -> [B, C, S, T]
        return (x + self.pointwise(F.gelu(v))).masked_fill(~mask, 0.0)


class BoundaryRefiner(nn.Module):
    """Refines a regression head's distances with BRN's cross-scale (scale-time) features.

    ``forward(feats, masks, offsets)``: ``L x [B, D, T_l]`` features, ``L x [B, 1, T_l]`` bool
    masks, ``L x [B, 2, T_l]`` (start, end) distances in strides of the level (>= 0) ->
    ``L x [B, 2, T_l]`` refined distances, >= 0, exactly 0 at invalid steps. ``kind="none"``:
    no parameters, the input distances (zeroed at invalid steps). A new ``"brn"`` refiner also
    returns its input distances exactly (the correction's last convolution starts at zero).
    ``T_0`` must be divisible by ``2**(L - 1)`` (the detector pads to it).
    """

    def __init__(self, config: RefineConfig, in_dim: int, levels: int):
        super().__init__()
        require_positive_int(in_dim, "BoundaryRefiner in_dim")
        require_positive_int(levels, "BoundaryRefiner levels")
        self.config, self.levels = config, levels
        if config.kind == "none":
            return
        c = config.hidden_dim
        self.proj = nn.Conv1d(in_dim, c, 1)
        self.scale_embed = nn.Parameter(torch.zeros(levels, c))  # which scale a row is: the 2-D convolutions share weights across scales
        self.blocks = nn.ModuleList(
            ScaleTimeBlock(c, config.kernel_size, config.branches, config.selection_reduction) for _ in range(config.num_blocks)
        )
        self.delta_hidden = MaskedConv1d(c, c, 3, bias=False)
        self.delta_norm = LayerNormC(c)
        self.delta_out = MaskedConv1d(c, 2, 3)
        nn.init.zeros_(self.delta_out.conv.weight)  # identity at initialisation (the bias already starts at zero)
        self.delta_scales = nn.Parameter(torch.ones(levels))  # per level, as the regression head's (FCOS)

    def refine_features(self, feats: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        """The recovered pyramid: ``L x [B, D, T_l]`` -> ``L x [B, C, T_l]`` (zero at invalid steps)."""
        torch._assert(len(feats) == self.levels, f"BoundaryRefiner: expected {self.levels} levels, got {len(feats)}")
        _check_pyramid(feats, masks)
        rows = [
            (self.proj(x.masked_fill(~m, 0.0)) + self.scale_embed[level][:, None]).masked_fill(~m, 0.0)
            for level, (x, m) in enumerate(zip(feats, masks))
        ]  # L x [B, C, T_l]
        stf, stf_mask = to_scale_time(rows, masks)  # [B, C, L, T_0], [B, 1, 1, T_0]
        for block in self.blocks:
            stf = block(stf, stf_mask)
        return from_scale_time(stf, masks)

    def forward(self, feats: list[Tensor], masks: list[Tensor], offsets: list[Tensor]) -> list[Tensor]:
        torch._assert(len(offsets) == len(masks), f"BoundaryRefiner: {len(offsets)} offset levels for {len(masks)} masks")
        for level, (o, m) in enumerate(zip(offsets, masks)):
            torch._assert(o.shape == (m.shape[0], 2, m.shape[-1]), f"level {level}: offsets must be [B, 2, T_l], got {tuple(o.shape)}")
        offsets = [o.masked_fill(~m, 0.0) for o, m in zip(offsets, masks)]
        if self.config.kind == "none":
            return offsets
        refined = []
        for level, (r, m, o) in enumerate(zip(self.refine_features(feats, masks), masks, offsets)):
            h, _ = self.delta_hidden(r, m, input_masked=True)
            h = self.delta_norm(h).masked_fill_(~m, 0.0).relu_()
            delta = self.delta_out(h, m, input_masked=True)[0] * self.delta_scales[level]  # [B, 2, T_l], strides of the level
            refined.append(torch.relu(o + delta).masked_fill(~m, 0.0))
        return refined


def refine_losses(refined: Tensor, reg_targets: Tensor, positive: Tensor, normalizer: float | Tensor | None = None) -> dict[str, Tensor]:
    """The refined distances' DIoU loss (ActionFormer's regression loss, on the refiner's output).

    Args:
        refined: ``[B, P, 2]`` refined distances in strides (the levels of ``BoundaryRefiner``'s
            output concatenated as the detector does: ``cat([r.transpose(1, 2) for r in refined], 1)``).
        reg_targets: ``[B, P, 2]`` target distances in strides (``tal_models.targets``).
        positive: ``[B, P]`` bool, positive valid points (the detector's positive mask).
        normalizer: what the summed loss is divided by: the detector's ``LossNormalizer`` value
            after this batch's update (so it is not updated twice); ``None``: ``max(#positives, 1)``.

    Returns:
        ``{"refine_loss": DIoU summed over positive points / normalizer}``, 0 (and connected to
        ``refined``) without a positive point; the detector adds ``RefineConfig.loss_weight *
        refine_loss`` to its ``final_loss``.
    """
    torch._assert(refined.ndim == 3 and refined.shape[-1] == 2, f"refined must be [B, P, 2], got {tuple(refined.shape)}")
    torch._assert(reg_targets.shape == refined.shape, f"reg_targets must be {tuple(refined.shape)}, got {tuple(reg_targets.shape)}")
    torch._assert(positive.shape == refined.shape[:2], f"positive must be [B, P] = {tuple(refined.shape[:2])}, got {tuple(positive.shape)}")
    positive = positive.bool()
    if normalizer is None:
        normalizer = positive.sum().clamp(min=1).to(refined.dtype)
    elif isinstance(normalizer, Tensor):
        normalizer = normalizer.to(refined.dtype)
    loss = diou_loss_1d(refined[positive], reg_targets[positive], reduction="sum")  # [#pos, 2] -> []
    return {"refine_loss": loss / normalizer}


def build_refiner(config: RefineConfig, in_dim: int, levels: int) -> BoundaryRefiner | None:
    """The refiner a config names, or ``None`` when it is off (nothing to run or to checkpoint)."""
    return None if config.kind == "none" else BoundaryRefiner(config, in_dim, levels)
