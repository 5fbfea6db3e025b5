"""Open-vocabulary classification: the one-stage detector scores steps against class-name embeddings.

Legend: B batch, T_l steps at pyramid level l, E text-embedding width (``HeadConfig.text_dim``),
K classes the model was trained on, K' classes of a request (any number, unseen ones included).

``TextClassificationHead`` replaces the linear classifier of ``tal_models.heads``: the same tower
(masked convolutions, shared over the levels) ends in ``E`` channels instead of ``K``, and each
step's embedding is compared with each class's text embedding by cosine, CLIP-style::

    logits[b, k, t] = exp(log_scale) * cos(step[b, :, t], class[k]) + bias

``log_scale`` starts at ``log(1 / 0.07)`` and is clamped to ``log(100)`` (CLIP's temperature and
cap); ``bias`` starts at the focal prior ``-log((1 - p) / p)``, so, as with the linear head, every
point begins as background (the cosine of an untrained step is near 0) and the sigmoid focal loss
is not swamped by easy negatives in the first iterations.

The training classes' embeddings are the buffer ``class_embeddings [K, E]`` (part of the state dict,
so a checkpoint carries them), set once before training with ``set_class_embeddings``. At
inference any other set ``[K', E]`` may be passed to ``forward``; it is used for that call only
(the buffer is not touched), so concurrent requests with different class sets never interfere.
Class-name embeddings arrive as tensors: ``pipelines.vlm`` turns a ``TextEncoderConfig`` into them.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.config import require_positive_int
from tal_models.heads import HeadConfig, make_tower, tower_levels
from tal_models.text import TextEncoderConfig

if TYPE_CHECKING:
    from tal_models.detectors.one_stage import OneStageConfig

CLIP_INIT_TEMPERATURE = 0.07
CLIP_MAX_LOGIT_SCALE = 100.0


def normalized_class_embeddings(embeddings: Tensor | object, text_dim: int, who: str = "class_embeddings") -> Tensor:
    """Class-name embeddings ``[K, E]`` (any float tensor or array) -> float32, L2-normalised rows, or a
    ``ValueError`` naming what is wrong (shape, width other than ``text_dim``, no class, a zero or non-finite row)."""
    e = torch.as_tensor(embeddings).detach()
    if e.ndim != 2 or e.shape[1] != text_dim:
        raise ValueError(f"{who} must be [K, text_dim={text_dim}] (HeadConfig.text_dim), got {tuple(e.shape)}")
    if e.shape[0] == 0:
        raise ValueError(f"{who} must hold at least one class")
    e = e.to(torch.float32)
    norms = e.norm(dim=1, keepdim=True)
    if not bool(torch.isfinite(e).all()) or bool((norms == 0).any()):
        raise ValueError(f"{who} must be finite and non-zero in every row")
    return e / norms


class TextClassificationHead(nn.Module):
    """Per-level features -> class logits by cosine against class-name embeddings (module docstring):
    ``levels`` x ``[B, in_dim, T_l]`` -> ``levels`` x ``[B, K', T_l]`` (zero logits at invalid steps).

    Args:
        config: the head's tower (``in_dim``, ``feat_dim``, ``num_layers``, ...), ``text_dim`` (E)
            and ``prior_prob`` (the initial bias).
        num_classes: K, the rows of the ``class_embeddings`` buffer (the training classes).
    """

    def __init__(self, config: HeadConfig, num_classes: int):
        super().__init__()
        require_positive_int(num_classes, "num_classes")
        self.text_dim = config.text_dim
        self.tower = make_tower(config, config.text_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / CLIP_INIT_TEMPERATURE)))
        self.bias = nn.Parameter(torch.tensor(-math.log((1.0 - config.prior_prob) / config.prior_prob)))
        # zeros until set: every cosine is 0 and every logit the prior (set_class_embeddings before training)
        self.register_buffer("class_embeddings", torch.zeros(num_classes, config.text_dim))

    @torch.no_grad()
    def set_class_embeddings(self, embeddings: Tensor) -> None:
        """The training classes' text embeddings ``[K, text_dim]`` (stored L2-normalised, on the buffer's device)."""
        e = normalized_class_embeddings(embeddings, self.text_dim)
        k = self.class_embeddings.shape[0]
        if e.shape[0] != k:
            raise ValueError(f"class_embeddings must have one row per training class ({k}), got {e.shape[0]}")
        self.class_embeddings.copy_(e)

    def forward(self, feats: list[Tensor], masks: list[Tensor], class_embeddings: Tensor | None = None) -> list[Tensor]:
        """``class_embeddings [K', E]``: score these classes for this call (the buffer is left as it is);
        ``None``: the training classes (the buffer)."""
        if class_embeddings is None:
            classes = self.class_embeddings.float()  # [K, E], normalised on set
        else:
            classes = normalized_class_embeddings(class_embeddings, self.text_dim).to(feats[0].device)  # [K', E]
        scale = self.log_scale.float().clamp(max=math.log(CLIP_MAX_LOGIT_SCALE)).exp()
        out = []
        for x, m in zip(tower_levels(self.tower, feats, masks), masks):
            # cosine in float32 under autocast; invalid steps are zero vectors, normalised to zero (eps)
            steps = F.normalize(x.float(), dim=1, eps=1e-6)  # [B, E, T_l]
            cos = torch.einsum("ke,bet->bkt", classes, steps)  # [B, K', T_l]
            out.append((scale * cos + self.bias.float()).masked_fill(~m, 0.0))
        return out


def open_vocab_config(base: OneStageConfig, *, text: TextEncoderConfig, text_dim: int) -> OneStageConfig:
    """``base`` (any one-stage detection config, e.g. a preset's) with the text classifier: its head ends in
    ``text_dim`` channels scored against the class-name embeddings of ``text`` (``text.kind`` not ``none``)."""
    return replace(base, head=replace(base.head, classifier="text", text_dim=text_dim), text=text)
