"""The masking conventions in code: input checks, mask downsampling, masked max-pool and mean, the residual path."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def check_odd(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be an odd positive int ('same' padding needs a centre step), got {value!r}")


def check_stride(name: str, stride: int, allowed: tuple[int, ...] = (1, 2)) -> None:
    if stride not in allowed:
        raise ValueError(f"{name} stride must be one of {allowed}, got {stride!r}")


def check_inputs(x: Tensor, mask: Tensor, stride: int, who: str) -> None:
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


def residual(x: Tensor, mask: Tensor, stride: int) -> Tensor:
    """The residual path: identity, or a masked max-pool (kernel 3) at stride 2 -> ``[B, C, T / stride]``."""
    return x.masked_fill(~mask, 0.0) if stride == 1 else masked_max_pool(x, mask, 3, stride)[0]
