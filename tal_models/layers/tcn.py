"""Dilated temporal convolution (TCN) block."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tal_models.layers.conv import DropPath, MaskedConv1d
from tal_models.layers.masking import check_stride, residual
from tal_models.layers.norm import LayerNormC


class DilatedTCNBlock(nn.Module):
    """Residual block of two dilated convolutions: ``ReLU(skip(x) + LN(conv(ReLU(LN(conv_s(x))))))``.

    ``forward(x [B, C, T], mask [B, 1, T]) -> ([B, C, T / stride], [B, 1, T / stride])``. Each
    convolution sees ``kernel_size`` steps ``dilation`` apart; the first one is strided, and the
    residual path is a masked max-pool at stride 2.
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, dilation: int = 1, stride: int = 1, dropout: float = 0.0, drop_path: float = 0.0
    ):
        super().__init__()
        check_stride("DilatedTCNBlock", stride)
        self.stride = stride
        self.conv1 = MaskedConv1d(channels, channels, kernel_size, stride, dilation)
        self.norm1 = LayerNormC(channels)
        self.conv2 = MaskedConv1d(channels, channels, kernel_size, 1, dilation)
        self.norm2 = LayerNormC(channels)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h, out_mask = self.conv1(x, mask)
        h = self.dropout(torch.relu(self.norm1(h)))
        h, _ = self.conv2(h, out_mask)
        out = torch.relu(residual(x, mask, self.stride) + self.drop_path(self.norm2(h)))
        return out.masked_fill(~out_mask, 0.0), out_mask
