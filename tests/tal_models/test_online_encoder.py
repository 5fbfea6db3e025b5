"""The causal pyramid: causality, step-by-step == offline, padding, bounded state, gradients, config checks."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import one_thread, seed_zero  # noqa: F401 (autouse fixtures: seed 0, one thread)
from test_layers import assert_valid_prefix_equal, assert_zero_at_invalid, pad_batch

from tal_models.config import config_from_dict, config_to_dict
from tal_models.online.encoder import CAUSAL_KINDS, CausalEncoderConfig, CausalPyramid
from tal_models.online.layers import ConvTail, causal_max_pool, causal_window_attention

C_IN, D = 6, 8


def small_config(kind: str, **overrides) -> CausalEncoderConfig:
    fields = dict(kind=kind, input_dim=C_IN, embed_dim=D, levels=3, heads=2, window=4, mlp_ratio=2.0, ssm_state=3, drop_path=0.1)
    return CausalEncoderConfig(**(fields | overrides))


def random_model(config: CausalEncoderConfig) -> CausalPyramid:
    """Eval mode, every parameter moved off its initial value (layer norm gains != 1, biases != 0)."""
    model = CausalPyramid(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def run_steps(model: CausalPyramid, x: torch.Tensor) -> torch.Tensor:
    """``x [B, C, n]`` fed one step at a time from a fresh state -> ``[B, D, n]``."""
    state = model.init_state(x.shape[0])
    return torch.stack([model.step(x[:, :, t], state) for t in range(x.shape[2])], dim=-1)


# --- the pieces ---------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 2, 5, 16])
def test_causal_window_attention_matches_a_naive_banded_softmax(window):
    B, H, T, d = 2, 2, 37, 4  # 37 steps: two partial blocks of ATTENTION_BLOCK queries
    q, k, v = torch.randn(3, B, H, T, d).unbind(0)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, 30:] = False
    out = causal_window_attention(q, k, v, key_mask, window)
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (s <= t) & (s > t - window) & key_mask[:, None, None, :]  # [B, 1, T, T]
    scores = (q @ k.transpose(2, 3) / math.sqrt(d)).masked_fill(~allowed, -math.inf)
    expected = scores.softmax(-1) @ v
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :, :30], expected[1, :, :30], atol=1e-5, rtol=0)


def test_causal_max_pool_reads_the_completed_pair_and_the_step_before():
    x = torch.tensor([[[5.0, 1.0, 2.0, 3.0, 9.0, 0.0, 4.0, 7.0]]])
    assert causal_max_pool(x, 3).tolist() == [[[5.0, 3.0, 9.0, 7.0]]]  # max of steps (2j - 1), 2j, 2j + 1
    assert causal_max_pool(x, 2).tolist() == [[[5.0, 3.0, 9.0, 7.0]]]
    assert causal_max_pool(x, 4).tolist() == [[[5.0, 5.0, 9.0, 9.0]]]


def test_conv_tail_returns_the_last_span_inputs_oldest_first():
    tail = ConvTail(1, 1, 3, fill=-1.0)
    seen = [tail.push(torch.tensor([[float(i)]]))[0, 0].tolist() for i in range(5)]
    assert seen == [[-1.0, -1.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]]


# --- the protocols, for every kind ------------------------------------------------------------
@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_outputs_never_read_later_steps(kind):
    model = random_model(small_config(kind))
    T = 16
    x = torch.randn(2, C_IN, T)
    mask = torch.ones(2, 1, T, dtype=torch.bool)
    with torch.no_grad():
        ref = model(x, mask)
        for t in (0, 2, 3, 7, 10, 14):
            changed = x.clone()
            changed[:, :, t + 1 :] = 100 * torch.randn(2, C_IN, T - t - 1)
            out = model(changed, mask)
            assert torch.equal(out[:, :, : t + 1], ref[:, :, : t + 1]), f"step <= {t} changed"
            assert not torch.equal(out[:, :, t + 1 :], ref[:, :, t + 1 :])  # the perturbation does reach later steps


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_steps_one_at_a_time_equal_the_offline_forward(kind):
    config = small_config(kind)
    model = random_model(config)
    n = 2 * config.total_stride + 5  # 13 steps: every level completes steps, and the last ones stay incomplete
    T = -(-n // config.total_stride) * config.total_stride
    x, mask = pad_batch([torch.randn(C_IN, n)], T)
    with torch.no_grad():
        offline = model(x, mask)
    stepped = run_steps(model, x[:, :, :n])
    torch.testing.assert_close(stepped, offline[:, :, :n], atol=1e-5, rtol=0)
    assert_zero_at_invalid(offline, mask)
    assert float(offline[:, :, :n].abs().amin(dim=1).max()) > 0  # not trivially zero


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_nan_padding_in_a_batch_changes_no_valid_output(kind):
    model = random_model(small_config(kind))
    short, long = torch.randn(C_IN, 13), torch.randn(C_IN, 22)
    x_alone, mask_alone = pad_batch([short], 16, garbage=math.nan)
    x, mask = pad_batch([short, long], 24, garbage=math.nan)
    with torch.no_grad():
        out_alone, out = model(x_alone, mask_alone), model(x, mask)
    assert bool(out.isfinite().all()) and bool(out_alone.isfinite().all())
    assert_zero_at_invalid(out, mask)
    assert_valid_prefix_equal(out[0], mask[0], out_alone[0], mask_alone[0])
    assert_valid_prefix_equal(out[1], mask[1], model(*pad_batch([long], 24))[0].detach(), mask[1])


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_state_size_stays_bounded(kind):
    config = small_config(kind)
    model = random_model(config)
    x = torch.randn(1, C_IN, 10 * config.window)
    state = model.init_state(1)
    sizes = []
    for t in range(x.shape[2]):
        model.step(x[:, :, t], state)
        if t + 1 in (3 * config.window, 10 * config.window):
            sizes.append((state.numel(), [tuple(s.shape) for s in state.tensors()]))
    assert state.steps == 10 * config.window
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_gradients_reach_every_parameter(kind):
    model = CausalPyramid(small_config(kind, dropout=0.1, drop_path=0.0)).train()  # DropPath could zero a whole branch
    x, mask = pad_batch([torch.randn(C_IN, 13), torch.randn(C_IN, 16)], 16)
    (model(x, mask) * torch.randn(2, D, 16)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient: {missing}"


def test_step_needs_eval_mode_and_the_input_width():
    model = CausalPyramid(small_config("conv"))
    state = model.init_state(1)
    with pytest.raises(AssertionError, match="eval mode"):
        model.step(torch.randn(1, C_IN), state)
    model.eval()
    with pytest.raises(AssertionError, match=r"\[1, 6\]"):
        model.step(torch.randn(1, C_IN + 1), state)


def test_forward_needs_a_multiple_of_the_total_stride():
    model = CausalPyramid(small_config("maxpool"))
    with pytest.raises(AssertionError, match="multiple of 2"):
        model(torch.randn(1, C_IN, 10), torch.ones(1, 1, 10, dtype=torch.bool))


def test_config_defaults_and_yaml_round_trip():
    config = CausalEncoderConfig()
    assert (config.kind, config.window, config.levels, config.total_stride, config.num_stem_layers()) == ("transformer", 16, 6, 32, 2)
    assert CausalEncoderConfig(kind="maxpool").num_stem_layers() == 0
    config = small_config("mamba", stem_layers=1)
    assert config_from_dict(CausalEncoderConfig, config_to_dict(config)) == config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(kind="sgp"), "kind"),
        (dict(input_dim=0), "input_dim"),
        (dict(embed_dim=7), "embed_dim"),  # not divisible by 2 heads
        (dict(levels=0), "levels"),
        (dict(window=0), "window"),
        (dict(window=2.5), "window"),
        (dict(heads=0), "heads"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(kind="maxpool", kernel_size=1), "kernel_size"),
        (dict(kind="maxpool", stem_layers=2), "stem_layers"),
        (dict(stem_layers=-1), "stem_layers"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
        (dict(dropout=1.0), "dropout"),
        (dict(drop_path=-0.1), "drop_path"),
        (dict(ssm_state=0), "ssm_state"),
        (dict(embed_layers=True), "embed_layers"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"CausalEncoderConfig.{field}"):
        small_config(**({"kind": "transformer"} | overrides))
