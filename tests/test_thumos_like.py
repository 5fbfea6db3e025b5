"""The THUMOS14-like feature data set of ``benchmarks/_thumos_like.py`` on the real annotation file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ANNOTATIONS = REPO.parent / "shared" / "data" / "thumos14" / "thumos14.json"
pytestmark = pytest.mark.skipif(not ANNOTATIONS.exists(), reason=f"THUMOS14 annotations not found at {ANNOTATIONS}")

_spec = importlib.util.spec_from_file_location("_thumos_like", REPO / "benchmarks" / "_thumos_like.py")
thumos_like = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(thumos_like)

SMALL = {"annotations": ANNOTATIONS, "input_dim": 16, "max_videos_per_split": 3, "seed": 7}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("thumos_like")
    summary = thumos_like.make_thumos_like(out, **SMALL)
    return out, summary


def test_files_and_shapes(made):
    out, summary = made
    meta = json.loads((out / "meta.json").read_text())
    db = json.loads((out / "annotations.json").read_text())["database"]
    source = json.loads(ANNOTATIONS.read_text())["database"]
    assert summary["num_videos"] == {"train": 3, "test": 3}
    assert len(meta["classes"]) == 20 and meta["classes"][0] == "BaseballPitch"
    assert sorted(db) == sorted(meta["splits"]["train"] + meta["splits"]["test"])
    assert {db[v]["subset"] for v in meta["splits"]["train"]} == {"Validation"}
    assert {db[v]["subset"] for v in meta["splits"]["test"]} == {"Test"}
    total = 0
    for vid, video in db.items():
        feats = np.load(out / "features" / f"{vid}.npy")
        assert feats.dtype == np.float32 and feats.ndim == 2 and feats.shape[1] == 16
        # T windows of 16 frames every 4 frames cover the real duration at 30 fps
        n_frames = video["duration"] * 30.0
        assert (feats.shape[0] - 1) * 4 + 16 <= n_frames + 1e-6 < feats.shape[0] * 4 + 16
        assert video["duration"] == source[vid]["duration"] and video["fps"] == 30.0
        assert [a["segment"] for a in video["annotations"]] == [a["segment"] for a in source[vid]["annotations"]]
        total += feats.shape[0]
    assert summary["total_steps"] == total


def test_deterministic_for_a_seed(made, tmp_path):
    out, _ = made
    again = tmp_path / "again"
    other = tmp_path / "other"
    thumos_like.make_thumos_like(again, **SMALL)
    thumos_like.make_thumos_like(other, **{**SMALL, "seed": 8})
    assert (again / "annotations.json").read_bytes() == (out / "annotations.json").read_bytes()
    for path in sorted((out / "features").iterdir()):
        assert np.array_equal(np.load(path), np.load(again / "features" / path.name))
        assert not np.array_equal(np.load(path), np.load(other / "features" / path.name))


def test_segments_carry_their_class_direction(made):
    out, _ = made
    meta = json.loads((out / "meta.json").read_text())
    db = json.loads((out / "annotations.json").read_text())["database"]
    directions = thumos_like.class_directions(len(meta["classes"]), meta["input_dim"], meta["seed"])
    checked = 0
    for vid, video in db.items():
        feats = np.load(out / "features" / f"{vid}.npy")
        centres = (np.arange(len(feats)) * meta["stride"] + meta["window"] / 2) / meta["fps"]
        for label_id in {a["label_id"] for a in video["annotations"]}:
            inside = np.zeros(len(feats), dtype=bool)
            for a in video["annotations"]:
                if a["label_id"] == label_id:
                    inside |= (centres >= a["segment"][0]) & (centres <= a["segment"][1])
            if inside.sum() < 3 or (~inside).sum() < 3:
                continue
            projection = feats.astype(np.float64) @ directions[label_id]
            # signal 3 along a unit direction against noise 1 and drift 0.5: a clear gap in the means
            assert projection[inside].mean() - projection[~inside].mean() > 1.5, (vid, label_id)
            checked += 1
    assert checked >= 3


def test_signal_zero_has_no_class_content(tmp_path):
    thumos_like.make_thumos_like(tmp_path, **{**SMALL, "max_videos_per_split": 1, "signal": 0.0, "drift": 0.0})
    meta = json.loads((tmp_path / "meta.json").read_text())
    directions = thumos_like.class_directions(len(meta["classes"]), 16, meta["seed"])
    for vid in meta["splits"]["train"]:
        feats = np.load(tmp_path / "features" / f"{vid}.npy").astype(np.float64)
        assert abs(feats.mean()) < 0.1 and 0.9 < feats.std() < 1.1
        assert np.abs(feats @ directions.T).mean() < 1.0
