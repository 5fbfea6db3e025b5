"""``/v1/stream`` over real WebSockets against one real local Serve app (module-scoped), with a tiny online
detector trained here on synthetic features (class prototypes inside segments, noise around), so streams
have events. Its provenance is a real MobileNetV2 extraction (ImageNet weights from the hub cache, 5 fps,
2-frame clips), so video input works too. Every result is checked against the same checkpoint run offline
in this process (``OnlineDetector.stream_events`` / ``step_scores``; for video, on ``features_for_video``)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import free_port

from jobs.serve_config import ServeArgs
from jobs.stream_client import StreamClient, StreamClientError
from pipelines.backbones import BackboneConfig, build_backbone
from pipelines.extract import SamplingConfig, features_for_video, provenance_for, settings_json
from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, save_checkpoint
from tal_models.detectors import build_detector, online_config
from tal_models.optim import OptimConfig, build_optimizer
from tal_models.timing import FeatureTiming

C, LABELS = 1280, ["jump", "run", "wave"]  # MobileNetV2's width
SAMPLING = SamplingConfig(fps=5.0, window=2, stride=2, chunk_frames=16)
TIMING = FeatureTiming(5.0, 2, 2)  # the checkpoint's sampling: the stream's seconds
MAX_SESSIONS, IDLE_S, MAX_MESSAGE_MB = 3, 3.0, 1.0


def _videos(count: int, length: int, seed: int) -> list[dict]:
    """Videos with a few segments of class prototypes (segment [t - 0.5, t + n - 0.5] in steps) in noise."""
    g = np.random.default_rng(seed)
    protos = 2.0 * np.random.default_rng(0).standard_normal((len(LABELS), C)).astype(np.float32)
    videos = []
    for v in range(count):
        feats = 0.2 * g.standard_normal((length, C)).astype(np.float32)
        segs, labels, t = [], [], int(g.integers(2, 6))
        while t + 8 < length - 2:
            n, k = int(g.integers(6, min(14, length - 2 - t))), int(g.integers(len(LABELS)))
            feats[t : t + n] += protos[k]
            segs.append([t - 0.5, t + n - 0.5])
            labels.append(k)
            t += n + int(g.integers(4, 8))
        videos.append({"features": feats, "segments": np.array(segs, np.float32), "labels": np.array(labels), "video_id": f"v{v}"})
    return videos


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_session):
    from ray import serve

    from jobs.serve import run_app

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = online_config(num_classes=len(LABELS), input_dim=C, embed_dim=32, levels=3, max_seq_len=64, window=5, heads=4, drop_path=0.0)
    model = build_detector(config).train()
    batch = collate(_videos(4, 48, seed=1), model.pad_multiple)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=0, epochs=300))
    for _ in range(120):
        loss = model(batch)["final_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    root = tmp_path_factory.mktemp("serve_stream")
    backbone_config = BackboneConfig(name="mobilenet_v2")
    backbone = build_backbone(backbone_config, "cpu", num_threads=1)
    provenance = provenance_for(backbone, SAMPLING, settings_json(backbone_config, SAMPLING)).to_dict()
    save_checkpoint(Checkpoint.from_model(model, LABELS, provenance), root / "online.pt")
    args = ServeArgs(
        model=str(root / "online.pt"),
        stream_max_sessions=MAX_SESSIONS,
        stream_idle_timeout_s=IDLE_S,
        stream_max_message_mb=MAX_MESSAGE_MB,
    )
    url = run_app(args, "127.0.0.1", free_port(), quiet=True)
    try:
        yield {"url": url, "model": model, "root": root, "backbone": backbone}
    finally:
        serve.shutdown()


def _stream(url: str, **kwargs) -> StreamClient:
    return StreamClient(url, timeout=60, **kwargs)


def _assert_same_events(got: list[dict], expected) -> None:
    assert len(got) == len(expected) > 0
    for g, e in zip(got, [e.to_dict(LABELS) for e in expected]):
        assert {k: g[k] for k in ("kind", "instance", "label", "label_name", "step")} == {
            k: e[k] for k in ("kind", "instance", "label", "label_name", "step")
        }
        assert [g["start"], g["score"], g["time"]] == pytest.approx([e["start"], e["score"], e["time"]], abs=1e-4)
        assert (g["end"] is None) == (e["end"] is None) and (e["end"] is None or g["end"] == pytest.approx(e["end"], abs=1e-4))


def _events(client: StreamClient) -> list[dict]:
    return [m for m in client.events(timeout=60) if m["type"] == "event"]


# --- good input ----------------------------------------------------------------------------------------


def test_concurrent_sessions_stream_the_offline_events_and_json_and_npy_agree(served):
    url, model = served["url"], served["model"]
    first, second = (v["features"] for v in _videos(2, 60, seed=7))
    a, b = _stream(url), _stream(url)
    opened = a.open(scores=True)
    assert opened["labels"] == LABELS and opened["input_dim"] == C and opened["timing"]["fps"] == TIMING.fps
    assert opened["limits"]["max_sessions"] == MAX_SESSIONS and opened["rule_overrides"] == ["end_threshold", "start_threshold"]
    b.open()
    for i in range(0, 60, 6):  # interleaved: a sends JSON chunks with timestamps, b one .npy step at a time
        a.send_features(first[i : i + 6], timestamps=1000.0 + np.arange(i, i + 6))
        for row in second[i : i + 6]:
            b.send_features(row)
    closed_a, closed_b = a.close(), b.close()
    messages_a = list(a.events(timeout=60))
    events_a = [m for m in messages_a if m["type"] == "event"]
    _assert_same_events(events_a, model.stream_events(first, TIMING))
    _assert_same_events(_events(b), model.stream_events(second, TIMING))
    assert (closed_a["steps"], closed_a["events"], closed_b["steps"]) == (60, len(events_a), 60)
    scores = [m for m in messages_a if m["type"] == "scores"]
    assert [m["step"] for m in scores] == list(range(60)) and [m["timestamp"] for m in scores] == list(1000.0 + np.arange(60))
    np.testing.assert_allclose([m["scores"] for m in scores], model.step_scores(first), atol=1e-5)
    assert not a.errors and not b.errors and a.disconnected == (1000, "closed")

    c = _stream(url)  # the first features again, as .npy: the same events as the JSON session
    c.open()
    c.send_features(first)
    c.close()
    assert [(m["kind"], m["step"], m["instance"]) for m in _events(c)] == [(m["kind"], m["step"], m["instance"]) for m in events_a]


def test_rule_overrides_reach_the_stream_and_the_model_name_is_checked(served):
    url, model = served["url"], served["model"]
    features = _videos(1, 40, seed=11)[0]["features"]
    client = _stream(url)
    with pytest.raises(StreamClientError, match="model_mismatch"):
        client.open(model="someone-else")
    client.open(model=str(served["root"] / "online.pt"), rule={"start_threshold": 0.99, "end_threshold": 0.98})
    client.send_features(features)
    client.close()
    rule = replace(model.config.inference.rule, start_threshold=0.99, end_threshold=0.98)  # the model's rule, two thresholds overridden
    expected = model.stream_events(features, TIMING, rule)
    assert [(e.kind, e.step) for e in expected] != [(e.kind, e.step) for e in model.stream_events(features, TIMING)]
    _assert_same_events(_events(client), expected)


def test_the_client_command_streams_a_file_and_writes_the_events(served, tmp_path, capsys):
    from jobs.stream_client import main

    features = _videos(1, 40, seed=13)[0]["features"]
    np.save(tmp_path / "steps.npy", features)
    out = tmp_path / "events.jsonl"
    assert main(["--url", served["url"], "--features", str(tmp_path / "steps.npy"), "--rate", "0", "--out", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    _assert_same_events(written, served["model"].stream_events(features, TIMING))
    printed = capsys.readouterr().out
    assert f"40 steps, {len(written)} events" in printed and "start" in printed


# --- bad input -----------------------------------------------------------------------------------------


def _npy(array) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


def test_every_bad_message_is_an_error_and_the_session_goes_on(served):
    url, model = served["url"], served["model"]
    x = _videos(1, 30, seed=5)[0]["features"]
    nan = x[:2].copy()
    nan[1, 3] = np.nan
    bad = [
        (json.dumps({"type": "features", "features": x[:1].tolist()}), "not_open"),
        ("{broken", "malformed_json"),
        (json.dumps({"type": "open", "input": "video", "options": {"timing": {"fps": 5.0}}}), "invalid_options"),
        (json.dumps({"type": "open", "options": {"timing": {"fps": 30}}}), "timing_mismatch"),
        (json.dumps({"type": "open", "options": {"rule": {"patience": 9}}}), "invalid_options"),
        (json.dumps({"type": "open", "options": {"rule": {"start_threshold": 0.2, "end_threshold": 0.3}}}), "invalid_options"),
        (json.dumps({"type": "open"}), None),
        (json.dumps({"type": "features", "features": x[:10].tolist(), "timestamps": list(range(10))}), None),
        (_npy(np.zeros((2, C + 1), np.float32)), "wrong_feature_dim"),
        (json.dumps({"type": "features", "features": [[0.0] * (C - 1)]}), "wrong_feature_dim"),
        (_npy(nan), "non_finite_features"),
        ('{"type": "features", "features": [' + ", ".join(["NaN"] * C) + "]}", "non_finite_features"),
        (json.dumps({"type": "features", "features": x[10:12].tolist(), "timestamps": [9.0, 10.0]}), "timestamps_out_of_order"),
        (json.dumps({"type": "features", "features": x[10:12].tolist(), "timestamps": [11.0, 10.5]}), "timestamps_out_of_order"),
        (_npy(x[10:12])[:-7], "malformed_npy"),
        (b"not an npy at all", "malformed_npy"),
        (_npy(np.array([{"a": 1}], dtype=object)), "invalid_features"),
        (json.dumps({"type": "subscribe"}), "unknown_type"),
        (json.dumps({"type": "open"}), "already_open"),
        (_npy(np.zeros((int(MAX_MESSAGE_MB * 2**20) // (4 * C) + 8, C), np.float32)), "payload_too_large"),
        (json.dumps({"type": "features", "features": x[10:].tolist()}), None),
    ]
    client = _stream(served["url"])
    for message, _ in bad:
        client.socket.send(message)
    summary = client.close()
    assert [e["code"] for e in client.errors] == [code for _, code in bad if code is not None]
    assert all(e["message"] for e in client.errors)
    assert summary["steps"] == 30
    _assert_same_events(_events(client), model.stream_events(x, TIMING))  # nothing of a bad message was consumed
    ok = _stream(url)  # and the server is fine
    ok.open()
    assert ok.close()["steps"] == 0


# --- video input -------------------------------------------------------------------------------------------


def _ts_video(path, frames: int = 40, size=(96, 64), fps: int = 10) -> bytes:
    """A moving colour pattern, H.264 in MPEG-TS, a keyframe every 10 frames."""
    import av

    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": "10", "keyint_min": "10", "sc_threshold": "0"}
        for k in range(frames):
            image = np.stack([(xx * 3 + k * 9) % 256, (yy * 4 + k * 5) % 256, ((xx + yy) * 2 + k * 13) % 256], -1).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path.read_bytes()


def test_mpegts_chunks_stream_like_offline_extraction_and_a_bad_chunk_is_dropped(served, tmp_path):
    url, model = served["url"], served["model"]
    data = _ts_video(tmp_path / "clip.ts")
    seq = features_for_video(served["backbone"], str(tmp_path / "clip.ts"), SAMPLING)
    client = _stream(url)
    assert client.open("video", scores=True)["input"] == "video"
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, len(data)), size=12, replace=False)).tolist()
    for k, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(data)])):
        client.send_video(data[a:b])
        if k == 6:
            client.send_video(b"garbage, not the next piece of the stream " * 20)
    summary = client.close()
    assert [e["code"] for e in client.errors] == ["malformed_video"]
    messages = list(client.events(timeout=60))
    scores = [m for m in messages if m["type"] == "scores"]
    assert summary["steps"] == len(scores) == len(seq.features) >= 8
    np.testing.assert_allclose([m["scores"] for m in scores], model.step_scores(seq.features), atol=1e-4)
    assert [m["time"] for m in scores] == pytest.approx(seq.timing.centers(len(seq.features)))
    expected = model.stream_events(seq.features, seq.timing)
    got = [m for m in messages if m["type"] == "event"]
    assert [(m["kind"], m["step"], m["label"]) for m in got] == [(e.kind, e.step, e.label) for e in expected]


def test_a_stream_that_is_not_a_video_is_reported_and_close_still_works(served):
    client = _stream(served["url"])
    client.open("video")
    packet = b"\x47" + bytes(187)  # MPEG-TS framing, nothing decodable inside
    for _ in range(400):
        client.send_video(packet)
    summary = client.close()
    assert "malformed_video" in [e["code"] for e in client.errors] and summary["steps"] == 0


# --- limits --------------------------------------------------------------------------------------------


def test_a_session_over_the_replicas_limit_is_refused_with_1013(served):
    url = served["url"]
    held = [_stream(url) for _ in range(MAX_SESSIONS)]
    for client in held:
        client.open()
    extra = _stream(url)
    with pytest.raises(StreamClientError, match="too_many_sessions"):
        extra.open()
    list(extra.events(timeout=30))  # until the server closes it
    assert extra.errors[0]["code"] == "too_many_sessions" and extra.disconnected == (1013, "too_many_sessions")
    held.pop().close()
    again = _stream(url)
    again.open()
    for client in [again, *held]:
        assert client.close()["steps"] == 0


def test_an_idle_session_gets_its_end_events_then_an_idle_timeout(served):
    url, model = served["url"], served["model"]
    video = _videos(1, 40, seed=3)[0]
    cut = int(video["segments"][-1][0]) + 4  # inside the last segment: an instance still open
    features = video["features"][:cut]
    client = _stream(url)
    client.open()
    client.send_features(features)
    messages = list(client.events(timeout=3 * IDLE_S + 30))  # ends when the server closes the socket
    _assert_same_events([m for m in messages if m["type"] == "event"], model.stream_events(features, TIMING))
    assert messages[-1]["type"] == "event" and messages[-1]["kind"] == "end"  # close()'s: before the error
    assert [e["code"] for e in client.errors] == ["idle_timeout"] and client.closed["reason"] == "idle_timeout"
    assert client.disconnected == (1008, "idle_timeout")


# --- a replica that dies ----------------------------------------------------------------------------------


def test_a_killed_replica_loses_no_event_already_sent_and_serve_replaces_it(served, tmp_path):
    import ray

    from jobs.serve import _http_port

    url = served["url"]
    features = np.concatenate([v["features"] for v in _videos(3, 48, seed=9)])
    out = tmp_path / "events.jsonl"
    client = _stream(url, out=out)
    client.open()
    client.send_features(features[:100])
    received = []
    for message in client.events(timeout=60):
        received.append(message)
        if len(received) >= 3:
            break
    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Detector#" in a["name"]]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    received += list(client.events(timeout=60))  # ends cleanly at the disconnect
    assert client.disconnected is not None and client.disconnected[0] != 1000
    with pytest.raises(StreamClientError, match="disconnected"):
        client.close()
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == received and len(written) >= 3

    deadline = time.monotonic() + 180  # a loaded 2-core machine takes a while to start a replica
    while True:  # Serve starts a new replica (on another port, with direct ingress); a new session works there
        try:
            fresh = StreamClient(f"http://127.0.0.1:{_http_port('tal', True)}", timeout=5)
            fresh.open()
            break
        except (StreamClientError, OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    fresh.send_features(features[:48])
    assert fresh.close()["steps"] == 48
    _assert_same_events(_events(fresh), served["model"].stream_events(features[:48], TIMING))
