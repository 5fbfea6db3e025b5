"""Losses of anchor-free one-stage detectors: focal classification, 1-D IoU-family regression.

Legend: B batch, P points (all pyramid levels), K classes.

Regression losses compare two segments given as (start, end) distances from the *same* point,
``(l, r)`` meaning ``[point - l, point + r]`` (any common unit: ActionFormer passes strides):

    intersection = max(0, min(l_p, l_g) + min(r_p, r_g))
    union        = (l_p + r_p) + (l_g + r_g) - intersection
    enclosing    = max(l_p, l_g) + max(r_p, r_g)          # the smallest segment covering both
    IoU  = intersection / max(union, eps)
    GIoU loss = 1 - IoU + (enclosing - union) / max(enclosing, eps)
    DIoU loss = 1 - IoU + (centre distance / max(enclosing, eps)) ** 2
    centre distance = ((r_p - l_p) - (r_g - l_g)) / 2

With non-negative distances (ActionFormer's regression head ends in a ReLU and its losses assert
it) both segments contain the point, so they overlap and ``enclosing == union``: GIoU reduces to
``1 - IoU``, exactly ActionFormer's ``ctr_giou_loss_1d``, and DIoU is exactly its
``ctr_diou_loss_1d``. Here a distance may also be negative (a segment that misses its point,
``l + r >= 0`` still), which makes disjoint segments possible: both losses then exceed 1.
The GIoU penalty is computed as ``max(0, -(min(l_p, l_g) + min(r_p, r_g))) / enclosing`` (the
gap between the segments), which equals ``(enclosing - union) / enclosing`` and is exactly 0,
not a rounding residue, whenever the segments overlap.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss as _torchvision_sigmoid_focal_loss

Reduction = Literal["none", "mean", "sum"]
RegLoss = Literal["diou", "giou"]


def _reduce(loss: Tensor, reduction: Reduction) -> Tensor:
    match reduction:
        case "none":
            return loss
        case "sum":
            return loss.sum()
        case "mean":
            # the mean of nothing is 0 (connected to the graph), not NaN
            return loss.mean() if loss.numel() > 0 else loss.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _upcast(x: Tensor) -> Tensor:
    """Half-precision inputs (autocast) are computed in float32, as ActionFormer's ``.float()``."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: Reduction = "sum") -> Tensor:
    """Focal loss (Lin et al., RetinaNet, 2017) on independent sigmoid outputs, any shape.

    ``loss = alpha_t * (1 - p_t) ** gamma * BCE(logits, targets)`` with ``p = sigmoid(logits)``,
    ``p_t = p * t + (1 - p) * (1 - t)`` and ``alpha_t = alpha * t + (1 - alpha) * (1 - t)``;
    ``alpha = -1`` drops the weighting. Targets may be soft (label smoothing). This is
    ``torchvision.ops.sigmoid_focal_loss`` (the fvcore formula ActionFormer copies), called on
    inputs upcast from half precision.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    logits = _upcast(logits)
    targets = targets.to(logits.dtype)
    return _torchvision_sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)


def _iou_terms(pred: Tensor, target: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> IoU, gap between the segments (0 if they overlap), enclosing length, centre distance; each ``[...]``."""
    torch._assert(
        pred.shape[-1] == 2 and pred.shape == target.shape,
        f"offsets must be [..., 2] and alike, got {tuple(pred.shape)} and {tuple(target.shape)}",
    )
    pred, target = _upcast(pred), _upcast(target)
    target = target.to(pred.dtype)
    lp, rp = pred[..., 0], pred[..., 1]
    lg, rg = target[..., 0], target[..., 1]
    overlap = torch.minimum(lp, lg) + torch.minimum(rp, rg)  # negative: the segments are apart by that much
    intersection = overlap.clamp(min=0)
    union = (lp + rp) + (lg + rg) - intersection
    iou = intersection / union.clamp(min=eps)
    enclosing = torch.maximum(lp, lg) + torch.maximum(rp, rg)
    gap = (-overlap).clamp(min=0)
    centre_distance = 0.5 * ((rp - lp) - (rg - lg))
    return iou, gap, enclosing.clamp(min=eps), centre_distance


