"""The online event rule: per-step class scores -> action instances as ``start``, ``update``, ``end`` events.

Legend: K classes, t the step being pushed, p_t [K] its class probabilities, e_t the predicted steps
elapsed since the start of the action in progress (``tal_models.detectors.online``).

An offline detector looks back over the whole video and suppresses duplicates with NMS; an online
one must commit as it goes. The rule is a hysteresis per class, deciding on step ``t`` alone::

    idle   --p_t[k] >= start_threshold-->  active   (event "start", at step t)
    active --p_t[k] >= end_threshold-->    active   (every ``update_every`` steps: event "update")
    active --p_t[k] <  end_threshold for ``patience`` steps in a row--> idle  (event "end")

The instance's segment, in fractional steps (step ``i`` is the centre of clip ``i``, so the steps
``a .. b`` span ``[a - 0.5, b + 0.5]``):

- end: just after the last step at or above ``end_threshold`` (``last + 0.5``);
- start: the mean over the instance's active steps of ``t - e_t`` (each step's own estimate of
  when the action began: the regression head), no later than ``first - 0.5`` and no earlier than
  the end of the previous instance of the class (nor the stream's beginning);
- score: the mean of ``p_t[k]`` over the active steps.

``start`` and ``update`` events carry the current estimates (``end`` None); ``end`` carries the final
segment. No instance is ever revised after its end, nothing looks back beyond the instance being
built, and the work per step is O(K). ``close()`` ends every open instance (the stream ended).
Events carry times in seconds through the stream's ``FeatureTiming``: an event's ``time`` is the
centre of the step that caused it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from tal_models.timing import STEP_TIMING, FeatureTiming

EventKind = Literal["start", "update", "end"]
EVENT_KINDS = ("start", "update", "end")


@dataclass(frozen=True)
class Event:
    """One event of an online stream (module docstring); times in seconds."""

    kind: EventKind
    instance: int  # unique in its stream: an instance's start, updates and end share it
    label: int  # class column 0..K-1
    start: float  # the estimated start of the instance
    end: float | None  # None until kind == "end"
    score: float  # in [0, 1]
    time: float  # the centre of the step that caused the event
    step: int  # that step's index

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"Event.kind must be one of {EVENT_KINDS}, got {self.kind!r}")
        if (self.end is None) != (self.kind != "end"):
            raise ValueError(f"Event.end is given exactly for kind 'end' (got kind {self.kind!r}, end {self.end!r})")

    def to_dict(self, labels: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready; ``label_name`` added when ``labels`` (the class names, by column) are given."""
        out = asdict(self)
        if labels is not None:
            out["label_name"] = labels[self.label]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        try:
            return cls(
                kind=data["kind"], instance=int(data["instance"]), label=int(data["label"]), start=float(data["start"]),
                end=None if data.get("end") is None else float(data["end"]), score=float(data["score"]),
                time=float(data["time"]), step=int(data["step"]),
            )  # fmt: skip
        except KeyError as exc:
            raise ValueError(f"an event needs the field {exc.args[0]!r}; got {sorted(data)}") from None


@dataclass(frozen=True)
class EventRuleConfig:
    """The hysteresis of ``EventRule`` (module docstring)."""

    start_threshold: float = 0.5
    end_threshold: float = 0.3
    patience: int = 2  # steps below end_threshold that end an instance
    update_every: int = 8  # steps between two update events of an instance (0: none)

    def __post_init__(self) -> None:
        for name in ("start_threshold", "end_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 < value < 1.0):
                raise ValueError(f"EventRuleConfig.{name} must be in (0, 1), got {value!r}")
        if self.end_threshold > self.start_threshold:
            raise ValueError(
                f"EventRuleConfig.end_threshold ({self.end_threshold}) must not exceed start_threshold ({self.start_threshold})"
            )
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"EventRuleConfig.patience must be an int >= 1 (steps), got {self.patience!r}")
        if not isinstance(self.update_every, int) or self.update_every < 0:
            raise ValueError(f"EventRuleConfig.update_every must be an int >= 0 (0: no updates), got {self.update_every!r}")


