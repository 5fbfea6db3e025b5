"""Label assignment of anchor-free points, and the regression encoding (ActionFormer's rules).

Legend: B batch, P points (all pyramid levels), N ground-truth segments of one video, K classes.

Ground truth is in *input steps* (steps of the feature sequence handed to the model, the
pyramid's level-0 grid; ``FeatureTiming.segments_to_steps`` converts from seconds). A point at
``position`` with stride ``s`` is **positive** for a segment ``(start, end)`` when

1. it lies strictly inside the segment; with centre sampling (the default), strictly inside the
   segment's centre region ``centre -/+ center_radius * s`` clipped to the segment: long
   segments are learnt by points near their centre only, short ones by every point inside;
2. the segment's larger distance to the point, ``max(position - start, end - position)``,
   lies in the point's regression range (both ends inclusive): long segments go to coarse levels.

A point positive for several segments learns the **shortest** (the easiest to regress). Segments
whose lengths are within ``EQUAL_LENGTH_TOLERANCE`` steps of the shortest also set their class:
ActionFormer does this for THUMOS14, where every CliffDiving instance is also annotated, with the
same boundaries, as Diving; the point then has a multi-hot class target, and its regression
target is that of the shortest segment (the first in input order among exact ties).

Regression targets are the distances ``(position - start, end - position)`` divided by the
point's stride (``segments_to_offsets``); ``offsets_to_segments`` is the exact inverse up to
float rounding of the subtraction. Background points get class target 0 and regression target
``(0, 0)``; a video without ground truth is all background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from tal_models.points import Points
from tal_models.structures import Segments, Unit

# ActionFormer's "multiple actions with very similar durations" tolerance, in input steps.
EQUAL_LENGTH_TOLERANCE = 1e-3


class PointTargets(NamedTuple):
    """Training targets of every point: ``cls_targets [..., P, K]`` (1 for a positive class, else 0)
    and ``reg_targets [..., P, 2]`` (start, end) distances in strides (0 for background)."""

    cls_targets: Tensor
    reg_targets: Tensor

    def positive(self) -> Tensor:
        """``[..., P]`` bool: points with at least one positive class."""
        return self.cls_targets.sum(dim=-1) > 0


# --- the regression encoding -----------------------------------------------------------------
def segments_to_offsets(points: Points, segments: Tensor) -> Tensor:
    """Segments ``[..., P, 2]`` (input steps), one per point -> offsets ``[..., P, 2]``:
    ``((position - start) / stride, (end - position) / stride)``."""
    torch._assert(segments.shape[-2:] == (len(points), 2), f"segments must be [..., P={len(points)}, 2], got {tuple(segments.shape)}")
    pos, stride = points.position.to(segments.dtype), points.stride.to(segments.dtype)  # [P]
    return torch.stack(((pos - segments[..., 0]) / stride, (segments[..., 1] - pos) / stride), dim=-1)


def offsets_to_segments(points: Points, offsets: Tensor) -> Tensor:
    """Offsets ``[..., P, 2]`` (in strides, as regressed) -> segments ``[..., P, 2]`` in input steps:
    ``(position - offsets[..., 0] * stride, position + offsets[..., 1] * stride)``."""
    torch._assert(offsets.shape[-2:] == (len(points), 2), f"offsets must be [..., P={len(points)}, 2], got {tuple(offsets.shape)}")
    dtype = offsets.dtype if offsets.is_floating_point() else points.position.dtype
    pos, stride = points.position.to(dtype), points.stride.to(dtype)  # [P]
    return torch.stack((pos - offsets[..., 0] * stride, pos + offsets[..., 1] * stride), dim=-1)


# --- label assignment ------------------------------------------------------------------------
def assign_targets_single_video(
    points: Points,
    segments: Segments | Tensor,
    labels: Tensor | Sequence[int],
    num_classes: int,
    center_sample: bool = True,
    center_radius: float = 1.5,
) -> PointTargets:
    """Targets of every point for one video (rules in the module docstring).

    Args:
        points: the ``P`` points of the pyramid.
        segments: ``[N, 2]`` ground truth in input steps (``Segments`` must be in ``Unit.STEPS``).
        labels: ``[N]`` integer classes in ``[0, K)`` (not checked here: ``collate`` does it, on the host).
        num_classes: ``K``.
        center_sample: restrict positives to the centre region of each segment.
        center_radius: half-width of the centre region, in strides of the point's level.

    Returns:
        ``PointTargets(cls_targets [P, K], reg_targets [P, 2])`` on the points' device, in the
        floating dtype of the points and segments promoted together.
    """
    segs = _steps_tensor(segments, points.device)  # [N, 2]
    labels = torch.as_tensor(labels, device=points.device).long().reshape(-1)  # [N]
    num_gt = segs.shape[0]
    if labels.shape[0] != num_gt:
        raise ValueError(f"{num_gt} segments but {labels.shape[0]} labels")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not center_radius > 0:
        raise ValueError(f"center_radius must be > 0 (in strides), got {center_radius} (ActionFormer: 1.5)")

    dtype = torch.promote_types(points.position.dtype, segs.dtype)
    num_points = len(points)
    cls_targets = torch.zeros(num_points, num_classes, dtype=dtype, device=points.device)
    reg_targets = torch.zeros(num_points, 2, dtype=dtype, device=points.device)
    if num_gt == 0 or num_points == 0:
        return PointTargets(cls_targets, reg_targets)

    segs = segs.to(dtype)
    start, end = segs[:, 0][None, :], segs[:, 1][None, :]  # [1, N]
    left, right, candidate = _candidates(points, segs, center_radius if center_sample else None)  # [P, N] each
    stride = points.stride.to(dtype)[:, None]  # [P, 1]

    candidate_length = torch.where(candidate, end - start, torch.inf)  # [P, N]; inf: not a candidate
    shortest, which = candidate_length.min(dim=1)  # [P], [P]; ties: the first segment
    positive = torch.isfinite(shortest)  # [P]
    shares = torch.isfinite(candidate_length) & (candidate_length <= shortest[:, None] + EQUAL_LENGTH_TOLERANCE)  # [P, N]
    cls_targets.scatter_reduce_(1, labels[None, :].expand(num_points, num_gt), shares.to(dtype), reduce="amax")  # [P, K]

    chosen = torch.stack((left, right), dim=-1)[torch.arange(num_points, device=points.device), which]  # [P, N, 2] -> [P, 2]
    reg_targets = torch.where(positive[:, None], chosen / stride, reg_targets)
    return PointTargets(cls_targets, reg_targets)


def _candidates(points: Points, segs: Tensor, center_radius: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Rules 1 and 2 of the module docstring for every (point, segment): ``segs [N, 2]`` (input steps, float)
    -> the distances ``left``, ``right`` ``[P, N]`` (input steps) and the bool ``candidate [P, N]``: strictly
    inside the segment (``center_radius=None``) or its centre region, and in the point's regression range."""
    pos = points.position.to(segs.dtype)[:, None]  # [P, 1]
    stride = points.stride.to(segs.dtype)[:, None]  # [P, 1]
    reg_range = points.reg_range.to(segs.dtype)  # [P, 2]
    start, end = segs[:, 0][None, :], segs[:, 1][None, :]  # [1, N]
    left, right = pos - start, end - pos  # [P, N] distances in input steps
    if center_radius is not None:
        centre = (start + end) / 2  # [1, N]
        lo = torch.maximum(centre - center_radius * stride, start)  # [P, N]
        hi = torch.minimum(centre + center_radius * stride, end)  # [P, N]
        inside = (pos > lo) & (pos < hi)  # [P, N]
    else:
        inside = (left > 0) & (right > 0)  # [P, N]
    reach = torch.maximum(left, right)  # [P, N]
    in_range = (reach >= reg_range[:, 0:1]) & (reach <= reg_range[:, 1:2])  # [P, N]
    return left, right, inside & in_range


