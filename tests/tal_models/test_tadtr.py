"""TadTR (tal_models.detectors.tadtr): Hungarian matching against brute force, temporal deformable attention
against hand-computed interpolation and padding, the detector's padding invariance, overfitting, checkpoints,
configs and edge cases."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import one_thread, seed_zero  # noqa: F401 (autouse fixtures: seed 0, one thread)

from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, checkpoint_bytes, load_checkpoint
from tal_models.config import config_from_dict, config_to_dict
from tal_models.detectors import CONFIG_TYPES, Detector, TadTRConfig, TadTRDetector, build_detector, tadtr_config
from tal_models.detectors.tadtr import SetOutputs, TadTRLossConfig, sine_positions
from tal_models.layers import DeformableEncoderLayer, TemporalDeformableAttention, sample_linear
from tal_models.matching import MatchCosts, center_width_to_bounds, hungarian_match, match_cost
from tal_models.optim import OptimConfig, build_optimizer
from tal_models.structures import tiou
from tal_models.windows import TemporalScaleConfig, split

C, K, L = 16, 3, 32


def _tiny(**kw) -> TadTRConfig:
    sizes = dict(embed_dim=32, heads=4, enc_layers=2, dec_layers=2, ffn_dim=64, num_queries=8, max_seq_len=L)
    sizes["scale"] = TemporalScaleConfig("window", L, 0.25)
    return tadtr_config(protocol="thumos14", num_classes=K, input_dim=C, **(sizes | kw))


def _samples(num_videos: int = 2, length: int = 32, seed: int = 0, noise: float = 0.2):
    """Videos of class prototypes inside one or two segments, noise around (steps: segment [t, t + n])."""
    g = np.random.default_rng(seed)
    protos = 2.0 * g.standard_normal((K, C)).astype(np.float32)
    samples = []
    for v in range(num_videos):
        feats = noise * g.standard_normal((length, C)).astype(np.float32)
        segs, labels, t = [], [], int(g.integers(2, 6))
        while t + 6 < length - 2 and len(segs) < 2:
            n = int(g.integers(5, min(14, length - 2 - t)))
            k = int(g.integers(K))
            feats[t : t + n] += protos[k]
            segs.append([t - 0.5, t + n - 0.5])
            labels.append(k)
            t += n + int(g.integers(3, 8))
        samples.append({"features": feats, "segments": np.array(segs, np.float32), "labels": np.array(labels), "video_id": f"v{v}"})
    return samples


# --- matching --------------------------------------------------------------------------------
def _brute_force(cost: torch.Tensor) -> float:
    Q, N = cost.shape
    if min(Q, N) == 0:
        return 0.0
    if Q >= N:
        return min(float(sum(cost[q, n] for n, q in enumerate(p))) for p in itertools.permutations(range(Q), N))
    return min(float(sum(cost[q, n] for q, n in enumerate(p))) for p in itertools.permutations(range(N), Q))


@pytest.mark.parametrize("Q,N", [(1, 1), (3, 2), (4, 4), (6, 4), (5, 0), (2, 3), (6, 1)])
def test_hungarian_match_finds_the_least_total_cost(Q, N):
    g = torch.Generator().manual_seed(Q * 10 + N)
    for _ in range(5):
        logits = 3 * torch.randn(Q, K, generator=g)
        segs = torch.stack([torch.rand(Q, generator=g), 0.05 + 0.5 * torch.rand(Q, generator=g)], -1)
        labels = torch.randint(0, K, (N,), generator=g)
        tgts = torch.stack([torch.rand(N, generator=g), 0.05 + 0.5 * torch.rand(N, generator=g)], -1)
        cost = match_cost(logits, segs, labels, tgts).double()
        assert cost.shape == (Q, N)
        qi, ti = hungarian_match(cost)
        assert len(qi) == len(ti) == min(Q, N)
        assert len(set(qi.tolist())) == len(qi) and len(set(ti.tolist())) == len(ti)  # one to one
        assert float(cost[qi, ti].sum()) == pytest.approx(_brute_force(cost), abs=1e-9)


def test_hungarian_match_with_ties_is_still_optimal():
    cost = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 2.0], [2.0, 0.0]])  # rows 0, 1 tie everywhere
    qi, ti = hungarian_match(cost)
    assert float(cost[qi, ti].sum()) == _brute_force(cost) == 0.0
    equal = torch.ones(5, 3)
    qi, ti = hungarian_match(equal)
    assert len(set(qi.tolist())) == 3 and sorted(ti.tolist()) == [0, 1, 2]


def test_match_cost_terms_by_hand():
    logits = torch.tensor([[2.0, -1.0]])
    segs, tgts = torch.tensor([[0.5, 0.2]]), torch.tensor([[0.55, 0.3], [0.5, 0.2]])
    labels = torch.tensor([1, 0])
    w = MatchCosts(cls=6.0, seg=5.0, iou=2.0)
    p = torch.sigmoid(logits[0])
    focal = 0.25 * (1 - p) ** 2 * -torch.log(p) - 0.75 * p**2 * -torch.log(1 - p)
    inter, union = 0.2, 0.3  # [0.4, 0.6] vs [0.4, 0.7]
    expected0 = 6 * focal[1] + 5 * (0.05 + 0.1) - 2 * inter / union
    expected1 = 6 * focal[0] + 0.0 - 2 * 1.0
    torch.testing.assert_close(match_cost(logits, segs, labels, tgts, w)[0], torch.stack([expected0, expected1]).float())
    assert match_cost(logits, segs, labels[:0], tgts[:0]).shape == (1, 0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        hungarian_match(torch.tensor([[float("nan")]]))


# --- deformable attention ---------------------------------------------------------------------
def test_sample_linear_interpolates_and_reads_zero_outside():
    values = torch.arange(1.0, 6.0).view(1, 5, 1)  # steps 0..4 hold 1..5
    pos = torch.tensor([[0.0, 1.25, 3.5, -0.5, -1.0, 4.5, 5.0, 2.0]])
    out = sample_linear(values, pos, torch.tensor([5]))[0, :, 0]
    torch.testing.assert_close(out, torch.tensor([1.0, 2.25, 4.5, 0.5, 0.0, 2.5, 0.0, 3.0]))
    short = sample_linear(values, pos, torch.tensor([3]))[0, :, 0]  # steps 3, 4 invalid
    torch.testing.assert_close(short, torch.tensor([1.0, 2.25, 0.0, 0.5, 0.0, 0.0, 0.0, 3.0]))


def test_zero_offsets_with_one_point_reproduce_linear_interpolation_at_the_reference():
    B, T, D, H = 2, 7, 8, 2
    attn = TemporalDeformableAttention(D, H, points=1)
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()  # weight is 0 at init: the offsets are 0
        attn.value_proj.weight.copy_(torch.eye(D))
        attn.output_proj.weight.copy_(torch.eye(D))
    value = torch.randn(B, T, D)
    mask = torch.ones(B, T, dtype=torch.bool)
    ref = torch.tensor([[0.5 / T, 2.3 / T, 0.5], [1.0, 4.75 / T, 0.0]])[..., None]  # [B, Q=3, 1] unit time
    out = attn(torch.randn(B, 3, D), ref, value, mask)
    expected = torch.empty(B, 3, D)
    for b in range(B):
        for q in range(3):
            p = float(ref[b, q, 0]) * T - 0.5
            lo = int(np.floor(p))
            f = p - lo
            row = torch.cat([torch.zeros(1, D), value[b], torch.zeros(1, D)])  # a zero step on either side
            expected[b, q] = (1 - f) * row[lo + 1] + f * row[lo + 2]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ref_dim", [1, 2])
def test_padded_sequence_gives_identical_attention_at_valid_positions(ref_dim):
    D, n, T = 16, 9, 15
    attn = TemporalDeformableAttention(D, 4, 4)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)  # query-dependent offsets, some beyond the valid end
    value, query = torch.randn(1, n, D), torch.randn(1, 5, D)
    ref = torch.rand(1, 5, ref_dim) * (torch.tensor([1.0, 0.5])[:ref_dim])
    padded = torch.cat([value, torch.full((1, T - n, D), float("nan"))], 1)
    mask = torch.arange(T)[None] < n
    alone = attn(query, ref, value, torch.ones(1, n, dtype=torch.bool))
    torch.testing.assert_close(attn(query, ref, padded, mask), alone, atol=1e-6, rtol=0)
    layer = DeformableEncoderLayer(D, 4, 4, 32, dropout=0.0).eval()
    pos = sine_positions(torch.ones(1, T, dtype=torch.bool)[:, :n], D)
    pos_padded = sine_positions(mask, D)
    torch.testing.assert_close(pos_padded[:, :n], pos)
    enc_alone = layer(value, pos, torch.ones(1, n, dtype=torch.bool))
    enc_padded = layer(padded, pos_padded, mask)
    torch.testing.assert_close(enc_padded[:, :n], enc_alone, atol=1e-5, rtol=0)
    assert bool((enc_padded[:, n:] == 0).all())


# --- the detector --------------------------------------------------------------------------------
def _equal_detections(a, b, atol=1e-5):
    assert len(a) == len(b)
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=0)
    torch.testing.assert_close(a.segments.data, b.segments.data, atol=atol * 100, rtol=0)
    assert torch.equal(a.labels, b.labels)


def test_detector_satisfies_the_protocol_and_builds_from_its_config():
    model = build_detector(_tiny())
    assert isinstance(model, TadTRDetector) and isinstance(model, Detector)
    assert CONFIG_TYPES["tadtr"] is TadTRConfig and model.pad_multiple == 1


def test_a_video_alone_and_batched_with_a_longer_one_and_nan_padding_gives_identical_detections():
    model = build_detector(_tiny()).eval()
    short, long = _samples(1, length=20)[0], _samples(1, length=70, seed=1)[0]  # one padded window; three windows
    alone = model(collate([short], 1))[0]
    batch = collate([long, short], 1)
    batch.features[1, :, 20:] = float("nan")
    together = model(batch)
    _equal_detections(together[1], alone)
    assert len(alone) > 0 and bool(torch.isfinite(together[0].scores).all())


def test_a_long_video_alone_and_batched_gives_identical_detections():
    model = build_detector(_tiny()).eval()
    short, long = _samples(1, length=20)[0], _samples(1, length=70, seed=1)[0]
    alone = model(collate([long], 1))[0]
    _equal_detections(model(collate([short, long], 1))[1], alone)


@pytest.mark.parametrize(
    "scale,length,segment",
    [
        (TemporalScaleConfig("window", L, 0.25), 70, [40.5, 50.5]),  # windows at 0, 24, 38: inside the last two
        (TemporalScaleConfig("window", L, 0.25), 20, [3.5, 9.5]),  # one window, padded
        (TemporalScaleConfig("resize", L), 57, [11.5, 30.5]),
    ],
)
def test_piece_targets_fed_back_as_predictions_give_the_ground_truth_in_video_steps(scale, length, segment):
    """The unit-time plumbing both ways: a model whose queries predict exactly each piece's targets detects the segment."""
    model = build_detector(_tiny(scale=scale, max_seq_len=L, actionness=False)).eval()
    sample = {"features": np.zeros((length, C), np.float32), "segments": np.array([segment], np.float32), "labels": np.array([1])}
    batch = collate([{**sample, "video_id": "v"}], 1)
    _, _, pieces = split(batch.features, batch.mask, model.config.scale)
    targets, labels = model._piece_targets(batch, pieces)
    assert sum(len(t) for t in targets) >= 1

    def predict_targets(x, mask, all_logits=False):
        M, Q = x.shape[0], model.config.num_queries
        segs, logits = torch.full((M, Q, 2), 0.5), torch.full((M, Q, K), -20.0)
        for m, (t, lab) in enumerate(zip(targets, labels)):
            segs[m, : len(t)], logits[m, torch.arange(len(t)), lab] = t, 20.0
        return SetOutputs([logits], [segs], None)

    model.forward_pieces = predict_targets
    dets = model(batch)[0]
    torch.testing.assert_close(dets.segments.data[0], torch.tensor(segment, dtype=torch.float64), atol=1e-4, rtol=0)
    assert int(dets.labels[0]) == 1


