"""The open-vocabulary head (tal_models.open_vocab) in the one-stage detector: unseen classes, the class-embedding
buffer, checkpoints, padding, config validation."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import one_thread, seed_zero  # noqa: F401

from tal_models.batch import collate
from tal_models.checkpoint import Checkpoint, checkpoint_bytes, load_checkpoint
from tal_models.config import config_from_dict, config_to_dict
from tal_models.detectors import DetectorConfig, build_detector
from tal_models.heads import HeadConfig
from tal_models.open_vocab import TextClassificationHead, open_vocab_config
from tal_models.optim import OptimConfig, build_optimizer
from tal_models.presets import make_config
from tal_models.structures import Segments, Unit, pairwise_tiou
from tal_models.text import TextEncoderConfig
from tal_models.training import train_one_epoch

C, K = 16, 3  # features and text embeddings share the width here (a VLM's image and text towers)
TABLE = TextEncoderConfig(kind="table", weights="names.npz")


def _config(num_classes: int = K, **kw):
    base = make_config("actionformer", num_classes=num_classes, input_dim=C, max_seq_len=128, embed_dim=32, levels=4, **kw)
    return open_vocab_config(base, text=TABLE, text_dim=C)


def _text_embeddings(num_seen: int = K, seed: int = 0) -> torch.Tensor:
    """``num_seen`` seen classes (random unit directions) and one unseen class after them, related to the seen
    ones as class names are (mostly between seen classes 0 and 1, partly its own direction): ``[num_seen + 1, C]``."""
    g = np.random.default_rng(seed)
    seen = g.standard_normal((num_seen, C))
    seen /= np.linalg.norm(seen, axis=1, keepdims=True)
    own = g.standard_normal(C)
    own -= seen.T @ np.linalg.lstsq(seen.T, own, rcond=None)[0]  # orthogonal to the seen ones
    own /= np.linalg.norm(own)
    mix = (seen[0] + seen[1]) / np.linalg.norm(seen[0] + seen[1])
    unseen = mix + 0.3 * own
    return torch.tensor(np.vstack([seen, unseen / np.linalg.norm(unseen)]), dtype=torch.float32)


def _samples(text: torch.Tensor, classes: list[int], num_videos: int, length: int = 128, seed: int = 0, noise: float = 0.3):
    """Videos whose segments carry their class's text direction (scaled) plus noise; background is noise."""
    g = np.random.default_rng(seed)
    samples = []
    for v in range(num_videos):
        feats = noise * g.standard_normal((length, C)).astype(np.float32)
        segs, labels, t = [], [], int(g.integers(2, 10))
        while True:
            n = int(g.integers(8, 36))
            if t + n >= length - 2:
                break
            k = classes[int(g.integers(len(classes)))]
            feats[t : t + n] += 2.0 * text[k].numpy()
            segs.append([t, t + n])
            labels.append(k)
            t += n + int(g.integers(4, 20))
        samples.append({"features": feats, "segments": np.array(segs, np.float32), "labels": np.array(labels), "video_id": f"v{v}"})
    return samples


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_text_head_starts_at_the_focal_prior_and_clip_temperature():
    model = build_detector(_config())
    head = model.cls_head
    assert isinstance(head, TextClassificationHead) and model.open_vocabulary
    assert head.bias.item() == pytest.approx(-math.log(0.99 / 0.01))
    assert head.log_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert head.tower.out.conv.out_channels == C
    assert head.class_embeddings.shape == (K, C) and "cls_head.class_embeddings" in model.state_dict()


def test_logit_scale_is_capped_at_clip_maximum():
    head = TextClassificationHead(HeadConfig(in_dim=8, feat_dim=8, text_dim=4, num_layers=1), num_classes=1)
    head.set_class_embeddings(torch.tensor([[1.0, 0, 0, 0]]))
    with torch.no_grad():
        head.log_scale.fill_(10.0)
        head.bias.zero_()
        head.tower.out.conv.weight.zero_()
        head.tower.out.conv.bias.copy_(torch.tensor([1.0, 0, 0, 0]))  # every step's embedding is the class's: cos 1
    x, m = torch.randn(1, 8, 5), torch.ones(1, 1, 5, dtype=torch.bool)
    m[..., 3:] = False
    (logits,) = head([x], [m])
    torch.testing.assert_close(logits[0, 0, :3], torch.full((3,), 100.0))
    assert (logits[0, 0, 3:] == 0).all()


