"""G-TAD's GCNeXt block and DyFADet's DFA blocks: padding invariance, kNN against brute force, memory, parameter counts.

The padding tests run each video once alone (``T`` = its length) and once in a padded batch whose
padded steps hold large random garbage (or NaN); every valid output must agree.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread, seed_zero  # noqa: F401 (autouse fixtures: seed 0, one thread)
from test_layers import pad_batch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tal_models.layers.conv import MaskedConv1d
from tal_models.layers.dynamic import DynamicAggregation, DynamicAggregationBlock, DynamicConvTower, ge_retanh, resize_level, shift_taps
from tal_models.layers.graph import GCNeXtBlock, semantic_neighbours
from tal_models.layers.masking import masked_max_pool

ATOL = 1e-5


def assert_prefix_equal(out: torch.Tensor, ref: torch.Tensor, n: int):
    """``out [C, T]`` and ``ref [C, T']`` agree on the first ``n`` steps (to ATOL times the scale)."""
    scale = max(1.0, float(ref[:, :n].abs().max()))
    torch.testing.assert_close(out[:, :n], ref[:, :n], atol=ATOL * scale, rtol=0)


def assert_zero_at_invalid(x: torch.Tensor, mask: torch.Tensor):
    assert bool((x.masked_select(~mask.expand_as(x)) == 0).all()), "non-zero output at an invalid step"


class LargestAllocation(TorchDispatchMode):
    """The most elements any op's output storage holds."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


class TowerBlock(torch.nn.Module):
    """``DynamicConvTower`` in the ``(x, mask) -> (x, mask)`` form of the blocks, for the shared tests."""

    def __init__(self, tower: DynamicConvTower):
        super().__init__()
        self.tower = tower

    def forward(self, x, mask):
        return self.tower(x, mask), mask


BLOCKS = {
    "gcnext": lambda: GCNeXtBlock(8, k=3, groups=2),
    "gcnext_s2": lambda: GCNeXtBlock(8, k=3, groups=2, width=4, stride=2),
    "dfa": lambda: DynamicAggregationBlock(8, 3, mlp_ratio=2, groups=4),
    "dfa_s2": lambda: DynamicAggregationBlock(8, 1, stride=2, k=5, mlp_ratio=1.5, groups=2),
    "tower": lambda: TowerBlock(DynamicConvTower(8, 6, 5, 3, 3)),
}


def stride_of(name: str) -> int:
    return 2 if name.endswith("s2") else 1


# --- every block: padding invariance, gradients -------------------------------------------------
@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("garbage", [1e4, math.nan])
def test_block_ignores_padding(name, garbage):
    block, stride = BLOCKS[name]().eval(), stride_of(name)
    videos = [torch.randn(8, 24), torch.randn(8, 14), torch.randn(8, 2)]  # 2 steps: fewer than k = 3 neighbours
    x, mask = pad_batch(videos, 40, garbage)
    with torch.no_grad():
        out, out_mask = block(x, mask)
        assert out.shape == (3, 8 if name != "tower" else 5, 40 // stride)
        assert torch.equal(out_mask, mask[..., ::stride])
        assert bool(torch.isfinite(out).all())
        assert_zero_at_invalid(out, out_mask)
        for i, video in enumerate(videos):
            ref, ref_mask = block(*pad_batch([video], video.shape[1]))
            n = math.ceil(video.shape[1] / stride)
            assert int(out_mask[i].sum()) == int(ref_mask.sum()) == n
            assert_prefix_equal(out[i], ref[0], n)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_gradients_reach_valid_inputs_only(name):
    block = BLOCKS[name]().train()
    x, mask = pad_batch([torch.randn(8, 24), torch.randn(8, 14)], 40)
    x.requires_grad_(True)
    out, _ = block(x, mask)
    (out * torch.randn_like(out)).sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    assert bool((x.grad.masked_select(~mask.expand_as(x)) == 0).all())
    reached = (x.grad.abs().sum(dim=1) > 0)[mask[:, 0]]
    assert bool(reached.all() if stride_of(name) == 1 else reached.any())  # a max-pool may pass over a step


# --- GCNeXt: the semantic graph -----------------------------------------------------------------
def brute_force_neighbours(x: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """All ``[B, T, T]`` squared distances at once; padded candidates excluded, self first."""
    dist = (x[:, :, :, None] - x[:, :, None, :]).pow(2).sum(dim=1)  # [B, T, T]
    dist = dist.masked_fill(~mask, math.inf)
    dist = dist - torch.diag_embed(torch.full(x.shape[:1] + x.shape[2:], math.inf))  # self: -inf
    return dist.topk(k, dim=-1, largest=False).indices  # [B, T, k]


@pytest.mark.parametrize("block_size", [4, 256])
def test_semantic_neighbours_equal_brute_force(block_size):
    B, C, T, k = 2, 5, 23, 4
    x = torch.randn(B, C, T)
    mask = torch.rand(B, 1, T) > 0.25  # holes anywhere, not only a padded tail
    idx = semantic_neighbours(x, mask, k, block_size=block_size)
    ref = brute_force_neighbours(x.masked_fill(~mask, 0.0), mask, k)
    assert idx.shape == (B, T, k) and idx.dtype == torch.long
    assert torch.equal(idx[..., 0], torch.arange(T).expand(B, T))  # each step is its own first neighbour
    valid = mask[:, 0]
    assert torch.equal(idx.sort(dim=-1).values[valid], ref.sort(dim=-1).values[valid])


def test_semantic_neighbours_never_pick_padding():
    n, T = 6, 16
    x = torch.randn(1, 4, T)
    x[..., n : 2 * n] = x[..., :n] + 1e-3  # each valid step has a padded near-twin, nearer than any valid step
    x[..., 2 * n :] = 0.0
    mask = torch.zeros(1, 1, T, dtype=torch.bool)
    mask[..., :n] = True
    idx = semantic_neighbours(x, mask, 3, block_size=5)
    assert bool((idx[0, :n] < n).all()), idx[0, :n]
    # unmasked, the twins would win: the test can fail
    assert bool((semantic_neighbours(x, torch.ones_like(mask), 3)[0, :n, 1] >= n).all())


def test_semantic_neighbours_with_fewer_valid_steps_than_k():
    x, mask = pad_batch([torch.randn(3, 2), torch.randn(3, 1)], 6)
    idx = semantic_neighbours(x, mask, 4)
    assert idx[0, 0].tolist() == [0, 1, 0, 0] and idx[0, 1].tolist() == [1, 0, 1, 1]
    assert idx[1, 0].tolist() == [0, 0, 0, 0]
    alone = semantic_neighbours(torch.randn(1, 3, 2), torch.ones(1, 1, 2, dtype=torch.bool), 5)  # k > T
    assert alone[0].tolist() == [[0, 1, 0, 0, 0], [1, 0, 1, 1, 1]]


def test_gcnext_semantic_stream_equals_edge_convolution_on_brute_force_neighbours():
    """The paper's EdgeConv written out: [x_t, x_j - x_t] -> 1x1 -> ReLU -> grouped 1x1 -> ReLU -> 1x1 -> max over j."""
    block = GCNeXtBlock(6, k=3, groups=2, width=8)
    x, mask = pad_batch([torch.randn(6, 17), torch.randn(6, 9)], 17)
    x = x.masked_fill(~mask, 0.0)
    out = block.semantic(x, mask)
    idx = brute_force_neighbours(x, mask, 3)  # [B, T, K]
    B, C, T = x.shape
    neighbours = torch.stack([x[b][:, idx[b]] for b in range(B)])  # [B, C, T, K]
    centre = x[..., None].expand_as(neighbours)
    edges = torch.cat([centre, neighbours - centre], dim=1)  # [B, 2C, T, K]
    h = torch.relu(F.conv2d(edges, block.edge_in.weight[..., None], block.edge_in.bias))
    h = torch.relu(F.conv2d(h, block.edge_mid.weight[..., None], block.edge_mid.bias, groups=2))
    ref = F.conv2d(h, block.edge_out.weight[..., None], block.edge_out.bias).amax(dim=-1)
    valid = mask.expand_as(out)
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=0)


