"""Single-process training utilities: optimiser, schedule, EMA, cropping, batching, epoch loops.

Legend: B batch, C channels, T steps (padded), T_i steps of video i, N_i ground-truth segments of
video i.

Everything here is plain PyTorch/NumPy and runs in one process; Ray Train wraps it later (it
hands ``train_one_epoch`` a DDP-wrapped model and a sharded loader, nothing else changes).

- ``OptimConfig`` / ``build_optimizer`` / ``build_scheduler``: AdamW without weight decay on
  biases, norm weights and other 1-D parameters; per-iteration linear warm-up then cosine to 0
  (ActionFormer's ``LinearWarmupCosineAnnealingLR`` with ``warmup_start_lr = eta_min = 0``).
- ``ModelEMA``: exponential moving average of parameters and buffers.
- ``random_crop``: training-time cropping of long sequences (ActionFormer's ``truncate_feats``).
- ``Batch`` / ``collate``: THE one place that pads. Features ``[B, C, T]``, mask ``[B, 1, T]``.
- ``train_one_epoch`` / ``validate_one_epoch``: the loops; a model takes a ``Batch`` and returns
  a dict of losses (training mode, with ``final_loss``) or a list of detections (eval mode).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tal_models.blocks import LayerNormC, MaskedGroupNorm
from tal_models.timing import FeatureTiming

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | Tensor

# Modules whose weights are scales/shifts of a normalisation: never weight-decayed.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    LayerNormC,
    MaskedGroupNorm,
)


# --- optimiser and schedule ------------------------------------------------------------------
@dataclass(frozen=True)
class OptimConfig:
    """AdamW, warm-up + cosine schedule (per iteration), gradient clipping and EMA settings.

    ``clip_grad_norm=None`` disables clipping, ``ema_decay=None`` disables the EMA.
    """

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: int = 5
    epochs: int = 35
    clip_grad_norm: float | None = 1.0
    ema_decay: float | None = 0.999

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"OptimConfig.lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"OptimConfig.weight_decay must be >= 0 (0 disables it), got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimConfig.betas must be two numbers in [0, 1), got {self.betas}")
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"OptimConfig.epochs must be a positive int, got {self.epochs!r}")
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"OptimConfig.warmup_epochs must be an int >= 0, got {self.warmup_epochs!r}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"OptimConfig.warmup_epochs ({self.warmup_epochs}) must not exceed epochs ({self.epochs}); "
                "lower the warm-up or train longer"
            )
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise ValueError(f"OptimConfig.clip_grad_norm must be positive, or None to disable clipping, got {self.clip_grad_norm}")
        if self.ema_decay is not None and not (0.0 < self.ema_decay < 1.0):
            raise ValueError(f"OptimConfig.ema_decay must be in (0, 1), or None to disable the EMA, got {self.ema_decay}")


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a (Distributed)DataParallel wrapper, as Ray Train's ``prepare_model`` makes."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def split_weight_decay_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decay, no_decay)`` trainable parameters, each listed once.

    No decay for biases, the weights of normalisation layers and any parameter with ``ndim <= 1``
    (scales, per-channel gains, embeddings of one vector): decaying these shrinks them towards 0,
    which is not a prior anyone wants (ActionFormer's and detectron2's rule).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in _unwrap(model).modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # shared parameters are listed once
                continue
            seen.add(id(param))
            if is_norm or name.endswith("bias") or param.ndim <= 1:
                no_decay.append(param)
            else:
                decay.append(param)
    return decay, no_decay


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW with two groups, named ``"decay"`` (``config.weight_decay``) and ``"no_decay"`` (0)."""
    decay, no_decay = split_weight_decay_params(model)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    groups = [
        {"name": "decay", "params": decay, "weight_decay": config.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps: ``step / warmup_steps`` during the
    warm-up, then ``(1 + cos(pi * progress)) / 2``, reaching 0 at ``total_steps`` and staying there."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule: linear warm-up from 0 to ``lr`` over ``warmup_epochs * steps_per_epoch``
    steps, then cosine to 0 at ``epochs * steps_per_epoch``. Call ``scheduler.step()`` after every
    ``optimizer.step()`` (``train_one_epoch`` does). The very first step runs at lr 0, as in ActionFormer."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"build_scheduler: steps_per_epoch must be a positive int (len(loader)), got {steps_per_epoch!r}")
    warmup = config.warmup_epochs * steps_per_epoch
    total = config.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup, total))


