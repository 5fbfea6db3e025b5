"""The training and validation loops, plain PyTorch in one process.

Ray Train wraps them (``jobs.train`` hands ``train_one_epoch`` a DDP-wrapped model and its shard's
batches; nothing else changes). A model takes a ``tal_models.batch.Batch`` and returns a dict of
losses in training mode (with ``final_loss``) or a list of detections in eval mode: the
``tal_models.detectors.Detector`` protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tal_models.batch import Batch
from tal_models.optim import ModelEMA

logger = logging.getLogger(__name__)


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
