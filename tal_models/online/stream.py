"""``OnlineStream``: one live sequence through an online detector, one feature step at a time.

Legend: C input channels, K classes, n steps of one push.

``push(features [n, C] | [C])`` runs, for each step, the causal pyramid's incremental state (O(1)
work per step: ``tal_models.online.encoder``), the pointwise heads and the event rule
(``tal_models.online.events``), and returns the events those steps caused. A bad push (wrong
width, NaN or infinite values) raises ``ValueError`` before anything is consumed, so the stream
stays usable. ``close()`` ends the open instances. The stream's outputs equal the offline
``OnlineDetector.stream_events`` on the same steps (to float rounding: the incremental state and the
whole-sequence forward sum in different orders, 1e-5 apart, which can only matter when a score
sits on a threshold).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tal_models.detectors.online import class_probabilities
from tal_models.online.events import Event, EventRule, EventRuleConfig
from tal_models.timing import STEP_TIMING, FeatureTiming


class OnlineStream:
    """One stream over ``model`` (an ``OnlineDetector`` in eval mode; shared, not copied: a model serves many streams)."""

    def __init__(self, model, timing: FeatureTiming | None = None, rule: EventRuleConfig | None = None, keep_scores: bool = True):
        if model.training:
            raise ValueError("OnlineStream: put the model in eval mode first (model.eval()): dropout would make the stream random")
        self.model = model
        self.timing = timing or STEP_TIMING
        self.num_classes = model.config.num_classes
        self.input_dim = model.config.input_dim
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.state = model.encoder.init_state(1, device=self.device, dtype=self.dtype)
        self.rule = EventRule(self.num_classes, rule or model.config.inference.rule, self.timing)
        self.steps = 0
        self.closed = False
        self.keep_scores = keep_scores
        self._scores: list[np.ndarray] = []

    def _checked(self, features: Tensor | np.ndarray) -> Tensor:
        x = features.detach().to(torch.float32) if isinstance(features, Tensor) else torch.as_tensor(np.asarray(features, dtype=np.float32))
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"features must be [n, {self.input_dim}] or [{self.input_dim}], got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or infinite values")
        return x

    @torch.no_grad()
    def push(self, features: Tensor | np.ndarray) -> list[Event]:
        """Consume ``features [n, C]`` (or one step ``[C]``) -> the events they caused, in order."""
        if self.closed:
            raise ValueError("OnlineStream: the stream is closed")
        x = self._checked(features).to(self.device, self.dtype)
        events: list[Event] = []
        for row in x:
            fused = self.model.encoder.step(row[None], self.state)  # [1, D]
            logits, log_elapsed = self.model.heads(fused)
            probs = class_probabilities(logits[0]).cpu().numpy()
            elapsed = float(torch.expm1(log_elapsed[0].float().clamp(min=0)))
            events += self.rule.update(self.steps, probs, elapsed)
            if self.keep_scores:
                self._scores.append(probs)
            self.steps += 1
        return events

    def scores(self, since: int = 0) -> np.ndarray:
        """``[steps - since, K]`` float32: the class probabilities of steps ``since ..`` so far (``keep_scores=True``);
        the cost is that of the rows returned."""
        if not self.keep_scores:
            raise ValueError("OnlineStream: scores were not kept (keep_scores=False)")
        rows = self._scores[since:]
        return np.stack(rows) if rows else np.zeros((0, self.num_classes), np.float32)

    def close(self) -> list[Event]:
        """End every open instance; the stream takes no further step."""
        if self.closed:
            return []
        self.closed = True
        return self.rule.close()

    def time_of(self, step: int) -> float:
        """The centre of step ``step``, in seconds."""
        return float(self.timing.step_to_seconds(np.float64(step)))