SEEN = 8  # 3 seen classes leave the map into text space free outside their span: the unseen class then lost to a seen one


@pytest.mark.parametrize("seed", [7, 8])
def test_unseen_class_is_detected_from_its_text_embedding(seed):
    """Trained on classes 0-7 only; a video of class 8 (never seen), scored with all nine embeddings. The head's
    tower is one convolution (a linear map of the neck's features into text space), which carries over to a
    direction it was not trained on; a deeper tower overfits the seen directions on data this small."""
    torch.manual_seed(0)
    text = _text_embeddings(SEEN)
    config = _config(SEEN)
    model = build_detector(replace(config, head=replace(config.head, num_layers=1)))
    model.set_class_embeddings(text[:SEEN])
    batch = collate(_samples(text, list(range(SEEN)), num_videos=8), model.pad_multiple)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.0, warmup_epochs=0, epochs=60))
    for _ in range(60):
        stats = train_one_epoch(model, [batch], optimizer, None, clip_grad_norm=1.0)
    g = np.random.default_rng(seed)
    feats = 0.3 * g.standard_normal((96, C)).astype(np.float32)
    feats[30:60] += 2.0 * text[SEEN].numpy()
    dets = model.detect(feats, class_embeddings=text)
    assert len(dets) > 0, f"no detection (losses {stats})"
    assert int(dets.labels[0]) == SEEN, f"top detection is class {int(dets.labels[0])}, not the unseen {SEEN} (losses {stats})"
    truth = Segments(torch.tensor([[30.0, 60.0]], dtype=torch.float64), Unit.SECONDS)
    top = Segments(dets.segments.data[:1].double(), Unit.SECONDS)
    assert float(pairwise_tiou(top, truth)[0, 0]) > 0.5, f"top segment {dets.segments.data[0].tolist()}"
    closed = model.detect(feats)  # the training classes only: the unseen one cannot be named
    assert len(closed) == 0 or int(closed.labels.max()) < SEEN


def test_given_class_embeddings_leave_the_buffer_alone():
    text = _text_embeddings()[: K + 1]
    model = _perturbed(build_detector(_config())).eval()
    model.set_class_embeddings(3.0 * text[:K])
    before = model.cls_head.class_embeddings.clone()
    torch.testing.assert_close(before.norm(dim=1), torch.ones(K))  # normalised on set
    feats = torch.randn(40, C)
    dets = model.detect(feats, class_embeddings=torch.randn(5, C))
    assert torch.equal(model.cls_head.class_embeddings, before)
    assert dets.labels.numel() == 0 or int(dets.labels.max()) < 5
    out = model.dense(feats.T[None], torch.ones(1, 1, 40, dtype=torch.bool), class_embeddings=text)
    assert out.cls_logits.shape[-1] == 4
    # the training classes given explicitly score as the buffer does
    a = model.dense(feats.T[None], torch.ones(1, 1, 40, dtype=torch.bool)).cls_logits
    b = model.dense(feats.T[None], torch.ones(1, 1, 40, dtype=torch.bool), class_embeddings=text[:K]).cls_logits
    torch.testing.assert_close(a, b)


def test_checkpoint_round_trip_keeps_the_class_embeddings():
    text = _text_embeddings()[: K + 1]
    model = _perturbed(build_detector(_config())).eval()
    model.set_class_embeddings(text[:K])
    loaded = load_checkpoint(io.BytesIO(checkpoint_bytes(Checkpoint.from_model(model, ["a", "b", "c"]))))
    assert loaded.config == model.config and loaded.config.text == TABLE
    rebuilt = loaded.build()
    torch.testing.assert_close(rebuilt.cls_head.class_embeddings, model.cls_head.class_embeddings)
    feats = torch.randn(50, C)
    for emb in (None, text):
        a, b = model.detect(feats, class_embeddings=emb), rebuilt.detect(feats, class_embeddings=emb)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.scores, b.scores)
        assert torch.equal(a.segments.data, b.segments.data)


