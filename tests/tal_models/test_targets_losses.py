"""Points, label assignment, losses and decoding: round trips, hand-computed cases, corner cases.

Hand cases use small pyramids whose numbers can be checked on paper; "naive" references are
written element by element from the papers' formulas, in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from tal_models.decode import decode, decode_single_video
from tal_models.losses import LossNormalizer, detection_losses, diou_loss_1d, giou_loss_1d, sigmoid_focal_loss
from tal_models.points import DEFAULT_REGRESSION_RANGES, DEFAULT_STRIDES, Points, make_points
from tal_models.postprocess import NMSConfig
from tal_models.structures import Segments, Unit, matched_tiou
from tal_models.targets import (
    EQUAL_LENGTH_TOLERANCE,
    PointTargets,
    assign_targets,
    assign_targets_single_video,
    offsets_to_segments,
    segments_to_offsets,
)
from tal_models.timing import FeatureTiming

INF = math.inf


def one_level(length: int, stride: int = 1, reg_range=(0.0, INF)) -> Points:
    return make_points([length], [stride], [reg_range])


def pyramid(t0: int, strides=(1, 2, 4), ranges=((0, 4), (4, 8), (8, INF))) -> Points:
    return make_points([t0 // s for s in strides], list(strides), list(ranges))


def positives_of(points: Points, targets: PointTargets, level: int | None = None) -> list[float]:
    pos = targets.positive()
    if level is not None:
        pos = pos & (points.level == level)
    return points.position[pos].tolist()


# --- points ----------------------------------------------------------------------------------
def test_make_points_fields_and_shapes():
    points = make_points([8, 4, 2], [1, 2, 4], [(0, 4), (4, 8), (8, INF)])
    assert len(points) == 14 and points.level_lengths == (8, 4, 2) and points.num_levels == 3
    assert points.position.shape == points.stride.shape == points.level.shape == (14,)
    assert points.reg_range.shape == (14, 2)
    assert points.position.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] + [0, 2, 4, 6] + [0, 4]  # i * stride_l
    assert points.stride.tolist() == [1] * 8 + [2] * 4 + [4] * 2
    assert points.level.tolist() == [0] * 8 + [1] * 4 + [2] * 2
    assert points.reg_range[-1].tolist() == [8, INF] and points.reg_range[8].tolist() == [4, 8]
    assert [s for s in points.level_slices()] == [slice(0, 8), slice(8, 12), slice(12, 14)]
    default = make_points([64 // s for s in DEFAULT_STRIDES], DEFAULT_STRIDES, DEFAULT_REGRESSION_RANGES)
    assert len(default) == 64 + 32 + 16 + 8 + 4 + 2


def test_make_points_refuses_inconsistent_levels():
    with pytest.raises(ValueError, match="one length, stride and regression range per level"):
        make_points([8, 4], [1, 2], [(0, 4)])
    with pytest.raises(ValueError, match="stride"):
        make_points([8], [0], [(0, 4)])
    with pytest.raises(ValueError, match="regression range"):
        make_points([8], [1], [(4, 0)])
    with pytest.raises(ValueError, match="sum to"):
        Points(torch.zeros(3), torch.ones(3), torch.zeros(3, dtype=torch.long), torch.zeros(3, 2), (2,))


# --- the regression encoding -----------------------------------------------------------------
def test_offsets_segments_round_trip():
    points = pyramid(32)
    gen = torch.Generator().manual_seed(0)
    # float64: exact up to the rounding of position - start
    segs = torch.rand(3, len(points), 2, generator=gen, dtype=torch.float64) * 40
    segs = segs.sort(dim=-1).values
    back = offsets_to_segments(points, segments_to_offsets(points, segs))
    torch.testing.assert_close(back, segs, rtol=0, atol=1e-12)
    # ends on a 1/8 grid and power-of-two strides: bit exact in float32
    grid = (torch.randint(0, 320, (len(points), 2), generator=gen).float() / 8).sort(dim=-1).values
    assert torch.equal(offsets_to_segments(points, segments_to_offsets(points, grid)), grid)


def test_targets_round_trip_to_ground_truth_for_every_positive():
    points = make_points([64 // s for s in DEFAULT_STRIDES], DEFAULT_STRIDES, DEFAULT_REGRESSION_RANGES)
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, 400, (12,), generator=gen).float() / 8
    lengths = torch.randint(1, 240, (12,), generator=gen).float() / 8
    gt = torch.stack((starts, (starts + lengths).clamp(max=63.0)), dim=1)
    labels = torch.randint(0, 5, (12,), generator=gen)
    targets = assign_targets_single_video(points, gt, labels, num_classes=5)
    pos = targets.positive()
    assert int(pos.sum()) > 10
    decoded = offsets_to_segments(points, targets.reg_targets)[pos]  # [#pos, 2]
    matches = (decoded[:, None, :] == gt[None, :, :]).all(dim=-1)  # [#pos, N]: bit-exact rows
    assert bool(matches.any(dim=1).all())
    # the class target includes the label of the segment regressed
    for row, m in zip(targets.cls_targets[pos], matches):
        assert any(row[labels[j]] == 1 for j in m.nonzero().flatten().tolist())


# --- label assignment, by hand ---------------------------------------------------------------
def test_point_inside_two_segments_takes_the_shorter():
    points = one_level(12)
    gt = torch.tensor([[0.0, 10.0], [3.0, 7.0]])
    t = assign_targets_single_video(points, gt, [0, 1], num_classes=3, center_sample=False)
    assert t.cls_targets.shape == (12, 3) and t.reg_targets.shape == (12, 2)
    assert t.cls_targets[5].tolist() == [0, 1, 0]  # inside both: the shorter [3, 7]
    assert t.reg_targets[5].tolist() == [2, 2]
    assert t.cls_targets[2].tolist() == [1, 0, 0]  # inside [0, 10] only
    assert t.reg_targets[2].tolist() == [2, 8]
    assert t.cls_targets[3].tolist() == [1, 0, 0]  # on the boundary of [3, 7]: not inside it (strict)
    # a point on the boundary or outside every segment is background, regression target (0, 0)
    for p in (0, 10, 11):
        assert t.cls_targets[p].sum() == 0 and t.reg_targets[p].tolist() == [0, 0]
    assert positives_of(points, t) == list(range(1, 10))


def test_segments_of_equal_length_share_their_point():
    points = one_level(12)
    # THUMOS14: CliffDiving instances are also annotated as Diving with the same boundaries
    t = assign_targets_single_video(points, torch.tensor([[2.0, 8.0], [2.0, 8.0]]), [0, 2], num_classes=3, center_sample=False)
    assert t.cls_targets[5].tolist() == [1, 0, 1] and t.reg_targets[5].tolist() == [3, 3]
    # beyond the tolerance only the shorter one counts
    gt = torch.tensor([[2.0, 8.0], [2.0, 8.0 + 10 * EQUAL_LENGTH_TOLERANCE]])
    t = assign_targets_single_video(points, gt, [0, 2], num_classes=3, center_sample=False)
    assert t.cls_targets[5].tolist() == [1, 0, 0]


def test_center_sampling_radius_in_strides_of_the_level():
    points = make_points([24, 12], [1, 2], [(0, INF), (0, INF)])
    gt = torch.tensor([[0.0, 20.0]])  # centre 10
    t = assign_targets_single_video(points, gt, [0], num_classes=1, center_radius=1.5)
    assert positives_of(points, t, level=0) == [9, 10, 11]  # |p - 10| < 1.5
    assert positives_of(points, t, level=1) == [8, 10, 12]  # |p - 10| < 3
    assert t.reg_targets[9].tolist() == [9, 11]  # stride 1
    assert t.reg_targets[24 + 4].tolist() == [4, 6]  # point 8 of stride 2: (8, 12) / 2
    t = assign_targets_single_video(points, gt, [0], num_classes=1, center_sample=False)
    assert positives_of(points, t, level=0) == list(range(1, 20))


def test_center_region_is_clipped_to_the_segment():
    points = make_points([4], [4], [(0, INF)])  # points 0, 4, 8, 12
    # centre 4.5, radius 1.5 * 4 = 6: unclipped (-1.5, 10.5) would take 0, 4 and 8
    t = assign_targets_single_video(points, torch.tensor([[3.0, 6.0]]), [0], num_classes=1)
    assert positives_of(points, t) == [4]
    assert t.reg_targets[1].tolist() == [0.25, 0.5]  # (4 - 3, 6 - 4) / 4


def test_regression_ranges_route_segments_to_levels():
    points = pyramid(32)  # strides 1, 2, 4; ranges (0, 4), (4, 8), (8, inf)
    gt = torch.tensor([[0.0, 30.0], [10.0, 13.0]])
    t = assign_targets_single_video(points, gt, [0, 1], num_classes=2, center_sample=False)
    long_pos = t.cls_targets[:, 0] > 0
    short_pos = t.cls_targets[:, 1] > 0
    assert set(points.level[long_pos].tolist()) == {2}  # max distance >= 15: the coarsest level
    assert points.position[long_pos].tolist() == [4, 8, 12, 16, 20, 24, 28]
    assert set(points.level[short_pos].tolist()) == {0}  # max distance 2
    assert points.position[short_pos].tolist() == [11, 12]
    # both bounds are inclusive: a distance of exactly 4 belongs to levels 0 and 1
    t = assign_targets_single_video(points, torch.tensor([[8.0, 16.0]]), [0], num_classes=1, center_sample=False)
    at_12 = t.positive() & (points.position == 12)
    assert points.level[at_12].tolist() == [0, 1]


def test_empty_ground_truth_is_all_background():
    points = pyramid(32)
    for empty in (torch.zeros(0, 2), np.zeros((0, 2)), Segments(np.zeros((0, 2)), Unit.STEPS), torch.zeros(0)):
        t = assign_targets_single_video(points, empty, torch.zeros(0, dtype=torch.long), num_classes=4)
        assert t.cls_targets.shape == (len(points), 4) and t.reg_targets.shape == (len(points), 2)
        assert not bool(t.positive().any())
        assert bool(torch.isfinite(t.reg_targets).all()) and bool((t.reg_targets == 0).all())


def test_batch_assignment_stacks_and_checks_units_and_labels():
    points = pyramid(32)
    segs = [torch.tensor([[2.0, 9.0]]), torch.zeros(0, 2), Segments(torch.tensor([[1.0, 3.0]]), Unit.STEPS)]
    t = assign_targets(points, segs, [[1], [], [0]], num_classes=2)
    assert t.cls_targets.shape == (3, len(points), 2) and t.reg_targets.shape == (3, len(points), 2)
    assert t.positive().sum(dim=1).tolist()[1] == 0 and all(n > 0 for n in t.positive().sum(dim=1).tolist()[::2])
    single = assign_targets_single_video(points, segs[0], [1], num_classes=2)
    assert torch.equal(t.cls_targets[0], single.cls_targets) and torch.equal(t.reg_targets[0], single.reg_targets)
    with pytest.raises(ValueError, match="input steps"):
        assign_targets_single_video(points, Segments([[1.0, 2.0]], Unit.SECONDS), [0], num_classes=2)
    with pytest.raises(ValueError, match="2 segment sets but 1"):
        assign_targets(points, segs[:2], [[1]], num_classes=2)


# --- focal loss ------------------------------------------------------------------------------
def naive_focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    out = torch.empty_like(logits, dtype=torch.float64)
    for i, (x, t) in enumerate(zip(logits.double().flatten().tolist(), targets.double().flatten().tolist())):
        p = 1 / (1 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        a_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else 1.0
        out.view(-1)[i] = a_t * (1 - p_t) ** gamma * ce
    return out


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 0.0), (-1, 1.5)])
def test_focal_loss_equals_the_naive_formula_and_torchvision(alpha, gamma):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 3
    targets = (torch.rand(6, 5, generator=gen, dtype=torch.float64) > 0.7).double()
    targets[0] = 0.3  # soft targets (label smoothing)
    naive = naive_focal(logits, targets, alpha, gamma)
    ours = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    torch.testing.assert_close(ours, naive, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma), naive.sum(), rtol=1e-12, atol=1e-12)  # default: sum
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="mean"), naive.mean(), rtol=1e-12, atol=1e-12)
    tv = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum")
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma), tv, rtol=0, atol=0)


def test_focal_loss_upcasts_half_precision():
    logits = torch.tensor([[-8.0, 0.5, 9.0]], dtype=torch.bfloat16)
    targets = torch.tensor([[0.0, 1.0, 1.0]])
    loss = sigmoid_focal_loss(logits, targets, reduction="none")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), naive_focal(logits.float(), targets, 0.25, 2.0), rtol=1e-6, atol=1e-9)


# --- DIoU / GIoU -----------------------------------------------------------------------------
def naive_iou_losses(pred, target) -> tuple[float, float]:
    """(GIoU loss, DIoU loss) from the segments' end points, for offsets (l, r) around point 0."""
    (a0, a1), (b0, b1) = (-pred[0], pred[1]), (-target[0], target[1])
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = (a1 - a0) + (b1 - b0) - inter
    enclosing = max(a1, b1) - min(a0, b0)
    iou = inter / union
    centre = (a0 + a1) / 2 - (b0 + b1) / 2
    return 1 - iou + (enclosing - union) / enclosing, 1 - iou + (centre / enclosing) ** 2


