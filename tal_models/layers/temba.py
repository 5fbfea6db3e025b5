"""MS-Temba's Temba block: a dilated temporal convolution and a dilated selective SSM, at full resolution.

Legend: B batch, C channels, T steps, d dilation, T_d = T / d steps of one dilated sub-sequence.

MS-Temba (Sinha et al., arXiv 2501.06138; dense multi-label detection on Charades, TSU,
MultiTHUMOS) keeps every scale at the input's resolution and changes the *dilation* instead of
striding: block ``l`` sees steps ``d = 2**l`` apart. A Temba block has two parts, each a pre-norm
residual branch::

    x = x + DropPath(TCM(LN(x)))      # Temporal Convolution Module: depthwise conv of ``kernel_size`` at dilation d, GELU, 1x1
    x = x + DropPath(D-SSM(LN(x)))    # Dilated SSM: a bidirectional Mamba over every d-th step (d interleaved sub-sequences)
    x = x + DropPath(MLP(LN(x)))      # per-step FFN (``mlp_ratio``; 0 leaves it out)

The dilated SSM scans the ``d`` sub-sequences ``r, r + d, r + 2d, ...`` (``r < d``) as a batch of
``B * d`` sequences of ``T / d`` steps, so a recurrence step spans ``d`` input steps: the state
carries information ``d`` times further for the same number of updates. A padded batch's valid
prefix of ``n`` steps is a valid prefix of every sub-sequence (``ceil((n - r) / d)`` steps), so the
masked scan (``tal_models.layers.ssm``) stays exact under padding. ``T`` must be a multiple of
``d``; the detector pads to ``2**(levels - 1)``, which every level's dilation divides.

Differences from the released code (``vim/models_MSTemba.py``): the widths there grow per block
(256 / 384 / 576) and each block is a stack of Vision-Mamba layers; here every level has the
encoder's width and one Temba block, so the levels can share the detector's neck and head; the
auxiliary per-scale classifiers and the C-state diversity loss are not included.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.layers.conv import MLP, DropPath, MaskedConv1d
from tal_models.layers.masking import check_inputs, check_odd
from tal_models.layers.norm import LayerNormC
from tal_models.layers.ssm import SelectiveSSM


def to_dilated(x: Tensor, dilation: int) -> Tensor:
    """``[B, C, T]`` -> ``[B * d, C, T / d]``: row ``b * d + r`` holds steps ``r, r + d, ...`` of video ``b``."""
    B, C, T = x.shape
    return x.view(B, C, T // dilation, dilation).permute(0, 3, 1, 2).reshape(B * dilation, C, T // dilation)


def from_dilated(x: Tensor, dilation: int) -> Tensor:
    """The inverse of ``to_dilated``: ``[B * d, C, T / d]`` -> ``[B, C, T]``."""
    Bd, C, Td = x.shape
    return x.view(Bd // dilation, dilation, C, Td).permute(0, 2, 3, 1).reshape(Bd // dilation, C, Td * dilation)


class TembaBlock(nn.Module):
    """MS-Temba's Temba block at dilation ``d`` (module docstring), stride 1.

    ``forward(x [B, C, T], mask [B, 1, T]) -> ([B, C, T], mask)``, zero at invalid steps; ``T`` a
    multiple of ``dilation``.
    """

    def __init__(
        self,
        channels: int,
        dilation: int = 1,
        kernel_size: int = 3,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        state_dim: int = 16,
        expand: float = 2,
        conv_kernel: int = 4,
    ):
        super().__init__()
        check_odd("TembaBlock kernel_size", kernel_size)
        if dilation < 1:
            raise ValueError(f"TembaBlock dilation must be >= 1, got {dilation}")
        if mlp_ratio < 0:
            raise ValueError(f"TembaBlock mlp_ratio must be >= 0 (0: no FFN), got {mlp_ratio}")
        self.dilation = dilation
        self.tcm_norm = LayerNormC(channels)
        self.tcm_conv = MaskedConv1d(channels, channels, kernel_size, dilation=dilation, groups=channels)
        self.tcm_proj = nn.Conv1d(channels, channels, 1)
        self.ssm_norm = LayerNormC(channels, eps=1e-6)
        self.ssm = SelectiveSSM(channels, state_dim, expand, conv_kernel, direction="bidirectional")
        self.mlp_norm = LayerNormC(channels) if mlp_ratio > 0 else None
        self.mlp = MLP(channels, mlp_ratio) if mlp_ratio > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        check_inputs(x, mask, self.dilation, "TembaBlock")
        d = self.dilation
        x = x.masked_fill(~mask, 0.0)
        h, _ = self.tcm_conv(self.tcm_norm(x), mask)  # [B, C, T]: depthwise, d steps apart
        x = x + self.drop_path(self.tcm_proj(F.gelu(h)).masked_fill(~mask, 0.0))
        z = self.ssm(to_dilated(self.ssm_norm(x), d), to_dilated(mask, d))  # [B * d, C, T / d]
        x = x + self.drop_path(from_dilated(z, d))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.mlp_norm(x)).masked_fill(~mask, 0.0))
        return x, mask
