"""Building blocks of multi-scale one-stage temporal action detectors, masked for padded batches.

Legend: B batch, C channels, T steps, T_l steps at pyramid level l, H heads, d = C / H channels
per head, W attention window (steps, odd).

Conventions shared by every block:
- features are ``[B, C, T]``, masks are bool ``[B, 1, T]`` (True = a valid step); a block takes
  ``(x, mask)`` and returns ``(x, mask)``; outputs at invalid steps are exactly zero;
- what a block reads at an invalid step is ignored: convolutions read zeros there (as beyond the
  ends of the sequence), max-pooling reads ``-inf``, attention gives padded keys zero weight, and
  per-video statistics (SGP's mean, the group norm) count valid steps only. So appending padding,
  whatever it holds, changes no output at a valid step;
- a stride-2 block needs ``T`` even and returns ``T / 2`` steps; output step ``i`` is centred on
  input step ``2i`` and is valid iff input step ``2i`` is (nearest-neighbour downsampling of the
  mask, as ActionFormer). For the masks a padded batch makes (a valid prefix of ``n`` steps) the
  output prefix is ``ceil(n / 2)``, as max-pooling each pair of steps ``2i, 2i + 1`` of the mask
  would give. ``PyramidEncoder``
  needs ``T`` divisible by ``2**(levels - 1)``: the detector pads ``T`` to such a multiple (local
  attention puts no further condition on ``T``; its windows are unfolded, not chunked).

Differences from the papers' code, all for masking: ActionFormer's and TriDet's skip-path and
downsampling max-pools see padded steps as zeros (here ``-inf``), TriDet's global average and
GroupNorm count padded steps (here only valid ones), and TriDet's SGP output is not re-masked.
Not included: ActionFormer's absolute/relative position embeddings and LayerScale (AffineDropPath).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EncoderKind = Literal["transformer", "sgp", "maxpool", "conv"]
NeckKind = Literal["identity", "fpn"]
_ENCODER_KINDS = ("transformer", "sgp", "maxpool", "conv")
_NECK_KINDS = ("identity", "fpn")


# --- small helpers ---------------------------------------------------------------------------
def _check_odd(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be an odd positive int ('same' padding needs a centre step), got {value!r}")


def _check_stride(name: str, stride: int, allowed: tuple[int, ...] = (1, 2)) -> None:
    if stride not in allowed:
        raise ValueError(f"{name} stride must be one of {allowed}, got {stride!r}")


def _check_inputs(x: Tensor, mask: Tensor, stride: int, who: str) -> None:
    torch._assert(x.ndim == 3, f"{who}: x must be [B, C, T], got {tuple(x.shape)}")
    torch._assert(
        mask.dtype == torch.bool and mask.shape == (x.shape[0], 1, x.shape[2]),
        f"{who}: mask must be bool [B, 1, T] = [{x.shape[0]}, 1, {x.shape[2]}], got {mask.dtype} {tuple(mask.shape)}",
    )
    torch._assert(
        x.shape[2] % stride == 0,
        f"{who}: T = {x.shape[2]} is not divisible by the stride {stride}; pad the batch to a multiple of {stride}",
    )


def downsample_mask(mask: Tensor, stride: int) -> Tensor:
    """``[B, 1, T]`` -> ``[B, 1, T / stride]``: output step ``i`` is valid iff input step ``i * stride`` is."""
    return mask if stride == 1 else mask[..., ::stride]


def masked_max_pool(x: Tensor, mask: Tensor, kernel_size: int = 3, stride: int = 2) -> tuple[Tensor, Tensor]:
    """Max over ``kernel_size`` steps centred on every ``stride``-th step; padded steps never win.

    ``x [B, C, T]``, ``mask [B, 1, T]`` -> ``[B, C, T / stride]``, ``[B, 1, T / stride]``. Padded
    steps are read as ``-inf`` (as the ends of the sequence are), so a valid output, whose centre
    is valid, is a max over valid steps only.
    """
    out_mask = downsample_mask(mask, stride)
    out = F.max_pool1d(x.masked_fill(~mask, -math.inf), kernel_size, stride, padding=kernel_size // 2)
    return out.masked_fill(~out_mask, 0.0), out_mask


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``[B, C, T]`` -> ``[B, C, 1]``: mean over each video's valid steps (0 for a video with none)."""
    total = x.masked_fill(~mask, 0.0).sum(dim=-1, keepdim=True)
    return total / mask.sum(dim=-1, keepdim=True).clamp(min=1)


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


