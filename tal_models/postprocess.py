"""Post-processing of dense detections in pure PyTorch: threshold, top-k, NMS, score voting, fusion.

Legend: N candidates, M kept detections, K classes, C video classes scored by an external
classifier (k of them kept by fusion); in the NMS loop R classes (rows) of one padded table of
width W, S steps, P picks.

No compiled extension: every function runs wherever its tensors live (CPU or CUDA).

Greedy NMS, hard or soft, runs as one loop over *steps*, not over classes. Classes are independent,
so candidates are laid out one class per row of a padded ``[R, W]`` table and every step picks the
current maximum of every row at once. Scores only ever decay, so a row's picks come out in
decreasing order: pick order is final-score order, and the loop may stop after
``max_detections`` steps, when every row's maximum is below ``min_score``, or as soon as
``max_detections`` picks beat everything still waiting. The tIoU of each row's pick with its row
is computed on the fly (``[R, W]`` per step), never as an ``[N, N]`` matrix. Classes of very
different sizes go to different tables (see ``_class_tables``), run one after the other.

Scores are carried as logarithms inside the loop: a decay is an addition (Gaussian Soft-NMS is a
single ``addcmul``), a removed candidate is ``-inf``, and ``-inf`` plus any decay is still
``-inf`` (a product ``-inf * 0`` would be NaN). Hence a candidate whose score is, or decays to,
exactly 0 is never kept, whatever ``min_score``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from tal_models.config import require_positive_int
from tal_models.structures import Detections, Segments, pairwise_tiou

NMSMethod = Literal["hard", "soft_linear", "soft_gaussian", "none"]
_METHODS = ("hard", "soft_linear", "soft_gaussian", "none")


@dataclass(frozen=True)
class NMSConfig:
    """How ``postprocess`` turns dense candidates into detections.

    Order of operations: ``score > pre_nms_threshold`` -> ``pre_nms_topk`` (over all classes)
    -> NMS (``method``; per class unless ``class_agnostic``) -> score voting (when
    ``voting_threshold`` is set) -> the ``max_detections`` best, sorted by score.
    """

    method: NMSMethod = "soft_gaussian"
    iou_threshold: float = 0.5  # hard: suppress tIoU >= this; soft_linear: decay tIoU >= this
    sigma: float = 0.5  # soft_gaussian: score *= exp(-tIoU^2 / sigma)
    min_score: float = 0.001  # candidates whose (decayed) score is below are dropped
    max_detections: int = 200  # kept after NMS, over all classes
    pre_nms_topk: int | None = None  # None: no cap before NMS
    pre_nms_threshold: float = 0.0  # candidates need score > this
    class_agnostic: bool = False
    voting_threshold: float | None = None  # None: no score voting

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"NMSConfig.method must be one of {_METHODS}, got {self.method!r}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"NMSConfig.iou_threshold must be in (0, 1], got {self.iou_threshold} (typical: 0.5)")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"NMSConfig.sigma must be a positive number, got {self.sigma} (typical: 0.5)")
        if not (math.isfinite(self.min_score) and self.min_score >= 0):
            raise ValueError(f"NMSConfig.min_score must be >= 0, got {self.min_score} (typical: 0.001)")
        require_positive_int(self.max_detections, "NMSConfig.max_detections", " (typical: 200)")
        if self.pre_nms_topk is not None and (
            isinstance(self.pre_nms_topk, bool) or not isinstance(self.pre_nms_topk, int) or self.pre_nms_topk < 1
        ):
            raise ValueError(f"NMSConfig.pre_nms_topk must be a positive int or None (no cap), got {self.pre_nms_topk!r}")
        if not (math.isfinite(self.pre_nms_threshold) and self.pre_nms_threshold >= 0):
            raise ValueError(f"NMSConfig.pre_nms_threshold must be >= 0, got {self.pre_nms_threshold}")
        if self.voting_threshold is not None and not 0.0 < self.voting_threshold <= 1.0:
            raise ValueError(
                f"NMSConfig.voting_threshold must be in (0, 1] or None (no voting), got {self.voting_threshold} (typical: 0.75)"
            )


# --- greedy NMS ------------------------------------------------------------------------------
def hard_nms(
    segments: Segments | Tensor,
    scores: Tensor,
    labels: Tensor | None = None,
    *,
    iou_threshold: float = 0.5,
    min_score: float = 0.0,
    max_detections: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Greedy NMS: keep the best candidate, remove those with tIoU >= ``iou_threshold`` with it, repeat.

    Args:
        segments: ``[N, 2]`` (start, end), any unit (tIoU is unit-free).
        scores: ``[N]`` non-negative; candidates scoring below ``min_score``, or 0, are never kept.
        labels: ``[N]`` integer classes, suppression only within a class; ``None``: class-agnostic.
        max_detections: keep at most this many in all; ``None``: no cap.

    Returns:
        ``keep [M]`` (int64 indices into the inputs) and ``scores [M]`` (unchanged by hard NMS),
        sorted by score, highest first; equal scores in index order.
    """
    _check_threshold(iou_threshold)
    return _greedy_nms(segments, scores, labels, "hard", iou_threshold, 1.0, min_score, max_detections)