def test_gcnext_neighbours_are_recomputed_from_each_blocks_input():
    first, second = GCNeXtBlock(8, groups=2), GCNeXtBlock(8, groups=2)
    x, mask = torch.randn(1, 8, 30), torch.ones(1, 1, 30, dtype=torch.bool)
    y, _ = first(x, mask)
    assert not torch.equal(semantic_neighbours(x, mask, 3), semantic_neighbours(y, mask, 3))
    ref = second.temporal(y, mask) + second.semantic(y, mask, semantic_neighbours(y, mask, 3))
    torch.testing.assert_close(second(y, mask)[0], torch.relu(y + ref), atol=ATOL, rtol=0)


def test_gcnext_knn_memory_is_linear_in_T():
    block = GCNeXtBlock(8, k=3, groups=2).eval()
    largest = {}
    for T in (1024, 2048):
        x, mask = torch.randn(1, 8, T), torch.ones(1, 1, T, dtype=torch.bool)
        with torch.no_grad(), LargestAllocation() as probe:
            block(x, mask)
        largest[T] = probe.largest
        # a [1, 256, T + k] block of distances (k columns of +inf let topk ask for k at any T)
        assert largest[T] <= 256 * (T + 3), f"T={T}: an allocation of {largest[T]} elements, more than a [1, 256, T + k] block"
    assert 1.9 <= largest[2048] / largest[1024] <= 2.1, largest  # T x T distances would give 4