# --- convolution and normalisation -----------------------------------------------------------
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
        _check_odd("MaskedConv1d kernel_size", kernel_size)
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
        _check_inputs(x, mask, self.stride, "MaskedConv1d")
        out_mask = downsample_mask(mask, self.stride)
        if not input_masked:
            x = x.masked_fill(~mask, 0.0)  # masked_fill, not a product: padding may hold inf/NaN
        out = conv1d(self.conv, x)
        return out.masked_fill_(~out_mask, 0.0), out_mask  # in place: no backward needs the conv's output


def _normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``[B, C, T]`` -> the input normalised over ``C`` at every step, and ``1 / std`` ``[B, 1, T]``.
    (Two plain reductions: ``torch.var_mean`` over the strided channel axis is ~7x slower on CPU.)"""
    centred = x - x.mean(dim=1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(dim=1, keepdim=True) + eps)
    return centred.mul_(rstd), rstd


class _ChannelLayerNorm(torch.autograd.Function):
    """Layer norm over dim 1 of ``[B, C, T]``, computed in that layout: no transposed copies
    around ``F.layer_norm`` (which wants ``C`` last), a contiguous output for the next
    convolution, and only the normalised input and ``1 / std`` kept for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        x_hat, rstd = _normalize(x, eps)
        ctx.save_for_backward(x_hat, rstd, weight)
        return torch.addcmul(bias[:, None], x_hat, weight[:, None])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x_hat, rstd, weight = ctx.saved_tensors
        g = grad_out * weight[:, None]
        # d/dx of (x - mean) / std for each step: rstd * (g - mean(g) - x_hat * mean(g * x_hat))
        grad_x = (g - g.mean(dim=1, keepdim=True) - x_hat * (g * x_hat).mean(dim=1, keepdim=True)).mul_(rstd)
        return grad_x, (grad_out * x_hat).sum(dim=(0, 2)), grad_out.sum(dim=(0, 2)), None


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
        return _ChannelLayerNorm.apply(x, self.weight, self.bias, self.eps)


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution ``[B, I, T] -> [B, O, T]`` (oneDNN's kernel: faster than a broadcast matmul here)."""
    return F.conv1d(x, weight, bias)


def _pointwise_grads(grad_out: Tensor, x: Tensor, weight: Tensor, needs: tuple[bool, bool, bool]):
    """Gradients of ``_pointwise`` w.r.t. (x, weight, bias), by the convolution's own backward kernel."""
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, [weight.shape[0]], [1], [0], [1], False, [0], 1, list(needs)
    )


def _layer_norm_backward(grad_n: Tensor, x_hat: Tensor, rstd: Tensor, weight: Tensor):
    g = grad_n * weight[:, None]
    grad_x = (g - g.mean(dim=1, keepdim=True) - x_hat * (g * x_hat).mean(dim=1, keepdim=True)).mul_(rstd)
    return grad_x, (grad_n * x_hat).sum(dim=(0, 2)), grad_n.sum(dim=(0, 2))


