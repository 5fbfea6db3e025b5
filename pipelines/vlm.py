"""Vision-language models without a model hub: open_clip models, text encoders of class names, class-name parsing.

Legend: K class names (or prompts), E the embedding width (open_clip's ``embed_dim``), N images.

``load_clip(model, weights)`` builds an ``open-clip-torch`` model and loads its weights from a
local file, an ``s3://`` object or the caches open_clip downloads into, and never downloads:

- ``model`` is a name from open_clip's own registry (``ViT-B-32``, ``ViT-B-32-quickgelu``, ...;
  ``open_clip.list_models()``) or the path (or ``s3://`` URI) of a JSON model config ending in
  ``.json``: either a bare model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, the form of
  open_clip's ``model_configs/*.json``) or an ``open_clip_config.json`` (``model_cfg``, and an
  optional ``preprocess_cfg``). The JSON is built directly with open_clip's model classes, not
  added to its registry, so a user's ``ViT-B-32.json`` never shadows the built-in one.
- ``weights`` is a file path or ``s3://`` URI of an open_clip checkpoint (a state dict saved with
  ``torch.save``, a ``.safetensors`` file, or OpenAI's TorchScript ``.pt``), loaded by
  ``open_clip.load_checkpoint`` as open_clip loads its own files; or ``""`` (or a pretrained tag such
  as ``"laion2b_s34b_b79k"``) for a registry model: its tag's file (``""``: the model's first tag in
  open_clip's list, ``openai`` for ``ViT-B-32``) where open_clip would have cached it, the Hugging
  Face hub cache (``open_clip_model.safetensors``, then ``open_clip_pytorch_model.bin``) or
  ``~/.cache/clip/<file of its URL>``. A missing file is a ``WeightsNotFoundError`` saying where to
  put it. A tag trained with QuickGELU switches the model to QuickGELU (open_clip only warns).

Only models whose towers and tokenizer ship with open_clip are supported (its ViT / ResNet image
towers and text transformer with the BPE tokenizer inside the wheel); towers or tokenizers that come
from the Hugging Face hub (``hf_model_name``, ``hf_tokenizer_name``, SigLIP) are refused: they would
need a download. Loaded models are cached per ``(model, weights, device)`` for the life of the
process (a file changed on disk is not re-read; ``clear_clip_cache`` forgets them).

Text encoders (``TextEncoder``) turn class names into unit rows ``[K, E]``, as a
``tal_models.text.TextEncoderConfig`` describes: ``ClipTextEncoder`` (open_clip's text tower, each
name put into the config's prompt first) or ``TableTextEncoder`` (a fixed ``.npz`` of ``names`` and
``embeddings``, see ``write_embedding_table``). ``parse_class_names`` checks user-given names.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.atomic import write_atomic
from pipelines.weights import WeightsFile, WeightsNotFoundError, read_weights
from tal_models.text import TextEncoderConfig

__all__ = [
    "ClipInfo",
    "ClipImageTower",
    "ClipTextEncoder",
    "TableTextEncoder",
    "TextEncoder",
    "clear_clip_cache",
    "load_clip",
    "load_text_encoder",
    "parse_class_names",
    "write_embedding_table",
]

HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's preference order in a hub repo


@dataclass(frozen=True)
class ClipInfo:
    """What ``load_clip`` knows besides the model: its image preprocessing, width and weights.

    ``image_size`` (H, W) is the image tower's input; ``resize_mode`` is open_clip's (``shortest``:
    shorter side to the size, then a centre crop; ``squash``: resize to exactly (H, W); ``longest``:
    fit inside and pad); ``mean``/``std`` are for values scaled to 0..1. ``weights`` records the
    file (its ``data`` is dropped once loaded): ``name`` is ``MODEL:TAG`` for a cached pretrained
    file, the file's base name otherwise.
    """

    model: str
    embed_dim: int
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str
    weights: WeightsFile


_cache: dict[tuple[str, str, str], tuple[nn.Module, Any, ClipInfo]] = {}
_cache_lock = threading.Lock()


def clear_clip_cache() -> None:
    """Forget every model ``load_clip`` has loaded in this process."""
    with _cache_lock:
        _cache.clear()


def load_clip(
    model: str,
    weights: str = "",
    *,
    storage_options: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any, ClipInfo]:
    """An open_clip model in eval mode on ``device``, its tokenizer, and its ``ClipInfo`` (see module doc).

    ``storage_options``: fsspec options for ``s3://`` weights and configs (endpoint, keys), as the
    rest of ``pipelines`` takes them. The same ``(model, weights, device)`` returns the same objects.
    """
    filesystem = None
    if weights.startswith("s3://") or model.startswith("s3://"):
        from pipelines.store import filesystem_for

        filesystem = filesystem_for("s3://", storage_options)[0]
    return _load_clip(model, weights, torch.device(device), filesystem)


def _load_clip(model: str, weights: str, device: torch.device, filesystem: Any) -> tuple[nn.Module, Any, ClipInfo]:
    """``load_clip`` with an fsspec ``filesystem`` for ``s3://`` (None: a default ``s3fs.S3FileSystem``)."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"the open_clip model must be an architecture name (e.g. 'ViT-B-32') or a .json config; got {model!r}")
    key = (model, weights or "", str(device))
    with _cache_lock:  # one load per key even when several threads (serving replicas) ask at once
        if key not in _cache:
            _cache[key] = _build_and_load(model, weights or "", device, filesystem)
        return _cache[key]


