"""Pseudo ground truth from a detector's detections: the bridge from weak to full supervision.

Legend: N detections of a video, M kept.

A weakly supervised detector (``tal_models.detectors.weak``) trained from video-level labels
localizes actions on the training videos; its confident detections, selected here, become the
segments of a fully supervised preset's training annotations (a one-stage detector trained on
them, as the pseudo-label stage of two-stage WTAL methods). Pure NumPy on ``Detections``: no model,
no I/O; the caller writes the result out as annotations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from tal_models.structures import Detections, pairwise_tiou


def select_pseudo_labels(
    detections: Mapping[str, Detections], *, threshold: float, top_k: int, min_length_s: float = 0.0, merge_tiou: float = 0.7
) -> dict[str, Detections]:
    """Per video, the detections confident enough to serve as pseudo ground truth.

    In order: detections scoring ``>= threshold``; those shorter than ``min_length_s`` (in the
    detections' unit, seconds for a detector's output) dropped; at most ``top_k`` per class, the
    best; then duplicates merged: within a class, a detection overlapping a better one with tIoU
    ``> merge_tiou`` is dropped (the better one is kept, as is).

    Args:
        detections: ``{video id: Detections}``, NumPy or torch backed.

    Returns:
        ``{video id: Detections}`` NumPy backed, in the input's unit, each sorted by score (highest
        first, ties in input order); every video of the input is present, possibly empty.
    """
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"select_pseudo_labels: threshold must be a number >= 0, got {threshold}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"select_pseudo_labels: top_k must be a positive int, got {top_k!r}")
    if not (math.isfinite(min_length_s) and min_length_s >= 0):
        raise ValueError(f"select_pseudo_labels: min_length_s must be >= 0, got {min_length_s}")
    if not 0.0 < merge_tiou <= 1.0:
        raise ValueError(f"select_pseudo_labels: merge_tiou must be in (0, 1], got {merge_tiou} (typical: 0.7)")
    return {vid: _select_single_video(dets, threshold, top_k, min_length_s, merge_tiou) for vid, dets in detections.items()}


def _select_single_video(dets: Detections, threshold: float, top_k: int, min_length: float, merge_tiou: float) -> Detections:
    dets = dets.to_numpy().sorted_by_score()
    dets = dets[(dets.scores >= threshold) & (dets.segments.lengths() >= min_length)]
    if len(dets) == 0:
        return dets
    # rank of each detection within its class (best first, the order is already by score)
    rank = np.zeros(len(dets), dtype=np.int64)
    for c in np.unique(dets.labels):
        where = np.flatnonzero(dets.labels == c)
        rank[where] = np.arange(where.size)
    dets = dets[rank < top_k]
    same_class = dets.labels[:, None] == dets.labels[None, :]  # [N, N]
    overlap = (pairwise_tiou(dets.segments, dets.segments) > merge_tiou) & same_class  # [N, N]
    keep = np.zeros(len(dets), dtype=bool)
    for i in range(len(dets)):  # greedy, best first: a detection survives unless a kept better one covers it
        keep[i] = not (overlap[i, :i] & keep[:i]).any()
    return dets[keep]