class _NormPointwise(torch.autograd.Function):
    """``conv1x1(LN(x))`` keeping only the normalised input for backward (``LN(x)`` is recomputed
    from it: one multiply-add), instead of both the normalised input and ``LN(x)``."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, weight, bias):
        x_hat, rstd = _normalize(x, eps)
        ctx.save_for_backward(x_hat, rstd, ln_weight, ln_bias, weight)
        ctx.has_bias = bias is not None
        return _pointwise(torch.addcmul(ln_bias[:, None], x_hat, ln_weight[:, None]), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, rstd, ln_weight, ln_bias, weight = ctx.saved_tensors
        n = torch.addcmul(ln_bias[:, None], x_hat, ln_weight[:, None])
        grad_n, grad_w, grad_b = _pointwise_grads(grad_out, n, weight, (True, ctx.needs_input_grad[4], ctx.has_bias))
        grad_x, grad_lw, grad_lb = _layer_norm_backward(grad_n, x_hat, rstd, ln_weight)
        return grad_x, grad_lw, grad_lb, None, grad_w, grad_b


class _NormMLP(torch.autograd.Function):
    """``fc2(gelu(fc1(LN(x))))`` keeping only the normalised input for backward and recomputing
    the rest there. The MLP's activations are its widest (``4C`` for ActionFormer): keeping one
    ``C``-wide tensor instead of ``C + C + 4C + 4C`` cuts the encoder's training memory by a
    quarter, for one more ``fc1`` product in backward."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, w1, b1, w2, b2):
        x_hat, rstd = _normalize(x, eps)
        ctx.save_for_backward(x_hat, rstd, ln_weight, ln_bias, w1, b1, w2)
        n = torch.addcmul(ln_bias[:, None], x_hat, ln_weight[:, None])
        return _pointwise(F.gelu(_pointwise(n, w1, b1)), w2, b2)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, rstd, ln_weight, ln_bias, w1, b1, w2 = ctx.saved_tensors
        n = torch.addcmul(ln_bias[:, None], x_hat, ln_weight[:, None])
        h = _pointwise(n, w1, b1)
        grad_a, grad_w2, grad_b2 = _pointwise_grads(grad_out, F.gelu(h), w2, (True, True, True))
        grad_h = torch.ops.aten.gelu_backward(grad_a, h)
        del h, grad_a
        grad_n, grad_w1, grad_b1 = _pointwise_grads(grad_h, n, w1, (True, True, True))
        grad_x, grad_lw, grad_lb = _layer_norm_backward(grad_n, x_hat, rstd, ln_weight)
        return grad_x, grad_lw, grad_lb, None, grad_w1, grad_b1, grad_w2, grad_b2


def norm_pointwise(norm: LayerNormC, conv: nn.Conv1d, x: Tensor) -> Tensor:
    """``conv(norm(x))`` for a 1x1 ``conv``, memory-lean in training (``_NormPointwise``)."""
    return _NormPointwise.apply(x, norm.weight, norm.bias, norm.eps, conv.weight, conv.bias)


def norm_mlp(norm: LayerNormC, mlp: MLP, x: Tensor) -> Tensor:
    """``mlp(norm(x))``, memory-lean in training (``_NormMLP``; with dropout, the plain modules)."""
    if mlp.training and mlp.dropout > 0:
        return mlp(norm(x))
    return _NormMLP.apply(x, norm.weight, norm.bias, norm.eps, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)


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


# --- attention ------------------------------------------------------------------------------
# Queries per block of the banded attention: each block of c queries multiplies against its
# c + W - 1 keys in one matmul, so (c + W - 1) / W times the FLOPs of the band itself are spent
# for BLAS-sized products. Measured on CPU at T = 2304, W = 19, d = 128: c = 32 is 11x faster
# than gathering each query's W keys (einsum over unfolded windows), forward and backward.
ATTENTION_BLOCK = 32


