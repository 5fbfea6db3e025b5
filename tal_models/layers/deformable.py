"""Temporal deformable attention (TadTR, after Deformable DETR) and the transformer layers built on it.

Legend: B batch, T steps, n valid steps of a sequence, D channels, H heads, d = D / H, P sampling
points per head, Q queries, G = B * H, S = Q * P samples per head.

Each query attends to a few points of the value sequence only: per head it predicts ``P``
offsets around its reference point and ``P`` softmax weights, samples the (projected) values
there by linear interpolation between the two neighbouring steps, and sums them. Single scale,
as TadTR.

Units (the masking convention of ``tal_models.layers``, for sequences in the ``[B, T, D]`` layout
a transformer works in, with ``mask [B, T]``): reference points are in unit time of each
sequence's *valid* length ``n`` (step ``k`` is centred on ``(k + 0.5) / n``); a point reference
``r`` ``[.., 1]`` samples at steps ``r n - 0.5 + offset`` (offsets in steps); a segment reference
``(c, w)`` ``[.., 2]`` (TadTR's segment refinement) samples at ``(c + offset w / (2 P)) n - 0.5``,
offsets scaled by the segment's half width. Values at invalid steps are zeroed and a sample
outside ``[0, n)`` reads zero, so appending padding, whatever it holds, changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sample_linear(values: Tensor, positions: Tensor, lengths: Tensor) -> Tensor:
    """Linear interpolation of ``values [G, T, d]`` at fractional steps ``positions [G, S]`` -> ``[G, S, d]``.

    ``lengths [G]``: valid steps of each row; a neighbour step outside ``[0, length)`` contributes
    zero (so a sample at ``-0.5`` reads half the first step, one at ``-1`` or beyond the end reads 0).
    ``values`` must be finite at every step (callers zero the invalid ones).
    """
    G, T, d = values.shape
    S = positions.shape[1]
    # clamped first: a diverging offset must not become an out-of-range (or undefined) integer index
    positions = positions.float().clamp(-2.0, T + 1.0)
    lo = positions.floor()
    frac = positions - lo
    lo = lo.long()
    neighbours = torch.stack([lo, lo + 1], dim=-1)  # [G, S, 2]
    inside = (neighbours >= 0) & (neighbours < lengths.view(G, 1, 1))
    weights = torch.stack([1.0 - frac, frac], dim=-1) * inside  # [G, S, 2]
    index = neighbours.clamp(0, T - 1).view(G, 2 * S, 1).expand(G, 2 * S, d)
    gathered = values.gather(1, index).view(G, S, 2, d)
    return (gathered * weights[..., None].to(values.dtype)).sum(dim=2)


class TemporalDeformableAttention(nn.Module):
    """``forward(query [B, Q, D], reference [B, Q, 1 or 2], value [B, T, D], mask [B, T]) -> [B, Q, D]``
    (module docstring for the units). The sampling runs in float32 (under autocast too: a bf16
    position is off by up to half a step at step 128)."""

    def __init__(self, dim: int, heads: int = 8, points: int = 4):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"TemporalDeformableAttention: dim ({dim}) must be divisible by heads ({heads}) (TadTR: 256 / 8)")
        self.dim, self.heads, self.points = dim, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * points)
        self.attention_weights = nn.Linear(dim, heads * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR's start: the offsets ignore the query and fan out, heads alternately left and
        # right at growing reach, points at 1..P times it; uniform weights over the points
        nn.init.zeros_(self.sampling_offsets.weight)
        h = torch.arange(self.heads, dtype=torch.float32)
        reach = torch.where(h % 2 == 0, 1.0, -1.0) * (h // 2 + 1)  # [H]
        fan = reach[:, None] * torch.arange(1, self.points + 1, dtype=torch.float32)[None]  # [H, P]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(fan.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference: Tensor, value: Tensor, mask: Tensor) -> Tensor:
        B, Q, _ = query.shape
        T = value.shape[1]
        H, P, d = self.heads, self.points, self.dim // self.heads
        lengths = mask.sum(dim=-1).float()  # [B]
        v = self.value_proj(value).masked_fill(~mask[..., None], 0.0)  # masked_fill: padding may hold NaN
        v = v.view(B, T, H, d).permute(0, 2, 1, 3).reshape(B * H, T, d).float()  # [B, T, D] -> [G, T, d]
        offsets = self.sampling_offsets(query).float().view(B, Q, H, P)
        weights = self.attention_weights(query).float().view(B, Q, H, P).softmax(dim=-1)
        reference = reference.float()
        n = lengths.view(B, 1, 1, 1)
        if reference.shape[-1] == 1:
            positions = reference[..., None] * n - 0.5 + offsets  # [B, Q, H, P] steps
        elif reference.shape[-1] == 2:
            center, width = reference[..., :1, None], reference[..., 1:, None]  # [B, Q, 1, 1]
            positions = (center + offsets * width / (2 * P)) * n - 0.5
        else:
            raise ValueError(f"TemporalDeformableAttention: reference must be [B, Q, 1] or [B, Q, 2], got {tuple(reference.shape)}")
        positions = positions.permute(0, 2, 1, 3).reshape(B * H, Q * P)  # [B, Q, H, P] -> [G, S]
        sampled = sample_linear(v, positions, lengths.repeat_interleave(H)).view(B, H, Q, P, d)
        out = (sampled * weights.permute(0, 2, 1, 3)[..., None]).sum(dim=3)  # [B, H, Q, d]
        out = out.permute(0, 2, 1, 3).reshape(B, Q, H * d).to(query.dtype)
        return self.output_proj(out)


class FeedForward(nn.Module):
    """``Linear(D, F) -> ReLU -> dropout -> Linear(F, D) -> dropout`` per token (the transformer's FFN)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(F.relu(self.linear1(x)), self.dropout, self.training)
        return F.dropout(self.linear2(h), self.dropout, self.training)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention (each step's reference is itself), then the FFN.

    ``forward(x [B, T, D], pos [B, T, D], mask [B, T]) -> [B, T, D]``, zero at invalid steps.
    """

    def __init__(self, dim: int, heads: int, points: int, ffn_dim: int, dropout: float = 0.1):
        super().__init__()
        self.attn = TemporalDeformableAttention(dim, heads, points)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.dropout = dropout

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        T = x.shape[1]
        n = mask.sum(dim=-1, keepdim=True).clamp(min=1).float()  # [B, 1]
        reference = ((torch.arange(T, device=x.device, dtype=torch.float32) + 0.5)[None] / n)[..., None]  # [B, T, 1]
        x = self.norm1(x + F.dropout(self.attn(x + pos, reference, x, mask), self.dropout, self.training))
        x = self.norm2(x + self.ffn(x))
        return x.masked_fill(~mask[..., None], 0.0)


class DeformableDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention over the queries, deformable cross-attention to the
    memory at each query's reference, then the FFN.

    ``forward(tgt [B, Q, D], query_pos [B, Q, D], reference [B, Q, 1 or 2], memory [B, T, D], mask [B, T]) -> [B, Q, D]``.
    """

    def __init__(self, dim: int, heads: int, points: int, ffn_dim: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = TemporalDeformableAttention(dim, heads, points)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.dropout = dropout

    def forward(self, tgt: Tensor, query_pos: Tensor, reference: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        q = tgt + query_pos
        attended = self.self_attn(q, q, tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + F.dropout(attended, self.dropout, self.training))
        attended = self.cross_attn(tgt + query_pos, reference, memory, mask)
        tgt = self.norm2(tgt + F.dropout(attended, self.dropout, self.training))
        return self.norm3(tgt + self.ffn(tgt))
