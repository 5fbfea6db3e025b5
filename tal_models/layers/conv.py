"""Masked 1-D convolution, and the per-step pieces blocks share: DropPath and the 1x1 MLP."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.layers.masking import check_inputs, check_odd, downsample_mask


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero a residual branch for a random fraction ``p`` of the videos.

    ``x [B, ...]``; a kept branch is scaled by ``1 / (1 - p)`` so its expectation is unchanged.
    Identity when ``p == 0`` or not ``training``.
    """
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)  # [B, 1, ...]
    return x * keep / (1.0 - p)


class DropPath(nn.Module):
    """``drop_path`` as a module, active in training mode only."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """Two 1x1 convolutions ``C -> round(ratio * C) -> C`` with GELU; per step, so it cannot mix padding in."""

    def __init__(self, channels: int, ratio: float, dropout: float = 0.0):
        super().__init__()
        if not (ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"mlp_ratio must be > 0, got {ratio} (ActionFormer: 4, TriDet: 1.5)")
        hidden = max(1, round(channels * ratio))
        self.fc1, self.fc2 = nn.Conv1d(channels, hidden, 1), nn.Conv1d(hidden, channels, 1)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.fc1(x))  # [B, C, T] -> [B, hidden, T]
        return F.dropout(self.fc2(F.dropout(h, self.dropout, self.training)), self.dropout, self.training)


def conv1d(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """``conv(x)``, with a depthwise 1-step convolution computed as the per-channel affine map it
    is: PyTorch's CPU kernels run that case one channel at a time (TriDet's SGP with ``w = 1``
    spent ~14,000 tiny kernel calls per training step there)."""
    if conv.kernel_size == (1,) and conv.groups == conv.in_channels == conv.out_channels and conv.stride == (1,):
        out = x * conv.weight.view(1, -1, 1)  # [C, 1, 1] -> [1, C, 1]
        return out + conv.bias.view(1, -1, 1) if conv.bias is not None else out
    return conv(x)


class MaskedConv1d(nn.Module):
    """1-D convolution with 'same' padding over the valid steps only.

    ``forward(x [B, in_ch, T], mask [B, 1, T]) -> ([B, out_ch, T / stride], [B, 1, T / stride])``.
    Padded input steps are read as zeros, like the zero padding beyond the ends; the output is
    zero at invalid steps. The bias starts at zero (as ActionFormer).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, dilation: int = 1, bias: bool = True, groups: int = 1):
        super().__init__()
        check_odd("MaskedConv1d kernel_size", kernel_size)
        if stride < 1 or dilation < 1:
            raise ValueError(f"MaskedConv1d stride and dilation must be >= 1, got stride={stride}, dilation={dilation}")
        self.stride = stride
        self.conv = nn.Conv1d(
            in_ch, out_ch, kernel_size, stride, padding=dilation * (kernel_size // 2), dilation=dilation, groups=groups, bias=bias
        )
        if bias:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor, mask: Tensor, input_masked: bool = False) -> tuple[Tensor, Tensor]:
        """``input_masked=True``: the caller guarantees ``x`` is already 0 at invalid steps (it
        skips a copy of ``x`` that backward would keep)."""
        check_inputs(x, mask, self.stride, "MaskedConv1d")
        out_mask = downsample_mask(mask, self.stride)
        if not input_masked:
            x = x.masked_fill(~mask, 0.0)  # masked_fill, not a product: padding may hold inf/NaN
        out = conv1d(self.conv, x)
        return out.masked_fill_(~out_mask, 0.0), out_mask  # in place: no backward needs the conv's output
