"""CausalTAD's hybrid causal block (Liu et al., arXiv 2407.17792): causal attention and causal Mamba, both ways.

Legend: B batch, C channels, T steps, E inner channels (``expand * C``), H heads, d = E / H
channels per head, W attention window (steps, odd), N state size.

The published THUMOS14 I3D configuration (OpenTAD ``configs/causaltad/thumos_i3d.py``, ave. mAP
69.75 over tIoU 0.3:0.1:0.7): 2048-d I3D features, two 3-step convolutions to C = 512, then 2
stride-1 and 5 stride-2 hybrid blocks (6 pyramid levels, strides 1 .. 32), each with ``expand=2``, ``conv_kernel=4``,
``state_dim=16``, 4 heads (d = 256), full causal attention (no window), drop path 0.3 (with
LayerScale, ``AffineDropPath``, init 1e-4) and no MLP. Input dropout 0.3 on the features.
ActionFormer's head, losses (focal + DIoU), centre sampling (radius 1.5) and regression ranges
unchanged; loss normaliser 250 (ActionFormer: 100). AdamW, lr 1e-4, weight decay 0.05, batch 2,
5 warm-up epochs and cosine decay over 50 epochs (ActionFormer: 35), EMA, gradient clipping at 1,
mixed precision. Training crops random 2304-step windows; testing slides 2304-step windows with
overlap 0.5. Soft-NMS (sigma 0.5, up to 2000 segments) with score voting at tIoU 0.7.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.layers.attention import local_attention
from tal_models.layers.conv import MLP, DropPath
from tal_models.layers.masking import check_inputs, check_odd, check_stride, masked_max_pool
from tal_models.layers.norm import LayerNormC
from tal_models.layers.ssm import MambaCore, causal_conv1d


def causal_local_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, window: int) -> Tensor:
    """Attention of query ``t`` to keys ``t - W + 1 .. t`` only (``window=-1``: to every key ``<= t``).

    ``q, k, v [B, H, T, d]``, ``key_mask`` bool ``[B, T]`` -> ``[B, H, T, d]``. A local window is
    ``local_attention`` (blocked, linear in ``T``) on keys delayed by ``W // 2`` steps: centred on
    query ``t`` they are the keys ``t - W + 1 .. t``. The full window builds ``[B, H, T, T]`` scores.
    """
    T = q.shape[2]
    if window == -1:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(2, 3)  # [B, H, T, T]
        past = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        allowed = past & key_mask[:, None, None, :]
        return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(dim=-1) @ v
    half = window // 2
    q = F.pad(q, (0, 0, 0, half))  # [B, H, T + W // 2, d]; the extra queries are dropped
    k, v = F.pad(k, (0, 0, half, 0)), F.pad(v, (0, 0, half, 0))  # key s moves to s + W // 2
    out, _ = local_attention(q, k, v, F.pad(key_mask, (half, 0), value=False), window)
    return out[:, :, :T]


class CausalMixer(nn.Module):
    """CausalTAD's mixer (``MixtureCausalBlock``): ``forward(x [B, C, T], mask [B, 1, T]) -> [B, C, T]``.

    ``in_proj`` (``C -> 8E``, no bias) gives each of two directions, the causal (past only) and the
    anti-causal (future only, the same computation on the time-flipped sequence), its own four
    ``E``-channel inputs: ``x, z`` of a Mamba branch and ``x', z'`` of an attention branch. Both
    directions share every other parameter (they run as one batch of the forward and the flipped
    sequences)::

        mamba     = MambaCore(x, z): a causal Mamba scan, times SiLU(z)
        q, k, v   = conv_3(x')                           # E -> 3E, groups E, kernel 3
        attention = causal attention(q, k, v) * SiLU(z')  # H heads over E channels
        out       = out_proj([mamba_fwd, attention_fwd, mamba_bwd, attention_bwd])   # 4E -> C, no bias

    CausalTAD's ``q, k, v`` convolution is centred (it reads step ``t + 1``); here it is causal
    (steps ``t - 2 .. t``), so each direction sees only its own side. CausalTAD attends to every
    earlier step (``window=-1``); a window ``W`` keeps cost and memory linear in ``T``.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        window: int,
        expand: float = 2,
        state_dim: int = 16,
        conv_kernel: int = 4,
        dt_rank: int | str = "auto",
    ):
        super().__init__()
        E = int(expand * channels)
        if heads < 1 or E % heads != 0:
            raise ValueError(f"CausalMixer: inner channels expand * C = {E} must be divisible by heads ({heads})")
        if window != -1:
            check_odd("CausalMixer window (or -1 for every earlier step)", window)
        self.inner, self.heads, self.window = E, heads, window
        self.in_proj = nn.Linear(channels, 8 * E, bias=False)
        self.core = MambaCore(E, state_dim, conv_kernel, math.ceil(channels / 16) if dt_rank == "auto" else int(dt_rank))
        self.qkv = nn.Conv1d(E, 3 * E, 3, groups=E)
        nn.init.zeros_(self.qkv.bias)
        self.out_proj = nn.Linear(4 * E, channels, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        check_inputs(x, mask, 1, "CausalMixer")
        xz = self.in_proj.weight @ x.masked_fill(~mask, 0.0)  # [B, 8E, T]
        forward, backward = xz.chunk(2, dim=1)
        xz = torch.cat([forward, backward.flip(-1)])  # [2B, 4E, T], in scan order
        both = torch.cat([mask, mask.flip(-1)])  # [2B, 1, T]
        mamba_xz, attn_xz = xz.chunk(2, dim=1)
        y = torch.cat([self.core(mamba_xz, both), self._attend(attn_xz, both)], dim=1)  # [2B, 2E, T]
        forward, backward = y.chunk(2)
        y = torch.cat([forward, backward.flip(-1)], dim=1)  # [B, 4E, T]
        return (self.out_proj.weight @ y).masked_fill(~mask, 0.0)  # [B, C, T]

    def _attend(self, xz: Tensor, mask: Tensor) -> Tensor:
        """The attention branch in scan order: ``xz [B', 2E, T]`` -> ``[B', E, T]``."""
        x, z = xz.chunk(2, dim=1)
        qkv = causal_conv1d(x.masked_fill(~mask, 0.0), self.qkv.weight, self.qkv.bias, self.inner)  # [B', 3E, T]
        Bq, _, T = qkv.shape
        q, k, v = qkv.view(Bq, 3, self.heads, self.inner // self.heads, T).transpose(3, 4).unbind(1)  # 3 x [B', H, T, d]
        out = causal_local_attention(q, k, v, mask[:, 0], self.window)
        return out.transpose(2, 3).reshape(Bq, self.inner, T) * F.silu(z)  # [B', H, T, d] -> [B', E, T]


class CausalHybridBlock(nn.Module):
    """CausalTAD's block: ``x + DropPath(CausalMixer(LN(x)))``, optionally followed by ``+ MLP(LN(.))``.

    ``forward(x [B, C, T], mask [B, 1, T]) -> ([B, C, T / stride], [B, 1, T / stride])``.

    ``heads`` split the ``expand * C`` inner channels of the attention branch; ``window`` is the
    causal attention window (odd ``W``: keys ``t - W + 1 .. t``, mirrored for the anti-causal
    direction) or ``-1`` for every earlier step (CausalTAD; quadratic in ``T``). ``mlp_ratio=0``
    (CausalTAD's block has no MLP) or a ``C -> mlp_ratio * C -> C`` pre-norm MLP sub-block. At
    ``stride=2`` the input is first max-pooled (kernel 3, masked) and the block runs at the
    output resolution (CausalTAD pools after the block). The layer norms use eps 1e-6, as
    CausalTAD; its LayerScale (``AffineDropPath``) is left out, as elsewhere here.
    """

    def __init__(
        self,
        channels: int,
        heads: int = 4,
        window: int = -1,
        stride: int = 1,
        mlp_ratio: float = 0.0,
        drop_path: float = 0.0,
        expand: float = 2,
        state_dim: int = 16,
        conv_kernel: int = 4,
    ):
        super().__init__()
        check_stride("CausalHybridBlock", stride)
        if mlp_ratio < 0:
            raise ValueError(f"CausalHybridBlock mlp_ratio must be >= 0 (0: no MLP, as CausalTAD), got {mlp_ratio}")
        self.stride = stride
        self.norm = LayerNormC(channels, eps=1e-6)
        self.mixer = CausalMixer(channels, heads, window, expand, state_dim, conv_kernel)
        self.drop_path1 = DropPath(drop_path)
        if mlp_ratio > 0:
            self.mlp_norm, self.mlp, self.drop_path2 = LayerNormC(channels, eps=1e-6), MLP(channels, mlp_ratio), DropPath(drop_path)
        else:
            self.mlp = None

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        check_inputs(x, mask, self.stride, "CausalHybridBlock")
        if self.stride > 1:
            x, mask = masked_max_pool(x, mask, 3, self.stride)
        else:
            x = x.masked_fill(~mask, 0.0)
        x = x + self.drop_path1(self.mixer(self.norm(x), mask))
        if self.mlp is not None:
            x = x + self.drop_path2(self.mlp(self.mlp_norm(x)).masked_fill(~mask, 0.0))
        return x, mask