def giou_loss_1d(pred_offsets: Tensor, target_offsets: Tensor, reduction: Reduction = "sum", eps: float = 1e-8) -> Tensor:
    """Generalized-IoU loss (Rezatofighi et al., 2019) of 1-D segments ``[..., 2]`` given as
    (start, end) distances from one point: ``1 - IoU + (enclosing - union) / enclosing`` (see the
    module docstring; ``1 - IoU`` when both segments contain the point, as ActionFormer's)."""
    iou, gap, enclosing, _ = _iou_terms(pred_offsets, target_offsets, eps)
    return _reduce(1.0 - iou + gap / enclosing, reduction)


def diou_loss_1d(pred_offsets: Tensor, target_offsets: Tensor, reduction: Reduction = "sum", eps: float = 1e-8) -> Tensor:
    """Distance-IoU loss (Zheng et al., 2020) of 1-D segments ``[..., 2]`` given as (start, end)
    distances from one point: ``1 - IoU + (centre distance / enclosing length) ** 2``, as
    ActionFormer's ``ctr_diou_loss_1d``."""
    iou, _, enclosing, centre_distance = _iou_terms(pred_offsets, target_offsets, eps)
    return _reduce(1.0 - iou + torch.square(centre_distance / enclosing), reduction)


class LossNormalizer:
    """Running average of the number of positive points, to divide the summed losses by.

    ``value <- momentum * value + (1 - momentum) * max(num_pos, 1)`` at every ``update``
    (ActionFormer: momentum 0.9; its ``init_loss_norm`` is 100 for THUMOS14, 200 for ActivityNet).
    A per-batch count would make the loss scale jump with small batches; the average does not.
    Given a tensor count, the value becomes a float64 tensor on its device, so training never
    waits for the accelerator to hand the count back; ``state_dict`` reads it (at checkpoints).
    """

    def __init__(self, init: float = 100.0, momentum: float = 0.9):
        if not init > 0:
            raise ValueError(f"LossNormalizer init must be > 0, got {init} (ActionFormer: 100)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LossNormalizer momentum must be in [0, 1), got {momentum} (ActionFormer: 0.9)")
        self.value: float | Tensor = float(init)
        self.momentum = float(momentum)

    def update(self, num_pos: int | Tensor) -> float | Tensor:
        """Fold in this batch's number of positives and return the new value."""
        if isinstance(num_pos, Tensor):
            count = num_pos.detach().to(torch.float64).clamp(min=1.0)
            value = torch.as_tensor(self.value, dtype=torch.float64, device=count.device)
            self.value = self.momentum * value + (1.0 - self.momentum) * count
        else:
            self.value = self.momentum * float(self.value) + (1.0 - self.momentum) * max(float(num_pos), 1.0)
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": float(self.value), "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.momentum = float(state["momentum"])

    def __repr__(self) -> str:
        return f"LossNormalizer(value={float(self.value):.4g}, momentum={self.momentum})"