def local_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, window: int, dropout: float = 0.0, training: bool = False):
    """Scaled dot-product attention of each query to the keys within ``+-window // 2`` steps.

    Args:
        q, k, v: ``[B, H, T, d]``.
        key_mask: bool ``[B, T]``; False keys (and those beyond the ends) get zero weight.
        window: odd ``W``.

    Returns:
        ``out [B, H, T, d]`` and the attention weights ``[B, H, T, W]`` (before dropout); weight
        ``[b, h, t, j]`` is for key ``t + j - W // 2``. Cost and memory are linear in ``T``: the
        queries are cut into blocks of ``c = ATTENTION_BLOCK``, and each block attends to its
        ``c + W - 1`` surrounding keys through one ``[c, c + W - 1]`` score matrix whose entries
        outside the band are masked, never a ``T x T`` matrix. A query without any valid key (only
        possible at an invalid step) gets uniform weights over its window, not NaN, so gradients
        stay finite; its output is the caller's to mask.
    """
    B, H, T, d = q.shape
    half, c = window // 2, min(ATTENTION_BLOCK, T)
    n = -(-T // c)  # blocks
    tail = n * c - T
    span = c + 2 * half  # keys seen by a block
    q_blocks = F.pad(q, (0, 0, 0, tail)).view(B, H, n, c, d)  # [B, H, n, c, d]
    k_blocks = F.pad(k, (0, 0, half, half + tail)).unfold(2, span, c).transpose(-1, -2)  # [B, H, n, span, d]
    v_blocks = F.pad(v, (0, 0, half, half + tail)).unfold(2, span, c).transpose(-1, -2)  # [B, H, n, span, d]
    key_valid = F.pad(key_mask, (half, half + tail), value=False).unfold(1, span, c)  # [B, n, span]
    rows = torch.arange(c, device=q.device)[:, None]
    cols = torch.arange(span, device=q.device)[None, :]
    band = (cols >= rows) & (cols <= rows + 2 * half)  # [c, span]: query i of a block sees keys i .. i + W - 1
    allowed = band & key_valid[:, :, None, :]  # [B, n, c, span]
    scores = (q_blocks * d**-0.5) @ k_blocks.transpose(-1, -2)  # [B, H, n, c, span]
    # The lowest finite value, not -inf: exp() of it is exactly 0 beside any valid key, and a row
    # with no valid key becomes uniform (over the whole block span) instead of NaN.
    block_weights = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min).softmax(dim=-1)
    out = F.dropout(block_weights, dropout, training) @ v_blocks  # [B, H, n, c, d]
    out = out.reshape(B, H, n * c, d)[:, :, :T]
    # the band of each row, as [B, H, T, W]: query i of a block, key i + j
    index = (rows + torch.arange(window, device=q.device)[None, :]).expand(B, H, n, c, window)
    weights = block_weights.gather(-1, index).reshape(B, H, n * c, window)[:, :, :T]
    return out, weights