# --- DFA --------------------------------------------------------------------------------------
def test_ge_retanh():
    x = torch.tensor([-3.0, 0.0, 0.5, 1.5, 3.0, 50.0])
    y = ge_retanh(x, 1.5)
    assert y[:2].tolist() == [0.0, 0.0]
    assert bool((y[2:].diff() > 0).all()) and float(y[-1]) == pytest.approx(1.0)
    assert float(y[3]) == pytest.approx(math.tanh(1.5) / (1 + math.tanh(1.5)))


def test_shift_taps_layout():
    x = torch.arange(10.0).view(1, 2, 5)
    taps = shift_taps(x, 3).view(1, 2, 3, 5)  # channel c * K + s at step t = x[c, t + s - 1]
    assert taps[0, 1, 0].tolist() == [0.0, 5.0, 6.0, 7.0, 8.0]
    assert taps[0, 1, 1].tolist() == x[0, 1].tolist()
    assert taps[0, 0, 2].tolist() == [1.0, 2.0, 3.0, 4.0, 0.0]


@pytest.mark.parametrize("generator", ["depthwise", "conv"])
def test_dynamic_aggregation_is_a_conv_with_a_per_step_kernel(generator):
    """``DFA(f)_t = sum_s W_s (M_t ⊙ f_{t + s - 1})``, written as a loop over steps and taps."""
    dfa = DynamicAggregation(4, 3, 3, generator, with_ln=False)
    x, mask = torch.randn(1, 4, 9), torch.ones(1, 1, 9, dtype=torch.bool)
    m = dfa.weighted_mask(x, mask)  # [1, 4, 9]
    W = dfa.pointwise.weight[:, :, 0].view(3, 4, 3)  # [out, in, taps]
    padded = F.pad(x, (1, 1))
    ref = torch.stack([sum(W[:, :, s] @ (m[0, :, t] * padded[0, :, t + s]) for s in range(3)) for t in range(9)], dim=-1)
    torch.testing.assert_close(dfa(x, mask)[0], ref + dfa.pointwise.bias[:, None], atol=ATOL, rtol=0)