def soft_nms(
    segments: Segments | Tensor,
    scores: Tensor,
    labels: Tensor | None = None,
    *,
    method: Literal["linear", "gaussian"] = "gaussian",
    iou_threshold: float = 0.5,
    sigma: float = 0.5,
    min_score: float = 0.001,
    max_detections: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al., ICCV 2017): keep the best, decay the others' scores by their tIoU with it, repeat.

    ``linear``: ``score *= 1 - tIoU`` where ``tIoU >= iou_threshold`` (the paper's ">= N_t", as in
    ActionFormer's C++; the widely copied Cython ``cpu_soft_nms`` uses ">"). ``gaussian``: ``score *= exp(-tIoU^2 / sigma)``
    for every candidate. A candidate whose decayed score falls below ``min_score`` is dropped; one
    below ``min_score`` from the start is dropped too (ActionFormer keeps it until a first decay).
    Among equal scores the lowest index is taken first.

    Args:
        segments: ``[N, 2]`` (start, end), any unit.
        scores: ``[N]`` non-negative.
        labels: ``[N]`` integer classes, decay only within a class; ``None``: class-agnostic.
        max_detections: keep at most this many in all; ``None``: no cap.

    Returns:
        ``keep [M]`` (int64 indices into the inputs) and their decayed ``scores [M]``, sorted by
        score, highest first; equal scores in index order.
    """
    if method not in ("linear", "gaussian"):
        raise ValueError(f"soft_nms method must be 'linear' or 'gaussian', got {method!r}")
    _check_threshold(iou_threshold)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"soft_nms sigma must be a positive number, got {sigma}")
    return _greedy_nms(segments, scores, labels, method, iou_threshold, sigma, min_score, max_detections)


def _check_threshold(iou_threshold: float) -> None:
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")


def _greedy_nms(
    segments: Segments | Tensor,
    scores: Tensor,
    labels: Tensor | None,
    decay: Literal["hard", "linear", "gaussian"],
    iou_threshold: float,
    sigma: float,
    min_score: float,
    max_detections: int | None,
) -> tuple[Tensor, Tensor]:
    segs = segments.data if isinstance(segments, Segments) else segments
    torch._assert(segs.ndim == 2 and segs.shape[-1] == 2, f"segments must be [N, 2], got {tuple(segs.shape)}")
    n = segs.shape[0]
    torch._assert(scores.shape == (n,), f"scores must be [N] = [{n}], got {tuple(scores.shape)}")
    if labels is not None:
        torch._assert(labels.shape == (n,), f"labels must be [N] = [{n}], got {tuple(labels.shape)}")
    if max_detections is not None and max_detections < 0:
        raise ValueError(f"max_detections must be >= 0 or None, got {max_detections}")
    if not min_score >= 0:
        raise ValueError(f"min_score must be >= 0, got {min_score}")
    dtype = torch.promote_types(segs.dtype, scores.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    if n == 0 or max_detections == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device), scores.new_zeros(0, dtype=dtype)
    if not bool((scores >= 0).all()):  # also catches NaN
        raise ValueError("scores must be non-negative (probabilities, not logits) and not NaN")

    log_min = math.log(min_score) if min_score > 0 else -math.inf
    cap = n if max_detections is None else max_detections
    keep, kept_log = [], []
    for table in _class_tables(segs.to(dtype), scores.to(dtype), labels):
        prior = torch.cat(kept_log) if kept_log else scores.new_zeros(0, dtype=dtype)
        index, log_score = _greedy_rows(table, decay, iou_threshold, sigma, log_min, cap, prior)
        keep.append(index)
        kept_log.append(log_score)
    keep, kept_log = torch.cat(keep), torch.cat(kept_log)  # [P]
    by_index = torch.argsort(keep)  # equal scores: lowest index first
    keep, kept_log = keep[by_index], kept_log[by_index]
    by_score = torch.sort(kept_log, descending=True, stable=True).indices[:cap]
    return keep[by_score], kept_log[by_score].exp()


class _Table(NamedTuple):
    """Candidates of some classes, one class per row, padded: each field ``[R, W]``."""

    starts: Tensor
    ends: Tensor
    log_scores: Tensor  # -inf: padding, or removed
    index: Tensor  # int64 index into the input


def _greedy_rows(table: _Table, decay: str, iou_threshold: float, sigma: float, log_min: float, cap: int, prior: Tensor):
    """Greedy NMS on every row of ``table`` at once -> input indices ``[P]`` and log-scores ``[P]`` of the picks.

    ``prior [P0]``: log-scores already picked from other tables, which count towards the stop test.
    Picks are in no particular order; a row's picks below ``log_min`` are not returned.
    """
    starts, ends, log_scores, index = table
    num_rows, width = log_scores.shape
    lengths = ends - starts
    has_empty = bool((lengths == 0).any())  # only then can a union be 0 (two empty segments)
    check_every, refresh_every = _steps_between_stop_tests(log_scores.device)
    bar = _kth_largest(prior, cap)  # scores below can no longer make the top `cap`
    picked_scores, picked_cols = [], []  # per step, [R] each
    for step in range(min(cap, width)):
        best, col = log_scores.max(dim=1)  # [R], the first maximum on ties
        if step % check_every == 0:
            if step % refresh_every == 0 and prior.numel() + step * num_rows >= cap:
                bar = _kth_largest(torch.cat([prior, *picked_scores]), cap)
            # Scores only decay, so no later pick beats `top`: stop when every row is spent or
            # `cap` picks already beat everything still waiting.
            top = float(best.max())
            if top < max(log_min, bar) or top == -math.inf:
                break
        picked_scores.append(best)
        picked_cols.append(col)
        col = col[:, None]  # [R, 1]
        sel_start, sel_end, sel_len = starts.gather(1, col), ends.gather(1, col), lengths.gather(1, col)  # [R, 1]
        inter = (torch.minimum(ends, sel_end) - torch.maximum(starts, sel_start)).clamp_(min=0)  # [R, W]
        union = lengths + sel_len - inter
        iou = inter / union
        if has_empty:  # tIoU of two empty segments: 1 when identical, else 0 (as pairwise_tiou)
            iou = torch.where(union > 0, iou, ((starts == sel_start) & (ends == sel_end)).to(iou.dtype))
        log_scores.scatter_(1, col, -math.inf)  # the pick leaves its row
        if decay == "gaussian":
            log_scores.addcmul_(iou, iou, value=-1.0 / sigma)  # log(exp(-iou^2 / sigma))
        elif decay == "linear":
            below = iou < iou_threshold
            log_scores.add_(torch.log1p(-iou.clamp_(max=1.0)).masked_fill_(below, 0.0))  # clamp: rounding
        else:  # hard
            log_scores.masked_fill_(iou >= iou_threshold, -math.inf)
        # A candidate below min_score need not be removed here: it could only be picked once its
        # whole row is below, and then the row is spent (its picks are rejected below).

    if not picked_scores:
        return index.new_zeros(0), log_scores.new_zeros(0)
    picked_scores = torch.stack(picked_scores, dim=1).reshape(-1)  # [R, S] -> [R * S]
    picked = index.gather(1, torch.stack(picked_cols, dim=1)).reshape(-1)  # [R * S]
    valid = (picked_scores >= log_min) & (picked_scores > -math.inf)
    return picked[valid], picked_scores[valid]


def _kth_largest(values: Tensor, k: int) -> float:
    return float(values.topk(k, sorted=False).values.min()) if values.numel() >= k else -math.inf


def _steps_between_stop_tests(device: torch.device) -> tuple[int, int]:
    """Steps between stop tests, and between refreshes of the top-k bar (a multiple of the first).

    A stop test reads a number back from the device: cheap on CPU, a pipeline stall on CUDA, where
    running a few spare steps (whose picks are still correct) costs less.
    """
    return (1, 4) if device.type == "cpu" else (8, 8)


# A step costs about 30 us plus 2 us per 1,000 cells of its table (CPU); up to this many padding
# cells per table are not worth a table of their own.
_PADDING_ALLOWANCE = 2_048


def _class_tables(segs: Tensor, scores: Tensor, labels: Tensor | None) -> list[_Table]:
    """Lay candidates out one class per row, in padded tables of classes of similar size.

    Within a row candidates keep their input order, so ties go to the lowest index. One table as
    wide as the largest class would be mostly padding when one or two classes hold most candidates
    (the usual video); so classes, largest first, share a table while its padding stays under a
    third of its cells or under ``_PADDING_ALLOWANCE``. The largest classes go first, so their picks
    usually stop the later tables' loops early. Padding has score ``-inf`` and the segment (0, 1),
    whose non-zero length keeps every union non-zero.
    """
    n = scores.shape[0]
    device = scores.device
    log_scores = scores.log()
    if labels is None:
        return [_Table(segs[:, 0][None].clone(), segs[:, 1][None].clone(), log_scores[None].clone(), torch.arange(n, device=device)[None])]
    _, rows = torch.unique(labels, return_inverse=True)  # [N] -> 0..K-1
    counts = torch.bincount(rows)  # [K]
    by_size = torch.argsort(counts, descending=True, stable=True)  # [K]
    rank = torch.empty_like(by_size).scatter_(0, by_size, torch.arange(by_size.shape[0], device=device))
    rows = rank.index_select(0, rows)  # row 0 is now the largest class
    sizes = counts.index_select(0, by_size).tolist()
    order = torch.argsort(rows, stable=True)  # [N], grouped by row, input order within
    rows = rows.index_select(0, order)
    first = [0, *np.cumsum(sizes).tolist()]  # offset of each row in `order`
    cols = torch.arange(n, device=device) - torch.tensor(first[:-1], device=device).index_select(0, rows)

    tables = []
    for r0, r1 in _table_bounds(sizes):
        lo, hi, width = first[r0], first[r1], sizes[r0]
        members = order[lo:hi]
        cells = (rows[lo:hi] - r0) * width + cols[lo:hi]

        def fill(pad, values, r0=r0, r1=r1, width=width, cells=cells):
            return values.new_full(((r1 - r0) * width,), pad).scatter_(0, cells, values).view(r1 - r0, width)

        tables.append(_Table(
            fill(0.0, segs[:, 0].index_select(0, members)),
            fill(1.0, segs[:, 1].index_select(0, members)),
            fill(-math.inf, log_scores.index_select(0, members)),
            fill(0, members),
        ))  # fmt: skip
    return tables


def _table_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    """Split rows of ``sizes`` (decreasing) into runs ``[r0, r1)`` that share a table."""
    bounds, r0, real = [], 0, 0
    for r, size in enumerate(sizes):
        if r > r0 and (r + 1 - r0) * sizes[r0] - (real + size) > max((real + size) / 2, _PADDING_ALLOWANCE):
            bounds.append((r0, r))
            r0, real = r, 0
        real += size
    bounds.append((r0, len(sizes)))
    return bounds


# --- score voting ----------------------------------------------------------------------------
def score_voting(kept: Detections, candidates: Detections, threshold: float, *, class_agnostic: bool = False) -> Detections:
    """Refine each kept segment as the weighted mean of the candidates around it (box voting).

    For kept segment ``i`` the voters are the candidates ``j`` of the same class (any class when
    ``class_agnostic``) with ``tIoU(i, j) >= threshold``, weighted by ``score_j * tIoU(i, j)``
    (the original, pre-NMS scores). A kept segment is one of its own voters (tIoU 1) when it comes
    from ``candidates``; with no voter of positive weight it stays as it was. Scores and labels
    are unchanged, so the order is too. (ActionFormer weights by score alone, and votes only when
    class-agnostic.)

    Args:
        kept: ``M`` detections after NMS.
        candidates: the ``N`` detections NMS ran on, in the same unit.
        threshold: minimum tIoU of a voter, in (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"voting threshold must be in (0, 1], got {threshold}")
    if not isinstance(kept.scores, torch.Tensor):
        voted = score_voting(_numpy_to_torch(kept), _numpy_to_torch(candidates), threshold, class_agnostic=class_agnostic)
        return voted.to_numpy()
    if len(kept) == 0 or len(candidates) == 0:
        return kept
    kept_segs = kept.segments.data
    cand_segs = candidates.segments.data.to(kept_segs.dtype)
    iou = pairwise_tiou(kept.segments, candidates.segments).to(kept_segs.dtype)  # [M, N]
    weights = torch.where(iou >= threshold, iou * candidates.scores.to(iou.dtype)[None, :], 0.0)  # [M, N]
    if not class_agnostic:
        weights = weights * (kept.labels[:, None] == candidates.labels[None, :])
    total = weights.sum(dim=1, keepdim=True)  # [M, 1]
    voted = (weights @ cand_segs) / total.clamp(min=torch.finfo(total.dtype).tiny)  # [M, 2]
    voted = torch.where(total > 0, voted, kept_segs)
    return Detections(kept.video_id, Segments(voted, kept.segments.unit, check=False), kept.scores, kept.labels)


# --- the whole chain -------------------------------------------------------------------------
def postprocess(detections: Detections, config: NMSConfig) -> Detections:
    """Threshold -> pre-NMS top-k -> NMS -> voting -> top ``max_detections``, sorted by score.

    Args:
        detections: the ``N`` dense candidates of one video, scores non-negative. NumPy-backed
            input is processed as torch and returned as NumPy.

    Returns:
        At most ``config.max_detections`` detections, highest score first, in the input's unit.
    """
    if not isinstance(detections.scores, torch.Tensor):
        return postprocess(_numpy_to_torch(detections), config).to_numpy()
    dets = detections[detections.scores > config.pre_nms_threshold]
    if config.pre_nms_topk is not None and len(dets) > config.pre_nms_topk:
        dets = dets.sorted_by_score()[: config.pre_nms_topk]
    if len(dets) == 0:
        return dets
    labels = None if config.class_agnostic else dets.labels
    segs, scores = dets.segments.data, dets.scores
    match config.method:
        case "hard":
            keep, kept_scores = hard_nms(
                segs, scores, labels, iou_threshold=config.iou_threshold, min_score=config.min_score, max_detections=config.max_detections
            )
        case "soft_linear" | "soft_gaussian":
            keep, kept_scores = soft_nms(
                segs, scores, labels,
                method="linear" if config.method == "soft_linear" else "gaussian",
                iou_threshold=config.iou_threshold, sigma=config.sigma,
                min_score=config.min_score, max_detections=config.max_detections,
            )  # fmt: skip
        case "none":
            order = torch.sort(scores, descending=True, stable=True).indices
            keep = order[scores[order] >= config.min_score][: config.max_detections]
            kept_scores = scores[keep]
    kept = Detections(dets.video_id, dets.segments[keep], kept_scores.to(scores.dtype), dets.labels[keep])
    if config.voting_threshold is not None:
        kept = score_voting(kept, dets, config.voting_threshold, class_agnostic=config.class_agnostic)
    return kept


def _numpy_to_torch(detections: Detections) -> Detections:
    """Torch view of NumPy-backed detections without losing float64 (``to_torch`` casts to float32)."""
    segs = Segments(torch.from_numpy(np.ascontiguousarray(detections.segments.data)), detections.segments.unit, check=False)
    scores = torch.from_numpy(np.ascontiguousarray(detections.scores))
    labels = torch.from_numpy(np.ascontiguousarray(detections.labels))
    return Detections(detections.video_id, segs, scores, labels)


# --- fusion with a video-level classifier ----------------------------------------------------
def fuse_video_classifier(detections: Detections, class_scores: Tensor, top_k: int = 2) -> Detections:
    """Label class-agnostic detections with a video classifier's ``top_k`` classes (ActivityNet practice).

    Each of the ``N`` detections is repeated for each of the ``k = min(top_k, C)`` best video
    classes, relabelled with that class, and scored ``detection score * class score``.
    (ActionFormer reports the square root of that product; the ranking, hence mAP, is the same.)

    Args:
        detections: ``N`` detections; their labels are ignored.
        class_scores: ``[C]`` video-level class scores, indexed by label id.
        top_k: how many video classes to keep; ties go to the lower label id.

    Returns:
        ``k * N`` detections sorted by score, highest first.
    """
    require_positive_int(top_k, "top_k")
    if not isinstance(detections.scores, torch.Tensor):
        return fuse_video_classifier(_numpy_to_torch(detections), torch.as_tensor(np.asarray(class_scores)), top_k).to_numpy()
    class_scores = torch.as_tensor(class_scores, device=detections.scores.device)
    if class_scores.ndim != 1 or class_scores.shape[0] == 0:
        raise ValueError(f"class_scores must be [C] with C >= 1, got {tuple(class_scores.shape)}")
    top = torch.sort(class_scores, descending=True, stable=True).indices[:top_k]  # [k]
    k, n = top.shape[0], len(detections)
    dtype = torch.promote_types(detections.scores.dtype, class_scores.dtype)
    scores = (class_scores[top].to(dtype)[:, None] * detections.scores.to(dtype)[None, :]).reshape(-1)  # [k, N] -> [k*N]
    segs = detections.segments.data.repeat(k, 1)  # [k*N, 2], class-major like the scores
    labels = top[:, None].expand(k, n).reshape(-1)  # [k*N]
    fused = Detections(detections.video_id, Segments(segs, detections.segments.unit, check=False), scores, labels)
    return fused.sorted_by_score()
