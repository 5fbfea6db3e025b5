"""Online (causal) detectors: actions reported while they happen, with O(1) work per new feature step.

Legend: B batch, C input channels, D channels, T steps (padded to ``pad_multiple``), K classes,
N segments of a video.

::

    features [B, C, T] -> causal pyramid (tal_models.online.encoder) -> fused [B, D, T]   (step t sees steps <= t)
                       -> pointwise heads: class logits [B, K + 1, T]  softmax: "class k (or background, K) is in
                                                                       progress at step t"
                                           elapsed      [B, T]         steps since the start of the action in progress
    training:  per-step soft targets (the classes whose segments cover the step share 1; background where none
               does) -> cross-entropy over valid steps, as the online action detection papers (TRN, LSTR, MiniROAD);
               log1p(elapsed) regressed (smooth L1) at the steps inside an action (the latest-started one)
    streaming: ``stream()`` -> ``OnlineStream``: each pushed step runs the pyramid's incremental state
               and the heads, then the event rule (``tal_models.online.events``) -> start / update / end events
    offline:   ``forward_inference`` runs the same model over the whole sequence and the same rule, and
               returns the ``end`` events' segments as ``Detections``: ``tal evaluate``, ``tal detect`` and
               serving take an online model as any other, and score exactly what a stream would emit

Every head is pointwise (a per-step MLP), so the model is causal because the pyramid is. Step ``t``'s
elapsed-time estimate places the start of the action it sees (``t - elapsed``); the rule averages those
estimates over the instance's steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.batch import Batch
from tal_models.config import require_positive_int
from tal_models.dense import dense_targets
from tal_models.detectors.base import DetectorModule, run_sequence
from tal_models.online.encoder import CausalEncoderConfig, CausalPyramid
from tal_models.online.events import Event, EventRule, EventRuleConfig
from tal_models.postprocess import NMSConfig
from tal_models.structures import Detections, Segments, Unit
from tal_models.timing import STEP_TIMING, FeatureTiming


@dataclass(frozen=True)
class OnlineLossConfig:
    elapsed_weight: float = 1.0  # weight of the smooth-L1 elapsed-time loss
    input_noise: float = 0.0  # std of Gaussian noise added to the training features

    def __post_init__(self) -> None:
        for name in ("elapsed_weight", "input_noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"OnlineLossConfig.{name} must be a number >= 0, got {value!r}")


def _default_rule() -> EventRuleConfig:
    """Thresholds for instance mAP (recall first; a low-scored false start costs little): chosen on the THUMOS14-timed
    ``prototype`` set, seed 0, and checked on other seeds and the held-out ``phases`` set (``benchmarks/online.py``).
    For alerts that must rarely be wrong, raise ``start_threshold`` (e.g. 0.5) per stream."""
    return EventRuleConfig(start_threshold=0.15, end_threshold=0.1, patience=1, update_every=8)


@dataclass(frozen=True)
class OnlineInferenceConfig:
    rule: EventRuleConfig = field(default_factory=_default_rule)
    nms: NMSConfig = field(default_factory=NMSConfig)  # only ``max_detections`` applies: the rule suppresses, not NMS


@dataclass(frozen=True)
class OnlineConfig:
    """An online detector: a causal pyramid, pointwise heads and an event rule (module docstring)."""

    family: ClassVar[str] = "online"
    task: ClassVar[str] = "detection"

    arch: Literal["online"] = "online"
    num_classes: int = 20
    max_seq_len: int = 512  # training crops (steps)
    encoder: CausalEncoderConfig = field(default_factory=CausalEncoderConfig)
    head_layers: int = 2  # per-step MLP layers of each head (the last one maps to the outputs)
    loss: OnlineLossConfig = field(default_factory=OnlineLossConfig)
    inference: OnlineInferenceConfig = field(default_factory=OnlineInferenceConfig)

    def __post_init__(self) -> None:
        if self.arch != "online":
            raise ValueError(f"OnlineConfig.arch must be 'online', got {self.arch!r}")
        require_positive_int(self.num_classes, "OnlineConfig.num_classes")
        require_positive_int(self.max_seq_len, "OnlineConfig.max_seq_len", " (training crops, in feature steps)")
        require_positive_int(self.head_layers, "OnlineConfig.head_layers")
        if self.max_seq_len % self.encoder.total_stride:
            raise ValueError(
                f"OnlineConfig.max_seq_len ({self.max_seq_len}) must be a multiple of the pyramid's total stride "
                f"2**(levels - 1) = {self.encoder.total_stride}"
            )

    @property
    def input_dim(self) -> int:
        return self.encoder.input_dim


def _mlp(dim: int, out: int, layers: int) -> nn.Sequential:
    """``layers - 1`` x (Linear D -> D, ReLU), then Linear D -> out: a per-step head."""
    parts: list[nn.Module] = []
    for _ in range(layers - 1):
        parts += [nn.Linear(dim, dim), nn.ReLU()]
    parts.append(nn.Linear(dim, out))
    return nn.Sequential(*parts)


def elapsed_targets(segments: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """``segments [N, 2]`` (steps) -> ``(elapsed [T], inside [T] bool)``: at a step inside a segment
    (``start < t < end``), the steps since the start of the latest-started segment covering it."""
    t = torch.arange(length, dtype=torch.float32, device=segments.device)
    if segments.numel() == 0:
        return torch.zeros(length, device=segments.device), torch.zeros(length, dtype=torch.bool, device=segments.device)
    starts, ends = segments[:, 0].float(), segments[:, 1].float()
    covers = (starts[:, None] < t[None]) & (t[None] < ends[:, None])  # [N, T]
    latest = torch.where(covers, starts[:, None], torch.full_like(covers, -math.inf, dtype=torch.float32)).amax(dim=0)  # [T]
    inside = covers.any(dim=0)
    return torch.where(inside, t - latest, torch.zeros_like(t)), inside


class OnlineDetector(DetectorModule):
    """Causal pyramid + pointwise heads (module docstring); built from an ``OnlineConfig`` alone."""

    def __init__(self, config: OnlineConfig):
        super().__init__()
        self.config = config
        D = config.encoder.embed_dim
        self.encoder = CausalPyramid(config.encoder)
        self.cls_head = _mlp(D, config.num_classes + 1, config.head_layers)  # the last column: background
        self.elapsed_head = _mlp(D, 1, config.head_layers)

    @property
    def pad_multiple(self) -> int:
        return self.config.encoder.total_stride

    # --- the model ---------------------------------------------------------------------------
    def heads(self, fused: Tensor) -> tuple[Tensor, Tensor]:
        """``fused [..., D]`` (channels last) -> ``(logits [..., K + 1], log1p(elapsed) [...])``; the last logit is background's."""
        # the elapsed head reads the shared features without shaping them: trained into the trunk, regressing how long
        # an action has lasted costs the per-step classification dearly (test per-frame mAP 0.49 -> ~0.2 in our runs)
        return self.cls_head(fused), self.elapsed_head(fused.detach())[..., 0]

    def outputs(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C, T]``, ``[B, 1, T]`` -> ``(logits [B, K + 1, T], log1p(elapsed) [B, T])``, causal in time."""
        torch._assert(
            features.shape[-1] % self.pad_multiple == 0,
            f"OnlineDetector: T = {features.shape[-1]} must be a multiple of {self.pad_multiple}; "
            f"batch with collate(..., pad_to_multiple=model.pad_multiple)",
        )
        fused = self.encoder(features, mask).transpose(1, 2)  # [B, T, D]
        logits, log_elapsed = self.heads(fused)
        return logits.transpose(1, 2), log_elapsed

    def forward_training(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.config
        features = batch.features
        if cfg.loss.input_noise > 0:
            features = features + cfg.loss.input_noise * torch.randn_like(features).masked_fill_(~batch.mask, 0.0)
        logits, log_elapsed = self.outputs(features, batch.mask)
        T = logits.shape[-1]
        covered = torch.stack(
            [dense_targets(s, lab, cfg.num_classes, T, check_labels=False) for s, lab in zip(batch.segments, batch.labels)]
        ).float()  # [B, K, T]
        count = covered.sum(dim=1, keepdim=True)  # [B, 1, T]
        targets = torch.cat([covered / count.clamp(min=1), (count == 0).float()], dim=1)  # [B, K + 1, T], each step sums to 1
        valid = batch.mask[:, 0]
        per_step = -(targets * F.log_softmax(logits.float().masked_fill(~batch.mask, 0.0), dim=1)).sum(dim=1)  # [B, T]
        cls_loss = per_step.masked_fill(~valid, 0.0).sum() / valid.sum().clamp(min=1)
        elapsed, inside = zip(*(elapsed_targets(s, T) for s in batch.segments))
        elapsed, inside = torch.stack(elapsed), torch.stack(inside) & batch.mask[:, 0]  # [B, T]
        per_step = F.smooth_l1_loss(log_elapsed.float(), torch.log1p(elapsed), reduction="none")
        elapsed_loss = per_step.masked_fill(~inside, 0.0).sum() / inside.sum().clamp(min=1)
        return {
            "cls_loss": cls_loss,
            "elapsed_loss": elapsed_loss,
            "final_loss": cls_loss + cfg.loss.elapsed_weight * elapsed_loss,
        }

    # --- offline: the same model and rule over whole sequences -------------------------------
    @torch.no_grad()
    def _per_step(self, batch: Batch) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each video's ``(probs [T_i, K] float32, elapsed [T_i] float32)`` at its valid steps."""
        logits, log_elapsed = self.outputs(batch.features, batch.mask)
        probs = class_probabilities(logits, dim=1).transpose(1, 2).cpu().numpy()
        elapsed = torch.expm1(log_elapsed.float().clamp(min=0)).cpu().numpy()
        return [(probs[i, :n], elapsed[i, :n]) for i, n in enumerate(batch.lengths().tolist())]

    def step_scores(self, features: Tensor | np.ndarray) -> np.ndarray:
        """Per-step class probabilities ``[T, K]`` of one sequence ``[T, C]`` (what a stream's ``scores()`` gives)."""
        return run_sequence(self, features, self.config.input_dim, lambda batch: self._per_step(batch)[0][0])

    sequence_scores = step_scores  # the dense detectors' name (per-frame mAP in ``tal evaluate``)

    def stream_events(
        self, features: Tensor | np.ndarray, timing: FeatureTiming | None = None, rule: EventRuleConfig | None = None
    ) -> list[Event]:
        """Every event a stream of ``features [T, C]`` emits, ``close()`` included, computed offline."""
        probs, elapsed = run_sequence(self, features, self.config.input_dim, lambda batch: self._per_step(batch)[0])
        return run_rule(probs, elapsed, rule or self.config.inference.rule, timing)

    @torch.no_grad()
    def forward_inference(self, batch: Batch) -> list[Detections]:
        timings = batch.timings if batch.timings is not None else [STEP_TIMING] * len(batch)
        durations = batch.durations if batch.durations is not None else [None] * len(batch)
        out = []
        for vid, (probs, elapsed), timing, duration in zip(batch.video_ids, self._per_step(batch), timings, durations):
            events = [e for e in run_rule(probs, elapsed, self.config.inference.rule, timing) if e.kind == "end"]
            out.append(events_to_detections(vid, events, duration, self.config.inference.nms.max_detections))
        return out

    # --- streaming ---------------------------------------------------------------------------
    def stream(self, timing: FeatureTiming | None = None, rule: EventRuleConfig | None = None, keep_scores: bool = True) -> Any:
        """A new ``OnlineStream`` over this model (put the model in eval mode first; it is not copied)."""
        from tal_models.online.stream import OnlineStream

        return OnlineStream(self, timing=timing, rule=rule, keep_scores=keep_scores)


