"""The training crop and the padded batch (tal_models.batch)."""

import numpy as np
import pytest
import torch

from tal_models.batch import Batch, collate, random_crop
from tal_models.timing import FeatureTiming


# --- random_crop -----------------------------------------------------------------------------
def _video(num_steps=100, channels=3):
    features = np.arange(num_steps * channels, dtype=np.float32).reshape(num_steps, channels)
    segments = np.array([[10.0, 20.0], [50.0, 54.0], [80.0, 99.0]])
    labels = np.array([0, 1, 2])
    return features, segments, labels


def test_random_crop_short_inputs_unchanged():
    features, segments, labels = _video(num_steps=32)
    out = random_crop(features, segments, labels, max_length=32, generator=torch.Generator().manual_seed(0))
    assert out[0] is features and out[1] is segments and out[2] is labels and out[3] == 0


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_random_crop_window_segments_and_offset(backend):
    features, segments, labels = _video()
    if backend == "torch":
        features, segments, labels = map(torch.as_tensor, (features, segments, labels))
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed) if backend == "torch" else np.random.default_rng(seed)
        f, s, lab, offset = random_crop(features, segments, labels, max_length=30, generator=gen)
        assert type(f) is type(features) and type(s) is type(segments)
        assert f.shape == (30, 3) and 0 <= offset <= 70
        np.testing.assert_array_equal(np.asarray(f), np.asarray(features)[offset : offset + 30])  # offset is the start
        s = np.asarray(s)
        assert len(s) >= 1 and len(s) == len(lab)  # every 30-step window can keep an action after a few tries
        assert (s >= 0).all() and (s <= 30).all() and (s[:, 1] > s[:, 0]).all()
        # kept segments are the originals clipped to the window, shifted by the offset
        for seg, label in zip(s, np.asarray(lab)):
            orig = np.asarray(segments)[np.asarray(labels) == label][0]
            np.testing.assert_allclose(seg, np.clip(orig, offset, offset + 30) - offset)


def test_random_crop_deterministic_and_timing_offset():
    features, segments, labels = _video()
    a = random_crop(features, segments, labels, 30, torch.Generator().manual_seed(3))
    b = random_crop(features, segments, labels, 30, torch.Generator().manual_seed(3))
    assert a[3] == b[3]
    np.testing.assert_array_equal(a[1], b[1])
    # a crop starting at step s: step i of the crop is step s + i of the video
    timing = FeatureTiming(fps=30, stride=4, window=16)
    cropped = FeatureTiming(fps=30, stride=4, window=16, offset=a[3] * timing.seconds_per_step)
    np.testing.assert_allclose(cropped.centers(30), timing.centers(100)[a[3] : a[3] + 30])


def test_random_crop_min_kept_fraction_and_no_actions():
    features, _, _ = _video()
    segments = np.array([[0.0, 100.0]])  # one long action: at most 30% of it fits a 30-step window
    f, s, lab, _ = random_crop(features, segments, np.array([1]), 30, np.random.default_rng(0), min_kept_fraction=0.5)
    assert f.shape == (30, 3) and s.shape == (0, 2) and lab.shape == (0,)
    _, s, _, _ = random_crop(features, segments, np.array([1]), 30, np.random.default_rng(0), min_kept_fraction=0.3)
    np.testing.assert_allclose(s, [[0.0, 30.0]])
    f, s, _, offset = random_crop(features, np.zeros((0, 2)), np.zeros((0,), np.int64), 30, np.random.default_rng(0))
    assert f.shape == (30, 3) and s.shape == (0, 2) and 0 <= offset <= 70


# --- collate ---------------------------------------------------------------------------------
def _sample(num_steps, video_id, channels=3, as_dict=True):
    features = torch.randn(num_steps, channels) + 5.0  # never zero, so padding is recognisable
    sample = {
        "features": features.numpy() if as_dict else features,
        "segments": np.array([[1.0, 2.0]]) if num_steps > 3 else np.zeros((0, 2)),
        "labels": np.array([1]) if num_steps > 3 else np.zeros((0,), np.int64),
        "video_id": video_id,
    }
    if as_dict:
        return sample

    class _Sample:  # attribute access, like a dataclass
        pass

    obj = _Sample()
    obj.__dict__.update(sample)
    return obj


def test_collate_pads_and_masks():
    samples = [_sample(5, "a"), _sample(11, "b", as_dict=False), _sample(2, "c")]
    batch = collate(samples, pad_to_multiple=8)
    assert batch.features.shape == (3, 3, 16) and batch.features.dtype == torch.float32
    assert batch.mask.shape == (3, 1, 16) and batch.mask.dtype == torch.bool
    assert batch.mask.sum(dim=(1, 2)).tolist() == [5, 11, 2] and batch.lengths().tolist() == [5, 11, 2]
    for i, n in enumerate([5, 11, 2]):
        assert batch.mask[i, 0, :n].all()
        torch.testing.assert_close(batch.features[i, :, :n], torch.as_tensor(_field(samples[i], "features")).T)
        assert (batch.features[i, :, n:] == 0).all()
    assert batch.video_ids == ["a", "b", "c"] and len(batch) == 3
    assert batch.segments[2].shape == (0, 2) and batch.labels[2].dtype == torch.int64
    assert batch.segments[0].dtype == torch.float32
    assert collate([_sample(16, "x")], pad_to_multiple=8).features.shape[-1] == 16
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved.features.device.type == "cpu"
    with pytest.raises(ValueError, match="pad_to_multiple"):
        collate(samples, pad_to_multiple=0)
    with pytest.raises(ValueError, match="one C"):
        collate([_sample(5, "a", channels=3), _sample(5, "b", channels=4)])


def _field(sample, name):
    return sample[name] if isinstance(sample, dict) else getattr(sample, name)
