"""Masked temporal blocks and pyramid encoders: shapes, padding invariance, attention against a naive reference.

The padding tests run each video once alone (``T`` = its length, every step valid) and once in a
padded batch whose padded steps hold large random garbage; every valid output must agree.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import one_thread, seed_zero  # noqa: F401 (autouse fixtures: seed 0, one thread)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tal_models.detectors import build_encoder
from tal_models.encoders import EncoderConfig, PyramidEncoder
from tal_models.layers import (
    DilatedTCNBlock,
    DropPath,
    LayerNormC,
    LocalMultiHeadAttention,
    MaskedConv1d,
    MaskedGroupNorm,
    MaxPoolBlock,
    SGPBlock,
    TransformerBlock,
    full_attention,
    local_attention,
    masked_max_pool,
    sgp_wide_kernel,
)
from tal_models.necks import FPNConfig, FPNNeck

ATOL = 1e-5


def pad_batch(videos: list[torch.Tensor], T: int, garbage: float = 1e4) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos ``[C, n_i]`` -> ``x [B, C, T]`` (garbage beyond each ``n_i``), ``mask [B, 1, T]``."""
    x = garbage * torch.randn(len(videos), videos[0].shape[0], T)
    mask = torch.zeros(len(videos), 1, T, dtype=torch.bool)
    for i, v in enumerate(videos):
        x[i, :, : v.shape[1]] = v
        mask[i, :, : v.shape[1]] = True
    return x, mask


