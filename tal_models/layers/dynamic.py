"""DyFADet's dynamic feature aggregation (DFA): the encoder layer (DynE) and the dynamic head tower (DyHead).

Legend: B batch, C channels, T steps, K kernel size (taps of a DFA), L pyramid levels, T_l steps
at level ``l``.

DFA (Yang et al., ECCV 2024, arXiv 2407.03197) writes a convolution of kernel ``K`` as a shift
and a pointwise convolution, and scales the shifted features by a mask generated from the input::

    f_hat(s) = f shifted by s - K // 2             (s = 0 .. K - 1; zeros beyond the ends)
    M        = phi(Psi(f))                         # the weighted mask, one value per step (and channel)
    DFA(f)   = sum_s W_s (M ⊙ f_hat(s))            # W_s: the static kernel's tap s

so the effective kernel at step ``t``, ``W_s diag(M[:, t])``, changes with the step and the video,
and a zero in ``M`` removes a channel from the receptive field there. ``phi`` is ReLU in the
encoder and GeReTanH in the head: ``max(0, (tanh(x - tau) + tanh(tau)) / (1 + tanh(tau)))``, 0 for
``x <= 0`` and saturating at 1.

Everything here follows DyFADet's released code (``libs/modeling/blocks.py``, ``heads.py``):

- ``DynamicAggregationBlock`` is its ``DynELayer``: TriDet's SGP layer with the window branch
  turned into a DFA whose mask is ``ReLU(DWConv_w(z) + DWConv_kw(z))`` (per step and channel,
  generated at two receptive fields) and whose static kernel is the depthwise ``DWConv_w``;
- ``DynamicAggregation`` is its ``DTFAM``: ``generator="depthwise"`` is ``dyn_type='c'`` with
  ``conv_type='gate'`` (mask = GeReTanH of a depthwise convolution of ``f``), ``"conv"`` is
  ``conv_type='others'`` (mask = LN(Conv_K(f_hat)) times a per-step GeReTanH gate Conv_K(f_hat) -> 1);
- ``DynamicConvTower`` is its ``TDynPtTransformerClsHead`` / ``RegHead`` tower: ``num_layers - 1``
  ``DynamicScale_chk`` layers (each a ``"conv"`` DFA, optionally fed the adjacent pyramid levels
  through ``"depthwise"`` DFAs), ReLU, then a plain masked output convolution.

DyFADet's published THUMOS14 I3D configuration (``configs/thumos_i3d.yaml`` and the defaults in
``libs/core/config.py``; avg mAP 69.2 over tIoU 0.3:0.1:0.7, 84.0 at 0.3, 47.9 at 0.7):
I3D features 2048-d, feature stride 4, 16 frames, ``max_seq_len`` 2304, crop ratio [0.9, 1.0],
truncation threshold 0.5; Gaussian noise of std 1e-5 on the padded input in training;
embedding 2 masked convs (kernel 3, LN) to 512; encoder ``arch (2, 2, 5)``: 2 DynE layers at
stride 1, then 5 at stride 2 -> 6 levels, regression ranges [0, 4], [4, 8], [8, 16], [16, 32],
[32, 64], [64, inf); DynE ``kernel_size`` (window) 1, ``k`` 5 (wide kernel 11), MLP hidden 768
(``mlp_ratio`` 1.5), GroupNorm 16, drop path 0.1 on the 5 downsampling layers as LayerScale-DropPath
(``AffineDropPath``, scale initialised to 1e-4); neck: identity + LN, 512; heads 512 wide, 3 layers (2 DyHead layers + the
output conv), kernel 3, ReLU, GeReTanH ``tau`` 1.5, ``dyn_type 'c'``; sigmoid focal loss +
centre-DIoU regression (loss weight 1, no label smoothing, no Trident head), centre sampling
radius 1.5, prior 0.01, initial loss normaliser 100; AdamW lr 1e-4, weight decay 0.025, batch 2,
20 linear-warmup + 20 cosine epochs, gradient clip 1.0, model EMA; inference soft-NMS (sigma 0.5,
IoU 0.1), pre-NMS top 2000, max 2000 segments, min score 0.001, voting 0.7, multi-class NMS,
without external classification scores.

Differences from the released code: (1) for masking, as everywhere in ``tal_models.layers``:
the global mean counts valid steps only, the downsampling max-pool reads padding as ``-inf``,
shifted features read zeros beyond each video, outputs are re-masked; (2) DynE's LayerScale is
left out, as for SGP; (3) DynE's DFA weights start at PyTorch's default initialisation: the
released THUMOS config starts them at 0 (``init_conv_vars: 0``), where every term of the branch is
a product of two zero factors (``relu'(0) = 0``), so they never receive a gradient and the layer
is ``x + LN(x)`` followed by the MLP; (4) the head's ``"depthwise"`` DFA multiplies the mask
into the shifted features once, as the paper writes it; the released ``DTFAM`` multiplies twice
(``_x * (_x * gate)``, squaring the features); (5) the released ``DynamicScale_chk`` also holds
an unused LayerNorm and the fixed shift kernels as (frozen) parameters; here the shift is an
``unfold``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.layers.conv import MLP, DropPath, MaskedConv1d, conv1d
from tal_models.layers.masking import check_inputs, check_odd, check_stride, masked_max_pool, masked_mean
from tal_models.layers.norm import LayerNormC, MaskedGroupNorm
from tal_models.layers.sgp import sgp_wide_kernel


def ge_retanh(x: Tensor, tau: float) -> Tensor:
    """DyFADet's gate activation: ``max(0, (tanh(x - tau) + tanh(tau)) / (1 + tanh(tau)))``, in [0, 1)."""
    t = math.tanh(tau)
    return ((torch.tanh(x - tau) + t) / (1.0 + t)).clamp(min=0.0)