class EventRule:
    """The rule of one stream over ``num_classes`` classes: ``update(step, probs [K], elapsed)`` -> the
    events of that step; ``close()`` -> the end events of the open instances. Steps must come in order."""

    def __init__(self, num_classes: int, config: EventRuleConfig | None = None, timing: FeatureTiming | None = None):
        self.config = config or EventRuleConfig()
        self.timing = timing or STEP_TIMING
        K = num_classes
        self.num_classes = K
        self.active = np.zeros(K, dtype=bool)
        self.instance = np.full(K, -1, dtype=np.int64)
        self.first = np.zeros(K, dtype=np.int64)  # first active step
        self.last = np.zeros(K, dtype=np.int64)  # last step at or above end_threshold
        self.below = np.zeros(K, dtype=np.int64)  # steps in a row below end_threshold
        self.score_sum = np.zeros(K, dtype=np.float64)
        self.start_sum = np.zeros(K, dtype=np.float64)  # sum of t - e_t over the active steps
        self.count = np.zeros(K, dtype=np.int64)
        self.last_update = np.zeros(K, dtype=np.int64)
        self.floor = np.full(K, -0.5)  # an instance starts no earlier: the previous one's end, or the stream's start
        self.next_instance = 0
        self.step = -1

    def _seconds(self, steps: float) -> float:
        return float(self.timing.step_to_seconds(np.float64(steps)))

    def _start(self, k: int) -> float:
        """The current start estimate of class ``k``'s open instance, in steps."""
        estimate = self.start_sum[k] / self.count[k]
        return float(min(max(estimate, self.floor[k]), self.first[k] - 0.5))

    def _event(self, kind: EventKind, k: int, step: int) -> Event:
        end = self._seconds(self.last[k] + 0.5) if kind == "end" else None
        score = float(self.score_sum[k] / self.count[k])
        return Event(kind, int(self.instance[k]), int(k), self._seconds(self._start(k)), end, score, self._seconds(step), step)

    def update(self, step: int, probs: np.ndarray, elapsed: float) -> list[Event]:
        """The events of step ``step`` (the next one: steps come in order, from 0)."""
        if step != self.step + 1:
            raise ValueError(f"EventRule: step {step} after step {self.step}; steps must come in order, one at a time")
        self.step = step
        cfg = self.config
        probs = np.asarray(probs, dtype=np.float64)
        events: list[Event] = []
        estimate = step - max(float(elapsed), 0.0)
        on = probs >= cfg.end_threshold
        # ends, updates, starts: a class that ends on a step is below end_threshold there, so it cannot restart on it
        for k in np.flatnonzero(self.active & ~on):
            self.below[k] += 1
            if self.below[k] >= cfg.patience:
                events.append(self._event("end", k, step))
                self.active[k] = False
                self.floor[k] = self.last[k] + 0.5
        for k in np.flatnonzero(self.active & on):
            self.below[k] = 0
            self.last[k] = step
            self.score_sum[k] += probs[k]
            self.start_sum[k] += estimate
            self.count[k] += 1
            if cfg.update_every and step - self.last_update[k] >= cfg.update_every:
                self.last_update[k] = step
                events.append(self._event("update", k, step))
        for k in np.flatnonzero(~self.active & (probs >= cfg.start_threshold)):
            self.active[k] = True
            self.instance[k] = self.next_instance
            self.next_instance += 1
            self.first[k] = self.last[k] = self.last_update[k] = step
            self.below[k] = 0
            self.score_sum[k], self.start_sum[k], self.count[k] = probs[k], estimate, 1
            events.append(self._event("start", k, step))
        return events

    def close(self) -> list[Event]:
        """End every open instance (the stream is over); the rule takes no further step."""
        events = [self._event("end", int(k), max(self.step, 0)) for k in np.flatnonzero(self.active)]
        for k in np.flatnonzero(self.active):
            self.floor[k] = self.last[k] + 0.5
        self.active[:] = False
        self.step = math.inf  # any further update is out of order
        return events
