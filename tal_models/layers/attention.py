"""Local (banded) and full self-attention, masked, and ActionFormer's transformer block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.layers.conv import MLP, DropPath, MaskedConv1d
from tal_models.layers.masking import check_inputs, check_odd, check_stride, residual
from tal_models.layers.norm import LayerNormC, norm_mlp, norm_pointwise

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
            check_odd("LocalMultiHeadAttention window (or -1 for full attention)", window)
        check_stride("LocalMultiHeadAttention", stride)
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
        check_inputs(x, mask, self.stride, "LocalMultiHeadAttention")
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
        x = residual(x, mask, self.stride) + self.drop_path1(h)
        h = norm_mlp(self.norm2, self.mlp, x).masked_fill(~out_mask, 0.0)
        return x + self.drop_path2(h), out_mask
