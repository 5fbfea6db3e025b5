"""The ``/v1/stream`` protocol without Ray or sockets: a ``StreamSession`` over an in-memory transport and a small
deterministic stand-in for ``OnlineStream`` (the real model is tested over real WebSockets in test_serve_stream.py)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import pytest

from jobs.stream_api import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    Disconnected,
    StreamError,
    StreamLimits,
    StreamModel,
    StreamSessions,
    check_features,
    check_timestamps,
    model_names,
    resolve_timing,
    to_json,
)
from tal_models.timing import FeatureTiming

C, LABELS = 3, ["jump", "run"]
TIMING = FeatureTiming(4.0, 2, 2)


@dataclass(frozen=True)
class FakeEvent:
    kind: str
    instance: int
    label: int
    start: float
    end: float | None
    score: float
    time: float
    step: int

    def to_dict(self, labels=None) -> dict:  # NumPy integers, as a rule computing with arrays may leave them
        out = {**asdict(self), "instance": np.int64(self.instance), "step": np.int64(self.step)}
        return out | ({"label_name": labels[self.label]} if labels else {})


class FakeStream:
    """Class 0 is in progress while channel 0 > threshold; instances start, update every 2 steps, end."""

    def __init__(self, timing: FeatureTiming | None, threshold: float = 0.0):
        self.timing, self.threshold = timing or FeatureTiming(1.0, 1, 1, -0.5), threshold
        self.steps, self.open, self.instances, self.rows, self.closed = 0, None, 0, [], False

    def time_of(self, step: int) -> float:
        return float(self.timing.centers(step + 1)[step])

    def push(self, features) -> list[FakeEvent]:
        x = np.asarray(features, np.float32).reshape(-1, C)
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or infinity")
        events = []
        for row in x:
            step, t, active = self.steps, self.time_of(self.steps), bool(row[0] > self.threshold)
            self.rows.append([1.0 / (1.0 + np.exp(-row[0])), 0.5])
            if active and self.open is None:
                self.open = (self.instances, t)
                self.instances += 1
                events.append(FakeEvent("start", self.open[0], 0, t, None, 0.9, t, step))
            elif active and (step - int(self.open[1])) % 2 == 0:
                events.append(FakeEvent("update", self.open[0], 0, self.open[1], None, 0.9, t, step))
            elif not active and self.open is not None:
                events.append(FakeEvent("end", self.open[0], 0, self.open[1], t, 0.9, t, step))
                self.open = None
            self.steps += 1
        return events

    def scores(self, since: int = 0) -> np.ndarray:
        return np.asarray(self.rows[since:], np.float32).reshape(-1, 2)

    def close(self) -> list[FakeEvent]:
        self.closed = True
        if self.open is None or self.steps == 0:
            return []
        t = self.time_of(self.steps - 1)
        event = FakeEvent("end", self.open[0], 0, self.open[1], t, 0.9, t, self.steps - 1)
        self.open = None
        return [event]


def offline_events(features: np.ndarray, timing=TIMING, threshold: float = 0.0) -> list[dict]:
    stream = FakeStream(timing, threshold)
    return [e.to_dict(LABELS) for e in stream.push(features) + stream.close()]


class MemoryTransport:
    """Client messages queued in; what the server sends collected; ``DISCONNECT`` in the queue = the client went."""

    DISCONNECT = object()

    def __init__(self, *messages):
        self.inbox: asyncio.Queue = asyncio.Queue()
        for m in messages:
            self.put(m)
        self.sent: list[dict] = []
        self.closed: tuple[int, str] | None = None

    def put(self, message) -> None:
        self.inbox.put_nowait(message if isinstance(message, str | bytes) or message is self.DISCONNECT else json.dumps(message))

    async def receive(self):
        item = await self.inbox.get()
        if item is self.DISCONNECT:
            raise Disconnected()
        return item

    async def send(self, message: dict) -> None:
        self.sent.append(json.loads(to_json(message)))  # what goes on the wire: JSON

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.sent if m["type"] == kind]


def make_model(**changes) -> StreamModel:
    async def run(fn, *args):
        return fn(*args)

    def new_stream(timing, rule, keep_scores):
        return FakeStream(timing, **rule)

    summary = {"reference": "models:/tal-online@champion", "pinned": "models:/tal-online/3", "name": "tal-online", "version": 3}
    fields = dict(
        labels=LABELS,
        input_dim=C,
        summary=summary,
        names=model_names(summary),
        timing=TIMING,
        new_stream=new_stream,
        run=run,
        rule_overrides=["threshold"],
    )
    return StreamModel(**(fields | changes))


def serve(transport: MemoryTransport, limits: StreamLimits | None = None, model: StreamModel | None = None) -> str:
    return asyncio.run(StreamSessions(limits or StreamLimits()).serve(model or make_model(), transport))


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def wave(steps: int = 12, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((steps, C)).astype(np.float32)
    x[:, 0] = np.sin(np.arange(steps) / 1.5) + 0.1  # a few instances, the last one still open at the end
    return x


def events_of(transport: MemoryTransport) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in ("type", "timestamp")} for m in transport.of("event")]


# --- a whole session ---------------------------------------------------------------------------------


def test_a_session_streams_the_offline_events_and_closes_cleanly():
    x = wave()
    t = MemoryTransport({"type": "open", "model": "tal-online/3"}, {"type": "features", "features": x[:5].tolist()})
    t.put(npy(x[5:11]))
    t.put(npy(x[11]))  # one step [C]
    t.put({"type": "close"})
    assert serve(t) == "closed"
    (opened,) = t.of("opened")
    assert opened["labels"] == LABELS and opened["input_dim"] == C and opened["timing"]["fps"] == 4.0
    assert opened["limits"]["max_sessions"] == 16 and opened["rule_overrides"] == ["threshold"] and opened["input"] == "features"
    assert events_of(t) == offline_events(x) and len(events_of(t)) >= 4
    assert t.sent[-1] == {"type": "closed", "session": opened["session"], "steps": 12, "events": len(events_of(t)), "reason": "closed"}
    assert t.closed == (CLOSE_NORMAL, "closed")
    assert not t.of("scores") and not t.of("error")


def test_scores_come_per_step_before_that_steps_events_with_the_clients_timestamps():
    x = wave(6)
    x[-1, 0] = 1.0  # an instance open at the end: close() ends it
    stamps = [100.0 + i for i in range(6)]
    t = MemoryTransport({"type": "open", "options": {"scores": True}}, {"type": "features", "features": x.tolist(), "timestamps": stamps})
    t.put({"type": "close"})
    serve(t)
    scores = t.of("scores")
    assert [s["step"] for s in scores] == list(range(6)) and [s["timestamp"] for s in scores] == stamps
    assert [s["time"] for s in scores] == pytest.approx(TIMING.centers(6))
    assert np.allclose([s["scores"][0] for s in scores], 1 / (1 + np.exp(-x[:, 0])), atol=1e-6)
    pushed = [(i, m) for i, m in enumerate(t.sent) if m["type"] == "event" and "timestamp" in m]  # not close()'s
    assert len(pushed) >= 2 and len(pushed) == len(t.of("event")) - 1
    for i, m in pushed:
        before = [s for s in t.sent[:i] if s["type"] == "scores"]
        assert before[-1]["step"] == m["step"] and m["timestamp"] == stamps[m["step"]]


def test_every_bad_message_is_an_error_that_consumes_nothing():
    x = wave()
    nan = x[:2].copy()
    nan[1, 2] = np.nan
    bad = [
        ({"type": "features", "features": x[:1].tolist()}, "not_open"),
        (npy(x[:1]), "not_open"),
        ("{not json", "malformed_json"),
        ("[1, 2]", "invalid_message"),
        ({"type": "dance"}, "unknown_type"),
        ({"type": "open", "model": "someone-else"}, "model_mismatch"),
        ({"type": "open", "input": "audio"}, "invalid_options"),
        ({"type": "open", "options": {"rule": {"min_duration": 3}}}, "invalid_options"),
        ({"type": "open", "options": {"timing": {"fps": 30}}}, "timing_mismatch"),
        ({"type": "open", "input": "video"}, "video_unsupported"),
        ({"type": "open", "options": {"rule": {"threshold": 0.0}}}, None),  # the good open
        ({"type": "open"}, "already_open"),
        ({"type": "features", "features": x[:3].tolist(), "timestamps": [1.0, 2.0, 3.0]}, None),
        ({"type": "features", "features": [[0.0] * (C + 1)]}, "wrong_feature_dim"),
        (npy(np.zeros((2, C + 1), np.float32)), "wrong_feature_dim"),
        ({"type": "features", "features": nan.tolist()}, "non_finite_features"),
        (npy(nan), "non_finite_features"),
        ('{"type": "features", "features": [[1, 2, Infinity]]}', "non_finite_features"),
        ({"type": "features", "features": [[1, 2], [3, 4, 5]]}, "invalid_features"),
        ({"type": "features", "features": "lots"}, "invalid_features"),
        ({"type": "features", "features": []}, "empty_features"),
        ({"type": "features"}, "invalid_message"),
        ({"type": "features", "features": x[3:4].tolist(), "colour": 1}, "invalid_message"),
        ({"type": "features", "features": x[3:5].tolist(), "timestamps": [3.5, 3.0]}, "timestamps_out_of_order"),
        ({"type": "features", "features": x[3:5].tolist(), "timestamps": [3.0, 4.0]}, "timestamps_out_of_order"),  # not after 3.0
        ({"type": "features", "features": x[3:5].tolist(), "timestamps": [4.0]}, "invalid_timestamps"),
        ({"type": "features", "features": x[3:5].tolist(), "timestamps": [4.0, float("nan")]}, "invalid_timestamps"),
        (npy(x[3:5])[:-4], "malformed_npy"),
        (b"\x93NUMPY garbage", "malformed_npy"),
        (npy(np.array(["a", "b"])), "invalid_features"),
        (npy(np.zeros((400, C), np.float32)), "payload_too_large"),
        ("x" * 5000, "payload_too_large"),
        ({"type": "features", "features": x[3:].tolist(), "timestamps": [4.0 + i for i in range(9)]}, None),
        ({"type": "close"}, None),
    ]
    t = MemoryTransport(*[m for m, _ in bad])
    assert serve(t, StreamLimits(max_message_bytes=4096)) == "closed"
    errors = [m["code"] for m in t.of("error")]
    assert errors == [code for _, code in bad if code is not None]
    assert all(m["message"] for m in t.of("error"))
    assert events_of(t) == offline_events(x)  # the bad messages changed nothing
    assert t.sent[-1]["steps"] == len(x)


def test_a_rule_override_reaches_the_stream():
    x = wave()
    t = MemoryTransport({"type": "open", "options": {"rule": {"threshold": 0.5}}}, npy(x), {"type": "close"})
    serve(t)
    assert events_of(t) == offline_events(x, threshold=0.5) != offline_events(x)


def test_the_clients_timing_sets_the_seconds_and_an_offline_model_cannot_stream():
    x = wave()
    t = MemoryTransport({"type": "open", "options": {"timing": {"offset": 10.0}}}, npy(x), {"type": "close"})
    serve(t)
    assert events_of(t) == offline_events(x, FeatureTiming(4.0, 2, 2, 10.0))
    t = MemoryTransport({"type": "open"}, {"type": "close"})
    serve(t, model=make_model(unsupported="actionformer is an offline detector"))
    assert t.of("error")[0]["code"] == "streaming_unsupported" and t.sent[-1] == {**t.sent[-1], "type": "closed", "steps": 0}


def test_a_session_over_the_limit_is_refused_with_1013():
    async def two_sessions():
        sessions = StreamSessions(StreamLimits(max_sessions=1))
        first, second = MemoryTransport({"type": "open"}), MemoryTransport({"type": "open"})
        running = asyncio.create_task(sessions.serve(make_model(), first))
        await asyncio.sleep(0.01)
        refused = await sessions.serve(make_model(), second)
        first.put({"type": "close"})
        return refused, await running, first, second, len(sessions.active)

    refused, ended, first, second, active = asyncio.run(two_sessions())
    assert (refused, ended, active) == ("too_many_sessions", "closed", 0)
    assert second.sent == [{"type": "error", "code": "too_many_sessions", "message": second.sent[0]["message"]}]
    assert second.closed == (CLOSE_TRY_AGAIN, "too_many_sessions") and first.closed == (CLOSE_NORMAL, "closed")


def test_an_idle_session_gets_its_end_events_then_is_closed():
    x = wave(4)
    x[:, 0] = 1.0  # one instance, still open
    t = MemoryTransport({"type": "open"}, npy(x))
    assert serve(t, StreamLimits(idle_timeout_s=0.05)) == "idle_timeout"
    kinds = [(m["type"], m.get("kind") or m.get("code")) for m in t.sent]
    assert kinds[-3:] == [("event", "end"), ("error", "idle_timeout"), ("closed", None)]
    assert t.closed == (CLOSE_POLICY, "idle_timeout") and events_of(t) == offline_events(x)


def test_a_session_past_its_duration_is_closed_even_while_busy():
    async def chatty():
        t = MemoryTransport({"type": "open"})
        task = asyncio.create_task(StreamSessions(StreamLimits(idle_timeout_s=5.0, max_session_s=0.2)).serve(make_model(), t))
        while not task.done():
            t.put(npy(wave(1)))
            await asyncio.sleep(0.01)
        return await task, t

    why, t = asyncio.run(chatty())
    assert why == "session_expired" and t.closed == (CLOSE_POLICY, "session_expired") and t.of("error")[-1]["code"] == "session_expired"


def test_a_client_that_goes_away_ends_its_session():
    t = MemoryTransport({"type": "open"}, npy(wave(3)), MemoryTransport.DISCONNECT)
    assert serve(t) == "disconnected" and t.closed is None


# --- the pieces ----------------------------------------------------------------------------------------


def test_check_features_and_timestamps():
    assert check_features([1, 2, 3], 3, 10).shape == (1, 3)
    assert check_features(np.zeros((2, 3), np.float64), 3, 10).dtype == np.float32
    with pytest.raises(StreamError, match="at most 2"):
        check_features(np.zeros((3, 3)), 3, 2)
    with pytest.raises(StreamError, match="got shape"):
        check_features(np.zeros((2, 2, 3)), 3, 10)
    assert check_timestamps(None, 2, 5.0) is None
    assert check_timestamps([5.5, 6], 2, 5.0).tolist() == [5.5, 6.0]
    with pytest.raises(StreamError) as e:
        check_timestamps([5.0, 6.0], 2, 5.0)
    assert e.value.code == "timestamps_out_of_order"


def test_resolve_timing_and_model_names():
    assert resolve_timing(None, TIMING) == TIMING and resolve_timing(None, None) is None
    with pytest.raises(StreamError, match="give fps, stride and window"):
        from jobs.stream_api import TimingOptions

        resolve_timing(TimingOptions(fps=2.0), None)
    assert resolve_timing(TimingOptions(fps=2.0, stride=1, window=1), None) == FeatureTiming(2.0, 1, 1)
    names = model_names({"reference": "m.pt", "pinned": "/abs/m.pt"})
    assert names == {"m.pt", "/abs/m.pt"}
    assert "models:/tal-online@champion" in model_names({"reference": "x", "name": "tal-online", "version": 2, "alias": "champion"})


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_sessions"):
        StreamLimits(max_sessions=0)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        StreamLimits(idle_timeout_s=0)


def test_the_mpegts_check_follows_packets_across_chunks_and_refuses_a_broken_one():
    from jobs.stream_api import MpegTsChecker

    stream = b"".join(bytes([0x47, i]) + bytes(186) for i in range(5))  # 5 packets of 188 bytes
    checker = MpegTsChecker()
    for a, b in [(0, 100), (100, 188), (188, 500), (500, 940)]:  # split anywhere
        checker.check(stream[a:b])
    assert checker.fed == 940
    checker = MpegTsChecker()
    checker.check(stream[:300])
    with pytest.raises(StreamError) as e:
        checker.check(b"x" * 200)  # byte 76 of this chunk would start packet 2
    assert e.value.code == "malformed_video" and "376" in e.value.message
    checker.check(stream[300:])  # the refused chunk was not counted: the stream goes on
    with pytest.raises(StreamError, match="empty"):
        checker.check(b"")


class FakeVideo:
    """Each fed chunk of n bytes decodes, in another thread, into n // 10 steps of value n; b"bad" fails the stream."""

    def __init__(self, deliver):
        self.deliver, self.threads, self.closed = deliver, [], False

    def feed(self, data: bytes) -> None:
        import threading

        item = StreamError("malformed_video", "cannot decode") if data == b"bad" else np.full((len(data) // 10, C), len(data), np.float32)
        self.threads.append(threading.Thread(target=self.deliver, args=(item,)))
        self.threads[-1].start()
        self.threads[-1].join()

    def finish(self) -> None:
        self.deliver(np.full((1, C), -1.0, np.float32))  # what the end of a stream still gives
        self.deliver(None)

    def close(self) -> None:
        self.closed = True


def test_video_steps_are_pushed_as_they_come_and_close_waits_for_the_last():
    videos = []
    model = make_model(new_video=lambda deliver: videos.append(FakeVideo(deliver)) or videos[-1])
    t = MemoryTransport({"type": "open", "input": "video"}, b"x" * 30, b"y" * 20, {"type": "features", "features": [[1.0] * C]})
    t.put({"type": "close"})
    assert serve(t, model=model) == "closed"
    assert [m["code"] for m in t.of("error")] == ["wrong_input"]
    expected = np.concatenate([np.full((3, C), 30.0), np.full((2, C), 20.0), np.full((1, C), -1.0)]).astype(np.float32)
    assert events_of(t) == offline_events(expected) and t.sent[-1]["steps"] == 6
    t = MemoryTransport({"type": "open", "input": "video"}, b"x" * 30, b"bad", {"type": "close"})
    assert serve(t, model=model) == "closed"
    assert [m["code"] for m in t.of("error")] == ["malformed_video"] and t.sent[-1]["steps"] == 3
    deadline = time.monotonic() + 5
    while not all(v.closed for v in videos) and time.monotonic() < deadline:  # closed from a thread of its own
        time.sleep(0.01)
    assert all(v.closed for v in videos)  # the session let its video go


def test_stream_model_adapts_an_online_detector_and_refuses_an_offline_one():
    import concurrent.futures

    import torch

    from jobs.serve_api import ModelInfo
    from jobs.stream_api import stream_model
    from tal_models.detectors import build_detector, online_config

    torch.manual_seed(0)
    model = build_detector(online_config(num_classes=2, input_dim=C, embed_dim=16, levels=2, max_seq_len=16, window=3, heads=2)).eval()
    info = ModelInfo("m.pt", "/abs/m.pt", LABELS, "online", C, {"fps": 4.0, "stride": 2, "window": 2})
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        adapted = stream_model(model, info, executor)
        assert adapted.rule_overrides == ["end_threshold", "start_threshold"] and adapted.timing == TIMING
        x = np.random.default_rng(0).standard_normal((20, C)).astype(np.float32)
        rule = {"start_threshold": 0.5, "end_threshold": 0.45}
        bad = {"start_threshold": 0.2, "end_threshold": 0.3}  # end above start: the rule's own check
        t = MemoryTransport(
            {"type": "open", "options": {"rule": bad}}, {"type": "open", "options": {"rule": rule}}, npy(x), {"type": "close"}
        )
        assert serve(t, model=adapted) == "closed"
        from tal_models.online.events import EventRuleConfig

        expected = [e.to_dict(LABELS) for e in model.stream_events(x, TIMING, EventRuleConfig(**rule))]
        assert [m["code"] for m in t.of("error")] == ["invalid_options"] and len(events_of(t)) == len(expected)
        for got, want in zip(events_of(t), expected):
            assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-5) for k in got if k != "kind")
        t = MemoryTransport({"type": "open"}, {"type": "close"})
        offline = stream_model(torch.nn.Linear(2, 2), ModelInfo("x", "x", LABELS, "actionformer", C, {}), executor)
        serve(t, model=offline)
        assert t.of("error")[0]["code"] == "streaming_unsupported" and "actionformer" in t.of("error")[0]["message"]
