"""Where a model's class-name embeddings come from: the stored form of a text encoder.

Open-vocabulary detectors score steps against text embeddings of class names (or prompts).
``TextEncoderConfig`` names the encoder in a detector's config, so a checkpoint knows how to embed
a class it has never seen; ``pipelines.vlm.load_text_encoder`` turns it into an encoder (this
package does no I/O):

- ``open_clip``: the text tower of an ``open-clip-torch`` model ``model`` (e.g. ``ViT-B-32``),
  its weights from ``weights`` (a file path or an ``s3://`` URI; ``""``: the hub cache), each
  name put into ``prompt`` first (``"a video of a person {}."``);
- ``table``: a fixed ``.npz`` table of ``names [K]`` and ``embeddings [K, E]`` at ``weights``
  (precomputed embeddings, or the synthetic ones of the benchmarks); names are looked up as given;
- ``none``: the model has no text encoder (a closed-set detector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TEXT_ENCODER_KINDS = ("none", "open_clip", "table")


@dataclass(frozen=True)
class TextEncoderConfig:
    kind: Literal["none", "open_clip", "table"] = "none"
    model: str = ""  # open_clip: the architecture, e.g. "ViT-B-32"
    weights: str = ""  # open_clip: checkpoint path or s3:// URI ("" = the hub cache); table: the .npz path or s3:// URI
    prompt: str = "{}"  # open_clip: the template each class name fills, e.g. "a video of a person {}."

    def __post_init__(self) -> None:
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"TextEncoderConfig.kind must be one of {TEXT_ENCODER_KINDS}, got {self.kind!r}")
        if self.kind == "open_clip" and not self.model:
            raise ValueError("TextEncoderConfig.model must name an open_clip architecture (e.g. 'ViT-B-32') when kind is 'open_clip'")
        if self.kind == "table" and not self.weights:
            raise ValueError("TextEncoderConfig.weights must be the .npz table (a path or s3:// URI) when kind is 'table'")
        if "{}" not in self.prompt:
            raise ValueError(f"TextEncoderConfig.prompt must contain '{{}}' where the class name goes, got {self.prompt!r}")

    def prompts(self, names: list[str] | tuple[str, ...]) -> list[str]:
        """The texts the encoder embeds for ``names`` (a table looks names up as given)."""
        return list(names) if self.kind == "table" else [self.prompt.replace("{}", n) for n in names]


def is_open_vocabulary(config) -> bool:
    """Whether a detector config names its classes at inference: a text-headed one-stage model or a zero-shot one."""
    head = getattr(config, "head", None)
    return getattr(config, "family", "") == "zero_shot" or getattr(head, "classifier", "linear") == "text"
