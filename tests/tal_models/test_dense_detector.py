"""Dense (frame-level, multi-label) detectors: MS-Temba and any encoder with task "dense" (tal_models.detectors.dense)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from tal_models.detectors import Detector, build_detector
from tal_models.detectors.dense import DenseDetector
from tal_models.evaluation import evaluate_dense
from tal_models.layers import TembaBlock
from tal_models.layers.temba import from_dilated, to_dilated
from tal_models.optim import OptimConfig, build_optimizer
from tal_models.presets import load_preset, make_config
from tal_models.structures import AnnotationSet, LabelMap, Segments, VideoAnnotation
from tal_models.timing import FeatureTiming
from tal_models.training import train_one_epoch

C, K = 16, 4
# MS-Temba itself, and two pyramid encoders turned dense (the baseline of the dense benchmark)
DENSE = ("mstemba", "actionformer", "gtad")


def _tiny(arch: str):
    config = make_config(arch, num_classes=K, input_dim=C, max_seq_len=128, embed_dim=32, levels=3)
    return config if config.task == "dense" else replace(config, task="dense")


def _samples(num_videos: int = 4, length: int = 96, seed: int = 0, noise: float = 0.3):
    """Overlapping multi-label videos: each class is on in its own random runs, its prototype added while on."""
    g = np.random.default_rng(seed)
    protos = 2.0 * g.standard_normal((K, C)).astype(np.float32)
    samples = []
    for v in range(num_videos):
        feats = noise * g.standard_normal((length, C)).astype(np.float32)
        segs, labels = [], []
        for k in range(K):
            t = int(g.integers(0, 20))
            while t < length - 12:
                n = int(g.integers(6, 24))
                end = min(t + n, length - 1)
                feats[t:end] += protos[k]
                segs.append([t - 0.5, end - 0.5])  # steps t .. end-1 (the open convention: centres inside)
                labels.append(k)
                t = end + int(g.integers(8, 30))
        samples.append({"features": feats, "segments": np.array(segs, np.float32), "labels": np.array(labels), "video_id": f"v{v}"})
    return samples


def _frame_map(model, samples) -> float:
    model.eval()
    batch = collate(samples, model.pad_multiple)
    scores = model.step_scores(batch)
    truth = {
        s["video_id"]: VideoAnnotation(s["video_id"], Segments(s["segments"].astype(np.float64)), s["labels"], float(len(s["features"])))
        for s in samples
    }
    gt = AnnotationSet(truth, LabelMap.from_names([f"c{k}" for k in range(K)]))
    times = {s["video_id"]: (np.arange(len(s["features"]), dtype=np.float64), sc) for s, sc in zip(samples, scores)}
    return evaluate_dense(gt, times).mAP


@pytest.mark.parametrize("arch", DENSE)
def test_dense_detector_outputs_per_step_logits_zero_at_padding(arch):
    model = build_detector(_tiny(arch)).eval()
    assert isinstance(model, DenseDetector) and isinstance(model, Detector)
    batch = collate(_samples(2, length=90), model.pad_multiple)  # T padded 90 -> 92 (multiple of 4)
    logits = model.logits(batch.features, batch.mask)
    assert logits.shape == (2, K, 92)
    assert bool((logits.masked_select(~batch.mask.expand_as(logits)) == 0).all())
    scores = model.step_scores(batch)
    assert [s.shape for s in scores] == [(90, K), (90, K)] and all(((s >= 0) & (s <= 1)).all() for s in scores)


@pytest.mark.parametrize("arch", DENSE)
def test_dense_padding_changes_nothing_at_valid_steps(arch):
    torch.manual_seed(0)
    model = build_detector(_tiny(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sample = _samples(1, length=60)[0]
    alone = collate([sample], model.pad_multiple)
    other = dict(_samples(1, length=130, seed=1)[0], video_id="long")
    together = collate([sample, other], model.pad_multiple)
    together.features[0, :, 60:] = float("nan")  # whatever padding holds
    a = model.logits(alone.features, alone.mask)
    b = model.logits(together.features, together.mask)
    torch.testing.assert_close(b[0, :, :60], a[0, :, :60], atol=1e-5, rtol=1e-5)
    assert bool(torch.isfinite(b).all())


@pytest.mark.parametrize("arch", DENSE)
def test_dense_gradients_finite_with_empty_ground_truth(arch):
    model = build_detector(_tiny(arch)).train()
    samples = _samples(2)
    for s in samples:
        s["segments"], s["labels"] = np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    losses = model(collate(samples, model.pad_multiple))
    assert losses["final_loss"].item() > 0
    losses["final_loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch", DENSE)
def test_each_dense_detector_overfits_overlapping_labels(arch):
    """Four videos where every class runs on its own (so classes overlap), 80 full-batch steps: per-frame mAP >= 0.9."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    samples = _samples(4)
    model = build_detector(_tiny(arch))
    batch = collate(samples, model.pad_multiple, num_classes=K)
    before = _frame_map(model, samples)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=0, epochs=80))
    for _ in range(80):
        model.train()
        train_one_epoch(model, [batch], optimizer, None, clip_grad_norm=1.0)
    after = _frame_map(model, samples)
    assert after >= 0.9 and after > before + 0.2, f"{arch}: per-frame mAP {before:.3f} -> {after:.3f}"
    # the segments it reports cover the labelled runs: most ground-truth runs are found at tIoU 0.5
    model.eval()
    det = model.detect(samples[0]["features"], FeatureTiming(fps=1.0, stride=1, window=1, offset=-0.5), None, "v0")
    assert len(det) > 0 and float(det.scores.max()) <= 1.0