def assign_targets(
    points: Points,
    segments: Sequence[Segments | Tensor],
    labels: Sequence[Tensor | Sequence[int]],
    num_classes: int,
    center_sample: bool = True,
    center_radius: float = 1.5,
) -> PointTargets:
    """``assign_targets_single_video`` for each of ``B`` videos, stacked:
    ``PointTargets(cls_targets [B, P, K], reg_targets [B, P, 2])``."""
    if len(segments) != len(labels):
        raise ValueError(f"{len(segments)} segment sets but {len(labels)} label sets")
    if not segments:
        raise ValueError("assign_targets needs at least one video")
    per_video = [
        assign_targets_single_video(points, s, lab, num_classes, center_sample=center_sample, center_radius=center_radius)
        for s, lab in zip(segments, labels)
    ]
    return PointTargets(torch.stack([t.cls_targets for t in per_video]), torch.stack([t.reg_targets for t in per_video]))


class CenterSamplingAssigner:
    """ActionFormer's label assignment as a part of a detector: ``assigner(points, segments, labels)``
    -> ``PointTargets(cls_targets [B, P, K], reg_targets [B, P, 2])`` (rules in the module docstring).

    A detector takes its assigner built (``tal_models.detectors.build``); another rule is another
    class with the same call (``DynamicAssigner``, which also reads the predictions).
    """

    def __init__(self, num_classes: int, center_sample: bool = True, center_radius: float = 1.5):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not center_radius > 0:
            raise ValueError(f"center_radius must be > 0 (in strides), got {center_radius} (ActionFormer: 1.5)")
        self.num_classes, self.center_sample, self.center_radius = num_classes, center_sample, center_radius

    def __call__(
        self,
        points: Points,
        segments: Sequence[Segments | Tensor],
        labels: Sequence[Tensor | Sequence[int]],
        cls_logits: Tensor | None = None,
        reg_offsets: Tensor | None = None,
    ) -> PointTargets:
        """``cls_logits``/``reg_offsets`` (the predictions, which a dynamic assigner reads) are ignored here."""
        return assign_targets(
            points, segments, labels, self.num_classes, center_sample=self.center_sample, center_radius=self.center_radius
        )

    def __repr__(self) -> str:
        return f"CenterSamplingAssigner(num_classes={self.num_classes}, center_sample={self.center_sample}, center_radius={self.center_radius})"


