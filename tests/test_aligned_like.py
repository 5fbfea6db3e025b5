"""The text-aligned THUMOS14-timed feature set of ``benchmarks/_aligned_like.py`` and its seen / unseen class splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import _aligned_like as aligned_like

REPO = Path(__file__).resolve().parents[1]
ANNOTATIONS = REPO.parent / "shared" / "data" / "thumos14" / "thumos14.json"
needs_annotations = pytest.mark.skipif(not ANNOTATIONS.exists(), reason=f"THUMOS14 annotations not found at {ANNOTATIONS}")

SMALL = {"annotations": ANNOTATIONS, "input_dim": 32, "max_videos_per_split": 4, "seed": 3}
CLASSES = [f"class{k}" for k in range(20)]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("aligned_like")
    return out, aligned_like.make_aligned_like(out, **SMALL)


def _class_steps(out: Path, meta: dict, db: dict) -> dict[int, np.ndarray]:
    """Features of the steps inside exactly one segment, by label id: ``{k: [n_k, E]}``."""
    found: dict[int, list[np.ndarray]] = {}
    for vid, video in db.items():
        feats = np.load(out / "features" / f"{vid}.npy").astype(np.float64)
        centres = (np.arange(len(feats)) * meta["stride"] + meta["window"] / 2) / video["fps"]
        hits = np.zeros((len(feats), len(meta["classes"])), dtype=bool)
        for a in video["annotations"]:
            hits[(centres >= a["segment"][0]) & (centres <= a["segment"][1]), a["label_id"]] = True
        single = hits.sum(axis=1) == 1
        for k in np.flatnonzero(hits[single].any(axis=0)):
            found.setdefault(int(k), []).append(feats[single & hits[:, k]])
    return {k: np.concatenate(v) for k, v in found.items()}


@needs_annotations
def test_layout_and_table(made):
    out, summary = made
    meta = json.loads((out / "meta.json").read_text())
    db = json.loads((out / "annotations.json").read_text())["database"]
    assert summary["num_videos"] == {"train": 4, "test": 4} and meta["profile"] == "aligned" and meta["input_dim"] == 32
    assert sorted(db) == sorted(meta["splits"]["train"] + meta["splits"]["test"])
    names, embeddings = aligned_like.load_text_table(out)
    assert names == meta["classes"] and len(names) == 20
    assert embeddings.dtype == np.float32 and embeddings.shape == (20, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    with np.load(out / aligned_like.TEXT_TABLE) as raw:  # pipelines.vlm's table keys
        assert sorted(raw.files) == ["embeddings", "names"]
    for vid in db:
        feats = np.load(out / "features" / f"{vid}.npy")
        assert feats.dtype == np.float32 and feats.shape[1] == 32 and np.isfinite(feats).all()


@needs_annotations
def test_deterministic_for_a_seed(made, tmp_path):
    out, _ = made
    again, other = tmp_path / "again", tmp_path / "other"
    aligned_like.make_aligned_like(again, **SMALL)
    aligned_like.make_aligned_like(other, **{**SMALL, "seed": 4})
    assert (again / "annotations.json").read_bytes() == (out / "annotations.json").read_bytes()
    assert np.array_equal(aligned_like.load_text_table(again)[1], aligned_like.load_text_table(out)[1])
    assert not np.array_equal(aligned_like.load_text_table(other)[1], aligned_like.load_text_table(out)[1])
    for path in sorted((out / "features").iterdir()):
        assert np.array_equal(np.load(path), np.load(again / "features" / path.name))
        assert not np.array_equal(np.load(path), np.load(other / "features" / path.name))


@needs_annotations
def test_class_mean_points_at_its_text_embedding(made):
    out, _ = made
    meta = json.loads((out / "meta.json").read_text())
    db = json.loads((out / "annotations.json").read_text())["database"]
    _, text = aligned_like.load_text_table(out)
    steps = _class_steps(out, meta, db)
    checked = 0
    for k, feats in steps.items():
        if len(feats) < 20:
            continue
        mean = feats.mean(axis=0)
        cosine = text @ mean / (np.linalg.norm(text, axis=1) * np.linalg.norm(mean))
        assert int(np.argmax(cosine)) == k, (k, cosine.round(2))
        # the modality gap keeps image and text apart: cos(p_k, t_k) = 1 / sqrt(1 + 0.5^2) ~ 0.89, less the noise and drift
        assert 0.5 < cosine[k] < 0.95, (k, cosine[k])
        checked += 1
    assert checked >= 3


def test_prototype_offsets_have_the_gap_norm():
    text = aligned_like.class_directions(6, 16, 0)
    offsets = aligned_like.prototype_offsets(text, 0.5, 0)
    np.testing.assert_allclose(np.linalg.norm(offsets, axis=1), 0.5, atol=1e-12)
    np.testing.assert_allclose((offsets * text).sum(axis=1), 0.0, atol=1e-12)
    assert not np.allclose(offsets, aligned_like.prototype_offsets(text, 0.5, 1))


@needs_annotations
def test_no_gap_no_noise_gives_the_text_embedding(tmp_path):
    aligned_like.make_aligned_like(tmp_path, **{**SMALL, "max_videos_per_split": 2, "proto_noise": 0.0, "noise": 0.0, "drift": 0.0})
    meta = json.loads((tmp_path / "meta.json").read_text())
    db = json.loads((tmp_path / "annotations.json").read_text())["database"]
    _, text = aligned_like.load_text_table(tmp_path)
    for k, feats in _class_steps(tmp_path, meta, db).items():
        np.testing.assert_allclose(feats, np.broadcast_to(3.0 * text[k], feats.shape), atol=1e-5)


@pytest.mark.parametrize(("fraction", "seen", "unseen"), [(0.25, 15, 5), (0.5, 10, 10)])
def test_class_splits_sizes_and_disjoint(fraction, seen, unseen):
    splits = aligned_like.class_splits(CLASSES, fraction)
    assert len(splits) == 10
    for s, u in splits:
        assert (len(s), len(u)) == (seen, unseen)
        assert not set(s) & set(u) and sorted(s + u) == sorted(CLASSES)
        assert s == [c for c in CLASSES if c in s] and u == [c for c in CLASSES if c in u]  # in class order
    assert len({tuple(u) for _, u in splits}) == 10  # 10 distinct splits
    assert aligned_like.class_splits(CLASSES, fraction) == splits  # fixed by the seed
    assert aligned_like.class_splits(CLASSES, fraction, seed=1) != splits


def test_class_splits_rejects_impossible_requests():
    with pytest.raises(ValueError, match="no seen or no unseen"):
        aligned_like.class_splits(CLASSES, 0.0)
    with pytest.raises(ValueError, match="distinct"):
        aligned_like.class_splits(CLASSES[:3], 1 / 3, n_splits=4)  # only 3 ways to pick 1 of 3


def test_text_rank_puts_every_class_in_one_subspace():
    full = aligned_like.text_embeddings(20, 32, 0)
    low = aligned_like.text_embeddings(20, 32, 0, rank=6)
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1.0, atol=1e-12)
    assert np.linalg.matrix_rank(low) == 6 and np.linalg.matrix_rank(full) == 20
    assert np.array_equal(full, aligned_like.class_directions(20, 32, 0))
    with pytest.raises(ValueError, match="text_rank"):
        aligned_like.text_embeddings(20, 32, 0, rank=33)
