"""``tal evaluate --model``: a tiny detector trained here, run over a tiny feature store, scored.

The store's videos carry a class prototype in their annotated steps; half of them start at a
non-zero time offset, so the metrics are only high when steps -> seconds is right.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.cli import main
from pipelines.annotations import read_activitynet_results, read_annotations, write_activitynet
from pipelines.store import FeatureSequence, FeatureStore, Provenance
from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, save_checkpoint
from tal_models.detectors import build_detector
from tal_models.optim import OptimConfig, build_optimizer
from tal_models.presets import make_config
from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation
from tal_models.timing import FeatureTiming
from tal_models.training import train_one_epoch

C = 16
CLASSES = ["Jump", "Run", "Throw"]
PROVENANCE = Provenance("synthetic_backbone", "synthetic.pth", "ab" * 32, C, 10.0, 4, 8, "{}")
TEST_VIDEOS = [f"v{i}" for i in range(6)]
MISSING = ["ghost_a", "ghost_b"]  # annotated (test subset) but never extracted
PNG = b"\x89PNG\r\n\x1a\n"


def _videos(num_videos: int = 8, seed: int = 0, noise: float = 0.3):
    """Sequences and their ground truth in seconds; odd videos start 7.5 s into their video."""
    g = np.random.default_rng(seed)
    protos = g.standard_normal((len(CLASSES), C)).astype(np.float32)
    sequences, truth = [], {}
    for v in range(num_videos):
        timing = FeatureTiming(PROVENANCE.fps, PROVENANCE.stride, PROVENANCE.window, offset=7.5 * (v % 2))
        length = int(g.integers(96, 161))
        feats = noise * g.standard_normal((length, C)).astype(np.float32)
        steps, labels, t = [], [], int(g.integers(2, 10))
        while True:
            n = int(g.integers(6, 40))
            if t + n >= length - 2:
                break
            k = int(g.integers(len(CLASSES)))
            feats[t : t + n] += protos[k]
            steps.append([t - 0.5, t + n - 0.5])  # steps t..t+n-1 span from half a step before t's centre
            labels.append(k)
            t += n + int(g.integers(4, 20))
        vid = f"v{v}"
        duration = float(timing.step_to_seconds(length - 0.5))
        sequences.append(FeatureSequence(vid, feats, timing, timing.centers(length), duration, source=f"/videos/{vid}.mp4"))
        truth[vid] = (timing.step_to_seconds(np.array(steps)), np.array(labels), duration)
    return sequences, truth


def _annotations(truth) -> AnnotationSet:
    videos = {}
    for vid, (seconds, labels, duration) in truth.items():
        subset = "test" if vid in TEST_VIDEOS else "training"
        videos[vid] = VideoAnnotation(vid, Segments(seconds), labels, duration=duration, subset=subset)
    for vid in MISSING:
        videos[vid] = VideoAnnotation(vid, Segments(np.array([[1.0, 4.0]])), np.array([0]), duration=30.0, subset="test")
    return AnnotationSet(videos, LabelMap.from_names(CLASSES))


def _train(sequences, truth, steps: int = 60):
    torch.manual_seed(0)
    model = build_detector(make_config("temporalmaxer", num_classes=len(CLASSES), input_dim=C, max_seq_len=256, embed_dim=32, levels=4))
    samples = [
        {
            "features": s.features,
            "segments": s.timing.segments_to_steps(Segments(truth[s.video_id][0])).data.astype(np.float32),
            "labels": truth[s.video_id][1],
            "video_id": s.video_id,
        }
        for s in sequences
    ]
    batch = collate(samples, model.pad_multiple)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=0, epochs=steps))
    for _ in range(steps):
        train_one_epoch(model, [batch], optimizer, None, clip_grad_norm=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store of 8 videos (two parts), annotations (6 test videos + 2 missing, 2 training), a checkpoint."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only spin against the other processes on the machine
    root = tmp_path_factory.mktemp("evaluate_model")
    sequences, truth = _videos()
    store = FeatureStore(str(root / "store"))
    store.write_part(sequences[:4], PROVENANCE)
    store.write_part(sequences[4:], PROVENANCE)
    write_activitynet(root / "annotations.json", _annotations(truth))
    model = _train(sequences, truth)
    save_checkpoint(Checkpoint.from_model(model, CLASSES, store.provenance.to_dict()), root / "model.pt")
    yield {"root": root, "store": root / "store", "annotations": root / "annotations.json", "checkpoint": root / "model.pt", "model": model}
    torch.set_num_threads(threads)


def _evaluate(world, out: Path, *extra) -> int:
    return main(
        [
            "evaluate", "--model", str(world["checkpoint"]), "--features", str(world["store"]), "--annotations", str(world["annotations"]),
            "--subset", "test", "--tiou", "0.3", "0.5", "0.7", "--output", str(out), *map(str, extra),
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def in_process(world):
    """One in-process run (shared by the tests that read its outputs): (exit code, output dir, stdout)."""
    out = world["root"] / "in_process"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = _evaluate(world, out, "--workers", "0", "--timeline-videos", "3", "--batch-size", "4")
    return rc, out, stdout.getvalue()


def test_in_process_writes_predictions_metrics_plots_and_timelines(world, in_process):
    rc, out, stdout = in_process
    assert rc == 0, stdout
    # predictions.json: ActivityNet results that our reader (and the reference's layout) accepts
    raw = json.loads((out / "predictions.json").read_text())
    assert set(raw) == {"version", "results", "external_data"}
    assert sorted(raw["results"]) == TEST_VIDEOS
    first = raw["results"]["v1"][0]
    assert set(first) == {"label", "score", "segment"} and first["label"] in CLASSES
    predictions = read_activitynet_results(out / "predictions.json", LabelMap.from_names(CLASSES))
    assert predictions.unknown_labels == {}
    truth = read_annotations(world["annotations"])
    for vid, det in predictions.detections.items():
        assert len(det) > 0 and det.segments.data.min() >= 0.0
        assert det.segments.data.max() <= truth[vid].duration + 1e-4  # clipped to the video

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tiou"] == [0.3, 0.5, 0.7]
    assert metrics["mAP"][1] >= 0.9, metrics  # fails if steps <-> seconds were off (offsets, stride, window)
    assert metrics["num_videos"] == 6 and metrics["missing_from_store"] == MISSING and metrics["workers"] == 0
    assert metrics["num_ground_truth"] == sum(len(truth[v]) for v in TEST_VIDEOS)  # missing videos are not counted
    for key in ("average_mAP", "per_class_AP", "recall_at_k", "num_predictions", "unknown_labels", "ground_truth_format"):
        assert key in metrics

    assert (out / "precision_recall.png").read_bytes()[:8] == PNG
    timelines = sorted(p.name for p in (out / "timelines").iterdir())
    assert timelines == ["v0.png", "v1.png", "v2.png"]
    assert all((out / "timelines" / name).read_bytes()[:8] == PNG for name in timelines)

    assert "warning" in stdout and "'ghost_a', 'ghost_b'" in stdout
    assert "6 videos" in stdout and "average mAP" in stdout and "in this process" in stdout


def test_ray_workers_give_the_same_detections(world, in_process, ray_session, capsys):
    out = world["root"] / "ray"
    assert _evaluate(world, out, "--workers", "2", "--timeline-videos", "0", "--batch-size", "2") == 0
    assert "on Ray, 2 actors" in capsys.readouterr().out
    labels = LabelMap.from_names(CLASSES)
    local = read_activitynet_results(in_process[1] / "predictions.json", labels).detections
    remote = read_activitynet_results(out / "predictions.json", labels).detections
    assert list(remote) == list(local) == TEST_VIDEOS
    for vid in TEST_VIDEOS:
        a, b = local[vid], remote[vid]
        assert len(a) == len(b), vid
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
        close = np.isclose(b.scores[:, None], a.scores[None, :], atol=1e-5)  # score ties may swap places
        assert close.any(axis=1).all()
        np.testing.assert_allclose(np.sort(b.segments.data, axis=0), np.sort(a.segments.data, axis=0), atol=1e-4)
    assert not (out / "timelines").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mAP"] == pytest.approx(json.loads((in_process[1] / "metrics.json").read_text())["mAP"], abs=1e-6)


def test_detect_sequences_matches_one_video_at_a_time(world):
    """Batches pad, and each video keeps its own timing: the same detections as Detector.detect."""
    from jobs.inference import detect_sequences
    from tal_models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(world["checkpoint"])
    sequences = list(FeatureStore(str(world["store"])))[:3]
    batched = detect_sequences(checkpoint, sequences, batch_size=3)
    model = checkpoint.build()
    for s in sequences:
        alone = model.detect(s.features, s.timing, s.duration, s.video_id).to_numpy()
        np.testing.assert_allclose(batched[s.video_id].scores, alone.scores, atol=1e-5)
        np.testing.assert_allclose(batched[s.video_id].segments.data, alone.segments.data, atol=1e-4)


def _one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tal evaluate: error:"), lines
    return lines[0]


def test_a_checkpoint_for_other_features_exits_2(world, tmp_path, capsys):
    model = build_detector(make_config("temporalmaxer", num_classes=len(CLASSES), input_dim=24, max_seq_len=256, embed_dim=32, levels=4))
    other = tmp_path / "wide.pt"
    save_checkpoint(Checkpoint.from_model(model, CLASSES, dict(PROVENANCE.to_dict(), feature_dim=24)), other)
    rc = _evaluate(dict(world, checkpoint=other), tmp_path / "out")
    assert rc == 2
    line = _one_line_error(capsys)
    assert "24-dim" in line and "16-dim" in line
    assert not (tmp_path / "out").exists()


def test_a_store_of_another_backbone_exits_2(world, tmp_path, capsys):
    sequences, _ = _videos(num_videos=1)
    store = FeatureStore(str(tmp_path / "resnet_store"))
    store.write_part(sequences, Provenance("resnet50", "resnet50.pth", "cd" * 32, C, 10.0, 4, 8, "{}"))
    assert _evaluate(dict(world, store=tmp_path / "resnet_store"), tmp_path / "out") == 2
    line = _one_line_error(capsys)
    assert "backbone" in line and "resnet50" in line and "synthetic_backbone" in line


def test_checkpoint_classes_unknown_to_the_annotations_exit_2(world, tmp_path, capsys):
    other = tmp_path / "swim.pt"
    save_checkpoint(Checkpoint.from_model(world["model"], ["Jump", "Run", "Swim"], PROVENANCE.to_dict()), other)
    assert _evaluate(dict(world, checkpoint=other), tmp_path / "out") == 2
    assert "'Swim'" in _one_line_error(capsys)


def test_usage_errors(world, tmp_path, capsys):
    common = ["evaluate", "--annotations", str(world["annotations"])]
    with pytest.raises(SystemExit) as exc:  # argparse: the two modes exclude each other
        main([*common, "--model", str(world["checkpoint"]), "--predictions", "p.json", "--features", str(world["store"])])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    cases = [
        ([*common, "--model", str(world["checkpoint"]), "--output", str(tmp_path)], "--features"),
        ([*common, "--model", str(world["checkpoint"]), "--features", str(world["store"])], "--output"),
        ([*common, "--predictions", "p.json", "--workers", "2"], "--workers"),
        ([*common, "--model", str(world["checkpoint"]), "--features", str(world["store"]), "--output", str(tmp_path), "--subset", "val"], "'val'"),
        ([*common, "--model", str(tmp_path / "nope.pt"), "--features", str(world["store"]), "--output", str(tmp_path)], "nope.pt"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        assert needle in _one_line_error(capsys), argv
