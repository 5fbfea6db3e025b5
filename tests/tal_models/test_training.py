import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from tal_models.batch import Batch, collate, random_crop
from tal_models.layers import LayerNormC
from tal_models.optim import ModelEMA, OptimConfig, build_optimizer, build_scheduler
from tal_models.timing import FeatureTiming
from tal_models.training import train_one_epoch, validate_one_epoch


# --- config, optimiser, schedule -------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, match",
    [
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"epochs": 0}, "epochs"),
        ({"warmup_epochs": 36}, "warmup_epochs"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ],
)
def test_optim_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**bad)
    OptimConfig(clip_grad_norm=None, ema_decay=None, warmup_epochs=0)


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.norm = LayerNormC(8)
        self.bn = nn.BatchNorm1d(8)
        self.scale = nn.Parameter(torch.ones(()))
        self.head = nn.Linear(8, 2, bias=False)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.tied = self.head  # shared module: its weight must appear once


def test_build_optimizer_groups():
    net = _TinyNet()
    opt = build_optimizer(net, OptimConfig(lr=1e-3, weight_decay=0.05))
    groups = {g["name"]: g for g in opt.param_groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["decay"] == {id(net.conv.weight), id(net.head.weight)}
    no_decay = {id(net.conv.bias), id(net.bn.weight), id(net.bn.bias), id(net.scale)}
    no_decay |= {id(p) for p in net.norm.parameters()}
    assert ids["no_decay"] == no_decay
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)


def test_scheduler_warmup_then_cosine():
    config = OptimConfig(lr=0.1, warmup_epochs=2, epochs=10)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    sched = build_scheduler(opt, config, steps_per_epoch=5)
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.05)  # half-way through the warm-up
    assert lrs[10] == pytest.approx(0.1)  # end of warm-up
    assert lrs[30] == pytest.approx(0.05)  # middle of the cosine: (1 + cos(pi / 2)) / 2
    assert lrs[20] == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lrs[50] == pytest.approx(0.0, abs=1e-12) and lrs[59] == pytest.approx(0.0, abs=1e-12)
    assert max(lrs) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_scheduler(opt, config, steps_per_epoch=0)


# --- EMA -------------------------------------------------------------------------------------
def test_ema_matches_hand_computation():
    net = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    ema = ModelEMA(net, decay=0.9)
    w0 = net[0].weight.detach().clone()
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    net(torch.randn(4, 2))  # training-mode forward moves the BN buffers
    ema.update(net)
    torch.testing.assert_close(ema.module[0].weight, 0.9 * w0 + 0.1 * torch.ones_like(w0))
    torch.testing.assert_close(ema.module[1].running_mean, 0.1 * net[1].running_mean)  # from 0
    assert ema.module[1].num_batches_tracked.item() == 1  # integers are copied
    with torch.no_grad():
        net[0].weight.fill_(3.0)
    ema.update(net)
    expected = 0.9 * (0.9 * w0 + 0.1) + 0.1 * 3.0
    torch.testing.assert_close(ema.module[0].weight, expected)
    assert ema.num_updates == 2

    other = ModelEMA(copy.deepcopy(net), decay=0.5)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.module[0].weight, expected)
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(net, decay=1.0)


# --- random_crop -----------------------------------------------------------------------------
def _video(num_steps=100, channels=3):
    features = np.arange(num_steps * channels, dtype=np.float32).reshape(num_steps, channels)
    segments = np.array([[10.0, 20.0], [50.0, 54.0], [80.0, 99.0]])
    labels = np.array([0, 1, 2])
    return features, segments, labels


def test_random_crop_short_inputs_unchanged():
    features, segments, labels = _video(num_steps=32)
    out = random_crop(features, segments, labels, max_length=32, generator=torch.Generator().manual_seed(0))
    assert out[0] is features and out[1] is segments and out[2] is labels and out[3] == 0


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_random_crop_window_segments_and_offset(backend):
    features, segments, labels = _video()
    if backend == "torch":
        features, segments, labels = map(torch.as_tensor, (features, segments, labels))
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed) if backend == "torch" else np.random.default_rng(seed)
        f, s, lab, offset = random_crop(features, segments, labels, max_length=30, generator=gen)
        assert type(f) is type(features) and type(s) is type(segments)
        assert f.shape == (30, 3) and 0 <= offset <= 70
        np.testing.assert_array_equal(np.asarray(f), np.asarray(features)[offset : offset + 30])  # offset is the start
        s = np.asarray(s)
        assert len(s) >= 1 and len(s) == len(lab)  # every 30-step window can keep an action after a few tries
        assert (s >= 0).all() and (s <= 30).all() and (s[:, 1] > s[:, 0]).all()
        # kept segments are the originals clipped to the window, shifted by the offset
        for seg, label in zip(s, np.asarray(lab)):
            orig = np.asarray(segments)[np.asarray(labels) == label][0]
            np.testing.assert_allclose(seg, np.clip(orig, offset, offset + 30) - offset)


