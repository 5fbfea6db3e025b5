"""Optimiser, learning-rate schedule and weight EMA of the detectors' training.

- ``OptimConfig`` / ``build_optimizer`` / ``build_scheduler``: AdamW without weight decay on
  biases, norm weights and other 1-D parameters; per-iteration linear warm-up then cosine to 0
  (ActionFormer's ``LinearWarmupCosineAnnealingLR`` with ``warmup_start_lr = eta_min = 0``).
- ``ModelEMA``: exponential moving average of parameters and buffers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tal_models.config import require_int, require_positive_int
from tal_models.layers import LayerNormC, MaskedGroupNorm

# Modules whose weights are scales/shifts of a normalisation: never weight-decayed.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    LayerNormC,
    MaskedGroupNorm,
)


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
        require_positive_int(self.epochs, "OptimConfig.epochs")
        require_int(self.warmup_epochs, "OptimConfig.warmup_epochs", 0)
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
    which is not a prior anyone wants (ActionFormer's and detectron2's rule); nor for a parameter
    marked ``_no_weight_decay`` (Mamba's ``A_log`` and ``D``, as the official module marks them:
    decay would pull every state's decay rate towards the same value).
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
            if is_norm or name.endswith("bias") or param.ndim <= 1 or getattr(param, "_no_weight_decay", False):
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
    require_positive_int(steps_per_epoch, "build_scheduler: steps_per_epoch", " (len(loader))")
    warmup = config.warmup_epochs * steps_per_epoch
    total = config.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup, total))


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
