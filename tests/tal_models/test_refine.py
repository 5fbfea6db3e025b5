"""The boundary refiner (BRN's scale-time features): shapes, masking, padding invariance, identity at
initialisation, gradients, its loss, and a tiny optimisation that must correct shifted distances."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import one_thread, seed_zero  # noqa: F401 (autouse fixtures: seed 0, one thread)
from torch import nn

from tal_models.layers import downsample_mask
from tal_models.refine import (
    BoundaryRefiner,
    RefineConfig,
    ScaleTimeBlock,
    build_refiner,
    from_scale_time,
    refine_losses,
    to_scale_time,
    upsample_level,
)

D, L = 12, 4  # channels, levels (strides 1, 2, 4, 8)
CONFIG = RefineConfig(kind="brn", hidden_dim=16, num_blocks=2)


def pyramid(lengths: list[int], t0: int, garbage: float = math.nan) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Features ``L x [B, D, T_l]``, masks and distances ``L x [B, 2, T_l]`` (>= 0) of videos of
    ``lengths`` input steps padded to ``t0``; ``garbage`` at every invalid step."""
    mask0 = torch.zeros(len(lengths), 1, t0, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask0[i, :, :n] = True
    feats, masks, offsets = [], [], []
    for level in range(L):
        m = downsample_mask(mask0, 2**level)
        masks.append(m)
        feats.append(torch.randn(len(lengths), D, m.shape[-1]).masked_fill(~m, garbage))
        offsets.append((3 * torch.rand(len(lengths), 2, m.shape[-1])).masked_fill(~m, garbage))
    return feats, masks, offsets


def perturbed(config: RefineConfig = CONFIG) -> BoundaryRefiner:
    """A refiner whose correction is not zero (as after training), so the tests see it act."""
    refiner = BoundaryRefiner(config, D, L)
    with torch.no_grad():
        nn.init.normal_(refiner.delta_out.conv.weight, std=0.3)
        refiner.delta_out.conv.bias.fill_(0.1)
        refiner.scale_embed.normal_()
    return refiner.eval()


def test_config_is_validated():
    with pytest.raises(ValueError, match="encoder-side"):
        RefineConfig(kind="fddet")
    with pytest.raises(ValueError, match="odd"):
        RefineConfig(kernel_size=2)
    with pytest.raises(ValueError, match="repeat"):
        RefineConfig(time_dilations=(1, 1))
    with pytest.raises(ValueError, match="at least one"):
        RefineConfig(scale_dilations=())
    with pytest.raises(ValueError, match="loss_weight"):
        RefineConfig(loss_weight=-1.0)
    assert RefineConfig(scale_dilations=[1, 2]).branches == ((1, 1), (1, 3), (2, 1), (2, 3))


def test_shapes_non_negative_and_zero_at_invalid_steps():
    feats, masks, offsets = pyramid([32, 21, 5], 32)
    refined = perturbed()(feats, masks, offsets)
    assert [tuple(r.shape) for r in refined] == [(3, 2, 32 // 2**level) for level in range(L)]
    for r, m, o in zip(refined, masks, offsets):
        assert torch.isfinite(r).all() and (r >= 0).all()
        assert (r.masked_select(~m) == 0).all()
        assert not torch.equal(r.masked_select(m), o.masked_select(m))  # the correction acts


def test_padding_changes_nothing_at_valid_steps():
    """Each video alone (padded only to its own multiple of 2**(L-1)) equals it in a batch whose padding holds NaN."""
    lengths, t0 = [40, 17, 9], 48
    feats, masks, offsets = pyramid(lengths, t0)
    refiner = perturbed()
    batched = refiner(feats, masks, offsets)
    for i, n in enumerate(lengths):
        own = math.ceil(n / 2 ** (L - 1)) * 2 ** (L - 1)
        cut = [own // 2**level for level in range(L)]
        alone = refiner(
            [f[i : i + 1, :, :c].nan_to_num(0.0) for f, c in zip(feats, cut)],
            [m[i : i + 1, :, :c] for m, c in zip(masks, cut)],
            [o[i : i + 1, :, :c].nan_to_num(0.0) for o, c in zip(offsets, cut)],
        )
        for level, (b, a, m) in enumerate(zip(batched, alone, masks)):
            valid = int(m[i].sum())
            assert valid == math.ceil(n / 2**level)
            torch.testing.assert_close(b[i, :, :valid], a[0, :, :valid], atol=1e-5, rtol=1e-5)


def test_identity_at_initialisation():
    feats, masks, offsets = pyramid([32, 13], 32)
    refiner = BoundaryRefiner(CONFIG, D, L)
    for r, m, o in zip(refiner(feats, masks, offsets), masks, offsets):
        assert torch.equal(r.masked_select(m), o.masked_select(m))
        assert (r.masked_select(~m) == 0).all()
    off = BoundaryRefiner(RefineConfig(), D, L)
    assert sum(p.numel() for p in off.parameters()) == 0 and build_refiner(RefineConfig(), D, L) is None
    for r, m, o in zip(off(feats, masks, offsets), masks, offsets):
        assert torch.equal(r.masked_select(m), o.masked_select(m)) and (r.masked_select(~m) == 0).all()


def test_gradients_reach_features_distances_and_the_zero_initialised_layer():
    feats, masks, offsets = pyramid([32, 19], 32)
    feats = [f.requires_grad_() for f in feats]
    offsets = [o.requires_grad_() for o in offsets]
    fresh = BoundaryRefiner(CONFIG, D, L)
    sum(r.sum() for r in fresh(feats, masks, offsets)).backward()
    assert fresh.delta_out.conv.weight.grad.abs().sum() > 0  # identity at init, yet trainable
    for f in feats:
        f.grad = None
    refiner = perturbed()
    refined = refiner(feats, masks, offsets)
    refined[0].sum().backward()  # level 0's output only: its gradient must reach every level's features
    for f, m in zip(feats, masks):
        grad = f.grad.transpose(0, 1)  # [B, D, T_l] -> [D, B, T_l]
        assert torch.isfinite(grad).all()
        assert grad[:, m[:, 0]].abs().sum() > 0
        assert (grad[:, ~m[:, 0]] == 0).all()
    assert offsets[0].grad.masked_select(masks[0].expand(-1, 2, -1)).abs().sum() > 0


def test_levels_exchange_information_across_scales():
    """BRN's point: a fine level's refinement sees the coarsest level (and vice versa)."""
    feats, masks, offsets = pyramid([32], 32, garbage=0.0)
    refiner = perturbed()
    before = refiner(feats, masks, offsets)
    feats[-1] = feats[-1] + 1.0
    after = refiner(feats, masks, offsets)
    assert not torch.allclose(before[0], after[0])
    feats[-1] = feats[-1] - 1.0
    feats[0] = feats[0] + 1.0
    assert not torch.allclose(before[-1], refiner(feats, masks, offsets)[-1])


def test_scale_time_features_round_trip_and_interpolation():
    feats, masks, _ = pyramid([32, 11], 32)
    stf, stf_mask = to_scale_time(feats, masks)
    assert stf.shape == (2, D, L, 32) and stf_mask.shape == (2, 1, 1, 32)
    assert torch.isfinite(stf).all() and (stf.masked_select(~stf_mask.expand_as(stf)) == 0).all()
    for back, f, m in zip(from_scale_time(stf, masks), feats, masks):
        assert torch.equal(back, f.masked_fill(~m, 0.0))
    x = torch.tensor([[[0.0, 4.0, math.nan]]])  # points at input steps 0, 4 and (padding) 8
    m = torch.tensor([[[True, True, False]]])
    up = upsample_level(x, m, 4, 12)
    torch.testing.assert_close(up[0, 0, :8], torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0]))  # no NaN after step 4
    assert (up[0, 0, 8:] == 0).all()


def test_scale_time_block_selection_ignores_padding():
    block = ScaleTimeBlock(8, 3, ((1, 1), (2, 3)), 4).eval()
    x = torch.randn(1, 8, 3, 10)
    mask = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    padded = torch.cat([x, torch.full((1, 8, 3, 6), 1e4)], dim=-1)
    padded_mask = torch.cat([mask, torch.zeros(1, 1, 1, 6, dtype=torch.bool)], dim=-1)
    out = block(padded.masked_fill(~padded_mask, 0.0), padded_mask)
    torch.testing.assert_close(out[..., :10], block(x, mask), atol=1e-5, rtol=1e-5)
    assert (out[..., 10:] == 0).all()


def test_refine_loss_zero_when_perfect_positive_otherwise_finite_without_positives():
    targets = 1.0 + 3 * torch.rand(2, 7, 2)
    positive = torch.tensor([[True, False, True, True, False, False, True], [False] * 6 + [True]])
    assert refine_losses(targets.clone(), targets, positive)["refine_loss"].item() == 0.0
    wrong = targets.clone()
    wrong[0, 2, 0] += 0.5
    loss = refine_losses(wrong, targets, positive)["refine_loss"]
    assert loss.item() > 0
    wrong[0, 1] += 5.0  # a negative point: no effect
    torch.testing.assert_close(refine_losses(wrong, targets, positive)["refine_loss"], loss)
    torch.testing.assert_close(refine_losses(wrong, targets, positive, normalizer=10.0)["refine_loss"], loss * 5 / 10)
    pred = wrong.clone().requires_grad_()
    none = refine_losses(pred, targets, torch.zeros(2, 7, dtype=torch.bool))["refine_loss"]
    assert none.item() == 0.0 and torch.isfinite(none)
    none.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_training_corrects_shifted_distances():
    """Distances off by a known shift (start +0.8, end -0.6 strides): a few hundred Adam steps of the
    refiner alone on its loss must bring them much closer to the targets than its input was."""
    feats, masks, _ = pyramid([32], 32, garbage=0.0)
    targets = [1.0 + 2 * torch.rand(1, 2, m.shape[-1]) for m in masks]
    shift = torch.tensor([0.8, -0.6])[None, :, None]
    inputs = [t + shift for t in targets]
    flat = lambda xs: torch.cat([x.transpose(1, 2) for x in xs], dim=1)  # noqa: E731  L x [B, 2, T_l] -> [B, P, 2]
    positive = torch.ones(1, sum(m.shape[-1] for m in masks), dtype=torch.bool)
    refiner = BoundaryRefiner(CONFIG, D, L)
    optimizer = torch.optim.Adam(refiner.parameters(), lr=3e-3)
    start = refine_losses(flat(inputs), flat(targets), positive)["refine_loss"].item()
    for _ in range(300):
        loss = refine_losses(flat(refiner(feats, masks, inputs)), flat(targets), positive)["refine_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        refined = flat(refiner(feats, masks, inputs))
    error_in = (flat(inputs) - flat(targets)).abs().mean().item()
    error_out = (refined - flat(targets)).abs().mean().item()
    assert error_out < 0.3 * error_in, f"mean |error| {error_in:.3f} -> {error_out:.3f}"
    assert refine_losses(refined, flat(targets), positive)["refine_loss"].item() < 0.3 * start
