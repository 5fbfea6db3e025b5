"""Necks: pyramid -> pyramid (a layer norm per level, or a top-down FPN)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from tal_models.config import require_positive_int
from tal_models.layers import LayerNormC, MaskedConv1d

NeckKind = Literal["identity", "fpn"]
NECK_KINDS = ("identity", "fpn")


@dataclass(frozen=True)
class FPNConfig:
    """``identity``: a layer norm per level (needs ``in_dim == out_dim``); ``fpn``: top-down FPN.

    The FPN adds each coarser level, upsampled 2x (nearest), to a 1x1 projection of the finer
    one, then applies a masked 3-step convolution and a layer norm per level.
    """

    in_dim: int = 512
    out_dim: int = 512
    levels: int = 6
    kind: NeckKind = "identity"

    def __post_init__(self) -> None:
        if self.kind not in NECK_KINDS:
            raise ValueError(f"FPNConfig.kind must be one of {NECK_KINDS}, got {self.kind!r}")
        for name in ("in_dim", "out_dim", "levels"):
            value = getattr(self, name)
            require_positive_int(value, f"FPNConfig.{name}")
        if self.kind == "identity" and self.in_dim != self.out_dim:
            raise ValueError(
                f"FPNConfig: kind='identity' keeps the width, but in_dim={self.in_dim} != out_dim={self.out_dim}; use kind='fpn' or equal dims"
            )


class FPNNeck(nn.Module):
    """Pyramid -> pyramid: ``levels`` tensors ``[B, in_dim, T_l]`` -> ``[B, out_dim, T_l]``, masks unchanged.

    ``T_l`` must halve from each level to the next (for ``fpn``); outputs are zero at invalid steps.
    """

    def __init__(self, config: FPNConfig):
        super().__init__()
        self.config = config
        self.norms = nn.ModuleList(LayerNormC(config.out_dim) for _ in range(config.levels))
        if config.kind == "fpn":
            self.lateral = nn.ModuleList(MaskedConv1d(config.in_dim, config.out_dim, 1) for _ in range(config.levels))
            self.smooth = nn.ModuleList(MaskedConv1d(config.out_dim, config.out_dim, 3, bias=False) for _ in range(config.levels))

    def forward(self, feats: list[Tensor], masks: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cfg = self.config
        torch._assert(len(feats) == cfg.levels and len(masks) == cfg.levels, f"FPNNeck: expected {cfg.levels} levels, got {len(feats)}")
        if cfg.kind == "identity":
            return [norm(x).masked_fill(~m, 0.0) for norm, x, m in zip(self.norms, feats, masks)], list(masks)
        lateral = [conv(x, m)[0] for conv, x, m in zip(self.lateral, feats, masks)]
        for level in range(cfg.levels - 2, -1, -1):
            fine, coarse = lateral[level], lateral[level + 1]
            torch._assert(
                fine.shape[-1] == 2 * coarse.shape[-1],
                f"FPNNeck: level {level} has T = {fine.shape[-1]}, expected twice level {level + 1}'s {coarse.shape[-1]}",
            )
            # coarse step j covers fine steps 2j, 2j + 1; valid when 2j is, so a valid fine step of a
            # prefix mask never reads an invalid coarse one
            lateral[level] = (fine + coarse.repeat_interleave(2, dim=-1)).masked_fill(~masks[level], 0.0)
        outs = []
        for conv, norm, x, m in zip(self.smooth, self.norms, lateral, masks):
            y, _ = conv(x, m)
            outs.append(norm(y).masked_fill(~m, 0.0))
        return outs, list(masks)
