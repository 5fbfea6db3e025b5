"""Optimiser groups, warm-up + cosine schedule, EMA (tal_models.optim)."""

import copy
import math

import pytest
import torch
from torch import nn

from tal_models.layers import LayerNormC
from tal_models.optim import ModelEMA, OptimConfig, build_optimizer, build_scheduler


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


def test_mambas_state_parameters_are_not_decayed():
    """``A_log`` ([E, N]) and ``D`` are marked ``_no_weight_decay`` as in the official Mamba; the projections decay."""
    from tal_models.layers import SelectiveSSM

    ssm = SelectiveSSM(8, state_dim=4)
    opt = build_optimizer(ssm, OptimConfig(lr=1e-3, weight_decay=0.05))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert id(ssm.core.A_log) in groups["no_decay"] and id(ssm.core.D) in groups["no_decay"]
    assert id(ssm.in_proj.weight) in groups["decay"] and id(ssm.core.x_proj.weight) in groups["decay"]


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
