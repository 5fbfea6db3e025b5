"""Presets: a detector config with the optimiser settings and batch size it was published with.

The papers' THUMOS14 configurations are written once, in code (``paper_preset``); a preset file
names one of them as its ``base`` and holds only what differs::

    name: demo-tridet
    base: {arch: tridet, num_classes: 4, input_dim: 1280, max_seq_len: 192, embed_dim: 128, levels: 5}
    detector:
      head: {num_bins: 8}
    optim: {lr: 0.001, warmup_epochs: 2, epochs: 30}

``base`` is an arch name (the paper's THUMOS14 config as published: 20 classes of 2048-d I3D
features, crops of 2304 steps, 512 channels, 6 levels) or a mapping of the arch and those sizes;
the rest of the file is merged over it key by key (a key the config does not have is an error
naming its path). ``make_config`` is the base's detector, so code and presets cannot disagree.
A file without ``base`` is a full preset (as ``dump_yaml(preset)`` writes it).

``load_preset("thumos14-actionformer")`` or ``load_preset("path/to/mine.yaml")``. Shipped names
are ``{dataset}-{arch}``: datasets ``thumos14`` (I3D two-stream, 2048-d, 30 fps, stride 4,
window 16; 20 classes), ``anet`` (ActivityNet-1.3: TSP, 512-d, every video resized to 192 steps;
class-agnostic, labelled afterwards by fusion with a video classifier) and ``demo`` (the embedded
demo: MobileNetV2, 1280-d, 15 fps, stride 4; small) and ``multithumos`` (dense multi-label, 65
classes, I3D); archs ``actionformer``, ``tridet``, ``temporalmaxer``, ``actionmamba``,
``causaltad``, ``dyfadet``, ``gtad`` and ``mstemba`` (dense).

Other families (``family:`` in a full preset, set from the ``base``): ``bmn`` and ``tadtr``
(``base: {arch: bmn, protocol: thumos14 | activitynet, num_classes, input_dim}``: windows of 128 steps
or every video resized to 100) and ``video_classifier`` (``base: {arch: video_classifier, num_classes,
input_dim}``) and ``online`` (``base: {arch: online, kind: transformer | conv | mamba | maxpool, num_classes,
input_dim, max_seq_len, embed_dim, levels}``: causal, for live streams). ``class_agnostic: true`` (every ``anet-*`` detector) trains on one class, "action";
``anet-classifier`` names its segments (``tal_models.detectors.fused``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tal_models.config import config_from_dict, config_to_dict, require_positive_int
from tal_models.detectors import ARCHS, CONFIG_TYPES, InferenceConfig, LossConfig, OneStageConfig, config_type
from tal_models.detectors.one_stage import DENSE_ONLY_ARCHS, Arch
from tal_models.encoders import EncoderConfig
from tal_models.heads import HeadConfig
from tal_models.necks import FPNConfig
from tal_models.optim import OptimConfig
from tal_models.points import DEFAULT_REGRESSION_RANGES

PRESETS_DIR = Path(str(resources.files(__name__)))
THUMOS14_FEATURES = (
    "I3D two-stream (RGB + flow) features, 2048-d, 30 fps, stride 4 frames, window 16 frames (ActionFormer's THUMOS14 release)"
)


@dataclass(frozen=True)
class Preset:
    """A detector config with the training settings it was published with."""

    name: str
    description: str = ""
    features: str = ""  # what features the input must be (backbone, dims, sampling)
    detector: Any = field(default_factory=OneStageConfig)  # a config of any family (tal_models.detectors.CONFIG_TYPES)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 2
    family: str = ""  # the detector's family (its config type); "" = the detector's own
    class_agnostic: bool = False  # train on one class "action" (ActivityNet practice: labelled by a video classifier)

    def __post_init__(self) -> None:
        require_positive_int(self.batch_size, "Preset.batch_size")
        family = getattr(self.detector, "family", None)
        if family is None or type(self.detector) is not CONFIG_TYPES.get(family):
            raise ValueError(f"Preset.detector must be a detector config ({', '.join(CONFIG_TYPES)}), got {type(self.detector).__name__}")
        if self.family and self.family != family:
            raise ValueError(f"Preset.family is {self.family!r} but its detector is a {family!r} config")
        object.__setattr__(self, "family", family)
        if self.class_agnostic and getattr(self.detector, "task", "detection") != "detection":
            raise ValueError(f"Preset.class_agnostic: a {family} model ({self.detector.task}) needs its classes")


# --- the papers' THUMOS14 configurations -----------------------------------------------------
def paper_preset(
    arch: Arch, *, num_classes: int = 20, input_dim: int = 2048, max_seq_len: int = 2304, embed_dim: int = 512, levels: int = 6
) -> Preset:
    """The published THUMOS14 configuration of ``arch`` (detector, optimiser, batch size), at the
    given sizes: the base of every preset. The coarsest level takes every length beyond the
    regression ranges before it (ActionFormer's ranges)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    require_positive_int(levels, "levels")
    if levels > len(DEFAULT_REGRESSION_RANGES):
        raise ValueError(f"at most {len(DEFAULT_REGRESSION_RANGES)} levels have default regression ranges, got {levels}")
    ranges = DEFAULT_REGRESSION_RANGES[: levels - 1] + ((DEFAULT_REGRESSION_RANGES[levels - 1][0], math.inf),)
    neck = FPNConfig(in_dim=embed_dim, out_dim=embed_dim, levels=levels)
    head = HeadConfig(in_dim=embed_dim, feat_dim=embed_dim)
    loss, inference = LossConfig(), InferenceConfig()
    match arch:
        case "actionformer":  # ActionFormer (ECCV 2022): 4 heads, window 19, MLP ratio 4; 30 + 5 epochs
            encoder = EncoderConfig(kind="transformer", input_dim=input_dim, embed_dim=embed_dim, levels=levels, heads=4, window=19)
            optim = OptimConfig(lr=1e-4, weight_decay=0.05, warmup_epochs=5, epochs=35)
        case "tridet":  # TriDet (CVPR 2023): SGP with k = 5, w = 1, MLP 768/512 = 1.5; 16 bins; 2000 detections kept
            encoder = EncoderConfig(
                kind="sgp", input_dim=input_dim, embed_dim=embed_dim, levels=levels, kernel_size=1, sgp_k=5.0, mlp_ratio=1.5
            )
            head = replace(head, regression="trident", num_bins=16)
            loss = replace(loss, iou_weight_power=0.2, input_noise=0.0005)
            inference = replace(inference, nms=replace(inference.nms, max_detections=2000))
            optim = OptimConfig(lr=1e-4, weight_decay=0.025, warmup_epochs=20, epochs=40)
        case "temporalmaxer":  # TemporalMaxer (2023): max-pooling blocks, no stem; 60 + 5 epochs
            encoder = EncoderConfig(kind="maxpool", input_dim=input_dim, embed_dim=embed_dim, levels=levels, kernel_size=3)
            optim = OptimConfig(lr=1e-4, weight_decay=0.05, warmup_epochs=5, epochs=65)
        case "actionmamba":  # Video Mamba Suite's ActionMamba: ActionFormer with DBM blocks (expand 1), drop path 0.3; 45 + 5 epochs
            encoder = EncoderConfig(
                kind="mamba", input_dim=input_dim, embed_dim=embed_dim, levels=levels, ssm_state=16, ssm_expand=1, drop_path=0.3
            )
            optim = OptimConfig(lr=1e-4, weight_decay=0.05, warmup_epochs=5, epochs=50)
        case "causaltad":  # CausalTAD (2024, OpenTAD): hybrid causal blocks, full causal attention, no MLP; 50 epochs, 5 of warm-up
            encoder = EncoderConfig(
                kind="causal", input_dim=input_dim, embed_dim=embed_dim, levels=levels, heads=4, window=-1, mlp_ratio=0.0,
                ssm_state=16, ssm_expand=2, drop_path=0.3,
            )  # fmt: skip
            loss = replace(loss, init_loss_norm=250.0)
            inference = replace(inference, nms=replace(inference.nms, max_detections=2000))
            optim = OptimConfig(lr=1e-4, weight_decay=0.05, warmup_epochs=5, epochs=50)
        case "dyfadet":  # DyFADet (ECCV 2024): DynE layers (w = 1, k = 5, MLP 768/512), dynamic heads; 20 + 20 epochs
            encoder = EncoderConfig(
                kind="dfa", input_dim=input_dim, embed_dim=embed_dim, levels=levels, kernel_size=1, sgp_k=5.0, mlp_ratio=1.5
            )
            head = replace(head, tower="dynamic")
            loss = replace(loss, input_noise=1e-5)
            inference = replace(inference, nms=replace(inference.nms, max_detections=2000))
            optim = OptimConfig(lr=1e-4, weight_decay=0.025, warmup_epochs=20, epochs=40)
        case "gtad":  # G-TAD's GCNeXt blocks (k = 3 semantic neighbours, 32 groups) in the one-stage detector; ActionFormer's recipe
            encoder = EncoderConfig(kind="graph", input_dim=input_dim, embed_dim=embed_dim, levels=levels, graph_k=3, graph_groups=32)
            optim = OptimConfig(lr=1e-4, weight_decay=0.05, warmup_epochs=5, epochs=35)
        case "mstemba":  # MS-Temba (dense): Temba blocks at dilations 1, 2, 4, ... at full resolution, a Mamba fuser, per-step scores
            encoder = EncoderConfig(
                kind="mstemba", input_dim=input_dim, embed_dim=embed_dim, levels=levels, stem_layers=1, kernel_size=3, mlp_ratio=1.0,
                ssm_state=16, ssm_expand=1,
            )  # fmt: skip
            head = replace(head, num_layers=2)
            optim = OptimConfig(lr=1e-4, weight_decay=0.05, warmup_epochs=5, epochs=50)
    detector = OneStageConfig(
        arch=arch, task="dense" if arch in DENSE_ONLY_ARCHS else "detection", num_classes=num_classes, max_seq_len=max_seq_len,
        encoder=encoder, neck=neck, head=head, regression_ranges=ranges, loss=loss, inference=inference,
    )  # fmt: skip
    return Preset(name=arch, description=f"{arch}: the paper's THUMOS14 configuration", features=THUMOS14_FEATURES, detector=detector,
                  optim=optim, batch_size=2)  # fmt: skip


def make_config(
    arch: Arch, *, num_classes: int, input_dim: int, max_seq_len: int = 2304, embed_dim: int = 512, levels: int = 6, **overrides: Any
) -> OneStageConfig:
    """The paper's THUMOS14 detector config of ``arch`` at the given sizes (``paper_preset(...).detector``);
    ``overrides`` replace top-level config fields (``loss=LossConfig(...)``, ``inference=...``)."""
    base = paper_preset(arch, num_classes=num_classes, input_dim=input_dim, max_seq_len=max_seq_len, embed_dim=embed_dim, levels=levels)
    return replace(base.detector, **overrides)


# --- preset files ----------------------------------------------------------------------------
_BASE_KEYS = ("arch", "num_classes", "input_dim", "max_seq_len", "embed_dim", "levels")


def preset_names() -> list[str]:
    """The presets shipped with the package."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """A shipped preset by name, or a preset YAML file by path (full, or sparse over a ``base``)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ValueError(f"unknown preset {str(name_or_path)!r}; shipped presets: {', '.join(preset_names())} (or give a .yaml path)")
    elif not path.exists():
        raise FileNotFoundError(f"preset file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    return preset_from_dict(data or {}, where=path.name, default_name=path.stem)


def preset_from_dict(data: Mapping[str, Any], where: str = "preset", default_name: str | None = None) -> Preset:
    """A ``Preset`` from its stored form: full, or sparse over ``base`` (module docstring)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    data = dict(data)
    base = data.pop("base", None)
    if default_name is not None:
        data.setdefault("name", default_name)
    if base is None:
        return _from_full(data, where)
    if isinstance(base, str):
        base = {"arch": base}
    known = ", ".join((*ARCHS, *FAMILY_BASES))
    if not isinstance(base, Mapping) or "arch" not in base:
        raise ValueError(f"{where}: base must be an arch name ({known}) or a mapping with 'arch' and sizes {_BASE_KEYS[1:]}")
    base_keys = FAMILY_BASES.get(base["arch"], _BASE_KEYS)
    unknown = sorted(set(base) - set(base_keys))
    if unknown:
        raise ValueError(f"{where}: base: unknown key(s) {unknown}; known keys: {list(base_keys)}")
    try:
        made = _family_preset(**base) if base["arch"] in FAMILY_BASES else paper_preset(**base)
        merged = _merge(config_to_dict(made), data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: base: {exc}") from exc
    return _from_full(merged, where)


def _from_full(data: Mapping[str, Any], where: str) -> Preset:
    """A full preset's dict: its ``detector`` read as the config of its ``family`` (default: one-stage)."""
    data = dict(data)
    family = data.pop("family", None) or "one_stage"
    try:
        cls = config_type(family)
    except ValueError as exc:
        raise ValueError(f"{where}: family: {exc}") from None
    detector = config_from_dict(cls, data.pop("detector", {}) or {}, where=f"{where}.detector")
    return replace(config_from_dict(Preset, data, where=where), detector=detector, family=family)


def _family_preset(arch: str, **sizes: Any) -> Preset:
    """The configuration of a BMN, TadTR, video-classifier or online model (``base: {arch: bmn, protocol: thumos14, ...}``)."""
    from tal_models.detectors.bmn import bmn_config
    from tal_models.detectors.classifier import VideoClassifierConfig
    from tal_models.detectors.online import online_config
    from tal_models.detectors.tadtr import tadtr_config
    from tal_models.detectors.weak import weak_config

    protocol = sizes.pop("protocol", "thumos14")
    input_dim = sizes.pop("input_dim", 2048)
    num_classes = sizes.pop("num_classes", 20)
    match arch:
        case "bmn":  # BMN (ICCV 2019): Adam at 1e-3 with weight decay 1e-4, batch 16, 9 epochs on ActivityNet
            detector = bmn_config(protocol=protocol, num_classes=num_classes, input_dim=input_dim, **sizes)
            optim = OptimConfig(lr=1e-3, weight_decay=1e-4, warmup_epochs=0, epochs=9 if protocol == "activitynet" else 10, ema_decay=None)
            batch_size = 16
        case "tadtr":  # TadTR (TIP 2022): AdamW at 2e-4, weight decay 1e-4, clip 0.1, batch 16
            detector = tadtr_config(protocol=protocol, num_classes=num_classes, input_dim=input_dim, **sizes)
            optim = OptimConfig(lr=2e-4, weight_decay=1e-4, warmup_epochs=0, epochs=16 if protocol == "activitynet" else 30, clip_grad_norm=0.1,
                                ema_decay=None)  # fmt: skip
            batch_size = 16
        case "video_classifier":  # ours: pooled temporal features + a light head, multi-label
            detector = VideoClassifierConfig(num_classes=num_classes, input_dim=input_dim, **sizes)
            optim = OptimConfig(lr=1e-3, weight_decay=0.05, warmup_epochs=1, epochs=20)
            batch_size = 16
        case "online":  # ours: a causal pyramid + per-step heads + the event rule; ActionFormer's optimiser
            detector = online_config(num_classes=num_classes, input_dim=input_dim, **sizes)
            optim = OptimConfig(lr=1e-4, weight_decay=0.05, warmup_epochs=5, epochs=35)
            batch_size = 4
        case "weak":  # BaS-Net / UM (weakly supervised): Adam at 1e-4, weight decay 5e-4, batches of 16 videos sampled to 750 steps
            detector = weak_config(num_classes=num_classes, input_dim=input_dim, **sizes)
            optim = OptimConfig(lr=1e-4, weight_decay=5e-4, warmup_epochs=0, epochs=300, ema_decay=None)
            batch_size = 16
        case "zero_shot":  # T3AL-style, training-free: nothing is optimised
            from tal_models.detectors.zero_shot import zero_shot_config

            detector = zero_shot_config(num_classes=num_classes, input_dim=input_dim, **sizes)
            optim = OptimConfig(epochs=1, warmup_epochs=0)
            batch_size = 1
        case _:
            raise ValueError(f"unknown arch {arch!r}")
    described = {
        "video_classifier": "a video-level multi-label classifier",
        "online": "a causal detector for live streams",
        "weak": "weakly supervised (video-level labels): T-CAM, MIL top-k, background suppression",
        "zero_shot": "training-free zero-shot detection from frame-text similarity",
    }.get(
        arch, f"the published {protocol} configuration"
    )
    return Preset(name=arch, description=f"{arch}: {described}", detector=detector, optim=optim, batch_size=batch_size)


# the archs of the other families (made by ``_family_preset``) -> the keys their ``base`` takes
FAMILY_BASES: dict[str, tuple[str, ...]] = {
    "bmn": ("arch", "protocol", "num_classes", "input_dim"),
    "tadtr": ("arch", "protocol", "num_classes", "input_dim"),
    "video_classifier": ("arch", "num_classes", "input_dim"),
    "online": ("arch", "kind", "num_classes", "input_dim", "max_seq_len", "embed_dim", "levels"),
    "weak": ("arch", "num_classes", "input_dim", "hidden_dim", "max_seq_len"),
    "zero_shot": ("arch", "num_classes", "input_dim", "text"),
}


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged into ``base`` key by key (sections recursively, values replaced)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
