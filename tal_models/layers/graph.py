"""G-TAD's GCNeXt block: graph convolutions over temporal and semantic neighbours (Xu et al., CVPR 2020).

Legend: B batch, C channels, T steps, W bottleneck width, G groups, K neighbours per step (the
paper's ``k``), Q query steps per block of the neighbour search.

Each step is a node of two graphs. Temporal edges join a step to the steps before and after it;
semantic edges join it to its ``K`` nearest steps in feature space, found again in every block
from that block's input (G-TAD's dynamic edges). The block is ResNeXt-shaped: both graph
convolutions are bottlenecks ``C -> W -> W (G groups) -> C`` and are summed with the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.layers.conv import DropPath, MaskedConv1d
from tal_models.layers.masking import check_inputs, check_stride, masked_max_pool


def semantic_neighbours(x: Tensor, mask: Tensor, k: int, block_size: int = 256) -> Tensor:
    """The ``k`` nearest valid steps of every step in feature space (Euclidean), itself first.

    ``x [B, C, T]``, ``mask [B, 1, T]`` -> ``idx [B, T, k]`` (long), step indices into the same
    video. Only valid steps are candidates (padding sits at distance ``+inf``). A step is always
    its own nearest neighbour, as in G-TAD, where the distance to itself is 0; it is pinned first
    so rounding in ``|a|^2 - 2 a.b + |b|^2`` cannot displace it. A video with fewer than ``k``
    valid steps repeats the step itself in the missing places: the max over neighbours of the
    edge convolution is unchanged by a repeated neighbour.

    Queries are processed ``block_size`` steps at a time, so the largest temporary is a
    ``[B, Q, T]`` distance matrix, linear in ``T``. No gradient flows through the choice (the
    indices are discrete; G-TAD's ``topk`` gives none either).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (neighbours per step) must be a positive int, got {k!r}")
    B, _, T = x.shape
    steps = torch.arange(T, device=x.device)
    # Traced for export, the query loop would be unrolled at the traced length: one block there (quadratic
    # memory, but right at every length), and k columns of +inf appended so that topk never asks for more
    # than the row has, whatever T the graph later sees.
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    block_size = T if tracing else block_size
    with torch.no_grad():
        x = x.detach().masked_fill(~mask, 0.0)  # padding may hold NaN/inf
        sq = x.pow(2).sum(dim=1)  # [B, T]
        rows = x.transpose(1, 2)  # [B, T, C]
        padded_key = ~mask  # [B, 1, T], broadcasts over the queries
        blocks = []
        for start in range(0, T, block_size):
            stop = min(start + block_size, T)
            dist = torch.baddbmm(sq[:, None, :], rows[:, start:stop], x, alpha=-2.0)  # [B, Q, T]: |b|^2 - 2 a.b
            dist.add_(sq[:, start:stop, None]).masked_fill_(padded_key, math.inf)
            dist.diagonal(offset=start, dim1=1, dim2=2).fill_(-math.inf)  # entry (i, start + i): the query itself
            dist = torch.cat([dist, dist.new_full((B, dist.shape[1], k), math.inf)], dim=-1)  # [B, Q, T + k]
            d, idx = dist.topk(k, dim=-1, largest=False)  # [B, Q, k]
            own = steps[start:stop].view(1, -1, 1)
            blocks.append(torch.where(d == math.inf, own, idx))  # fewer valid steps than k: repeat the step itself
        idx = torch.cat(blocks, dim=1)  # [B, T, k]
    return idx


class GCNeXtBlock(nn.Module):
    """G-TAD's GCNeXt: ``ReLU(x + temporal(x) + semantic(x))``, masked.

    ``forward(x [B, C, T], mask [B, 1, T]) -> ([B, C, T / stride], [B, 1, T / stride])``. With
    ``x`` first max-pooled (kernel 3, masked) when ``stride=2``::

        temporal(x)_t = Conv1x1_{W->C} ReLU GConv3_{W->W, G} ReLU Conv1x1_{C->W} (x)        # neighbours t - 1, t + 1
        semantic(x)_t = max_{j in kNN(t)} Conv1x1_{W->C} ReLU GConv1x1_{W->W, G} ReLU Conv1x1_{2C->W} [x_t, x_j - x_t]

    ``kNN(t)`` is ``semantic_neighbours(x, mask, k)``: the ``k`` nearest valid steps of the same
    video, ``t`` included, recomputed from this block's input. The bracket is DGCNN's edge feature
    as the paper writes it; G-TAD's code feeds ``[x_j, x_t]`` instead, which the first 1x1
    convolution maps to the same functions (an invertible linear change of its input), with the
    same parameters. ``width`` defaults to G-TAD's ``4 * groups`` (128 for ``groups=32``) whatever
    ``C`` is; the block has ``5 C W + 4 W^2 / G + 4 W + 2 C`` weights and biases, as G-TAD's
    (331,264 at C = 512, W = 128, G = 32).
    G-TAD has no normalisation in the block; ``drop_path`` drops both graph streams together.

    The first 1x1 convolution of the semantic stream is computed per step, not per edge:
    ``A [x_t, x_j - x_t] = (A_1 - A_2) x_t + A_2 x_j``, so ``A_2 x`` is computed once ``[B, W, T]``
    and gathered at the neighbours, and the ``[B, 2C, T, K]`` edge features are never built.
    """

    def __init__(self, channels: int, k: int = 3, groups: int = 32, width: int | None = None, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        check_stride("GCNeXtBlock", stride)
        width = 4 * groups if width is None else width
        if groups < 1 or width % groups != 0:
            raise ValueError(f"GCNeXtBlock width ({width}) must be a multiple of groups ({groups}); G-TAD: width 128, groups 32")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"GCNeXtBlock k (semantic neighbours per step) must be a positive int, got {k!r} (G-TAD: 3)")
        self.k, self.stride, self.width = k, stride, width
        self.temporal_in = nn.Conv1d(channels, width, 1)
        self.temporal_mid = MaskedConv1d(width, width, 3, groups=groups)
        self.temporal_out = nn.Conv1d(width, channels, 1)
        self.edge_in = nn.Conv1d(2 * channels, width, 1)  # input channels: [x_t, x_j - x_t]
        self.edge_mid = nn.Conv1d(width, width, 1, groups=groups)
        self.edge_out = nn.Conv1d(width, channels, 1)
        self.drop_path = DropPath(drop_path)

    def temporal(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x [B, C, T]`` (0 at invalid steps) -> ``[B, C, T]``, not masked."""
        h = torch.relu(self.temporal_in(x).masked_fill_(~mask, 0.0))  # the bias makes padded steps non-zero
        h = torch.relu(self.temporal_mid(h, mask, input_masked=True)[0])
        return self.temporal_out(h)

    def semantic(self, x: Tensor, mask: Tensor, idx: Tensor | None = None) -> Tensor:
        """``x [B, C, T]`` (0 at invalid steps) -> ``[B, C, T]``: the edge convolution over ``idx``
        (default ``semantic_neighbours(x, mask, k)``), not masked."""
        B, C, T = x.shape
        idx = semantic_neighbours(x, mask, self.k) if idx is None else idx  # [B, T, K]
        K = idx.shape[-1]
        w_self, w_diff = self.edge_in.weight[:, :C], self.edge_in.weight[:, C:]  # [W, C, 1] each
        centre = F.conv1d(x, w_self - w_diff, self.edge_in.bias)  # [B, W, T]
        other = F.conv1d(x, w_diff)  # [B, W, T]
        gathered = other.gather(2, idx.reshape(B, 1, T * K).expand(-1, self.width, -1))  # [B, W, T * K]
        h = torch.relu(gathered.view(B, self.width, T, K) + centre[..., None])  # [B, W, T, K]
        h = torch.relu(self.edge_mid(h.view(B, self.width, T * K)))
        return self.edge_out(h).view(B, C, T, K).amax(dim=-1)  # max over the neighbours -> [B, C, T]

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        check_inputs(x, mask, self.stride, "GCNeXtBlock")
        if self.stride > 1:
            x, mask = masked_max_pool(x, mask, 3, self.stride)
        else:
            x = x.masked_fill(~mask, 0.0)
        out = x + self.drop_path(self.temporal(x, mask) + self.semantic(x, mask))
        return torch.relu(out.masked_fill_(~mask, 0.0)), mask