def shift_taps(x: Tensor, kernel_size: int) -> Tensor:
    """``[B, C, T]`` -> ``[B, C * K, T]``: channel ``c * K + s`` at step ``t`` is ``x[c, t + s - K // 2]``
    (0 beyond the ends). The caller zeroes invalid steps of ``x`` first."""
    B, C, T = x.shape
    pad = kernel_size // 2
    taps = F.pad(x, (pad, pad)).unfold(-1, kernel_size, 1)  # [B, C, T, K]
    return taps.transpose(2, 3).reshape(B, C * kernel_size, T)


class DynamicAggregation(nn.Module):
    """One DFA (DyFADet's ``DTFAM``): ``forward(x [B, C_in, T], mask [B, 1, T]) -> [B, C_out, T]``.

    ``y = LN(Conv1x1(M ⊙ f_hat))`` with ``f_hat = shift_taps(x, K)`` ``[B, C_in * K, T]`` and the
    mask ``M [B, C_in, T]`` shared by the ``K`` taps of a channel (``dyn_type 'c'``):

    - ``generator="depthwise"``: ``M = GeReTanH(DWConv_K(x))``;
    - ``generator="conv"``: ``M = LN(Conv_K(f_hat)) * GeReTanH(Conv_K(f_hat) -> 1 channel)``,
      a full convolution over the taps (its receptive field is ``2K - 1`` steps) and a gate per step.

    Zero at invalid steps; every generator reads valid steps only (invalid ones read as zeros, as
    the ends of the sequence). ``with_ln=False`` drops the output LN (the generator's stays).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, generator: str = "conv", tau: float = 1.5, with_ln: bool = True):
        super().__init__()
        check_odd("DynamicAggregation kernel_size", kernel_size)
        if generator not in ("depthwise", "conv"):
            raise ValueError(f"DynamicAggregation generator must be 'depthwise' or 'conv', got {generator!r}")
        self.kernel_size, self.generator, self.tau = kernel_size, generator, tau
        taps = in_ch * kernel_size
        self.pointwise = nn.Conv1d(taps, out_ch, 1)  # the static kernel, tap s of channel c at input c * K + s
        self.norm = LayerNormC(out_ch) if with_ln else nn.Identity()
        if generator == "depthwise":
            self.gate = MaskedConv1d(in_ch, in_ch, kernel_size, groups=in_ch)
        else:
            self.kernel = MaskedConv1d(taps, in_ch, kernel_size)
            self.kernel_norm = LayerNormC(in_ch)
            self.gate = MaskedConv1d(taps, 1, kernel_size)

    def weighted_mask(self, x: Tensor, mask: Tensor, taps: Tensor | None = None) -> Tensor:
        """The generated mask ``M``: ``x [B, C_in, T]`` (0 at invalid steps) -> ``[B, C_in, T]``, 0 at invalid steps."""
        if self.generator == "depthwise":
            return ge_retanh(self.gate(x, mask, input_masked=True)[0], self.tau).masked_fill_(~mask, 0.0)
        taps = shift_taps(x, self.kernel_size) if taps is None else taps
        # taps at an invalid step hold its valid neighbours: MaskedConv1d zeroes them, as beyond the ends
        kernel = self.kernel_norm(self.kernel(taps, mask)[0])  # [B, C_in, T]
        gate = ge_retanh(self.gate(taps, mask)[0], self.tau)  # [B, 1, T]
        return (kernel * gate).masked_fill_(~mask, 0.0)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        check_inputs(x, mask, 1, "DynamicAggregation")
        B, C, T = x.shape
        x = x.masked_fill(~mask, 0.0)
        taps = shift_taps(x, self.kernel_size)  # [B, C * K, T]
        m = self.weighted_mask(x, mask, taps)  # [B, C, T]
        y = self.pointwise((taps.view(B, C, self.kernel_size, T) * m[:, :, None]).view(B, C * self.kernel_size, T))
        return self.norm(y).masked_fill_(~mask, 0.0)


class DynamicAggregationBlock(nn.Module):
    """DyFADet's encoder layer (DynE): an instance-level branch and a DFA, then an FFN.

    ``forward(x [B, C, T], mask [B, 1, T]) -> ([B, C, T / stride], [B, 1, T / stride])``.

    With ``x`` first max-pooled (kernel 3, masked) when ``stride=2`` and ``z = LN(x)``::

        phi = ReLU(FC_g(mean_t z))                             # one weight per video and channel
        M   = ReLU(DWConv_w(z) + DWConv_kw(z))                 # DFA's mask, per step and channel
        y   = FC(z) * phi + DWConv'_w(z) * M + z               # DWConv'_w(z) * M = sum_s K_s (M ⊙ z_hat(s))
        x   = x + DropPath(y)
        out = x + DropPath(MLP(GN(x)))

    ``FC``, ``FC_g`` are per-channel 1x1 convolutions, ``DWConv_w``, ``DWConv'_w`` depthwise of
    kernel ``w = kernel_size`` and ``DWConv_kw`` depthwise of ``sgp_wide_kernel(w, k)``; as the
    mask is the same for the ``w`` taps of a channel, multiplying it after the depthwise kernel
    ``DWConv'_w`` equals the DFA. ``mean_t`` counts valid steps only; ``GN`` is a group norm
    (``groups``) over valid steps; the MLP is ``C -> mlp_ratio * C -> C`` with GELU. Parameters:
    ``C (2w + kw + 12) + 2 C H + H`` for ``H = round(mlp_ratio * C)`` (800,000 at DyFADet's THUMOS14
    setting C = 512, w = 1, k = 5, H = 768; the released layer adds 2C LayerScale weights).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        k: float = 1.5,
        groups: int = 16,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_odd("DynamicAggregationBlock kernel_size", kernel_size)
        check_stride("DynamicAggregationBlock", stride)
        if not k > 0:
            raise ValueError(f"DynamicAggregationBlock k (window expansion) must be > 0, got {k} (DyFADet on THUMOS14: 5)")
        self.stride = stride
        self.norm = LayerNormC(channels)
        self.kernel = MaskedConv1d(channels, channels, kernel_size, groups=channels)
        self.mask_w = MaskedConv1d(channels, channels, kernel_size, groups=channels)
        self.mask_kw = MaskedConv1d(channels, channels, sgp_wide_kernel(kernel_size, k), groups=channels)
        self.fc = nn.Conv1d(channels, channels, 1, groups=channels)
        self.global_fc = nn.Conv1d(channels, channels, 1, groups=channels)
        self.ffn_norm = MaskedGroupNorm(groups, channels)
        self.mlp = MLP(channels, mlp_ratio, dropout)
        self.drop_path1, self.drop_path2 = DropPath(drop_path), DropPath(drop_path)

    def weighted_mask(self, z: Tensor, mask: Tensor) -> Tensor:
        """DFA's mask ``M = ReLU(DWConv_w(z) + DWConv_kw(z))``: ``z [B, C, T]`` -> ``[B, C, T]`` (0 at invalid steps)."""
        return torch.relu(self.mask_w(z, mask)[0] + self.mask_kw(z, mask)[0])

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        check_inputs(x, mask, self.stride, "DynamicAggregationBlock")
        if self.stride > 1:
            x, mask = masked_max_pool(x, mask, 3, self.stride)
        else:
            x = x.masked_fill(~mask, 0.0)
        z = self.norm(x)
        phi = torch.relu(conv1d(self.global_fc, masked_mean(z, mask)))  # [B, C, 1]
        dfa = self.kernel(z, mask)[0] * self.weighted_mask(z, mask)
        y = (conv1d(self.fc, z) * phi + dfa + z).masked_fill(~mask, 0.0)
        x = x + self.drop_path1(y)
        h = self.mlp(self.ffn_norm(x, mask)).masked_fill(~mask, 0.0)
        return x + self.drop_path2(h), mask