def _build_and_load(model: str, weights: str, device: torch.device, filesystem: Any) -> tuple[nn.Module, Any, ClipInfo]:
    import open_clip

    model_cfg, preprocess_overlay, tags = _model_config(model, filesystem)
    weights_file, local_path, tag = _resolve_weights(model, weights, tags, filesystem)
    tag_cfg = open_clip.get_pretrained_cfg(model, tag) if tag else {}
    if tag_cfg.get("quick_gelu") and not model_cfg.get("quick_gelu"):
        model_cfg["quick_gelu"] = True  # the activation these weights were trained with; a GELU model would be silently off
    net = _build_model(model, model_cfg)
    if local_path is not None:
        _load_checkpoint(open_clip, net, local_path, weights_file)
    else:  # an s3:// object: open_clip loads from a file, whose suffix (.safetensors) it reads
        with tempfile.TemporaryDirectory(prefix="tal-clip-") as tmp:
            path = Path(tmp) / weights_file.name
            path.write_bytes(weights_file.data)
            _load_checkpoint(open_clip, net, str(path), weights_file)
    weights_file = replace(weights_file, data=b"")  # the model holds the weights now: keep only name, source and digest
    net = net.to(device).eval()

    preprocess = open_clip.transform.merge_preprocess_dict(open_clip.transform.PreprocessCfg(), {**tag_cfg, **preprocess_overlay})
    size = getattr(net.visual, "image_size", preprocess["size"])
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean, std = (_three(preprocess[k], k) for k in ("mean", "std"))
    info = ClipInfo(
        model=model, embed_dim=int(model_cfg["embed_dim"]), image_size=size, mean=mean, std=std,
        interpolation=str(preprocess["interpolation"]), resize_mode=str(preprocess["resize_mode"]), weights=weights_file,
    )  # fmt: skip
    tokenizer = open_clip.SimpleTokenizer(
        context_length=model_cfg["text_cfg"].get("context_length", 77), **model_cfg["text_cfg"].get("tokenizer_kwargs", {})
    )
    return net, tokenizer, info


def _three(values: Any, what: str) -> tuple[float, float, float]:
    values = (values,) * 3 if isinstance(values, int | float) else tuple(values)
    if len(values) != 3:
        raise ValueError(f"the preprocess {what} must be three numbers (R, G, B); got {values!r}")
    return tuple(float(v) for v in values)


