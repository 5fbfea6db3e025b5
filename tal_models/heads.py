"""Anchor-free dense heads, shared across pyramid levels (ActionFormer / FCOS style).

Legend: B batch, C channels, T_l steps at pyramid level l, K classes.

Both heads are a stack of masked convolutions (``num_layers - 1`` hidden layers of
``feat_dim`` channels, each followed by an optional layer norm and a ReLU) and one output
convolution, with the same weights at every level. The classification head starts from the
focal-loss prior (``bias = -log((1 - p) / p)``, so every point begins as background with
probability ``1 - p`` and the first iterations are not swamped by easy negatives). The
regression head multiplies its output by a learnt scale per level and applies a ReLU, so the
distances are non-negative and each level can settle on its own magnitude (FCOS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from tal_models.config import require_positive_int
from tal_models.layers import LayerNormC, MaskedConv1d, check_odd
from tal_models.layers.dynamic import DynamicConvTower

RegressionKind = Literal["offsets", "trident"]
_REGRESSION_KINDS = ("offsets", "trident")
TowerKind = Literal["conv", "dynamic"]
_TOWER_KINDS = ("conv", "dynamic")
ClassifierKind = Literal["linear", "text"]
_CLASSIFIER_KINDS = ("linear", "text")


@dataclass(frozen=True)
class HeadConfig:
    """The classification and regression heads.

    ``regression``: ``offsets`` (ActionFormer: two distances per point, regressed directly) or
    ``trident`` (TriDet: the expected value of relative boundary distributions over
    ``num_bins + 1`` steps of the level; see ``tal_models.trident``).

    ``classifier``: ``linear`` (the tower's output convolution gives one logit per class) or ``text``
    (open vocabulary: the tower ends in ``text_dim`` channels, scored by cosine against class-name
    embeddings; see ``tal_models.open_vocab``).
    """

    in_dim: int = 512
    feat_dim: int = 512
    num_layers: int = 3  # convolutions per head, the output one included
    kernel_size: int = 3
    with_ln: bool = True
    prior_prob: float = 0.01
    regression: RegressionKind = "offsets"
    num_bins: int = 16  # trident only
    tower: TowerKind = "conv"  # "dynamic": DyFADet's dynamic convolutions (tal_models.layers.dynamic)
    classifier: ClassifierKind = "linear"  # "text": cosine against class-name embeddings (tal_models.open_vocab)
    text_dim: int = 512  # text classifier: the width of the class-name embeddings (CLIP ViT-B: 512)

    def __post_init__(self) -> None:
        for name in ("in_dim", "feat_dim", "num_layers", "num_bins", "text_dim"):
            value = getattr(self, name)
            require_positive_int(value, f"HeadConfig.{name}")
        check_odd("HeadConfig.kernel_size", self.kernel_size)
        if not 0.0 < self.prior_prob < 1.0:
            raise ValueError(f"HeadConfig.prior_prob must be in (0, 1), got {self.prior_prob} (ActionFormer: 0.01)")
        if self.regression not in _REGRESSION_KINDS:
            raise ValueError(f"HeadConfig.regression must be one of {_REGRESSION_KINDS}, got {self.regression!r}")
        if self.tower not in _TOWER_KINDS:
            raise ValueError(f"HeadConfig.tower must be one of {_TOWER_KINDS}, got {self.tower!r}")
        if self.classifier not in _CLASSIFIER_KINDS:
            raise ValueError(f"HeadConfig.classifier must be one of {_CLASSIFIER_KINDS} ('text': open vocabulary), got {self.classifier!r}")


class ConvTower(nn.Module):
    """``num_layers - 1`` masked conv (+ LN) + ReLU layers of ``feat_dim`` channels, then the output
    conv: ``[B, in_dim, T]`` -> ``[B, out_dim, T]``, zero at invalid steps (the tower of every head,
    TriDet's branches included)."""

    def __init__(
        self, in_dim: int, feat_dim: int, out_dim: int, num_layers: int, kernel_size: int, with_ln: bool = True, out_bias: bool = True
    ):
        super().__init__()
        dims = [in_dim] + [feat_dim] * (num_layers - 1)
        self.hidden = nn.ModuleList(MaskedConv1d(a, b, kernel_size, bias=not with_ln) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList((LayerNormC(b) if with_ln else nn.Identity()) for b in dims[1:])
        self.out = MaskedConv1d(dims[-1], out_dim, kernel_size, bias=out_bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for i, (conv, norm) in enumerate(zip(self.hidden, self.norms)):
            x, _ = conv(x, mask, input_masked=i > 0)
            x = norm(x).masked_fill_(~mask, 0.0).relu_()  # in place: neither op's backward needs its input
        return self.out(x, mask, input_masked=len(self.hidden) > 0)[0]


def make_tower(config: HeadConfig, out_dim: int) -> nn.Module:
    """The tower ``config.tower`` names: ``ConvTower`` or DyFADet's ``DynamicConvTower`` (dynamic
    convolutions, adjacent levels fused before each layer as in DyFADet's head); both end in a plain
    ``MaskedConv1d`` ``out``, whose bias the classification head sets to the focal prior."""
    match config.tower:
        case "dynamic":
            return DynamicConvTower(
                config.in_dim, config.feat_dim, out_dim, config.num_layers, config.kernel_size, config.with_ln, cross_scale=True
            )
        case _:
            return ConvTower(config.in_dim, config.feat_dim, out_dim, config.num_layers, config.kernel_size, config.with_ln)


def tower_levels(tower: nn.Module, feats: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
    """A tower over every level: one call when it mixes levels (``forward_levels``), else level by level."""
    if hasattr(tower, "forward_levels"):
        return tower.forward_levels(feats, masks)
    return [tower(x, m) for x, m in zip(feats, masks)]


class ClassificationHead(nn.Module):
    """Per-level features -> class logits: ``levels`` x ``[B, in_dim, T_l]`` -> ``[B, K, T_l]``
    (zero logits at invalid steps; they take no part in the loss or decoding)."""

    def __init__(self, config: HeadConfig, num_classes: int):
        super().__init__()
        require_positive_int(num_classes, "num_classes")
        self.tower = make_tower(config, num_classes)
        nn.init.constant_(self.tower.out.conv.bias, -math.log((1.0 - config.prior_prob) / config.prior_prob))

    def forward(self, feats: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        return tower_levels(self.tower, feats, masks)


class OffsetRegressionHead(nn.Module):
    """Per-level features -> (start, end) distances in strides of the level, >= 0:
    ``levels`` x ``[B, in_dim, T_l]`` -> ``[B, 2, T_l]`` (zero at invalid steps)."""

    def __init__(self, config: HeadConfig, levels: int):
        super().__init__()
        self.tower = make_tower(config, 2)
        self.scales = nn.Parameter(torch.ones(levels))  # one learnt scale per level

    def forward(self, feats: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        torch._assert(len(feats) == self.scales.shape[0], f"expected {self.scales.shape[0]} levels, got {len(feats)}")
        out = tower_levels(self.tower, feats, masks)
        return [torch.relu(o * self.scales[level]).masked_fill(~m, 0.0) for level, (o, m) in enumerate(zip(out, masks))]
