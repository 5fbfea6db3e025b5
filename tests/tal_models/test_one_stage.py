"""The one-stage detectors (tal_models.detectors.one_stage): shapes, masking, empty ground truth, overfitting, presets, checkpoints."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch

from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, CheckpointError, checkpoint_bytes, load_checkpoint, save_checkpoint
from tal_models.config import config_from_dict, config_to_dict
from tal_models.detectors import ARCHS, DetectorConfig, build_detector
from tal_models.detectors.one_stage import DENSE_ONLY_ARCHS
from tal_models.evaluation.detection import evaluate_detection
from tal_models.optim import OptimConfig, build_optimizer
from tal_models.presets import load_preset, make_config, preset_names
from tal_models.refine import RefineConfig
from tal_models.structures import AnnotationSet, LabelMap, Segments, Unit, VideoAnnotation
from tal_models.timing import FeatureTiming
from tal_models.training import train_one_epoch

C, K = 16, 3


# every detection arch, and two with boundary refinement switched on ("+brn")
DETECTION_ARCHS = tuple(a for a in ARCHS if a not in DENSE_ONLY_ARCHS)
VARIANTS = DETECTION_ARCHS + ("actionformer+brn", "tridet+brn")


def _tiny(arch: str, levels: int = 4, **kw):
    arch, _, refine = arch.partition("+")
    if refine:
        kw["refine"] = RefineConfig(kind=refine, hidden_dim=16)
    return make_config(arch, num_classes=K, input_dim=C, max_seq_len=128, embed_dim=32, levels=levels, **kw)


def _samples(num_videos: int = 4, length: int = 128, seed: int = 0, noise: float = 0.3):
    """Videos of class prototypes (one random direction per class) inside segments, noise around."""
    g = np.random.default_rng(seed)
    protos = g.standard_normal((K, C)).astype(np.float32)
    samples = []
    for v in range(num_videos):
        feats = noise * g.standard_normal((length, C)).astype(np.float32)
        segs, labels, t = [], [], int(g.integers(2, 10))
        while True:
            n = int(g.integers(6, 40))
            if t + n >= length - 2:
                break
            k = int(g.integers(K))
            feats[t : t + n] += protos[k]
            segs.append([t, t + n])
            labels.append(k)
            t += n + int(g.integers(4, 20))
        samples.append({"features": feats, "segments": np.array(segs, np.float32), "labels": np.array(labels), "video_id": f"v{v}"})
    return samples


def _ground_truth(samples) -> AnnotationSet:
    videos = {s["video_id"]: VideoAnnotation(s["video_id"], Segments(s["segments"].astype(np.float64)), s["labels"]) for s in samples}
    return AnnotationSet(videos, LabelMap.from_names([f"c{k}" for k in range(K)]))


@pytest.mark.parametrize("arch", VARIANTS)
def test_dense_output_shapes_per_level(arch):
    model = build_detector(_tiny(arch)).eval()
    batch = collate(_samples(2, length=100), model.pad_multiple)  # T padded 100 -> 104 (multiple of 8)
    assert batch.features.shape == (2, C, 104)
    out = model.dense(batch.features, batch.mask)
    assert out.points.level_lengths == (104, 52, 26, 13)
    assert out.cls_logits.shape == (2, 104 + 52 + 26 + 13, K)
    assert out.reg_offsets.shape == (2, 195, 2)
    assert out.valid.shape == (2, 195)
    assert int(out.valid[0, :104].sum()) == 100  # level 0: the 100 real steps
    assert (out.reg_offsets >= 0).all()
    assert (out.cls_logits[~out.valid] == 0).all() and (out.reg_offsets[~out.valid] == 0).all()


@pytest.mark.parametrize("arch", VARIANTS)
def test_padding_changes_nothing_at_valid_points(arch):
    torch.manual_seed(0)
    model = build_detector(_tiny(arch)).eval()
    sample = _samples(1, length=80)[0]
    alone = collate([sample], model.pad_multiple)  # T = 80
    other = dict(_samples(1, length=150, seed=1)[0], video_id="long")
    together = collate([sample, other], model.pad_multiple)  # T = 152: 72 padded steps for `sample`
    together.features[0, :, 80:] = 1e4 * torch.randn(C, 72)  # whatever padding holds
    a = model.dense(alone.features, alone.mask)
    b = model.dense(together.features[:1], together.mask[:1])
    for la, lb in zip(a.points.level_slices(), b.points.level_slices()):
        va = a.valid[0, la]
        n = int(va.sum())
        assert bool(b.valid[0, lb][:n].all())
        torch.testing.assert_close(b.cls_logits[0, lb][:n], a.cls_logits[0, la][:n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.reg_offsets[0, lb][:n], a.reg_offsets[0, la][:n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", VARIANTS)
def test_gradients_finite_with_empty_ground_truth(arch):
    model = build_detector(_tiny(arch)).train()
    samples = _samples(2)
    for s in samples:
        s["segments"], s["labels"] = np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    losses = model(collate(samples, model.pad_multiple))
    assert losses["reg_loss"].item() == 0.0 and losses["cls_loss"].item() > 0
    losses["final_loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_labels_outside_the_model_are_refused_when_batched():
    """Labels are checked once, on the host, where the batch is made (the forward pass waits for nothing)."""
    model = build_detector(_tiny("actionformer")).train()
    samples = _samples(1)
    samples[0]["labels"] = np.full_like(samples[0]["labels"], K)
    with pytest.raises(ValueError, match=r"video 'v0': labels must lie in \[0, 3\)"):
        collate(samples, model.pad_multiple, num_classes=model.config.num_classes)
    samples[0]["labels"] = samples[0]["labels"][:-1]
    with pytest.raises(ValueError, match=r"video 'v0' has \d+ segments but \d+ labels"):
        collate(samples, model.pad_multiple)


@pytest.mark.parametrize("arch", VARIANTS)
def test_each_detector_overfits_a_handful_of_sequences(arch):
    """A few synthetic videos, 60 full-batch steps on CPU: mAP@0.5 >= 0.95 (untrained: < 0.2)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    samples = _samples(4)
    gt = _ground_truth(samples)
    model = build_detector(_tiny(arch))
    batch = collate(samples, model.pad_multiple)

    def map_at(thresholds):
        model.eval()
        dets = model(batch)
        return evaluate_detection(gt, {d.video_id: d for d in dets}, thresholds).mAP

    before = map_at([0.5])[0]
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=0, epochs=60))
    for _ in range(60):
        stats = train_one_epoch(model, [batch], optimizer, None, clip_grad_norm=1.0)
    after = map_at([0.5, 0.7])
    assert before < 0.2, f"untrained {arch} should not already detect: mAP@0.5 {before}"
    assert after[0] >= 0.95, f"{arch}: mAP@0.5 {after[0]:.3f} after overfitting (losses {stats})"


