"""TriDet's Trident head: shapes, ranges, padding invariance, hand-computed distributions, gradients, config checks."""

from __future__ import annotations

import pytest
import torch

from tal_models.trident import TridentHead, TridentHeadConfig, neighbours, relative_boundary_distance

ATOL = 1e-5
SMALL = TridentHeadConfig(in_dim=8, feat_dim=8, num_layers=3, num_bins=4, levels=3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pyramid(lengths: list[int], T: int, levels: int, C: int, garbage: float = 1e4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-level features ``[B, C, T / 2**l]`` (garbage at padded steps) and prefix masks of ``ceil(n / 2**l)`` steps."""
    feats, masks = [], []
    for level in range(levels):
        T_l = T // 2**level
        x = garbage * torch.randn(len(lengths), C, T_l)
        mask = torch.zeros(len(lengths), 1, T_l, dtype=torch.bool)
        for b, n in enumerate(lengths):
            n_l = -(-n // 2**level)
            x[b, :, :n_l] = torch.randn(C, n_l)
            mask[b, :, :n_l] = True
        feats.append(x)
        masks.append(mask)
    return feats, masks


def test_shapes_range_and_zero_at_invalid_steps():
    head = TridentHead(SMALL)
    feats, masks = pyramid([16, 11], 16, SMALL.levels, SMALL.in_dim)
    outs = head(feats, masks)
    assert len(outs) == SMALL.levels
    for out, mask in zip(outs, masks):
        assert out.shape == (2, 2, mask.shape[-1])
        assert torch.isfinite(out).all()
        assert (out >= 0).all() and (out <= SMALL.num_bins + 1e-6).all()
        assert (out.masked_select(~mask) == 0).all()
        # the distributions never reach outside the valid steps
        n = mask.sum(dim=-1)  # [B, 1]
        t = torch.arange(mask.shape[-1])
        assert (out[:, 0] <= t + 1e-5)[mask[:, 0]].all()
        assert (out[:, 1] <= n - 1 - t + 1e-5)[mask[:, 0]].all()


def test_padding_invariance():
    """Each video alone (every step valid) vs in a batch padded with large garbage: equal at valid steps."""
    head = TridentHead(SMALL)
    lengths = [8, 13, 5]
    feats, masks = pyramid(lengths, 24, SMALL.levels, SMALL.in_dim)
    feats[0][2, :, -1] = float("inf")  # even inf/NaN in the padding must not leak
    feats[1][1, :, -1] = float("nan")
    outs = head(feats, masks)
    for b in range(len(lengths)):
        alone = head([x[b : b + 1, :, : m[b].sum()] for x, m in zip(feats, masks)], [m[b : b + 1, :, : m[b].sum()] for m in masks])
        for out, ref, mask in zip(outs, alone, masks):
            n_l = int(mask[b].sum())
            assert ref.shape[-1] == n_l
            torch.testing.assert_close(out[b, :, :n_l], ref[0], atol=ATOL, rtol=0)


def test_distributions_ignore_whatever_the_padding_holds():
    """The pure function alone: garbage logits (large, inf, NaN) at padded steps change nothing at valid steps."""
    N, n, T = 4, 6, 11
    boundary, offsets = torch.randn(1, n), torch.randn(1, n, N + 1)
    mask = torch.arange(T)[None] < n
    garbage = torch.tensor([1e4, float("inf"), float("nan"), -1e4, 3.0])
    padded_boundary = torch.cat((boundary, garbage[None]), dim=1)
    padded_offsets = torch.cat((offsets, garbage[None, :, None].expand(1, T - n, N + 1)), dim=1)
    for side in ("start", "end"):
        ref = relative_boundary_distance(boundary, offsets, torch.ones(1, n, dtype=torch.bool), side)
        out = relative_boundary_distance(padded_boundary, padded_offsets, mask, side)
        torch.testing.assert_close(out[:, :n], ref, atol=ATOL, rtol=0)
        assert (out[:, n:] == 0).all()


def test_neighbours_alignment():
    x = torch.arange(1.0, 6.0)[None]  # [1, 5]: steps 0..4 hold 1..5
    start, end = neighbours(x, 2, "start"), neighbours(x, 2, "end")
    assert start.shape == end.shape == (1, 5, 3)
    assert start[0, 3].tolist() == [4.0, 3.0, 2.0]  # steps 3, 2, 1
    assert start[0, 0].tolist() == [1.0, 0.0, 0.0]  # steps -1, -2 do not exist
    assert end[0, 1].tolist() == [2.0, 3.0, 4.0]  # steps 1, 2, 3
    assert end[0, 4].tolist() == [5.0, 0.0, 0.0]


def test_dominant_boundary_step_gives_its_distance():
    """A huge boundary logit at one step: every point within N steps of it points at that step."""
    N, T = 4, 12
    mask = torch.ones(1, T, dtype=torch.bool)
    offsets = torch.zeros(1, T, N + 1)
    boundary = torch.zeros(1, T)
    boundary[0, 5] = 50.0
    d_start = relative_boundary_distance(boundary, offsets, mask, "start")[0]
    d_end = relative_boundary_distance(boundary, offsets, mask, "end")[0]
    for t in range(5, 5 + N + 1):
        assert d_start[t].item() == pytest.approx(t - 5, abs=1e-5)
    for t in range(5 - N, 6):
        assert d_end[t].item() == pytest.approx(5 - t, abs=1e-5)


def test_uniform_logits_count_only_existing_valid_steps():
    """Equal logits: the distance is the mean of the reachable distances, 0..min(t, N) for starts."""
    N, T, n = 4, 10, 7
    mask = torch.arange(T)[None] < n
    boundary = 1e4 * torch.randn(1, T) * ~mask  # garbage at padded steps
    offsets = torch.zeros(1, T, N + 1)
    d_start = relative_boundary_distance(boundary, offsets, mask, "start")[0]
    d_end = relative_boundary_distance(boundary, offsets, mask, "end")[0]
    for t in range(n):
        assert d_start[t].item() == pytest.approx(min(t, N) / 2, abs=1e-5)
        assert d_end[t].item() == pytest.approx(min(n - 1 - t, N) / 2, abs=1e-5)
    assert (d_start[n:] == 0).all() and (d_end[n:] == 0).all()


def test_head_with_a_dominant_centre_offset_bin():
    """Output convolutions set by hand: flat boundary logits, centre offsets peaked at distance 3 (start) and 1 (end)."""
    cfg = TridentHeadConfig(in_dim=4, feat_dim=4, num_layers=2, num_bins=4, levels=2)
    head = TridentHead(cfg)
    with torch.no_grad():
        for branch in (head.start_branch, head.end_branch, head.offset_branch):
            branch.out.conv.weight.zero_()
        bias = head.offset_branch.out.conv.bias
        bias.zero_()
        bias[3] = 40.0  # start, distance 3
        bias[cfg.num_bins + 1 + 1] = 40.0  # end, distance 1
        head.scales.fill_(1.0)
    feats, masks = pyramid([8], 8, cfg.levels, cfg.in_dim)
    out = head(feats, masks)[0][0]  # level 0, [2, 8]
    torch.testing.assert_close(out[0, 3:], torch.full((5,), 3.0), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, :7], torch.full((7,), 1.0), atol=ATOL, rtol=0)
    assert out[0, 0].item() == pytest.approx(0.0, abs=ATOL)  # only distance 0 exists at the first step
    assert out[1, 7].item() == pytest.approx(0.0, abs=ATOL)


@pytest.mark.parametrize("detach_boundary", [True, False])
def test_gradients_reach_every_parameter(detach_boundary: bool):
    head = TridentHead(TridentHeadConfig(in_dim=8, feat_dim=8, num_bins=4, levels=3, detach_boundary=detach_boundary))
    feats, masks = pyramid([16, 9], 16, 3, 8)
    feats = [x.requires_grad_() for x in feats]
    loss = sum((out * torch.randn_like(out)).sum() for out in head(feats, masks))
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for x, mask in zip(feats, masks):
        assert torch.isfinite(x.grad).all()
        assert (x.grad.masked_select(~mask) == 0).all()  # padding is not read


def test_detached_boundary_branches_do_not_train_the_features():
    head = TridentHead(TridentHeadConfig(in_dim=8, feat_dim=8, num_bins=4, levels=1))
    with torch.no_grad():
        head.offset_branch.out.conv.weight.zero_()  # distances depend on the features through the boundary branches only
    x = torch.randn(1, 8, 10, requires_grad=True)
    head([x], [torch.ones(1, 1, 10, dtype=torch.bool)])[0].sum().backward()
    assert x.grad is None or (x.grad == 0).all()
    assert head.start_branch.out.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_dim": 0}, "in_dim must be a positive int"),
        ({"num_layers": 0}, "num_layers must be a positive int"),
        ({"num_bins": 2.5}, "num_bins must be a positive int"),
        ({"levels": True}, "levels must be a positive int"),
        ({"kernel_size": 4}, "kernel_size must be an odd positive int"),
        ({"boundary_kernel_size": 0}, "boundary_kernel_size must be an odd positive int"),
        ({"detach_boundary": 1}, "detach_boundary must be True or False"),
    ],
)
def test_config_validation(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        TridentHeadConfig(**kwargs)


def test_wrong_number_of_levels_is_rejected():
    head = TridentHead(SMALL)
    feats, masks = pyramid([8], 8, 2, SMALL.in_dim)
    with pytest.raises(AssertionError, match="expected 3 levels"):
        head(feats, masks)
