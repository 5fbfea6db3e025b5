"""The multi-scale temporal encoder: projection -> stride-1 stem -> one stride-2 block per further level.

Legend: B batch, C input channels, D = ``embed_dim``, T steps, T_l = T / 2**l steps at level l.

The encoder is the same for every one-stage method; the blocks are what differ. It takes them from
a factory (``BlockFactory``: level, stride, position in the stem -> a block taking and returning
``(x, mask)``), which ``tal_models.detectors.build`` makes from ``EncoderConfig.kind``. A new
temporal block is a module in ``tal_models.layers`` and a ``case`` there, nothing here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from tal_models.config import require_positive_int
from tal_models.layers import LayerNormC, MaskedConv1d, check_inputs, check_odd

EncoderKind = Literal["transformer", "sgp", "maxpool", "conv", "mamba", "causal", "dfa", "graph", "mstemba"]
ENCODER_KINDS = ("transformer", "sgp", "maxpool", "conv", "mamba", "causal", "dfa", "graph", "mstemba")
FULL_RESOLUTION_KINDS = ("mstemba",)  # every level keeps T steps (scales by dilation, not by striding)

# (level, stride, index in the stem) -> a block: ``forward(x [B, D, T], mask [B, 1, T]) -> (x, mask)`` at ``T / stride``
BlockFactory = Callable[[int, int, int], nn.Module]


@dataclass(frozen=True)
class EncoderConfig:
    """A multi-scale encoder: projection -> stride-1 stem -> one stride-2 block per further level.

    ``kind`` picks the blocks: ``transformer`` (ActionFormer), ``sgp`` (TriDet), ``maxpool``
    (TemporalMaxer), ``conv`` (dilated TCN blocks; the stem's dilations are 1, 2, 4, ...),
    ``mamba`` (ActionMamba's bidirectional selective-SSM blocks), ``causal`` (CausalTAD's hybrid
    causal attention + causal Mamba), ``dfa`` (DyFADet's dynamic feature aggregation), ``graph``
    (G-TAD's GCNeXt), ``mstemba`` (MS-Temba's Temba blocks: every level keeps all ``T`` steps and
    level ``l`` works at dilation ``2**l``; for dense detectors only).
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
    ssm_state: int = 16  # mamba / causal / mstemba: the SSM's state size N (Mamba: 16)
    ssm_expand: int = 2  # mamba / causal / mstemba: inner width E = ssm_expand * embed_dim (Mamba: 2)
    graph_k: int = 3  # graph: semantic neighbours per step (G-TAD: 3)
    graph_groups: int = 32  # graph: groups of the bottleneck convolutions (G-TAD: 32)

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"EncoderConfig.kind must be one of {ENCODER_KINDS}, got {self.kind!r}")
        for name in ("input_dim", "embed_dim", "levels", "embed_layers", "ssm_state", "ssm_expand", "graph_k", "graph_groups"):
            value = getattr(self, name)
            require_positive_int(value, f"EncoderConfig.{name}")
        if self.stem_layers is not None and (not isinstance(self.stem_layers, int) or self.stem_layers < 0):
            raise ValueError(f"EncoderConfig.stem_layers must be an int >= 0 or None (the kind's default), got {self.stem_layers!r}")
        check_odd("EncoderConfig.embed_kernel", self.embed_kernel)
        check_odd("EncoderConfig.kernel_size", self.kernel_size)
        if isinstance(self.window, list):  # YAML gives lists
            object.__setattr__(self, "window", tuple(self.window))
        windows = self.window if isinstance(self.window, tuple) else (self.window,) * self.levels
        if len(windows) != self.levels:
            raise ValueError(
                f"EncoderConfig.window has {len(windows)} values for {self.levels} levels: give one per level, or a single int"
            )
        for w in windows:
            if w != -1:
                check_odd("EncoderConfig.window (or -1 for full attention)", w)
        no_mlp_allowed = self.kind in ("causal", "mstemba")  # blocks whose MLP is optional (CausalTAD has none)
        if not (math.isfinite(self.mlp_ratio) and (self.mlp_ratio > 0 or (no_mlp_allowed and self.mlp_ratio == 0))):
            raise ValueError(
                f"EncoderConfig.mlp_ratio must be > 0{' (or 0: no MLP)' if no_mlp_allowed else ''}, got {self.mlp_ratio} (ActionFormer: 4, TriDet: 1.5)"
            )
        for name in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"EncoderConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.kind in ("transformer", "causal") and (self.heads < 1 or self.embed_dim % self.heads != 0):
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
    def downsamples(self) -> bool:
        """True when level ``l`` has ``T / 2**l`` steps; False for full-resolution kinds (``mstemba``)."""
        return self.kind not in FULL_RESOLUTION_KINDS

    @property
    def total_stride(self) -> int:
        """``T`` must be a multiple of this: ``2**(levels - 1)``."""
        return 2 ** (self.levels - 1)


class PyramidEncoder(nn.Module):
    """Features -> a temporal feature pyramid.

    ``forward(x [B, input_dim, T], mask [B, 1, T])`` -> ``(feats, masks)``: ``levels`` tensors
    ``[B, embed_dim, T_l]`` and bool ``[B, 1, T_l]`` with ``T_l = T / 2**l``; zero at invalid
    steps. ``T`` must be a multiple of ``config.total_stride``. ``make_block`` gives the stem's
    ``num_stem_layers()`` stride-1 blocks (level 0) and one stride-2 block per further level.
    ``zero_padded=True`` promises that ``x`` is 0 at invalid steps (a ``Batch`` from ``collate``
    is), which spares the first convolution a masked copy of the input that backward would keep;
    otherwise padded steps may hold anything.
    """

    def __init__(self, config: EncoderConfig, make_block: BlockFactory):
        super().__init__()
        self.config = config
        C = config.embed_dim
        dims = [config.input_dim] + [C] * config.embed_layers
        self.embed = nn.ModuleList(MaskedConv1d(a, b, config.embed_kernel) for a, b in zip(dims[:-1], dims[1:]))
        self.embed_norms = nn.ModuleList(LayerNormC(C) for _ in range(config.embed_layers))
        self.stem = nn.ModuleList(make_block(0, 1, i) for i in range(config.num_stem_layers()))
        stride = 2 if config.downsamples else 1
        self.branch = nn.ModuleList(make_block(level, stride, 0) for level in range(1, config.levels))
        for m in self.modules():
            if isinstance(m, nn.Conv1d) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, mask: Tensor, zero_padded: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        cfg = self.config
        torch._assert(
            x.ndim == 3 and x.shape[1] == cfg.input_dim, f"PyramidEncoder: x must be [B, {cfg.input_dim}, T], got {tuple(x.shape)}"
        )
        torch._assert(
            x.shape[2] % cfg.total_stride == 0,
            f"PyramidEncoder: T = {x.shape[2]} must be a multiple of 2**(levels - 1) = {cfg.total_stride}; pad the batch",
        )
        check_inputs(x, mask, 1, "PyramidEncoder")
        for i, (conv, norm) in enumerate(zip(self.embed, self.embed_norms)):
            x, mask = conv(x, mask, input_masked=zero_padded or i > 0)
            x = norm(x).masked_fill_(~mask, 0.0).relu_()
        for block in self.stem:
            x, mask = block(x, mask)
        feats, masks = [x], [mask]
        for block in self.branch:
            x, mask = block(x, mask)  # [B, C, T_l] -> [B, C, T_l / 2] (full-resolution kinds: [B, C, T])
            feats.append(x)
            masks.append(mask)
        return feats, masks
