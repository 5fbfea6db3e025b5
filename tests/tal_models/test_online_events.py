"""The online event rule: hysteresis per class, start estimates from the elapsed-time head, events' order and fields."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tal_models.online.events import Event, EventRule, EventRuleConfig
from tal_models.timing import FeatureTiming


def run(probs: np.ndarray, elapsed: np.ndarray, config: EventRuleConfig, timing=None) -> list[Event]:
    rule = EventRule(probs.shape[1], config, timing)
    events = []
    for t in range(len(probs)):
        events += rule.update(t, probs[t], float(elapsed[t]))
    return events + rule.close()


def test_one_instance_start_updates_end():
    p = np.full((14, 1), 0.1)
    p[3:9, 0] = [0.6, 0.7, 0.4, 0.35, 0.8, 0.5]  # above start at 3, stays >= end_threshold to step 8
    elapsed = np.maximum(np.arange(14) - 2.0, 0.0)  # every step says the action began at step 2
    events = run(p, elapsed, EventRuleConfig(start_threshold=0.5, end_threshold=0.3, patience=2, update_every=2))
    assert [e.kind for e in events] == ["start", "update", "update", "end"]
    assert {e.instance for e in events} == {0}
    start, end = events[0], events[-1]
    assert start.step == 3 and start.time == 3.0 and start.end is None and start.score == pytest.approx(0.6)
    assert start.start == pytest.approx(2.0)  # the regressed start, before the first active step
    assert [e.step for e in events[1:3]] == [5, 7]  # every 2 steps after the start while active
    assert events[1].end is None and events[1].score == pytest.approx(np.mean([0.6, 0.7, 0.4]))
    assert end.step == 10  # steps 9 and 10 below 0.3: patience 2
    assert end.end == pytest.approx(8.5)  # just after the last step >= end_threshold
    assert end.start == pytest.approx(2.0)
    assert end.score == pytest.approx(np.mean([0.6, 0.7, 0.4, 0.35, 0.8, 0.5]))


def test_start_never_later_than_first_step_nor_before_previous_end():
    p = np.full((20, 1), 0.0)
    p[2:5, 0] = 0.9
    p[8:12, 0] = 0.9
    elapsed = np.full(20, 50.0)  # a head claiming every action began long ago
    events = run(p, elapsed, EventRuleConfig(patience=1, update_every=0))
    ends = [e for e in events if e.kind == "end"]
    assert [(e.start, e.end) for e in ends] == [(-0.5, 4.5), (4.5, 11.5)]  # floored at the stream start, then the previous end
    elapsed[:] = 0.0  # a head claiming every action begins now: the start is still no later than the first active step
    ends = [e for e in run(p, elapsed, EventRuleConfig(patience=1, update_every=0)) if e.kind == "end"]
    assert [(e.start, e.end) for e in ends] == [(1.5, 4.5), (7.5, 11.5)]


def test_classes_are_independent_and_instances_numbered_in_order():
    p = np.zeros((10, 3))
    p[1:6, 0] = 0.9
    p[3:8, 2] = 0.9
    events = run(p, np.zeros(10), EventRuleConfig(patience=1, update_every=0))
    assert [(e.kind, e.label, e.instance, e.step) for e in events] == [
        ("start", 0, 0, 1), ("start", 2, 1, 3), ("end", 0, 0, 6), ("end", 2, 1, 8),
    ]  # fmt: skip


def test_hysteresis_needs_start_threshold_to_begin():
    p = np.full((8, 1), 0.45)  # above end_threshold, never above start_threshold: nothing starts
    assert run(p, np.zeros(8), EventRuleConfig()) == []


def test_close_ends_open_instances_and_stops_the_rule():
    rule = EventRule(2, EventRuleConfig(update_every=0))
    assert [e.kind for e in rule.update(0, np.array([0.9, 0.9]), 0.0)] == ["start", "start"]
    rule.update(1, np.array([0.9, 0.1]), 0.0)
    closed = rule.close()
    assert sorted((e.label, e.end) for e in closed) == [(0, 1.5), (1, 0.5)]
    assert all(e.kind == "end" for e in closed)
    with pytest.raises(ValueError, match="in order"):
        rule.update(2, np.array([0.9, 0.9]), 0.0)


def test_steps_must_come_in_order():
    rule = EventRule(1)
    rule.update(0, np.array([0.1]), 0.0)
    with pytest.raises(ValueError, match="step 2 after step 0"):
        rule.update(2, np.array([0.1]), 0.0)


def test_times_are_seconds_of_the_stream_timing():
    timing = FeatureTiming(fps=30, stride=4, window=16)  # step i centred at (4 i + 8) / 30 s
    p = np.zeros((6, 1))
    p[2:4, 0] = 0.9
    events = run(p, np.zeros(6), EventRuleConfig(patience=1, update_every=0), timing)
    start, end = events
    assert start.time == pytest.approx(16 / 30) and end.time == pytest.approx(24 / 30)
    assert start.start == pytest.approx(timing.step_to_seconds(1.5)) and end.end == pytest.approx(timing.step_to_seconds(3.5))


def test_event_dict_round_trip_and_checks():
    e = Event("end", 3, 1, 1.5, 4.0, 0.75, 4.2, 17)
    d = e.to_dict(["a", "b"])
    assert d["label_name"] == "b"
    assert Event.from_dict(json.loads(json.dumps(d))) == e
    with pytest.raises(ValueError, match="end is given exactly"):
        Event("start", 0, 0, 1.0, 2.0, 0.5, 1.0, 1)
    with pytest.raises(ValueError, match="kind"):
        Event("stop", 0, 0, 1.0, None, 0.5, 1.0, 1)
    with pytest.raises(ValueError, match="'step'"):
        Event.from_dict({k: v for k, v in d.items() if k != "step"})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start_threshold": 1.0}, "start_threshold"),
        ({"end_threshold": 0.0}, "end_threshold"),
        ({"start_threshold": 0.3, "end_threshold": 0.5}, "must not exceed"),
        ({"patience": 0}, "patience"),
        ({"update_every": -1}, "update_every"),
    ],
)
def test_rule_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EventRuleConfig(**kwargs)
