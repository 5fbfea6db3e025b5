"""``tal detect`` through the real entry point: synthetic MP4s, a real ``tal extract`` (mobilenet_v2
from the hub cache) and a tiny detector trained on that store, plus a corrupt file.

The detections of ``tal detect`` must equal those of the same checkpoint on the store's features
of the same videos: featurizing in ``tal detect`` reproduces extraction (backbone, sampling, timing).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from jobs.cli import main
from jobs.inference import detect_sequences
from pipelines.extract import ExtractConfig, SamplingConfig, extract
from pipelines.store import FeatureStore, Provenance
from pipelines.synth import synthesize
from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, save_checkpoint
from tal_models.detectors import build_detector
from tal_models.optim import OptimConfig, build_optimizer
from tal_models.presets import make_config
from tal_models.training import train_one_epoch

SAMPLING = SamplingConfig(fps=5.0, window=2, stride=2, chunk_frames=16)
PNG = b"\x89PNG\r\n\x1a\n"


def _train(sequences, annotations, names, steps: int = 40):
    """A tiny TemporalMaxer fitted a little to the synthetic ground truth (so that some scores are high)."""
    torch.manual_seed(0)
    model = build_detector(make_config("temporalmaxer", num_classes=len(names), input_dim=1280, max_seq_len=64, embed_dim=16, levels=3))
    samples = []
    for vid, seq in sequences.items():
        truth = annotations.videos[vid]
        samples.append(
            {
                "features": np.array(seq.features),
                "segments": seq.timing.segments_to_steps(truth.segments).data.astype(np.float32),
                "labels": truth.labels,
                "video_id": vid,
            }
        )
    batch = collate(samples, model.pad_multiple)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=0, epochs=steps))
    for _ in range(steps):
        train_one_epoch(model, [batch], optimizer, None, clip_grad_norm=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    """Two 4-5 s synthetic videos and a corrupt one in ``videos/``; their store from a real extract; a checkpoint."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("detect")
    synth = synthesize(
        root / "synth", videos=2, seed=5, classes=3, duration_range=(4.0, 5.0), size=(160, 120), fps=10.0, workers=1, progress=False
    )
    videos = root / "videos"
    videos.mkdir()
    for p in synth.videos.values():
        shutil.copy(p, videos / p.name)
    (videos / "broken.mp4").write_text("this is not a video\n" * 50)
    store = FeatureStore(str(root / "store"))
    summary = extract(ExtractConfig(videos=str(root / "synth" / "videos"), out=store.uri, sampling=SAMPLING, num_workers=1, progress=False))
    assert summary.extracted == 2, summary.format()
    sequences = store.read_all()
    label_map = synth.annotations.label_map
    names = [label_map.name(i) for i in range(len(label_map))]
    checkpoint = Checkpoint.from_model(_train(sequences, synth.annotations, names), names, store.provenance.to_dict())
    save_checkpoint(checkpoint, root / "model.pt")
    yield {
        "root": root,
        "videos": videos,
        "good": sorted(synth.videos),
        "sequences": sequences,
        "checkpoint": checkpoint,
        "model": root / "model.pt",
    }
    torch.set_num_threads(threads)


def _detect(world, out, *extra, videos=None) -> int:
    target = world["videos"] if videos is None else videos
    return main(
        ["detect", str(target), "--model", str(world["model"]), "--output", str(out), "--device", "cpu", "--no-progress", *map(str, extra)]
    )


@pytest.fixture(scope="module")
def all_kept(world):
    """One run over the directory keeping every detection: (exit code, output dir)."""
    out = world["root"] / "all_kept"
    return _detect(world, out, "--score-threshold", "0"), out


def test_directory_with_a_corrupt_file(world, all_kept, capsys):
    code, out = all_kept
    assert code == 3  # some failed, the others written
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"version", "results", "external_data"}
    assert sorted(results["results"]) == world["good"]
    labels = set(world["checkpoint"].labels)
    for dets in results["results"].values():
        assert dets and all(d["label"] in labels and d["segment"][0] <= d["segment"][1] for d in dets)
    failed = json.loads((out / "failed.json").read_text())["failed"]
    assert [(f["video_id"], f["reason"]) for f in failed] == [("broken", "not_a_video")]
    assert failed[0]["source"].endswith("broken.mp4")
    for vid in world["good"]:
        assert (out / "timelines" / f"{vid}.png").read_bytes().startswith(PNG)
    assert not (out / "timelines" / "broken.png").exists()
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temporary files


def test_detections_equal_the_checkpoint_on_the_extracted_features(world, all_kept):
    _, out = all_kept
    got = json.loads((out / "results.json").read_text())["results"]
    expected = detect_sequences(world["checkpoint"], world["sequences"], batch_size=2, device="cpu")
    names = world["checkpoint"].labels
    for vid in world["good"]:
        want = expected[vid].sorted_by_score()
        mine = got[vid]
        assert len(mine) == len(want), vid
        np.testing.assert_allclose([d["score"] for d in mine], want.scores, atol=1e-4)
        # segments and labels, matched by score order (ties aside: scores differ at 1e-4 here)
        np.testing.assert_allclose([d["segment"] for d in mine], want.segments.data, atol=1e-3)
        assert [d["label"] for d in mine] == [names[c] for c in want.labels]


