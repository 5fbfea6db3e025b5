"""One-to-one matching of set predictions to ground truth (DETR, TadTR): costs and the Hungarian step.

Legend: Q predictions (queries), N ground-truth segments, K classes.

Segments are ``(center, width)`` in unit time (TadTR's parametrisation). The matching cost of
prediction ``q`` and target ``n`` is (TadTR, Eq. 9 of the journal version, with DETR's focal
class term from Deformable DETR)::

    cost[q, n] = w_cls * focal(q, label_n) + w_seg * |seg_q - seg_n|_1 - w_iou * tIoU(seg_q, seg_n)

where ``focal(q, k) = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p))`` with
``p = sigmoid(logit[q, k])``: the focal loss of calling ``q`` class ``k`` minus that of calling it
background, so a confident right class costs least. ``hungarian_match`` then picks the
assignment of least total cost (each target to a distinct prediction when ``Q >= N``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from tal_models.structures import tiou


class MatchCosts(NamedTuple):
    """Weights of the three matching costs (TadTR's THUMOS14 values)."""

    cls: float = 6.0
    seg: float = 5.0
    iou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def center_width_to_bounds(segments: Tensor) -> Tensor:
    """``[..., 2]`` (center, width) -> ``[..., 2]`` (start, end), same unit."""
    c, w = segments[..., 0], segments[..., 1]
    return torch.stack([c - 0.5 * w, c + 0.5 * w], dim=-1)


def bounds_to_center_width(segments: Tensor) -> Tensor:
    """``[..., 2]`` (start, end) -> ``[..., 2]`` (center, width), same unit."""
    s, e = segments[..., 0], segments[..., 1]
    return torch.stack([0.5 * (s + e), e - s], dim=-1)


def pairwise_center_width_tiou(a: Tensor, b: Tensor) -> Tensor:
    """tIoU of every ``(center, width)`` segment of ``a [Q, 2]`` with every one of ``b [N, 2]`` -> ``[Q, N]``."""
    return tiou(center_width_to_bounds(a)[:, None, :], center_width_to_bounds(b)[None, :, :])


def match_cost(
    logits: Tensor, segments: Tensor, target_labels: Tensor, target_segments: Tensor, weights: MatchCosts | None = None
) -> Tensor:
    """The matching cost (module docstring) of predictions vs targets -> ``[Q, N]`` float32.

    Args:
        logits: ``[Q, K]`` class logits (sigmoid, no background class).
        segments: ``[Q, 2]`` predicted (center, width), unit time.
        target_labels: ``[N]`` int64 in ``0..K-1``.
        target_segments: ``[N, 2]`` (center, width), unit time.
        weights: the costs' weights and the focal term's ``alpha``, ``gamma`` (None: ``MatchCosts()``, TadTR's).
    """
    weights = MatchCosts() if weights is None else weights
    logits = logits.detach().float()
    prob = torch.sigmoid(logits)  # [Q, K]
    alpha, gamma = weights.focal_alpha, weights.focal_gamma
    # log-sigmoid of the logits (not log of the probability): exact where p rounds to 0 or 1
    log_p, log_1mp = torch.nn.functional.logsigmoid(logits), torch.nn.functional.logsigmoid(-logits)
    pos = alpha * (1.0 - prob) ** gamma * (-log_p)
    neg = (1.0 - alpha) * prob**gamma * (-log_1mp)
    cost_cls = (pos - neg)[:, target_labels]  # [Q, N]
    seg, tgt = segments.detach().float(), target_segments.float()
    cost_seg = torch.cdist(seg, tgt, p=1) if len(tgt) and len(seg) else seg.new_zeros(len(seg), len(tgt))
    cost_iou = -pairwise_center_width_tiou(seg, tgt)
    return weights.cls * cost_cls + weights.seg * cost_seg + weights.iou * cost_iou


def hungarian_match(cost: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """The assignment of least total cost of ``cost [Q, N]`` -> ``(query_idx [M], target_idx [M])``
    int64 (on the CPU), ``M = min(Q, N)``, sorted by query. NaN or infinite costs are refused."""
    c = cost.detach().cpu().double().numpy() if isinstance(cost, Tensor) else np.asarray(cost, np.float64)
    if c.ndim != 2:
        raise ValueError(f"hungarian_match: cost must be [Q, N], got shape {c.shape}")
    if c.size == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    if not np.isfinite(c).all():
        raise ValueError("hungarian_match: the cost matrix holds NaN or infinite values")
    rows, cols = linear_sum_assignment(c)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
