"""BMN (Lin et al., "BMN: Boundary-Matching Network for Temporal Action Proposal Generation", ICCV 2019),
with an optional proposal classifier that makes its proposals labelled detections.

Legend: B batch, C input channels, M pieces (model inputs, ``tal_models.windows``), L cells of a piece
(``scale.length``), D durations (``max_duration``), N sample bins per proposal, H1/H2/H3 the 1-D, 2-D
and 3-D hidden widths, K classes, P candidates.

    features [B, C, T] -> split into pieces (resize to L, or windows of L)  -> [M, C, L]
        base module (2 grouped convs)                                       -> [M, H1, L]
        TEM: start / end logits per cell                                    -> [M, L] x 2
        PEM: conv -> BM layer -> Conv3d over the N bins -> [M, H3, D, L]
             -> 2-D convs -> regression / classification confidence logits  -> [M, 2, D, L]
        classifier (num_classes > 1): 1x1 convs over the same map           -> [M, K + 1, D, L]
    training:  per-piece start/end labels and the IoU map -> TEM + 10 PEM-reg + PEM-cls (+ classifier)
    inference: candidate (start, end) pairs -> scores -> steps -> per-video merge -> Soft-NMS -> seconds

Proposal ``(d, t)`` covers cells ``t .. t + d``: unit time ``[t / L, (t + d + 1) / L]``. The start
probability of cell ``t`` is that of a start at its left edge ``t / L``, the end probability of cell
``j`` that of an end at its right edge ``(j + 1) / L``, so the proposal's scores are ``start[t]`` and
``end[t + d]`` and it is valid iff ``t + d`` is a valid cell (the official code reads the end at
``t + d + 1`` and so never proposes a segment ending at the sequence's end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.batch import Batch
from tal_models.config import require_positive_int
from tal_models.detectors.base import DetectorModule
from tal_models.layers.boundary_matching import BoundaryMatching, proposal_validity
from tal_models.postprocess import NMSConfig
from tal_models.structures import Detections
from tal_models.timing import STEP_TIMING
from tal_models.windows import Piece, TemporalScaleConfig, finish_video, split, targets_for_piece


def _require_fraction(value: float, name: str, hint: str, *, closed: bool = True) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    if not (isinstance(value, int | float) and math.isfinite(value) and ok):
        raise ValueError(f"{name} must be in {'[0, 1]' if closed else '(0, 1)'}, got {value!r} ({hint})")


@dataclass(frozen=True)
class BMNLossConfig:
    """Label generation and losses (the paper's values)."""

    boundary_region: float = 3.0  # cells: width of the region around a ground-truth start/end (official: 3 temporal gaps)
    boundary_threshold: float = 0.5  # start/end label (IoA with that region) above it = positive
    reg_high: float = 0.7  # PEM regression: IoU > high, all kept; (low, high] and (0, low] sampled as many
    reg_low: float = 0.3
    cls_positive: float = 0.9  # PEM classification: IoU > it = positive
    reg_weight: float = 10.0  # final = tem + reg_weight * pem_reg + pem_cls (+ classifier_weight * classifier)
    classifier_iou: float = 0.7  # classifier: proposals whose best IoU >= it learn their ground truth's class
    background_iou: float = 0.3  # ... and those below it are background, sampled
    background_ratio: float = 1.0  # ... background_ratio per positive, in expectation
    classifier_weight: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.boundary_region) and self.boundary_region > 0):
            raise ValueError(f"BMNLossConfig.boundary_region must be > 0 cells, got {self.boundary_region} (BMN: 3)")
        for name, hint in (("boundary_threshold", "BMN: 0.5"), ("cls_positive", "BMN: 0.9"), ("classifier_iou", "e.g. 0.7")):
            _require_fraction(getattr(self, name), f"BMNLossConfig.{name}", hint, closed=False)
        _require_fraction(self.reg_low, "BMNLossConfig.reg_low", "BMN: 0.3")
        _require_fraction(self.reg_high, "BMNLossConfig.reg_high", "BMN: 0.7")
        if not self.reg_low < self.reg_high:
            raise ValueError(f"BMNLossConfig: reg_low ({self.reg_low}) must be < reg_high ({self.reg_high}) (BMN: 0.3 < 0.7)")
        _require_fraction(self.background_iou, "BMNLossConfig.background_iou", "e.g. 0.3")
        if self.background_iou > self.classifier_iou:
            raise ValueError(f"BMNLossConfig: background_iou ({self.background_iou}) must be <= classifier_iou ({self.classifier_iou})")
        for name in ("reg_weight", "background_ratio", "classifier_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"BMNLossConfig.{name} must be >= 0, got {v} (BMN: reg_weight 10)")


def _bmn_nms(max_detections: int = 100) -> NMSConfig:
    # the paper's Soft-NMS: Gaussian decay exp(-IoU^2 / 0.4), 100 proposals per ActivityNet video
    return NMSConfig(method="soft_gaussian", sigma=0.4, max_detections=max_detections, min_score=0.0001)


@dataclass(frozen=True)
class BMNInferenceConfig:
    """Proposal generation (the paper's values) and the NMS over a video's merged candidates."""

    peak_fraction: float = 0.5  # a start/end cell is a candidate if a local peak or above this fraction of the piece's max
    classes_per_proposal: int = 2  # num_classes > 1: the best classes of each proposal, as separate candidates
    min_length: float = 0.0  # candidates no longer than this (steps) are dropped
    nms: NMSConfig = field(default_factory=_bmn_nms)

    def __post_init__(self) -> None:
        _require_fraction(self.peak_fraction, "BMNInferenceConfig.peak_fraction", "BMN: 0.5")
        require_positive_int(self.classes_per_proposal, "BMNInferenceConfig.classes_per_proposal", " (typical: 2)")
        if not (math.isfinite(self.min_length) and self.min_length >= 0):
            raise ValueError(f"BMNInferenceConfig.min_length must be >= 0 steps, got {self.min_length}")


@dataclass(frozen=True)
class BMNConfig:
    """Everything needed to rebuild a BMN detector (the ActivityNet configuration by default; ``bmn_config``).

    ``max_seq_len``: the train job's crop. Window protocol: the window length. Resize protocol: the whole
    video is one piece whatever its length, so this only bounds a training batch's memory (large: no crop).
    """

    family: ClassVar[str] = "bmn"
    task: ClassVar[str] = "detection"

    arch: Literal["bmn"] = "bmn"
    num_classes: int = 1  # 1: class-agnostic proposals (label 0); > 1: with the proposal classifier
    feature_dim: int = 400  # the paper's TSN features on ActivityNet
    max_seq_len: int = 4096
    scale: TemporalScaleConfig = field(default_factory=TemporalScaleConfig)
    max_duration: int = 100  # D: proposals of 1 .. D cells
    num_samples: int = 32  # N bins per proposal
    samples_per_bin: int = 3
    boundary_ratio: float = 0.5  # context sampled on each side, as a fraction of the proposal's length
    hidden_1d: int = 256
    hidden_2d: int = 128
    hidden_3d: int = 512
    groups: int = 4  # grouped 1-D convolutions of the base module and the TEM (official)
    loss: BMNLossConfig = field(default_factory=BMNLossConfig)
    inference: BMNInferenceConfig = field(default_factory=BMNInferenceConfig)

    def __post_init__(self) -> None:
        if self.arch != "bmn":
            raise ValueError(f"BMNConfig.arch must be 'bmn', got {self.arch!r}")
        require_positive_int(self.num_classes, "BMNConfig.num_classes", " (1 = class-agnostic proposals)")
        require_positive_int(self.feature_dim, "BMNConfig.feature_dim", " (BMN: 400 on ActivityNet TSN features)")
        require_positive_int(self.max_seq_len, "BMNConfig.max_seq_len", " (the window length for the window protocol)")
        require_positive_int(self.max_duration, "BMNConfig.max_duration", " (BMN: 100 on ActivityNet, 64 on THUMOS14)")
        for name, hint in (
            ("num_samples", "32"),
            ("samples_per_bin", "3"),
            ("hidden_1d", "256"),
            ("hidden_2d", "128"),
            ("hidden_3d", "512"),
        ):
            require_positive_int(getattr(self, name), f"BMNConfig.{name}", f" (BMN: {hint})")
        require_positive_int(self.groups, "BMNConfig.groups", " (BMN: 4)")
        if self.max_duration > self.scale.length:
            raise ValueError(f"BMNConfig.max_duration ({self.max_duration}) must be <= scale.length ({self.scale.length})")
        if not (math.isfinite(self.boundary_ratio) and self.boundary_ratio >= 0):
            raise ValueError(f"BMNConfig.boundary_ratio must be >= 0, got {self.boundary_ratio} (BMN: 0.5)")
        if self.feature_dim % self.groups or self.hidden_1d % self.groups:
            raise ValueError(
                f"BMNConfig: feature_dim ({self.feature_dim}) and hidden_1d ({self.hidden_1d}) must be multiples of groups ({self.groups})"
            )
        if self.scale.protocol == "window" and self.max_seq_len != self.scale.length:
            raise ValueError(f"BMNConfig.max_seq_len ({self.max_seq_len}) must be the window length scale.length ({self.scale.length})")

    @property
    def input_dim(self) -> int:
        return self.feature_dim


_SIZES = ("max_duration", "num_samples", "samples_per_bin", "boundary_ratio", "hidden_1d", "hidden_2d", "hidden_3d", "groups")


def bmn_config(*, protocol: Literal["activitynet", "thumos14"], num_classes: int = 1, input_dim: int, **sizes: Any) -> BMNConfig:
    """The published configuration of ``protocol`` for ``input_dim``-d features, widths overridable.

    ``activitynet``: every video resized to 100 cells, proposals up to 100 cells, 100 kept per video.
    ``thumos14``: windows of 128 steps overlapping by half, proposals up to 64 steps (OpenTAD's BMN
    on THUMOS14), 200 kept per video. Both: 32 bins of 3 points, boundary ratio 0.5, widths 256/128/512.
    ``sizes``: any of ``max_duration, num_samples, samples_per_bin, boundary_ratio, hidden_1d, hidden_2d,
    hidden_3d, groups``, and ``length`` (the scale) for smaller CPU benchmarks.
    """
    unknown = set(sizes) - set(_SIZES) - {"length"}
    if unknown:
        raise ValueError(f"bmn_config: unknown sizes {sorted(unknown)}; known: {sorted(_SIZES + ('length',))}")
    match protocol:
        case "activitynet":
            length = sizes.pop("length", 100)
            scale, max_duration, max_seq_len, keep = TemporalScaleConfig("resize", length), length, 4096, 100
        case "thumos14":
            length = sizes.pop("length", 128)
            scale, max_duration, max_seq_len, keep = TemporalScaleConfig("window", length, 0.5), min(64, length), length, 200
        case _:
            raise ValueError(f"bmn_config: protocol must be 'activitynet' or 'thumos14', got {protocol!r}")
    inference = BMNInferenceConfig(nms=_bmn_nms(keep))
    sizes = {"max_duration": max_duration, **sizes}
    return BMNConfig(num_classes=num_classes, feature_dim=input_dim, max_seq_len=max_seq_len, scale=scale, inference=inference, **sizes)


class PieceOutputs(NamedTuple):
    """The model's outputs on ``M`` pieces (logits; float32 after the caller upcasts)."""

    start: Tensor  # [M, L]
    end: Tensor  # [M, L]
    confidence: Tensor  # [M, 2, D, L]: regression (IoU), classification (IoU > 0.9)
    classes: Tensor | None  # [M, K + 1, D, L], background last; None when num_classes == 1
    valid: Tensor  # [M, D, L] bool: the proposal ends inside the piece's valid cells


class BMNDetector(DetectorModule):
    """BMN on pieces of any video (module docstring); the ``Detector`` protocol of ``tal_models.detectors.base``."""

    def __init__(self, config: BMNConfig):
        super().__init__()
        self.config = cfg = config
        C, H1, H2, H3, g = cfg.feature_dim, cfg.hidden_1d, cfg.hidden_2d, cfg.hidden_3d, cfg.groups
        self.base1, self.base2 = nn.Conv1d(C, H1, 3, padding=1, groups=g), nn.Conv1d(H1, H1, 3, padding=1, groups=g)
        self.start1, self.start2 = nn.Conv1d(H1, H1, 3, padding=1, groups=g), nn.Conv1d(H1, 1, 1)
        self.end1, self.end2 = nn.Conv1d(H1, H1, 3, padding=1, groups=g), nn.Conv1d(H1, 1, 1)
        self.pem1d = nn.Conv1d(H1, H1, 3, padding=1)
        self.bm = BoundaryMatching(cfg.scale.length, cfg.max_duration, cfg.num_samples, cfg.samples_per_bin, cfg.boundary_ratio)
        self.pem3d = nn.Conv3d(H1, H3, (cfg.num_samples, 1, 1), stride=(cfg.num_samples, 1, 1))
        self.pem2d = nn.ModuleList(
            [nn.Conv2d(H3, H2, 1), nn.Conv2d(H2, H2, 3, padding=1), nn.Conv2d(H2, H2, 3, padding=1), nn.Conv2d(H2, 2, 1)]
        )
        # The classifier reads the post-Conv3d map, each proposal's N bin features with its boundary context,
        # and gives a softmax over K classes + background: THUMOS proposals are single-label, and the
        # background class absorbs the badly localised proposals it is trained on instead of pushing K
        # independent sigmoids down; a proposal's class probabilities then sum to at most 1.
        self.classifier = (
            nn.Sequential(nn.Conv2d(H3, H2, 1), nn.ReLU(), nn.Conv2d(H2, cfg.num_classes + 1, 1)) if cfg.num_classes > 1 else None
        )

    def piece_outputs(self, x: Tensor, mask: Tensor) -> PieceOutputs:
        """Pieces ``x [M, C, L]``, ``mask [M, 1, L]`` -> ``PieceOutputs``. Every convolution reads zeros at the
        invalid cells (a short window's padded tail) and at the proposals that end there."""
        L, D = self.config.scale.length, self.config.max_duration
        torch._assert(x.shape[-1] == L, f"BMN: pieces must have {L} cells, got {x.shape[-1]}")
        h = F.relu(self.base1(x.masked_fill(~mask, 0.0)))  # [M, H1, L]
        h = F.relu(self.base2(h * mask)) * mask
        start = self.start2(F.relu(self.start1(h)))[:, 0]  # [M, L]
        end = self.end2(F.relu(self.end1(h)))[:, 0]
        p = F.relu(self.pem1d(h)) * mask
        M, H1 = p.shape[:2]
        # a Conv3d whose kernel spans all N bins with stride N is a linear map over (channel, bin) of the BM features
        f = self.bm.project(p, self.pem3d.weight.reshape(-1, H1, self.config.num_samples), self.pem3d.bias)  # [M, H3, D * L]
        valid = proposal_validity(L, D, mask[:, 0].sum(-1))  # [M, D, L]
        vmask = valid[:, None]  # [M, 1, D, L]
        f = F.relu(f).view(M, -1, D, L) * vmask
        c = F.relu(self.pem2d[0](f))
        c = F.relu(self.pem2d[1](c * vmask))
        c = F.relu(self.pem2d[2](c * vmask))
        confidence = self.pem2d[3](c)  # [M, 2, D, L]
        classes = self.classifier(f) if self.classifier is not None else None
        return PieceOutputs(start, end, confidence, classes, valid)

    # --- training -------------------------------------------------------------------------
    def forward_training(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.config
        x, mask, pieces = split(batch.features, batch.mask, cfg.scale)
        out = self.piece_outputs(x, mask)
        targets = [piece_targets(batch.segments[p.video], batch.labels[p.video], p, cfg) for p in pieces]
        start_t, end_t, iou, cls_t = (torch.stack(t).to(x.device) for t in zip(*targets))  # [M, L] x 2, [M, D, L] x 2
        cells = mask[:, 0]
        loss = cfg.loss
        tem = balanced_logistic_loss(out.start.float(), start_t > loss.boundary_threshold, cells)
        tem = tem + balanced_logistic_loss(out.end.float(), end_t > loss.boundary_threshold, cells)
        iou = iou * out.valid
        reg = sampled_regression_loss(torch.sigmoid(out.confidence[:, 0].float()), iou, out.valid, loss.reg_high, loss.reg_low)
        pem_cls = balanced_logistic_loss(out.confidence[:, 1].float(), iou > loss.cls_positive, out.valid)
        losses = {"tem_loss": tem, "pem_reg_loss": reg, "pem_cls_loss": pem_cls}
        final = tem + loss.reg_weight * reg + pem_cls
        if out.classes is not None:
            losses["classifier_loss"] = classifier_loss(out.classes.float(), iou, cls_t, out.valid, loss)
            final = final + loss.classifier_weight * losses["classifier_loss"]
        losses["final_loss"] = final
        return losses

    # --- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def forward_inference(self, batch: Batch) -> list[Detections]:
        cfg = self.config
        x, mask, pieces = split(batch.features, batch.mask, cfg.scale)
        out = self.piece_outputs(x, mask)
        timings = batch.timings if batch.timings is not None else [STEP_TIMING] * len(batch)
        durations = batch.durations if batch.durations is not None else [None] * len(batch)
        per_video: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(len(batch))]
        for m, piece in enumerate(pieces):
            classes = out.classes[m].float() if out.classes is not None else None
            per_video[piece.video].append(
                proposals_single_piece(
                    torch.sigmoid(out.start[m].float()), torch.sigmoid(out.end[m].float()), torch.sigmoid(out.confidence[m].float()),
                    classes, piece, cfg.max_duration, cfg.inference,
                )
            )  # fmt: skip
        dets = []
        for b, candidates in enumerate(per_video):
            segs, scores, labels = (torch.cat(c) for c in zip(*candidates))
            dets.append(
                finish_video(
                    batch.video_ids[b], segs, scores, labels, timings[b], durations[b], cfg.inference.nms, cfg.inference.min_length
                )
            )
        return dets


# --- labels ---------------------------------------------------------------------------------
def piece_targets(segments: Tensor, labels: Tensor, piece: Piece, config: BMNConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A video's segments ``[N, 2]`` (steps) and labels ``[N]`` -> one piece's labels: start and end ``[L]``
    (IoA of each cell's boundary anchor with the 3-cell regions around the ground-truth starts / ends, BMN
    Sec. 3.5), the IoU ``[D, L]`` of each proposal with its best ground truth, and that ground truth's
    class ``[D, L]`` (``num_classes`` = background where there is none)."""
    L, D = config.scale.length, config.max_duration
    segs, labels = targets_for_piece(segments, labels, piece)  # unit time [N, 2], [N]
    segs, labels = segs.cpu().double(), labels.cpu()
    if segs.shape[0] == 0:
        zeros = torch.zeros(L, dtype=torch.float32)
        return zeros, zeros.clone(), torch.zeros(D, L), torch.full((D, L), config.num_classes, dtype=torch.long)
    cell = torch.arange(L, dtype=torch.float64)
    half = 0.5 * config.loss.boundary_region / L

    def ioa(anchor_lo: Tensor, boundaries: Tensor) -> Tensor:  # [L], [N] -> [L]
        inter = torch.minimum(anchor_lo[:, None] + 1.0 / L, boundaries + half) - torch.maximum(anchor_lo[:, None], boundaries - half)
        return (inter.clamp_min(0.0) * L).amax(-1)

    start = ioa((cell - 0.5) / L, segs[:, 0])  # anchor of cell t: centred on its left edge t / L
    end = ioa((cell + 0.5) / L, segs[:, 1])  # anchor of cell j: centred on its right edge (j + 1) / L
    d = torch.arange(D, dtype=torch.float64)[:, None, None]
    lo = (cell[None, :, None]) / L  # [1, L, 1]
    hi = (cell[None, :, None] + d + 1.0) / L  # [D, L, 1]
    inter = (torch.minimum(hi, segs[:, 1]) - torch.maximum(lo, segs[:, 0])).clamp_min(0.0)  # [D, L, N]
    iou = inter / ((hi - lo) + (segs[:, 1] - segs[:, 0]) - inter)
    best, which = iou.max(-1)  # [D, L]
    return start.float(), end.float(), best.float(), labels[which]


# --- losses ---------------------------------------------------------------------------------
def balanced_logistic_loss(logits: Tensor, positive: Tensor, valid: Tensor) -> Tensor:
    """BMN's weighted binary logistic loss (Eq. 8): positives and negatives weigh half each,
    ``-(n / 2 n+) sum_pos log p + (n / 2 n-) sum_neg log(1 - p)) / n`` over the ``n`` valid entries,
    computed from logits (``log p = logsigmoid``); a class with no entry counts as one."""
    valid = valid.to(logits.dtype)
    pos = positive.to(logits.dtype) * valid
    neg = valid - pos
    n = valid.sum().clamp_min(1.0)
    w_pos, w_neg = 0.5 * n / pos.sum().clamp_min(1.0), 0.5 * n / neg.sum().clamp_min(1.0)
    loss = -(w_pos * pos * F.logsigmoid(logits) + w_neg * neg * F.logsigmoid(-logits))
    return loss.sum() / n


def sampled_regression_loss(pred: Tensor, iou: Tensor, valid: Tensor, high: float, low: float) -> Tensor:
    """BMN's PEM regression: L2 on ``[M, D, L]`` proposals, all with IoU > ``high``, and as many (in expectation)
    drawn from ``(low, high]`` and from ``(0, low]`` (the official code leaves IoU 0 out); torch's global generator
    draws them. ``0.5 sum w (pred - iou)^2 / sum w``."""
    h = (iou > high) & valid
    m = (iou > low) & (iou <= high) & valid
    lo = (iou > 0) & (iou <= low) & valid
    n_h = h.sum().to(pred.dtype)
    r_m = n_h / m.sum().clamp_min(1).to(pred.dtype)
    r_l = n_h / lo.sum().clamp_min(1).to(pred.dtype)
    w = h | (m & (torch.rand(iou.shape, device=iou.device) < r_m)) | (lo & (torch.rand(iou.shape, device=iou.device) < r_l))
    w = w.to(pred.dtype)
    return 0.5 * (w * (pred - iou) ** 2).sum() / w.sum().clamp_min(1.0)


def classifier_loss(logits: Tensor, iou: Tensor, classes: Tensor, valid: Tensor, config: BMNLossConfig) -> Tensor:
    """Cross-entropy of the proposal classifier ``logits [M, K + 1, D, L]``: proposals with best IoU >= ``classifier_iou``
    learn their ground truth's class, ``background_ratio`` background ones (IoU < ``background_iou``) per positive are
    drawn (expected count; torch's global generator) and learn the background class ``K``."""
    K = logits.shape[1] - 1
    pos = valid & (iou >= config.classifier_iou)
    bg = valid & (iou < config.background_iou)
    wanted = config.background_ratio * pos.sum().clamp_min(1).to(logits.dtype)
    bg = bg & (torch.rand(iou.shape, device=iou.device) < wanted / bg.sum().clamp_min(1).to(logits.dtype))
    target = torch.where(pos, classes, torch.full_like(classes, K))
    ce = F.cross_entropy(logits, target, reduction="none")  # [M, D, L]
    chosen = (pos | bg).to(logits.dtype)
    return (ce * chosen).sum() / chosen.sum().clamp_min(1.0)


# --- proposals ------------------------------------------------------------------------------
def boundary_candidates(prob: Tensor, fraction: float, always: int) -> Tensor:
    """``prob [n]`` -> bool ``[n]``: local peaks, cells above ``fraction`` of the max, and cell ``always``
    (BMN: the first cell for starts, the last for ends)."""
    n = prob.shape[0]
    ok = prob > fraction * prob.max()
    if n > 2:
        peak = (prob[1:-1] > prob[:-2]) & (prob[1:-1] > prob[2:])
        ok[1:-1] |= peak
    ok[always] = True
    return ok


def proposals_single_piece(
    start: Tensor, end: Tensor, confidence: Tensor, classes: Tensor | None, piece: Piece, max_duration: int, config: BMNInferenceConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """One piece's probabilities (start, end ``[L]``, confidence ``[2, D, L]``; class logits ``[K + 1, D, L]`` or None)
    -> candidates: segments ``[P, 2]`` in steps of the piece's video, scores ``[P]`` (start x end x regression
    x classification, times the class probability with a classifier), labels ``[P]``."""
    L, D, n = start.shape[0], max_duration, piece.valid
    s_ok = boundary_candidates(start[:n], config.peak_fraction, 0)
    e_ok = boundary_candidates(end[:n], config.peak_fraction, n - 1)
    t = torch.arange(L, device=start.device)
    last = torch.arange(D, device=start.device)[:, None] + t  # [D, L]: the end cell of proposal (d, t)
    ok = last < n
    ok[:, :n] &= s_ok[None, :]
    ok &= e_ok[last.clamp_max(n - 1)]
    d_idx, t_idx = ok.nonzero(as_tuple=True)  # [P]
    scores = start[t_idx] * end[t_idx + d_idx] * confidence[0, d_idx, t_idx] * confidence[1, d_idx, t_idx]
    u = torch.stack([t_idx, t_idx + d_idx + 1], -1).to(torch.float64) / L  # [P, 2] unit time
    segs = piece.to_steps(u)
    if classes is None:
        return segs, scores, torch.zeros_like(t_idx)
    probs = torch.softmax(classes[:, d_idx, t_idx], 0)[:-1]  # [K, P], background dropped
    k = min(config.classes_per_proposal, probs.shape[0])
    top, labels = probs.topk(k, dim=0)  # [k, P]
    return segs.repeat(k, 1), (scores[None] * top).reshape(-1), labels.reshape(-1)


def parameter_counts(model: BMNDetector) -> dict[str, int]:
    """Parameters per module (base, TEM, PEM, classifier) and in all."""
    groups = {
        "base": ("base1", "base2"),
        "tem": ("start1", "start2", "end1", "end2"),
        "pem": ("pem1d", "pem3d", "pem2d"),
        "classifier": ("classifier",),
    }
    counts = {
        k: sum(p.numel() for name in names if getattr(model, name) is not None for p in getattr(model, name).parameters())
        for k, names in groups.items()
    }
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


__all__ = [
    "BMNConfig",
    "BMNDetector",
    "BMNInferenceConfig",
    "BMNLossConfig",
    "PieceOutputs",
    "balanced_logistic_loss",
    "bmn_config",
    "boundary_candidates",
    "classifier_loss",
    "parameter_counts",
    "piece_targets",
    "proposals_single_piece",
    "sampled_regression_loss",
]
