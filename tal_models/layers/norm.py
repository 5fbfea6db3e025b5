"""Normalisation layers over [B, C, T]: layer norm over channels (and its fused forms), group norm over valid steps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tal_models.layers.conv import MLP
from tal_models.layers.kernels import ChannelLayerNorm, NormMLP, NormPointwise


class LayerNormC(nn.Module):
    """Layer norm over the channels of ``[B, C, T]``, independently at every step -> ``[B, C, T]``.

    Per step, so padding cannot leak into valid steps; at an invalid (zero) step it returns the
    bias, and the caller masks (every block does).
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        kernel = ChannelLayerNorm.apply if torch.is_grad_enabled() else ChannelLayerNorm.infer
        return kernel(x, self.weight, self.bias, self.eps)


def norm_pointwise(norm: LayerNormC, conv: nn.Conv1d, x: Tensor) -> Tensor:
    """``conv(norm(x))`` for a 1x1 ``conv``, memory-lean in training (``NormPointwise``)."""
    kernel = NormPointwise.apply if torch.is_grad_enabled() else NormPointwise.infer
    return kernel(x, norm.weight, norm.bias, norm.eps, conv.weight, conv.bias)


def norm_mlp(norm: LayerNormC, mlp: MLP, x: Tensor) -> Tensor:
    """``mlp(norm(x))``, memory-lean in training (``NormMLP``; with dropout, the plain modules)."""
    if mlp.training and mlp.dropout > 0:
        return mlp(norm(x))
    kernel = NormMLP.apply if torch.is_grad_enabled() else NormMLP.infer
    return kernel(x, norm.weight, norm.bias, norm.eps, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)


class MaskedGroupNorm(nn.Module):
    """Group norm whose statistics, per video and group, count valid steps only.

    ``forward(x [B, C, T], mask [B, 1, T]) -> [B, C, T]``, zero at invalid steps. (TriDet's FFN
    uses ``nn.GroupNorm(16, C)``, whose statistics include the padding.)
    """

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        if groups < 1 or channels % groups != 0:
            raise ValueError(f"MaskedGroupNorm: channels ({channels}) must be divisible by groups ({groups})")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, C, T = x.shape
        g = x.masked_fill(~mask, 0.0).reshape(B, self.groups, C // self.groups, T)  # [B, C, T] -> [B, G, C/G, T]
        m = mask[:, None]  # [B, 1, 1, T]
        count = (m.sum(dim=-1, keepdim=True) * (C // self.groups)).clamp(min=1)  # [B, 1, 1, 1]
        mean = g.sum(dim=(2, 3), keepdim=True) / count  # [B, G, 1, 1]
        centred = (g - mean).masked_fill(~m, 0.0)
        var = centred.pow(2).sum(dim=(2, 3), keepdim=True) / count
        out = (centred * torch.rsqrt(var + self.eps)).reshape(B, C, T)
        return (out * self.weight[:, None] + self.bias[:, None]).masked_fill(~mask, 0.0)
