"""Dense (per-step, multi-label) detection: targets, loss, a pyramid-fusing head and segments from scores.

Legend: B batch, D channels of a pyramid level, C fused channels, T steps at level 0, T_l steps at
level l (``T / 2**l``), K classes, N ground-truth segments, M decoded segments.

A dense detector (MultiTHUMOS / Charades style: PDAN, MS-TCT, MS-Temba) predicts, at every step,
an independent probability per class; actions of different classes overlap freely. Targets and
evaluation share one boundary convention (``tal_models.evaluation.dense``): step ``t`` (the
centre of clip ``t``, ``tal_models.timing``) is positive for class k iff a segment of class k has
``start < t < end`` in step units (``"open"``, as super-events / PDAN / MS-TCT label MultiTHUMOS
frames) or ``start <= t <= end`` (``"closed"``, Charades_v1_localize). With segments converted by
``FeatureTiming.segments_to_steps`` and times ``FeatureTiming.centers(T)``, ``dense_targets`` and
``frame_labels`` agree step for step.

``DenseHead`` and MS-Temba (Sinha et al., arXiv 2501.06138). MS-Temba keeps every Temba block at
the input resolution (its dilation splits the steps into interleaved groups instead of
downsampling); its Scale-Aware State Fuser projects each block's output to a common width with
its own linear layer, applies one shared LayerNorm, sums the three, runs a (bidirectional) Mamba
over the sum, and a linear layer gives per-frame logits; each block also has its own linear
classifier, trained on the same per-frame targets (auxiliary, scale-aware supervision). Our
pyramids are strided, so ``DenseHead`` first brings every level back to ``T`` (masked nearest
or linear upsampling), then fuses as MS-Temba does (per-level 1x1 projection, shared layer norm,
sum; or concatenation + 1x1), then runs the optional ``fuser`` (any ``(x, mask) -> (x, mask)``
block: a Mamba block where one is available, else e.g. ``DilatedTCNBlock`` or
``TransformerBlock``), then a masked conv tower to K logits. ``level_logits`` gives the
auxiliary per-level predictions (targets: ``downsample_targets``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.config import require_positive_int
from tal_models.heads import ConvTower
from tal_models.layers import LayerNormC, check_odd
from tal_models.losses import sigmoid_focal_loss
from tal_models.structures import Segments, Unit

Boundary = Literal["open", "closed"]
Upsample = Literal["nearest", "linear"]
Fusion = Literal["sum", "concat"]


# --- targets and loss ---------------------------------------------------------------------------
def dense_targets(
    segments: Tensor | Segments, labels: Tensor, num_classes: int, length: int, boundary: Boundary = "open", check_labels: bool = True
) -> Tensor:
    """``[K, T]`` float 0/1 targets of one video: step ``t`` is positive for class ``k`` iff a
    segment of class ``k`` covers it (``start < t < end``, or ``<=`` for ``"closed"``).

    ``segments [N, 2]`` in feature steps (fractional; ``Segments`` must be in ``Unit.STEPS``),
    ``labels [N]`` class columns ``0..K-1``; ``length`` is T. ``check_labels=False`` skips the range
    check (two reads of device values: a training step whose batch ``collate`` checked skips it).
    """
    if isinstance(segments, Segments):
        if segments.unit is not Unit.STEPS:
            raise ValueError(f"dense_targets needs segments in steps, got {segments.unit.value}")
        segments = segments.data if isinstance(segments.data, Tensor) else torch.from_numpy(segments.data)
    labels = torch.as_tensor(labels, device=segments.device).long().reshape(-1)
    torch._assert(segments.ndim == 2 and segments.shape[1] == 2, f"segments must be [N, 2], got {tuple(segments.shape)}")
    torch._assert(labels.shape[0] == segments.shape[0], f"{segments.shape[0]} segments but {labels.shape[0]} labels")
    if check_labels and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be class columns 0..{num_classes - 1}, got {labels.min().item()}..{labels.max().item()}")
    t = torch.arange(length, device=segments.device, dtype=torch.float64)
    start, end = segments[:, 0:1].double(), segments[:, 1:2].double()  # float64: step positions are compared exactly
    if boundary == "open":
        inside = (t > start) & (t < end)  # [N, T]
    elif boundary == "closed":
        inside = (t >= start) & (t <= end)
    else:
        raise ValueError(f"boundary must be 'open' or 'closed', got {boundary!r}")
    out = torch.zeros(num_classes, length, device=segments.device)
    out.index_add_(0, labels, inside.float())  # several segments of one class add up; clamp back to 1
    return out.clamp_(max=1.0)


def downsample_targets(targets: Tensor, stride: int) -> Tensor:
    """``[B, K, T]`` -> ``[B, K, T / stride]``: step ``i`` of the level takes step ``i * stride``
    (the mask convention of ``tal_models.layers``: level step ``i`` is centred on input step ``i * stride``)."""
    return targets[..., ::stride]


def dense_loss(logits: Tensor, targets: Tensor, mask: Tensor, *, focal_gamma: float = 0.0, focal_alpha: float = -1.0) -> dict[str, Tensor]:
    """Per-step multi-label loss averaged over the valid steps and the classes.

    ``logits [B, K, T]``, ``targets [B, K, T]`` (0/1 or soft), ``mask [B, 1, T]`` bool. Plain BCE
    with logits when ``focal_gamma == 0`` (PDAN, MS-Temba), else the sigmoid focal loss
    (``focal_alpha = -1``: no class weighting). Whatever padded steps hold (NaN included) takes
    no part. Returns ``cls_loss`` and ``final_loss`` (equal: one term) and ``num_valid`` (steps).
    """
    torch._assert(logits.shape == targets.shape, f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    torch._assert(
        mask.dtype == torch.bool and mask.shape == (logits.shape[0], 1, logits.shape[2]),
        f"mask must be bool [B, 1, T], got {mask.dtype} {tuple(mask.shape)}",
    )
    # masked_fill, not a product: a NaN logit at a padded step would poison the sum and its gradient
    logits = logits.float().masked_fill(~mask, 0.0)
    targets = targets.float().masked_fill(~mask, 0.0)
    if focal_gamma == 0.0:
        per_element = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    else:
        per_element = sigmoid_focal_loss(logits, targets, alpha=focal_alpha, gamma=focal_gamma, reduction="none")
    num_valid = mask.sum()
    loss = per_element.masked_fill(~mask, 0.0).sum() / (num_valid.clamp(min=1) * logits.shape[1])
    return {"cls_loss": loss, "final_loss": loss, "num_valid": num_valid}


# --- the head -----------------------------------------------------------------------------------
def upsample_masked(x: Tensor, mask: Tensor, length: int, mode: Upsample = "nearest") -> Tensor:
    """A level ``x [B, D, T_l]`` with ``mask [B, 1, T_l]`` -> ``[B, D, length]``, reading valid steps only.

    Level step ``i`` sits at level-0 position ``i * s`` (``s = length / T_l``). ``"linear"``
    interpolates between the two level steps around each position, renormalising over the valid
    ones; ``"nearest"`` takes the nearer one, or the left one when the nearer is padding (a video
    of ``n`` valid steps has ``ceil(n / s)`` valid level steps, and its last positions round up
    to the first padded one). The caller masks the result at level 0.
    """
    T_l = x.shape[-1]
    torch._assert(length % T_l == 0, f"level length {T_l} does not divide {length}")
    s = length // T_l
    if s == 1:
        return x.masked_fill(~mask, 0.0)
    x = x.masked_fill(~mask, 0.0)
    pos = torch.arange(length, device=x.device)
    left = pos // s
    right = (left + 1).clamp(max=T_l - 1)
    w = ((pos % s).to(x.dtype) / s).view(1, 1, -1)  # [1, 1, T] weight of the right neighbour
    m = mask.to(x.dtype)
    x_l, x_r, m_l, m_r = x[..., left], x[..., right], m[..., left], m[..., right]
    if mode == "linear":
        w_l, w_r = (1 - w) * m_l, w * m_r
        return (w_l * x_l + w_r * x_r) / (w_l + w_r).clamp(min=1e-12)
    if mode == "nearest":
        take_right = (w >= 0.5) & (m_r > 0)
        return torch.where(take_right, x_r, x_l)
    raise ValueError(f"upsampling mode must be 'nearest' or 'linear', got {mode!r}")


class DenseHead(nn.Module):
    """Pyramid -> per-step class logits at level-0 resolution.

    ``forward(feats, masks)``: ``levels`` x ``[B, D_l, T_l]`` and bool ``[B, 1, T_l]`` ->
    ``[B, K, T_0]``, zero at invalid steps. Each level is upsampled to ``T_0`` (``upsample``),
    fused (``"sum"``: a 1x1 projection per level to ``fused_dim``, one shared layer norm, summed,
    as MS-Temba's fuser; ``"concat"``: concatenated, then one 1x1 projection), passed through
    ``fuser`` if given (a block ``(x [B, C, T], mask) -> (x, mask)``, e.g. a Mamba block), then
    through a masked conv tower (``num_layers`` convolutions, the last one to K) whose output bias
    starts at the prior ``prior_prob``.
    """

    def __init__(
        self,
        in_dim: int | list[int],
        num_classes: int,
        levels: int,
        *,
        fused_dim: int = 512,
        fusion: Fusion = "sum",
        upsample: Upsample = "nearest",
        fuser: nn.Module | None = None,
        num_layers: int = 2,
        kernel_size: int = 3,
        with_ln: bool = True,
        prior_prob: float = 0.01,
        aux_heads: bool = False,
    ):
        super().__init__()
        require_positive_int(num_classes, "num_classes")
        require_positive_int(levels, "levels")
        require_positive_int(fused_dim, "fused_dim")
        require_positive_int(num_layers, "num_layers")
        check_odd("DenseHead kernel_size", kernel_size)
        dims = [in_dim] * levels if isinstance(in_dim, int) else list(in_dim)
        if len(dims) != levels:
            raise ValueError(f"in_dim lists {len(dims)} levels, expected {levels}")
        if fusion not in ("sum", "concat"):
            raise ValueError(f"fusion must be 'sum' or 'concat', got {fusion!r}")
        if upsample not in ("nearest", "linear"):
            raise ValueError(f"upsample must be 'nearest' or 'linear', got {upsample!r}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        self.levels, self.fusion, self.upsample = levels, fusion, upsample
        if fusion == "sum":
            self.proj = nn.ModuleList(nn.Conv1d(d, fused_dim, 1) for d in dims)
            self.norm = LayerNormC(fused_dim)
        else:
            self.proj = nn.ModuleList([nn.Conv1d(sum(dims), fused_dim, 1)])
            self.norm = None
        self.fuser = fuser
        self.tower = ConvTower(fused_dim, fused_dim, num_classes, num_layers, kernel_size, with_ln)
        bias = -math.log((1.0 - prior_prob) / prior_prob)
        nn.init.constant_(self.tower.out.conv.bias, bias)
        self.aux = nn.ModuleList(nn.Conv1d(d, num_classes, 1) for d in dims) if aux_heads else None
        if self.aux is not None:
            for conv in self.aux:
                nn.init.constant_(conv.bias, bias)

    def fuse(self, feats: list[Tensor], masks: list[Tensor]) -> Tensor:
        """``levels`` x ``[B, D_l, T_l]`` -> ``[B, C, T_0]`` fused features, zero at invalid steps."""
        torch._assert(
            len(feats) == self.levels == len(masks), f"expected {self.levels} levels, got {len(feats)} features, {len(masks)} masks"
        )
        T, mask0 = feats[0].shape[-1], masks[0]
        ups = [upsample_masked(x, m, T, self.upsample) for x, m in zip(feats, masks)]  # L x [B, D_l, T]
        if self.fusion == "sum":
            x = sum(self.norm(proj(u)) for proj, u in zip(self.proj, ups))  # [B, C, T]
        else:
            x = self.proj[0](torch.cat(ups, dim=1))  # [B, sum D_l, T] -> [B, C, T]
        return x.masked_fill(~mask0, 0.0)

    def forward(self, feats: list[Tensor], masks: list[Tensor]) -> Tensor:
        x, mask = self.fuse(feats, masks), masks[0]
        if self.fuser is not None:
            x, mask = self.fuser(x, mask)
        return self.tower(x, mask)  # [B, K, T_0], zero at invalid steps

    def level_logits(self, feats: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        """MS-Temba's per-scale auxiliary predictions: ``levels`` x ``[B, K, T_l]`` (1x1 per level,
        zero at invalid steps); their targets are ``downsample_targets(targets, 2**l)``."""
        if self.aux is None:
            raise RuntimeError("DenseHead was built without aux_heads")
        return [conv(x.masked_fill(~m, 0.0)).masked_fill(~m, 0.0) for conv, x, m in zip(self.aux, feats, masks)]


# --- decoding -----------------------------------------------------------------------------------
def segments_from_scores(scores: Tensor, threshold: float = 0.5, min_length: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class runs of steps above ``threshold`` -> detections.

    ``scores [T, K]`` probabilities of one video (valid steps only). Every maximal run of steps
    ``a..b`` with ``scores[:, k] > threshold`` and ``b - a + 1 >= min_length`` gives a segment
    ``[a - 0.5, b + 0.5]`` in steps (the span the steps cover, so that ``dense_targets`` of it with
    the open convention gives the run back), scored by the mean probability over the run.
    Returns ``segments [M, 2]`` (float, steps), ``scores [M]``, ``labels [M]`` (class columns),
    ordered by class then start; convert with ``FeatureTiming.segments_to_seconds``.
    """
    torch._assert(scores.ndim == 2, f"scores must be [T, K], got {tuple(scores.shape)}")
    require_positive_int(min_length, "min_length")
    T, K = scores.shape
    above = (scores > threshold).T.to(torch.int8)  # [K, T]
    padded = F.pad(above, (1, 1))  # [K, T + 2]: runs start and end inside
    change = padded[:, 1:] - padded[:, :-1]  # [K, T + 1]: +1 at a run's first step, -1 after its last
    k_start, starts = (change == 1).nonzero(as_tuple=True)
    _, ends = (change == -1).nonzero(as_tuple=True)  # same (class, order) as the starts: runs alternate
    keep = (ends - starts) >= min_length
    k_start, starts, ends = k_start[keep], starts[keep], ends[keep]  # run = steps starts..ends-1
    cumulative = F.pad(scores.T.double().cumsum(dim=1), (1, 0))  # [K, T + 1]
    mean = (cumulative[k_start, ends] - cumulative[k_start, starts]) / (ends - starts)
    segments = torch.stack([starts.to(scores.dtype) - 0.5, ends.to(scores.dtype) - 0.5], dim=1)
    return segments, mean.to(scores.dtype), k_start
