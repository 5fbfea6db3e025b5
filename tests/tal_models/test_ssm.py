"""Selective state-space layers and CausalTAD's hybrid block: the scan against a plain recurrence, padding, causality, memory, sizes."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import one_thread, seed_zero  # noqa: F401 (autouse fixtures: seed 0, one thread)
from test_layers import LargestAllocation, alone, assert_valid_prefix_equal, assert_zero_at_invalid, pad_batch

from tal_models.layers import ssm
from tal_models.layers.causal import CausalHybridBlock, CausalMixer, causal_local_attention
from tal_models.layers.ssm import MambaBlock, SelectiveSSM, selective_scan


# --- the scan against the recurrence, one step at a time ------------------------------------
def sequential_scan(u, delta, A, B, C, D):
    """``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = C_t . h_t + D u_t``, step by step."""
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # [B, E, N]
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1)  # [B, E, T]


def scan_inputs(T, batch=2, E=5, N=3, delta_scale=1.0, dtype=torch.float64):
    u = torch.randn(batch, E, T, dtype=dtype)
    delta = delta_scale * F.softplus(torch.randn(batch, E, T, dtype=dtype))
    A = -torch.rand(E, N, dtype=dtype) * 4 - 0.1
    B, C = torch.randn(batch, N, T, dtype=dtype), torch.randn(batch, N, T, dtype=dtype)
    D = torch.randn(E, dtype=dtype)
    return [t.requires_grad_(True) for t in (u, delta, A, B, C, D)]


@pytest.mark.parametrize("T", [1, 16, 37])
@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_selective_scan_equals_the_sequential_recurrence(T, chunk):
    inputs = scan_inputs(T)
    ref = sequential_scan(*inputs)
    out = selective_scan(*inputs, chunk=chunk)
    assert out.shape == ref.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("chunk", [3, 16])
def test_selective_scan_gradients_equal_the_sequential_ones(chunk):
    inputs = scan_inputs(29)
    ref = sequential_scan(*inputs)
    weight = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    grads = torch.autograd.grad((selective_scan(*inputs, chunk=chunk) * weight).sum(), inputs)
    for name, g, r in zip(["u", "delta", "A", "B", "C", "D"], grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-11, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_selective_scan_without_d_and_with_huge_decays_stays_finite():
    # delta A down to -8000 per step: a product-form closed form (exp(-S_s) of the cumulative sums) would overflow
    u, delta, A, B, C, _ = scan_inputs(40, delta_scale=500.0, dtype=torch.float32)
    out = selective_scan(u, delta, A, B, C, None, chunk=16)
    ref = sequential_scan(u, delta, A, B, C, torch.zeros(u.shape[1]))
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (u, delta, A, B, C))


def test_zero_steps_leave_the_state_unchanged():
    # delta = u = 0 on steps 3..9: the output after them is that of the sequence without them
    u, delta, A, B, C, D = (t.detach() for t in scan_inputs(20))
    keep = torch.ones(20, dtype=torch.bool)
    keep[3:10] = False
    out = selective_scan(u * keep, delta * keep, A, B, C, D, chunk=4)
    ref = selective_scan(u[..., keep], delta[..., keep], A, B[..., keep], C[..., keep], D, chunk=5)
    torch.testing.assert_close(out[..., keep], ref, atol=1e-12, rtol=0)


@pytest.mark.skipif(ssm.selective_scan_fn is None or not torch.cuda.is_available(), reason="needs CUDA and mamba_ssm")
def test_cuda_kernel_agrees_with_the_pure_scan():
    inputs = [t.detach().float().cuda().requires_grad_(True) for t in scan_inputs(300, batch=2, E=64, N=16)]
    weight = torch.randn(2, 64, 300, device="cuda")
    kernel = ssm.selective_scan_fn(*[t.contiguous() for t in inputs])
    pure = ssm._ChunkedScan.apply(*inputs[:5], ssm.SCAN_CHUNK) + inputs[5][:, None] * inputs[0]
    torch.testing.assert_close(selective_scan(*inputs), kernel)  # CUDA tensors take the kernel
    torch.testing.assert_close(pure, kernel, atol=1e-4, rtol=1e-4)
    for g, r in zip(torch.autograd.grad((pure * weight).sum(), inputs), torch.autograd.grad((kernel * weight).sum(), inputs)):
        torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-3)


# --- causal attention against a naive T x T reference ---------------------------------------
@pytest.mark.parametrize("window", [1, 3, 7, -1])
def test_causal_local_attention_equals_naive(window):
    B, H, T, d = 2, 2, 13, 4
    q, k, v = (torch.randn(B, H, T, d) for _ in range(3))
    key_mask = torch.rand(B, T) > 0.3
    key_mask[:, 0] = True
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # query t - key s
    allowed = (lag >= 0) & ((lag < window) if window > 0 else True)
    allowed = allowed[None, None] & key_mask[:, None, None, :]  # [B, 1, T, T]
    weights = ((q @ k.transpose(2, 3)) / math.sqrt(d)).masked_fill(~allowed, -math.inf).softmax(-1)
    ref = weights @ v
    has_key = allowed.any(-1)[..., None].expand(B, H, T, d)  # rows without a key are the caller's to mask
    out = causal_local_attention(q, k, v, key_mask, window)
    assert out.shape == (B, H, T, d)
    torch.testing.assert_close(out[has_key], ref[has_key], atol=1e-5, rtol=0)


# --- blocks: padding, gradients, causality ----------------------------------------------------
BLOCKS = {
    "mamba_causal": lambda: MambaBlock(8, 1, "causal", state_dim=4),
    "mamba_causal_s2": lambda: MambaBlock(8, 2, "causal", state_dim=4),
    "mamba_bidirectional": lambda: MambaBlock(8, 1, "bidirectional", state_dim=4, expand=1),
    "mamba_bidirectional_s2": lambda: MambaBlock(8, 2, "bidirectional", state_dim=4),
    "hybrid": lambda: CausalHybridBlock(8, 2, 5, state_dim=4),
    "hybrid_s2": lambda: CausalHybridBlock(8, 2, 3, stride=2, state_dim=4),
    "hybrid_full_mlp_s2": lambda: CausalHybridBlock(8, 2, -1, stride=2, mlp_ratio=2, state_dim=4),
}


def make_block(name):
    """A block with every parameter moved off its initial value (zero biases would hide leaks)."""
    block = BLOCKS[name]()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return block


def nan_padded(videos, T):
    x, mask = pad_batch(videos, T)
    x[0, :, -3:] = math.nan  # padding holding NaN and inf, as well as 1e4 garbage
    x[1, 0, -1] = math.inf
    return x, mask


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_ignores_padding(name):
    block = make_block(name).eval()
    stride = 2 if name.endswith("s2") else 1
    videos = [torch.randn(8, 30), torch.randn(8, 13)]
    x, mask = nan_padded(videos, 40)
    with torch.no_grad():
        out, out_mask = block(x, mask)
        assert out.shape == (2, 8, 40 // stride) and torch.equal(out_mask, mask[..., ::stride])
        assert_zero_at_invalid(out, out_mask)
        for i, video in enumerate(videos):
            n = video.shape[1]
            ref, ref_mask = block(*(alone(video) if n % stride == 0 else pad_batch([video], n + 1)))
            assert_valid_prefix_equal(out[i], out_mask[i], ref[0], ref_mask[0])


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_gradients_reach_valid_inputs_only(name):
    block = make_block(name).train()
    x, mask = nan_padded([torch.randn(8, 30), torch.randn(8, 13)], 40)
    x.requires_grad_(True)
    out, _ = block(x, mask)
    (out * torch.randn_like(out)).sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    assert bool((x.grad.masked_select(~mask.expand_as(x)) == 0).all())
    reached = (x.grad.abs().sum(dim=1) > 0)[mask[:, 0]]
    assert bool(reached.any() if name.endswith("s2") else reached.all())  # a max-pool passes only its winners' gradients
    assert all(bool(torch.isfinite(p.grad).all()) for p in block.parameters() if p.grad is not None)


def changed_steps(module, T=24, t=10, flip=False):
    """Steps whose output moves when the inputs after step ``t`` change (before ``t`` with ``flip``)."""
    x, mask = torch.randn(1, 8, T), torch.ones(1, 1, T, dtype=torch.bool)
    y = x.clone()
    if flip:
        y[..., :t] += torch.randn(1, 8, t)
    else:
        y[..., t + 1 :] += torch.randn(1, 8, T - t - 1)
    with torch.no_grad():
        a, b = module(x, mask), module(y, mask)
    a, b = (r[0] if isinstance(r, tuple) else r for r in (a, b))
    return (a != b).any(dim=1)[0]  # [T]


def test_causal_mamba_sees_the_past_only_and_bidirectional_both_ways():
    moved = changed_steps(MambaBlock(8, 1, "causal", state_dim=4).eval())
    assert not bool(moved[:11].any()) and bool(moved[11:].all())
    moved = changed_steps(SelectiveSSM(8, 4, direction="backward"), flip=True)
    assert not bool(moved[10:].any()) and bool(moved[:10].all())
    moved = changed_steps(MambaBlock(8, 1, "bidirectional", state_dim=4).eval())
    assert bool(moved.all())  # every step reads the future too


@pytest.mark.parametrize("window", [5, -1])
def test_hybrid_block_directions_are_causal_and_anti_causal(window):
    mixer = CausalMixer(8, 2, window, state_dim=4)
    assert bool(changed_steps(mixer).all())  # the sum of both directions reads both sides
    E = mixer.inner
    for half, flip in ((slice(2 * E, 4 * E), False), (slice(0, 2 * E), True)):  # out_proj reads [fwd mamba, fwd attn, bwd ...]
        one_way = CausalMixer(8, 2, window, state_dim=4)
        one_way.load_state_dict(mixer.state_dict())
        with torch.no_grad():
            one_way.out_proj.weight[:, half] = 0
        moved = changed_steps(one_way, flip=flip)
        if flip:  # the anti-causal direction alone: blind to steps before t
            assert not bool(moved[10:].any()) and bool(moved[:10].all())
        else:
            assert not bool(moved[:11].any()) and bool(moved[11:].all())


# --- memory and sizes -------------------------------------------------------------------------
@pytest.mark.parametrize("make", [partial(MambaBlock, 16, direction="bidirectional"), partial(CausalHybridBlock, 16, 2, 7)])
def test_memory_is_linear_in_T_and_no_T_E_N_tensor_is_made(make):
    """What backward keeps, and the largest tensor ever made, double with T; neither grows with N as a [T, E, N] tensor would."""
    E = 32
    saved, largest = {}, {}
    for T, N in ((1024, 64), (2048, 64), (2048, 16)):
        torch.manual_seed(0)
        block = make(state_dim=N).train()
        x, mask = torch.randn(1, 16, T, requires_grad=True), torch.ones(1, 1, T, dtype=torch.bool)
        total = [0]

        def pack(t, total=total):
            total[0] += t.untyped_storage().nbytes()
            return t

        with LargestAllocation() as probe:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out, _ = block(x, mask)
            out.square().sum().backward()
        saved[T, N], largest[T, N] = total[0], probe.largest
    for T in (1024, 2048):
        assert largest[T, 64] < T * E * 64 / 4, f"T={T}: an allocation of {largest[T, 64]} elements, as large as the [T, E, N] states"
    assert 1.9 <= saved[2048, 64] / saved[1024, 64] <= 2.1, saved
    assert 1.9 <= largest[2048, 64] / largest[1024, 64] <= 2.1, largest
    assert saved[2048, 64] / saved[2048, 16] < 1.5, saved  # 4x with [T, E, N] tensors saved; here the chunks' start states only


def official_mamba_params(C: int, N: int = 16, k: int = 4, expand: float = 2, directions: int = 1) -> int:
    """Parameters of ``mamba_ssm.modules.mamba_simple.Mamba(d_model=C, d_state=N, d_conv=k, expand)``
    (``directions=2``: the Video Mamba Suite's DBM, ``mamba_new.Mamba``), from their shapes."""
    E, R = int(expand * C), math.ceil(C / 16)
    in_proj = C * 2 * E * directions  # Linear(C, 2E), no bias (DBM: 4E)
    conv1d = E * k + E  # depthwise Conv1d(E, E, k, groups=E), bias
    x_proj = E * (R + 2 * N)  # Linear(E, R + 2N), no bias
    dt_proj = R * E + E  # Linear(R, E), bias
    A_log, D = E * N, E
    out_proj = E * directions * C  # Linear(E, C), no bias (DBM: 2E -> C)
    return in_proj + conv1d + x_proj + dt_proj + A_log + D + out_proj


def causaltad_mixer_params(C: int, N: int = 16, k: int = 4, expand: float = 2) -> int:
    """``MixtureCausalBlock`` (OpenTAD ``causal_proj.py``): a Mamba core, in_proj C -> 8E, qkv Conv1d(E, 3E, 3, groups=E), out_proj 4E -> C."""
    E = int(expand * C)
    core = official_mamba_params(C, N, k, expand) - C * 2 * E - E * C
    return C * 8 * E + core + (3 * E * 3 + 3 * E) + 4 * E * C


def test_parameter_counts_at_512_channels_equal_the_official_modules():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert official_mamba_params(512) == 1_694_720
    assert count(SelectiveSSM(512)) == 1_694_720
    assert count(MambaBlock(512, direction="causal")) == 1_694_720 + 2 * 512  # + the layer norm
    assert official_mamba_params(512, expand=1, directions=2) == 1_633_792  # ActionMamba's DBM (expand 1)
    assert count(MambaBlock(512, direction="bidirectional", expand=1)) == 1_633_792 + 2 * 512
    assert count(SelectiveSSM(512, direction="bidirectional")) == official_mamba_params(512, directions=2)
    assert causaltad_mixer_params(512) == 6_425_600
    assert count(CausalMixer(512, 4, -1)) == 6_425_600
    assert count(CausalHybridBlock(512, 4, 19)) == 6_425_600 + 2 * 512


def test_initialisation_follows_mamba():
    core = SelectiveSSM(64, state_dim=8).core
    dt = F.softplus(core.dt_proj.bias.detach())
    assert bool(((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all())
    assert float(dt.log().std()) > 0.5  # spread log-uniformly, not constant
    torch.testing.assert_close(-torch.exp(core.A_log), -torch.arange(1.0, 9.0).expand(128, 8))
    assert bool((core.D == 1).all()) and bool((core.conv1d.bias == 0).all())
    assert core.A_log._no_weight_decay and core.D._no_weight_decay  # as the official module marks them
    assert core.dt_rank == 4 and core.x_proj.weight.shape == (4 + 16, 128)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="direction"):
        MambaBlock(8, direction="forward")
    with pytest.raises(ValueError, match="direction"):
        SelectiveSSM(8, direction="both")
    with pytest.raises(ValueError, match="divisible by heads"):
        CausalHybridBlock(8, 3, 5)
    with pytest.raises(ValueError, match="odd"):
        CausalHybridBlock(8, 2, 4)
    with pytest.raises(ValueError, match="stride"):
        MambaBlock(8, stride=3)
