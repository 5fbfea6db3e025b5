"""``tal detect --online`` through the real entry point: a small real MP4 in which an "action" (a white square)
happens, a tiny TorchScript frame backbone recorded as the features' provenance, and a ``demo-online`` detector
trained a little on that video's extracted features.

The events the live run writes must be the events the same model emits offline on the extracted features of the
same video (``OnlineDetector.stream_events``): featurizing live reproduces extraction, and the stream is the model.
"""

from __future__ import annotations

import json
import socket
import threading
import warnings
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from helpers import TinyFrameNet

from jobs.cli import main
from jobs.errors import UsageError
from jobs.online import detect_online
from pipelines.backbones import BackboneConfig, build_backbone
from pipelines.extract import SamplingConfig, features_for_video, provenance_for, settings_json
from pipelines.store import FeatureStore, Provenance
from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, save_checkpoint
from tal_models.detectors import build_detector
from tal_models.optim import OptimConfig, build_optimizer
from tal_models.presets import load_preset, make_config
from tal_models.timing import STEP_TIMING
from tal_models.training import train_one_epoch

FPS = 10
ACTION = (1.5, 3.0)  # seconds in which the square is shown
SAMPLING = SamplingConfig(fps=10.0, window=2, stride=1, chunk_frames=16)
LABELS = ["square"]


def _write_video(path, seconds: float = 5.0, size=(96, 64), fmt: str = "mp4") -> str:
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(int(seconds * FPS)):
            image = np.stack([(xx + k * 3) % 96, (yy * 2 + k) % 80, (xx + yy) % 64], -1).astype(np.uint8)
            if ACTION[0] <= k / FPS < ACTION[1]:
                image[16:48, 24:72] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)


def _train(features: np.ndarray, segments_steps: np.ndarray, steps: int = 200):
    torch.manual_seed(0)
    preset = load_preset("demo-online").detector
    config = replace(
        preset,
        num_classes=len(LABELS),
        max_seq_len=64,
        encoder=replace(preset.encoder, input_dim=features.shape[1], embed_dim=16, levels=2),
    )
    model = build_detector(config)
    batch = collate([{"features": features, "segments": segments_steps, "labels": np.zeros(len(segments_steps), np.int64), "video_id": "v"}],
                    model.pad_multiple)  # fmt: skip
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.0, warmup_epochs=0, epochs=steps))
    for _ in range(steps):
        train_one_epoch(model, [batch], optimizer, None, clip_grad_norm=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("online")
    video = _write_video(root / "live.mp4")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(TinyFrameNet(gain=10.0).eval()), root / "frame.pt")
    config = BackboneConfig(name="torchscript", weights=str(root / "frame.pt"), kind="frame", input_size=(32, 40), batch_size=16)
    backbone = build_backbone(config, "cpu", num_threads=1)
    sequence = features_for_video(backbone, video, SAMPLING)  # what tal extract stores for this video
    provenance = provenance_for(backbone, SAMPLING, settings_json(config, SAMPLING)).to_dict()
    truth = sequence.timing.seconds_to_step(np.array([ACTION], np.float64)).astype(np.float32)
    model = _train(np.asarray(sequence.features), truth)
    save_checkpoint(Checkpoint.from_model(model, LABELS, provenance), root / "online.pt")
    imported = {"backbone": "i3d", "feature_dim": 6}  # features made elsewhere: no featurizer
    save_checkpoint(Checkpoint.from_model(model, LABELS, imported), root / "imported.pt")
    offline = build_detector(make_config("temporalmaxer", num_classes=1, input_dim=6, max_seq_len=64, embed_dim=16, levels=3))
    save_checkpoint(Checkpoint.from_model(offline, LABELS, provenance), root / "offline.pt")
    np.save(root / "features.npy", np.asarray(sequence.features))
    FeatureStore(str(root / "store")).write_part([sequence], Provenance.from_dict(provenance))
    yield {"root": root, "video": video, "sequence": sequence, "model": model, "backbone": backbone}
    torch.set_num_threads(threads)


def _events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same_events(got: list[dict], expected) -> None:
    assert [(e["kind"], e["instance"], e["label"], e["step"]) for e in got] == [(e.kind, e.instance, e.label, e.step) for e in expected]
    for g, e in zip(got, expected):
        assert g["time"] == pytest.approx(e.time) and g["start"] == pytest.approx(e.start, abs=1e-4)
        assert g["score"] == pytest.approx(e.score, abs=1e-4) and (g["end"] is None) == (e.end is None)
        assert g["label_name"] == LABELS[g["label"]]


