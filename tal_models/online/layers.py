"""Causal temporal blocks that run both offline (a whole padded batch) and one step at a time.

Legend: B batch, C channels, T steps, H heads, d = C / H channels per head, W attention window
(steps; any W >= 1: query ``t`` sees keys ``t - W + 1 .. t``), k a convolution's kernel, E inner
channels of the Mamba mixer (``expand * C``), N its state size, R the rank of its step size.

Every block here is stride 1 and pre-norm residual, with one contract for both paths:

- ``forward(x [B, C, T], mask [B, 1, T]) -> [B, C, T]``: the output at ``t`` reads steps ``<= t``
  only; zero at invalid steps. The input must already be zero at invalid steps (``CausalPyramid``
  zeroes it once): with a valid prefix per video, nothing a valid step reads is padding, and the
  zeros keep NaN padding out of the arithmetic of the invalid steps.
- ``init_cache(batch_size, device, dtype) -> cache`` and ``step(x [B, C], cache) -> [B, C]``: one new
  step, equal to ``forward``'s output at that step when the steps so far were fed one by one (eval
  mode, grad off). A cache is fixed-size: ring buffers of the last ``(k - 1) * dilation + 1``
  inputs of a convolution (``ConvTail``), of the last ``W`` keys and values (``KVCache``), and
  Mamba's state ``h [B, E, N]``, so a step's work never depends on how many came before.

The step paths use ``F.linear`` / ``F.layer_norm`` on views of the modules' own weights (no copies,
nothing snapshotted: a cache stays valid if the weights change).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.layers.attention import ATTENTION_BLOCK
from tal_models.layers.conv import MLP, DropPath
from tal_models.layers.norm import LayerNormC, norm_mlp
from tal_models.layers.ssm import MambaBlock


def causal_window_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, window: int, dropout: float = 0.0, training: bool = False):
    """Attention of query ``t`` to keys ``t - W + 1 .. t`` (any ``W >= 1``), linear in ``T``.

    ``q, k, v [B, H, T, d]``, ``key_mask`` bool ``[B, T]`` (False keys get zero weight) -> ``[B, H, T, d]``.
    Blocked as ``tal_models.layers.attention.local_attention`` (``c = ATTENTION_BLOCK`` queries per
    ``[c, c + W - 1]`` score matrix), but with the ``W - 1`` extra keys all on the past side, so
    even windows work too (``local_attention`` and ``causal_local_attention`` need an odd ``W``).
    """
    B, H, T, d = q.shape
    c = min(ATTENTION_BLOCK, T)
    n = -(-T // c)  # blocks
    tail = n * c - T
    span = c + window - 1  # keys seen by a block: the W - 1 before it and its own c
    q_blocks = F.pad(q, (0, 0, 0, tail)).view(B, H, n, c, d)  # [B, H, n, c, d]
    k_blocks = F.pad(k, (0, 0, window - 1, tail)).unfold(2, span, c).transpose(-1, -2)  # [B, H, n, span, d]
    v_blocks = F.pad(v, (0, 0, window - 1, tail)).unfold(2, span, c).transpose(-1, -2)  # [B, H, n, span, d]
    key_valid = F.pad(key_mask, (window - 1, tail), value=False).unfold(1, span, c)  # [B, n, span]
    rows = torch.arange(c, device=q.device)[:, None]
    cols = torch.arange(span, device=q.device)[None, :]
    band = (cols >= rows) & (cols < rows + window)  # [c, span]: query i of a block, keys i .. i + W - 1 (the last is itself)
    allowed = band & key_valid[:, :, None, :]  # [B, n, c, span]
    scores = (q_blocks * d**-0.5) @ k_blocks.transpose(-1, -2)  # [B, H, n, c, span]
    # lowest finite value, not -inf: a row without a valid key (an invalid step) stays finite
    weights = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min).softmax(dim=-1)
    out = F.dropout(weights, dropout, training) @ v_blocks  # [B, H, n, c, d]
    return out.reshape(B, H, n * c, d)[:, :, :T]


# --- fixed-size caches ------------------------------------------------------------------------
class ConvTail:
    """The last ``span`` inputs ``[B, C]`` of a causal filter, as a doubled ring buffer ``[B, C, 2 * span]``.

    Each input is written twice (slots ``p`` and ``p + span``), so the last ``span`` inputs, oldest
    first, are always the contiguous slice ``p + 1 .. p + span``: no shifting, no allocation.
    ``fill`` is what the filter reads before the first step (0 for convolutions, ``-inf`` for max-pools).
    """

    def __init__(self, batch_size: int, channels: int, span: int, device=None, dtype=torch.float32, fill: float = 0.0):
        self.buffer = torch.full((batch_size, channels, 2 * span), fill, device=device, dtype=dtype)
        self.span, self.pos = span, 0

    def push(self, x: Tensor) -> Tensor:
        """Append ``x [B, C]``; returns the last ``span`` inputs ``[B, C, span]`` (a view, oldest first)."""
        p, span = self.pos, self.span
        self.buffer[:, :, p] = x
        self.buffer[:, :, p + span] = x
        self.pos = (p + 1) % span
        return self.buffer[:, :, p + 1 : p + 1 + span]

    def tensors(self) -> Iterator[Tensor]:
        yield self.buffer


class KVCache:
    """The keys and values of the last ``W`` steps, ``[B, H, W, d]`` each, in a ring (attention is order-free)."""

    def __init__(self, batch_size: int, heads: int, window: int, head_dim: int, device=None, dtype=torch.float32):
        self.keys = torch.zeros(batch_size, heads, window, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.window, self.filled, self.pos = window, 0, 0

    def push(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v [B, H, d]``; returns the cached keys and values ``[B, H, n, d]``, ``n = min(steps, W)``."""
        self.keys[:, :, self.pos] = k
        self.values[:, :, self.pos] = v
        self.pos = (self.pos + 1) % self.window
        self.filled = min(self.filled + 1, self.window)
        n = self.filled  # before the ring wraps, slots 0 .. n - 1 hold every step so far
        return self.keys[:, :, :n], self.values[:, :, :n]

    def tensors(self) -> Iterator[Tensor]:
        yield self.keys
        yield self.values


