"""Temporal layers, by concept, masked for padded batches.

``masking`` (the conventions below in code: checks, masked max-pool and mean, the residual path),
``conv`` (masked convolution, DropPath, MLP), ``norm`` (layer norm over channels, masked group norm),
``kernels`` (the hand-written autograd functions behind ``norm``), ``attention`` (local and full
self-attention, ActionFormer's block), ``sgp`` (TriDet), ``maxpool`` (TemporalMaxer), ``tcn``,
``ssm`` (Mamba's selective scan, pure PyTorch; ActionMamba's bidirectional and causal blocks),
``causal`` (CausalTAD's hybrid causal attention + causal Mamba), ``dynamic`` (DyFADet's dynamic
feature aggregation and dynamic head tower), ``graph`` (G-TAD's GCNeXt), ``temba`` (MS-Temba),
``boundary_matching`` (BMN's BM layer: the sampled features of every proposal, one matmul),
``deformable`` (TadTR's temporal deformable attention and its transformer layers, ``[B, T, D]`` layout).
A new temporal block is a new module here; ``tal_models.detectors.build`` names it.

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
  would give. ``tal_models.encoders.PyramidEncoder`` needs ``T`` divisible by ``2**(levels - 1)``: the detector pads ``T`` to such a multiple (local
  attention puts no further condition on ``T``; its windows are unfolded, not chunked).

Differences from the papers' code, all for masking: ActionFormer's and TriDet's skip-path and
downsampling max-pools see padded steps as zeros (here ``-inf``), TriDet's global average and
GroupNorm count padded steps (here only valid ones), and TriDet's SGP output is not re-masked.
Not included: ActionFormer's absolute/relative position embeddings and LayerScale (AffineDropPath).
"""

from tal_models.layers.attention import ATTENTION_BLOCK, LocalMultiHeadAttention, TransformerBlock, full_attention, local_attention
from tal_models.layers.boundary_matching import BoundaryMatching, boundary_matching_weights, proposal_validity
from tal_models.layers.causal import CausalHybridBlock
from tal_models.layers.conv import MLP, DropPath, MaskedConv1d, conv1d, drop_path
from tal_models.layers.deformable import DeformableDecoderLayer, DeformableEncoderLayer, TemporalDeformableAttention, sample_linear
from tal_models.layers.dynamic import DynamicAggregation, DynamicAggregationBlock, DynamicConvTower
from tal_models.layers.graph import GCNeXtBlock, semantic_neighbours
from tal_models.layers.masking import check_inputs, check_odd, check_stride, downsample_mask, masked_max_pool, masked_mean, residual
from tal_models.layers.maxpool import MaxPoolBlock
from tal_models.layers.norm import LayerNormC, MaskedGroupNorm, norm_mlp, norm_pointwise
from tal_models.layers.sgp import SGPBlock, sgp_wide_kernel
from tal_models.layers.ssm import MambaBlock, SelectiveSSM, selective_scan
from tal_models.layers.tcn import DilatedTCNBlock
from tal_models.layers.temba import TembaBlock

__all__ = [
    "BoundaryMatching",
    "boundary_matching_weights",
    "proposal_validity",
    "ATTENTION_BLOCK",
    "MLP",
    "CausalHybridBlock",
    "DeformableDecoderLayer",
    "DeformableEncoderLayer",
    "DilatedTCNBlock",
    "DynamicAggregation",
    "DynamicAggregationBlock",
    "DynamicConvTower",
    "GCNeXtBlock",
    "MambaBlock",
    "SelectiveSSM",
    "TembaBlock",
    "TemporalDeformableAttention",
    "DropPath",
    "LayerNormC",
    "LocalMultiHeadAttention",
    "MaskedConv1d",
    "MaskedGroupNorm",
    "MaxPoolBlock",
    "SGPBlock",
    "TransformerBlock",
    "check_inputs",
    "check_odd",
    "check_stride",
    "conv1d",
    "downsample_mask",
    "drop_path",
    "full_attention",
    "local_attention",
    "masked_max_pool",
    "masked_mean",
    "norm_mlp",
    "norm_pointwise",
    "residual",
    "selective_scan",
    "sample_linear",
    "semantic_neighbours",
    "sgp_wide_kernel",
]