def test_random_crop_deterministic_and_timing_offset():
    features, segments, labels = _video()
    a = random_crop(features, segments, labels, 30, torch.Generator().manual_seed(3))
    b = random_crop(features, segments, labels, 30, torch.Generator().manual_seed(3))
    assert a[3] == b[3]
    np.testing.assert_array_equal(a[1], b[1])
    # a crop starting at step s: step i of the crop is step s + i of the video
    timing = FeatureTiming(fps=30, stride=4, window=16)
    cropped = FeatureTiming(fps=30, stride=4, window=16, offset=a[3] * timing.seconds_per_step)
    np.testing.assert_allclose(cropped.centers(30), timing.centers(100)[a[3] : a[3] + 30])


def test_random_crop_min_kept_fraction_and_no_actions():
    features, _, _ = _video()
    segments = np.array([[0.0, 100.0]])  # one long action: at most 30% of it fits a 30-step window
    f, s, lab, _ = random_crop(features, segments, np.array([1]), 30, np.random.default_rng(0), min_kept_fraction=0.5)
    assert f.shape == (30, 3) and s.shape == (0, 2) and lab.shape == (0,)
    _, s, _, _ = random_crop(features, segments, np.array([1]), 30, np.random.default_rng(0), min_kept_fraction=0.3)
    np.testing.assert_allclose(s, [[0.0, 30.0]])
    f, s, _, offset = random_crop(features, np.zeros((0, 2)), np.zeros((0,), np.int64), 30, np.random.default_rng(0))
    assert f.shape == (30, 3) and s.shape == (0, 2) and 0 <= offset <= 70


# --- collate ---------------------------------------------------------------------------------
def _sample(num_steps, video_id, channels=3, as_dict=True):
    features = torch.randn(num_steps, channels) + 5.0  # never zero, so padding is recognisable
    sample = {
        "features": features.numpy() if as_dict else features,
        "segments": np.array([[1.0, 2.0]]) if num_steps > 3 else np.zeros((0, 2)),
        "labels": np.array([1]) if num_steps > 3 else np.zeros((0,), np.int64),
        "video_id": video_id,
    }
    if as_dict:
        return sample

    class _Sample:  # attribute access, like a dataclass
        pass

    obj = _Sample()
    obj.__dict__.update(sample)
    return obj


def test_collate_pads_and_masks():
    samples = [_sample(5, "a"), _sample(11, "b", as_dict=False), _sample(2, "c")]
    batch = collate(samples, pad_to_multiple=8)
    assert batch.features.shape == (3, 3, 16) and batch.features.dtype == torch.float32
    assert batch.mask.shape == (3, 1, 16) and batch.mask.dtype == torch.bool
    assert batch.mask.sum(dim=(1, 2)).tolist() == [5, 11, 2] and batch.lengths().tolist() == [5, 11, 2]
    for i, n in enumerate([5, 11, 2]):
        assert batch.mask[i, 0, :n].all()
        torch.testing.assert_close(batch.features[i, :, :n], torch.as_tensor(_field(samples[i], "features")).T)
        assert (batch.features[i, :, n:] == 0).all()
    assert batch.video_ids == ["a", "b", "c"] and len(batch) == 3
    assert batch.segments[2].shape == (0, 2) and batch.labels[2].dtype == torch.int64
    assert batch.segments[0].dtype == torch.float32
    assert collate([_sample(16, "x")], pad_to_multiple=8).features.shape[-1] == 16
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved.features.device.type == "cpu"
    with pytest.raises(ValueError, match="pad_to_multiple"):
        collate(samples, pad_to_multiple=0)
    with pytest.raises(ValueError, match="one C"):
        collate([_sample(5, "a", channels=3), _sample(5, "b", channels=4)])