def alone(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch([video], video.shape[1])


def assert_valid_prefix_equal(padded: torch.Tensor, padded_mask: torch.Tensor, ref: torch.Tensor, ref_mask: torch.Tensor):
    """``padded [C, T]`` vs ``ref [C, T']``: same valid prefix length, equal values there.

    Equal to ``ATOL`` times the features' scale (at least 1): the two runs sum in different orders
    (other lengths, other GEMM blocking), and float32 rounding grows with the magnitude of the
    residual stream (up to ~40 in the SGP encoder), whereas a leak of the 1e4 garbage would not be subtle.
    """
    n, n_ref = int(padded_mask.sum()), int(ref_mask.sum())
    assert n == n_ref, f"valid steps: {n} padded vs {n_ref} alone"
    assert bool(padded_mask[..., :n].all()) and bool(ref_mask[..., :n].all())
    scale = max(1.0, float(ref[:, :n].abs().max())) if n else 1.0
    torch.testing.assert_close(padded[:, :n], ref[:, :n], atol=ATOL * scale, rtol=0)


def assert_zero_at_invalid(x: torch.Tensor, mask: torch.Tensor):
    assert x.shape[0] == mask.shape[0] and x.shape[-1] == mask.shape[-1]
    assert bool((x.masked_select(~mask.expand_as(x)) == 0).all()), "non-zero output at an invalid step"


# --- attention against a naive T x T reference ----------------------------------------------
def naive_attention(q, k, v, key_mask, window):
    """Full ``[B, H, T, T]`` scores with a banded mask ``|t - s| <= W // 2`` (or none for -1)."""
    T = q.shape[2]
    idx = torch.arange(T)
    band = torch.ones(T, T, dtype=torch.bool) if window == -1 else (idx[:, None] - idx[None, :]).abs() <= window // 2
    allowed = band[None, None] & key_mask[:, None, None, :]  # [B, 1, T, T]
    scores = (q @ k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    weights = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1)  # NaN rows: no allowed key
    return weights @ v, weights, allowed.any(dim=-1)  # [B, H, T, d], [B, H, T, T], [B, 1, T]


@pytest.mark.parametrize("window", [1, 3, 7, 31])
def test_local_attention_equals_naive_banded_attention(window):
    B, H, T, d = 2, 3, 13, 4
    q, k, v = (torch.randn(B, H, T, d) for _ in range(3))
    key_mask = torch.rand(B, T) > 0.3  # holes anywhere, not only a padded tail
    key_mask[:, 0] = True
    out, weights = local_attention(q, k, v, key_mask, window)
    ref, ref_weights, has_key = naive_attention(q, k, v, key_mask, window)
    assert out.shape == (B, H, T, d) and weights.shape == (B, H, T, window)
    rows = has_key[:, :, :, None].expand(B, H, T, d)
    torch.testing.assert_close(out[rows], ref[rows], atol=ATOL, rtol=0)
    # weight [b, h, t, j] is for key t + j - W // 2
    half = window // 2
    for j in range(window):
        s = torch.arange(T) + j - half
        inside = (s >= 0) & (s < T)
        gathered = ref_weights[:, :, torch.arange(T)[inside], s[inside]]  # [B, H, n]
        ok = has_key[:, :, inside].expand_as(gathered)
        torch.testing.assert_close(weights[:, :, inside, j][ok], gathered[ok], atol=ATOL, rtol=0)
        assert bool((weights[:, :, ~inside, j][has_key[:, :, ~inside].expand(B, H, -1)] == 0).all())


def test_full_attention_equals_naive():
    q, k, v = (torch.randn(2, 2, 9, 4) for _ in range(3))
    key_mask = torch.rand(2, 9) > 0.3
    key_mask[:, 0] = True
    out, _ = full_attention(q, k, v, key_mask)
    ref, _, _ = naive_attention(q, k, v, key_mask, -1)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_query_without_valid_key_gives_finite_gradients():
    q, k, v = (torch.randn(1, 1, 6, 2, requires_grad=True) for _ in range(3))
    key_mask = torch.zeros(1, 6, dtype=torch.bool)
    key_mask[0, :2] = True  # queries 4, 5 have no valid key within +-1
    out, weights = local_attention(q, k, v, key_mask, 3)
    assert bool(torch.isfinite(weights).all())
    out[0, 0, :2].sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("window", [3, 5, -1])
def test_attention_module_equals_naive(stride, window):
    C, H, T = 8, 2, 16
    attn = LocalMultiHeadAttention(C, H, window, stride).eval()
    x, mask = pad_batch([torch.randn(C, 16), torch.randn(C, 9)], T)
    out, out_mask = attn(x, mask)

    def heads(branch):  # the module's own q/k/v convolutions, then the naive T' x T' attention
        y, m = branch["conv"](x, mask)
        y = branch["proj"](branch["norm"](y))
        return y.view(2, H, C // H, -1).transpose(2, 3), m

    (q, m), (k, _), (v, _) = heads(attn.query), heads(attn.key), heads(attn.value)
    ref, _, _ = naive_attention(q, k, v, m[:, 0], window)
    ref = attn.out_proj(ref.transpose(2, 3).reshape(2, C, -1)).masked_fill(~m, 0.0)
    assert out.shape == (2, C, T // stride)
    assert torch.equal(out_mask, mask[..., ::stride])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_full_window_equals_a_window_wider_than_the_sequence():
    full = LocalMultiHeadAttention(8, 2, -1).eval()
    wide = LocalMultiHeadAttention(8, 2, 41).eval()
    wide.load_state_dict(full.state_dict())
    x, mask = pad_batch([torch.randn(8, 20), torch.randn(8, 11)], 20)
    torch.testing.assert_close(full(x, mask)[0], wide(x, mask)[0], atol=ATOL, rtol=0)


class LargestAllocation(TorchDispatchMode):
    """The most elements any op's output storage holds (views share their base's storage)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_local_attention_memory_is_linear_in_T():
    B, C, H, W = 1, 8, 2, 19
    attn = LocalMultiHeadAttention(C, H, W).eval()
    largest = {}
    for T in (1024, 2048):
        x, mask = torch.randn(B, C, T), torch.ones(B, 1, T, dtype=torch.bool)
        q, k, v = (torch.randn(B, H, T, C // H) for _ in range(3))
        _, weights = local_attention(q, k, v, mask[:, 0], W)
        assert weights.numel() == B * H * T * W  # the attention weights: [B, H, T, W]
        with torch.no_grad(), LargestAllocation() as probe:
            attn(x, mask)
        largest[T] = probe.largest
        assert largest[T] < T * T, f"T={T}: an allocation of {largest[T]} elements, quadratic in T"
    assert 1.9 <= largest[2048] / largest[1024] <= 2.1, largest


# --- single blocks: padding invariance --------------------------------------------------------
BLOCKS = {
    "conv": lambda: MaskedConv1d(8, 6, 3),
    "conv_s2_d2": lambda: MaskedConv1d(8, 6, 5, stride=2, dilation=2),
    "attention": lambda: LocalMultiHeadAttention(8, 2, 5),
    "attention_s2": lambda: LocalMultiHeadAttention(8, 2, 5, stride=2),
    "transformer": lambda: TransformerBlock(8, 2, 5, mlp_ratio=2),
    "transformer_s2": lambda: TransformerBlock(8, 2, 3, stride=2, mlp_ratio=2),
    "transformer_full_s2": lambda: TransformerBlock(8, 2, -1, stride=2, mlp_ratio=2),
    "sgp": lambda: SGPBlock(8, 3, 1.5, groups=4, mlp_ratio=2),
    "sgp_s2": lambda: SGPBlock(8, 1, 5.0, stride=2, groups=2, mlp_ratio=2),
    "maxpool": lambda: MaxPoolBlock(8, stride=1),
    "maxpool_s2": lambda: MaxPoolBlock(8, stride=2, kernel_size=5),
    "tcn": lambda: DilatedTCNBlock(8, 3, dilation=2),
    "tcn_s2": lambda: DilatedTCNBlock(8, 3, dilation=1, stride=2),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_ignores_padding(name):
    block = BLOCKS[name]().eval()
    stride = 2 if name.endswith(("s2", "s2_d2")) else 1
    videos = [torch.randn(8, 24), torch.randn(8, 14)]
    x, mask = pad_batch(videos, 40)
    with torch.no_grad():
        out, out_mask = block(x, mask)
        assert out.shape[-1] == 40 // stride and out_mask.shape == (2, 1, 40 // stride)
        assert_zero_at_invalid(out, out_mask)
        for i, video in enumerate(videos):
            ref, ref_mask = block(*alone(video))
            assert_valid_prefix_equal(out[i], out_mask[i], ref[0], ref_mask[0])
        # an odd length, padded to two different T
        short, long = pad_batch([videos[0][:, :13]], 16), pad_batch([videos[0][:, :13]], 40)
        (a, a_mask), (b, b_mask) = block(*short), block(*long)
        assert int(a_mask.sum()) == math.ceil(13 / stride)
        assert_valid_prefix_equal(b[0], b_mask[0], a[0], a_mask[0])


@pytest.mark.parametrize("name", ["transformer_s2", "sgp_s2", "tcn_s2", "conv_s2_d2"])
def test_block_gradients_reach_valid_inputs_only(name):
    block = BLOCKS[name]().train()
    x, mask = pad_batch([torch.randn(8, 24), torch.randn(8, 14)], 40)
    x.requires_grad_(True)
    out, _ = block(x, mask)
    (out * torch.randn_like(out)).sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    assert bool((x.grad.masked_select(~mask.expand_as(x)) == 0).all())
    assert bool((x.grad.abs().sum(dim=1) > 0)[mask[:, 0]].any())


def test_maxpool_never_picks_padding():
    x = -5.0 - torch.rand(1, 4, 8)  # every valid value below the zeros / garbage of the padding
    x[..., 5:] = 1e6
    mask = torch.zeros(1, 1, 8, dtype=torch.bool)
    mask[..., :5] = True
    out, out_mask = MaxPoolBlock(4)(x, mask)
    ref = nn.functional.max_pool1d(x[..., :5], 3, 2, padding=1)  # [1, 4, 3]: the valid steps alone
    assert out_mask[0, 0].tolist() == [True, True, True, False]
    torch.testing.assert_close(out[..., :3], ref)
    assert bool((out[..., 3] == 0).all())
    zeros_padding, _ = masked_max_pool(x.masked_fill(~mask, 0.0), mask)
    torch.testing.assert_close(zeros_padding, out)  # zeros in the padding don't win either


def test_masked_conv_mask_downsampling_and_checks():
    conv = MaskedConv1d(3, 5, 3, stride=2)
    x, mask = pad_batch([torch.randn(3, 7)], 10)
    out, out_mask = conv(x, mask)
    assert out.shape == (1, 5, 5)
    assert out_mask[0, 0].tolist() == [True, True, True, True, False]  # step i valid iff input 2i is
    assert conv.conv.bias.abs().sum() == 0
    with pytest.raises(AssertionError, match="not divisible by the stride 2"):
        conv(torch.randn(1, 3, 9), torch.ones(1, 1, 9, dtype=torch.bool))
    with pytest.raises(AssertionError, match=r"mask must be bool \[B, 1, T\]"):
        conv(torch.randn(1, 3, 10), torch.ones(1, 10, dtype=torch.bool))


def test_layer_norm_c_equals_layer_norm_over_channels():
    norm = LayerNormC(6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    ref = nn.LayerNorm(6)
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(2, 6, 11)
    torch.testing.assert_close(norm(x), ref(x.transpose(1, 2)).transpose(1, 2))


def test_masked_group_norm_equals_group_norm_on_valid_steps():
    norm = MaskedGroupNorm(2, 6)
    ref = nn.GroupNorm(2, 6)
    x, mask = pad_batch([torch.randn(6, 9)], 15)
    out = norm(x, mask)
    torch.testing.assert_close(out[..., :9], ref(x[..., :9]), atol=ATOL, rtol=0)
    assert_zero_at_invalid(out, mask)


def test_sgp_and_tcn_shapes():
    assert sgp_wide_kernel(3, 1.5) == 7 and sgp_wide_kernel(1, 5) == 11 and sgp_wide_kernel(1, 1.5) == 3
    x, mask = torch.randn(2, 16, 32), torch.ones(2, 1, 32, dtype=torch.bool)
    for stride in (1, 2):
        sgp = SGPBlock(16, 3, 1.5, stride=stride)
        assert sgp.conv_kw.conv.kernel_size == (7,)
        tcn = DilatedTCNBlock(16, 3, dilation=4, stride=stride)
        for block in (sgp, tcn):
            out, out_mask = block(x, mask)
            assert out.shape == (2, 16, 32 // stride) and out_mask.shape == (2, 1, 32 // stride)


def test_drop_path():
    x = torch.ones(64, 3, 5)
    dp = DropPath(0.5)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    per_video = y.flatten(1)
    assert bool(((per_video == 0).all(dim=1) | (per_video == 2.0).all(dim=1)).all())  # whole videos, rescaled 1 / (1 - p)
    assert 0 < int((per_video[:, 0] == 0).sum()) < 64
    assert torch.equal(DropPath(0.0).train()(x), x)


# --- encoders and necks -----------------------------------------------------------------------
KINDS = ("transformer", "sgp", "maxpool", "conv", "mamba", "causal", "dfa", "graph")  # mstemba (full resolution): test_dense_detector.py


def small_encoder(kind: str, **overrides) -> PyramidEncoder:
    cfg = dict(kind=kind, input_dim=32, embed_dim=16, heads=2, window=(5, 5, 3, 3, 3, -1), mlp_ratio=2, sgp_groups=4, drop_path=0.0)
    return build_encoder(EncoderConfig(**(cfg | overrides)))


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_output_shapes(kind):
    enc = small_encoder(kind).eval()
    x, mask = torch.randn(2, 32, 256), torch.ones(2, 1, 256, dtype=torch.bool)
    feats, masks = enc(x, mask)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 256 // 2**level) for level in range(6)]
    assert [tuple(m.shape) for m in masks] == [(2, 1, 256 // 2**level) for level in range(6)]
    assert all(m.dtype == torch.bool for m in masks)


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_ignores_padding_at_every_level(kind):
    enc = small_encoder(kind).eval()
    videos = [torch.randn(32, 128), torch.randn(32, 192)]
    with torch.no_grad():
        feats, masks = enc(*pad_batch(videos, 256))
        for level, (f, m) in enumerate(zip(feats, masks)):
            assert_zero_at_invalid(f, m)
            assert [int(n) for n in m.sum(dim=(1, 2))] == [128 >> level, 192 >> level]
        for i, video in enumerate(videos):
            ref_feats, ref_masks = enc(*alone(video))
            for f, m, r, rm in zip(feats, masks, ref_feats, ref_masks):
                assert_valid_prefix_equal(f[i], m[i], r[0], rm[0])
        # 100 steps (odd counts from level 3 on: 100, 50, 25, 13, 7, 4) padded to 128 and to 256
        short, long = enc(*pad_batch([videos[0][:, :100]], 128)), enc(*pad_batch([videos[0][:, :100]], 256))
        for a, am, b, bm in zip(*short, *long):
            assert_valid_prefix_equal(b[0], bm[0], a[0], am[0])
        assert [int(m.sum()) for m in long[1]] == [100, 50, 25, 13, 7, 4]


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_gradients_flow_to_valid_inputs(kind):
    enc = small_encoder(kind).train()
    x, mask = pad_batch([torch.randn(32, 128), torch.randn(32, 96)], 128)
    x.requires_grad_(True)
    feats, _ = enc(x, mask)
    sum((f * torch.randn_like(f)).sum() for f in feats).backward()
    assert bool(torch.isfinite(x.grad).all())
    assert bool((x.grad.abs().sum(dim=1) > 0)[mask[:, 0]].all()), "a valid input step gets no gradient"
    assert bool((x.grad.masked_select(~mask.expand_as(x)) == 0).all())
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def test_encoder_stem_and_windows_follow_the_config():
    enc = small_encoder("transformer", window=[7, 5, 5, 3, 3, -1])  # a YAML list
    assert enc.config.window == (7, 5, 5, 3, 3, -1)
    assert [b.attn.window for b in enc.stem] == [7, 7]
    assert [b.attn.window for b in enc.branch] == [5, 5, 3, 3, -1]
    assert len(small_encoder("maxpool").stem) == 0 and len(small_encoder("sgp", stem_layers=3).stem) == 3
    assert [b.conv1.conv.dilation[0] for b in small_encoder("conv", stem_layers=3).stem] == [1, 2, 4]


def test_encoder_rejects_a_length_not_divisible_by_the_total_stride():
    enc = small_encoder("maxpool")
    with pytest.raises(AssertionError, match=r"multiple of 2\*\*\(levels - 1\) = 32"):
        enc(torch.randn(1, 32, 100), torch.ones(1, 1, 100, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["identity", "fpn"])
def test_fpn_neck_shapes_and_padding(kind):
    enc = small_encoder("maxpool", levels=4, window=5).eval()
    neck = FPNNeck(FPNConfig(in_dim=16, out_dim=16 if kind == "identity" else 12, levels=4, kind=kind)).eval()
    videos = [torch.randn(32, 40), torch.randn(32, 64)]
    with torch.no_grad():
        outs, masks = neck(*enc(*pad_batch(videos, 64)))
        assert [tuple(o.shape) for o in outs] == [(2, neck.config.out_dim, 64 >> level) for level in range(4)]
        for i, video in enumerate(videos):
            refs, ref_masks = neck(*enc(*alone(video)))
            for o, m, r, rm in zip(outs, masks, refs, ref_masks):
                assert_zero_at_invalid(o, m)
                assert_valid_prefix_equal(o[i], m[i], r[0], rm[0])


# --- configuration errors ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: EncoderConfig(levels=0), "levels must be a positive int"),
        (lambda: EncoderConfig(embed_dim=30, heads=4), r"embed_dim \(30\) must be divisible by heads \(4\)"),
        (lambda: EncoderConfig(kernel_size=4), "kernel_size must be an odd positive int"),
        (lambda: EncoderConfig(embed_kernel=2), "embed_kernel must be an odd positive int"),
        (lambda: EncoderConfig(window=18), "window .* must be an odd positive int"),
        (lambda: EncoderConfig(window=(19, 19)), "2 values for 6 levels: give one per level"),
        (lambda: EncoderConfig(kind="lstm"), "kind must be one of"),
        (lambda: EncoderConfig(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (lambda: EncoderConfig(mlp_ratio=0), "mlp_ratio must be > 0"),
        (lambda: EncoderConfig(stem_layers=-1), "stem_layers must be an int >= 0"),
        (lambda: EncoderConfig(kind="sgp", embed_dim=24), r"divisible by sgp_groups \(16\)"),
        (lambda: EncoderConfig(kind="sgp", sgp_k=0), "sgp_k must be > 0"),
        (lambda: FPNConfig(in_dim=8, out_dim=16), "use kind='fpn' or equal dims"),
        (lambda: FPNConfig(levels=0), "levels must be a positive int"),
        (lambda: FPNConfig(kind="bifpn"), "kind must be one of"),
        (lambda: MaskedConv1d(4, 4, 2), "kernel_size must be an odd positive int"),
        (lambda: LocalMultiHeadAttention(10, 4, 5), r"channels \(10\) must be divisible by heads \(4\)"),
        (lambda: LocalMultiHeadAttention(8, 2, 4), "window .* odd"),
        (lambda: TransformerBlock(8, 2, 5, stride=3), "stride must be one of"),
        (lambda: SGPBlock(8, 2), "kernel_size must be an odd"),
        (lambda: MaxPoolBlock(8, kernel_size=2), "kernel_size must be an odd"),
        (lambda: DropPath(1.0), r"drop_path must be in \[0, 1\)"),
    ],
)
def test_bad_configuration_is_refused_with_a_fix(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_heads_only_constrain_transformer_encoders():
    EncoderConfig(kind="maxpool", embed_dim=30, heads=4)
    EncoderConfig(kind="conv", embed_dim=30, heads=4)


# --- the memory-lean autograd functions: gradients against autograd's own ------------------
def test_channel_layer_norm_and_fused_norm_functions_have_exact_gradients():
    from tal_models.layers import MLP, LayerNormC, norm_mlp, norm_pointwise

    torch.manual_seed(0)
    C, T = 6, 9
    norm = LayerNormC(C).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    proj = torch.nn.Conv1d(C, 5, 1).double()
    mlp = MLP(C, 2.0).double()
    x = torch.randn(2, C, T, dtype=torch.double, requires_grad=True)

    def plain_norm(x):  # the reference: F.layer_norm with C last
        return torch.nn.functional.layer_norm(x.transpose(1, 2), (C,), norm.weight, norm.bias, norm.eps).transpose(1, 2)

    cases = [
        (lambda x: norm(x), plain_norm),
        (lambda x: norm_pointwise(norm, proj, x), lambda x: proj(plain_norm(x))),
        (lambda x: norm_mlp(norm, mlp, x), lambda x: mlp.fc2(torch.nn.functional.gelu(mlp.fc1(plain_norm(x))))),
    ]
    params = [x, norm.weight, norm.bias, *proj.parameters(), *mlp.parameters()]
    for fused, plain in cases:
        grad_out = torch.randn_like(plain(x))
        ours = torch.autograd.grad(fused(x), params, grad_out, allow_unused=True)
        ref = torch.autograd.grad(plain(x), params, grad_out, allow_unused=True)
        torch.testing.assert_close(fused(x), plain(x))
        for a, b in zip(ours, ref):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda x: norm_mlp(norm, mlp, x), (x,))