def test_losses_are_finite_with_empty_ground_truth_and_every_parameter_gets_a_gradient():
    model = build_detector(_tiny()).train()
    samples = _samples(2)
    samples[1] = {**samples[1], "segments": np.zeros((0, 2), np.float32), "labels": np.zeros(0, np.int64)}
    losses = model(collate(samples, 1))
    assert {"cls_loss", "seg_loss", "iou_loss", "aux_loss", "actionness_loss", "final_loss"} <= set(losses)
    assert all(bool(torch.isfinite(v)) and v.ndim == 0 for v in losses.values())
    losses["final_loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # DDP needs no find_unused_parameters
    model.zero_grad()
    empty = model(collate(samples[1:], 1))  # no ground truth at all: only the background terms
    assert float(empty["seg_loss"].detach()) == 0.0 and bool(torch.isfinite(empty["final_loss"]))


@pytest.mark.parametrize(
    "variant", [dict(segment_refine=False), dict(segment_refine=False, loss=TadTRLossConfig(aux_loss=False)), dict(actionness=False)]
)
def test_every_variant_uses_every_parameter(variant):
    model = build_detector(_tiny(**variant)).train()
    losses = model(collate(_samples(2), 1))
    assert ("actionness_loss" in losses) == model.config.actionness and ("aux_loss" in losses) == model.config.loss.aux_loss
    losses["final_loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_overfits_a_few_videos_and_finds_their_segments():
    cfg = _tiny(dropout=0.0, num_queries=6)
    model = build_detector(cfg).train()
    samples = _samples(3, seed=3)
    batch = collate(samples, 1)
    optimizer = build_optimizer(model, OptimConfig(lr=2e-3, weight_decay=0.0, warmup_epochs=0, epochs=300))
    first = None
    for _ in range(250):
        loss = model(batch)["final_loss"]
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.2 * first, (first, float(loss.detach()))
    model.eval()
    for s, dets in zip(samples, model(batch)):
        truth, labels = torch.as_tensor(s["segments"]).double(), torch.as_tensor(s["labels"])
        assert float(tiou(dets.segments.data[:1], truth[labels == int(dets.labels[0])]).max()) > 0.7  # the video's top detection
        for seg, label in zip(truth, labels):  # each segment: among the top detections of its class (as many as it has segments)
            same = dets[dets.labels == int(label)].segments.data[: int((labels == label).sum())]
            assert float(tiou(same, seg[None]).max()) > 0.7, (s["video_id"], seg.tolist(), same.tolist())


def test_checkpoint_round_trip_gives_identical_detections():
    model = build_detector(_tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = Checkpoint.from_model(model, ["a", "b", "c"], {"feature_dim": C})
    rebuilt = load_checkpoint(__import__("io").BytesIO(checkpoint_bytes(ckpt))).build()
    assert rebuilt.config == model.config and isinstance(rebuilt, TadTRDetector)
    batch = collate(_samples(2, length=50), 1)
    for a, b in zip(model(batch), rebuilt(batch)):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.segments.data, b.segments.data)


def test_config_round_trips_and_refuses_bad_values():
    cfg = _tiny()
    assert config_from_dict(TadTRConfig, config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="embed_dim .* divisible by heads"):
        replace(cfg, heads=5)
    with pytest.raises(ValueError, match="num_queries must be a positive int"):
        replace(cfg, num_queries=0)
    with pytest.raises(ValueError, match="segment_refine needs loss.aux_loss"):
        replace(cfg, loss=TadTRLossConfig(aux_loss=False))
    with pytest.raises(ValueError, match="max_seq_len .* window length"):
        replace(cfg, max_seq_len=64)
    with pytest.raises(ValueError, match="TadTRLossConfig.cls_weight must be a finite number >= 0"):
        TadTRLossConfig(cls_weight=-1.0)
    with pytest.raises(ValueError, match="unknown size"):
        tadtr_config(protocol="thumos14", num_classes=20, input_dim=2048, queries=40)
    with pytest.raises(ValueError, match="protocol must be"):
        tadtr_config(protocol="hacs", num_classes=20, input_dim=2048)
    with pytest.raises(ValueError, match="arch must be 'tadtr'"):
        config_from_dict(TadTRConfig, {**config_to_dict(cfg), "arch": "detr"})


def test_published_configurations():
    thumos = tadtr_config(protocol="thumos14", num_classes=20, input_dim=2048)
    assert (thumos.scale.protocol, thumos.scale.length, thumos.max_seq_len, thumos.num_queries) == ("window", 128, 128, 40)
    assert (thumos.enc_layers, thumos.dec_layers, thumos.embed_dim, thumos.heads, thumos.enc_points) == (4, 4, 256, 8, 4)
    assert (thumos.inference.nms.method, thumos.inference.nms.iou_threshold) == ("hard", 0.4)
    anet = tadtr_config(protocol="activitynet", num_classes=200, input_dim=2048, num_queries=50)
    assert (anet.scale.protocol, anet.scale.length, anet.inference.nms.method, anet.num_queries) == ("resize", 100, "none", 50)
    n = sum(p.numel() for p in build_detector(thumos).parameters())
    # the official model (its module definitions, counted by hand) has 8,661,594: ours lacks its one-level embedding (256)
    assert n == 8_661_594 - 256


def test_bf16_one_step_and_resize_protocol_edge_cases():
    model = build_detector(_tiny()).eval()
    one = model.detect(torch.randn(1, C))  # one valid step in a window of 32
    assert bool(torch.isfinite(one.scores).all()) and bool((one.segments.data[:, 1] > one.segments.data[:, 0]).all())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dets = model(collate(_samples(2, length=40), 1))
        model.train()
        losses = model(collate(_samples(2, length=40), 1))
    assert all(bool(torch.isfinite(d.scores).all()) for d in dets)
    assert losses["final_loss"].dtype == torch.float32 and bool(torch.isfinite(losses["final_loss"]))
    resize = build_detector(_tiny(scale=TemporalScaleConfig("resize", 24), max_seq_len=1000)).eval()
    dets = resize(collate(_samples(2, length=57), 1))
    assert all(bool((d.segments.data >= -0.5).all()) and bool((d.segments.data <= 56.5).all()) for d in dets)


def test_center_width_bounds():
    torch.testing.assert_close(center_width_to_bounds(torch.tensor([[0.5, 0.2]])), torch.tensor([[0.4, 0.6]]))
