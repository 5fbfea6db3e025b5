"""open_clip models without a hub: a tiny real architecture (random weights) from a file, S3 and a
fake hub cache; text encoders; class-name parsing; the clip: backbone on real frames and through the
Ray extraction job."""

from __future__ import annotations

import json
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from helpers import TINY_CLIP_CONFIG, save_tiny_clip

from pipelines.backbones import BackboneConfig, build_backbone
from pipelines.extract import ExtractConfig, SamplingConfig, extract, features_for_video
from pipelines.store import FeatureStore
from pipelines.video import iter_frames
from pipelines.vlm import (
    ClipTextEncoder,
    TableTextEncoder,
    load_clip,
    load_text_encoder,
    parse_class_names,
    write_embedding_table,
)
from pipelines.weights import WeightsNotFoundError
from tal_models.text import TextEncoderConfig

REPO = Path(__file__).resolve().parents[2]
VIDEO = REPO.parent / "shared" / "data" / "videos" / "bigbuckbunny_720p_h264.mp4"
NAMES = ["high jump", "pole vault", "diving"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    config, weights = save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
    return str(config), str(weights)


@pytest.fixture
def offline_caches(tmp_path, monkeypatch) -> Path:
    """Empty Hugging Face and ~/.cache/clip caches, and any download attempt fails the test."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", no_download)
    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    return tmp_path / "hf"


def encoder(model: str, weights: str = "", prompt: str = "{}", **kwargs) -> ClipTextEncoder:
    config = TextEncoderConfig(kind="open_clip", model=model, weights=weights, prompt=prompt)
    return load_text_encoder(config, **kwargs)


# --- loading ---------------------------------------------------------------------------------------


def test_tokenizer_ships_with_open_clip():
    tokens = open_clip.SimpleTokenizer()(["a video of a person diving."])
    assert tokens.shape == (1, 77) and int(tokens[0, 0]) == 49406  # <start_of_text>, from the BPE vocabulary in the wheel
    assert (Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz").is_file()


def test_path_and_s3_give_the_same_model(tiny, moto_s3, s3_bucket):
    config, weights = tiny
    model, tokenizer, info = load_clip(config, weights)
    assert not model.training and info.embed_dim == 32 and info.image_size == (32, 32)
    assert (info.interpolation, info.resize_mode) == ("bicubic", "shortest")  # open_clip's defaults
    assert load_clip(config, weights)[0] is model  # cached in-process
    bucket = s3_bucket("clip")
    moto_s3.fs.put_file(weights, f"{bucket}/models/tiny_clip.pth")
    options = {"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}, "key": "testing", "secret": "testing"}
    uri = f"s3://{bucket}/models/tiny_clip.pth"
    s3_model, _, s3_info = load_clip(config, uri, storage_options=options)
    assert s3_model is not model and s3_info.weights.sha256 == info.weights.sha256 and s3_info.weights.source == uri
    from_path = encoder(config, weights).encode(NAMES)
    from_s3 = encoder(config, uri, storage_options=options).encode(NAMES)
    np.testing.assert_array_equal(from_path, from_s3)
    with pytest.raises(WeightsNotFoundError, match="no weights object"):
        load_clip(config, f"s3://{bucket}/models/missing.pth", storage_options=options)


def test_bad_inputs_are_clear_errors(tiny, tmp_path):
    config, weights = tiny
    with pytest.raises(WeightsNotFoundError, match="no weights file"):
        load_clip(config, str(tmp_path / "missing.pth"))
    other = dict(TINY_CLIP_CONFIG, embed_dim=16)
    (tmp_path / "other.json").write_text(json.dumps({"model_cfg": other}))  # the open_clip_config.json form
    with pytest.raises(ValueError, match="does not load into this open_clip model"):
        load_clip(str(tmp_path / "other.json"), weights)
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        load_clip("ViT-Nope-1")
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="needs embed_dim, vision_cfg and text_cfg"):
        load_clip(str(tmp_path / "bad.json"), weights)


def test_hub_cache_miss_never_downloads(offline_caches, tiny):
    with pytest.raises(WeightsNotFoundError) as error:
        load_clip("ViT-B-32")
    message = str(error.value)
    assert "ViT-B-32:openai" in message and "never downloads" in message and "weights=" in message
    assert "timm/vit_base_patch32_clip_224.openai" in message and "ViT-B-32.pt" in message  # both caches named
    with pytest.raises(WeightsNotFoundError, match="laion2b_s34b_b79k"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(WeightsNotFoundError, match="no pretrained weights that open_clip knows of"):
        load_clip(tiny[0])  # a custom architecture has no tags, so no cache


def test_hub_cache_hit(offline_caches, tiny, monkeypatch):
    """A registry model's tag found where open_clip's hf_hub_download would have put it (safetensors),
    loaded with the tag's QuickGELU."""
    from safetensors.torch import save_file

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "Tiny-Test", json.loads(json.dumps(TINY_CLIP_CONFIG)))
    tag_cfg = open_clip.pretrained._pcfg(hf_hub="tal-test/tiny-clip/", quick_gelu=True)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "Tiny-Test", {"openai": tag_cfg})
    state = torch.load(tiny[1], weights_only=True)
    repo = offline_caches / "models--tal-test--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, repo / "snapshots" / "0123abcd" / "open_clip_model.safetensors")

    model, tokenizer, info = load_clip("Tiny-Test")
    assert info.weights.name == "Tiny-Test:openai" and info.weights.source.endswith("open_clip_model.safetensors")
    expected = open_clip.CLIP(**TINY_CLIP_CONFIG, quick_gelu=True).eval()
    expected.load_state_dict(state)
    tokens = tokenizer(NAMES)
    with torch.no_grad():
        np.testing.assert_allclose(model.encode_text(tokens), expected.encode_text(tokens), atol=1e-6)
        plain = open_clip.CLIP(**TINY_CLIP_CONFIG).eval()
        plain.load_state_dict(state)
        assert not torch.allclose(model.encode_text(tokens), plain.encode_text(tokens), atol=1e-4)  # GELU would differ