def test_configs_without_the_new_keys_still_load():
    data = config_to_dict(make_config("actionformer", num_classes=K, input_dim=C, max_seq_len=128, embed_dim=32, levels=4))
    del data["text"], data["head"]["classifier"], data["head"]["text_dim"]
    config = config_from_dict(DetectorConfig, data)
    assert config.head.classifier == "linear" and config.text.kind == "none"
    assert config_from_dict(DetectorConfig, config_to_dict(_config())) == _config()


def test_padding_changes_nothing_with_the_text_head():
    text = _text_embeddings()[: K + 1]
    model = _perturbed(build_detector(_config())).eval()
    model.set_class_embeddings(text[:K])
    sample = _samples(text, [0, 1, 2], 1, length=80)[0]
    other = dict(_samples(text, [0, 1, 2], 1, length=150, seed=1)[0], video_id="long")
    alone = collate([sample], model.pad_multiple)
    together = collate([sample, other], model.pad_multiple)
    together.features[0, :, 80:] = float("nan")
    for emb in (None, text):
        a = model.dense(alone.features, alone.mask, class_embeddings=emb)
        b = model.dense(together.features[:1], together.mask[:1], class_embeddings=emb)
        for la, lb in zip(a.points.level_slices(), b.points.level_slices()):
            n = int(a.valid[0, la].sum())
            torch.testing.assert_close(b.cls_logits[0, lb][:n], a.cls_logits[0, la][:n], atol=1e-5, rtol=1e-5)
            assert torch.isfinite(b.cls_logits).all()
        batched = collate([sample, other], model.pad_multiple)  # a Batch is zero-padded
        da, db = model.forward_inference(alone, emb)[0], model.forward_inference(batched, emb)[0]
        torch.testing.assert_close(da.scores, db.scores)
        torch.testing.assert_close(da.segments.data, db.segments.data)


def test_config_validation_and_width_errors():
    with pytest.raises(ValueError, match="needs a text encoder: set text.kind"):
        replace(_config(), text=TextEncoderConfig())
    with pytest.raises(ValueError, match=r"HeadConfig.classifier must be one of \('linear', 'text'\)"):
        HeadConfig(classifier="clip")
    with pytest.raises(ValueError, match="HeadConfig.text_dim must be a positive int"):
        HeadConfig(text_dim=0)
    model = build_detector(_config())
    with pytest.raises(ValueError, match=r"\[K, text_dim=16\]"):
        model.set_class_embeddings(torch.randn(K, C + 1))
    with pytest.raises(ValueError, match=r"one row per training class \(3\)"):
        model.set_class_embeddings(torch.randn(K + 1, C))
    with pytest.raises(ValueError, match=r"\[K, text_dim=16\]"):
        model.detect(torch.randn(20, C), class_embeddings=torch.randn(4, 8))
    linear = build_detector(make_config("actionformer", num_classes=K, input_dim=C, max_seq_len=128, embed_dim=32, levels=4))
    with pytest.raises(ValueError, match="linear classifier"):
        linear.set_class_embeddings(torch.randn(K, C))
    with pytest.raises(ValueError, match="linear classifier"):
        linear.detect(torch.randn(20, C), class_embeddings=torch.randn(K, 512))


def test_losses_under_bf16_autocast_and_every_parameter_gets_a_gradient():
    text = _text_embeddings()[: K + 1]
    model = build_detector(_config()).train()
    model.set_class_embeddings(text[:K])
    batch = collate(_samples(text, [0, 1, 2], 2), model.pad_multiple)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # forward only: the backward of LayerNormC's kernel (tal_models.layers.kernels) refuses CPU bf16, with either head
        half = model(batch)
    assert half["cls_loss"].dtype == torch.float32 and torch.isfinite(half["final_loss"])
    losses = model(batch)
    losses["final_loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without a gradient (DDP would need find_unused_parameters): {unused}"
    assert float(model.cls_head.log_scale.grad.abs()) > 0 and float(model.cls_head.bias.grad.abs()) > 0
