"""The detector house: the protocol, composition from parts, checkpoints of older code, no host-device sync in training."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import HostReads

from tal_models.batch import collate
from tal_models.checkpoint import load_checkpoint
from tal_models.detectors import ARCHS, Detector, OneStageDetector, build_detector, build_encoder
from tal_models.heads import ClassificationHead, OffsetRegressionHead
from tal_models.necks import FPNNeck
from tal_models.presets import make_config
from tal_models.targets import CenterSamplingAssigner
from tal_models.timing import FeatureTiming

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "checkpoints"


def _tiny(arch: str):
    return make_config(arch, num_classes=3, input_dim=8, max_seq_len=64, embed_dim=16, levels=3)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_detector_satisfies_the_protocol(arch):
    model = build_detector(_tiny(arch))
    assert isinstance(model, Detector)
    batch = collate(
        [{"features": np.ones((40, 8), np.float32), "segments": [[3.0, 20.0]], "labels": [1], "video_id": "a"}], model.pad_multiple
    )
    losses = model.train().forward_training(batch)
    assert "final_loss" in losses and losses["final_loss"].ndim == 0
    assert len(model.eval().forward_inference(batch)) == 1
    assert model.detect(np.ones((40, 8), np.float32), FeatureTiming(15.0, 4, 4), 10.0).video_id == "video"


def test_a_detector_is_built_from_parts_and_the_builder_is_the_default_assembly():
    """Parts handed to the constructor are the parts used; ``build_detector`` assembles the same from names."""
    config = _tiny("actionformer")
    torch.manual_seed(0)
    built = build_detector(config)
    torch.manual_seed(0)
    by_hand = OneStageDetector(
        config,
        encoder=build_encoder(config.encoder),
        neck=FPNNeck(config.neck),
        cls_head=ClassificationHead(config.head, config.num_classes),
        reg_head=OffsetRegressionHead(config.head, config.encoder.levels),
        assigner=CenterSamplingAssigner(config.num_classes),
    )
    assert by_hand.state_dict().keys() == built.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(by_hand.state_dict().values(), built.state_dict().values()))  # same seed, same order
    assigner = CenterSamplingAssigner(config.num_classes, center_sample=False)
    swapped = OneStageDetector(
        config, encoder=built.encoder, neck=built.neck, cls_head=built.cls_head, reg_head=built.reg_head, assigner=assigner
    )
    assert swapped.assigner is assigner and swapped.encoder is built.encoder


@pytest.mark.parametrize("arch", ("actionformer", "tridet", "temporalmaxer"))  # the archs that existed at ee34b1b
def test_checkpoints_written_before_the_restructure_load_and_compute_the_same(arch):
    """Fixtures written by the code at ee34b1b (tests/fixtures/make_checkpoints.py), before the detectors
    became composed parts: same config, same state-dict keys, same dense outputs and detections."""
    checkpoint = load_checkpoint(FIXTURES / f"{arch}-ee34b1b.pt")
    assert checkpoint.config.arch == arch and checkpoint.metadata["made_by"] == "ee34b1b"
    model = checkpoint.build()
    expected = np.load(FIXTURES / f"{arch}-ee34b1b-expected.npz")
    features = np.load(FIXTURES / "input_features.npy")
    batch = collate([{"features": features, "video_id": "v"}], model.pad_multiple)
    out = model.dense(batch.features, batch.mask)
    np.testing.assert_allclose(out.cls_logits.detach().numpy(), expected["cls_logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.reg_offsets.detach().numpy(), expected["reg_offsets"], rtol=1e-5, atol=1e-6)
    det = model.detect(features, FeatureTiming(fps=15.0, stride=4, window=4), features.shape[0] * 4 / 15.0, "v")
    np.testing.assert_allclose(det.scores.numpy(), expected["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(det.segments.data.numpy(), expected["segments"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(det.labels.numpy(), expected["labels"])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_training_step_never_reads_a_value_back_to_the_host(arch):
    """The training loop's promise: no synchronisation except to log. (The code before this change read
    7 values per step: label ranges, the encoder's padding check and the positives' count.)"""
    model = build_detector(_tiny(arch)).train()
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
    if hasattr(model, "loss_normalizer"):  # one-stage detectors (a dense one averages over steps)
        assert float(model.loss_normalizer.state_dict()["value"]) != 100.0  # the normaliser did move (read here, outside the step)


def test_read_only_arrays_are_batched_and_detected_without_a_warning():
    """The feature store hands out read-only views of Arrow memory: no tensor may alias them (PyTorch warns that
    writing to such a tensor is undefined); ``collate`` copies them once, into the padded batch."""
    features = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    features.setflags(write=False)
    model = build_detector(_tiny("actionformer"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = collate([{"features": features[5:], "segments": [[1.0, 20.0]], "labels": [2], "video_id": "a"}], model.pad_multiple)
        detections = model.detect(features)
    np.testing.assert_array_equal(batch.features[0, :, :35].numpy(), features[5:].T)
    assert len(detections) > 0