def full_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, dropout: float = 0.0, training: bool = False):
    """``local_attention`` with an unbounded window: ``[B, H, T, d]`` -> ``out [B, H, T, d]``, weights ``[B, H, T, T]``.

    Quadratic in ``T``: for the coarse pyramid levels, or ``window = -1``.
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(2, 3)  # [B, H, T, T]
    weights = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min).softmax(dim=-1)
    return F.dropout(weights, dropout, training) @ v, weights


class LocalMultiHeadAttention(nn.Module):
    """Multi-head self-attention over a local window (ActionFormer's local masked MHCA).

    ``forward(x [B, C, T], mask [B, 1, T]) -> ([B, C, T / stride], [B, 1, T / stride])``.

    Queries, keys and values each come from a depthwise 3-step masked convolution, a layer norm
    and a 1x1 projection. With ``stride=2`` all three convolutions are strided (kernel 3, centred
    on the even steps), so attention runs entirely at the output resolution: query ``i`` (input
    step ``2i``) attends to the downsampled keys ``i - W//2 .. i + W//2``, centred on input steps
    ``2i - 2 * (W//2) .. 2i + 2 * (W//2)``: ``window`` counts output steps. ``window=-1`` attends to the
    whole sequence (quadratic). ``dropout`` applies to the attention weights and the output.
    """

    def __init__(self, channels: int, heads: int, window: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        if heads < 1 or channels % heads != 0:
            raise ValueError(f"LocalMultiHeadAttention: channels ({channels}) must be divisible by heads ({heads})")
        if window != -1:
            _check_odd("LocalMultiHeadAttention window (or -1 for full attention)", window)
        _check_stride("LocalMultiHeadAttention", stride)
        self.heads, self.window, self.stride, self.dropout = heads, window, stride, dropout

        def branch() -> nn.ModuleDict:
            return nn.ModuleDict({
                "conv": MaskedConv1d(channels, channels, 3, stride, groups=channels, bias=False),
                "norm": LayerNormC(channels),
                "proj": nn.Conv1d(channels, channels, 1),
            })  # fmt: skip

        self.query, self.key, self.value = branch(), branch(), branch()
        self.out_proj = nn.Conv1d(channels, channels, 1)
        self.out_drop = nn.Dropout(dropout)

    def _heads(self, branch: nn.ModuleDict, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        y, out_mask = branch["conv"](x, mask, input_masked=True)
        y = norm_pointwise(branch["norm"], branch["proj"], y)  # [B, C, T']
        B, C, T = y.shape
        return y.view(B, self.heads, C // self.heads, T).transpose(2, 3), out_mask  # [B, C, T'] -> [B, H, T', d]

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        _check_inputs(x, mask, self.stride, "LocalMultiHeadAttention")
        x = x.masked_fill(~mask, 0.0)  # once for the three branches (each would keep its own copy for backward)
        q, out_mask = self._heads(self.query, x, mask)
        k, _ = self._heads(self.key, x, mask)  # keys and values share the queries' stride, hence their mask
        v, _ = self._heads(self.value, x, mask)
        key_mask = out_mask[:, 0]  # [B, T']
        drop = self.dropout if self.training else 0.0
        if self.window == -1:
            out, _ = full_attention(q, k, v, key_mask, drop, self.training)
        else:
            out, _ = local_attention(q, k, v, key_mask, self.window, drop, self.training)
        B, H, T, d = out.shape
        out = out.transpose(2, 3).reshape(B, H * d, T)  # [B, H, T', d] -> [B, C, T']
        return self.out_drop(self.out_proj(out)).masked_fill(~out_mask, 0.0), out_mask


# --- blocks ---------------------------------------------------------------------------------
def _skip(x: Tensor, mask: Tensor, stride: int) -> Tensor:
    """The residual path: identity, or a masked max-pool (kernel 3) at stride 2 -> ``[B, C, T / stride]``."""
    return x.masked_fill(~mask, 0.0) if stride == 1 else masked_max_pool(x, mask, 3, stride)[0]


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``+ MLP(LN(.))`` (ActionFormer).

    ``forward(x [B, C, T], mask [B, 1, T]) -> ([B, C, T / stride], [B, 1, T / stride])``. At
    stride 2 the attention downsamples (see ``LocalMultiHeadAttention``) and the residual path
    is a masked max-pool (kernel 3). The MLP is two 1x1 convolutions, ``C -> mlp_ratio * C -> C``.
    """

    def __init__(
        self, channels: int, heads: int, window: int, stride: int = 1, mlp_ratio: float = 4.0, dropout: float = 0.0, drop_path: float = 0.0
    ):
        super().__init__()
        self.stride = stride
        self.norm1 = LayerNormC(channels)
        self.attn = LocalMultiHeadAttention(channels, heads, window, stride, dropout)
        self.norm2 = LayerNormC(channels)
        self.mlp = MLP(channels, mlp_ratio, dropout)
        self.drop_path1, self.drop_path2 = DropPath(drop_path), DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h, out_mask = self.attn(self.norm1(x), mask)
        x = _skip(x, mask, self.stride) + self.drop_path1(h)
        h = norm_mlp(self.norm2, self.mlp, x).masked_fill(~out_mask, 0.0)
        return x + self.drop_path2(h), out_mask


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
        _check_odd("SGPBlock kernel_size", kernel_size)
        _check_stride("SGPBlock", stride)
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
        _check_inputs(x, mask, self.stride, "SGPBlock")
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


class MaxPoolBlock(nn.Module):
    """TemporalMaxer's block: a masked max-pool, no parameters.

    ``forward(x [B, C, T], mask [B, 1, T]) -> ([B, C, T / stride], [B, 1, T / stride])``; see
    ``masked_max_pool``. ``channels`` is unused, for a constructor like the other blocks'.
    """

    def __init__(self, channels: int | None = None, stride: int = 2, kernel_size: int = 3):
        super().__init__()
        _check_odd("MaxPoolBlock kernel_size", kernel_size)
        _check_stride("MaxPoolBlock", stride)
        self.stride, self.kernel_size = stride, kernel_size

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        _check_inputs(x, mask, self.stride, "MaxPoolBlock")
        return masked_max_pool(x, mask, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


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
        _check_stride("DilatedTCNBlock", stride)
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
        out = torch.relu(_skip(x, mask, self.stride) + self.drop_path(self.norm2(h)))
        return out.masked_fill(~out_mask, 0.0), out_mask


# --- the pyramid encoder --------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderConfig:
    """A multi-scale encoder: projection -> stride-1 stem -> one stride-2 block per further level.

    ``kind`` picks the blocks: ``transformer`` (ActionFormer), ``sgp`` (TriDet), ``maxpool``
    (TemporalMaxer), ``conv`` (dilated TCN blocks; the stem's dilations are 1, 2, 4, ...).
    ``window`` (transformer only) is per level, or one value for all; -1 = full attention; the
    stem uses level 0's. ``kernel_size`` is SGP's ``w``, the TCN's kernel, or the max-pool's.
    A ``maxpool`` stem, when ``stem_layers`` asks for one, is made of stride-1 max filters.
    """

    kind: EncoderKind = "transformer"
    input_dim: int = 2048
    embed_dim: int = 512
    embed_kernel: int = 3
    embed_layers: int = 2  # masked conv + LN + ReLU layers of the projection (2 in all three papers)
    stem_layers: int | None = None  # stride-1 blocks; None: 2, or 0 for maxpool (TemporalMaxer has none)
    levels: int = 6  # pyramid outputs: level 0 at stride 1, level l at stride 2**l
    heads: int = 4
    window: int | tuple[int, ...] = 19
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    drop_path: float = 0.1
    sgp_k: float = 1.5
    sgp_groups: int = 16  # group norm of SGP's FFN
    kernel_size: int = 3

    def __post_init__(self) -> None:
        if self.kind not in _ENCODER_KINDS:
            raise ValueError(f"EncoderConfig.kind must be one of {_ENCODER_KINDS}, got {self.kind!r}")
        for name in ("input_dim", "embed_dim", "levels", "embed_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EncoderConfig.{name} must be a positive int, got {value!r}")
        if self.stem_layers is not None and (not isinstance(self.stem_layers, int) or self.stem_layers < 0):
            raise ValueError(f"EncoderConfig.stem_layers must be an int >= 0 or None (the kind's default), got {self.stem_layers!r}")
        _check_odd("EncoderConfig.embed_kernel", self.embed_kernel)
        _check_odd("EncoderConfig.kernel_size", self.kernel_size)
        if isinstance(self.window, list):  # YAML gives lists
            object.__setattr__(self, "window", tuple(self.window))
        windows = self.window if isinstance(self.window, tuple) else (self.window,) * self.levels
        if len(windows) != self.levels:
            raise ValueError(
                f"EncoderConfig.window has {len(windows)} values for {self.levels} levels: give one per level, or a single int"
            )
        for w in windows:
            if w != -1:
                _check_odd("EncoderConfig.window (or -1 for full attention)", w)
        if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            raise ValueError(f"EncoderConfig.mlp_ratio must be > 0, got {self.mlp_ratio} (ActionFormer: 4, TriDet: 1.5)")
        for name in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"EncoderConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.kind == "transformer" and (self.heads < 1 or self.embed_dim % self.heads != 0):
            raise ValueError(f"EncoderConfig.embed_dim ({self.embed_dim}) must be divisible by heads ({self.heads}): change either")
        if self.kind == "sgp":
            if not self.sgp_k > 0:
                raise ValueError(f"EncoderConfig.sgp_k must be > 0, got {self.sgp_k} (TriDet: 1.5, 5 on THUMOS14)")
            if self.sgp_groups < 1 or self.embed_dim % self.sgp_groups != 0:
                raise ValueError(
                    f"EncoderConfig.embed_dim ({self.embed_dim}) must be divisible by sgp_groups ({self.sgp_groups}): change either"
                )

    def windows(self) -> tuple[int, ...]:
        """The attention window of every level, ``levels`` values."""
        return self.window if isinstance(self.window, tuple) else (self.window,) * self.levels

    def num_stem_layers(self) -> int:
        if self.stem_layers is not None:
            return self.stem_layers
        return 0 if self.kind == "maxpool" else 2

    @property
    def total_stride(self) -> int:
        """``T`` must be a multiple of this: ``2**(levels - 1)``."""
        return 2 ** (self.levels - 1)


def _make_block(cfg: EncoderConfig, level: int, stride: int, index: int) -> nn.Module:
    """The block of ``cfg.kind`` producing pyramid ``level`` (``index``: its position in the stem)."""
    C = cfg.embed_dim
    match cfg.kind:
        case "transformer":
            return TransformerBlock(C, cfg.heads, cfg.windows()[level], stride, cfg.mlp_ratio, cfg.dropout, cfg.drop_path)
        case "sgp":
            return SGPBlock(C, cfg.kernel_size, cfg.sgp_k, stride, cfg.mlp_ratio, cfg.dropout, cfg.drop_path, cfg.sgp_groups)
        case "maxpool":
            return MaxPoolBlock(C, stride, cfg.kernel_size)
        case "conv":
            dilation = 2**index if stride == 1 else 1
            return DilatedTCNBlock(C, cfg.kernel_size, dilation, stride, cfg.dropout, cfg.drop_path)
    raise ValueError(f"unknown encoder kind {cfg.kind!r}")


class PyramidEncoder(nn.Module):
    """Features -> a temporal feature pyramid.

    ``forward(x [B, input_dim, T], mask [B, 1, T])`` -> ``(feats, masks)``: ``levels`` tensors
    ``[B, embed_dim, T_l]`` and bool ``[B, 1, T_l]`` with ``T_l = T / 2**l``; zero at invalid
    steps. ``T`` must be a multiple of ``config.total_stride``.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        C = config.embed_dim
        dims = [config.input_dim] + [C] * config.embed_layers
        self.embed = nn.ModuleList(MaskedConv1d(a, b, config.embed_kernel) for a, b in zip(dims[:-1], dims[1:]))
        self.embed_norms = nn.ModuleList(LayerNormC(C) for _ in range(config.embed_layers))
        self.stem = nn.ModuleList(_make_block(config, 0, 1, i) for i in range(config.num_stem_layers()))
        self.branch = nn.ModuleList(_make_block(config, level, 2, 0) for level in range(1, config.levels))
        for m in self.modules():
            if isinstance(m, nn.Conv1d) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        cfg = self.config
        torch._assert(
            x.ndim == 3 and x.shape[1] == cfg.input_dim, f"PyramidEncoder: x must be [B, {cfg.input_dim}, T], got {tuple(x.shape)}"
        )
        torch._assert(
            x.shape[2] % cfg.total_stride == 0,
            f"PyramidEncoder: T = {x.shape[2]} must be a multiple of 2**(levels - 1) = {cfg.total_stride}; pad the batch",
        )
        _check_inputs(x, mask, 1, "PyramidEncoder")
        # The features may hold anything at padded steps; a padded batch from `collate` holds zeros
        # there, and then the first convolution keeps the caller's tensor instead of a masked copy.
        clean = bool(mask.all()) or (torch.is_grad_enabled() and not bool(((x != 0) & ~mask).any()))
        for i, (conv, norm) in enumerate(zip(self.embed, self.embed_norms)):
            x, mask = conv(x, mask, input_masked=clean or i > 0)
            x = norm(x).masked_fill_(~mask, 0.0).relu_()
        for block in self.stem:
            x, mask = block(x, mask)
        feats, masks = [x], [mask]
        for block in self.branch:
            x, mask = block(x, mask)  # [B, C, T_l] -> [B, C, T_l / 2]
            feats.append(x)
            masks.append(mask)
        return feats, masks


# --- the neck -------------------------------------------------------------------------------
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
        if self.kind not in _NECK_KINDS:
            raise ValueError(f"FPNConfig.kind must be one of {_NECK_KINDS}, got {self.kind!r}")
        for name in ("in_dim", "out_dim", "levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FPNConfig.{name} must be a positive int, got {value!r}")
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