def test_dyne_mask_after_the_depthwise_kernel_equals_the_dfa():
    block = DynamicAggregationBlock(4, 3, k=1.5, groups=2)
    z, mask = torch.randn(1, 4, 11), torch.ones(1, 1, 11, dtype=torch.bool)
    m = block.weighted_mask(z, mask)
    taps = shift_taps(z, 3).view(1, 4, 3, 11)  # [B, C, K, T]
    with torch.no_grad():
        block.kernel.conv.bias.normal_()
    ref = (block.kernel.conv.weight[None, :, 0, :, None] * (m[:, :, None] * taps)).sum(dim=2) + m * block.kernel.conv.bias[:, None]
    torch.testing.assert_close(block.kernel(z, mask)[0] * m, ref, atol=ATOL, rtol=0)


def test_generated_masks_depend_on_the_input():
    x1, x2, mask = torch.randn(1, 8, 20), torch.randn(1, 8, 20), torch.ones(1, 1, 20, dtype=torch.bool)
    block = DynamicAggregationBlock(8, 3, groups=2)
    m1, m2 = block.weighted_mask(block.norm(x1), mask), block.weighted_mask(block.norm(x2), mask)
    assert not torch.allclose(m1, m2) and not torch.allclose(m1[..., :10], m1[..., 10:])  # per video and per step
    for generator in ("depthwise", "conv"):
        dfa = DynamicAggregation(8, 8, 3, generator)
        m1, m2 = dfa.weighted_mask(x1, mask), dfa.weighted_mask(x2, mask)
        assert bool((m1 != m2).any()) and bool((m1 > 0).any()) and bool((m1 == 0).any())  # gated on and off


# --- the dynamic tower --------------------------------------------------------------------------
def pyramid(x: torch.Tensor, mask: torch.Tensor, levels: int):
    feats, masks = [x.masked_fill(~mask, 0.0)], [mask]
    for _ in range(levels - 1):
        y, m = masked_max_pool(feats[-1], masks[-1])
        feats.append(y)
        masks.append(m)
    return feats, masks


def test_adjacent_levels_are_resized_as_nearest_interpolation():
    x = torch.randn(2, 3, 12)
    for length in (6, 24):  # from the finer level, from the coarser one (DyFADet: F.interpolate(mode="nearest"))
        torch.testing.assert_close(resize_level(x, length), F.interpolate(x, size=length, mode="nearest"), atol=0, rtol=0)
    with pytest.raises(AssertionError, match="factor 2"):
        resize_level(x, 5)


def test_dynamic_tower_contract():
    tower = DynamicConvTower(8, 6, 5, 3, 3)
    assert isinstance(tower.out, MaskedConv1d) and tower.out.conv.bias is not None  # the classification prior goes there
    assert DynamicConvTower(8, 6, 2, 3, 3, out_bias=False).out.conv.bias is None
    x, mask = pad_batch([torch.randn(8, 12)], 16)
    assert DynamicConvTower(8, 6, 5, 1, 3)(x, mask).shape == (1, 5, 16)  # output conv only


