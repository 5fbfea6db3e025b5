"""``tal evaluate --online``: a tiny online detector trained here, streamed over a tiny feature store, scored
with the online metrics, against an offline ceiling. The model is trained on the videos it is scored on:
this checks the plumbing (step times, class columns, the files and the table), not generalisation."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from helpers import SYNTHETIC_CLASSES, SYNTHETIC_DIM, one_thread, synthetic_store  # noqa: F401 (one_thread: autouse)

from jobs.cli import main
from pipelines.annotations import read_annotations
from pipelines.store import FeatureStore
from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, save_checkpoint
from tal_models.detectors import build_detector, online_config
from tal_models.evaluation.online import detection_latency, frame_map
from tal_models.optim import OptimConfig, build_optimizer
from tal_models.presets import make_config
from tal_models.structures import Segments


def _train_online(sequences, truth, label_names, steps: int = 150):
    torch.manual_seed(0)
    config = online_config(
        kind="transformer", num_classes=len(label_names), input_dim=SYNTHETIC_DIM, max_seq_len=128, embed_dim=32, levels=3, window=5,
        heads=4, drop_path=0.0,
    )  # fmt: skip
    model = build_detector(config).train()
    column = {name: k for k, name in enumerate(label_names)}
    samples = []
    for s in sequences:
        video = truth[s.video_id]
        samples.append({
            "features": s.features,
            "segments": s.timing.segments_to_steps(Segments(np.asarray(video.segments.data))).data.astype(np.float32),
            "labels": np.array([column[truth.label_map.name(int(c))] for c in video.labels], np.int64),
            "video_id": s.video_id,
        })  # fmt: skip
    batch = collate(samples, model.pad_multiple)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=0, epochs=steps))
    for _ in range(steps):
        loss = model(batch)["final_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_online")
    store_uri, gt_path = synthetic_store(root, videos=9, steps=96)
    store = FeatureStore(store_uri)
    truth = read_annotations(gt_path)
    model = _train_online(list(store), truth, SYNTHETIC_CLASSES)
    save_checkpoint(Checkpoint.from_model(model, SYNTHETIC_CLASSES, store.provenance.to_dict()), root / "online.pt")
    torch.manual_seed(0)  # an untrained offline detector is enough for the ceiling's plumbing
    offline = build_detector(make_config("temporalmaxer", num_classes=3, input_dim=SYNTHETIC_DIM, max_seq_len=128, embed_dim=16, levels=3))
    save_checkpoint(Checkpoint.from_model(offline.eval(), SYNTHETIC_CLASSES, store.provenance.to_dict()), root / "offline.pt")
    return {"root": root, "store": store_uri, "gt": gt_path, "online": root / "online.pt", "offline": root / "offline.pt", "model": model}


def _evaluate(world, out, *extra) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(
            [
                "evaluate", "--model", str(world["online"]), "--features", str(world["store"]), "--annotations", str(world["gt"]),
                "--subset", "validation", "--workers", "0", "--timeline-videos", "0", "--output", str(out), *map(str, extra),
            ]
        )  # fmt: skip
    return rc, stdout.getvalue()


def test_online_metrics_end_to_end(world):
    out = world["root"] / "out"
    rc, stdout = _evaluate(world, out, "--online", "--ceiling", world["offline"])
    assert rc == 0, stdout
    written = json.loads((out / "online_metrics.json").read_text())
    online, ceiling = written["online"], written["ceiling"]
    assert written["ceiling_model"] == str(world["offline"]) and online["model"] == "online" and ceiling["model"] == "offline"
    assert online["detection"]["tiou"] == [0.3, 0.4, 0.5, 0.6, 0.7]  # THUMOS14's, --tiou not given
    # trained on these videos: fails if step times or class columns were off
    assert online["frame_mAP"] >= 0.9, online["frame"]
    assert online["average_mAP"] >= 0.5, online["detection"]
    assert online["latency"]["num_ground_truth"] == online["detection"]["num_ground_truth"] > 0
    assert online["latency"]["fraction_detected"] >= 0.8 and 0.0 <= online["latency"]["median_s"] <= online["latency"]["p90_s"]
    assert set(ceiling) >= {"frame_mAP", "average_mAP", "latency", "frame", "detection"}
    assert ceiling["latency"]["num_ground_truth"] == online["latency"]["num_ground_truth"]

    # the figures are those of the model's own streams, recomputed here from the model in the checkpoint
    model, truth = world["model"], read_annotations(world["gt"]).subset("validation")
    store = {s.video_id: s for s in FeatureStore(world["store"])}
    names = truth.label_map.names
    to_column = np.array([names.index(n) for n in SYNTHETIC_CLASSES])
    events, scores = {}, {}
    for vid in truth.videos:
        s = store[vid]
        events[vid] = [e.to_dict() | {"label": int(to_column[e.label])} for e in model.stream_events(s.features, s.timing)]
        probs = np.zeros((len(s.features), len(names)), np.float32)
        probs[:, to_column] = model.step_scores(s.features)
        scores[vid] = (s.timing.centers(len(s.features)), probs)
    assert online["latency"] == pytest.approx(detection_latency(truth, events).to_dict())
    assert online["frame_mAP"] == pytest.approx(frame_map(truth, scores).mAP)
    # the instance mAP of the end events is the mAP of what forward_inference returns (metrics.json)
    offline_path = json.loads((out / "metrics.json").read_text())  # ActivityNet ground truth: tIoUs 0.5:0.95 there
    common = [t for t in online["detection"]["tiou"] if t in offline_path["tiou"]]
    assert common == [0.5, 0.6, 0.7]
    for t in common:
        at = online["detection"]["tiou"].index(t), offline_path["tiou"].index(t)
        assert online["detection"]["mAP"][at[0]] == pytest.approx(offline_path["mAP"][at[1]], abs=1e-6), t

    assert "frame mAP(%)" in stdout and "latency median / p90" in stdout
    assert any(line.strip().startswith("online") for line in stdout.splitlines())
    assert any(line.strip().startswith("ceiling") for line in stdout.splitlines())
    assert "online_metrics.json" in stdout


def test_online_option_errors(world, capsys):
    out = world["root"] / "errors"

    def error(*args) -> str:
        assert main(["evaluate", "--annotations", str(world["gt"]), *map(str, args)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tal evaluate: error:"), lines
        return lines[0]

    common = ["--features", world["store"], "--output", out, "--workers", "0"]
    assert "not an online one" in error("--model", world["offline"], "--online", *common)
    assert "--ceiling applies with --online" in error("--model", world["online"], "--ceiling", world["offline"], *common)
    assert "offline detector" in error("--model", world["online"], "--online", "--ceiling", world["online"], *common)
    assert "only apply with --model" in error("--predictions", out / "p.json", "--online")
    assert not (out / "online_metrics.json").exists()
