"""The weakly supervised detector: config checks, targets and losses from video labels only, padding
invariance, an overfit from video labels that localizes, the checkpoint round trip, bf16 and the edge lengths."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from helpers import one_thread, seed_zero  # noqa: F401  (autouse fixtures)

from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, checkpoint_bytes, load_checkpoint
from tal_models.config import config_from_dict, config_to_dict
from tal_models.detectors import (
    CONFIG_TYPES,
    Detector,
    WeakConfig,
    WeakDetector,
    WeakInferenceConfig,
    WeakLossConfig,
    build_detector,
    config_type,
    weak_config,
)
from tal_models.detectors.weak import PAPER_CAM_THRESHOLDS, video_targets
from tal_models.postprocess import NMSConfig
from tal_models.structures import Unit, pairwise_tiou
from tal_models.timing import FeatureTiming
from tal_models.windows import TemporalScaleConfig

C, K = 8, 3


def small_config(**overrides) -> WeakConfig:
    fields = dict(num_classes=K, input_dim=C, hidden_dim=16, max_seq_len=64, dropout=0.0)
    return WeakConfig(**(fields | overrides))


def sample(vid: str, T: int, labels=(), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = list(labels)
    return {
        "video_id": vid,
        "features": torch.randn(T, C, generator=g),
        "segments": torch.tensor([[0.0, float(T)]] * len(labels)).reshape(-1, 2),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def perturbed(model: WeakDetector) -> WeakDetector:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # biases start at zero: make them count
    return model


# --- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"input_dim": True}, "input_dim"),
        ({"hidden_dim": 0}, "hidden_dim"),
        ({"kernel_size": 2}, "kernel_size"),
        ({"topk_ratio": 0}, "topk_ratio"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"dropout": 1.0}, "dropout"),
        ({"arch": "bmn"}, "arch"),
        ({"scale": TemporalScaleConfig()}, "scale"),
        ({"loss": WeakInferenceConfig()}, "loss"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_config(**overrides)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: WeakLossConfig(base_weight=-1.0), "base_weight"),
        (lambda: WeakLossConfig(sparsity_weight=math.nan), "sparsity_weight"),
        (lambda: WeakInferenceConfig(class_threshold=1.5), "class_threshold"),
        (lambda: WeakInferenceConfig(cam_thresholds=()), "cam_thresholds"),
        (lambda: WeakInferenceConfig(cam_thresholds=(0.1, 1.0)), "cam_thresholds"),
        (lambda: WeakInferenceConfig(inflation=-0.25), "inflation"),
        (lambda: WeakInferenceConfig(score_weight=True), "score_weight"),
        (lambda: WeakInferenceConfig(nms={"method": "hard"}), "nms"),
    ],
)
def test_section_configs_refuse_bad_values(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_preset_and_yaml_round_trip():
    cfg = weak_config(num_classes=20, input_dim=2048)
    assert (cfg.hidden_dim, cfg.kernel_size, cfg.dropout, cfg.topk_ratio, cfg.max_seq_len, cfg.scale) == (512, 3, 0.7, 8, 750, None)
    assert cfg.inference.cam_thresholds == PAPER_CAM_THRESHOLDS and len(PAPER_CAM_THRESHOLDS) == 10
    assert PAPER_CAM_THRESHOLDS[0] == 0.0 and PAPER_CAM_THRESHOLDS[-1] == 0.225
    assert (cfg.inference.nms.method, cfg.inference.nms.iou_threshold, cfg.inference.nms.max_detections) == ("hard", 0.6, 200)
    assert cfg.family == "weak" and cfg.task == "detection" and cfg.input_dim == 2048
    data = config_to_dict(cfg)
    assert config_from_dict(WeakConfig, data) == cfg
    assert CONFIG_TYPES["weak"] is WeakConfig and config_type("weak") is WeakConfig


def test_build_detector_protocol_and_parameter_count():
    model = build_detector(small_config())
    assert isinstance(model, WeakDetector) and isinstance(model, Detector) and model.pad_multiple == 1
    D = 16
    # embedding conv k3 C -> D, classifier 1x1 D -> K + 1, attention 1x1 D -> 1
    assert sum(p.numel() for p in model.parameters()) == (C * D * 3 + D) + (D * (K + 1) + K + 1) + (D + 1)
    # at the papers' width (2048 -> 2048, 20 classes + background): UM's CAS module (conv k3 + a bias-free
    # 1x1 classifier) is 12,627,968; ours adds the classifier's 21 biases and the 2,049 of the attention.
    # BaS-Net's (two k3 convs, the bias-free classifier, a 2048 -> 512 -> 1 filtering module) is 26,262,529.
    paper = WeakDetector(WeakConfig(num_classes=20, input_dim=2048, hidden_dim=2048))
    assert sum(p.numel() for p in paper.parameters()) == 12_630_038
    ours = WeakDetector(weak_config(num_classes=20, input_dim=2048))
    assert sum(p.numel() for p in ours.parameters()) == 3_157_526


# --- training ---------------------------------------------------------------------------------
def test_video_targets_background_and_empty_videos():
    labels = [torch.tensor([2, 0, 2]), torch.tensor([], dtype=torch.long)]
    base = video_targets(labels, K, 1.0, "cpu")
    supp = video_targets(labels, K, 0.0, "cpu")
    torch.testing.assert_close(base, torch.tensor([[1 / 3, 0.0, 1 / 3, 1 / 3], [0.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(supp, torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]]))


def test_training_reads_labels_only_and_uses_every_parameter():
    model = perturbed(WeakDetector(small_config())).train()
    a = collate([sample("a", 12, [2, 0]), sample("b", 7, [])], num_classes=K)
    b = collate([sample("a", 12, [2, 0]), sample("b", 7, [])], num_classes=K)
    b.segments = [torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.zeros(0, 2)]  # other segments, same labels
    la, lb = model(a), model(b)
    assert set(la) == {"base_loss", "suppressed_loss", "sparsity_loss", "final_loss"}
    for k in la:
        torch.testing.assert_close(la[k], lb[k])
    cfg = model.config.loss
    expected = cfg.base_weight * la["base_loss"] + cfg.suppressed_weight * la["suppressed_loss"] + cfg.sparsity_weight * la["sparsity_loss"]
    torch.testing.assert_close(la["final_loss"], expected)
    # the sparsity is the attention's L1 norm over each video's valid steps, averaged over videos
    _, _, attention = model.outputs(a.features, a.mask)
    torch.testing.assert_close(la["sparsity_loss"], (attention[0, 0, :12].sum() + attention[1, 0, :7].sum()) / 2)
    la["final_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # DDP: none unused


def test_padding_invariance_with_nan_padding():
    model = perturbed(WeakDetector(small_config())).eval()
    short, long = sample("short", 9, seed=1), sample("long", 23, seed=2)
    alone, batched = collate([short]), collate([short, long])
    batched.features[0, :, 9:] = math.nan  # whatever the padding holds
    torch.testing.assert_close(model.video_scores(batched)[0], model.video_scores(alone)[0])
    cas = model.cas(batched)
    assert cas.shape == (2, K, 23) and (cas[0, :, 9:] == 0).all()
    torch.testing.assert_close(cas[0, :, :9], model.cas(alone)[0])
    a, b = model(alone)[0], model(batched)[0]
    assert len(a) > 0 and a.labels.tolist() == b.labels.tolist()
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-6)
    np.testing.assert_allclose(b.segments.data, a.segments.data, rtol=1e-6)


def synthetic_videos(protos: torch.Tensor, spec, seed: int) -> list[dict]:
    """Videos of noise where class ``c``'s steps ``[a, b)`` carry its prototype; the segments handed to
    the batch are whole-video spans (the weak model must not read them)."""
    g = torch.Generator().manual_seed(seed)
    videos = []
    for i, (T, c, (a, b)) in enumerate(spec):
        x = 0.5 * torch.randn(T, C, generator=g)
        x[a:b] += protos[c]
        videos.append({"video_id": f"v{i}", "features": x, "segments": [[0.0, float(T)]], "labels": [c], "truth": (a, b, c)})
    return videos


def test_overfit_from_video_labels_localizes_the_actions():
    protos = 3.0 * torch.randn(K, C)
    spec = [(40, 0, (8, 20)), (48, 1, (20, 34)), (36, 2, (4, 14)), (44, 0, (25, 40)), (52, 1, (6, 22)), (40, 2, (18, 30))]
    videos = synthetic_videos(protos, spec, seed=1)
    cfg = small_config(hidden_dim=32, dropout=0.7, loss=WeakLossConfig(sparsity_weight=1e-2))
    model = WeakDetector(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = collate([{k: v for k, v in s.items() if k != "truth"} for s in videos], num_classes=K)
    model.train()
    first = None
    for _ in range(400):
        loss = model(batch)["final_loss"]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.4 * first
    model.eval()
    held_out = synthetic_videos(protos, spec, seed=2)  # the same layout, fresh noise
    for video in videos + held_out:
        a, b, c = video["truth"]
        det = model.detect(video["features"], video_id=video["video_id"])
        assert det.segments.unit is Unit.SECONDS and len(det) > 0
        top = det[0]
        # the top detection is the right class (the classes the video lacks are never first) at the right place
        assert int(top.labels[0]) == c, (video["video_id"], det.labels[:5])
        iou = float(pairwise_tiou(top.segments.data, np.array([[a, b]], dtype=np.float64))[0, 0])
        assert iou > 0.7, (video["video_id"], top.segments.data, (a, b))
    scores = model.video_scores(batch)
    truth = torch.tensor([c for _, c, _ in spec])
    assert (scores.argmax(dim=1) == truth).all()


# --- inference details ------------------------------------------------------------------------
def test_inference_class_threshold_seconds_and_nms():
    model = perturbed(WeakDetector(small_config())).eval()
    timing = FeatureTiming(fps=10.0, stride=2, window=4, offset=0.0)
    batch = collate([sample("a", 30, seed=3) | {"timing": timing, "duration": 6.2}])
    video = model.video_scores(batch)[0]
    only_best = WeakDetector(small_config(inference=WeakInferenceConfig(class_threshold=1.0)))
    only_best.load_state_dict(model.state_dict())
    dets = only_best.eval()(batch)[0]
    assert set(dets.labels.tolist()) == {int(video.argmax())}  # nothing passes 1.0: the best class alone
    every = WeakDetector(small_config(inference=WeakInferenceConfig(class_threshold=0.0, nms=NMSConfig(method="none"))))
    every.load_state_dict(model.state_dict())
    dets = every.eval()(batch)[0]
    assert set(dets.labels.tolist()) == set(range(K))
    assert dets.segments.unit is Unit.SECONDS
    assert (dets.segments.data[:, 0] >= 0).all() and (dets.segments.data[:, 1] <= 6.2).all()
    # the threshold 0 run is the whole video, steps [-0.5, 29.5]: (2 * -0.5 + 2) / 10 s to (2 * 29.5 + 2) / 10 s
    whole = [(s, e) for s, e in dets.segments.data.tolist() if (s, e) == (pytest.approx(0.1), pytest.approx(6.1))]
    assert len(whole) == K  # once per class (none suppressed: no NMS)
    # every score is the OIC plus gamma times the video score: positive, at most 1 + gamma
    assert (dets.scores > 0).all() and (dets.scores <= 1.0 + 0.2 + 1e-9).all()


def test_checkpoint_round_trip():
    model = perturbed(WeakDetector(small_config())).eval()
    names = ["jump", "run", "throw"]
    restored = load_checkpoint(io.BytesIO(checkpoint_bytes(Checkpoint.from_model(model, names))))
    assert restored.config == model.config and restored.label_map.names == names
    rebuilt = restored.build()
    assert isinstance(rebuilt, WeakDetector) and not rebuilt.training
    feats = sample("x", 21, seed=6)["features"]
    a, b = model.detect(feats, duration=5.0), rebuilt.detect(feats, duration=5.0)
    assert len(a) > 0 and a.labels.tolist() == b.labels.tolist()
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.segments.data, b.segments.data)


def test_edge_lengths_empty_labels_and_bf16():
    model = perturbed(WeakDetector(small_config())).eval()
    one = model.detect(torch.randn(1, C))
    assert len(one) >= 1 and torch.isfinite(torch.as_tensor(one.scores)).all()
    other = sample("b", 6, seed=7)
    batch = collate([{"video_id": "empty", "features": np.zeros((0, C), np.float32)}, other])
    dets = model(batch)
    assert len(dets[0]) == 0 and torch.isfinite(model.video_scores(batch)).all()
    torch.testing.assert_close(model.video_scores(batch)[1], model.video_scores(collate([other]))[0])
    model.train()
    batch = collate([sample("a", 6, [1]), sample("b", 13, []), sample("c", 1, [0, 2])], num_classes=K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    losses["final_loss"].backward()
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dets = model(batch)
    assert len(dets) == 3 and all(torch.isfinite(torch.as_tensor(d.scores)).all() for d in dets)