def test_cross_scale_tower_ignores_padding_and_reads_adjacent_levels():
    tower = DynamicConvTower(8, 8, 4, 3, 3, cross_scale=True).eval()
    with torch.no_grad():
        tower.neighbour_weight.fill_(0.7)  # starts at 0, where the adjacent levels would not matter
        videos = [torch.randn(8, 24), torch.randn(8, 13)]
        feats, masks = pyramid(*pad_batch(videos, 40), 3)
        outs = tower.forward_levels(feats, masks)
        for level, (out, m) in enumerate(zip(outs, masks)):
            assert out.shape == (2, 4, 40 // 2**level)
            assert_zero_at_invalid(out, m)
        for i, video in enumerate(videos):
            T = 4 * math.ceil(video.shape[1] / 4)  # the shortest pyramid-compatible padding
            ref = tower.forward_levels(*pyramid(*pad_batch([video], T), 3))
            for level, (out, r) in enumerate(zip(outs, ref)):
                assert_prefix_equal(out[i], r[0], math.ceil(video.shape[1] / 2**level))
        # one layer: level 1 reads levels 0 and 2, level 0 does not read level 2
        one_layer = DynamicConvTower(8, 8, 4, 2, 3, cross_scale=True).eval()
        one_layer.neighbour_weight.fill_(0.7)
        changed = [f.clone() for f in feats]
        changed[2] = changed[2] + masks[2]
        before, after = one_layer.forward_levels(feats, masks), one_layer.forward_levels(changed, masks)
        assert not torch.allclose(before[1], after[1])
        assert torch.equal(before[0], after[0])


# --- parameter counts at C = 512 against the official modules -------------------------------------
def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_gcnext_parameter_count_matches_gtad():
    # G-TAD, gtad_lib/models.py GCNeXt(512, 512, k=3, groups=32, width_group=4): width W = 128,
    # tconvs Conv1d(C, W, 1), Conv1d(W, W, 3, groups=G), Conv1d(W, C, 1); sconvs Conv2d(2C, W, 1),
    # Conv2d(W, W, 1, groups=G), Conv2d(W, C, 1); all with bias.
    C, W, G = 512, 128, 32
    tconvs = (C * W + W) + (W * (W // G) * 3 + W) + (W * C + C)
    sconvs = (2 * C * W + W) + (W * (W // G) + W) + (W * C + C)
    assert count(GCNeXtBlock(C)) == tconvs + sconvs == 331_264


def test_dynamic_encoder_block_parameter_count_matches_dyfadet():
    # DyFADet, libs/modeling/blocks.py DynELayer(512, kernel_size=1, k=5, n_hidden=768) (THUMOS14):
    # LayerNorm 2C, GroupNorm(16) 2C, depthwise psi / convw (kernel w) and convkw (kernel 11) with
    # bias, depthwise 1x1 fc / global_fc with bias, MLP C -> 768 -> C; minus AffineDropPath's 2 x C
    # LayerScale weights, which we leave out (as for SGP).
    C, w, kw, H = 512, 1, 11, 768
    official = 2 * C + 2 * C + 2 * (C * w + C) + (C * kw + C) + 2 * (C + C) + (C * H + H + H * C + C) + 2 * C
    block = DynamicAggregationBlock(C, w, k=5, mlp_ratio=1.5)
    assert block.mask_kw.conv.kernel_size == (kw,)
    assert count(block) == official - 2 * C == 800_000


def test_dynamic_tower_parameter_count_matches_dyhead():
    # DyFADet, libs/modeling/heads.py TDynPtTransformerClsHead(512, 512, K, num_layers=3, kernel_size=3):
    # per layer a DynamicScale_chk holding
    #   depth_module DTFAM(conv_type='others'): conv Conv1d(3C, C, 1), LayerNorm(C), and kernel_conv
    #     DynamicConv1D_chk = Conv1d(3C, C, 3) + LayerNorm(C) + TemporalGate Conv1d(3C, 1, 3);
    #   2 x DTFAM(conv_type='gate', dyn_type='c'): Conv1d(3C, C, 1), LayerNorm(C), gate Conv1d(C, C, 3, groups=C);
    #   scale_weight, output_weight (scalars) and a LayerNorm(C) that forward never uses;
    #   each DTFAM also holds its fixed shift kernel Conv1d(C, 3C, 3, groups=C) as a frozen parameter (3C x 3).
    # then cls_head MaskedConv1D(C, K, 3).
    C, K, num_classes = 512, 3, 20
    depth = (K * C * C + C) + 2 * C + (K * C * C * K + C) + 2 * C + (K * C * K + 1)
    adjacent = (K * C * C + C) + 2 * C + (C * K + C)
    frozen_shift, unused_norm = 3 * (C * K * 1 * K), 2 * C
    official_layer = depth + 2 * adjacent + 2 + unused_norm + frozen_shift
    out = C * num_classes * K + num_classes
    plain, fused = DynamicConvTower(C, C, num_classes, 3, K), DynamicConvTower(C, C, num_classes, 3, K, cross_scale=True)
    assert count(plain) == 2 * depth + out and depth == 3_153_409
    assert count(fused) == 2 * (official_layer - unused_norm - frozen_shift) + out
    assert official_layer - unused_norm - frozen_shift == 4_733_443
