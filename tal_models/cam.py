"""Class activation sequences (CAS) for weakly supervised localization: pooling, segments, scores, sampling.

Legend: B batch, C channels, K classes (K + 1 with background), T steps (padded), n valid steps of
a video, L sampled steps, N segments, M thresholds.

A weakly supervised detector (``tal_models.detectors.weak``) learns from video-level labels only.
Its per-step class scores (the CAS ``[B, K, T]``) become video scores by multiple-instance pooling
(``topk_mil_pool``: the mean of each class's ``k`` best steps, W-TALC / STPN / BaS-Net); at
inference a class's activation in ``[0, 1]`` is cut into the runs above each of several thresholds
(``cam_segments``), each run scored by its outer-inner contrast (``outer_inner_contrast``, AutoLoc's
OIC, as BaS-Net and UM score their proposals). ``sample_video`` is the training-time length
reduction of those papers: a long video is subsampled, never cropped, since a crop could lose the
action a video-level label promises.

Step convention: step ``i`` stands for the clip centred on it, so the run of steps ``[a, b)``
covers ``[a - 0.5, b - 0.5]`` in fractional steps (as ``tal_models.dense.segments_from_scores``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from tal_models.config import require_positive_int

ArrayLike = np.ndarray | Tensor


def topk_mil_pool(cas: Tensor, mask: Tensor, ratio: int) -> Tensor:
    """Top-k multiple-instance pooling: per video and class, the mean of its ``k`` highest valid steps.

    Args:
        cas: ``[B, K, T]`` per-step scores (logits); any dtype, pooled in float32.
        mask: ``[B, 1, T]`` bool, True = valid; padded steps never enter, whatever they hold (NaN too).
        ratio: ``k = max(1, n // ratio)`` for a video of ``n`` valid steps (BaS-Net: 8), so videos of
            different lengths in one batch pool different numbers of steps.

    Returns:
        ``[B, K]`` float32; a video without any valid step gets 0.
    """
    require_positive_int(ratio, "topk_mil_pool: ratio", " (BaS-Net: 8)")
    n = mask[:, 0].sum(dim=-1)  # [B]
    k = torch.clamp(n // ratio, min=1)  # [B]
    k_max = int(min(int(k.max()), cas.shape[-1])) if cas.shape[0] else 1
    x = cas.float().masked_fill(~mask, -math.inf)  # masked_fill, not a product: padding may hold NaN
    top = x.topk(k_max, dim=-1).values  # [B, K, k_max], best first
    taken = torch.arange(k_max, device=cas.device) < torch.minimum(k, n)[:, None]  # [B, k_max]; a video of 0 steps takes none
    return top.masked_fill(~taken[:, None, :], 0.0).sum(dim=-1) / k[:, None].to(top.dtype)  # [B, K]


def cam_segments(cam: ArrayLike, thresholds: Sequence[float]) -> list[tuple[int, int]]:
    """The connected runs of ``cam >= thr`` for every threshold, as step intervals ``[start, end)``.

    Args:
        cam: ``[T]`` one class's activation over a video's valid steps (in ``[0, 1]``).
        thresholds: the ``M`` thresholds.

    Returns:
        The runs in threshold order, each threshold's runs in time order; a run found at several
        thresholds is listed once (its first occurrence).
    """
    cam = cam.detach().float().cpu().numpy() if isinstance(cam, Tensor) else np.asarray(cam, dtype=np.float64)
    if cam.ndim != 1:
        raise ValueError(f"cam_segments: cam must be [T], got shape {cam.shape}")
    thr = np.asarray(list(thresholds), dtype=np.float64).reshape(-1, 1)  # [M, 1]
    if thr.size == 0 or cam.size == 0:
        return []
    above = np.zeros((thr.shape[0], cam.shape[0] + 2), dtype=np.int8)  # [M, T + 2], a zero either side closes every run
    above[:, 1:-1] = cam[None, :] >= thr
    edges = np.diff(above, axis=1)  # [M, T + 1]: +1 where a run starts, -1 one past where it ends
    _, starts = np.nonzero(edges == 1)  # row-major: the runs of each threshold in time order
    _, ends = np.nonzero(edges == -1)
    return list(dict.fromkeys(zip(starts.tolist(), ends.tolist())))


def outer_inner_contrast(cam: ArrayLike, start: int, end: int, inflation: float = 0.25) -> float:
    """AutoLoc's outer-inner contrast of the run ``[start, end)`` of ``cam [T]``: the mean inside minus
    the mean of the outer region.

    The outer region is the run inflated by ``inflation * (end - start)`` steps on each side, rounded
    outwards (so any positive inflation reaches at least one step on each side that exists), clipped
    to ``[0, T)``, without the inside; its mean is 0 when it is empty (a run covering the video).
    """
    cam = cam.detach().float().cpu().numpy() if isinstance(cam, Tensor) else np.asarray(cam, dtype=np.float64)
    T = cam.shape[0]
    if not 0 <= start < end <= T:
        raise ValueError(f"outer_inner_contrast: need 0 <= start < end <= T = {T}, got [{start}, {end})")
    if not (math.isfinite(inflation) and inflation >= 0):
        raise ValueError(f"outer_inner_contrast: inflation must be >= 0, got {inflation} (AutoLoc / BaS-Net: 0.25)")
    pad = inflation * (end - start)
    lo, hi = max(0, math.floor(start - pad)), min(T, math.ceil(end + pad))
    inner = float(cam[start:end].mean())
    outer = np.concatenate([cam[lo:start], cam[end:hi]])
    return inner - (float(outer.mean()) if outer.size else 0.0)


def sample_video(
    features: ArrayLike,
    segments: ArrayLike,
    labels: ArrayLike,
    max_length: int,
    generator: torch.Generator | np.random.Generator | None = None,
) -> tuple[ArrayLike, ArrayLike, ArrayLike, float]:
    """The weakly supervised training sample of a video: at most ``max_length`` steps, subsampled.

    A video of ``T > max_length`` steps is cut into ``L = max_length`` equal bins of ``T / L`` steps
    (bin ``i`` holds steps ``floor(i T / L)`` to ``floor((i + 1) T / L) - 1``, never empty) and one
    step is taken from each: uniformly at random with ``generator`` (BaS-Net / UM's random
    perturbation), the bin's centre ``floor((i + 0.5) T / L)`` without (deterministic). Segments are
    scaled by ``L / T``; labels are unchanged (every action survives, at a coarser resolution).
    A video of at most ``max_length`` steps is returned unchanged.

    Args:
        features: ``[T, C]`` (the store's layout), NumPy or torch; returned in the same kind.
        segments: ``[N, 2]`` (start, end) in steps; labels ``[N]``.

    Returns:
        ``(features [L, C], segments [N, 2], labels [N], step_scale)``, ``step_scale = L / T`` (1.0
        when unchanged): a sampled step spans ``1 / step_scale`` original steps.
    """
    require_positive_int(max_length, "sample_video: max_length", " (BaS-Net / UM on THUMOS14: 750)")
    if segments.ndim != 2 or segments.shape[1] != 2 or labels.shape[0] != segments.shape[0]:
        raise ValueError(f"sample_video: expected segments [N, 2] and labels [N], got {tuple(segments.shape)} and {tuple(labels.shape)}")
    T, L = features.shape[0], max_length
    if T <= L:
        return features, segments, labels, 1.0
    lo = np.floor(np.arange(L) * T / L).astype(np.int64)  # [L] first step of each bin
    hi = np.floor(np.arange(1, L + 1) * T / L).astype(np.int64)  # [L] one past its last step
    if generator is None:
        idx = np.floor((np.arange(L) + 0.5) * T / L).astype(np.int64)
    else:
        u = (
            generator.random(L)
            if isinstance(generator, np.random.Generator)
            else torch.rand(L, generator=generator, dtype=torch.float64).numpy()
        )
        idx = np.minimum(lo + np.floor(u * (hi - lo)).astype(np.int64), hi - 1)
    scale = L / T
    if isinstance(features, Tensor):
        return features[torch.from_numpy(idx).to(features.device)], segments * scale, labels, scale
    return np.asarray(features)[idx], segments * scale, labels, scale
