"""Presets: sparse files over the papers' configurations, one source of truth with make_config."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from tal_models.config import config_to_dict, dump_yaml
from tal_models.detectors import ARCHS, OneStageConfig, build_detector
from tal_models.detectors.one_stage import DENSE_ONLY_ARCHS
from tal_models.encoders import EncoderConfig
from tal_models.presets import load_preset, make_config, paper_preset, preset_from_dict, preset_names

# Our parameter count of each THUMOS14 preset. ActionFormer's official code reports 29.25 M for its
# THUMOS14 config (ours is 6.5 k fewer: not investigated, see the issue 4 note); official counts of
# TriDet's and TemporalMaxer's THUMOS14 models were not found in the stored material.
# Issue 15's presets: the official models differ by what our layers leave out by convention (LayerScale:
# 512 per block; DyFADet's head also holds an unused LayerNorm and frozen shift kernels): ActionMamba and
# CausalTAD +3,584 (0.02 % / 0.01 %), DyFADet +64,512 (0.23 %), all within 2 % (block formulas in
# tests/tal_models/test_ssm.py and test_graph_dynamic.py). G-TAD's official model is two-stage (no count to
# compare); MS-Temba's published 17 M is its Charades model (growing widths), ours keeps one width.
THUMOS14_PARAMETERS = {
    "thumos14-actionformer": 29_245_468, "thumos14-tridet": 15_927_100, "thumos14-temporalmaxer": 7_125_020,
    "thumos14-actionmamba": 18_568_732, "thumos14-causaltad": 52_111_388, "thumos14-dyfadet": 28_508_968, "thumos14-gtad": 9_443_868,
    "multithumos-mstemba": 14_530_113,
    # issue 16: BMN's ActivityNet model at the paper's 400-d input is 4,978,564, the official layers' count
    # (tests/tal_models/test_bmn.py); TadTR's THUMOS14 model is 256 below the official 8,661,594 (its one-level
    # embedding, left out: tests/tal_models/test_tadtr.py); the classifier is ours alone.
    "thumos14-bmn": 5_363_353, "anet-bmn": 5_000_068, "thumos14-tadtr": 8_661_338, "anet-tadtr": 10_046_094, "anet-classifier": 693_960,
}  # fmt: skip


def _parameters(config: OneStageConfig) -> int:
    return sum(p.numel() for p in build_detector(config).parameters())


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_builds_and_names_itself(name):
    preset = load_preset(name)
    assert preset.name == name
    model = build_detector(preset.detector)
    assert model.config == preset.detector and _parameters(preset.detector) > 0


@pytest.mark.parametrize("name", sorted(THUMOS14_PARAMETERS))
def test_thumos14_parameter_counts_are_pinned(name):
    assert _parameters(load_preset(name).detector) == THUMOS14_PARAMETERS[name]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in DENSE_ONLY_ARCHS])
def test_make_config_and_the_thumos14_presets_cannot_disagree(arch):
    preset = load_preset(f"thumos14-{arch}")
    assert make_config(arch, num_classes=20, input_dim=2048) == preset.detector
    assert preset.optim == paper_preset(arch).optim and preset.batch_size == paper_preset(arch).batch_size
    if arch == "tridet":  # the disagreement this structure removed: make_config kept 200 where the preset keeps 2000
        assert make_config(arch, num_classes=20, input_dim=2048).inference.nms.max_detections == 2000


def test_a_sparse_preset_holds_only_what_differs_and_merges_key_by_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "base: {arch: tridet, num_classes: 4, input_dim: 64, max_seq_len: 128, embed_dim: 32, levels: 4}\n"
        "detector:\n  head: {num_bins: 8}\n  inference: {nms: {max_detections: 50}}\noptim: {lr: 0.003}\n"
    )
    preset = load_preset(path)
    base = paper_preset("tridet", num_classes=4, input_dim=64, max_seq_len=128, embed_dim=32, levels=4)
    assert preset.name == "mine"
    assert preset.detector.head == replace(base.detector.head, num_bins=8)
    assert preset.detector.inference.nms == replace(base.detector.inference.nms, max_detections=50)
    assert preset.detector.inference.pre_nms_topk == base.detector.inference.pre_nms_topk  # siblings of a merged key stay
    assert preset.optim == replace(base.optim, lr=0.003)
    assert preset.detector.encoder == base.detector.encoder and preset.detector.loss == base.detector.loss


def test_a_full_preset_file_as_dumped_still_loads(tmp_path):
    """A preset written out whole (as ``tal train`` logs it to MLflow, and as presets were stored before) reads back equal."""
    for name in ("demo-tridet", "anet-actionformer"):
        preset = load_preset(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_yaml(preset))
        assert "base" not in yaml.safe_load(path.read_text())
        assert load_preset(path) == preset


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"base": "actionformer", "detector": {"encoder": {"windw": 9}}}, r"x.yaml.detector.encoder: unknown key\(s\) \['windw'\]"),
        ({"base": {"arch": "tridet", "width": 3}}, r"base: unknown key\(s\) \['width'\]"),
        ({"base": "mamba"}, r"unknown arch 'mamba'"),
        ({"base": {"num_classes": 3}}, r"base must be an arch name"),
        ({"base": "actionformer", "detector": {"encoder": {"kind": "sgp"}}}, r"arch 'actionformer' is encoder.kind='transformer'"),
    ],
)
def test_bad_preset_files_are_refused_naming_what_to_fix(data, message):
    with pytest.raises(ValueError, match=message):
        preset_from_dict(data, where="x.yaml", default_name="x")


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_must_agree_with_its_parts(arch):
    config = make_config(arch, num_classes=3, input_dim=8, max_seq_len=64, embed_dim=16, levels=3)
    other = next(a for a in ARCHS if a != arch and make_config(a, num_classes=3, input_dim=8).encoder.kind != config.encoder.kind)
    with pytest.raises(ValueError, match=f"arch {arch!r} is encoder.kind="):
        replace(config, encoder=replace(config.encoder, kind=make_config(other, num_classes=3, input_dim=8).encoder.kind, mlp_ratio=1.0))
    with pytest.raises(ValueError, match="arch 'actionformer' is encoder.kind='transformer'"):
        replace(config, arch="actionformer", encoder=EncoderConfig(kind="conv", input_dim=8, embed_dim=16, levels=3))
    assert config_to_dict(config)["arch"] == arch


def test_override_values_parse_as_yaml_with_exponent_numbers():
    from tal_models.config import parse_value

    assert [parse_value(x) for x in ("3e-4", "1E5", "-2.5e+3", "0.5", "7", "[7, 7]", "null", "true")] == [
        3e-4,
        1e5,
        -2500.0,
        0.5,
        7,
        [7, 7],
        None,
        True,
    ]
    assert [parse_value(x) for x in ("e5", "abc", "nan", "1e")] == ["e5", "abc", "nan", "1e"]  # not numbers: left as YAML reads them


def test_the_plus_preset_is_the_paper_config_with_our_recipe():
    plus, paper = load_preset("thumos14-actionformer-plus"), load_preset("thumos14-actionformer")
    assert plus.detector.loss == replace(paper.detector.loss, assigner="dynamic", center_radius=2.5)
    assert plus.detector.inference.nms == replace(paper.detector.inference.nms, max_detections=1000)
    assert replace(plus.detector, loss=paper.detector.loss, inference=paper.detector.inference) == paper.detector
    assert plus.optim == paper.optim and plus.batch_size == paper.batch_size
