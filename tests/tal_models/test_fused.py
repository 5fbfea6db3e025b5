"""A class-agnostic detector named by a video classifier (``tal_models.detectors.fused``), and presets of every family."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from tal_models.checkpoint import Checkpoint, checkpoint_bytes, load_checkpoint
from tal_models.config import dump_yaml
from tal_models.detectors import build_detector
from tal_models.detectors.classifier import VideoClassifierConfig
from tal_models.detectors.fused import FusedDetector, is_class_agnostic
from tal_models.postprocess import fuse_video_classifier
from tal_models.presets import load_preset, make_config, preset_from_dict, preset_names
from tal_models.timing import FeatureTiming

C, K = 16, 5
TIMING = FeatureTiming(15.0, 4, 4)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    detector = build_detector(make_config("actionformer", num_classes=1, input_dim=C, max_seq_len=64, embed_dim=16, levels=3)).eval()
    classifier = build_detector(VideoClassifierConfig(num_classes=K, input_dim=C, hidden_dim=16)).eval()
    return detector, classifier


def test_fused_detections_are_the_detectors_segments_times_the_videos_top_classes():
    detector, classifier = _pair()
    x = np.random.default_rng(0).standard_normal((50, C)).astype(np.float32)
    fused = FusedDetector(detector, classifier, top_k=3).detect(x, TIMING, 12.0, "v")
    alone = detector.detect(x, TIMING, 12.0, "v")
    scores = classifier.classify(x)
    expected = fuse_video_classifier(alone, torch.as_tensor(scores), 3)
    assert len(fused) == 3 * len(alone) > 0 and set(np.asarray(fused.labels).tolist()) == set(np.argsort(-scores)[:3].tolist())
    np.testing.assert_allclose(np.asarray(fused.scores), np.asarray(expected.scores), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fused.segments.data), np.asarray(expected.segments.data), rtol=1e-6)
    assert float(fused.scores.max()) <= float(alone.scores.max()) * float(scores.max()) + 1e-9


def test_fused_detector_refuses_what_it_cannot_fuse():
    detector, classifier = _pair()
    with pytest.raises(ValueError, match="class-agnostic"):
        FusedDetector(
            build_detector(make_config("actionformer", num_classes=3, input_dim=C, max_seq_len=64, embed_dim=16, levels=3)), classifier
        )
    with pytest.raises(ValueError, match="needs a video classifier"):
        FusedDetector(detector, detector)
    with pytest.raises(ValueError, match="16-dim features but the classifier 8-dim"):
        FusedDetector(detector, build_detector(VideoClassifierConfig(num_classes=K, input_dim=8, hidden_dim=8)))
    with pytest.raises(ValueError, match="top_k"):
        FusedDetector(detector, classifier, top_k=0)


def test_a_checkpoint_says_whether_it_was_trained_class_agnostic():
    detector, _ = _pair()
    agnostic = load_checkpoint(io.BytesIO(checkpoint_bytes(Checkpoint.from_model(detector, ["action"], {}, {"class_agnostic": True}))))
    assert is_class_agnostic(agnostic)
    assert not is_class_agnostic(Checkpoint.from_model(detector, ["jump"], {}, {}))  # one class of its own


@pytest.mark.parametrize("name", [n for n in preset_names() if n.startswith("anet-") or "bmn" in n or "tadtr" in n])
def test_presets_of_every_family_round_trip_and_say_if_class_agnostic(name):
    preset = load_preset(name)
    again = preset_from_dict(yaml.safe_load(dump_yaml(preset)), where="again")
    assert again == preset and again.family == preset.detector.family
    assert preset.class_agnostic == (name.startswith("anet-") and name != "anet-classifier")
    if preset.class_agnostic:
        assert preset.detector.num_classes == 1


def test_a_preset_refuses_a_family_its_detector_is_not_and_unknown_base_keys():
    preset = load_preset("anet-classifier")
    assert preset.family == "video_classifier" and preset.detector.num_classes == 200
    with pytest.raises(ValueError, match="family is 'bmn' but its detector is a 'video_classifier'"):
        replace(preset, family="bmn")
    with pytest.raises(ValueError, match="unknown key"):
        preset_from_dict({"base": {"arch": "bmn", "protocol": "thumos14", "levels": 3}})
    with pytest.raises(ValueError, match="family: unknown detector family 'nope'"):
        preset_from_dict({"name": "x", "family": "nope", "detector": {}})
    with pytest.raises(ValueError, match="needs its classes"):
        replace(preset, class_agnostic=True)
