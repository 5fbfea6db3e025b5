"""BMN (tal_models.detectors.bmn, tal_models.layers.boundary_matching): the BM weights against a direct
computation, shapes, labels, losses, proposal generation, padding, overfitting (with the classifier,
on sliding windows), checkpoints, configs and edge cases."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import one_thread, seed_zero  # noqa: F401  (autouse fixtures)

from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, checkpoint_bytes, load_checkpoint
from tal_models.config import config_from_dict, config_to_dict
from tal_models.detectors import BMNConfig, BMNDetector, Detector, bmn_config, build_detector, config_type
from tal_models.detectors.bmn import (
    BMNInferenceConfig,
    BMNLossConfig,
    balanced_logistic_loss,
    parameter_counts,
    piece_targets,
    proposals_single_piece,
    sampled_regression_loss,
)
from tal_models.layers import BoundaryMatching, boundary_matching_weights, proposal_validity
from tal_models.structures import pairwise_tiou
from tal_models.timing import FeatureTiming
from tal_models.windows import Piece, TemporalScaleConfig, finish_video

C = 8
SMALL = dict(num_samples=4, samples_per_bin=2, hidden_1d=16, hidden_2d=8, hidden_3d=16)


def small(protocol: str = "thumos14", num_classes: int = 1, length: int = 16, **sizes) -> BMNConfig:
    return bmn_config(protocol=protocol, num_classes=num_classes, input_dim=C, length=length, **{**SMALL, **sizes})


def sample(features: torch.Tensor, segments=(), labels=(), vid: str = "v", **extra) -> dict:
    return {
        "features": features,
        "video_id": vid,
        "segments": np.asarray(segments, np.float32).reshape(-1, 2),
        "labels": np.asarray(labels, np.int64),
        **extra,
    }


# --- the BM layer ----------------------------------------------------------------------------
def direct_bm(x: torch.Tensor, D: int, N: int, S: int, ratio: float) -> torch.Tensor:
    """``x [C, T]`` -> ``[C, N, D, T]`` one proposal, one point at a time (zeros beyond the sequence)."""
    Cx, T = x.shape
    out = torch.zeros(Cx, N, D, T, dtype=torch.float64)

    def at(i: int) -> torch.Tensor:
        return x[:, i] if 0 <= i < T else torch.zeros(Cx, dtype=torch.float64)

    for d in range(D):
        for t in range(T - d):
            lo, hi = t - ratio * (d + 1), t + d + ratio * (d + 1)
            for k in range(N * S):
                p = lo + (hi - lo) * k / (N * S - 1)
                i = math.floor(p)
                out[:, k // S, d, t] += ((1 - (p - i)) * at(i) + (p - i) * at(i + 1)) / S
    return out


@pytest.mark.parametrize("T,D,N,S,ratio", [(7, 5, 3, 2, 0.5), (6, 6, 2, 3, 0.25), (5, 3, 4, 1, 0.0)])
def test_bm_layer_equals_a_direct_per_proposal_interpolation(T, D, N, S, ratio):
    x = torch.randn(2, 3, T, dtype=torch.float64)
    layer = BoundaryMatching(T, D, N, S, ratio)
    got = layer(x.float()).double()  # [B, C, N, D, T]
    assert got.shape == (2, 3, N, D, T)
    for b in range(2):
        torch.testing.assert_close(got[b], direct_bm(x[b], D, N, S, ratio), atol=1e-6, rtol=0)
    invalid = ~proposal_validity(T, D)  # proposals ending beyond T: all-zero weights
    assert invalid.any() == (D > 1)
    assert (boundary_matching_weights(T, D, N, S, ratio)[:, :, invalid] == 0).all()
    # a short proposal in the middle reads a constant sequence as that constant; no bin weighs more than 1
    w = boundary_matching_weights(T, D, N, S, ratio).sum(0)  # [N, D, T]
    assert (w <= 1 + 1e-6).all() and torch.allclose(w[:, 0, T // 2], torch.ones(N))


def test_bm_weights_are_cached_and_not_stored_in_checkpoints():
    a, b = BoundaryMatching(8, 4, 2, 3, 0.5), BoundaryMatching(8, 4, 2, 3, 0.5)
    assert a.weights.data_ptr() == b.weights.data_ptr()  # computed once per configuration
    assert boundary_matching_weights(8, 4, 2, 3, 0.5) is boundary_matching_weights(8, 4, 2, 3, 0.5)
    assert "weights" not in a.state_dict()
    assert a(torch.randn(1, 2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16  # the matmul runs in the features' dtype
    with pytest.raises(ValueError, match="max_duration"):
        boundary_matching_weights(4, 5, 2, 3, 0.5)


# --- shapes, labels, losses -------------------------------------------------------------------
def test_piece_outputs_shapes_and_validity_of_a_short_window():
    cfg = small(num_classes=3, max_duration=8)
    model = BMNDetector(cfg)
    x, mask = torch.randn(2, C, 16), torch.ones(2, 1, 16, dtype=torch.bool)
    mask[1, :, 10:] = False
    out = model.piece_outputs(x * mask, mask)
    assert out.start.shape == out.end.shape == (2, 16)
    assert out.confidence.shape == (2, 2, 8, 16) and out.classes.shape == (2, 4, 8, 16) and out.valid.shape == (2, 8, 16)
    d, t = torch.meshgrid(torch.arange(8), torch.arange(16), indexing="ij")
    assert torch.equal(out.valid[0], t + d < 16) and torch.equal(out.valid[1], t + d < 10)


def test_targets_of_a_resized_piece_by_hand():
    cfg = small("activitynet", length=10, max_duration=10)
    piece = Piece(0, 0, 20.0, 10)  # a 20-step video resized to 10 cells: 2 steps per cell
    # steps [3.5, 13.5] = unit time [0.2, 0.7]: cells 2 .. 6
    start, end, iou, cls = piece_targets(torch.tensor([[3.5, 13.5]]), torch.tensor([0]), piece, cfg)
    # the region is 3 cells around u = 0.2: the anchors of cells 1, 2, 3 (centred on their left edges) lie in it
    assert start.tolist() == pytest.approx([0, 1, 1, 1, 0, 0, 0, 0, 0, 0], abs=1e-6)
    # u = 0.7: the anchors of cells 5, 6, 7 (centred on their right edges)
    assert end.tolist() == pytest.approx([0, 0, 0, 0, 0, 1, 1, 1, 0, 0], abs=1e-6)
    assert float(iou[4, 2]) == pytest.approx(1.0) and float(iou[3, 2]) == pytest.approx(0.8)  # [0.2, 0.6] vs [0.2, 0.7]
    assert float(iou[0, 0]) == 0.0 and cls.unique().tolist() == [0]
    empty = piece_targets(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), piece, cfg)
    assert all(float(t.abs().sum()) == 0 for t in empty[:3]) and (empty[3] == cfg.num_classes).all()


def test_balanced_logistic_loss_weighs_positives_and_negatives_half_each():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    pos, valid = torch.tensor([True, False, False, True]), torch.tensor([True, True, True, False])
    p = torch.sigmoid(logits)
    # 3 valid: 1 positive (weight 0.5 * 3 / 1), 2 negatives (0.5 * 3 / 2)
    expected = -(1.5 * torch.log(p[0]) + 0.75 * torch.log(1 - p[1]) + 0.75 * torch.log(1 - p[2])) / 3
    torch.testing.assert_close(balanced_logistic_loss(logits, pos, valid), expected)


def test_regression_loss_samples_medium_and_low_proposals_from_torchs_generator():
    iou = torch.cat([torch.full((10,), 0.9), torch.full((1000,), 0.5), torch.full((1000,), 0.1), torch.zeros(1000)])
    valid = torch.ones_like(iou, dtype=torch.bool)
    pred = torch.zeros_like(iou)
    torch.manual_seed(3)
    a = sampled_regression_loss(pred, iou, valid, 0.7, 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, sampled_regression_loss(pred, iou, valid, 0.7, 0.3))  # reproducible under the job's seed
    # ~10 of each band: the loss is near 0.5 * (10 * 0.81 + 10 * 0.25 + 10 * 0.01) / 30, far from all-medium 0.125
    assert 0.12 < float(a) < 0.25
    assert float(sampled_regression_loss(pred, torch.zeros_like(iou), valid, 0.7, 0.3)) == 0.0  # nothing high: nothing sampled


# --- proposal generation ----------------------------------------------------------------------
def test_a_hand_made_map_gives_the_expected_top_proposal_in_seconds():
    L, D = 10, 10
    start, end = torch.full((L,), 0.05), torch.full((L,), 0.05)
    start[2], end[6] = 0.9, 0.8  # a start at u = 0.2, an end at u = 0.7
    start[5], end[8] = 0.3, 0.3  # weaker peaks
    conf = torch.full((2, D, L), 0.1)
    conf[:, 4, 2] = 0.9  # proposal (d=4, t=2): cells 2..6 = [0.2, 0.7]
    piece = Piece(0, 0, 20.0, L)  # resized 20-step video
    segs, scores, labels = proposals_single_piece(start, end, conf, None, piece, D, BMNInferenceConfig())
    best = int(scores.argmax())
    assert segs[best].tolist() == pytest.approx([3.5, 13.5]) and float(scores[best]) == pytest.approx(0.9 * 0.8 * 0.81)
    assert (labels == 0).all()
    # cells 3 (no peak, 0.05 < 0.5 * 0.9) never start a candidate; cell 0 always does
    starts = torch.round((segs[:, 0] + 0.5) / 2).long().unique().tolist()
    assert 3 not in starts and 0 in starts and 2 in starts and 5 in starts
    timing = FeatureTiming(fps=10.0, stride=2, window=2)  # step s -> (2 s + 1) / 10 seconds
    dets = finish_video("v", segs, scores, labels, timing, 4.0, BMNInferenceConfig().nms)
    assert dets.segments.data[0].tolist() == pytest.approx([0.8, 2.8])
    # with a classifier: the 2 best classes of each proposal, scored by their probabilities
    classes = torch.zeros(4, D, L)
    classes[1, 4, 2], classes[2, 4, 2] = 4.0, 3.0
    segs_k, scores_k, labels_k = proposals_single_piece(start, end, conf, classes, piece, D, BMNInferenceConfig())
    top = scores_k.topk(2).indices
    probs = torch.softmax(classes[:, 4, 2], 0)
    assert labels_k[top].tolist() == [1, 2] and scores_k[top].tolist() == pytest.approx((0.9 * 0.8 * 0.81 * probs[1:3]).tolist())
    assert len(segs_k) == 2 * len(segs)


# --- the detector ------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["thumos14", "activitynet"])
def test_detections_do_not_depend_on_the_batch_or_its_nan_padding(protocol):
    cfg = small(protocol, num_classes=3, max_duration=8)
    model = build_detector(cfg).eval()
    assert isinstance(model, Detector)
    short, long = torch.randn(21, C), torch.randn(40, C)
    alone = model(collate([sample(short, vid="a")]))[0]
    batch = collate([sample(short, vid="a"), sample(long, vid="b")])
    batch.features[0, :, 21:] = float("nan")
    together = model(batch)[0]
    assert len(alone) > 0 and len(alone) == len(together)
    torch.testing.assert_close(together.segments.data, alone.segments.data)
    torch.testing.assert_close(together.scores, alone.scores)
    assert torch.equal(together.labels, alone.labels)


def make_videos(K: int = 2, seed: int = 0):
    """Two videos with class-prototype features inside their segments (steps)."""
    g = torch.Generator().manual_seed(seed)
    protos = 2.0 * torch.randn(K, C, generator=g)
    specs = [(96, [[10, 22], [70, 84]], [0, 1]), (40, [[20, 31]], [1])]
    samples = []
    for i, (n, segs, labels) in enumerate(specs):
        f = 0.3 * torch.randn(n, C, generator=g)
        for (s, e), k in zip(segs, labels):
            f[s:e] += protos[k]
        # segment [s, e) of clips = steps [s - 0.5, e - 0.5]
        samples.append(sample(f, np.asarray(segs, np.float32) - 0.5, labels, vid=f"v{i}"))
    return samples


def test_overfits_windows_with_the_classifier_and_places_later_windows_in_time():
    """THUMOS protocol (windows of 32, overlap 16): a 96-step video (five windows) and a 40-step one; the
    detections match every ground truth, the one in the last window (steps 70-84) included, with its class."""
    cfg = small(num_classes=2, length=32, max_duration=16)
    model = build_detector(cfg)
    samples = make_videos()
    batch = collate(samples)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(150):
        losses = model(batch)
        opt.zero_grad()
        losses["final_loss"].backward()
        opt.step()
        first = first if first is not None else float(losses["final_loss"].detach())
    losses = {k: float(v.detach()) for k, v in losses.items()}
    assert losses["final_loss"] < 0.25 * first, (first, losses)
    model.eval()
    dets = model(batch)
    for s, d in zip(samples, dets):
        gt = torch.as_tensor(s["segments"], dtype=torch.float64)
        top = d[:5]
        assert float(pairwise_tiou(d.segments.data[:1], gt).max()) > 0.7  # the top detection is a ground truth
        iou = pairwise_tiou(top.segments.data, gt)  # [5, N]
        for j in range(gt.shape[0]):
            i = int(iou[:, j].argmax())
            assert float(iou[i, j]) > 0.7, (j, top.segments.data, gt)
            assert int(top.labels[i]) == int(s["labels"][j])
    # served as one long sequence (detect): the later windows' detections, in seconds
    timing = FeatureTiming(fps=10.0, stride=2, window=2)
    served = model.detect(samples[0]["features"], timing, duration=20.0)
    late = timing.step_to_seconds(torch.tensor([69.5, 83.5], dtype=torch.float64))
    assert float(pairwise_tiou(served.segments.data[:5], late[None]).max()) > 0.7


def test_checkpoint_round_trip_gives_identical_detections():
    cfg = small(num_classes=3, max_duration=8)
    model = build_detector(cfg).eval()
    batch = collate([sample(torch.randn(30, C), vid="a")])
    before = model(batch)[0]
    ckpt = load_checkpoint(io.BytesIO(checkpoint_bytes(Checkpoint.from_model(model, ["a", "b", "c"], {"feature_dim": C}))))
    assert config_type("bmn") is BMNConfig and ckpt.config == cfg
    after = ckpt.build()(batch)[0]
    torch.testing.assert_close(after.segments.data, before.segments.data, rtol=0, atol=0)
    torch.testing.assert_close(after.scores, before.scores, rtol=0, atol=0)
    assert config_from_dict(BMNConfig, config_to_dict(cfg)) == cfg


def test_published_configurations_and_the_parameter_count():
    anet = bmn_config(protocol="activitynet", input_dim=400)
    assert anet.scale == TemporalScaleConfig("resize", 100) and anet.max_duration == 100
    assert (anet.num_samples, anet.samples_per_bin, anet.boundary_ratio) == (32, 3, 0.5)
    assert (anet.hidden_1d, anet.hidden_2d, anet.hidden_3d) == (256, 128, 512)
    assert anet.inference.nms.method == "soft_gaussian" and anet.inference.nms.sigma == 0.4
    th = bmn_config(protocol="thumos14", num_classes=20, input_dim=2048)
    assert th.scale == TemporalScaleConfig("window", 128, 0.5) and th.max_duration == 64 and th.max_seq_len == 128
    # the official code's layers at 400-d input: 126,464 (base) + 99,330 (TEM) + 4,752,770 (PEM) = 4,978,564
    counts = parameter_counts(build_detector(replace(anet, scale=TemporalScaleConfig("resize", 8), max_duration=8)))
    assert counts == {"base": 126_464, "tem": 99_330, "pem": 4_752_770, "classifier": 0, "total": 4_978_564}
    assert bmn_config(protocol="thumos14", input_dim=16, hidden_1d=32, max_duration=32).hidden_1d == 32


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(max_duration=200), "max_duration"),
        (dict(num_samples=0), "num_samples"),
        (dict(boundary_ratio=-1.0), "boundary_ratio"),
        (dict(feature_dim=10), "groups"),
        (dict(max_seq_len=64), "window length"),
        (dict(arch="tridet"), "arch"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_config_validation_names_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        replace(small(), **change)


def test_loss_and_inference_config_validation():
    with pytest.raises(ValueError, match="reg_low"):
        BMNLossConfig(reg_low=0.8)
    with pytest.raises(ValueError, match="boundary_region"):
        BMNLossConfig(boundary_region=0.0)
    with pytest.raises(ValueError, match="classes_per_proposal"):
        BMNInferenceConfig(classes_per_proposal=0)
    with pytest.raises(ValueError, match="peak_fraction"):
        BMNInferenceConfig(peak_fraction=1.5)
    with pytest.raises(ValueError, match="protocol"):
        bmn_config(protocol="charades", input_dim=8)
    with pytest.raises(ValueError, match="unknown sizes"):
        bmn_config(protocol="thumos14", input_dim=8, hidden=3)


# --- edge cases ---------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["thumos14", "activitynet"])
def test_empty_ground_truth_one_step_video_and_bf16(protocol):
    cfg = small(protocol, num_classes=2, max_duration=8)
    model = build_detector(cfg).train()
    batch = collate([sample(torch.randn(25, C), vid="empty"), sample(torch.randn(1, C), [[-0.5, 0.5]], [1], vid="one")])
    losses = model(batch)
    losses["final_loss"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())  # no unused parameter (DDP)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(batch)
        assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in bf16.values())
        model.eval()
        dets = model(batch)
    timing = FeatureTiming(fps=10.0, stride=2, window=2)
    one = model.eval().detect(torch.randn(1, C), timing, duration=0.3)
    for d in (*dets, one):
        assert len(d) > 0 and torch.isfinite(d.scores).all() and (d.scores >= 0).all()
        assert (d.segments.data[:, 1] > d.segments.data[:, 0]).all()
    assert float(one.segments.data.min()) >= 0.0 and float(one.segments.data.max()) <= 0.3


@pytest.mark.parametrize("hidden, channels", [(32, 16), (64, 2)])  # mixing first (as at the published widths), sampling first
def test_the_bm_layer_followed_by_its_conv3d_is_the_same_in_either_order(hidden, channels):
    torch.manual_seed(0)
    layer = BoundaryMatching(12, 8, 4, 2, 0.5)
    x, weight, bias = (
        torch.randn(3, channels, 12, dtype=torch.float64),
        torch.randn(hidden, channels, 4, dtype=torch.float64),
        torch.randn(hidden),
    )
    direct = torch.matmul(weight.reshape(hidden, -1), layer(x).reshape(3, channels * 4, 8 * 12)) + bias.double()[:, None]
    torch.testing.assert_close(layer.project(x, weight, bias), direct, rtol=1e-10, atol=1e-10)