def _model_config(model: str, filesystem: Any) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(model config, preprocess overrides, pretrained tags) of a registry name or a JSON file."""
    import open_clip

    if model.endswith(".json"):
        try:
            if model.startswith("s3://"):
                text = (filesystem or _default_s3()).cat_file(model).decode("utf-8")
            else:
                text = Path(model).expanduser().read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"no open_clip model config at {model}: pass the path of a JSON model config") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{model} is not JSON ({error})") from None
        cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(
                f"{model} is not an open_clip model config: it needs embed_dim, vision_cfg and text_cfg "
                "(at the top, or under model_cfg as in open_clip_config.json)"
            )
        return copy.deepcopy(cfg), dict(data.get("preprocess_cfg", {})), []
    if ":" in model:
        raise ValueError(f"{model!r}: open_clip's hf-hub: and local-dir: names download or bypass our loading; use a .json config")
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        known = open_clip.list_models()
        raise ValueError(
            f"{model!r} is not an open_clip architecture ({len(known)} known, e.g. {', '.join(known[:5])}); or pass a .json config"
        )
    return cfg, {}, open_clip.list_pretrained_tags_by_model(model)


def _default_s3():
    import s3fs

    return s3fs.S3FileSystem()


def _build_model(model: str, cfg: dict[str, Any]) -> nn.Module:
    """open_clip's model class for ``cfg``, randomly initialised (nothing is downloaded)."""
    import open_clip

    text_cfg, vision_cfg = cfg["text_cfg"], cfg["vision_cfg"]
    if "hf_model_name" in text_cfg or text_cfg.get("hf_tokenizer_name") or "siglip" in model.lower():
        raise ValueError(
            f"{model}: its text tower or tokenizer comes from the Hugging Face hub, which this platform never reaches; "
            "use an architecture with open_clip's own text transformer (e.g. ViT-B-32)"
        )
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # timm would download its ImageNet weights
    custom_text = cfg.pop("custom_text", False)
    model_class = (open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CustomTextCLIP) if custom_text else open_clip.CLIP
    return model_class(**cfg)


def _resolve_weights(model: str, weights: str, tags: list[str], filesystem: Any) -> tuple[WeightsFile, str | None, str]:
    """(the weights file, a local path to load it from or None for S3 bytes, the pretrained tag or "")."""
    if weights.startswith("s3://"):
        return read_weights(weights, filesystem=filesystem), None, ""
    tag = weights.lower().replace("-", "_")  # open_clip's spelling of tags
    if weights and (Path(weights).expanduser().exists() or tag not in tags):
        try:
            found = read_weights(weights)
        except WeightsNotFoundError as error:
            if not tags:
                raise
            raise WeightsNotFoundError(f"{error}; or one of {model}'s pretrained tags: {', '.join(tags)}") from None
        return found, str(Path(weights).expanduser()), ""
    if not tags:
        raise WeightsNotFoundError(
            f"{model} has no pretrained weights that open_clip knows of, so there is no cache to look in: "
            "pass weights= the path or s3:// URI of its checkpoint (torch.save(model.state_dict(), path))"
        )
    tag = tag or tags[0]
    path, looked = _cached_pretrained(model, tag)
    if path is None:
        raise WeightsNotFoundError(
            f"the open_clip weights {model}:{tag} are not in the caches open_clip downloads into (looked for {', '.join(looked)}), "
            "and this platform never downloads weights. Copy one of those files there from a machine that has it "
            f"(e.g. `huggingface-cli download {_hf_repo(model, tag) or '<repo>'} {HF_FILES[0]}`), "
            "or pass weights= a checkpoint path or s3:// URI."
        )
    found = read_weights(path)
    return replace(found, name=f"{model}:{tag}"), path, tag


def _hf_repo(model: str, tag: str) -> str:
    import open_clip

    return open_clip.get_pretrained_cfg(model, tag).get("hf_hub", "").rstrip("/")


def _cached_pretrained(model: str, tag: str) -> tuple[str | None, list[str]]:
    """Where open_clip would have cached ``model:tag``'s file, never downloading: (a path or None, the places looked at)."""
    import open_clip
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model, tag)
    looked = []
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, file_name = os.path.split(hub)  # "org/repo/" (open_clip's default file names) or "org/repo/file"
        for name in [file_name] if file_name else HF_FILES:
            cache = constants.HF_HUB_CACHE  # read at call time: HF_HOME may move it
            hit = try_to_load_from_cache(repo, name, cache_dir=cache)
            looked.append(f"{name} of {repo} in the Hugging Face cache {cache}")
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit, looked
    url = cfg.get("url", "")
    if url:
        path = Path("~/.cache/clip").expanduser() / os.path.basename(url)  # download_pretrained_from_url's default folder
        looked.append(str(path))
        if path.is_file():
            return str(path), looked
    return None, looked


