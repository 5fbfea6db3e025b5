"""BMN's boundary-matching (BM) layer: the features of every proposal of a fixed-scale sequence, at once.

Legend: B batch, C channels, T steps of the (fixed-scale) sequence, D durations (``max_duration``),
N sample bins per proposal (``num_samples``), S points per bin (``samples_per_bin``).

Proposal ``(d, t)`` covers cells ``t .. t + d`` (duration ``d + 1`` cells). BMN (Lin et al., ICCV
2019, Sec. 3.3) samples it on ``[t - r (d + 1), t + d + r (d + 1)]`` in cell-centre coordinates
(``r`` the boundary ratio: context on both sides), at ``N * S`` evenly spaced points; each point
linearly interpolates its two neighbouring cells, and the ``S`` points of a bin are averaged. All
of that is linear in the features, so it is one fixed weight tensor ``W [T, N, D, T]`` and the
layer is one matmul ``x [B, C, T] @ W.view(T, -1) -> [B, C, N, D, T]``.

A point outside ``[0, T - 1]`` reads zeros beyond the sequence (the neighbour that lies outside
contributes nothing), the convention of every masked layer here. The official code instead
clamps points in ``(-1, 0)`` to cell 0 (a side effect of ``math.modf`` on negative numbers).
Proposals ending beyond the sequence (``t + d >= T``) get all-zero weights and are invalid.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor, nn

from tal_models.config import require_positive_int


def _check(length: int, max_duration: int, num_samples: int, samples_per_bin: int, boundary_ratio: float) -> None:
    require_positive_int(length, "boundary matching: length", " (BMN: 100 on ActivityNet, 128 on THUMOS14)")
    require_positive_int(max_duration, "boundary matching: max_duration", " (BMN: 100 on ActivityNet, 64 on THUMOS14)")
    require_positive_int(num_samples, "boundary matching: num_samples", " (BMN: 32)")
    require_positive_int(samples_per_bin, "boundary matching: samples_per_bin", " (BMN: 3)")
    if max_duration > length:
        raise ValueError(f"boundary matching: max_duration ({max_duration}) must be <= length ({length})")
    if not (np.isfinite(boundary_ratio) and boundary_ratio >= 0):
        raise ValueError(f"boundary matching: boundary_ratio must be >= 0, got {boundary_ratio} (BMN: 0.5)")


@functools.lru_cache(maxsize=4)
def boundary_matching_weights(length: int, max_duration: int, num_samples: int, samples_per_bin: int, boundary_ratio: float) -> Tensor:
    """The BM layer's sampling weights ``[T, N, D, T]`` float32 (module docstring): entry ``[s, n, d, t]`` is
    the weight of cell ``s`` in bin ``n`` of proposal ``(d, t)``. Cached per arguments (the ActivityNet
    tensor is 128 MB): the returned tensor is shared, so never modify it in place."""
    _check(length, max_duration, num_samples, samples_per_bin, boundary_ratio)
    T, D, N, S = length, max_duration, num_samples, samples_per_bin
    d = np.arange(D, dtype=np.float64)[:, None]  # [D, 1]
    t = np.arange(T, dtype=np.float64)[None, :]  # [1, T]
    context = boundary_ratio * (d + 1.0)
    lo, hi = t - context, t + d + context  # [D, T] the sampled span, cell-centre coordinates
    frac = np.arange(N * S, dtype=np.float64) / max(N * S - 1, 1)  # [P]: 0 .. 1
    points = lo[..., None] + (hi - lo)[..., None] * frac  # [D, T, P]
    left = np.floor(points)
    w_right = points - left
    left = left.astype(np.int64)
    weights = np.zeros((T, N, D, T), dtype=np.float64)
    bins = np.broadcast_to(np.arange(N * S) // S, points.shape)  # [D, T, P]
    dd = np.broadcast_to(np.arange(D)[:, None, None], points.shape)
    tt = np.broadcast_to(np.arange(T)[None, :, None], points.shape)
    valid = np.broadcast_to((np.arange(D)[:, None] + np.arange(T)[None, :] < T)[..., None], points.shape)
    for cell, w in ((left, 1.0 - w_right), (left + 1, w_right)):
        inside = valid & (cell >= 0) & (cell < T)
        np.add.at(weights, (cell[inside], bins[inside], dd[inside], tt[inside]), w[inside] / S)
    out = torch.from_numpy(weights.astype(np.float32))
    out.requires_grad_(False)
    return out


def proposal_validity(length: int, max_duration: int, valid: Tensor | int | None = None) -> Tensor:
    """Which proposals ``(d, t)`` end inside the sequence: bool ``[D, T]`` (``t + d < length``), or, with
    ``valid [M]`` (valid cells of each of ``M`` sequences), ``[M, D, T]`` (``t + d < valid_m``)."""
    end = torch.arange(max_duration)[:, None] + torch.arange(length)[None, :]  # [D, T]: the last cell
    if valid is None:
        return end < length
    valid = torch.as_tensor(valid)
    return end.to(valid.device) < valid.reshape(-1, 1, 1)


class BoundaryMatching(nn.Module):
    """``x [B, C, T] -> [B, C, N, D, T]``: the ``N`` bin features of every proposal ``(d, t)`` (zeros for
    proposals ending beyond ``T``). The weights are a non-persistent buffer (rebuilt from the config, not
    stored in checkpoints), shared between layers of the same sizes; the matmul runs in ``x``'s dtype."""

    def __init__(self, length: int, max_duration: int, num_samples: int, samples_per_bin: int, boundary_ratio: float):
        super().__init__()
        self.length, self.max_duration, self.num_samples = length, max_duration, num_samples
        w = boundary_matching_weights(length, max_duration, num_samples, samples_per_bin, float(boundary_ratio))
        self.register_buffer("weights", w.view(length, -1), persistent=False)  # [T, N * D * T]

    def forward(self, x: Tensor) -> Tensor:
        B, C, T = x.shape
        torch._assert(self.length == T, f"BoundaryMatching: sequences must have {self.length} steps, got {T}")
        w = self.weights if self.weights.dtype == x.dtype else self.weights.to(x.dtype)
        out = torch.matmul(x.reshape(B * C, T), w)  # [B * C, N * D * T]
        return out.view(B, C, self.num_samples, self.max_duration, T)

    def project(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``forward(x)`` followed by a linear map over (channel, bin), ``weight [H, C, N]`` (BMN's Conv3d whose kernel
        spans the ``N`` bins): ``[B, C, T] -> [B, H, D * T]``. Both maps are linear, so they are applied in the cheaper
        order: sampling then mixing costs ``C T NDT + H C NDT`` multiply-adds, mixing the channels of every step first
        then sampling ``H C N T + H T NDT`` (2.5-3x fewer at BMN's published widths, H = 512, C = 256)."""
        B, C, T = x.shape
        torch._assert(self.length == T, f"BoundaryMatching: sequences must have {self.length} steps, got {T}")
        H, N, D = weight.shape[0], self.num_samples, self.max_duration
        weight = weight.to(x.dtype)
        w = self.weights if self.weights.dtype == x.dtype else self.weights.to(x.dtype)  # [T, N * D * T]
        if H * T < C * T + H * C:
            mixed = torch.einsum("ocn,bct->botn", weight, x).reshape(B, H, T * N)  # [B, H, (t, n)]
            out = torch.matmul(mixed, w.reshape(T * N, D * T))  # the weights' rows are (t, n) in that order
        else:
            out = torch.matmul(weight.reshape(H, C * N), self.forward(x).reshape(B, C * N, D * T))
        return out if bias is None else out + bias.to(x.dtype)[:, None]

    def extra_repr(self) -> str:
        return f"length={self.length}, max_duration={self.max_duration}, num_samples={self.num_samples}"
