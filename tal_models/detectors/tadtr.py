"""TadTR (Liu et al., "End-to-end Temporal Action Detection with Transformer", IEEE TIP 2022): set prediction.

Legend: B batch, C input channels, T padded steps, L the model's scale (steps of a piece), M pieces,
D channels, Q queries, K classes, Y decoder layers, N ground-truth segments, R RoI bins.

A video meets the model as pieces of ``L`` steps (``tal_models.windows``: resized on ActivityNet,
sliding windows on THUMOS14); every piece is detected on its own::

    piece [M, C, L] -> 1x1 projection + group norm -> + sine positions
                    -> deformable encoder (each step attends to P points around itself) -> memory [M, L, D]
    Q learned queries (content + position) -> reference centres (sigmoid of a linear map of the position)
                    -> Y decoder layers (query self-attention, deformable cross-attention at the reference,
                       FFN); after each, a class head [M, Q, K] and a segment head: (center, width) refined
                       from the reference, and with ``segment_refine`` the next layer's reference (detached)
                    -> actionness: an MLP on the memory pooled over R bins of each final segment (x 1.5) -> tIoU
    training:  per piece and layer, Hungarian matching (``tal_models.matching``) of the queries to the
               piece's segments; focal + L1 + (1 - tIoU) on the matches, auxiliary losses at every layer,
               L1 of the actionness to each query's best tIoU with the ground truth
    inference: score = sigmoid(logit) x actionness; the top (query, class) pairs of each piece, to video
               steps, merged over the video's pieces -> ``finish_video`` (NMS only to merge overlapping windows)

Unit time: inside the model, times are in units of each piece's *valid* length (a short, padded window
is a whole sequence to the model: padding changes nothing), converted at the edges with ``Piece``.

Differences from the official code: no level embedding (one scale: a constant bias on the positions);
the RoI pooling samples each bin at its centre (RoIAlign averages an adaptive number of samples); the
group norm of the projection counts valid steps only; the offsets' initial fan is our own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.batch import Batch
from tal_models.config import require_positive_int
from tal_models.detectors.base import DetectorModule
from tal_models.layers.deformable import DeformableDecoderLayer, DeformableEncoderLayer, sample_linear
from tal_models.layers.norm import MaskedGroupNorm
from tal_models.losses import sigmoid_focal_loss
from tal_models.matching import MatchCosts, bounds_to_center_width, center_width_to_bounds, hungarian_match, match_cost
from tal_models.postprocess import NMSConfig
from tal_models.structures import Detections, tiou
from tal_models.timing import STEP_TIMING
from tal_models.windows import Piece, TemporalScaleConfig, finish_video, split, targets_for_piece


def _require_nonneg(value: float, name: str, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}{hint}")


@dataclass(frozen=True)
class TadTRLossConfig:
    """Matching costs and loss weights (TadTR's official values)."""

    cls_weight: float = 2.0
    seg_weight: float = 5.0  # L1 on (center, width)
    iou_weight: float = 2.0  # 1 - tIoU
    actionness_weight: float = 4.0
    cost_cls: float = 6.0
    cost_seg: float = 5.0
    cost_iou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    aux_loss: bool = True  # the same losses after every decoder layer
    min_fraction: float = 0.5  # a segment belongs to a piece when this much of it lies inside

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "aux_loss":
                _require_nonneg(getattr(self, f.name), f"TadTRLossConfig.{f.name}", f" (TadTR: {f.default})")
        if not 0.0 < self.min_fraction <= 1.0:
            raise ValueError(f"TadTRLossConfig.min_fraction must be in (0, 1], got {self.min_fraction} (typical: 0.5)")
        if not isinstance(self.aux_loss, bool):
            raise ValueError(f"TadTRLossConfig.aux_loss must be true or false, got {self.aux_loss!r}")

    @property
    def costs(self) -> MatchCosts:
        return MatchCosts(self.cost_cls, self.cost_seg, self.cost_iou, self.focal_alpha, self.focal_gamma)


@dataclass(frozen=True)
class TadTRInferenceConfig:
    """Decoding: the ``max_detections`` best (query, class) pairs of each piece, then ``nms`` over a video's pieces."""

    max_detections: int = 100  # per piece (TadTR: 100 per window)
    min_length: float = 0.0  # steps: shorter candidates are dropped
    nms: NMSConfig = field(default_factory=lambda: NMSConfig(method="none", max_detections=200))

    def __post_init__(self) -> None:
        require_positive_int(self.max_detections, "TadTRInferenceConfig.max_detections", " (TadTR: 100)")
        _require_nonneg(self.min_length, "TadTRInferenceConfig.min_length")


@dataclass(frozen=True)
class TadTRConfig:
    """Everything needed to rebuild a TadTR detector (module docstring); stored as YAML. The defaults are
    the official THUMOS14 configuration (``configs/thumos14_i3d2s_tadtr.yml``: I3D features, windows of 128)."""

    family: ClassVar[str] = "tadtr"
    task: ClassVar[str] = "detection"

    arch: Literal["tadtr"] = "tadtr"
    num_classes: int = 20
    feature_dim: int = 2048
    max_seq_len: int = 128  # training crop (steps): the window length under the window protocol
    scale: TemporalScaleConfig = field(default_factory=lambda: TemporalScaleConfig("window", 128, 0.25))
    embed_dim: int = 256
    heads: int = 8
    enc_points: int = 4
    dec_points: int = 4
    enc_layers: int = 4
    dec_layers: int = 4
    ffn_dim: int = 1024
    dropout: float = 0.1
    num_queries: int = 40
    segment_refine: bool = True
    actionness: bool = True
    roi_bins: int = 16
    roi_scale: float = 1.5  # the actionness pools over the segment widened this much
    loss: TadTRLossConfig = field(default_factory=TadTRLossConfig)
    inference: TadTRInferenceConfig = field(default_factory=TadTRInferenceConfig)

    def __post_init__(self) -> None:
        if self.arch != "tadtr":
            raise ValueError(f"TadTRConfig.arch must be 'tadtr', got {self.arch!r}")
        require_positive_int(self.num_classes, "TadTRConfig.num_classes", " (1 = class-agnostic; THUMOS14: 20)")
        hints = {
            "feature_dim": "2048 (I3D)", "max_seq_len": "128 on THUMOS14", "embed_dim": "256", "heads": "8", "enc_points": "4",
            "dec_points": "4", "enc_layers": "4 (THUMOS14), 2", "dec_layers": "4", "ffn_dim": "1024", "num_queries": "40",
            "roi_bins": "16",
        }  # fmt: skip
        for name, hint in hints.items():
            require_positive_int(getattr(self, name), f"TadTRConfig.{name}", f" (TadTR: {hint})")
        if self.embed_dim % self.heads != 0:
            raise ValueError(f"TadTRConfig.embed_dim ({self.embed_dim}) must be divisible by heads ({self.heads}) (TadTR: 256 / 8)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TadTRConfig.dropout must be in [0, 1), got {self.dropout} (TadTR: 0.1)")
        if not (isinstance(self.roi_scale, int | float) and math.isfinite(self.roi_scale) and self.roi_scale > 0):
            raise ValueError(f"TadTRConfig.roi_scale must be > 0, got {self.roi_scale!r} (TadTR: 1.5)")
        for name in ("segment_refine", "actionness"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TadTRConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.segment_refine and not self.loss.aux_loss:
            raise ValueError(
                "TadTRConfig: segment_refine needs loss.aux_loss (each layer's segment head learns only from its own auxiliary loss)"
            )
        if self.scale.protocol == "window" and self.max_seq_len > self.scale.length:
            raise ValueError(
                f"TadTRConfig.max_seq_len ({self.max_seq_len}) must be at most the window length scale.length ({self.scale.length})"
            )

    @property
    def input_dim(self) -> int:
        return self.feature_dim


def tadtr_config(*, protocol: Literal["activitynet", "thumos14"], num_classes: int, input_dim: int, **sizes: Any) -> TadTRConfig:
    """The published configuration of ``protocol`` for ``num_classes`` classes of ``input_dim``-dim features;
    ``sizes`` override any other field of ``TadTRConfig`` (``embed_dim``, ``enc_layers``, ``num_queries``, ...).

    THUMOS14 (the official release): windows of 128 steps (test overlap 0.25), 4 + 4 layers, FFN 1024,
    40 queries; windows merged by class-wise hard NMS at tIoU 0.4, 200 kept. ActivityNet: each video
    resized to 100 steps, the code's defaults (2 + 4 layers, FFN 2048, 30 queries), no NMS, 100 kept.
    """
    match protocol:
        case "thumos14":
            base = TadTRConfig(num_classes=num_classes, feature_dim=input_dim)
            base = replace(
                base, inference=TadTRInferenceConfig(nms=NMSConfig(method="hard", iou_threshold=0.4, min_score=0.0, max_detections=200))
            )
        case "activitynet":
            base = TadTRConfig(
                num_classes=num_classes, feature_dim=input_dim, max_seq_len=100_000, scale=TemporalScaleConfig("resize", 100),
                enc_layers=2, ffn_dim=2048, num_queries=30,
                inference=TadTRInferenceConfig(nms=NMSConfig(method="none", max_detections=100)),
            )  # fmt: skip
        case _:
            raise ValueError(f"tadtr_config: protocol must be 'activitynet' or 'thumos14', got {protocol!r}")
    known = {f.name for f in fields(TadTRConfig)} - {"num_classes", "feature_dim"}
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise ValueError(f"tadtr_config: unknown size(s) {unknown}; known: {sorted(known)}")
    return replace(base, **sizes)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``logit(x)`` with ``x`` clamped to ``[eps, 1 - eps]`` (a reference at an end must stay finite)."""
    x = x.float().clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def sine_positions(mask: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine position encoding of ``mask [M, L]`` -> ``[M, L, D]``: step ``k`` at ``2 pi (k + 1) / n``
    (``n`` valid steps, DETR's normalised form), sines at even channels, cosines at odd ones."""
    n = mask.sum(dim=-1, keepdim=True).clamp(min=1).float()  # [M, 1]
    x = (torch.arange(mask.shape[-1], device=mask.device, dtype=torch.float32) + 1.0)[None] / n * (2 * math.pi)  # [M, L]
    channel = torch.arange(dim, device=mask.device)
    angles = x[..., None] / temperature ** (2 * (channel // 2) / dim).float()  # [M, L, D]
    return torch.where(channel % 2 == 0, angles.sin(), angles.cos())


class SegmentMLP(nn.Sequential):
    """``D -> D -> D -> out`` with ReLU (the segment head, TadTR's 3-layer MLP)."""

    def __init__(self, dim: int, out: int):
        super().__init__(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))


@dataclass
class SetOutputs:
    """Per decoder layer: ``logits [Y', M, Q, K]`` (only the last layer's, ``Y' = 1``, unless all are needed) and
    ``segments [Y, M, Q, 2]`` (center, width) in unit valid time; ``actionness [M, Q]`` in [0, 1] or None."""

    logits: list[Tensor]
    segments: list[Tensor]
    actionness: Tensor | None


class TadTRDetector(DetectorModule):
    """TadTR (module docstring). Built from the config alone: ``TadTRDetector(config)``; ``forward`` is the loss
    dict in training mode and one ``Detections`` per video in eval mode, as every detector (``detectors.base``)."""

    def __init__(self, config: TadTRConfig):
        super().__init__()
        self.config = config
        cfg, D, Y = config, config.embed_dim, config.dec_layers
        self.input_proj = nn.Conv1d(cfg.feature_dim, D, 1)
        self.input_norm = MaskedGroupNorm(math.gcd(32, D), D)
        self.encoder = nn.ModuleList(
            DeformableEncoderLayer(D, cfg.heads, cfg.enc_points, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.enc_layers)
        )
        self.decoder = nn.ModuleList(DeformableDecoderLayer(D, cfg.heads, cfg.dec_points, cfg.ffn_dim, cfg.dropout) for _ in range(Y))
        self.query_embed = nn.Embedding(cfg.num_queries, 2 * D)  # [position | content]
        self.reference_points = nn.Linear(D, 1)
        # one head per layer with refinement (each layer refines its own reference), one shared head otherwise
        heads = Y if cfg.segment_refine else 1
        self.class_heads = nn.ModuleList(nn.Linear(D, cfg.num_classes) for _ in range(heads))
        self.segment_heads = nn.ModuleList(SegmentMLP(D, 2) for _ in range(heads))
        self.actionness_head = (
            nn.Sequential(nn.Linear(cfg.roi_bins * D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 1))
            if cfg.actionness
            else None
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.input_proj.weight)
        nn.init.zeros_(self.input_proj.bias)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        prior = -math.log((1 - 0.01) / 0.01)  # focal loss's prior: every class starts at probability 0.01
        for head in self.class_heads:
            nn.init.constant_(head.bias, prior)
        for i, head in enumerate(self.segment_heads):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
            if i == 0:  # the first width is sigmoid(bias) alone: start narrow
                nn.init.constant_(head[-1].bias[1:], -2.0)

    # --- the network ---------------------------------------------------------------------------
    def forward_pieces(self, x: Tensor, mask: Tensor, all_logits: bool = False) -> SetOutputs:
        """Pieces ``[M, C, L]`` and masks ``[M, 1, L]`` -> ``SetOutputs`` (every layer's logits if ``all_logits``)."""
        cfg, M = self.config, x.shape[0]
        x = self.input_proj(x.masked_fill(~mask, 0.0))  # masked_fill: padding may hold NaN
        memory = self.input_norm(x, mask).transpose(1, 2)  # [M, D, L] -> [M, L, D], 0 at invalid steps
        valid = mask[:, 0]  # [M, L]
        pos = sine_positions(valid, cfg.embed_dim).to(memory.dtype)
        for layer in self.encoder:
            memory = layer(memory, pos, valid)
        query_pos, tgt = self.query_embed.weight.split(cfg.embed_dim, dim=1)
        query_pos, tgt = query_pos.expand(M, -1, -1), tgt.expand(M, -1, -1)  # [Q, D] -> [M, Q, D]
        reference = torch.sigmoid(self.reference_points(query_pos).float())  # [M, Q, 1]
        first_reference = reference
        logits, segments = [], []
        for y, layer in enumerate(self.decoder):
            tgt = layer(tgt, query_pos, reference, memory, valid)
            h = y if cfg.segment_refine else 0
            delta = self.segment_heads[h](tgt).float()  # [M, Q, 2]
            base = reference if cfg.segment_refine else first_reference
            if base.shape[-1] == 1:  # a point: the width is the head's alone
                seg = torch.cat([torch.sigmoid(inverse_sigmoid(base) + delta[..., :1]), torch.sigmoid(delta[..., 1:])], dim=-1)
            else:
                seg = torch.sigmoid(inverse_sigmoid(base) + delta)
            segments.append(seg)
            if all_logits or y == len(self.decoder) - 1:
                logits.append(self.class_heads[h](tgt).float())
            if cfg.segment_refine:
                reference = seg.detach()  # TadTR: no gradient through the next layer's reference
        actionness = self._actionness(memory, valid, segments[-1]) if self.actionness_head is not None else None
        return SetOutputs(logits, segments, actionness)

    def _actionness(self, memory: Tensor, valid: Tensor, segments: Tensor) -> Tensor:
        """The predicted tIoU of each final segment: the memory sampled at ``R`` bin centres of the
        segment widened ``roi_scale`` times (clipped to the valid steps) -> MLP -> sigmoid ``[M, Q]``."""
        cfg = self.config
        M, Q, _ = segments.shape
        R = cfg.roi_bins
        n = valid.sum(dim=-1).float()  # [M]
        bounds = center_width_to_bounds(segments.detach() * segments.new_tensor([1.0, cfg.roi_scale])).clamp(0.0, 1.0)  # [M, Q, 2]
        fractions = (torch.arange(R, device=memory.device, dtype=torch.float32) + 0.5) / R  # [R]
        u = bounds[..., :1] + (bounds[..., 1:] - bounds[..., :1]) * fractions  # [M, Q, R] unit valid time
        positions = (u * n.view(M, 1, 1) - 0.5).reshape(M, Q * R)
        pooled = sample_linear(memory.float(), positions, n).to(memory.dtype)  # [M, Q * R, D]
        return torch.sigmoid(self.actionness_head(pooled.reshape(M, Q, -1)).float())[..., 0]

    # --- training --------------------------------------------------------------------------------
    def _piece_targets(self, batch: Batch, pieces: list[Piece]) -> tuple[list[Tensor], list[Tensor]]:
        """Each piece's ground truth: ``[N_m, 2]`` (center, width) in unit valid time and labels ``[N_m]``."""
        L = self.config.scale.length
        segments, labels = [], []
        for p in pieces:
            seg, lab = targets_for_piece(batch.segments[p.video], batch.labels[p.video], p, self.config.loss.min_fraction)
            seg = (seg * (L / p.valid)).clamp(0.0, 1.0)  # a piece's unit time -> its valid time (resize: valid = L)
            segments.append(bounds_to_center_width(seg))
            labels.append(lab.long())
        return segments, labels

    def _match(self, logits: Tensor, segments: Tensor, targets: list[Tensor], labels: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Hungarian matching of every piece -> ``(piece [P], query [P], target [P])`` of the ``P`` matches,
        ``target`` indexing the concatenated targets. One cost matrix for the whole batch, one copy to the host."""
        M, Q, _ = logits.shape
        sizes = [len(t) for t in targets]
        cost = match_cost(
            logits.reshape(M * Q, -1), segments.reshape(M * Q, 2), torch.cat(labels), torch.cat(targets), self.config.loss.costs
        )
        cost = cost.reshape(M, Q, sum(sizes)).cpu()
        piece_idx, query_idx, target_idx, offset = [], [], [], 0
        for m, c in enumerate(cost.split(sizes, dim=-1)):
            q, t = hungarian_match(c[m])
            piece_idx.append(torch.full_like(q, m))
            query_idx.append(q)
            target_idx.append(t + offset)
            offset += sizes[m]
        device = logits.device
        return torch.cat(piece_idx).to(device), torch.cat(query_idx).to(device), torch.cat(target_idx).to(device)

    def _set_losses(self, logits: Tensor, segments: Tensor, targets: list[Tensor], labels: list[Tensor], norm: Tensor) -> dict[str, Tensor]:
        """Focal, L1 and tIoU losses of one layer's predictions, each summed and divided by ``norm``."""
        loss = self.config.loss
        piece, query, target = self._match(logits, segments, targets, labels)
        all_targets, all_labels = torch.cat(targets).to(segments.device), torch.cat(labels).to(logits.device)
        onehot = torch.zeros_like(logits)
        onehot[piece, query, all_labels[target]] = 1.0
        cls = sigmoid_focal_loss(logits, onehot, alpha=loss.focal_alpha, gamma=loss.focal_gamma, reduction="sum") / norm
        pred, gt = segments[piece, query], all_targets[target]
        seg = (pred - gt).abs().sum() / norm
        iou = (1.0 - tiou(center_width_to_bounds(pred), center_width_to_bounds(gt))).sum() / norm
        return {"cls_loss": cls, "seg_loss": seg, "iou_loss": iou}

    def _weighted(self, losses: dict[str, Tensor]) -> Tensor:
        w = self.config.loss
        return w.cls_weight * losses["cls_loss"] + w.seg_weight * losses["seg_loss"] + w.iou_weight * losses["iou_loss"]

    def forward_training(self, batch: Batch) -> dict[str, Tensor]:
        """The losses of a batch: ``cls_loss``, ``seg_loss``, ``iou_loss`` of the last layer, ``actionness_loss``,
        ``aux_loss`` (the weighted losses of the other layers, summed) and ``final_loss``."""
        cfg = self.config
        x, mask, pieces = split(batch.features, batch.mask, cfg.scale)
        targets, labels = self._piece_targets(batch, pieces)
        out = self.forward_pieces(x, mask, all_logits=cfg.loss.aux_loss)
        # DETR's normaliser: ground-truth segments per rank, averaged over the ranks, at least 1
        norm = torch.tensor(float(sum(len(t) for t in targets)), device=x.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(norm)
            norm = norm / torch.distributed.get_world_size()
        norm = norm.clamp(min=1.0)
        losses = self._set_losses(out.logits[-1], out.segments[-1], targets, labels, norm)
        final = self._weighted(losses)
        if cfg.loss.aux_loss and len(out.segments) > 1:
            aux = sum(self._weighted(self._set_losses(lg, sg, targets, labels, norm)) for lg, sg in zip(out.logits[:-1], out.segments[:-1]))
            losses["aux_loss"] = aux
            final = final + aux
        if out.actionness is not None:
            losses["actionness_loss"] = self._actionness_loss(out.actionness, out.segments[-1], targets)
            final = final + cfg.loss.actionness_weight * losses["actionness_loss"]
        losses["final_loss"] = final
        return losses

    def _actionness_loss(self, actionness: Tensor, segments: Tensor, targets: list[Tensor]) -> Tensor:
        """Mean L1 of each query's actionness to its best tIoU with its piece's ground truth (0 without any), as the official code."""
        M, Q, _ = segments.shape
        all_targets = torch.cat(targets).to(segments.device)
        owner = torch.cat([torch.full((len(t),), m, dtype=torch.long) for m, t in enumerate(targets)]).to(segments.device)  # [N]
        with torch.no_grad():
            iou = tiou(center_width_to_bounds(segments)[:, :, None, :], center_width_to_bounds(all_targets)[None, None])  # [M, Q, N]
            mine = owner[None, None, :] == torch.arange(M, device=segments.device)[:, None, None]  # [M, 1, N]
            best = torch.where(mine, iou, torch.zeros_like(iou)).amax(dim=-1) if len(all_targets) else iou.new_zeros(M, Q)
        return F.l1_loss(actionness.float(), best.float())

    # --- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_inference(self, batch: Batch) -> list[Detections]:
        cfg = self.config
        x, mask, pieces = split(batch.features, batch.mask, cfg.scale)
        out = self.forward_pieces(x, mask)
        probs = torch.sigmoid(out.logits[-1])  # [M, Q, K]
        if out.actionness is not None:
            probs = probs * out.actionness[..., None]
        M, Q, K = probs.shape
        scores, index = probs.reshape(M, Q * K).topk(min(cfg.inference.max_detections, Q * K), dim=1)  # [M, k]
        query, labels = index // K, index % K
        segments = out.segments[-1].gather(1, query[..., None].expand(-1, -1, 2))  # [M, k, 2]
        bounds = center_width_to_bounds(segments).clamp(0.0, 1.0)  # unit valid time; outside it lies beyond the video (or padding)
        # unit valid time -> the piece's unit time -> video steps (Piece.to_steps, vectorised over the pieces)
        valid = torch.tensor([p.valid / cfg.scale.length for p in pieces], device=x.device)
        start = torch.tensor([p.start - 0.5 for p in pieces], device=x.device)
        extent = torch.tensor([p.extent for p in pieces], device=x.device)
        steps = start.view(M, 1, 1) + bounds * (valid * extent).view(M, 1, 1)
        timings = batch.timings if batch.timings is not None else [STEP_TIMING] * len(batch)
        durations = batch.durations if batch.durations is not None else [None] * len(batch)
        owner = np.array([p.video for p in pieces])
        results = []
        for b, (vid, timing, duration) in enumerate(zip(batch.video_ids, timings, durations)):
            mine = torch.from_numpy(np.flatnonzero(owner == b)).to(x.device)
            segs, kept_scores, kept_labels = steps[mine].reshape(-1, 2), scores[mine].reshape(-1), labels[mine].reshape(-1)
            results.append(finish_video(vid, segs, kept_scores, kept_labels, timing, duration, cfg.inference.nms, cfg.inference.min_length))
        return results
