"""What every detector is, whatever its family: the protocol training, inference and serving rely on.

Legend: B batch, C input channels, T steps.

A detector is an ``nn.Module`` built by ``tal_models.detectors.build_detector`` from its config
(the config is its stored form: presets, checkpoints, MLflow). It takes a padded
``tal_models.batch.Batch`` (``features [B, C, T]``, ``mask [B, 1, T]``, ``T`` a multiple of
``pad_multiple``) and

- ``forward_training(batch)`` -> a dict of scalar losses, ``final_loss`` the one back-propagated;
- ``forward_inference(batch)`` -> one ``Detections`` per video, in seconds when the batch carries
  timings (``STEP_TIMING``, i.e. feature steps, otherwise);
- ``detect(features [T, C], timing, duration)`` -> the ``Detections`` of one sequence (serving).

``forward(batch)`` is ``forward_training`` in training mode and ``forward_inference`` in eval
mode, so ``tal_models.training``'s loops need nothing else.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from tal_models.batch import Batch, collate
from tal_models.structures import Detections
from tal_models.timing import FeatureTiming


@runtime_checkable
class Detector(Protocol):
    """The protocol of every detector (module docstring)."""

    config: Any  # the frozen config dataclass it was built from (its ``family`` names the family)

    @property
    def pad_multiple(self) -> int: ...

    def forward_training(self, batch: Batch) -> dict[str, Tensor]: ...

    def forward_inference(self, batch: Batch) -> list[Detections]: ...

    def detect(
        self, features: Tensor | np.ndarray, timing: FeatureTiming | None = None, duration: float | None = None, video_id: str = "video"
    ) -> Detections: ...


def check_sequence(features: Tensor | np.ndarray, input_dim: int) -> Tensor | np.ndarray:
    """One feature sequence as a user hands it -> float32 ``[T, input_dim]`` (NumPy stays NumPy),
    or a ``ValueError`` saying what is wrong (shape, no step, NaN or infinite values)."""
    # NumPy stays NumPy (the store's arrays are read-only views of Arrow memory; ``collate`` copies them once)
    features = features.detach().to(torch.float32) if isinstance(features, Tensor) else np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[1] != input_dim:
        raise ValueError(f"features must be [T, {input_dim}], got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError("features must have at least one step")
    finite = torch.isfinite(features).all() if isinstance(features, Tensor) else np.isfinite(features).all()
    if not finite:
        raise ValueError("features contain NaN or infinite values")
    return features


class DetectorModule(nn.Module):
    """What every family's module shares: ``forward`` is ``forward_training`` in training mode and
    ``forward_inference`` in eval mode; ``detect`` runs one sequence through ``detect_sequence``;
    ``pad_multiple`` 1 unless the family says otherwise. Subclasses set ``self.config``."""

    @property
    def pad_multiple(self) -> int:
        return 1

    def forward(self, batch: Batch) -> dict[str, Tensor] | list[Detections]:
        if self.training:
            return self.forward_training(batch)
        return self.forward_inference(batch)

    def detect(
        self, features: Tensor | np.ndarray, timing: FeatureTiming | None = None, duration: float | None = None, video_id: str = "video"
    ) -> Detections:
        """Detections of one feature sequence ``[T, C]`` (the serving path); the model's mode is kept."""
        return detect_sequence(self, features, self.config.input_dim, timing, duration, video_id)


@torch.no_grad()
def run_sequence(model: nn.Module, features: Tensor | np.ndarray, input_dim: int, fn: Any, **sample: Any) -> Any:
    """``fn(batch)`` on one feature sequence ``[T, input_dim]``, checked (``check_sequence``) and collated as a batch
    of one on the model's device (``sample``: its ``timing``, ``duration``, ``video_id``), the model in eval mode
    (its mode is kept): the shared body of ``detect``, ``classify``, ``sequence_scores``."""
    features = check_sequence(features, input_dim)
    device = next(model.parameters()).device
    batch = collate([{"features": features, "video_id": "video", **sample}], model.pad_multiple)
    was_training = model.training
    model.eval()
    try:
        return fn(batch.to(device))
    finally:
        model.train(was_training)


def detect_sequence(
    model: nn.Module,
    features: Tensor | np.ndarray,
    input_dim: int,
    timing: FeatureTiming | None = None,
    duration: float | None = None,
    video_id: str = "video",
    class_embeddings: Tensor | None = None,
) -> Detections:
    """``model.forward_inference`` on one feature sequence ``[T, input_dim]``: the shared body of
    every detector's ``detect``. The sequence is checked here (the edge where a user's array
    enters); the model's training/eval mode is kept. ``class_embeddings [K', E]`` (an
    open-vocabulary detector only) go to ``forward_inference``: the classes to detect."""
    extra = {} if class_embeddings is None else {"class_embeddings": class_embeddings}
    return run_sequence(
        model, features, input_dim, lambda batch: model.forward_inference(batch, **extra)[0], timing=timing, duration=duration,
        video_id=video_id,
    )  # fmt: skip