# --- text encoders ---------------------------------------------------------------------------------


def test_clip_text_encoder_uses_the_prompt(tiny):
    config, weights = tiny
    plain = encoder(config, weights)
    video = encoder(config, weights, prompt="a video of a person {}.")
    assert isinstance(video, ClipTextEncoder) and video.dim == 32
    embeddings = video.encode(NAMES)
    assert embeddings.shape == (3, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert np.abs(embeddings - plain.encode(NAMES)).max() > 1e-3
    np.testing.assert_allclose(embeddings, plain.encode([f"a video of a person {n}." for n in NAMES]), atol=1e-6)
    np.testing.assert_allclose(video.encode(NAMES[::-1]), embeddings[::-1], atol=1e-6)  # rows follow the names
    assert video.encode([]).shape == (0, 32)
    with pytest.raises(TypeError, match="not one string"):
        video.encode("diving")
    with pytest.raises(ValueError, match="no text encoder"):
        load_text_encoder(TextEncoderConfig())


def test_table_text_encoder(tmp_path, moto_s3, s3_bucket):
    embeddings = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32) * 3
    path = tmp_path / "table.npz"
    write_embedding_table(path, NAMES, embeddings)
    table = load_text_encoder(TextEncoderConfig(kind="table", weights=str(path)))
    assert isinstance(table, TableTextEncoder) and table.dim == 5
    got = table.encode(["diving", "high jump"])
    np.testing.assert_allclose(got, embeddings[[2, 0]] / np.linalg.norm(embeddings[[2, 0]], axis=1, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match=r"not in .*table.npz.*'high jump', 'pole vault', 'diving'"):
        table.encode(["diving", "curling"])
    options = {"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}, "key": "testing", "secret": "testing"}
    uri = f"s3://{s3_bucket('tables')}/t/table.npz"
    write_embedding_table(uri, NAMES, embeddings, storage_options=options)
    np.testing.assert_array_equal(TableTextEncoder.from_uri(uri, options).encode(NAMES), table.encode(NAMES))
    with pytest.raises(WeightsNotFoundError, match="no embedding table"):
        TableTextEncoder.from_uri(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="K = 2 names"):
        write_embedding_table(tmp_path / "bad.npz", NAMES[:2], embeddings)
    with pytest.raises(ValueError, match="distinct"):
        write_embedding_table(tmp_path / "bad.npz", ["a", "a", "b"], embeddings)
    assert not (tmp_path / "bad.npz").exists()


def test_parse_class_names():
    assert parse_class_names(" high jump,pole  vault , diving ") == NAMES
    assert parse_class_names(["high jump", " pole vault"]) == NAMES[:2]
    with pytest.raises(ValueError, match="no class names"):
        parse_class_names("  ")
    with pytest.raises(ValueError, match="no class names"):
        parse_class_names([])
    with pytest.raises(ValueError, match="class name 2 of 3 is empty"):
        parse_class_names("a,,b")
    with pytest.raises(ValueError, match="duplicate class names .*Run/run"):
        parse_class_names("Run, walk, run")
    with pytest.raises(ValueError, match="201 class names given; at most 200"):
        parse_class_names([f"class {i}" for i in range(201)])
    with pytest.raises(ValueError, match="'much too long' is 13 characters long; at most 10"):
        parse_class_names("ok, much too long", max_length=10)
    with pytest.raises(ValueError, match="comma-separated string or a list of strings"):
        parse_class_names(["a", 3])


# --- the clip: backbone ------------------------------------------------------------------------------


def test_clip_backbone_config():
    assert BackboneConfig(name="clip:ViT-B-32").name == "clip:ViT-B-32"
    with pytest.raises(ValueError, match=r"clip:<ARCH>"):
        BackboneConfig(name="clip:")
    with pytest.raises(ValueError, match="clip_length is for clip models"):
        BackboneConfig(name="clip:ViT-B-32", clip_length=8)


def test_clip_backbone_on_real_frames(tiny):
    from PIL import Image

    config, weights = tiny
    backbone = build_backbone(BackboneConfig(name=f"clip:{config}", weights=weights, batch_size=3))
    assert backbone.kind == "frame" and backbone.feature_dim == 32 and backbone.input_size == (32, 32)
    _, chunks = iter_frames(str(VIDEO), fps=1.0, chunk_frames=5)
    frames = next(iter(chunks)).frames  # [5, 720, 1280, 3]
    features = backbone.frame_features(frames)
    assert features.shape == (5, 32) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    assert np.abs(features[0] - features[-1]).max() > 1e-3  # different frames, different embeddings

    model, _, info = load_clip(config, weights)
    ours = backbone.preprocessing.normalize(backbone.preprocessing.resize_crop(torch.from_numpy(frames).permute(0, 3, 1, 2)))
    with torch.no_grad():
        direct = model.encode_image(ours, normalize=True).numpy()
    np.testing.assert_allclose(features, direct, atol=1e-5)
    # open_clip's own PIL preprocessing (bicubic, centre crop, CLIP mean/std) gives the same input within a grey level
    transform = open_clip.image_transform(
        info.image_size, is_train=False, mean=info.mean, std=info.std, resize_mode=info.resize_mode, interpolation=info.interpolation
    )
    theirs = torch.stack([transform(Image.fromarray(frame)) for frame in frames])
    grey_levels = (theirs - ours) * torch.tensor(info.std).view(3, 1, 1) * 255
    assert grey_levels.abs().max() <= 1.01
    with torch.no_grad():
        np.testing.assert_allclose(features, model.encode_image(theirs, normalize=True).numpy(), atol=1e-3)


def test_clip_backbone_in_bfloat16_leaves_the_cached_model_alone(tiny):
    config, weights = tiny
    frames = np.random.default_rng(0).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    full = build_backbone(BackboneConfig(name=f"clip:{config}", weights=weights)).frame_features(frames)
    with warnings.catch_warnings():  # a CPU without native bfloat16 runs float32, with a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        half = build_backbone(BackboneConfig(name=f"clip:{config}", weights=weights, dtype="bfloat16"))
    np.testing.assert_allclose(half.frame_features(frames), full, atol=0.05)
    model = load_clip(config, weights)[0]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    np.testing.assert_array_equal(build_backbone(BackboneConfig(name=f"clip:{config}", weights=weights)).frame_features(frames), full)


def test_clip_extraction_through_ray(tiny, ray_session, tmp_path):
    from pipelines.synth import synthesize

    config, weights = tiny
    synth = synthesize(
        tmp_path / "synth", videos=1, seed=3, classes=2, duration_range=(3.0, 3.0), size=(96, 64), fps=10.0, workers=1, progress=False
    )
    ((vid, video),) = synth.videos.items()
    sampling = SamplingConfig(fps=5.0, window=2, stride=2, chunk_frames=16)
    backbone_config = BackboneConfig(name=f"clip:{config}", weights=weights, batch_size=8)
    out = str(tmp_path / "store")
    summary = extract(ExtractConfig(videos=str(video), out=out, backbone=backbone_config, sampling=sampling, num_workers=1, progress=False))
    assert summary.extracted == 1 and not summary.failed
    store = FeatureStore(out)
    seq = store.read_all()[vid]
    assert seq.features.shape[1] == 32 and len(seq.features) >= 6 and np.isfinite(seq.features).all()
    assert store.provenance.backbone == f"clip:{config}" and store.provenance.feature_dim == 32
    local = features_for_video(build_backbone(backbone_config), str(video), sampling)
    np.testing.assert_allclose(seq.features, local.features, rtol=1e-5, atol=1e-5)
