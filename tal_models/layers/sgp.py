"""TriDet's Scalable-Granularity Perception (SGP) block."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tal_models.layers.conv import MLP, DropPath, MaskedConv1d, conv1d
from tal_models.layers.masking import check_inputs, check_odd, check_stride, masked_max_pool, masked_mean
from tal_models.layers.norm import LayerNormC, MaskedGroupNorm


def sgp_wide_kernel(kernel_size: int, k: float) -> int:
    """Kernel of SGP's wide window branch: ``round(k * (w + 1))``, bumped to odd (TriDet's code; the paper writes ``k * w``).

    ``w=3, k=1.5 -> 7``; ``w=1, k=5 -> 11`` (TriDet on THUMOS14).
    """
    size = round((kernel_size + 1) * k)
    return size + 1 if size % 2 == 0 else size


class SGPBlock(nn.Module):
    """TriDet's Scalable-Granularity Perception layer followed by an FFN.

    ``forward(x [B, C, T], mask [B, 1, T]) -> ([B, C, T / stride], [B, 1, T / stride])``.

    With ``x`` first max-pooled (kernel 3, masked) when ``stride=2`` and ``z = LN(x)``::

        phi   = ReLU(FC_g(mean_t z))                          # instant level: one gate per video and channel
        psi   = DWConv_w(z)                                   # window level: a gate per step
        sgp   = FC(z) * phi + (DWConv_w'(z) + DWConv_kw(z)) * psi + z
        y     = x + DropPath(sgp)
        out   = y + DropPath(MLP(GN(y)))

    ``FC``, ``FC_g`` are per-channel 1x1 convolutions (depthwise), ``DWConv_w``, ``DWConv_w'`` are
    depthwise convolutions of kernel ``w = kernel_size`` and ``DWConv_kw`` one of kernel
    ``sgp_wide_kernel(w, k)``; ``mean_t`` averages over the video's valid steps and ``GN`` is a
    group norm (``groups``) over valid steps. The MLP is ``C -> mlp_ratio * C -> C`` with GELU
    (TriDet on THUMOS14: 768 hidden for C = 512, i.e. ``mlp_ratio=1.5``).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        k: float = 1.5,
        stride: int = 1,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        groups: int = 16,
    ):
        super().__init__()
        check_odd("SGPBlock kernel_size", kernel_size)
        check_stride("SGPBlock", stride)
        if not k > 0:
            raise ValueError(f"SGPBlock k (window expansion) must be > 0, got {k} (TriDet: 1.5, 5 on THUMOS14)")
        self.stride = stride
        self.norm = LayerNormC(channels)
        self.psi = MaskedConv1d(channels, channels, kernel_size, groups=channels)
        self.conv_w = MaskedConv1d(channels, channels, kernel_size, groups=channels)
        self.conv_kw = MaskedConv1d(channels, channels, sgp_wide_kernel(kernel_size, k), groups=channels)
        self.fc = nn.Conv1d(channels, channels, 1, groups=channels)
        self.global_fc = nn.Conv1d(channels, channels, 1, groups=channels)
        self.ffn_norm = MaskedGroupNorm(groups, channels)
        self.mlp = MLP(channels, mlp_ratio, dropout)
        self.drop_path1, self.drop_path2 = DropPath(drop_path), DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        check_inputs(x, mask, self.stride, "SGPBlock")
        if self.stride > 1:
            x, mask = masked_max_pool(x, mask, 3, self.stride)
        else:
            x = x.masked_fill(~mask, 0.0)
        z = self.norm(x)
        phi = torch.relu(conv1d(self.global_fc, masked_mean(z, mask)))  # [B, C, 1]
        psi, _ = self.psi(z, mask)
        wide = self.conv_w(z, mask)[0] + self.conv_kw(z, mask)[0]
        sgp = (conv1d(self.fc, z) * phi + wide * psi + z).masked_fill(~mask, 0.0)
        x = x + self.drop_path1(sgp)
        h = self.mlp(self.ffn_norm(x, mask)).masked_fill(~mask, 0.0)
        return x + self.drop_path2(h), mask