def class_probabilities(logits: Tensor, dim: int = -1) -> Tensor:
    """Logits over ``K + 1`` columns (the last: background) -> the ``K`` classes' softmax probabilities, float32."""
    return F.softmax(logits.float(), dim=dim).narrow(dim, 0, logits.shape[dim] - 1)


def run_rule(probs: np.ndarray, elapsed: np.ndarray, rule: EventRuleConfig, timing: FeatureTiming | None = None) -> list[Event]:
    """The event rule over a whole sequence's ``probs [T, K]`` and ``elapsed [T]``, closed at its end."""
    machine = EventRule(probs.shape[1], rule, timing)
    events: list[Event] = []
    for t in range(probs.shape[0]):
        events += machine.update(t, probs[t], float(elapsed[t]))
    return events + machine.close()


def events_to_detections(
    video_id: str, events: list[Event], duration: float | None = None, max_detections: int | None = None
) -> Detections:
    """The ``end`` events of one video -> ``Detections`` (seconds, best score first), clipped to ``duration``."""
    ends = [e for e in events if e.kind == "end"]
    segs = np.array([[e.start, e.end] for e in ends], dtype=np.float64).reshape(-1, 2)
    segs = segs.clip(0.0, float(duration) if duration is not None else math.inf)
    scores = np.array([e.score for e in ends], dtype=np.float64)
    labels = np.array([e.label for e in ends], dtype=np.int64)
    order = np.argsort(-scores, kind="stable")[:max_detections]
    return Detections(
        video_id, Segments(torch.from_numpy(segs[order]), Unit.SECONDS, check=False), torch.from_numpy(scores[order]),
        torch.from_numpy(labels[order]),
    )  # fmt: skip


def online_config(
    *, kind: str = "transformer", num_classes: int = 20, input_dim: int = 2048, max_seq_len: int = 512, embed_dim: int = 512,
    levels: int = 6, **encoder: Any,
) -> OnlineConfig:  # fmt: skip
    """Our THUMOS14 online configuration at the given sizes (the base of the ``*-online`` presets)."""
    enc = CausalEncoderConfig(kind=kind, input_dim=input_dim, embed_dim=embed_dim, levels=levels, **encoder)
    return OnlineConfig(num_classes=num_classes, max_seq_len=max_seq_len, encoder=enc)