def resize_level(x: Tensor, length: int) -> Tensor:
    """Nearest-neighbour resize between adjacent pyramid levels: ``[B, C, 2 T_l]`` or ``[B, C, T_l / 2]`` -> ``[B, C, T_l]``.

    Index ``floor(t * T_src / T_l)``, as ``F.interpolate(mode="nearest")``; done by slicing so that
    it is exact and the same whatever padding the batch has.
    """
    if x.shape[-1] == 2 * length:
        return x[..., ::2]
    torch._assert(2 * x.shape[-1] == length, f"adjacent pyramid levels must differ by a factor 2, got {x.shape[-1]} and {length} steps")
    return x.repeat_interleave(2, dim=-1)


class DynamicConvTower(nn.Module):
    """DyFADet's dynamic head tower (DyHead), a drop-in for ``tal_models.heads.ConvTower``.

    ``forward(x [B, in_dim, T], mask [B, 1, T]) -> [B, out_dim, T]`` (zero at invalid steps):
    ``num_layers - 1`` layers ``ReLU(DynamicAggregation(x, generator="conv"))`` of ``feat_dim``
    channels, then ``self.out``, a plain ``MaskedConv1d(feat_dim, out_dim, kernel_size)`` (so a
    classification head sets its prior on ``self.out.conv.bias``). Shared by all levels, as the
    released head is.

    ``cross_scale=True`` adds DyHead's multi-scale fusion (``DynamicScale_chk``): before each layer,
    level ``l`` becomes ``x_l * a + b * (D_f(x_{l-1})[::2] + D_c(x_{l+1}) repeated x2)``, with
    ``D_f``, ``D_c`` two ``"depthwise"`` DFAs per layer (one for the finer, one for the coarser
    neighbour) and scalars ``a`` (initialised to 1) and ``b`` (to 0) per layer. It needs all levels:
    call ``forward_levels(feats, masks)``; ``forward`` on one level is the one-level pyramid.

    Parameters per layer for ``C = in_dim = feat_dim``, ``K = kernel_size``: ``C^2 K (K + 1) + C K^2 + 6 C + 1``
    (pointwise ``C K -> C``, the kernel generator ``Conv_K: C K -> C``, two LNs, the gate), and with
    ``cross_scale`` ``2 (C^2 K + C K + 4 C) + 2`` more: 3,153,409 and 4,733,443 at C = 512, K = 3.
    """

    def __init__(
        self,
        in_dim: int,
        feat_dim: int,
        out_dim: int,
        num_layers: int,
        kernel_size: int,
        with_ln: bool = True,
        out_bias: bool = True,
        cross_scale: bool = False,
        tau: float = 1.5,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DynamicConvTower num_layers must be >= 1 (the output conv counts), got {num_layers}")
        dims = [in_dim] + [feat_dim] * (num_layers - 1)
        self.cross_scale = cross_scale
        self.hidden = nn.ModuleList(DynamicAggregation(a, b, kernel_size, "conv", tau, with_ln) for a, b in zip(dims[:-1], dims[1:]))
        if cross_scale:
            self.from_finer = nn.ModuleList(DynamicAggregation(a, a, kernel_size, "depthwise", tau) for a in dims[:-1])
            self.from_coarser = nn.ModuleList(DynamicAggregation(a, a, kernel_size, "depthwise", tau) for a in dims[:-1])
            self.level_weight = nn.Parameter(torch.ones(num_layers - 1))
            self.neighbour_weight = nn.Parameter(torch.zeros(num_layers - 1))
        self.out = MaskedConv1d(dims[-1], out_dim, kernel_size, bias=out_bias)

    def _fuse(self, i: int, feats: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        """DyHead's multi-scale fusion before layer ``i``: each level plus its adjacent levels, masked."""
        finer = [self.from_finer[i](x, m) for x, m in zip(feats[:-1], masks[:-1])]  # finer[l] feeds level l + 1
        coarser = [self.from_coarser[i](x, m) for x, m in zip(feats[1:], masks[1:])]  # coarser[l] feeds level l
        fused = []
        for level, (x, m) in enumerate(zip(feats, masks)):
            neighbours = torch.zeros_like(x)
            if level > 0:
                neighbours = neighbours + resize_level(finer[level - 1], x.shape[-1])
            if level < len(feats) - 1:
                neighbours = neighbours + resize_level(coarser[level], x.shape[-1])
            fused.append((x * self.level_weight[i] + neighbours * self.neighbour_weight[i]).masked_fill(~m, 0.0))
        return fused

    def forward_levels(self, feats: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        """``L`` x ``[B, in_dim, T_l]`` (``T_l = T_0 / 2^l``), masks ``L`` x ``[B, 1, T_l]`` -> ``L`` x ``[B, out_dim, T_l]``."""
        torch._assert(len(feats) == len(masks), f"{len(feats)} levels of features, {len(masks)} of masks")
        feats = [x.masked_fill(~m, 0.0) for x, m in zip(feats, masks)]
        for i, layer in enumerate(self.hidden):
            if self.cross_scale:
                feats = self._fuse(i, feats, masks)
            feats = [layer(x, m).relu_() for x, m in zip(feats, masks)]
        return [self.out(x, m, input_masked=True)[0] for x, m in zip(feats, masks)]

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.forward_levels([x], [mask])[0]