def _field(sample, name):
    return sample[name] if isinstance(sample, dict) else getattr(sample, name)


# --- epoch loops -----------------------------------------------------------------------------
class _PooledRegressor(nn.Module):
    """Masked mean over T -> linear -> MSE against the number of segments of each video."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, 1)

    def forward(self, batch: Batch):
        mask = batch.mask.float()  # [B, 1, T]
        pooled = (batch.features * mask).sum(-1) / mask.sum(-1)  # [B, C]
        pred = self.linear(pooled).squeeze(-1)  # [B]
        if self.training:
            target = torch.tensor([float(len(s)) for s in batch.segments])
            loss = ((pred - target) ** 2).mean()
            return {"final_loss": loss, "half_loss": loss.detach() / 2}
        return [(vid, p.item()) for vid, p in zip(batch.video_ids, pred)]


def _loader(num_batches=4, batch_size=4, channels=3):
    gen = torch.Generator().manual_seed(0)
    batches = []
    for b in range(num_batches):
        samples = []
        for i in range(batch_size):
            n_seg = int(torch.randint(0, 3, (1,), generator=gen))
            length = int(torch.randint(4, 12, (1,), generator=gen))
            features = torch.randn(length, channels, generator=gen) * 0.1
            features[:, 0] += n_seg  # make the target learnable
            samples.append({"features": features, "segments": torch.ones(n_seg, 2), "labels": torch.zeros(n_seg), "video_id": f"v{b}_{i}"})
        batches.append(collate(samples, pad_to_multiple=4))
    return batches


def test_train_one_epoch_learns_clips_schedules_and_updates_ema():
    torch.manual_seed(0)
    model = _PooledRegressor(3)
    loader = _loader()
    config = OptimConfig(lr=0.05, weight_decay=0.0, warmup_epochs=1, epochs=8, clip_grad_norm=0.5, ema_decay=0.9)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=len(loader))
    ema = ModelEMA(model, decay=config.ema_decay)

    norms = []  # total gradient norm seen by each optimiser step, after clipping

    def record_norm(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    optimizer.register_step_pre_hook(record_norm)
    history = []
    for _ in range(config.epochs):
        stats = train_one_epoch(model, loader, optimizer, scheduler, ema=ema, clip_grad_norm=config.clip_grad_norm, log_every=2)
        history.append(stats)
    assert set(history[0]) == {"final_loss", "half_loss", "samples_per_second"}
    assert history[0]["half_loss"] == pytest.approx(history[0]["final_loss"] / 2)
    assert history[-1]["final_loss"] < 0.5 * history[1]["final_loss"]
    assert history[0]["samples_per_second"] > 0
    assert len(norms) == config.epochs * len(loader) and max(norms) <= 0.5 + 1e-5
    assert max(norms) > 0.49  # clipping was exercised: early gradients are larger than 0.5
    assert scheduler.last_epoch == config.epochs * len(loader)  # stepped once per iteration
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert ema.num_updates == config.epochs * len(loader)
    assert not torch.equal(ema.module.linear.weight, model.linear.weight)

    detections = validate_one_epoch(ema.module, loader, device="cpu")
    assert [d[0] for d in detections] == [vid for b in loader for vid in b.video_ids]
    assert model.training  # validate_one_epoch restores the mode


def test_validate_one_epoch_uses_eval_and_inference_mode():
    seen = []

    class _Probe(nn.Module):
        def forward(self, batch):
            seen.append((self.training, torch.is_inference_mode_enabled()))
            return list(batch.video_ids)

    probe = _Probe().train()
    out = validate_one_epoch(probe, _loader(num_batches=2, batch_size=2), device="cpu")
    assert out == ["v0_0", "v0_1", "v1_0", "v1_1"]
    assert seen == [(False, True), (False, True)] and probe.training


def test_train_one_epoch_requires_final_loss_and_batches():
    model = _PooledRegressor(3)
    optimizer = build_optimizer(model, OptimConfig())

    class _NoFinal(_PooledRegressor):
        def forward(self, batch):
            return {"loss": super().forward(batch)["final_loss"]}

    no_final = _NoFinal(3)
    with pytest.raises(KeyError, match="final_loss"):
        train_one_epoch(no_final, _loader(1, 2), build_optimizer(no_final, OptimConfig()), None)
    with pytest.raises(ValueError, match="no batches"):
        train_one_epoch(model, [], optimizer, None)