def detection_losses(
    cls_logits: Tensor,
    reg_offsets: Tensor,
    cls_targets: Tensor,
    reg_targets: Tensor,
    valid_mask: Tensor,
    normalizer: LossNormalizer,
    loss_weight: float = 1.0,
    label_smoothing: float = 0.0,
    reg_loss: RegLoss = "diou",
    iou_weight_power: float = 0.0,
) -> dict[str, Tensor]:
    """ActionFormer's training loss of a batch.

    Args:
        cls_logits: ``[B, P, K]`` classification logits.
        reg_offsets: ``[B, P, 2]`` predicted (start, end) distances in strides.
        cls_targets: ``[B, P, K]`` from ``assign_targets`` (positive points have a 1).
        reg_targets: ``[B, P, 2]`` from ``assign_targets``.
        valid_mask: ``[B, P]`` bool, False at padded steps (which take no part in any loss).
        normalizer: updated once with this batch's number of positives (valid points only).
        loss_weight: weight of the regression loss in ``final_loss``.
        label_smoothing: ``eps``: classification targets become ``t * (1 - eps) + eps / (K + 1)``
            (ActionFormer's smoothing, with the background as a (K+1)-th class).
        reg_loss: ``"diou"`` (ActionFormer's) or ``"giou"``.
        iou_weight_power: ``g > 0`` couples classification with localisation (TriDet): the focal
            loss of a positive (point, class) is multiplied by ``IoU(predicted, target) ** g``,
            the IoU taken without gradient (TriDet back-propagates through it; here it is a
            weight only, the regression loss alone trains the offsets). 0: off (ActionFormer).

    Returns:
        ``{"cls_loss", "reg_loss", "final_loss"}``, scalars: ``cls_loss`` is the focal loss summed
        over every valid point and class, ``reg_loss`` the IoU-family loss summed over positive
        valid points, both divided by the normalizer's value; ``final_loss = cls_loss +
        loss_weight * reg_loss``. Without a positive point anywhere ``reg_loss`` is 0, and still
        connected to ``reg_offsets`` (zero gradient), so the backward pass is the same.
    """
    b, p, k = cls_logits.shape
    torch._assert(cls_targets.shape == (b, p, k), f"cls_targets must be [B, P, K] = {(b, p, k)}, got {tuple(cls_targets.shape)}")
    torch._assert(reg_offsets.shape == (b, p, 2), f"reg_offsets must be [B, P, 2] = {(b, p, 2)}, got {tuple(reg_offsets.shape)}")
    torch._assert(reg_targets.shape == (b, p, 2), f"reg_targets must be [B, P, 2] = {(b, p, 2)}, got {tuple(reg_targets.shape)}")
    torch._assert(valid_mask.shape == (b, p), f"valid_mask must be [B, P] = {(b, p)}, got {tuple(valid_mask.shape)}")
    if not loss_weight >= 0:
        raise ValueError(f"loss_weight must be >= 0, got {loss_weight}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    match reg_loss:
        case "diou":
            reg_loss_fn = diou_loss_1d
        case "giou":
            reg_loss_fn = giou_loss_1d
        case _:
            raise ValueError(f"reg_loss must be 'diou' or 'giou', got {reg_loss!r}")

    valid_mask = valid_mask.bool()
    positive = (cls_targets.sum(dim=-1) > 0) & valid_mask  # [B, P]
    norm = normalizer.update(positive.sum())
    if isinstance(norm, Tensor):
        norm = norm.to(cls_logits.dtype if cls_logits.is_floating_point() else torch.float32)

    targets = cls_targets[valid_mask]  # [B, P, K] -> [V, K]
    if label_smoothing > 0:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / (k + 1)
    if iou_weight_power > 0:
        cls_elems = sigmoid_focal_loss(cls_logits[valid_mask], targets, reduction="none")  # [V, K]
        with torch.no_grad():
            iou = _iou_terms(reg_offsets[positive], reg_targets[positive], 1e-8)[0].clamp(min=0)  # [#pos]
            weight = torch.ones_like(positive, dtype=cls_elems.dtype)  # [B, P]
            weight[positive] = iou.to(weight.dtype) ** iou_weight_power
            weight = torch.where(cls_targets[valid_mask] > 0, weight[valid_mask][:, None], 1.0)  # [V, K]: positive classes only
        cls_loss = (cls_elems * weight).sum() / norm
    else:
        cls_loss = sigmoid_focal_loss(cls_logits[valid_mask], targets, reduction="sum") / norm

    # The sum over no positive point is 0 and back-propagates zeros: no special case needed.
    reg = reg_loss_fn(reg_offsets[positive], reg_targets[positive], reduction="sum") / norm  # [#pos, 2] -> []
    return {"cls_loss": cls_loss, "reg_loss": reg, "final_loss": cls_loss + loss_weight * reg}
