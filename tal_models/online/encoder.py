"""The causal feature pyramid of the online detector: offline over a padded batch, or one step at a time.

Legend: B batch, C input channels (``input_dim``), D = ``embed_dim``, T steps, L = ``levels``,
T_l = T / 2**l steps at level l, j_l(t) the latest complete step of level l at fine step t.

    x [B, C, T] -> projection: embed_layers x (causal conv_k + LN + ReLU)          [B, D, T]
                -> stem: stem_layers causal blocks of ``kind``                       level 0 [B, D, T]
                -> per level l = 1 .. L-1: causal max-pool (stride 2) + one block     level l [B, D, T_l]
                -> fusion: fused[t] = LN(sum_l W_l level_l[j_l(t)])                   [B, D, T]

The stride-2 pool makes level ``l + 1`` step ``j`` from level ``l`` steps ``2j - 1, 2j, 2j + 1``, so it is
computable exactly when level-``l`` step ``2j + 1`` arrives: level ``l`` step ``j`` covers fine steps
``.. (j + 1) 2**l - 1`` and advances when its stride is complete. At fine step ``t`` the fusion reads
every level's latest complete step, ``j_l(t) = floor((t + 1) / 2**l) - 1`` (a level adds nothing while
``j_l(t) < 0``), through its own 1x1 projection ``W_l`` (no bias: the layer norm's bias is the one
offset), and a layer norm over the sum. Each output step thus sees the same past at every scale,
and a pointwise head on it is causal. A video of ``n`` valid steps has ``floor(n / 2**l)`` complete
steps at level ``l`` (not ``ceil``, as the offline pyramids' masks: the last, incomplete coarse step
would read the future).

Kinds of block (``tal_models.online.layers``): ``transformer`` (causal local attention over the
last ``window`` steps + MLP), ``conv`` (causal TCN block; dilation ``2**i`` for stem block ``i``, 1 at
the coarse levels), ``mamba`` (the causal Mamba block of ``tal_models.layers.ssm``), ``maxpool``
(TemporalMaxer-like: no stem and no block; a coarse level is the causal max-pool alone, with kernel
``kernel_size`` over level-``l`` steps ``2j + 2 - k .. 2j + 1``. No pointwise layer after the pool:
TemporalMaxer's pyramid is parameter-free, and the fusion's ``W_l`` already gives each level its own
projection).

``step`` runs the same computation for one new step with the ``PyramidState`` of ``init_state``:
O(1) work and memory per step (caches bounded by kernels and the window; ``numel()`` never grows).
A step's cost is set by the levels that advance: level ``l`` every ``2**l`` steps, all of them every
``total_stride`` steps, so at 6 levels one step in 32 (3 %) is the slowest and sets the p99. Measured
at the THUMOS14 size (2048 -> 512, 6 levels, 2 stem blocks, W = 16), CPU, one thread, on a shared,
busy 2-core machine (load ~2), 1280 steps, two runs: transformer p50 4.9-5.0 ms, p99 11.8-18.7 ms
(an all-level step: median 11 ms; it reads all 110 MB of weights, so memory bandwidth bounds it);
mamba 3.6 / 8.1-14.1 ms; conv 2.0 / 4.5-5.4 ms; maxpool 0.8 / 1.6 ms. ``forward`` over a 4608-step
prefix (10 minutes at 7.5 steps/s): 1.8 s, 2.4-2.8 s, 0.9 s and 0.55 s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.config import require_int, require_positive_int
from tal_models.layers import LayerNormC, check_inputs
from tal_models.online.layers import (
    CausalConv1d,
    CausalConvBlock,
    CausalMamba,
    CausalTransformerBlock,
    ConvTail,
    KVCache,
    MambaCache,
    causal_max_pool,
    step_layer_norm,
)

BlockCache = ConvTail | KVCache | MambaCache

CausalKind = Literal["transformer", "conv", "mamba", "maxpool"]
CAUSAL_KINDS = ("transformer", "conv", "mamba", "maxpool")
MAMBA_CONV_KERNEL = 4  # Mamba's depthwise convolution (as mamba_ssm and ActionMamba)


@dataclass(frozen=True)
class CausalEncoderConfig:
    """The causal pyramid (module docstring). ``window``: causal attention window (query ``t``, keys
    ``t - W + 1 .. t``; transformer only). ``kernel_size``: the conv blocks' kernel, or the maxpool kind's
    stride-2 pool (the other kinds pool over 3 steps). ``ssm_state`` / ``ssm_expand``: Mamba's ``N`` and
    ``E / D``. ``stem_layers=None``: 2 (0 for maxpool, which has no stem). ``dropout``: on the attention
    weights and inside the MLP (transformer), after the convolution's ReLU (conv); mamba and maxpool have
    none. ``drop_path``: every block's residual branch."""

    kind: CausalKind = "transformer"
    input_dim: int = 2048
    embed_dim: int = 512
    embed_layers: int = 2  # causal conv (embed_kernel) + LN + ReLU layers of the projection
    embed_kernel: int = 3
    stem_layers: int | None = None
    levels: int = 6  # level l at stride 2**l
    heads: int = 4
    window: int = 16
    mlp_ratio: float = 4.0
    kernel_size: int = 3
    ssm_state: int = 16
    ssm_expand: int = 2
    dropout: float = 0.0
    drop_path: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in CAUSAL_KINDS:
            raise ValueError(f"CausalEncoderConfig.kind must be one of {CAUSAL_KINDS}, got {self.kind!r}")
        for name in ("input_dim", "embed_dim", "embed_layers", "embed_kernel", "levels", "heads", "window", "ssm_state", "ssm_expand"):
            require_positive_int(getattr(self, name), f"CausalEncoderConfig.{name}")
        require_int(
            self.kernel_size, "CausalEncoderConfig.kernel_size", 2 if self.kind == "maxpool" else 1, " (the maxpool kind's pool needs >= 2)"
        )
        if self.stem_layers is not None:
            require_int(self.stem_layers, "CausalEncoderConfig.stem_layers", 0, " (or None: the kind's default)")
            if self.kind == "maxpool" and self.stem_layers != 0:
                raise ValueError(
                    f"CausalEncoderConfig.stem_layers must be 0 or None for kind 'maxpool' (no stem blocks), got {self.stem_layers}"
                )
        if not (isinstance(self.mlp_ratio, int | float) and math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise ValueError(f"CausalEncoderConfig.mlp_ratio must be a finite number > 0, got {self.mlp_ratio!r} (ActionFormer: 4)")
        for name in ("dropout", "drop_path"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
                raise ValueError(f"CausalEncoderConfig.{name} must be in [0, 1), got {value!r}")
        if self.kind == "transformer" and self.embed_dim % self.heads != 0:
            raise ValueError(f"CausalEncoderConfig.embed_dim ({self.embed_dim}) must be divisible by heads ({self.heads}): change either")

    def num_stem_layers(self) -> int:
        if self.stem_layers is not None:
            return self.stem_layers
        return 0 if self.kind == "maxpool" else 2

    @property
    def pool_kernel(self) -> int:
        """The stride-2 causal max-pool's kernel: ``kernel_size`` for maxpool, else 3."""
        return self.kernel_size if self.kind == "maxpool" else 3

    @property
    def total_stride(self) -> int:
        """``T`` must be a multiple of this: ``2**(levels - 1)``."""
        return 2 ** (self.levels - 1)


@dataclass
class PyramidState:
    """What ``CausalPyramid.step`` keeps between steps: every cache is fixed-size.

    ``embed``: the projection convolutions' tails; ``stem``: the stem blocks' caches; ``pools[l - 1]``:
    the last ``pool_kernel`` steps of level ``l - 1`` (``-inf`` before any); ``blocks[l - 1]``: level
    ``l``'s block cache (None for maxpool); ``latest [L, B, D]``: ``W_l`` times each level's latest
    complete step (0 until its first); ``steps``: steps consumed so far.
    """

    embed: list[ConvTail]
    stem: list[BlockCache]
    pools: list[ConvTail]
    blocks: list[BlockCache | None]
    latest: Tensor
    steps: int = 0
    batch_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.batch_size = self.latest.shape[1]

    def tensors(self) -> Iterator[Tensor]:
        """Every tensor the state holds."""
        for cache in [*self.embed, *self.stem, *self.pools, *self.blocks]:
            if cache is not None:
                yield from cache.tensors()
        yield self.latest

    def numel(self) -> int:
        """Elements held in all: the same after every step."""
        return sum(t.numel() for t in self.tensors())


class CausalPyramid(nn.Module):
    """Features -> one fused causal feature per step (module docstring).

    ``forward(x [B, input_dim, T], mask [B, 1, T]) -> [B, embed_dim, T]``, zero at invalid steps; ``T``
    a multiple of ``config.total_stride``; the output at ``t`` reads steps ``<= t`` only, and padding
    (whatever it holds, NaN included) changes nothing at a valid step (a valid prefix per video).
    ``init_state(batch_size, device, dtype)`` and ``step(x [B, input_dim], state) -> [B, embed_dim]``:
    the same output, one step at a time (eval mode).
    """

    def __init__(self, config: CausalEncoderConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.embed_dim
        dims = [cfg.input_dim] + [D] * cfg.embed_layers
        self.embed = nn.ModuleList(CausalConv1d(a, b, cfg.embed_kernel) for a, b in zip(dims[:-1], dims[1:]))
        self.embed_norms = nn.ModuleList(LayerNormC(D) for _ in range(cfg.embed_layers))
        self.stem = nn.ModuleList(self._block(2**i) for i in range(cfg.num_stem_layers()))
        self.branch = nn.ModuleList(self._block(1) for _ in range(1, cfg.levels)) if cfg.kind != "maxpool" else None
        self.fuse = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(cfg.levels))
        self.fuse_norm = LayerNormC(D)

    def _block(self, dilation: int) -> nn.Module:
        cfg = self.config
        D = cfg.embed_dim
        match cfg.kind:
            case "transformer":
                return CausalTransformerBlock(D, cfg.heads, cfg.window, cfg.mlp_ratio, cfg.dropout, cfg.drop_path)
            case "conv":
                return CausalConvBlock(D, cfg.kernel_size, dilation, cfg.dropout, cfg.drop_path)
            case "mamba":
                return CausalMamba(D, cfg.ssm_state, cfg.ssm_expand, MAMBA_CONV_KERNEL, cfg.drop_path)
        raise ValueError(f"CausalPyramid: kind {cfg.kind!r} has no blocks")

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        cfg = self.config
        torch._assert(
            x.ndim == 3 and x.shape[1] == cfg.input_dim, f"CausalPyramid: x must be [B, {cfg.input_dim}, T], got {tuple(x.shape)}"
        )
        T = x.shape[2]
        torch._assert(
            T % cfg.total_stride == 0, f"CausalPyramid: T = {T} must be a multiple of 2**(levels - 1) = {cfg.total_stride}; pad the batch"
        )
        check_inputs(x, mask, 1, "CausalPyramid")
        fine_mask = mask
        x = x.masked_fill(~mask, 0.0)  # masked_fill, not a product: padding may hold NaN
        for conv, norm in zip(self.embed, self.embed_norms):
            x = norm(conv(x)).relu().masked_fill(~mask, 0.0)
        for block in self.stem:
            x = block(x, mask)
        fused = self.fuse[0].weight @ x  # [D, D] @ [B, D, T] -> [B, D, T]
        for level in range(1, cfg.levels):
            mask = mask[..., 1::2]  # level-l step j is complete iff level-(l-1) step 2j + 1 is valid
            x = causal_max_pool(x, cfg.pool_kernel).masked_fill(~mask, 0.0)  # [B, D, T_l]
            if self.branch is not None:
                x = self.branch[level - 1](x, mask)
            # fine step t reads level step j_l(t) = floor((t + 1) / 2**l) - 1: index j + 1 of the level padded with one zero step
            index = torch.arange(1, T + 1, device=x.device) >> level  # [T], in 0 .. T_l
            fused = fused + F.pad(self.fuse[level].weight @ x, (1, 0))[..., index]  # [B, D, T_l + 1] -> [B, D, T]
        return self.fuse_norm(fused).masked_fill(~fine_mask, 0.0)

    def init_state(self, batch_size: int = 1, device=None, dtype=torch.float32) -> PyramidState:
        """A fresh state (no step seen yet) for ``batch_size`` parallel streams."""
        cfg = self.config
        D = cfg.embed_dim
        return PyramidState(
            embed=[conv.init_cache(batch_size, device, dtype) for conv in self.embed],
            stem=[block.init_cache(batch_size, device, dtype) for block in self.stem],
            pools=[ConvTail(batch_size, D, cfg.pool_kernel, device, dtype, fill=-math.inf) for _ in range(1, cfg.levels)],
            blocks=[None] * (cfg.levels - 1) if self.branch is None else [b.init_cache(batch_size, device, dtype) for b in self.branch],
            latest=torch.zeros(cfg.levels, batch_size, D, device=device, dtype=dtype),
        )

    @torch.no_grad()
    def step(self, x: Tensor, state: PyramidState) -> Tensor:
        """One new feature step ``x [B, input_dim]`` -> the fused output of that step ``[B, embed_dim]``; advances ``state``."""
        cfg = self.config
        torch._assert(
            not self.training, "CausalPyramid.step needs eval mode (model.eval()): dropout and DropPath would differ from forward"
        )
        torch._assert(
            x.shape == (state.batch_size, cfg.input_dim),
            f"CausalPyramid.step: x must be [{state.batch_size}, {cfg.input_dim}], got {tuple(x.shape)}",
        )
        h = x
        for conv, norm, tail in zip(self.embed, self.embed_norms, state.embed):
            h = F.relu(step_layer_norm(norm, conv.step(h, tail)))
        for block, cache in zip(self.stem, state.stem):
            h = block.step(h, cache)
        latest = state.latest
        torch.mm(h, self.fuse[0].weight.t(), out=latest[0])
        t = state.steps
        state.steps = t + 1
        for level in range(1, cfg.levels):
            window = state.pools[level - 1].push(h)  # level l-1's last pool_kernel steps
            if (t + 1) % (1 << level):  # level l-1's newest step is even: level l's stride is not complete
                break
            h = window.amax(dim=-1)  # [B, D]
            if self.branch is not None:
                h = self.branch[level - 1].step(h, state.blocks[level - 1])
            torch.mm(h, self.fuse[level].weight.t(), out=latest[level])
        return step_layer_norm(self.fuse_norm, latest.sum(dim=0))