def _load_checkpoint(open_clip: Any, net: nn.Module, path: str, weights: WeightsFile) -> None:
    try:
        open_clip.load_checkpoint(net, path, strict=True)
    except Exception as error:
        raise ValueError(
            f"{weights.source} does not load into this open_clip model ({type(error).__name__}: {str(error)[:300]}); "
            "is it a checkpoint of another architecture?"
        ) from error


class ClipImageTower(nn.Module):
    """open_clip's image tower with unit outputs: normalised images [N, 3, H, W] -> [N, E]
    (``CLIP.encode_image(normalize=True)`` as a module, for a feature backbone)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)


# --- text encoders -----------------------------------------------------------------------------


class TextEncoder(Protocol):
    """Class names -> float32 [K, E] unit rows (the prompt of its config applied first)."""

    dim: int

    def encode(self, names: Sequence[str]) -> np.ndarray: ...


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be a sequence of strings (a list, not one string); got {names!r:.100}")
    return list(names)


class ClipTextEncoder:
    """open_clip's text tower: names -> each put into ``config.prompt`` -> tokenised -> [K, E] unit rows.

    ``model`` and ``tokenizer`` as ``load_clip`` returns them; ``batch_size`` prompts per forward.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: TextEncoderConfig, *, batch_size: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.dim = int(self._embed([""]).shape[1])

    def encode(self, names: Sequence[str]) -> np.ndarray:
        prompts = self.config.prompts(_check_names(names))
        if not prompts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate([self._embed(prompts[i : i + self.batch_size]) for i in range(0, len(prompts), self.batch_size)])

    def _embed(self, prompts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(prompts).to(self.device)  # [k, context_length] token ids
        with torch.inference_mode():
            return self.model.encode_text(tokens, normalize=True).float().cpu().numpy()


class TableTextEncoder:
    """A fixed table: ``names`` [K] and their ``embeddings`` [K, E] (rows normalised here); names are
    looked up exactly as given, and one missing from the table is a ``ValueError``."""

    def __init__(self, names: Sequence[str], embeddings: np.ndarray, *, source: str = "the table") -> None:
        names, embeddings = _check_table(names, embeddings, source)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError(f"{source} has all-zero embeddings for {[names[i] for i in np.flatnonzero(norms[:, 0] == 0)][:5]}")
        self.names = names
        self.embeddings = embeddings / norms
        self.source = source
        self.dim = int(embeddings.shape[1])
        self._rows = {n: i for i, n in enumerate(names)}

    @classmethod
    def from_uri(cls, uri: str, storage_options: dict[str, Any] | None = None) -> TableTextEncoder:
        """Read the ``.npz`` at a path or ``s3://`` URI (written by ``write_embedding_table``)."""
        from pipelines.store import filesystem_for

        fs, path = filesystem_for(uri, storage_options)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise WeightsNotFoundError(f"no embedding table at {uri}: write one with pipelines.vlm.write_embedding_table") from None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                names, embeddings = npz["names"], npz["embeddings"]
        except (KeyError, ValueError, OSError) as error:
            raise ValueError(f"{uri} is not an embedding table (.npz of names [K] str and embeddings [K, E]): {error}") from None
        return cls([str(n) for n in names], embeddings, source=uri)

    def encode(self, names: Sequence[str]) -> np.ndarray:
        names = _check_names(names)
        unknown = [n for n in names if n not in self._rows]
        if unknown:
            raise ValueError(
                f"{len(unknown)} name(s) not in {self.source}: {unknown[:5]}; it has {len(self.names)} names, "
                f"e.g. {self.names[:5]} (names are matched exactly)"
            )
        return self.embeddings[[self._rows[n] for n in names]].astype(np.float32, copy=False).reshape(len(names), self.dim)


def _check_table(names: Sequence[str], embeddings: Any, source: str) -> tuple[list[str], np.ndarray]:
    names = _check_names(names)
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or len(embeddings) != len(names) or not np.issubdtype(embeddings.dtype, np.number):
        raise ValueError(
            f"{source}: embeddings must be numbers [K, E] with K = {len(names)} names; got {embeddings.dtype} {embeddings.shape}"
        )
    if not np.isfinite(embeddings).all():
        raise ValueError(f"{source}: embeddings must be finite")
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"{source}: names must be non-empty and distinct")
    return names, embeddings.astype(np.float32)