class MambaCache:
    """Mamba's step state: the tail of its depthwise convolution and the SSM state ``h [B, E, N]``."""

    def __init__(self, batch_size: int, inner: int, state_dim: int, conv_kernel: int, device=None, dtype=torch.float32):
        self.conv = ConvTail(batch_size, inner, conv_kernel, device, dtype)
        self.h = torch.zeros(batch_size, inner, state_dim, device=device, dtype=torch.promote_types(dtype, torch.float32))

    def tensors(self) -> Iterator[Tensor]:
        yield from self.conv.tensors()
        yield self.h


def step_layer_norm(norm: LayerNormC, x: Tensor) -> Tensor:
    """``LayerNormC`` on one step ``[B, C]`` (its channels last)."""
    return F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps)


def _pointwise(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """A 1x1 ``nn.Conv1d`` on one step ``[B, I]`` -> ``[B, O]`` (its weight ``[O, I, 1]`` viewed as ``[O, I]``)."""
    return F.linear(x, conv.weight[..., 0], conv.bias)


# --- convolution --------------------------------------------------------------------------------
class CausalConv1d(nn.Module):
    """A convolution padded on the left only: output ``t`` reads inputs ``t - (k - 1) * dilation .. t``.

    ``forward(x [B, I, T]) -> [B, O, T]`` (zeros before the start; the caller masks);
    ``step(x [B, I], tail: ConvTail) -> [B, O]``. The bias starts at zero (as ``MaskedConv1d``).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, dilation: int = 1):
        super().__init__()
        if kernel_size < 1 or dilation < 1:
            raise ValueError(f"CausalConv1d kernel_size and dilation must be >= 1, got {kernel_size}, {dilation}")
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size, dilation=dilation)
        nn.init.zeros_(self.conv.bias)
        self.span = (kernel_size - 1) * dilation + 1

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (self.span - 1, 0)))

    def init_cache(self, batch_size: int = 1, device=None, dtype=torch.float32) -> ConvTail:
        return ConvTail(batch_size, self.conv.in_channels, self.span, device, dtype)

    def step(self, x: Tensor, tail: ConvTail) -> Tensor:
        taps = tail.push(x)[:, :, :: self.conv.dilation[0]]  # [B, I, k], oldest first, as the kernel's taps
        out_ch, in_ch, k = self.conv.weight.shape
        return F.linear(taps.reshape(x.shape[0], in_ch * k), self.conv.weight.view(out_ch, in_ch * k), self.conv.bias)


class CausalConvBlock(nn.Module):
    """``x + DropPath(pw(ReLU(causal_conv(LN(x)))))``: a causal TCN block (kernel ``k``, ``dilation``)."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm = LayerNormC(channels)
        self.conv = CausalConv1d(channels, channels, kernel_size, dilation)
        self.pointwise = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.pointwise.bias)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.dropout(torch.relu(self.conv(self.norm(x))))
        return x + self.drop_path(self.pointwise(h).masked_fill(~mask, 0.0))

    def init_cache(self, batch_size: int = 1, device=None, dtype=torch.float32) -> ConvTail:
        return self.conv.init_cache(batch_size, device, dtype)

    def step(self, x: Tensor, cache: ConvTail) -> Tensor:
        return x + _pointwise(self.pointwise, torch.relu(self.conv.step(step_layer_norm(self.norm, x), cache)))


