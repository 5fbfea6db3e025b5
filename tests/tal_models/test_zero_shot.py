"""The training-free zero-shot detector (tal_models.detectors.zero_shot): the curve functions by hand, detection on a
hand-built video, class sets per call, padding, checkpoints, config validation and edge cases."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import one_thread, seed_zero  # noqa: F401

from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, checkpoint_bytes, load_checkpoint
from tal_models.config import config_from_dict, config_to_dict
from tal_models.detectors import Detector, ZeroShotConfig, ZeroShotDetector, build_detector, config_type, zero_shot_config
from tal_models.detectors.zero_shot import curve_threshold, min_max_normalize, outer_inner_contrast, runs_above, smooth_curve
from tal_models.structures import Segments, Unit, pairwise_tiou
from tal_models.text import TextEncoderConfig
from tal_models.timing import FeatureTiming

C, K = 16, 4
TEXT = TextEncoderConfig(kind="table", weights="names.npz")


def _classes(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(K, C, generator=g)
    return e / e.norm(dim=1, keepdim=True)


def _video(classes: torch.Tensor, segments=((2, 20, 40),), length: int = 64, seed: int = 1, noise: float = 0.1) -> np.ndarray:
    """``[length, C]``: background frames (random directions) and, on each ``(class, start, end)``, the class's text
    embedding plus small noise."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(length, C, generator=g)
    frames = frames / frames.norm(dim=1, keepdim=True)
    for k, s, e in segments:
        frames[s:e] = classes[k] + noise * torch.randn(e - s, C, generator=g)
    return frames.numpy()


def _model(**kw) -> ZeroShotDetector:
    model = build_detector(replace(zero_shot_config(num_classes=K, input_dim=C, text=TEXT), **kw))
    model.set_class_embeddings(_classes())
    return model.eval()


def _tiou(dets, start: float, end: float) -> float:
    truth = Segments(torch.tensor([[start, end]], dtype=torch.float64), Unit.SECONDS)
    return float(pairwise_tiou(Segments(dets.segments.data[:1].double(), Unit.SECONDS), truth)[0, 0])


# --- the curve, by hand -------------------------------------------------------------------------------------
def test_gaussian_and_moving_average_smoothing_by_hand():
    impulse = torch.tensor([0.0, 0, 0, 1, 0, 0, 0])
    total = 1 + 2 * (math.exp(-0.5) + math.exp(-2) + math.exp(-4.5))  # sigma 1: kernel truncated at 3 steps
    smoothed = smooth_curve(impulse, "gaussian", sigma=1.0)
    torch.testing.assert_close(smoothed[3], torch.tensor(1 / total))
    torch.testing.assert_close(smoothed[2], torch.tensor(math.exp(-0.5) / total))
    torch.testing.assert_close(smoothed[0], torch.tensor(math.exp(-4.5) / total))
    torch.testing.assert_close(smoothed.sum(), torch.tensor(1.0))
    torch.testing.assert_close(smooth_curve(torch.tensor([0.0, 0, 3, 0, 0]), "moving_average", window=3), torch.tensor([0.0, 1, 1, 1, 0]))
    torch.testing.assert_close(smooth_curve(torch.tensor([2.0, 0, 0, 0]), "moving_average", window=3), torch.tensor([4 / 3, 2 / 3, 0, 0]))
    torch.testing.assert_close(smooth_curve(torch.full((3,), 0.7), "gaussian", sigma=2.0), torch.full((3,), 0.7))  # ends replicated
    assert torch.equal(smooth_curve(impulse, "none"), impulse)