def test_live_video_events_equal_the_offline_stream(world, capsys):
    out = world["root"] / "events.jsonl"
    code = main(["detect", "--online", world["video"], "--model", str(world["root"] / "online.pt"), "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    sequence = world["sequence"]
    expected = world["model"].stream_events(sequence.features, sequence.timing)
    got = _events(out)
    _same_events(got, expected)
    kinds = [e["kind"] for e in got]
    assert "start" in kinds and kinds[-1] == "end"  # the model learnt the square: an instance starts and ends
    ends = [e for e in got if e["kind"] == "end"]
    assert any(e["start"] < ACTION[1] and e["end"] > ACTION[0] for e in ends)
    assert all(e["step"] <= f["step"] for e, f in zip(got, got[1:]))  # in step order
    lines = printed.splitlines()
    assert sum(" square " in line for line in lines) == len(got)  # one readable line per event, as it happened
    assert any(line.startswith("step delay") and "p50" in line and "p99" in line for line in lines)
    steps_line = next(line for line in lines if line.startswith("stream"))
    assert f"{len(sequence.features)} steps" in steps_line and "50 frames" in steps_line


def test_detect_online_function_paced_and_features(world):
    out = world["root"] / "paced.jsonl"
    report = detect_online(
        world["video"], str(world["root"] / "online.pt"), out=out, realtime=True, speed=4.0, device="cpu", print_events=False
    )
    assert report["steps"] == len(world["sequence"].features) and report["stopped"] == "end"
    delays = report["delay_ms"]
    assert 0.0 < delays["p50"] <= delays["p90"] <= delays["p99"]
    assert report["stream_seconds"] >= 4.0  # 5 s of video: paced at 4x it took >= 1.2 s, not asserted (no timed assertions)
    _same_events(_events(out), world["model"].stream_events(world["sequence"].features, world["sequence"].timing))

    # a feature file: its steps fed as fast as possible; the timing is the checkpoint's provenance's
    out = world["root"] / "features.jsonl"
    report = detect_online(str(world["root"] / "features.npy"), str(world["root"] / "online.pt"), out=out, print_events=False)
    assert report["frames"] == 0 and report["steps"] == len(world["sequence"].features)
    _same_events(_events(out), world["model"].stream_events(world["sequence"].features, world["sequence"].timing))
    # a video of a feature store: its own timing
    out = world["root"] / "store.jsonl"
    report = detect_online(f"{world['root'] / 'store'}#live", str(world["root"] / "online.pt"), out=out, print_events=False)
    assert report["steps"] == len(world["sequence"].features)
    _same_events(_events(out), world["model"].stream_events(world["sequence"].features, world["sequence"].timing))
    with pytest.raises(UsageError, match="cannot read video 'elsewhere'.*holds no features"):
        detect_online(f"{world['root'] / 'store'}#elsewhere", str(world["root"] / "online.pt"), out=out, print_events=False)
    # imported features have no featurizer, but their feature files run (seconds are steps then)
    out = world["root"] / "imported.jsonl"
    detect_online(str(world["root"] / "features.npy"), str(world["root"] / "imported.pt"), out=out, print_events=False)
    _same_events(_events(out), world["model"].stream_events(world["sequence"].features, STEP_TIMING))


def test_a_stream_served_over_tcp(world):
    ts = _write_video(world["root"] / "live.ts", fmt="mpegts")
    data = Path(ts).read_bytes()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def send():
        conn, _ = server.accept()
        with conn:
            for i in range(0, len(data), 1316):  # 7 TS packets per write, as a UDP/TCP streamer sends them
                conn.sendall(data[i : i + 1316])

    thread = threading.Thread(target=send)
    thread.start()
    out = world["root"] / "tcp.jsonl"
    try:
        url = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        report = detect_online(url, str(world["root"] / "online.pt"), out=out, open_timeout=10.0, device="cpu", print_events=False)
    finally:
        thread.join()
        server.close()
    sequence = features_for_video(world["backbone"], ts, SAMPLING)  # the same stream extracted offline
    assert report["frames"] == 50 and report["steps"] == len(sequence.features) == len(world["sequence"].features)
    _same_events(_events(out), world["model"].stream_events(sequence.features, sequence.timing))


def test_cli_defaults_are_the_jobs():
    from jobs.cli import detect as detect_cli
    from jobs.online import OnlineDetectRequest

    assert Path(detect_cli.DEFAULT_EVENTS) == OnlineDetectRequest.out


def test_refusals(world, capsys):
    root = world["root"]

    def run(*args) -> tuple[int, str]:
        code = main(["detect", *map(str, args), "--device", "cpu", "--out", str(root / "refused.jsonl")])
        return code, capsys.readouterr().err

    code, err = run("--online", world["video"], "--model", root / "offline.pt")
    assert code == 2 and "not an online one" in err
    code, err = run("--online", world["video"], "--model", root / "imported.pt")
    assert code == 2 and "cannot run on videos" in err and "not extracted by tal extract" in err
    code, err = run("--online", root / "missing.mp4", "--model", root / "online.pt")
    assert code == 2 and "missing" in err
    code, err = run("--online", world["video"], "--model", root / "online.pt", "--workers", "2")
    assert code == 2 and "--workers" in err and "not with --online" in err
    code, err = run("--online", world["video"], world["video"], "--model", root / "online.pt")
    assert code == 2 and "drop" in err
    assert not (root / "refused.jsonl").exists()  # refused before any event
    code = main(["detect", world["video"], "--model", str(root / "online.pt"), "--realtime"])
    assert code == 2 and "only with --online" in capsys.readouterr().err
