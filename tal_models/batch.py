"""The padded batch, THE one place that pads, and the training-time crop of a sequence.

Legend: B batch, C channels, T steps (padded), T_i steps of video i, N_i ground-truth segments of
video i.

``random_crop`` cuts a long training sequence to the model's ``max_seq_len`` (ActionFormer's
``truncate_feats``); ``collate`` stacks samples into a ``Batch`` (features ``[B, C, T]``, mask
``[B, 1, T]``), which every detector's ``forward_training`` / ``forward_inference`` takes, in
training, evaluation and serving alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tal_models.config import require_positive_int
from tal_models.timing import FeatureTiming

ArrayLike = np.ndarray | Tensor


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
    require_positive_int(max_length, "random_crop: max_length")
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


def _features(x: Any) -> np.ndarray | Tensor:
    """``[T, C]`` features as float32, without copying (``collate`` copies them once, into the batch)."""
    if isinstance(x, Tensor):
        return x.detach().to(torch.float32)
    return np.asarray(x, dtype=np.float32)


def _host_tensor(x: Any, dtype: torch.dtype) -> Tensor:
    """Ground truth on the host, in its own memory (never a view of a read-only array)."""
    if isinstance(x, Tensor):
        return x.detach().to("cpu", dtype)
    return torch.tensor(np.asarray(x), dtype=dtype)


def collate(samples: Sequence[Any], pad_to_multiple: int = 1, num_classes: int | None = None) -> Batch:
    """Stack samples into a ``Batch``, padding ``T`` to the longest sequence rounded up to a
    multiple of ``pad_to_multiple`` (a pyramid of ``L`` levels needs ``2**(L - 1)``).

    Each sample is a mapping or an object with ``features [T_i, C]``, ``segments [N_i, 2]``
    (steps), ``labels [N_i]`` and ``video_id``, optionally ``timing`` (``FeatureTiming``) and
    ``duration`` (seconds); arrays may be NumPy or torch. ``segments`` and ``labels`` may be
    omitted for inference. The batch is validated here, once, on the host: features ``[T, C]`` with
    one ``C``, as many labels as segments, and with ``num_classes`` every label in ``[0, K)``;
    the model's forward pass checks nothing per video (it would stall the accelerator).
    """
    require_positive_int(pad_to_multiple, "collate: pad_to_multiple")
    if len(samples) == 0:
        raise ValueError("collate: got an empty list of samples")
    features = [_features(_field(s, "features")) for s in samples]
    channels = {f.shape[1] if f.ndim == 2 else None for f in features}
    if len(channels) != 1 or None in channels:
        raise ValueError(f"collate: features must be [T, C] with one C, got shapes {[tuple(f.shape) for f in features]}")
    timings = [_field(s, "timing", None) for s in samples]
    if any(t is not None for t in timings) and not all(isinstance(t, FeatureTiming) for t in timings):
        raise ValueError("collate: give every sample a FeatureTiming 'timing', or none")
    durations = [_field(s, "duration", None) for s in samples]
    lengths = [f.shape[0] for f in features]
    padded = max(pad_to_multiple, math.ceil(max(lengths) / pad_to_multiple) * pad_to_multiple)

    out = torch.zeros(len(samples), channels.pop(), padded)  # [B, C, T]
    mask = torch.zeros(len(samples), 1, padded, dtype=torch.bool)  # [B, 1, T]
    for i, (f, n) in enumerate(zip(features, lengths)):
        if isinstance(f, np.ndarray):  # copied by NumPy: the store's arrays are read-only views of Arrow memory
            out.numpy()[i, :, :n] = f.T  # [T_i, C] -> [C, T_i]
        else:
            out[i, :, :n] = f.T
        mask[i, 0, :n] = True
    segments = [_host_tensor(_field(s, "segments", ()), torch.float32).reshape(-1, 2) for s in samples]
    labels = [_host_tensor(_field(s, "labels", ()), torch.int64).reshape(-1) for s in samples]
    video_ids = [str(_field(s, "video_id")) for s in samples]
    for vid, segs, labs in zip(video_ids, segments, labels):
        if segs.shape[0] != labs.shape[0]:
            raise ValueError(f"collate: video {vid!r} has {segs.shape[0]} segments but {labs.shape[0]} labels")
        if num_classes is not None and labs.numel() and (int(labs.min()) < 0 or int(labs.max()) >= num_classes):
            raise ValueError(f"collate: video {vid!r}: labels must lie in [0, {num_classes}), got {labs.tolist()}")
    return Batch(
        features=out,
        mask=mask,
        segments=segments,
        labels=labels,
        video_ids=video_ids,
        timings=timings if all(t is not None for t in timings) else None,
        durations=[None if d is None else float(d) for d in durations],
    )