def test_detect_reports_seconds_through_the_feature_timing():
    torch.manual_seed(0)
    model = build_detector(_tiny("temporalmaxer"))
    sample = _samples(1)[0]
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=0, epochs=60))
    batch = collate([sample], model.pad_multiple)
    for _ in range(60):
        train_one_epoch(model, [batch], optimizer, None)
    in_steps = model.detect(sample["features"])
    timing = FeatureTiming(fps=30.0, stride=4, window=16, offset=2.0)
    in_seconds = model.detect(sample["features"], timing=timing, duration=1000.0)
    assert in_seconds.segments.unit is Unit.SECONDS
    expected = timing.step_to_seconds(in_steps.segments.data[:5].double().numpy())
    np.testing.assert_allclose(in_seconds.segments.data[:5].double().numpy(), expected, rtol=1e-5)
    clipped = model.detect(sample["features"], timing=timing, duration=5.0)
    assert float(clipped.segments.data.max()) <= 5.0
    assert model.training, "detect() must give the model back in the mode it found it"


@pytest.mark.parametrize(
    ("features", "message"),
    [(np.zeros((10, C + 1), np.float32), r"features must be \[T, 16\]"), (np.full((10, C), np.nan, np.float32), "NaN")],
)
def test_detect_refuses_bad_features(features, message):
    model = build_detector(_tiny("actionformer"))
    with pytest.raises(ValueError, match=message):
        model.detect(features)