def test_the_onnx_runtime_writes_the_same_detections_from_a_checkpoint_or_an_exported_file(world, all_kept, capsys):
    """``--runtime onnx``: the checkpoint exported on the fly, or a ``tal export`` file, through ONNX Runtime."""
    want = json.loads((all_kept[1] / "results.json").read_text())["results"]
    exported = world["root"] / "model.onnx"
    assert main(["export", "--model", str(world["model"]), "--format", "onnx", "--out", str(exported)]) == 0
    for model in (world["model"], exported):
        out = world["root"] / f"onnx_{model.suffix[1:]}"
        code = main(["detect", str(world["videos"]), "--model", str(model), "--output", str(out), "--device", "cpu", "--no-progress",
                     "--score-threshold", "0", "--runtime", "onnx", "--timeline-videos", "0"])  # fmt: skip
        assert code == 3  # the corrupt file, as with torch
        assert "detector on ONNX Runtime" in capsys.readouterr().out
        got = json.loads((out / "results.json").read_text())["results"]
        assert sorted(got) == sorted(want) == world["good"]
        for vid in world["good"]:
            assert len(got[vid]) == len(want[vid]) > 0
            np.testing.assert_allclose([d["score"] for d in got[vid]], [d["score"] for d in want[vid]], atol=1e-5)
            np.testing.assert_allclose([d["segment"] for d in got[vid]], [d["segment"] for d in want[vid]], atol=1e-3)
            assert [d["label"] for d in got[vid]] == [d["label"] for d in want[vid]]
    # an exported file is not a checkpoint for the torch runtime
    code = main(["detect", str(world["videos"]), "--model", str(exported), "--output", str(world["root"] / "refused"), "--device", "cpu"])
    assert code == 2 and "run it with --runtime onnx" in capsys.readouterr().err


def test_score_threshold_and_top_k_filter_what_is_written(world, all_kept, tmp_path, capsys):
    _, out = all_kept
    everything = json.loads((out / "results.json").read_text())["results"]
    one = world["good"][0]
    scores = sorted((d["score"] for d in everything[one]), reverse=True)
    half = len(scores) // 2
    threshold = (scores[half - 1] + scores[half]) / 2  # about half pass, none near the threshold
    video = world["videos"] / f"{one}.mp4"  # a single file this time
    assert _detect(world, tmp_path / "a", "--score-threshold", threshold, videos=video) == 0
    kept = json.loads((tmp_path / "a" / "results.json").read_text())["results"]
    assert list(kept) == [one]
    assert [d["score"] for d in kept[one]] == pytest.approx([s for s in scores if s >= threshold], abs=1e-6)
    assert json.loads((tmp_path / "a" / "failed.json").read_text()) == {"failed": []}
    assert _detect(world, tmp_path / "b", "--score-threshold", "0", "--top-k", "2", "--timeline-videos", "0", videos=video) == 0
    top = json.loads((tmp_path / "b" / "results.json").read_text())["results"][one]
    assert [d["score"] for d in top] == pytest.approx(scores[:2], abs=1e-6)
    assert not (tmp_path / "b" / "timelines").exists()
    printed = capsys.readouterr().out
    assert f"{one}     2 detections" in printed and "results   ->" in printed


def test_checkpoint_on_imported_features_is_refused(world, tmp_path, capsys):
    imported = Provenance("i3d_rgb_flow", "imported", "", 1280, 5.0, 2, 2, "{}").to_dict()
    c = world["checkpoint"]
    save_checkpoint(Checkpoint(c.config, c.state_dict, c.labels, imported), tmp_path / "imported.pt")
    code = main(
        ["detect", str(world["videos"]), "--model", str(tmp_path / "imported.pt"), "--output", str(tmp_path / "out"), "--no-progress"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "cannot run on videos" in err[0] and "not extracted by tal extract" in err[0], err
    assert not (tmp_path / "out").exists()  # refused before any video


def test_other_backbone_weights_are_refused(world, tmp_path, capsys):
    from pipelines.weights import ensure_mobilenet_v2_weights

    state = torch.load(ensure_mobilenet_v2_weights(), weights_only=True)
    state["classifier.1.bias"] = state["classifier.1.bias"] + 1.0  # other bytes: other features could follow
    torch.save(state, tmp_path / "other.pth")
    assert _detect(world, tmp_path / "out", "--backbone-weights", tmp_path / "other.pth") == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "give the same weights file" in err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["/nonexistent/videos"], "no such video, directory or manifest"),
        (["{videos}", "--model", "/nonexistent/model.pt"], "no such checkpoint file"),
        (["{videos}", "--score-threshold", "1.5"], "--score-threshold"),
        (["{videos}", "--top-k", "0"], "--top-k"),
        (["{empty}"], "no videos in"),
    ],
)
def test_unusable_input_exits_2_with_one_line(world, tmp_path, capsys, args, needle):
    (tmp_path / "empty").mkdir()
    args = [a.format(videos=world["videos"], empty=tmp_path / "empty") for a in args]
    if "--model" not in args:
        args += ["--model", str(world["model"])]
    assert main(["detect", *args, "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_no_decodable_video_exits_2_and_says_why(world, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(world["videos"] / "broken.mp4", videos / "broken.mp4")
    assert _detect(world, tmp_path / "out", videos=videos) == 2
    assert "none of the 1 videos could be processed" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "failed.json").read_text())["failed"][0]["reason"] == "not_a_video"
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"] == {}