# --- attention ----------------------------------------------------------------------------------
class CausalTransformerBlock(nn.Module):
    """Pre-norm transformer block with causal local attention: ``x + attn(LN(x))``, then ``+ MLP(LN(.))``.

    Queries, keys and values are one 1x1 projection of ``LN(x)`` (``C -> 3C``; ActionFormer's
    depthwise 3-step convolutions before them are left out, so a step needs only the ``W`` cached
    keys and values); query ``t`` attends to keys ``t - W + 1 .. t``. ``dropout`` applies to the
    attention weights and inside the MLP.
    """

    def __init__(self, channels: int, heads: int, window: int, mlp_ratio: float = 4.0, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if heads < 1 or channels % heads != 0:
            raise ValueError(f"CausalTransformerBlock: channels ({channels}) must be divisible by heads ({heads})")
        if window < 1:
            raise ValueError(f"CausalTransformerBlock window must be >= 1, got {window}")
        self.heads, self.window, self.dropout = heads, window, dropout
        self.norm1 = LayerNormC(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.out_proj = nn.Conv1d(channels, channels, 1)
        self.norm2 = LayerNormC(channels)
        self.mlp = MLP(channels, mlp_ratio, dropout)
        self.drop_path1, self.drop_path2 = DropPath(drop_path), DropPath(drop_path)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, C, T = x.shape
        H = self.heads
        qkv = self.qkv(self.norm1(x)).view(B, 3, H, C // H, T).transpose(3, 4)  # [B, 3C, T] -> [B, 3, H, T, d]
        q, k, v = qkv.unbind(1)
        drop = self.dropout if self.training else 0.0
        out = causal_window_attention(q, k, v, mask[:, 0], self.window, drop, self.training)
        out = self.out_proj(out.transpose(2, 3).reshape(B, C, T))  # [B, H, T, d] -> [B, C, T]
        x = x + self.drop_path1(out.masked_fill(~mask, 0.0))
        return x + self.drop_path2(norm_mlp(self.norm2, self.mlp, x).masked_fill(~mask, 0.0))

    def init_cache(self, batch_size: int = 1, device=None, dtype=torch.float32) -> KVCache:
        C = self.out_proj.in_channels
        return KVCache(batch_size, self.heads, self.window, C // self.heads, device, dtype)

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        B, C = x.shape
        H = self.heads
        q, k, v = _pointwise(self.qkv, step_layer_norm(self.norm1, x)).view(B, 3, H, C // H).unbind(1)  # 3 x [B, H, d]
        keys, values = cache.push(k, v)  # [B, H, n, d]
        scores = (q[:, :, None] * (C // H) ** -0.5) @ keys.transpose(-1, -2)  # [B, H, 1, n]
        out = (scores.softmax(dim=-1) @ values).view(B, C)  # [B, H, 1, d] -> [B, C]
        x = x + _pointwise(self.out_proj, out)
        h = F.gelu(_pointwise(self.mlp.fc1, step_layer_norm(self.norm2, x)))
        return x + _pointwise(self.mlp.fc2, h)


# --- Mamba --------------------------------------------------------------------------------------
class CausalMamba(nn.Module):
    """The causal Mamba block of ``tal_models.layers.ssm`` (``MambaBlock(direction="causal")``, stride 1).

    ``x + DropPath(SelectiveSSM(LN(x)))``, one forward scan. ``step`` runs the same mixer on one
    step from its parameters: the depthwise convolution reads its ``conv_kernel`` tail, and the
    selective scan advances ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = C_t . h_t + D u_t``.
    """

    def __init__(self, channels: int, state_dim: int = 16, expand: int = 2, conv_kernel: int = 4, drop_path: float = 0.0):
        super().__init__()
        self.block = MambaBlock(channels, 1, "causal", state_dim, expand, conv_kernel, drop_path)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.block(x, mask)[0]

    def init_cache(self, batch_size: int = 1, device=None, dtype=torch.float32) -> MambaCache:
        core = self.block.mixer.core
        return MambaCache(batch_size, core.inner, core.state_dim, core.conv1d.kernel_size[0], device, dtype)

    def step(self, x: Tensor, cache: MambaCache) -> Tensor:
        mixer = self.block.mixer
        core = mixer.core
        E, N = core.inner, core.state_dim
        xs, z = F.linear(step_layer_norm(self.block.norm, x), mixer.in_proj.weight).split(E, dim=1)  # 2 x [B, E]
        taps = cache.conv.push(xs)  # [B, E, k]
        u = F.silu(torch.einsum("bek,ek->be", taps, core.conv1d.weight[:, 0]) + core.conv1d.bias)  # [B, E]
        dt, B_t, C_t = F.linear(u, core.x_proj.weight).split([core.dt_rank, N, N], dim=1)  # [B, R], [B, N], [B, N]
        delta = F.softplus(F.linear(dt, core.dt_proj.weight, core.dt_proj.bias))  # [B, E]
        h = cache.h
        h.mul_(torch.exp(delta[:, :, None] * -torch.exp(core.A_log.float())))  # [B, E, N]
        h.addcmul_((delta * u)[:, :, None], B_t[:, None, :])
        y = (h @ C_t[:, :, None])[..., 0] + core.D * u  # [B, E, N] @ [B, N, 1] -> [B, E]
        return x + F.linear((y * F.silu(z)).to(x.dtype), mixer.out_proj.weight)


def causal_max_pool(x: Tensor, kernel_size: int = 3) -> Tensor:
    """Stride-2 causal max-pool: ``[B, C, T]`` -> ``[B, C, T / 2]``, output ``j`` = max of inputs ``2j + 2 - k .. 2j + 1``.

    So output ``j`` is complete when input ``2j + 1`` arrives (kernel 3: inputs ``2j - 1, 2j, 2j + 1``;
    steps before the start are ``-inf``, never chosen). ``T`` even, ``kernel_size >= 2``.
    """
    return F.max_pool1d(F.pad(x, (kernel_size - 2, 0), value=-math.inf), kernel_size, 2)