def test_threshold_runs_and_contrast_by_hand():
    curve = torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 0])
    level = curve_threshold(curve, "std", alpha=0.0)  # the mean, 3 / 8
    torch.testing.assert_close(level, torch.tensor(0.375))
    assert runs_above(curve, level).tolist() == [[2, 4], [6, 7]]
    assert runs_above(curve, level, min_length=2).tolist() == [[2, 4]]
    std = math.sqrt(0.375 * 0.625)
    torch.testing.assert_close(curve_threshold(curve, "std", alpha=1.5), torch.tensor(0.375 + 1.5 * std))
    assert runs_above(curve, curve_threshold(curve, "std", alpha=1.5)).shape == (0, 2)
    ramp = torch.tensor([0.0, 1, 2, 3, 4])
    assert runs_above(ramp, curve_threshold(ramp, "quantile", quantile=0.5)).tolist() == [[3, 5]]  # above the median, 2
    assert runs_above(torch.ones(4), 0.5).tolist() == [[0, 4]]
    # inside minus the outer neighbourhood (one step each side here): 1 - (0.5 + 0.2) / 2
    bump = torch.tensor([0.0, 0.5, 1, 1, 1, 1, 0.2, 0])
    torch.testing.assert_close(outer_inner_contrast(bump, torch.tensor([[2, 6]]), inflation=0.25), torch.tensor([0.65]))
    # at the video's start only the right side exists; a run over the whole video has no outside (0)
    edge = torch.tensor([1.0, 1, 0, 0])
    torch.testing.assert_close(outer_inner_contrast(edge, torch.tensor([[0, 2], [0, 4]]), inflation=0.25), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(min_max_normalize(torch.tensor([2.0, 4, 3])), torch.tensor([0.0, 1, 0.5]))
    assert torch.equal(min_max_normalize(torch.full((5,), 0.3)), torch.zeros(5))


# --- the detector ---------------------------------------------------------------------------------------
def test_top_detection_is_the_video_class_at_its_segment():
    model = _model()
    dets = model.detect(_video(_classes()))
    assert len(dets) > 0 and int(dets.labels[0]) == 2
    assert _tiou(dets, 20.0, 40.0) > 0.7, f"top segment {dets.segments.data[0].tolist()}"
    assert set(dets.labels.tolist()) == {2}  # video_top_k 1: one class per video
    assert 0 < float(dets.scores[0]) <= 1


def test_seconds_through_the_timing_and_each_class_of_a_two_class_video():
    classes = _classes()
    video = _video(classes, segments=((1, 6, 22), (3, 40, 58)))
    dets = _model(video_top_k=2).detect(video)
    best = {}
    for label, seg in zip(dets.labels.tolist(), dets.segments.data.tolist()):
        best.setdefault(label, seg)
    assert set(best) == {1, 3}
    assert abs(best[1][0] - 6) <= 2 and abs(best[1][1] - 22) <= 2 and abs(best[3][0] - 40) <= 2 and abs(best[3][1] - 58) <= 2
    timing = FeatureTiming(fps=30.0, stride=4, window=16)
    in_seconds = _model(video_top_k=2).detect(video, timing=timing, duration=100.0)
    assert in_seconds.segments.unit is Unit.SECONDS
    np.testing.assert_allclose(in_seconds.segments.data.numpy(), timing.step_to_seconds(dets.segments.data.double().numpy()), rtol=1e-6)


def test_class_embeddings_per_call_name_other_classes_and_leave_the_buffer():
    model = _model()
    before = model.class_embeddings.clone()
    classes = _classes()
    video = _video(classes)
    unseen = torch.cat([torch.randn(2, C), 5.0 * classes[2:3]])  # the video's class as the third of a new set
    dets = model.detect(video, class_embeddings=unseen)
    assert int(dets.labels[0]) == 2 and _tiou(dets, 20.0, 40.0) > 0.7
    dets = model.detect(video, class_embeddings=classes[[2, 0]])
    assert int(dets.labels[0]) == 0
    assert torch.equal(model.class_embeddings, before)
    with pytest.raises(ValueError, match=r"\[K, text_dim=16\]"):
        model.detect(video, class_embeddings=torch.randn(3, C + 1))


def test_padding_and_the_batch_change_nothing():
    model = _model()
    classes = _classes()
    short = {"features": _video(classes, length=50, segments=((2, 10, 30),)), "video_id": "short"}
    long = {"features": _video(classes, length=90, seed=2, segments=((0, 40, 70),)), "video_id": "long"}
    alone = model.forward_inference(collate([short], model.pad_multiple))[0]
    batch = collate([short, long], model.pad_multiple)
    batch.features[0, :, 50:] = float("nan")
    together = model.forward_inference(batch)
    assert len(alone) > 0
    assert torch.equal(alone.segments.data, together[0].segments.data) and torch.equal(alone.scores, together[0].scores)
    assert torch.equal(alone.labels, together[0].labels)
    assert int(together[1].labels[0]) == 0


def test_training_is_refused():
    model = _model().train()
    batch = collate([{"features": _video(_classes()), "video_id": "v", "segments": np.zeros((0, 2), np.float32)}], 1)
    with pytest.raises(ValueError, match="the zero_shot family is training-free"):
        model(batch)
    params = list(model.parameters())
    assert len(params) == 1 and not params[0].requires_grad and params[0].item() == pytest.approx(0.01)


def test_checkpoint_round_trip():
    model = _model(temperature=0.02, smoothing="moving_average", smooth_window=3)
    ckpt = Checkpoint.from_model(model, ["a", "b", "c", "d"], {"feature_dim": C})
    loaded = load_checkpoint(io.BytesIO(checkpoint_bytes(ckpt)))
    assert loaded.config == model.config and config_type("zero_shot") is ZeroShotConfig
    rebuilt = loaded.build()
    assert isinstance(rebuilt, ZeroShotDetector) and isinstance(rebuilt, Detector) and rebuilt.pad_multiple == 1
    assert torch.equal(rebuilt.class_embeddings, model.class_embeddings)
    assert rebuilt.temperature.item() == pytest.approx(0.02) and not rebuilt.temperature.requires_grad
    video = _video(_classes())
    a, b = model.detect(video), rebuilt.detect(video)
    assert len(a) > 0 and torch.equal(a.segments.data, b.segments.data) and torch.equal(a.scores, b.scores)


def test_edge_cases_one_step_empty_constant_and_bf16():
    model = _model()
    one = model.detect(np.ones((1, C), np.float32))  # a constant curve: nothing stands out
    assert len(one) == 0
    assert len(model.detect(np.tile(_classes()[1].numpy(), (30, 1)))) == 0
    segs, scores, labels = model.candidates_single_video(torch.zeros(0, C), _classes())
    assert segs.shape == (0, 2) and scores.shape == (0,) and labels.shape == (0,)
    video = _video(_classes())
    batch = collate([{"features": video, "video_id": "v"}], 1)
    batch.features = batch.features.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dets = model.forward_inference(batch)[0]
    assert int(dets.labels[0]) == 2 and _tiou(dets, 20.0, 40.0) > 0.7
    fresh = build_detector(zero_shot_config(num_classes=K, input_dim=C, text=TEXT))  # embeddings never set: no detection
    assert len(fresh.detect(video)) == 0


def test_config_round_trip_and_validation():
    config = zero_shot_config(num_classes=K, input_dim=C, text=TEXT, video_top_k=2)
    assert config_from_dict(ZeroShotConfig, config_to_dict(config)) == config
    assert ZeroShotConfig().text.kind == "open_clip"
    assert zero_shot_config(num_classes=K, input_dim=C, text={"kind": "table", "weights": "names.npz"}, video_top_k=2) == config
    for change, message in [
        ({"text": TextEncoderConfig()}, "ZeroShotConfig.text must name a text encoder"),
        ({"temperature": 0.0}, "ZeroShotConfig.temperature must be > 0"),
        ({"smooth_window": 4}, "ZeroShotConfig.smooth_window must be odd"),
        ({"quantile": 1.0}, r"ZeroShotConfig.quantile must be in \[0, 1\)"),
        ({"video_top_k": 0}, "ZeroShotConfig.video_top_k must be a positive int"),
        ({"smoothing": "median"}, "ZeroShotConfig.smoothing must be"),
        ({"threshold": "otsu"}, "ZeroShotConfig.threshold must be"),
        ({"inflation": 0.0}, "ZeroShotConfig.inflation must be > 0"),
        ({"arch": "t3al"}, "ZeroShotConfig.arch must be 'zero_shot'"),
    ]:
        with pytest.raises(ValueError, match=message):
            replace(config, **change)
    model = build_detector(config)
    with pytest.raises(ValueError, match=r"one row per class \(4\)"):
        model.set_class_embeddings(torch.randn(K + 1, C))
    with pytest.raises(ValueError, match="ZeroShotConfig.input_dim"):
        model.set_class_embeddings(torch.randn(K, C + 2))
