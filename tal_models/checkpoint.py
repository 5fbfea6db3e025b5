"""The detector checkpoint: one file that ``torch.load(..., weights_only=True)`` reads.

Contents (plain containers and tensors only, so no pickle of our classes is ever executed):

    {"format": "tal-detector/1",
     "family": "one_stage",                        # which config type "config" is (absent in older files: one_stage)
     "config": the detector's config as a dict,    # rebuilds the model
     "state_dict": {...},                          # the weights (the EMA's when training kept one)
     "labels": ["BaseballPitch", ...],             # class id i is labels[i]
     "provenance": {"backbone", "backbone_weights", "backbone_sha256", "feature_dim", "fps", "stride", "window", ...},
     "metadata": {...}}                            # training run, epoch, metrics: free-form, JSON-like

``provenance`` is what the features the model was trained on were computed with (the feature
store's provenance); loading against features from another backbone or sampling is refused by
``check_features``. Reading and writing take a path or a binary file object (an fsspec file
for S3): this module does no other I/O.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from tal_models.config import config_from_dict, config_to_dict
from tal_models.detectors import Detector, DetectorConfig, build_detector, config_type
from tal_models.structures import LabelMap

CHECKPOINT_FORMAT = "tal-detector/1"
# provenance keys that must agree between a checkpoint and the features it is applied to
_MATCHING_KEYS = ("backbone", "backbone_sha256", "feature_dim", "fps", "stride", "window")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or cannot be applied to the given features."""


@dataclass
class Checkpoint:
    """A detector with what it needs to be used: its class names and where its features came from."""

    config: DetectorConfig
    state_dict: dict[str, torch.Tensor]
    labels: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.labels) != self.config.num_classes:
            raise CheckpointError(f"checkpoint has {len(self.labels)} class names for a detector of {self.config.num_classes} classes")
        dim = self.provenance.get("feature_dim")
        if dim is not None and int(dim) != self.config.input_dim:
            raise CheckpointError(f"provenance says {dim}-dim features but the detector takes {self.config.input_dim}")

    @property
    def label_map(self) -> LabelMap:
        return LabelMap.from_names(self.labels)

    @classmethod
    def from_model(
        cls, model: Detector, labels: Sequence[str], provenance: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None
    ) -> Checkpoint:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return cls(model.config, state, list(labels), dict(provenance or {}), dict(metadata or {}))

    def build(self, device: torch.device | str = "cpu") -> Detector:
        """The detector with these weights, in eval mode."""
        model = build_detector(self.config)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint weights do not fit its own config ({self.config.arch}): missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model.to(device).eval()

    def check_features(self, feature_dim: int, provenance: Mapping[str, Any] | None = None) -> None:
        """Refuse features the model was not trained on: another width, backbone or sampling."""
        if int(feature_dim) != self.config.input_dim:
            trained = self.provenance.get("backbone", "unknown backbone")
            raise CheckpointError(
                f"the checkpoint expects {self.config.input_dim}-dim features ({trained}), got {feature_dim}-dim ones: "
                "extract features with the checkpoint's backbone, or train a model on these features"
            )
        if provenance:
            diffs = [
                f"{k}: checkpoint {self.provenance[k]!r} vs features {provenance[k]!r}"
                for k in _MATCHING_KEYS
                if k in self.provenance and k in provenance and _differ(self.provenance[k], provenance[k])
            ]
            if diffs:
                raise CheckpointError("the features were computed differently from the checkpoint's training features: " + "; ".join(diffs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "family": self.config.family,
            "config": config_to_dict(self.config),
            "state_dict": self.state_dict,
            "labels": list(self.labels),
            "provenance": dict(self.provenance),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "checkpoint") -> Checkpoint:
        if not isinstance(data, Mapping) or data.get("format") != CHECKPOINT_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise CheckpointError(f"{source}: not a {CHECKPOINT_FORMAT} checkpoint (format: {found!r})")
        missing = [k for k in ("config", "state_dict", "labels") if k not in data]
        if missing:
            raise CheckpointError(f"{source}: checkpoint lacks {missing}")
        try:
            config = config_from_dict(config_type(data.get("family", "one_stage")), data["config"], where=f"{source}: config")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        return cls(config, dict(data["state_dict"]), list(data["labels"]), dict(data.get("provenance", {})), dict(data.get("metadata", {})))


def _differ(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b)) > 1e-9 * max(1.0, abs(float(a)))
    return str(a) != str(b)


def save_checkpoint(checkpoint: Checkpoint, f: str | os.PathLike | IO[bytes]) -> None:
    """Write ``checkpoint`` to a path or a binary file object. (Atomic writing is the caller's:
    ``pipelines.atomic.write_atomic`` takes the bytes of ``checkpoint_bytes``.)"""
    torch.save(checkpoint.to_dict(), f)


def checkpoint_bytes(checkpoint: Checkpoint) -> bytes:
    buf = io.BytesIO()
    save_checkpoint(checkpoint, buf)
    return buf.getvalue()


def load_checkpoint(f: str | os.PathLike | IO[bytes], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint with ``torch.load(weights_only=True)``; a clear ``CheckpointError`` if it is not one."""
    source = str(f) if isinstance(f, str | os.PathLike) else getattr(f, "name", "checkpoint")
    try:
        data = torch.load(f, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise CheckpointError(f"{source}: cannot read as a checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    return Checkpoint.from_dict(data, source=source)