# --- configs and presets -------------------------------------------------------------------
def test_config_round_trips_through_a_dict_and_refuses_unknown_keys():
    config = make_config("tridet", num_classes=7, input_dim=64, max_seq_len=256, embed_dim=32, levels=5)
    assert config_from_dict(DetectorConfig, config_to_dict(config)) == config
    data = config_to_dict(config)
    data["encoder"]["windw"] = 9
    with pytest.raises(ValueError, match=r"OneStageConfig.encoder: unknown key\(s\) \['windw'\]"):
        config_from_dict(DetectorConfig, data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_seq_len": 100}, "multiple of 2\\*\\*\\(levels - 1\\) = 32"),
        ({"num_classes": 0}, "num_classes must be a positive int"),
        ({"arch": "yolo"}, "arch must be one of"),
        ({"regression_ranges": ((0, 4),)}, "1 regression ranges"),
    ],
)
def test_config_errors_say_what_to_fix(change, message):
    with pytest.raises(ValueError, match=message):
        replace(DetectorConfig(), **change)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_builds(name):
    preset = load_preset(name)
    assert preset.name == name and name.split("-")[1] in preset.detector.arch  # data set - arch [- recipe] ("classifier": video_classifier)
    model = build_detector(preset.detector)
    assert sum(p.numel() for p in model.parameters()) > 0
    if preset.family != "one_stage":  # BMN, TadTR, the classifier: their own tests (test_bmn, test_tadtr, test_fused)
        return
    if name.startswith("anet"):
        assert preset.detector.num_classes == 1 and preset.detector.max_seq_len == 192
    if name.startswith("thumos14"):
        assert (preset.detector.num_classes, preset.detector.input_dim, preset.detector.max_seq_len) == (20, 2048, 2304)
        assert preset.detector.encoder.levels == 6


def test_thumos14_actionformer_preset_has_the_reference_size():
    """actionformer==1.5.0 with thumos_i3d.yaml has 29.25 M parameters (issue 4)."""
    model = build_detector(load_preset("thumos14-actionformer").detector)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 29.25


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="thumos14-actionformer"):
        load_preset("thumos15-actionformer")


# --- checkpoints ---------------------------------------------------------------------------
PROVENANCE = {
    "backbone": "i3d",
    "backbone_weights": "x.pt",
    "backbone_sha256": "ab",
    "feature_dim": C,
    "fps": 30.0,
    "stride": 4,
    "window": 16,
}


@pytest.mark.parametrize("arch", VARIANTS)
def test_checkpoint_round_trip_reproduces_outputs_exactly(arch, tmp_path):
    torch.manual_seed(0)
    model = build_detector(_tiny(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initial values
    ckpt = Checkpoint.from_model(model, ["a", "b", "c"], PROVENANCE, {"epoch": 3})
    path = tmp_path / "model.pt"
    save_checkpoint(ckpt, path)
    loaded = load_checkpoint(path)
    assert loaded.labels == ["a", "b", "c"] and loaded.metadata == {"epoch": 3} and loaded.provenance == PROVENANCE
    assert loaded.config == model.config
    rebuilt = loaded.build()
    batch = collate(_samples(2), model.pad_multiple)
    a, b = model.dense(batch.features, batch.mask), rebuilt.dense(batch.features, batch.mask)
    assert torch.equal(a.cls_logits, b.cls_logits) and torch.equal(a.reg_offsets, b.reg_offsets)
    da, db = model(batch), rebuilt(batch)
    assert all(torch.equal(x.scores, y.scores) and torch.equal(x.segments.data, y.segments.data) for x, y in zip(da, db))


def test_checkpoint_is_plain_data_for_weights_only_loading():
    ckpt = Checkpoint.from_model(build_detector(_tiny("actionformer")), ["a", "b", "c"], PROVENANCE)
    data = torch.load(io.BytesIO(checkpoint_bytes(ckpt)), weights_only=True)
    assert data["format"] == "tal-detector/1" and data["labels"] == ["a", "b", "c"]
    assert data["config"]["encoder"]["input_dim"] == C


def test_checkpoint_refuses_features_of_another_width_or_backbone():
    ckpt = Checkpoint.from_model(build_detector(_tiny("actionformer")), ["a", "b", "c"], PROVENANCE)
    with pytest.raises(CheckpointError, match=r"expects 16-dim features \(i3d\), got 1280-dim"):
        ckpt.check_features(1280)
    with pytest.raises(CheckpointError, match=r"backbone: checkpoint 'i3d' vs features 'mobilenet_v2'"):
        ckpt.check_features(C, dict(PROVENANCE, backbone="mobilenet_v2"))
    with pytest.raises(CheckpointError, match=r"fps: checkpoint 30.0 vs features 15.0"):
        ckpt.check_features(C, dict(PROVENANCE, fps=15.0))
    ckpt.check_features(C, dict(PROVENANCE, extract_config="{}"))  # same features: fine


def test_loading_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt: cannot read as a checkpoint"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(CheckpointError, match="not a tal-detector/1 checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="3 class names for a detector of 5 classes"):
        Checkpoint(replace(_tiny("actionformer"), num_classes=5), {}, ["a", "b", "c"])
