"""The video-level classifier: config checks, padding invariance, an overfit, the checkpoint round
trip, the Detector protocol (whole-video detections), bf16 and the edge lengths."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread, seed_zero  # noqa: F401  (autouse fixtures)

from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, checkpoint_bytes, load_checkpoint
from tal_models.config import config_from_dict, config_to_dict
from tal_models.detectors import (
    CONFIG_TYPES,
    ClassifierInferenceConfig,
    Detector,
    VideoClassifier,
    VideoClassifierConfig,
    build_detector,
    config_type,
    video_classifier_config,
)
from tal_models.detectors.classifier import multi_hot, video_span
from tal_models.postprocess import fuse_video_classifier
from tal_models.structures import Detections, Segments, Unit
from tal_models.timing import STEP_TIMING, FeatureTiming

C, K = 8, 4


def small_config(**overrides) -> VideoClassifierConfig:
    fields = dict(num_classes=K, input_dim=C, hidden_dim=16, max_seq_len=64, dropout=0.0)
    return VideoClassifierConfig(**(fields | overrides))


def sample(vid: str, T: int, labels=(), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = list(labels)
    return {
        "video_id": vid,
        "features": torch.randn(T, C, generator=g),
        "segments": torch.tensor([[1.0, T - 1.0]] * len(labels)).reshape(-1, 2),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


# --- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"input_dim": -1}, "input_dim"),
        ({"input_dim": True}, "input_dim"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"num_layers": 0}, "num_layers"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"arch": "actionformer"}, "arch"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_config(**overrides)


def test_config_top_k_and_yaml_round_trip():
    with pytest.raises(ValueError, match="top_k"):
        ClassifierInferenceConfig(top_k=0)
    cfg = video_classifier_config(num_classes=200, input_dim=2048, top_k=5)
    assert (cfg.hidden_dim, cfg.num_layers, cfg.kernel_size, cfg.dropout, cfg.max_seq_len) == (256, 2, 3, 0.5, 2304)
    assert cfg.family == "video_classifier" and cfg.task == "classification" and cfg.input_dim == 2048
    data = config_to_dict(cfg)
    assert "family" not in data and "task" not in data  # ClassVars: the checkpoint stores the family beside the config
    assert config_from_dict(VideoClassifierConfig, data) == cfg
    assert CONFIG_TYPES["video_classifier"] is VideoClassifierConfig and config_type("video_classifier") is VideoClassifierConfig
    with pytest.raises(ValueError, match="hidden"):
        config_from_dict(VideoClassifierConfig, data | {"hiden_dim": 3})


def test_build_detector_and_protocol():
    model = build_detector(small_config())
    assert isinstance(model, VideoClassifier) and isinstance(model, Detector)
    assert model.pad_multiple == 1
    # num_layers masked convolutions (C -> D, D -> D), kernel 3, their LayerNorms, then a linear on [mean, max]
    D = 16
    expected = (C * D * 3 + D) + (D * D * 3 + D) + 2 * (2 * D) + (2 * D * K + K)
    assert sum(p.numel() for p in model.parameters()) == expected


# --- the forward paths ------------------------------------------------------------------------
def test_training_loss_is_bce_against_the_labels_present():
    model = VideoClassifier(small_config()).train()
    batch = collate([sample("a", 10, [2, 0, 2]), sample("b", 7, [])], num_classes=K)  # b: a crop without any segment
    targets = multi_hot(batch.labels, K, "cpu")
    assert targets.tolist() == [[1, 0, 1, 0], [0, 0, 0, 0]]
    losses = model(batch)
    assert set(losses) == {"cls_loss", "final_loss"}
    expected = F.binary_cross_entropy_with_logits(model.logits(batch.features, batch.mask), targets)
    torch.testing.assert_close(losses["final_loss"], expected)
    losses["final_loss"].backward()
    assert all(p.grad is not None for p in model.parameters())  # none unused: DDP needs no find_unused_parameters


def test_padding_invariance_with_nan_padding():
    model = VideoClassifier(small_config(num_layers=3)).eval()
    short, long = sample("short", 9, seed=1), sample("long", 23, seed=2)
    alone = collate([short])
    batched = collate([short, long])
    batched.features[0, :, 9:] = math.nan  # whatever the padding holds
    with torch.no_grad():
        torch.testing.assert_close(model.logits(batched.features, batched.mask)[0], model.logits(alone.features, alone.mask)[0])
    a, b = model(alone)[0], model(batched)[0]
    assert a.labels.tolist() == b.labels.tolist()
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-6)
    np.testing.assert_array_equal(b.segments.data, a.segments.data)


def test_overfit_few_videos_multi_label():
    """Four videos whose classes are written into part of their features: the probabilities of the
    right classes pass 0.9 and the others stay low."""
    torch.manual_seed(0)
    protos = 3.0 * torch.randn(K, C)
    videos = []
    for i, (T, labels) in enumerate([(20, [0]), (32, [1]), (15, [2, 3]), (26, [3])]):
        x = 0.5 * torch.randn(T, C)
        for j, c in enumerate(labels):
            x[2 + 6 * j : 8 + 6 * j] += protos[c]  # the action covers a few steps, not the video
        videos.append({"video_id": f"v{i}", "features": x, "segments": [[2.0, 8.0]] * len(labels), "labels": labels})
    model = VideoClassifier(small_config(dropout=0.5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = collate(videos, num_classes=K)
    model.train()
    first = None
    for _ in range(150):
        loss = model(batch)["final_loss"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1 * first
    probs = np.stack([model.classify(v["features"]) for v in videos])  # [4, K]
    assert model.training  # classify keeps the mode
    truth = multi_hot([torch.tensor(v["labels"]) for v in videos], K, "cpu").bool().numpy()
    assert probs[truth].min() > 0.9, probs
    assert probs[~truth].max() < 0.1, probs


def test_forward_inference_gives_top_k_whole_video_detections():
    model = VideoClassifier(small_config(inference=ClassifierInferenceConfig(top_k=3))).eval()
    timing = FeatureTiming(fps=10.0, stride=2, window=4, offset=0.0)
    batch = collate(
        [
            sample("a", 12, seed=3) | {"timing": timing, "duration": 2.6},
            sample("b", 5, seed=4) | {"timing": timing, "duration": None},
        ]
    )
    dets = model(batch)
    probs = model.class_scores(batch)
    for i, det in enumerate(dets):
        assert len(det) == 3 and det.segments.unit is Unit.SECONDS
        order = torch.sort(probs[i], descending=True, stable=True).indices[:3]
        assert det.labels.tolist() == order.tolist()
        np.testing.assert_allclose(det.scores, probs[i, order].double().numpy())
    np.testing.assert_allclose(dets[0].segments.data, [[0.0, 2.6]] * 3)
    # no duration: the clips' span, from the first frame of clip 0 to the last frame of clip 4 ((4 * 2 + 4) / 10 s)
    np.testing.assert_allclose(dets[1].segments.data, [[0.0, 1.2]] * 3)
    # more classes asked than there are: all of them
    everything = VideoClassifier(small_config(inference=ClassifierInferenceConfig(top_k=10))).eval()
    assert sorted(everything(batch)[0].labels.tolist()) == list(range(K))


def test_video_span_without_timing_is_in_steps():
    assert video_span(7, STEP_TIMING, None) == (0.0, 6.5)  # step i stands for [i - 0.5, i + 0.5], clipped at 0
    assert video_span(7, STEP_TIMING, 3.0) == (0.0, 3.0)
    assert video_span(3, FeatureTiming(fps=5.0, stride=5, window=5, offset=10.0), None) == (10.0, 13.0)


def test_detect_classify_and_fusion():
    model = VideoClassifier(small_config(inference=ClassifierInferenceConfig(top_k=2))).eval()
    feats = sample("x", 11, seed=5)["features"]
    probs = model.classify(feats.numpy())
    assert probs.shape == (K,) and probs.dtype == np.float32 and ((probs > 0) & (probs < 1)).all()
    np.testing.assert_allclose(probs, model.classify(feats), rtol=1e-6)  # NumPy or torch alike
    det = model.detect(feats, duration=4.0, video_id="x")
    assert det.video_id == "x" and det.labels.tolist() == np.argsort(-probs, kind="stable")[:2].tolist()
    with pytest.raises(ValueError, match="NaN"):
        model.classify(torch.full((3, C), math.nan))
    with pytest.raises(ValueError, match=rf"\[T, {C}\]"):
        model.classify(torch.zeros(3, C + 1))
    # the classifier's scores name a class-agnostic detector's detections
    agnostic = Detections("x", Segments(np.array([[0.5, 1.5], [2.0, 3.0]]), Unit.SECONDS), np.array([0.8, 0.4]), np.zeros(2, np.int64))
    fused = fuse_video_classifier(agnostic, probs, top_k=2)
    assert len(fused) == 4 and set(fused.labels.tolist()) == set(det.labels.tolist())


def test_empty_video_in_a_batch():
    """A sample without steps (a batch may carry one): finite probabilities, its own neighbour unchanged."""
    model = VideoClassifier(small_config()).eval()
    other = sample("b", 6, seed=7)
    batch = collate([{"video_id": "empty", "features": np.zeros((0, C), np.float32), "duration": 1.5}, other])
    probs = model.class_scores(batch)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs[1], model.class_scores(collate([other]))[0])
    np.testing.assert_allclose(model(batch)[0].segments.data, [[0.0, 1.5]] * 3)


def test_one_step_and_bf16():
    model = VideoClassifier(small_config()).eval()
    one = model.classify(torch.randn(1, C))
    assert one.shape == (K,) and np.isfinite(one).all()
    model.train()
    batch = collate([sample("a", 6, [1]), sample("b", 13, [0, 3])], num_classes=K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert losses["final_loss"].dtype == torch.float32 and torch.isfinite(losses["final_loss"])
    losses["final_loss"].backward()


def test_checkpoint_round_trip():
    model = VideoClassifier(small_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases start at zero: make them count
    model.eval()
    names = ["jump", "run", "throw", "swim"]
    restored = load_checkpoint(io.BytesIO(checkpoint_bytes(Checkpoint.from_model(model, names))))
    assert restored.config == model.config and restored.label_map.names == names
    rebuilt = restored.build()
    assert isinstance(rebuilt, VideoClassifier) and not rebuilt.training
    feats = sample("x", 17, seed=6)["features"]
    np.testing.assert_array_equal(rebuilt.classify(feats), model.classify(feats))
    a, b = model.detect(feats, duration=5.0), rebuilt.detect(feats, duration=5.0)
    assert a.labels.tolist() == b.labels.tolist()
    np.testing.assert_array_equal(a.scores, b.scores)
