"""Dense head outputs -> detections in seconds (pure functions, ActionFormer's inference order).

Legend: B batch, P points (all pyramid levels), T_l points of level l, K classes, N candidates.

For one video:
1. scores are ``sigmoid(cls_logits)``, one per (point, class); padded points (``valid`` False)
   are never candidates;
2. per pyramid level, the ``pre_nms_topk`` best (point, class) pairs scoring above
   ``pre_nms_threshold`` are kept (ActionFormer filters level by level, so a level full of
   confident short segments cannot crowd out the few candidates of the coarse levels);
3. each candidate's offsets become a segment in input steps (``offsets_to_segments``); segments
   not longer than ``min_length`` steps are dropped;
4. steps -> seconds with ``FeatureTiming.segments_to_seconds``, then clipped to ``[0, duration]``
   (ActionFormer clips after NMS; clipping first lets NMS and score voting see the segments that
   are reported); a candidate left with no length (wholly past the end) is dropped;
5. ``postprocess(..., nms)``: NMS and its own global threshold / top-k (``NMSConfig``).

Steps and seconds: a point's position is an index into the level-0 grid, i.e. into the feature
sequence handed to the model, and step ``i`` of that sequence is feature step ``i`` of the store
(row ``i`` of ``FeatureSequence.features``, whose timestamp is ``timing.step_to_seconds(i)``).
A sequence cropped to start at store step ``s0`` needs the timing of the crop:
``FeatureTiming(fps, stride, window, offset + s0 * stride / fps)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tal_models.config import require_positive_int
from tal_models.points import Points
from tal_models.postprocess import NMSConfig, postprocess
from tal_models.structures import Detections, Segments, Unit
from tal_models.targets import offsets_to_segments
from tal_models.timing import FeatureTiming


@torch.no_grad()
def decode_single_video(
    points: Points,
    cls_logits: Tensor,
    reg_offsets: Tensor,
    valid: Tensor,
    timing: FeatureTiming,
    duration: float | None,
    video_id: str,
    nms: NMSConfig,
    pre_nms_threshold: float = 0.001,
    pre_nms_topk: int = 5000,
    min_length: float = 0.05,
) -> Detections:
    """Detections of one video, in seconds (steps in the module docstring).

    Args:
        points: the ``P`` points of the pyramid.
        cls_logits: ``[P, K]`` classification logits.
        reg_offsets: ``[P, 2]`` predicted (start, end) distances, in strides of each point's level.
        valid: ``[P]`` bool, False at padded steps.
        timing: timing of the feature sequence the model saw (its step 0 is the points' position 0).
        duration: the video's duration in seconds, to clip to; ``None``: clip at 0 only.
        video_id: carried into the detections.
        nms: post-processing after decoding.
        pre_nms_threshold: candidates need ``score > pre_nms_threshold``.
        pre_nms_topk: candidates kept per pyramid level.
        min_length: candidates need a length ``> min_length`` input steps.

    Returns:
        ``Detections`` in ``Unit.SECONDS`` on the inputs' device, sorted by score, at most
        ``nms.max_detections``.
    """
    num_points = len(points)
    torch._assert(
        cls_logits.ndim == 2 and cls_logits.shape[0] == num_points, f"cls_logits must be [P={num_points}, K], got {tuple(cls_logits.shape)}"
    )
    torch._assert(reg_offsets.shape == (num_points, 2), f"reg_offsets must be [P={num_points}, 2], got {tuple(reg_offsets.shape)}")
    torch._assert(valid.shape == (num_points,), f"valid must be [P={num_points}], got {tuple(valid.shape)}")
    if not pre_nms_threshold >= 0:
        raise ValueError(f"pre_nms_threshold must be >= 0, got {pre_nms_threshold} (ActionFormer: 0.001)")
    require_positive_int(pre_nms_topk, "pre_nms_topk", " (per level) (ActionFormer: 5000)")
    if not min_length >= 0:
        raise ValueError(f"min_length must be >= 0 input steps, got {min_length} (ActionFormer: 0.05)")
    if duration is not None and not duration >= 0:
        raise ValueError(f"duration must be >= 0 seconds or None, got {duration}")

    num_classes = cls_logits.shape[1]
    scores = _upcast(cls_logits).sigmoid()  # [P, K]
    scores = torch.where(valid.bool()[:, None], scores, -1.0)  # padded points sort last and fail the threshold

    # 2. per level, the best `pre_nms_topk` (point, class) pairs; those not above the threshold go below
    picked_scores, picked_index = [], []
    for level in points.level_slices():
        flat = scores[level].reshape(-1)  # [T_l, K] -> [T_l * K]
        order = torch.sort(flat, descending=True, stable=True).indices[:pre_nms_topk]  # ties: earlier point, lower class
        picked_scores.append(flat[order])
        picked_index.append(order + level.start * num_classes)  # index into [P * K]
    cand_scores, cand_index = torch.cat(picked_scores), torch.cat(picked_index)  # [N], [N]
    keep = cand_scores > pre_nms_threshold
    cand_scores, cand_index = cand_scores[keep], cand_index[keep]
    point_index = torch.div(cand_index, num_classes, rounding_mode="floor")  # [N]
    cand_labels = cand_index % num_classes  # [N]

    # 3. offsets -> segments in input steps; too short ones go
    segs = offsets_to_segments(points, _upcast(reg_offsets))[point_index]  # [P, 2] -> [N, 2]
    long_enough = (segs[:, 1] - segs[:, 0]) > min_length
    segs, cand_scores, cand_labels = segs[long_enough], cand_scores[long_enough], cand_labels[long_enough]

    # 4. -> seconds, inside the video
    seconds = timing.segments_to_seconds(Segments(segs, Unit.STEPS, check=False))
    upper = float(duration) if duration is not None else torch.inf
    seconds = seconds.clip(0.0, upper)
    inside = seconds.data[:, 1] > seconds.data[:, 0]  # wholly beyond the end: nothing left to report
    candidates = Detections(video_id, seconds[inside], cand_scores[inside], cand_labels[inside])

    # 5. NMS; score voting averages segments, which float rounding can push past the end
    detections = postprocess(candidates, nms)
    if nms.voting_threshold is not None and len(detections):
        detections = Detections(video_id, detections.segments.clip(0.0, upper), detections.scores, detections.labels)
    return detections


@torch.no_grad()
def decode(
    points: Points,
    cls_logits: Tensor,
    reg_offsets: Tensor,
    valid: Tensor,
    timings: FeatureTiming | Sequence[FeatureTiming],
    durations: Sequence[float | None],
    video_ids: Sequence[str],
    nms: NMSConfig,
    pre_nms_threshold: float = 0.001,
    pre_nms_topk: int = 5000,
    min_length: float = 0.05,
) -> list[Detections]:
    """``decode_single_video`` for each of ``B`` videos: ``cls_logits [B, P, K]``,
    ``reg_offsets [B, P, 2]``, ``valid [B, P]``; ``timings`` one per video or one for all."""
    b = cls_logits.shape[0]
    torch._assert(reg_offsets.shape[0] == b and valid.shape[0] == b, f"batch sizes disagree: {b}, {reg_offsets.shape[0]}, {valid.shape[0]}")
    if isinstance(timings, FeatureTiming):
        timings = [timings] * b
    if not (len(timings) == len(durations) == len(video_ids) == b):
        raise ValueError(f"batch of {b} videos but {len(timings)} timings, {len(durations)} durations and {len(video_ids)} video ids")
    return [
        decode_single_video(
            points,
            cls_logits[i],
            reg_offsets[i],
            valid[i],
            timings[i],
            durations[i],
            video_ids[i],
            nms,
            pre_nms_threshold=pre_nms_threshold,
            pre_nms_topk=pre_nms_topk,
            min_length=min_length,
        )
        for i in range(b)
    ]


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
