"""The epoch loops (tal_models.training)."""

import pytest
import torch
from torch import nn

from tal_models.batch import Batch, collate
from tal_models.optim import ModelEMA, OptimConfig, build_optimizer, build_scheduler
from tal_models.training import train_one_epoch, validate_one_epoch


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
