"""The online detector: causal end to end, a stream equals the offline run, it learns, it round-trips."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import one_thread, seed_zero  # noqa: F401 (autouse fixtures: seed 0, one thread)

from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, checkpoint_bytes, load_checkpoint
from tal_models.config import config_from_dict, config_to_dict
from tal_models.detectors import CONFIG_TYPES, Detector, OnlineConfig, OnlineDetector, build_detector, online_config
from tal_models.detectors.online import elapsed_targets, events_to_detections
from tal_models.online.events import EventRuleConfig
from tal_models.optim import OptimConfig, build_optimizer
from tal_models.presets import load_preset
from tal_models.structures import tiou
from tal_models.timing import FeatureTiming

C, K = 16, 3
KINDS = ("transformer", "conv", "mamba", "maxpool")


def _tiny(kind: str = "transformer", **kw) -> OnlineConfig:
    sizes = dict(embed_dim=32, levels=3, max_seq_len=64, window=5, heads=4, drop_path=0.0) | kw
    return online_config(kind=kind, num_classes=K, input_dim=C, **sizes)


def _perturbed(model: OnlineDetector) -> OnlineDetector:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _samples(num_videos: int = 2, length: int = 48, seed: int = 0, noise: float = 0.2):
    """Videos of class prototypes inside a few segments, noise around (segment [t - 0.5, t + n - 0.5])."""
    g = np.random.default_rng(seed)
    protos = 2.0 * g.standard_normal((K, C)).astype(np.float32)
    samples = []
    for v in range(num_videos):
        feats = noise * g.standard_normal((length, C)).astype(np.float32)
        segs, labels, t = [], [], int(g.integers(2, 6))
        while t + 8 < length - 2 and len(segs) < 3:
            n = int(g.integers(6, min(14, length - 2 - t)))
            k = int(g.integers(K))
            feats[t : t + n] += protos[k]
            segs.append([t - 0.5, t + n - 0.5])
            labels.append(k)
            t += n + int(g.integers(4, 8))
        samples.append({"features": feats, "segments": np.array(segs, np.float32), "labels": np.array(labels), "video_id": f"v{v}"})
    return samples


def test_detector_satisfies_the_protocol_and_builds_from_its_config():
    model = build_detector(_tiny())
    assert isinstance(model, OnlineDetector) and isinstance(model, Detector)
    assert CONFIG_TYPES["online"] is OnlineConfig and model.pad_multiple == 4


@pytest.mark.parametrize("kind", KINDS)
def test_the_whole_model_is_causal(kind):
    model = _perturbed(build_detector(_tiny(kind)))
    x = torch.randn(1, C, 32)
    mask = torch.ones(1, 1, 32, dtype=torch.bool)
    logits, elapsed = model.outputs(x, mask)
    t = 13
    y = x.clone()
    y[..., t + 1 :] = 100 * torch.randn_like(y[..., t + 1 :])
    logits2, elapsed2 = model.outputs(y, mask)
    assert torch.equal(logits[..., : t + 1], logits2[..., : t + 1]) and torch.equal(elapsed[:, : t + 1], elapsed2[:, : t + 1])
    assert not torch.allclose(logits[..., t + 1 :], logits2[..., t + 1 :])  # the future does change the future


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_pushed_in_chunks_equals_the_offline_run(kind):
    model = _perturbed(build_detector(_tiny(kind)))
    feats = _samples(1, length=45, seed=2)[0]["features"]
    timing = FeatureTiming(fps=30, stride=4, window=16)
    expected = model.step_scores(feats)
    high, low = np.quantile(expected, [0.8, 0.6])  # thresholds inside the untrained model's range: instances to make
    rule = EventRuleConfig(start_threshold=float(high), end_threshold=float(low), patience=1, update_every=3)
    stream = model.stream(timing, rule)
    events, g, t = [], np.random.default_rng(0), 0
    while t < len(feats):
        n = int(g.integers(1, 7))
        events += stream.push(feats[t : t + n] if n > 1 else feats[t])  # [n, C] pushes and single [C] steps
        t += n
    events += stream.close()
    np.testing.assert_allclose(stream.scores(), expected, atol=1e-5, rtol=0)
    offline = model.stream_events(feats, timing, rule)
    assert len(offline) > 2 and any(e.kind == "end" for e in offline)
    assert [(e.kind, e.instance, e.label, e.step) for e in events] == [(e.kind, e.instance, e.label, e.step) for e in offline]
    for a, b in zip(events, offline):
        assert a.start == pytest.approx(b.start, abs=1e-4) and a.score == pytest.approx(b.score, abs=1e-5)


def test_a_bad_push_is_refused_and_consumes_nothing():
    model = build_detector(_tiny()).eval()
    stream = model.stream()
    stream.push(np.zeros((3, C), np.float32))
    bad = np.zeros((2, C), np.float32)
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        stream.push(bad)
    with pytest.raises(ValueError, match=rf"\[n, {C}\]"):
        stream.push(np.zeros((2, C + 1), np.float32))
    assert stream.steps == 3 and stream.scores().shape == (3, K)
    stream.push(np.zeros((1, C), np.float32))
    assert stream.steps == 4
    stream.close()
    with pytest.raises(ValueError, match="closed"):
        stream.push(np.zeros(C, np.float32))
    with pytest.raises(ValueError, match="eval mode"):
        build_detector(_tiny()).train().stream()


def test_a_video_alone_and_batched_with_a_longer_one_and_nan_padding_gives_identical_detections():
    model = _perturbed(build_detector(_tiny()))
    short, long = _samples(1, length=21)[0], _samples(1, length=60, seed=1)[0]
    high, low = np.quantile(model.step_scores(short["features"]), [0.8, 0.6])  # thresholds the untrained model crosses
    rule = EventRuleConfig(start_threshold=float(high), end_threshold=float(low), patience=1)
    model.config = replace(model.config, inference=replace(model.config.inference, rule=rule))
    alone = model(collate([short], model.pad_multiple))[0]
    batch = collate([long, short], model.pad_multiple)
    batch.features[1, :, 21:] = float("nan")
    together = model(batch)[1]
    assert len(alone) > 0
    torch.testing.assert_close(together.scores, alone.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.segments.data, alone.segments.data, atol=1e-4, rtol=0)


def test_elapsed_targets_follow_the_latest_started_segment():
    segs = torch.tensor([[1.5, 9.5], [4.5, 6.5]])
    elapsed, inside = elapsed_targets(segs, 12)
    assert inside.tolist() == [False, False, True, True, True, True, True, True, True, True, False, False]
    assert elapsed[2:10].tolist() == [0.5, 1.5, 2.5, 0.5, 1.5, 5.5, 6.5, 7.5]  # steps 5, 6 inside the later segment
    assert elapsed_targets(torch.zeros(0, 2), 5)[1].sum() == 0


def test_losses_are_finite_with_empty_ground_truth_and_every_parameter_gets_a_gradient():
    model = build_detector(_tiny(drop_path=0.1)).train()
    samples = _samples(2)
    samples[1] = dict(samples[1], segments=np.zeros((0, 2), np.float32), labels=np.zeros(0, np.int64))
    losses = model(collate(samples, model.pad_multiple))
    assert set(losses) == {"cls_loss", "elapsed_loss", "final_loss"} and all(torch.isfinite(v) for v in losses.values())
    losses["final_loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_overfits_a_few_videos_and_finds_their_segments_early():
    model = build_detector(_tiny()).train()
    samples = _samples(3, seed=3)
    batch = collate(samples, model.pad_multiple)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=0, epochs=300))
    first = None
    for _ in range(200):
        loss = model(batch)["final_loss"]
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.2 * first, (first, float(loss.detach()))
    model.eval()
    for s in samples:
        events = model.stream_events(s["features"])  # STEP_TIMING: seconds are steps
        ends = [e for e in events if e.kind == "end"]
        for seg, label in zip(s["segments"], s["labels"]):
            same = [e for e in ends if e.label == label]
            best = max(same, key=lambda e: float(tiou(torch.tensor([[e.start, e.end]]), torch.as_tensor(seg[None])).max()))
            assert float(tiou(torch.tensor([[best.start, best.end]]), torch.as_tensor(seg[None]))) > 0.7, (
                seg,
                [(e.start, e.end) for e in same],
            )
            start = next(e for e in events if e.kind == "start" and e.instance == best.instance)
            assert start.time - seg[0] <= 3.0  # reported within 3 steps of the true start, while it happens


def test_checkpoint_round_trip_gives_identical_events():
    model = _perturbed(build_detector(_tiny()))
    ckpt = Checkpoint.from_model(model, ["a", "b", "c"], {"feature_dim": C})
    rebuilt = load_checkpoint(io.BytesIO(checkpoint_bytes(ckpt))).build().eval()
    assert rebuilt.config == model.config and isinstance(rebuilt, OnlineDetector)
    feats = _samples(1, length=40)[0]["features"]
    assert np.array_equal(model.step_scores(feats), rebuilt.step_scores(feats))


def test_config_round_trips_refuses_bad_values_and_the_presets_load():
    cfg = _tiny()
    assert config_from_dict(OnlineConfig, config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="max_seq_len .* multiple"):
        replace(cfg, max_seq_len=30)
    with pytest.raises(ValueError, match="num_classes"):
        replace(cfg, num_classes=0)
    for name in ("thumos14-online", "demo-online"):
        preset = load_preset(name)
        assert preset.family == "online" and isinstance(preset.detector, OnlineConfig)
    assert load_preset("thumos14-online").detector.encoder.input_dim == 2048


def test_end_events_become_detections_in_seconds_clipped_to_the_duration():
    from tal_models.online.events import Event

    events = [
        Event("start", 0, 1, 0.2, None, 0.5, 1.0, 1),
        Event("end", 0, 1, -0.3, 5.0, 0.6, 5.2, 6),
        Event("end", 1, 0, 2.0, 9.0, 0.9, 9.1, 9),
    ]
    dets = events_to_detections("v", events, duration=8.0)
    assert dets.labels.tolist() == [0, 1] and dets.scores.tolist() == [0.9, 0.6]
    assert dets.segments.data.tolist() == [[2.0, 8.0], [0.0, 5.0]]