def write_embedding_table(
    path: str | os.PathLike, names: Sequence[str], embeddings: np.ndarray, *, storage_options: dict | None = None
) -> None:
    """Write ``names`` [K] and ``embeddings`` [K, E] (float32) as the ``.npz`` a ``table`` text encoder reads,
    atomically, at a local path or an ``s3://`` URI."""
    from pipelines.store import filesystem_for

    names, embeddings = _check_table(names, embeddings, "write_embedding_table")
    buffer = io.BytesIO()
    np.savez(buffer, names=np.array(names, dtype=np.str_), embeddings=embeddings)  # unicode, not object: loads without pickle
    uri = os.fspath(path)
    fs, fs_path = filesystem_for(uri, storage_options)
    write_atomic(fs_path if uri.startswith("s3://") else uri, buffer.getvalue(), fs)


def load_text_encoder(
    config: TextEncoderConfig, storage_options: dict[str, Any] | None = None, *, device: str | torch.device = "cpu"
) -> TextEncoder:
    """The encoder ``config`` describes: ``open_clip`` -> ``ClipTextEncoder`` (through ``load_clip``,
    cached), ``table`` -> ``TableTextEncoder``; ``none`` is a ``ValueError``."""
    match config.kind:
        case "open_clip":
            model, tokenizer, _ = load_clip(config.model, config.weights, storage_options=storage_options, device=device)
            return ClipTextEncoder(model, tokenizer, config)
        case "table":
            return TableTextEncoder.from_uri(config.weights, storage_options)
    raise ValueError("TextEncoderConfig(kind='none'): this model has no text encoder, so class names cannot be embedded")


# --- class names from users -----------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def parse_class_names(text_or_list: str | Sequence[str], *, max_classes: int = 200, max_length: int = 100) -> list[str]:
    """User-given class names -> a checked list: a comma-separated string or a list of strings.

    Each name is stripped and its inner whitespace collapsed to one space. Raises ``ValueError``
    naming the problem: no names, an empty name (with its position), duplicates (ignoring case: the
    CLIP tokenizer lowercases, so "Run" and "run" embed alike), more than ``max_classes`` names, a
    name longer than ``max_length`` characters.
    """
    if isinstance(text_or_list, str):
        raw = text_or_list.split(",")
    elif isinstance(text_or_list, Sequence) and all(isinstance(n, str) for n in text_or_list):
        raw = list(text_or_list)
    else:
        raise ValueError(f"class names must be a comma-separated string or a list of strings; got {text_or_list!r:.100}")
    names = [_SPACES.sub(" ", n).strip() for n in raw]
    if not names or names == [""]:
        raise ValueError("no class names given: pass at least one, e.g. 'high jump, pole vault'")
    empty = [i + 1 for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"class name {empty[0]} of {len(names)} is empty (a stray comma?)")
    if len(names) > max_classes:
        raise ValueError(f"{len(names)} class names given; at most {max_classes} are allowed")
    long = [n for n in names if len(n) > max_length]
    if long:
        shown = repr(long[0]) if len(long[0]) <= 40 else repr(long[0][:40]) + "..."
        raise ValueError(f"class name {shown} is {len(long[0])} characters long; at most {max_length} are allowed")
    seen: dict[str, str] = {}
    duplicates = []
    for n in names:
        if n.casefold() in seen:
            duplicates.append(n if n == seen[n.casefold()] else f"{seen[n.casefold()]}/{n}")
        seen.setdefault(n.casefold(), n)
    if duplicates:
        raise ValueError(f"duplicate class names (ignoring case): {', '.join(duplicates[:5])}")
    return names
