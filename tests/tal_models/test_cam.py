"""tal_models.cam: top-k MIL pooling, CAS runs, outer-inner contrast and the WTAL training sample, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import one_thread, seed_zero  # noqa: F401  (autouse fixtures)

from tal_models.cam import cam_segments, outer_inner_contrast, sample_video, topk_mil_pool


# --- topk_mil_pool ----------------------------------------------------------------------------
def test_topk_mil_pool_per_video_k_and_padding_never_enters():
    cas = torch.tensor(
        [
            [[1.0, 5.0, 3.0, 0.0, 2.0, 4.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -8.0]],  # 8 valid: k = 8 // 4 = 2
            [[2.0, 7.0, 1.0, 0.0, 3.0, 0.0, 0.0, 0.0], [-1.0, -2.0, -3.0, -4.0, -5.0, 0.0, 0.0, 0.0]],  # 5 valid: k = 1
            [[0.0] * 8, [0.0] * 8],  # no valid step
        ]
    )
    lengths = torch.tensor([8, 5, 0])
    mask = (torch.arange(8) < lengths[:, None])[:, None, :]  # [3, 1, 8]
    cas[1, :, 5:] = math.nan  # padding, whatever it holds
    cas[2] = math.inf
    pooled = topk_mil_pool(cas, mask, ratio=4)
    expected = torch.tensor([[(5.0 + 4.0) / 2, (0.0 + 0.0) / 2], [7.0, -1.0], [0.0, 0.0]])
    torch.testing.assert_close(pooled, expected)
    assert pooled.dtype == torch.float32 and pooled.shape == (3, 2)
    # a short video's k is at least 1; ratio 1 is the mean of all valid steps
    torch.testing.assert_close(topk_mil_pool(cas[:2], mask[:2], ratio=100)[:, 0], torch.tensor([5.0, 7.0]))
    torch.testing.assert_close(topk_mil_pool(cas[1:2], mask[1:2], ratio=1), torch.tensor([[13.0 / 5, -3.0]]))


def test_topk_mil_pool_gradient_reaches_only_the_pooled_steps():
    cas = torch.tensor([[[0.0, 3.0, 1.0, 2.0, 9.0]]], requires_grad=True)
    mask = torch.tensor([[[True, True, True, True, False]]])
    topk_mil_pool(cas, mask, ratio=2).sum().backward()  # 4 valid steps: k = 2, steps 1 and 3
    assert cas.grad.tolist() == [[[0.0, 0.5, 0.0, 0.5, 0.0]]]
    with pytest.raises(ValueError, match="ratio"):
        topk_mil_pool(cas, mask, ratio=0)


# --- cam_segments -----------------------------------------------------------------------------
def test_cam_segments_runs_at_every_threshold_without_duplicates():
    cam = np.array([0.1, 0.5, 0.6, 0.2, 0.7, 0.7, 0.1, 0.9])
    # >= 0.5: [1, 3), [4, 6), [7, 8); >= 0.6: [2, 3) new, [4, 6) and [7, 8) again
    assert cam_segments(cam, [0.5, 0.6]) == [(1, 3), (4, 6), (7, 8), (2, 3)]
    assert cam_segments(torch.from_numpy(cam).float(), (0.5, 0.6)) == [(1, 3), (4, 6), (7, 8), (2, 3)]
    assert cam_segments(cam, [0.0]) == [(0, 8)]  # a run may touch both ends
    assert cam_segments(cam, [0.95]) == []
    assert cam_segments(np.zeros(0), [0.1]) == [] and cam_segments(cam, []) == []
    with pytest.raises(ValueError, match=r"\[T\]"):
        cam_segments(np.zeros((2, 3)), [0.1])


# --- outer_inner_contrast ---------------------------------------------------------------------
def test_outer_inner_contrast_by_hand():
    cam = np.array([0.0, 0.0, 0.2, 1.0, 1.0, 1.0, 1.0, 0.4, 0.0, 0.0])
    # [3, 7): 4 steps, inflated by 1 on each side -> outer steps 2 and 7, mean 0.3
    assert outer_inner_contrast(cam, 3, 7) == pytest.approx(1.0 - 0.3)
    # inflation 0.5 -> 2 steps each side: outer steps 1, 2, 7, 8 (mean 0.15)
    assert outer_inner_contrast(cam, 3, 7, inflation=0.5) == pytest.approx(1.0 - 0.15)
    # at the video's start: [0, 2) inflated by 0.5 rounds outwards to one step, only the right one exists
    edge = np.array([1.0, 0.8, 0.5, 0.0, 0.0])
    assert outer_inner_contrast(edge, 0, 2) == pytest.approx(0.9 - 0.5)
    # the whole video: no outer region, its mean counts as 0
    assert outer_inner_contrast(edge, 0, 5) == pytest.approx(edge.mean())
    assert outer_inner_contrast(torch.tensor(cam), 3, 7) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="start"):
        outer_inner_contrast(cam, 5, 5)
    with pytest.raises(ValueError, match="inflation"):
        outer_inner_contrast(cam, 3, 7, inflation=-0.1)


# --- sample_video -----------------------------------------------------------------------------
def test_sample_video_bins_centres_and_segment_scaling():
    feats = np.arange(10, dtype=np.float32)[:, None].repeat(3, axis=1)  # step i holds i
    segments, labels = np.array([[2.5, 5.0], [0.0, 10.0]]), np.array([1, 0])
    # 10 steps into 4 bins of 2.5: bins [0, 2), [2, 5), [5, 7), [7, 10); centres floor((i + 0.5) * 2.5)
    out, segs, labs, scale = sample_video(feats, segments, labels, 4)
    assert out.shape == (4, 3) and out[:, 0].tolist() == [1.0, 3.0, 6.0, 8.0]
    assert scale == pytest.approx(0.4)
    np.testing.assert_allclose(segs, [[1.0, 2.0], [0.0, 4.0]])
    assert labs.tolist() == [1, 0]
    again = sample_video(feats, segments, labels, 4)[0]
    np.testing.assert_array_equal(again, out)  # deterministic without a generator


def test_sample_video_random_step_in_each_bin():
    feats = torch.arange(100, dtype=torch.float32)[:, None]
    bins_lo, bins_hi = np.floor(np.arange(7) * 100 / 7), np.floor(np.arange(1, 8) * 100 / 7)
    seen = set()
    for seed in range(5):
        for gen in (torch.Generator().manual_seed(seed), np.random.default_rng(seed)):
            out, segs, _, scale = sample_video(feats, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 7, gen)
            assert isinstance(out, torch.Tensor) and out.shape == (7, 1) and segs.shape == (0, 2)
            idx = out[:, 0].numpy()
            assert ((idx >= bins_lo) & (idx < bins_hi)).all(), idx
            seen.add(tuple(idx.tolist()))
        a = sample_video(feats, torch.zeros(0, 2), torch.zeros(0), 7, torch.Generator().manual_seed(seed))[0]
        b = sample_video(feats, torch.zeros(0, 2), torch.zeros(0), 7, torch.Generator().manual_seed(seed))[0]
        torch.testing.assert_close(a, b)  # one seed, one sample
    assert len(seen) > 3  # the draws differ between seeds


def test_sample_video_short_video_unchanged():
    feats, segs, labs = np.ones((5, 2), np.float32), np.array([[1.0, 3.0]]), np.array([2])
    out = sample_video(feats, segs, labs, 5, np.random.default_rng(0))
    assert out[0] is feats and out[1] is segs and out[2] is labs and out[3] == 1.0
    with pytest.raises(ValueError, match="max_length"):
        sample_video(feats, segs, labs, 0)
    with pytest.raises(ValueError, match="segments"):
        sample_video(feats, segs[0], labs, 3)