@pytest.mark.parametrize("arch", DENSE)
def test_dense_checkpoint_round_trip_reproduces_outputs_exactly(arch, tmp_path):
    torch.manual_seed(0)
    model = build_detector(_tiny(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "model.pt"
    save_checkpoint(Checkpoint.from_model(model, [f"c{k}" for k in range(K)], {"feature_dim": C}, {}), path)
    rebuilt = load_checkpoint(path).build()
    assert isinstance(rebuilt, DenseDetector) and rebuilt.config == model.config
    batch = collate(_samples(2), model.pad_multiple)
    assert torch.equal(model.logits(batch.features, batch.mask), rebuilt.logits(batch.features, batch.mask))
    da, db = model(batch), rebuilt(batch)
    assert all(np.array_equal(x.scores, y.scores) and np.array_equal(x.segments.data, y.segments.data) for x, y in zip(da, db))


def test_dense_detections_are_runs_above_the_threshold_in_seconds():
    """Inference: per class, each run of steps above ``dense_threshold`` is one detection, converted by the feature timing."""
    model = build_detector(_tiny("actionformer")).eval()
    timing = FeatureTiming(fps=10.0, stride=2, window=2)  # step i is centred on (2 i + 1) / 10 s
    with torch.no_grad():  # a head whose output is class 1 on steps 10..19 only: zero the tower, set the bias per step
        model.head.tower.out.conv.weight.zero_()
        model.head.tower.out.conv.bias.fill_(-10.0)
    features = np.zeros((40, C), np.float32)
    det = model.detect(features, timing, 8.0)
    assert len(det) == 0  # nothing above 0.5 anywhere
    model.config = replace(model.config, inference=replace(model.config.inference, dense_threshold=0.0))
    det = model.detect(features, timing, 8.0)
    assert len(det) == K  # every class is above 0 everywhere: one run per class over the whole video
    np.testing.assert_allclose(det.segments.data, np.tile([[0.0, 8.0]], (K, 1)))  # [-0.5, 39.5] steps -> [0.0, 8.0] s


def test_temba_block_dilated_subsequences_and_padding():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    d = to_dilated(x, 4)  # [8, 3, 2]: row b * 4 + r holds steps r, r + 4
    assert d.shape == (8, 3, 2) and d[1, 0].tolist() == [1.0, 5.0] and d[6, 2].tolist() == [x[1, 2, 2].item(), x[1, 2, 6].item()]
    assert torch.equal(from_dilated(d, 4), x)
    torch.manual_seed(0)
    block = TembaBlock(8, dilation=4, mlp_ratio=2.0, expand=1).eval()
    videos = [torch.randn(8, 30), torch.randn(8, 17)]
    padded = torch.zeros(2, 8, 32)
    mask = torch.zeros(2, 1, 32, dtype=torch.bool)
    for i, v in enumerate(videos):
        padded[i, :, : v.shape[1]] = v
        padded[i, :, v.shape[1] :] = float("nan")
        mask[i, :, : v.shape[1]] = True
    with torch.no_grad():
        out, _ = block(padded, mask)
        assert bool((out.masked_select(~mask.expand_as(out)) == 0).all())
        for i, v in enumerate(videos):
            n = v.shape[1]
            length = -(-n // 4) * 4
            alone_x, alone_m = torch.zeros(1, 8, length), torch.zeros(1, 1, length, dtype=torch.bool)
            alone_x[0, :, :n], alone_m[0, :, :n] = v, True
            ref, _ = block(alone_x, alone_m)
            torch.testing.assert_close(out[i, :, :n], ref[0, :, :n], atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="not divisible"):
        block(torch.zeros(1, 8, 30), torch.ones(1, 1, 30, dtype=torch.bool))


def test_the_mstemba_preset_is_dense_at_full_resolution():
    preset = load_preset("multithumos-mstemba")
    model = build_detector(preset.detector)
    assert isinstance(model, DenseDetector) and preset.detector.num_classes == 65
    assert [b.dilation for b in model.encoder.stem] + [b.dilation for b in model.encoder.branch] == [1, 2, 4]
    with pytest.raises(ValueError, match="set task: dense"):
        replace(preset.detector, task="detection")