def test_iou_losses_hand_values():
    t = torch.tensor
    perfect = t([[2.0, 3.0], [0.5, 0.0]])
    assert giou_loss_1d(perfect, perfect, reduction="none").tolist() == [0, 0]
    assert diou_loss_1d(perfect, perfect, reduction="none").tolist() == [0, 0]
    # [-1, 1] vs [-1, 3]: IoU 1/2; both contain the point, so GIoU = 1 - IoU; centres 0 and 1, enclosing 4
    pred, target = t([[1.0, 1.0]]), t([[1.0, 3.0]])
    assert giou_loss_1d(pred, target).item() == 0.5
    assert diou_loss_1d(pred, target).item() == 0.5 + (1 / 4) ** 2
    # disjoint: [2, 3] vs [-1, 0]: gap 2, union 2, enclosing 4, centres 3 apart
    pred, target = t([[-2.0, 3.0]]), t([[1.0, 0.0]])
    assert giou_loss_1d(pred, target).item() == 1.5
    assert diou_loss_1d(pred, target).item() == 1 + (3 / 4) ** 2
    # touching segments: IoU 0, no gap: GIoU exactly 1, DIoU above 1
    pred, target = t([[0.0, 2.0]]), t([[3.0, 0.0]])
    assert giou_loss_1d(pred, target).item() == 1.0 and diou_loss_1d(pred, target).item() > 1.0


