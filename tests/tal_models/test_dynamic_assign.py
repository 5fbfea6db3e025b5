"""The SimOTA-style dynamic assigner: candidates, cost, dynamic k, conflicts, duplicates, and a training step with it."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import HostReads

from tal_models.batch import collate
from tal_models.detectors import build_detector
from tal_models.detectors.one_stage import LossConfig
from tal_models.points import make_points
from tal_models.presets import make_config
from tal_models.targets import DynamicAssigner, assign_targets, segments_to_offsets

INF = math.inf
K = 4


def one_level(length: int, stride: int = 1):
    return make_points([length], [stride], [(0.0, INF)])


def perfect_offsets(points, segment) -> torch.Tensor:
    """``[1, P, 2]`` offsets that predict exactly ``segment`` from every point."""
    seg = torch.tensor(segment, dtype=torch.float32).expand(len(points), 2)
    return segments_to_offsets(points, seg)[None]


def confident(label: int, P: int, value: float = 6.0) -> torch.Tensor:
    logits = torch.full((1, P, K), -value)
    logits[..., label] = value
    return logits


def test_without_predictions_it_is_centre_sampling():
    points = one_level(40)
    segs, labels = [torch.tensor([[5.0, 30.0]])], [torch.tensor([2])]
    dyn = DynamicAssigner(K, center_radius=2.5)(points, segs, labels)
    ref = assign_targets(points, segs, labels, K, center_sample=True, center_radius=2.5)
    assert torch.equal(dyn.cls_targets, ref.cls_targets) and torch.equal(dyn.reg_targets, ref.reg_targets)


def test_good_predictions_take_every_candidate_and_the_right_targets():
    points = one_level(40)
    segment = [10.0, 30.0]  # centre 20, radius 2.5 steps: candidates 18..22 (strictly inside 17.5..22.5)
    targets = DynamicAssigner(K, center_radius=2.5)(
        points, [torch.tensor([segment])], [torch.tensor([1])], confident(1, 40), perfect_offsets(points, segment)
    )
    positive = targets.positive()[0]
    assert positive.nonzero().flatten().tolist() == [18, 19, 20, 21, 22]  # IoU 1 each: k = 5 = every candidate
    assert torch.equal(targets.cls_targets[0, positive], torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 5))
    pos = points.position[positive].float()
    assert torch.allclose(targets.reg_targets[0, positive], torch.stack((pos - 10.0, 30.0 - pos), dim=1))


def test_poor_predictions_keep_the_cheapest_min_k_points():
    points = one_level(40)
    segment = [10.0, 30.0]
    offsets = torch.full((1, 40, 2), 0.1)  # tiny segments: IoU ~0.01, so sum of top IoUs < 1 -> k = min_k
    offsets[0, 21] = torch.tensor([11.0, 9.0])  # point 21 predicts the segment exactly
    targets = DynamicAssigner(K, center_radius=2.5)(points, [torch.tensor([segment])], [torch.tensor([0])], confident(0, 40), offsets)
    assert targets.positive()[0].nonzero().flatten().tolist() == [21]
    two = DynamicAssigner(K, center_radius=2.5, min_k=2)(points, [torch.tensor([segment])], [torch.tensor([0])], confident(0, 40), offsets)
    assert two.positive()[0].sum() == 2 and bool(two.positive()[0, 21])


def test_k_grows_with_the_predicted_iou():
    points = one_level(80)
    segment = [10.0, 70.0]  # candidates: centre 40 -/+ 5 -> 36..44 (9 points)
    offsets = perfect_offsets(points, segment)
    half = segments_to_offsets(points, torch.tensor([[25.0, 55.0]]).expand(80, 2))[None]  # IoU 0.5 from every point
    labels = [torch.tensor([3])]
    full = DynamicAssigner(K, center_radius=5.0)(points, [torch.tensor([segment])], labels, confident(3, 80), offsets)
    partial = DynamicAssigner(K, center_radius=5.0)(points, [torch.tensor([segment])], labels, confident(3, 80), half)
    assert int(full.positive().sum()) == 9  # sum of the top-10 IoUs = 9
    assert int(partial.positive().sum()) == 4  # floor(9 * 0.5)


def test_a_point_claimed_by_two_segments_keeps_the_cheaper():
    points = one_level(40)
    segments = torch.tensor([[10.0, 30.0], [15.0, 25.0]])  # both centred on 20
    offsets = perfect_offsets(points, [15.0, 25.0])  # every point predicts the second segment
    logits = confident(1, 40)  # and class 1, the second segment's
    targets = DynamicAssigner(K, center_radius=2.5)(points, [segments], [torch.tensor([0, 1])], logits, offsets)
    positive = targets.positive()[0]
    assert positive.any()
    assert torch.all(targets.cls_targets[0, positive, 1] == 1) and torch.all(targets.cls_targets[0, positive, 0] == 0)
    pos = points.position[positive].float()
    assert torch.allclose(targets.reg_targets[0, positive], torch.stack((pos - 15.0, 25.0 - pos), dim=1))


def test_duplicate_segments_share_their_points_multi_hot():
    points = one_level(40)
    segments = torch.tensor([[10.0, 30.0], [10.0, 30.0]])  # THUMOS14's CliffDiving + Diving
    targets = DynamicAssigner(K, center_radius=2.5)(
        points, [segments], [torch.tensor([0, 2])], confident(0, 40), perfect_offsets(points, [10.0, 30.0])
    )
    positive = targets.positive()[0]
    assert positive.any()
    assert torch.equal(targets.cls_targets[0, positive][:, [0, 2]], torch.ones(int(positive.sum()), 2))


def test_empty_ground_truth_is_all_background_and_batches_stack():
    points = one_level(16)
    targets = DynamicAssigner(K)(
        points, [torch.zeros(0, 2), torch.tensor([[2.0, 12.0]])], [torch.zeros(0, dtype=torch.long), torch.tensor([1])],
        torch.zeros(2, 16, K), torch.ones(2, 16, 2),
    )  # fmt: skip
    assert targets.cls_targets.shape == (2, 16, K) and targets.reg_targets.shape == (2, 16, 2)
    assert not targets.positive()[0].any() and targets.positive()[1].any()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="center_radius"):
        DynamicAssigner(K, center_radius=0.0)
    with pytest.raises(ValueError, match="min_k"):
        DynamicAssigner(K, min_k=0)
    with pytest.raises(ValueError, match="assigner"):
        LossConfig(assigner="simota")


@pytest.mark.parametrize("arch", ["actionformer", "tridet"])
def test_a_detector_trains_with_it_without_host_reads(arch):
    config = make_config(arch, num_classes=3, input_dim=8, max_seq_len=64, embed_dim=16, levels=3)
    config = replace(config, loss=replace(config.loss, assigner="dynamic", center_radius=2.5))
    model = build_detector(config).train()
    assert isinstance(model.assigner, DynamicAssigner)
    samples = [
        {
            "features": np.random.default_rng(i).standard_normal((n, 8)).astype(np.float32),
            "segments": [[3.0, 20.0]],
            "labels": [i],
            "video_id": f"v{i}",
        }
        for i, n in enumerate((50, 37))
    ]
    batch = collate(samples, model.pad_multiple, num_classes=3)
    with HostReads() as reads:
        losses = model(batch)
        losses["final_loss"].backward()
    assert reads.count == 0
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.cls_head.parameters())
