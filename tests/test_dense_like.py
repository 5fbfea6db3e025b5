"""The MultiTHUMOS-timed dense data set of ``benchmarks/_dense_like.py`` on the real annotation file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ANNOTATIONS = REPO.parent / "shared" / "data" / "multithumos" / "multithumos.json"
pytestmark = pytest.mark.skipif(not ANNOTATIONS.exists(), reason=f"MultiTHUMOS annotations not found at {ANNOTATIONS}")

_spec = importlib.util.spec_from_file_location("_dense_like", REPO / "benchmarks" / "_dense_like.py")
dense_like = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dense_like)

SMALL = {"annotations": ANNOTATIONS, "input_dim": 32, "max_videos_per_split": 3, "seed": 5}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense_like")
    return out, dense_like.make_dense_like(out, **SMALL)


def _step_labels(video: dict, num_steps: int, meta: dict) -> np.ndarray:
    """[T, 65] bool from the written annotations: a step is inside a segment when its centre is strictly inside."""
    centres = (np.arange(num_steps) * meta["stride"] + meta["window"] / 2) / meta["fps"]
    active = np.zeros((num_steps, 65), dtype=bool)
    for class_id, start, end in video["actions"]:
        active[(centres > start) & (centres < end), int(class_id) - 1] = True
    return active


def test_annotations_read_back_with_real_timings_and_overlaps(made):
    from pipelines.annotations.multithumos import read_multithumos

    out, summary = made
    meta = json.loads((out / "meta.json").read_text())
    written = json.loads((out / "annotations.json").read_text())
    source = json.loads(ANNOTATIONS.read_text())
    assert summary["num_videos"] == {"train": 3, "test": 3}
    assert sorted(written) == sorted(meta["splits"]["train"] + meta["splits"]["test"])
    assert {written[v]["subset"] for v in meta["splits"]["train"]} == {"training"}
    assert {written[v]["subset"] for v in meta["splits"]["test"]} == {"testing"}
    for vid, video in written.items():
        assert video == source[vid]  # real durations and segments, untouched
    gt = read_multithumos(out / "annotations.json")
    assert len(gt) == 6 and len(gt.label_map) == 65
    assert gt.num_instances == sum(len(v["actions"]) for v in written.values())
    # MultiTHUMOS labels overlap: some step carries two or more labels, as the summary counts
    overlapping = sum(
        int((_step_labels(video, np.load(out / "features" / f"{vid}.npy").shape[0], meta).sum(axis=1) > 1).sum())
        for vid, video in written.items()
    )
    assert overlapping > 0 and overlapping == summary["overlapping_steps"]


def test_features_shape_and_signal(made):
    out, summary = made
    meta = json.loads((out / "meta.json").read_text())
    written = json.loads((out / "annotations.json").read_text())
    directions = dense_like.class_directions(65, 32, SMALL["seed"])
    total, inside, outside = 0, [], []
    for vid, video in written.items():
        feats = np.load(out / "features" / f"{vid}.npy")
        assert feats.dtype == np.float32 and feats.ndim == 2 and feats.shape[1] == 32
        # T clips of `window` frames every `stride` frames fit in the real duration at meta's fps
        n_frames = video["duration"] * meta["fps"]
        assert (feats.shape[0] - 1) * meta["stride"] + meta["window"] <= n_frames + 1e-6 < feats.shape[0] * meta["stride"] + meta["window"]
        total += feats.shape[0]
        labels = _step_labels(video, feats.shape[0], meta)
        projection = feats @ directions.T  # [T, 65]
        inside.append(projection[labels])
        outside.append(projection[~labels])
    assert summary["total_steps"] == total
    # prototype profile: a label's direction shows at its steps (signal 3 against unit noise)
    assert np.concatenate(inside).mean() > 2.0 > 0.5 > abs(np.concatenate(outside).mean())


def test_onset_profile_fades_after_the_onset(tmp_path):
    out = tmp_path / "onset"
    dense_like.make_dense_like(out, **{**SMALL, "max_videos_per_split": 1, "profile": "onset", "drift": 0.0})
    meta = json.loads((out / "meta.json").read_text())
    directions = dense_like.class_directions(65, 32, SMALL["seed"])
    early, late = [], []
    for vid, video in json.loads((out / "annotations.json").read_text()).items():
        feats = np.load(out / "features" / f"{vid}.npy")
        centres = (np.arange(feats.shape[0]) * meta["stride"] + meta["window"] / 2) / meta["fps"]
        for class_id, start, end in video["actions"]:
            inside = (centres > start) & (centres < end)
            proj = feats @ directions[int(class_id) - 1]
            early.append(proj[inside & (centres <= start + meta["onset"])])
            late.append(proj[inside & (centres > start + meta["onset"])])
    early, late = np.concatenate(early), np.concatenate(late)
    assert len(early) and len(late)
    assert early.mean() > 2.0 and late.mean() < 0.5 * early.mean()  # full strength, then `sustain` (0.25) of it