def _steps_tensor(segments: Segments | Tensor | np.ndarray, device: torch.device) -> Tensor:
    if isinstance(segments, Segments):
        if segments.unit is not Unit.STEPS:
            raise ValueError(
                f"ground truth must be in input steps, got {segments.unit.value} (convert with FeatureTiming.segments_to_steps)"
            )
        segments = segments.data
    segs = torch.as_tensor(segments, device=device)
    if not segs.is_floating_point():
        segs = segs.float()
    if segs.ndim == 1 and segs.shape[0] == 0:
        segs = segs.reshape(0, 2)
    if segs.ndim != 2 or segs.shape[1] != 2:
        raise ValueError(f"segments must be [N, 2] (start, end), got {tuple(segs.shape)}")
    return segs


# --- dynamic assignment (SimOTA-style) -------------------------------------------------------
class DynamicAssigner:
    """Cost-based dynamic label assignment (YOLOX's SimOTA, as TemporalMaxer uses it in TAL), from
    the current predictions: ``assigner(points, segments, labels, cls_logits [B, P, K],
    reg_offsets [B, P, 2])`` -> ``PointTargets``.

    Per video, a point is a **candidate** for a segment by the centre-sampling rules above (centre
    region of ``center_radius`` strides, regression range). Each (candidate, segment) pair costs

        cost = BCE(logits, one-hot(class)) + iou_weight * -log(IoU(predicted segment, segment))

    (the BCE summed over classes is ``sum_k softplus(l_k) - l_class``). Each segment takes its
    ``k`` cheapest candidates, ``k = max(min_k, floor(sum of its topq best IoUs))``: segments
    that the model already localises well get more positives. A point taken by several segments
    keeps the cheapest; its class target also holds the labels of segments with the same
    boundaries (within ``EQUAL_LENGTH_TOLERANCE``) that took it too (THUMOS14's duplicate
    CliffDiving/Diving instances). The assignment reads the predictions without gradient.
    Without predictions (``cls_logits is None``) it falls back to centre sampling.
    """

    def __init__(self, num_classes: int, center_radius: float = 2.5, iou_weight: float = 3.0, topq: int = 10, min_k: int = 1):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not center_radius > 0:
            raise ValueError(f"center_radius must be > 0 (in strides), got {center_radius}")
        if not iou_weight >= 0 or topq < 1 or min_k < 1:
            raise ValueError(f"need iou_weight >= 0, topq >= 1, min_k >= 1; got {iou_weight}, {topq}, {min_k}")
        self.num_classes, self.center_radius = num_classes, center_radius
        self.iou_weight, self.topq, self.min_k = iou_weight, topq, min_k

    def __call__(
        self,
        points: Points,
        segments: Sequence[Segments | Tensor],
        labels: Sequence[Tensor | Sequence[int]],
        cls_logits: Tensor | None = None,
        reg_offsets: Tensor | None = None,
    ) -> PointTargets:
        if cls_logits is None or reg_offsets is None:
            return assign_targets(points, segments, labels, self.num_classes, center_sample=True, center_radius=self.center_radius)
        if len(segments) != len(labels) or len(segments) != cls_logits.shape[0]:
            raise ValueError(f"{len(segments)} segment sets, {len(labels)} label sets, {cls_logits.shape[0]} predictions")
        with torch.no_grad():
            per_video = [
                self._single_video(points, s, lab, logits, offsets)
                for s, lab, logits, offsets in zip(segments, labels, cls_logits.detach(), reg_offsets.detach())
            ]
        return PointTargets(torch.stack([t.cls_targets for t in per_video]), torch.stack([t.reg_targets for t in per_video]))

    def _single_video(self, points: Points, segments, labels, logits: Tensor, offsets: Tensor) -> PointTargets:
        """``logits [P, K]``, ``offsets [P, 2]`` (strides) -> targets ``[P, K]``, ``[P, 2]``."""
        segs = _steps_tensor(segments, points.device)  # [N, 2]
        labels = torch.as_tensor(labels, device=points.device).long().reshape(-1)  # [N]
        if labels.shape[0] != segs.shape[0]:
            raise ValueError(f"{segs.shape[0]} segments but {labels.shape[0]} labels")
        dtype = torch.promote_types(points.position.dtype, segs.dtype)
        P, N = len(points), segs.shape[0]
        cls_targets = torch.zeros(P, self.num_classes, dtype=dtype, device=points.device)
        reg_targets = torch.zeros(P, 2, dtype=dtype, device=points.device)
        if N == 0 or P == 0:
            return PointTargets(cls_targets, reg_targets)

        stride = points.stride.to(dtype)[:, None]  # [P, 1]
        segs = segs.to(dtype)
        start, end = segs[:, 0][None, :], segs[:, 1][None, :]  # [1, N]
        left, right, candidate = _candidates(points, segs, self.center_radius)  # [P, N] each

        predicted = offsets_to_segments(points, offsets.to(dtype))  # [P, 2] in input steps
        overlap = (torch.minimum(predicted[:, 1:2], end) - torch.maximum(predicted[:, 0:1], start)).clamp(min=0)  # [P, N]
        union = (predicted[:, 1:2] - predicted[:, 0:1]).clamp(min=0) + (end - start) - overlap
        iou = torch.where(candidate, overlap / union.clamp(min=1e-6), 0.0)  # [P, N]
        logits = logits.to(dtype)
        cls_cost = torch.nn.functional.softplus(logits).sum(dim=1, keepdim=True) - logits[:, labels]  # [P, N]
        cost = torch.where(candidate, cls_cost - self.iou_weight * torch.log(iou + 1e-8), torch.inf)  # [P, N]

        num_candidates = candidate.sum(dim=0)  # [N]
        q = min(self.topq, P)
        k = iou.topk(q, dim=0).values.sum(dim=0).floor().long().clamp(min=self.min_k)  # [N]
        k = torch.minimum(k, num_candidates)
        order = cost.argsort(dim=0)  # [P, N]: cheapest first (non-candidates, at inf, last)
        rank = torch.empty_like(order)
        rank.scatter_(0, order, torch.arange(P, device=points.device)[:, None].expand(P, N))
        chosen = candidate & (rank < k[None, :])  # [P, N]

        best_cost, which = torch.where(chosen, cost, torch.inf).min(dim=1)  # [P]
        positive = torch.isfinite(best_cost)
        chosen_seg = segs[which]  # [P, 2]
        same = chosen & ((segs[None, :, :] - chosen_seg[:, None, :]).abs().amax(dim=-1) <= EQUAL_LENGTH_TOLERANCE)  # [P, N]
        cls_targets.scatter_reduce_(1, labels[None, :].expand(P, N), same.to(dtype), reduce="amax")
        chosen_reg = torch.stack((left, right), dim=-1)[torch.arange(P, device=points.device), which]  # [P, 2]
        reg_targets = torch.where(positive[:, None], chosen_reg / stride, reg_targets)
        return PointTargets(cls_targets, reg_targets)

    def __repr__(self) -> str:
        return (
            f"DynamicAssigner(num_classes={self.num_classes}, center_radius={self.center_radius}, "
            f"iou_weight={self.iou_weight}, topq={self.topq}, min_k={self.min_k})"
        )