def test_iou_losses_match_the_end_point_formulas_and_are_symmetric():
    gen = torch.Generator().manual_seed(3)
    pred = torch.rand(200, 2, generator=gen, dtype=torch.float64) * 4 - 1  # some negative: segments that miss the point
    target = torch.rand(200, 2, generator=gen, dtype=torch.float64) * 4
    pred[:, 1] = torch.maximum(pred[:, 1], -pred[:, 0] + 0.01)  # l + r > 0: proper segments
    naive = torch.tensor([naive_iou_losses(p, g) for p, g in zip(pred.tolist(), target.tolist())], dtype=torch.float64)
    torch.testing.assert_close(giou_loss_1d(pred, target, reduction="none"), naive[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diou_loss_1d(pred, target, reduction="none"), naive[:, 1], rtol=1e-12, atol=1e-12)
    for loss in (giou_loss_1d, diou_loss_1d):
        torch.testing.assert_close(loss(pred, target, reduction="none"), loss(target, pred, reduction="none"))  # swap roles
        mirror = loss(pred.flip(-1), target.flip(-1), reduction="none")  # time reversed
        torch.testing.assert_close(mirror, loss(pred, target, reduction="none"))
    # non-negative offsets (ActionFormer's domain): GIoU is exactly 1 - IoU
    pos_pred = pred.abs()
    inter = torch.minimum(pos_pred, target).sum(-1)
    iou = inter / (pos_pred.sum(-1) + target.sum(-1) - inter)
    assert torch.equal(giou_loss_1d(pos_pred, target, reduction="none"), 1 - iou)


def test_iou_loss_reductions():
    pred, target = torch.tensor([[1.0, 1.0], [1.0, 3.0]]), torch.tensor([[1.0, 3.0], [1.0, 3.0]])
    none = diou_loss_1d(pred, target, reduction="none")
    assert none.shape == (2,)
    assert diou_loss_1d(pred, target).item() == none.sum().item()  # default: sum
    assert diou_loss_1d(pred, target, reduction="mean").item() == none.mean().item()
    empty = torch.zeros(0, 2, requires_grad=True)
    for reduction in ("sum", "mean"):
        value = giou_loss_1d(empty, torch.zeros(0, 2), reduction=reduction)
        assert value.item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        diou_loss_1d(pred, target, reduction="max")


# --- loss normalizer and the detection loss --------------------------------------------------
def test_loss_normalizer_running_average():
    norm = LossNormalizer()
    assert norm.value == 100.0
    assert norm.update(10) == pytest.approx(91.0)  # 0.9 * 100 + 0.1 * 10
    assert norm.update(torch.tensor(0)) == pytest.approx(0.9 * 91 + 0.1 * 1)  # no positive counts as one
    assert norm.value == pytest.approx(82.0)
    other = LossNormalizer(init=5.0)
    other.load_state_dict(norm.state_dict())
    assert other.value == norm.value
    with pytest.raises(ValueError, match="momentum"):
        LossNormalizer(momentum=1.0)


def _batch(points: Points, gts, labels, k: int, seed: int = 0):
    t = assign_targets(points, gts, labels, num_classes=k)
    gen = torch.Generator().manual_seed(seed)
    b, p = len(gts), len(points)
    cls_logits = torch.randn(b, p, k, generator=gen, requires_grad=True)
    reg_offsets = (torch.rand(b, p, 2, generator=gen) * 3 + 0.1).requires_grad_(True)
    return t, cls_logits, reg_offsets


def test_detection_losses_by_hand():
    points, k = pyramid(32), 3
    t, cls_logits, reg_offsets = _batch(points, [torch.tensor([[2.0, 9.0], [20.0, 31.0]]), torch.tensor([[4.0, 6.0]])], [[0, 2], [1]], k)
    valid = torch.ones(2, len(points), dtype=torch.bool)
    valid[1, 20:32] = False  # padding in the second video
    norm = LossNormalizer(init=100.0)
    losses = detection_losses(cls_logits, reg_offsets, t.cls_targets, t.reg_targets, valid, norm, loss_weight=2.0)
    assert set(losses) == {"cls_loss", "reg_loss", "final_loss"}
    pos = t.positive() & valid
    expected_norm = 0.9 * 100 + 0.1 * int(pos.sum())
    assert norm.value == pytest.approx(expected_norm)
    cls = naive_focal(cls_logits.detach()[valid], t.cls_targets[valid], 0.25, 2.0).sum() / expected_norm
    reg = diou_loss_1d(reg_offsets.detach()[pos], t.reg_targets[pos]) / expected_norm
    torch.testing.assert_close(losses["cls_loss"].double(), cls, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["reg_loss"], reg)
    torch.testing.assert_close(losses["final_loss"], losses["cls_loss"] + 2.0 * losses["reg_loss"])
    # padded points take no part: their logits get no gradient
    losses["final_loss"].backward()
    assert bool((cls_logits.grad[1, 20:32] == 0).all()) and bool((cls_logits.grad[0] != 0).any())
    # giou and label smoothing
    norm = LossNormalizer(init=100.0)
    smoothed = detection_losses(cls_logits, reg_offsets, t.cls_targets, t.reg_targets, valid, norm, label_smoothing=0.1, reg_loss="giou")
    targets = t.cls_targets[valid] * 0.9 + 0.1 / (k + 1)
    cls = naive_focal(cls_logits.detach()[valid], targets, 0.25, 2.0).sum() / expected_norm
    torch.testing.assert_close(smoothed["cls_loss"].double(), cls, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(smoothed["reg_loss"], giou_loss_1d(reg_offsets.detach()[pos], t.reg_targets[pos]) / expected_norm)
    with pytest.raises(ValueError, match="reg_loss"):
        detection_losses(cls_logits, reg_offsets, t.cls_targets, t.reg_targets, valid, norm, reg_loss="iou")


def test_detection_losses_without_any_positive_are_finite():
    points = pyramid(32)
    t, cls_logits, reg_offsets = _batch(points, [torch.zeros(0, 2), torch.zeros(0, 2)], [[], []], 4)
    norm = LossNormalizer()
    losses = detection_losses(cls_logits, reg_offsets, t.cls_targets, t.reg_targets, torch.ones(2, len(points), dtype=torch.bool), norm)
    assert norm.value == pytest.approx(0.9 * 100 + 0.1 * 1)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    assert losses["reg_loss"].item() == 0.0 and losses["cls_loss"].item() > 0
    losses["final_loss"].backward()
    assert bool(torch.isfinite(cls_logits.grad).all()) and bool((cls_logits.grad != 0).any())
    assert reg_offsets.grad is not None and bool((reg_offsets.grad == 0).all())


# --- decoding --------------------------------------------------------------------------------
TIMING = FeatureTiming(fps=30.0, stride=4, window=16)  # a step is 4 / 30 s; step i is centred at (4 i + 8) / 30 s
NMS = NMSConfig(method="soft_gaussian", min_score=0.001)


def planted(points: Points, gt_steps: torch.Tensor, labels: list[int], k: int, at: str = "all"):
    """Logits +8 at positive points for their class (-12 elsewhere) and offsets = the regression targets."""
    t = assign_targets_single_video(points, gt_steps, labels, num_classes=k)
    pos = t.positive()
    if at == "one":  # only the first positive point
        pos = torch.zeros_like(pos).index_fill_(0, pos.nonzero()[0], True)
    logits = torch.where((t.cls_targets > 0) & pos[:, None], 8.0, -12.0)
    return logits, t.reg_targets.clone(), pos


def test_decode_recovers_a_planted_segment_in_seconds():
    points = pyramid(64)
    gt_seconds = Segments(torch.tensor([[3.0, 5.4]]), Unit.SECONDS)
    gt_steps = TIMING.segments_to_steps(gt_seconds)  # [[21.5, 39.5]]
    logits, offsets, _ = planted(points, gt_steps.data, [3], k=5, at="one")
    valid = torch.ones(len(points), dtype=torch.bool)
    dets = decode_single_video(points, logits, offsets, valid, TIMING, duration=10.0, video_id="v", nms=NMS)
    assert len(dets) == 1 and dets.video_id == "v" and dets.segments.unit is Unit.SECONDS
    assert dets.labels.tolist() == [3]
    assert dets.scores.item() == pytest.approx(1 / (1 + math.exp(-8.0)))
    torch.testing.assert_close(dets.segments.data, gt_seconds.data, rtol=0, atol=1e-5)
    # through FeatureTiming: the same as converting the planted steps
    torch.testing.assert_close(dets.segments.data, TIMING.segments_to_seconds(gt_steps).data)


def test_decode_every_positive_point_and_nms_give_the_ground_truth_back():
    points = make_points([128 // s for s in DEFAULT_STRIDES], DEFAULT_STRIDES, DEFAULT_REGRESSION_RANGES)
    gt_steps = torch.tensor([[4.25, 9.5], [30.0, 95.0], [100.5, 103.0]])
    logits, offsets, pos = planted(points, gt_steps, [0, 1, 0], k=2)
    assert int(pos.sum()) > 3  # several points per segment: NMS must merge them
    dets = decode_single_video(
        points, logits, offsets, torch.ones(len(points), dtype=torch.bool), TIMING, None, "v", NMSConfig(method="hard", iou_threshold=0.5)
    )
    assert len(dets) == 3
    want = TIMING.segments_to_seconds(Segments(gt_steps, Unit.STEPS))
    order = torch.argsort(dets.segments.data[:, 0])
    torch.testing.assert_close(dets.segments.data[order], want.data)
    assert dets.labels[order].tolist() == [0, 1, 0]
    assert bool((matched_tiou(dets.segments[order], want) > 0.9999).all())


def test_padded_points_never_produce_detections():
    points = pyramid(32)
    logits = torch.full((len(points), 2), 10.0)  # everything confident
    offsets = torch.ones(len(points), 2)
    valid = torch.zeros(len(points), dtype=torch.bool)
    for threshold in (0.001, 0.0):
        dets = decode_single_video(points, logits, offsets, valid, TIMING, 100.0, "v", NMS, pre_nms_threshold=threshold)
        assert len(dets) == 0
    # only the valid half of each level can produce detections
    valid = torch.cat([torch.arange(t) < t // 2 for t in points.level_lengths])
    dets = decode_single_video(points, logits, offsets, valid, TIMING, None, "v", NMSConfig(method="none", max_detections=1000))
    assert len(dets) == 2 * int(valid.sum())
    centres_steps = TIMING.seconds_to_step(dets.segments.to_numpy().centers())
    valid_positions = set(points.position[valid].tolist())
    assert {round(float(c), 3) for c in centres_steps} <= valid_positions


def test_decode_keeps_top_k_per_level_and_drops_short_segments():
    points = make_points([8, 4], [1, 2], [(0, 4), (4, INF)])
    logits = torch.full((12, 1), -20.0)
    logits[[1, 2, 3], 0] = torch.tensor([3.0, 5.0, 4.0])  # level 0
    logits[[9, 10], 0] = torch.tensor([1.0, 2.0])  # level 1
    offsets = torch.ones(12, 2)
    valid = torch.ones(12, dtype=torch.bool)
    config = NMSConfig(method="none")
    dets = decode_single_video(points, logits, offsets, valid, TIMING, None, "v", config, pre_nms_topk=1)
    # the best of each level, even though level 0's second best beats level 1's best
    assert sorted(dets.scores.tolist()) == pytest.approx(sorted([1 / (1 + math.exp(-5.0)), 1 / (1 + math.exp(-2.0))]))
    assert len(decode_single_video(points, logits, offsets, valid, TIMING, None, "v", config, pre_nms_topk=2)) == 4
    # zero offsets: zero length, dropped; 0.02 strides at stride 1 is 0.04 steps <= 0.05
    assert len(decode_single_video(points, logits, torch.zeros(12, 2), valid, TIMING, None, "v", config)) == 0
    short = torch.full((12, 2), 0.02)
    kept = decode_single_video(points, logits, short, valid, TIMING, None, "v", config)
    assert sorted(kept.scores.tolist()) == pytest.approx([1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-2.0))])  # stride 2 only


def test_decode_clips_to_the_video_and_batches():
    points = pyramid(32)
    logits = torch.full((len(points), 1), -20.0)
    logits[0, 0] = 5.0  # point 0: [-2, 3] steps, starts before the video
    logits[31, 0] = 4.0  # point 31: [29, 34] steps = [4.13, 4.8] s, ends after 4.5 s
    offsets = torch.full((len(points), 2), 2.0)
    offsets[[0, 31], 1] = 3.0
    valid = torch.ones(len(points), dtype=torch.bool)
    dets = decode_single_video(points, logits, offsets, valid, TIMING, 4.5, "v", NMSConfig(method="none"))
    segs = dets.segments.data
    assert segs[0].tolist() == [0.0, pytest.approx((3 * 4 + 8) / 30)]
    assert segs[1].tolist() == [pytest.approx((29 * 4 + 8) / 30), 4.5]
    # batch: one timing per video, a second video with no valid point
    slow = FeatureTiming(fps=15.0, stride=4, window=16)
    out = decode(
        points, torch.stack([logits, logits]), torch.stack([offsets, offsets]), torch.stack([valid, ~valid]),
        [TIMING, slow], [4.0, None], ["a", "b"], NMSConfig(method="none"),
    )  # fmt: skip
    # video a lasts 4.0 s: point 31's [4.13, 4.8] s lies wholly past the end and is dropped
    assert [d.video_id for d in out] == ["a", "b"] and len(out[0]) == 1 and len(out[1]) == 0
    assert out[0].segments.data[0, 0].item() == 0.0
    with pytest.raises(ValueError, match="batch of 2 videos"):
        decode(
            points, torch.stack([logits, logits]), torch.stack([offsets, offsets]), torch.stack([valid, valid]), TIMING, [1.0], ["a"], NMS
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_targets_losses_decode_on_cuda():
    device = torch.device("cuda")
    points = pyramid(64).to(device)
    gt = torch.tensor([[4.0, 20.0], [30.0, 33.0]], device=device)
    t = assign_targets(points, [gt], [torch.tensor([0, 1], device=device)], num_classes=2)
    assert t.cls_targets.device.type == "cuda"
    cpu = assign_targets(pyramid(64), [gt.cpu()], [[0, 1]], num_classes=2)
    assert torch.equal(t.cls_targets.cpu(), cpu.cls_targets) and torch.equal(t.reg_targets.cpu(), cpu.reg_targets)
    logits = torch.where(t.cls_targets[0] > 0, 8.0, -12.0)
    valid = torch.ones(len(points), dtype=torch.bool, device=device)
    losses = detection_losses(logits[None], t.reg_targets, t.cls_targets, t.reg_targets, valid[None], LossNormalizer())
    assert losses["reg_loss"].item() == pytest.approx(0.0, abs=1e-6)
    dets = decode_single_video(points, logits, t.reg_targets[0], valid, TIMING, None, "v", NMSConfig(method="hard"))
    assert dets.scores.device.type == "cuda" and len(dets) == 2