# --- exponential moving average --------------------------------------------------------------
class ModelEMA:
    """Exponential moving average of a model's parameters and buffers.

    After ``update(model)``: ``ema = decay * ema + (1 - decay) * current`` for every floating-point
    entry of the state dict; integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied.
    ``module`` is a frozen copy in eval mode, on the model's device, to evaluate or checkpoint.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(_unwrap(model)).eval()
        self.module.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = _unwrap(model).state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = current[name].detach()
            if ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - self.decay)  # ema + (1 - d) * (v - ema)
            else:
                ema_value.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state_dict)


# --- cropping --------------------------------------------------------------------------------
def _random_start(high: int, generator: torch.Generator | np.random.Generator | None) -> int:
    """Uniform int in ``[0, high]``."""
    if isinstance(generator, np.random.Generator):
        return int(generator.integers(0, high + 1))
    return int(torch.randint(0, high + 1, (1,), generator=generator).item())


def random_crop(
    features: ArrayLike,
    segments: ArrayLike,
    labels: ArrayLike,
    max_length: int,
    generator: torch.Generator | np.random.Generator | None = None,
    *,
    max_tries: int = 10,
    min_kept_fraction: float = 0.5,
) -> tuple[ArrayLike, ArrayLike, ArrayLike, int]:
    """Crop a training sequence longer than ``max_length`` steps to a random window of that length.

    ``features [T, C]`` (the store's layout), ``segments [N, 2]`` (start, end in steps),
    ``labels [N]``; NumPy or torch, returned in the same kind. Returns
    ``(features [max_length, C], segments [M, 2], labels [M], offset_steps)``: the window covers
    steps ``[s, s + max_length)``, and kept segments are clipped to ``[s, s + max_length]`` and
    shifted by ``-s``, so they lie in ``[0, max_length]``. The caller shifts timing by
    ``offset_steps * stride / fps`` seconds (``FeatureTiming(offset=...)``).

    A segment is kept when at least ``min_kept_fraction`` of its length (and more than nothing)
    lies inside the window; zero-length segments are therefore always dropped. Up to ``max_tries``
    windows are drawn until one keeps an action (when the video has any); if none does, the last
    window is returned with no segments (ActionFormer's ``truncate_feats``).

    Sequences of at most ``max_length`` steps are returned unchanged with offset 0 (the returned
    features of a crop are a view of the input).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"random_crop: max_length must be a positive int, got {max_length!r}")
    if max_tries < 1:
        raise ValueError(f"random_crop: max_tries must be >= 1, got {max_tries}")
    if not 0.0 <= min_kept_fraction <= 1.0:
        raise ValueError(f"random_crop: min_kept_fraction must be in [0, 1], got {min_kept_fraction}")
    if segments.ndim != 2 or segments.shape[1] != 2 or labels.shape[0] != segments.shape[0]:
        raise ValueError(f"random_crop: expected segments [N, 2] and labels [N], got {tuple(segments.shape)} and {tuple(labels.shape)}")
    num_steps = features.shape[0]
    if num_steps <= max_length:
        return features, segments, labels, 0

    lengths = segments[:, 1] - segments[:, 0]
    for _ in range(max_tries):
        start = _random_start(num_steps - max_length, generator)
        end = start + max_length
        inside = segments[:, 1].clip(min=start, max=end) - segments[:, 0].clip(min=start, max=end)
        keep = (inside > 0) & (inside >= min_kept_fraction * lengths)
        if segments.shape[0] == 0 or bool(keep.any()):
            break
    kept = segments[keep].clip(min=start, max=end) - start
    return features[start:end], kept, labels[keep], start


# --- batching --------------------------------------------------------------------------------
@dataclass
class Batch:
    """A padded batch: the only padded structure of the platform.

    ``features [B, C, T]`` float32 (0 at padded steps), ``mask [B, 1, T]`` bool (True = valid
    step; each row is a valid prefix), ``segments`` list of ``[N_i, 2]`` float32 (steps),
    ``labels`` list of ``[N_i]`` int64, ``video_ids`` list of ``B`` str; for decoding,
    ``timings`` (the ``FeatureTiming`` of each video's sequence as given, crop included) and
    ``durations`` (seconds, ``None`` if unknown). Without ``timings`` a detector reports
    segments in feature steps (``STEP_TIMING``).
    """

    features: Tensor
    mask: Tensor
    segments: list[Tensor]
    labels: list[Tensor]
    video_ids: list[str]
    timings: list[FeatureTiming] | None = None
    durations: list[float | None] | None = None

    def __len__(self) -> int:
        return len(self.video_ids)

    def lengths(self) -> Tensor:
        """``[B]`` number of valid steps of each video."""
        return self.mask[:, 0].sum(dim=1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            features=self.features.to(device, non_blocking=non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
            segments=[s.to(device, non_blocking=non_blocking) for s in self.segments],
            labels=[x.to(device, non_blocking=non_blocking) for x in self.labels],
            video_ids=list(self.video_ids),
            timings=self.timings,
            durations=self.durations,
        )


def _field(sample: Any, name: str, default: Any = ...) -> Any:
    if isinstance(sample, Mapping):
        return sample[name] if default is ... else sample.get(name, default)
    return getattr(sample, name) if default is ... else getattr(sample, name, default)


def collate(samples: Sequence[Any], pad_to_multiple: int = 1) -> Batch:
    """Stack samples into a ``Batch``, padding ``T`` to the longest sequence rounded up to a
    multiple of ``pad_to_multiple`` (a pyramid of ``L`` levels needs ``2**(L - 1)``).

    Each sample is a mapping or an object with ``features [T_i, C]``, ``segments [N_i, 2]``
    (steps), ``labels [N_i]`` and ``video_id``, optionally ``timing`` (``FeatureTiming``) and
    ``duration`` (seconds); arrays may be NumPy or torch. ``segments`` and ``labels`` may be
    omitted for inference.
    """
    if isinstance(pad_to_multiple, bool) or not isinstance(pad_to_multiple, int) or pad_to_multiple < 1:
        raise ValueError(f"collate: pad_to_multiple must be a positive int, got {pad_to_multiple!r}")
    if len(samples) == 0:
        raise ValueError("collate: got an empty list of samples")
    features = [torch.as_tensor(_field(s, "features"), dtype=torch.float32) for s in samples]
    channels = {f.shape[1] if f.ndim == 2 else None for f in features}
    if len(channels) != 1 or None in channels:
        raise ValueError(f"collate: features must be [T, C] with one C, got shapes {[tuple(f.shape) for f in features]}")
    timings = [_field(s, "timing", None) for s in samples]
    if any(t is not None for t in timings) and not all(isinstance(t, FeatureTiming) for t in timings):
        raise ValueError("collate: give every sample a FeatureTiming 'timing', or none")
    durations = [_field(s, "duration", None) for s in samples]
    lengths = [f.shape[0] for f in features]
    padded = max(pad_to_multiple, math.ceil(max(lengths) / pad_to_multiple) * pad_to_multiple)

    out = features[0].new_zeros(len(samples), channels.pop(), padded)  # [B, C, T]
    mask = torch.zeros(len(samples), 1, padded, dtype=torch.bool)  # [B, 1, T]
    for i, (f, n) in enumerate(zip(features, lengths)):
        out[i, :, :n] = f.T  # [T_i, C] -> [C, T_i]
        mask[i, 0, :n] = True
    return Batch(
        features=out,
        mask=mask,
        segments=[torch.as_tensor(_field(s, "segments", ()), dtype=torch.float32).reshape(-1, 2) for s in samples],
        labels=[torch.as_tensor(_field(s, "labels", ()), dtype=torch.int64).reshape(-1) for s in samples],
        video_ids=[str(_field(s, "video_id")) for s in samples],
        timings=timings if all(t is not None for t in timings) else None,
        durations=[None if d is None else float(d) for d in durations],
    )


# --- epoch loops -----------------------------------------------------------------------------
@dataclass
class EpochTiming:
    """Where an epoch's time went (filled in by ``train_one_epoch``): ``epoch_seconds`` in all
    (loader included), ``step_seconds`` from forward to EMA only, ``first_step_seconds`` from the
    call to the end of the first step."""

    epoch_seconds: float = 0.0
    step_seconds: float = 0.0
    first_step_seconds: float = 0.0


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    ema: ModelEMA | None = None,
    clip_grad_norm: float | None = None,
    device: torch.device | str = "cpu",
    log_every: int = 0,
    autocast_dtype: torch.dtype | None = None,
    timing: EpochTiming | None = None,
) -> dict[str, float]:
    """One pass over ``loader``: forward, backward, clip, step, schedule (per iteration), EMA.

    ``model(batch)`` in training mode returns a dict of scalar losses including ``final_loss``,
    the one that is back-propagated (under ``torch.autocast(autocast_dtype)`` when given). Returns
    the mean of each loss over the iterations and ``samples_per_second``; ``timing``, when given,
    receives where the time went. Losses are accumulated on the device and read once at the end, so
    the loop does not synchronise with the accelerator except to log (``log_every > 0``).
    """
    model.train()
    totals: dict[str, Tensor] = {}
    num_iters = 0
    num_samples = 0
    step_seconds = 0.0
    first_step_seconds = 0.0
    started = time.perf_counter()
    device_type = torch.device(device).type
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        step_started = time.perf_counter()
        with torch.autocast(device_type=device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            losses = model(batch)
        if "final_loss" not in losses:
            raise KeyError(f"train_one_epoch: the model's loss dict has no 'final_loss' (keys: {sorted(losses)})")
        optimizer.zero_grad(set_to_none=True)
        losses["final_loss"].backward()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        step_seconds += time.perf_counter() - step_started
        if num_iters == 0:
            first_step_seconds = time.perf_counter() - started

        for name, value in losses.items():
            value = value.detach().float()
            totals[name] = totals[name] + value if name in totals else value
        num_iters += 1
        num_samples += len(batch)
        if log_every > 0 and num_iters % log_every == 0:
            logger.info(
                "iter %d: %s, lr %.3g",
                num_iters,
                ", ".join(f"{k} {v.item() / num_iters:.4f}" for k, v in totals.items()),
                optimizer.param_groups[0]["lr"],
            )
    if num_iters == 0:
        raise ValueError("train_one_epoch: the loader yielded no batches")
    elapsed = time.perf_counter() - started
    stats = {name: total.item() / num_iters for name, total in totals.items()}
    stats["samples_per_second"] = num_samples / max(elapsed, 1e-9)
    if timing is not None:
        timing.epoch_seconds, timing.step_seconds, timing.first_step_seconds = elapsed, step_seconds, first_step_seconds
    return stats


def validate_one_epoch(model: nn.Module, loader: Iterable[Batch], *, device: torch.device | str = "cpu") -> list:
    """Run ``model(batch)`` in eval mode under ``torch.inference_mode()`` on every batch and
    concatenate the lists it returns (one ``Detections`` per video, typically). The model's
    training/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    results: list = []
    try:
        with torch.inference_mode():
            for batch in loader:
                results.extend(model(batch.to(device, non_blocking=True)))
    finally:
        model.train(was_training)
    return results
