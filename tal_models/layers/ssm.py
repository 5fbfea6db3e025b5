"""Selective state-space layers (Mamba, Gu & Dao, arXiv 2312.00752): the chunked scan, the mixer, the block.

Legend: B batch, C channels, T steps, E inner channels (``expand * C``), N state size, R the rank
of the step-size projection, L steps per scan chunk.

The selective scan, per inner channel ``e`` and state ``n``, with Mamba's simplified
zero-order hold (``A_bar = exp(delta A)``, ``B_bar u = delta B u``)::

    h_t = exp(delta_t A) * h_{t-1} + delta_t * B_t * u_t        # [E, N] per step, h_{-1} = 0
    y_t = C_t . h_t + D * u_t                                   # [E]

Padding: a step with ``delta = 0`` and ``u = 0`` has ``A_bar = 1`` and adds nothing, so the state
passes through it unchanged (and stays exactly 0 before a video that starts late, as the backward
scan's time-flipped padding does). ``MambaCore`` zeroes both at invalid steps, so a padded batch
scans each video exactly as it would alone, and a hole in a mask is a skipped step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tal_models.layers.conv import DropPath
from tal_models.layers.masking import check_inputs, check_stride, masked_max_pool
from tal_models.layers.norm import LayerNormC

try:  # the official CUDA kernel, used for CUDA tensors when installed
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:
    selective_scan_fn = None

# Steps per scan chunk. Within a chunk the recurrence steps one [B, N, E] slice at a time (one
# fused multiply-add each) while everything else (the decays exp(delta A), the inputs delta B u,
# the read-out C . h and every gradient) is computed for the whole chunk at once; only the state
# at each chunk's start is kept for backward, which recomputes the chunk. Measured on CPU (CPU
# time, 1 thread), T = 2304, E = 1024, N = 16, scan forward + backward: L = 4: 0.45 s,
# 8: 0.38 s, 16: 0.35 s, 32: 0.37 s, 64: 0.39 s, 128: 0.47 s, 256: 0.69 s (forward alone
# 0.08 s at 16). The closed form within a chunk (the [L, L] decays exp(S_l - S_s) of the
# cumulative sums S of delta A, as Mamba-2's SSD) needs L times more exponentials than the
# recurrence, because A has a state axis (exp(A_en (S_le - S_se)) differs for every e and n):
# its forward alone took 1.6 s at L = 8 and 3.7 s at L = 16.
SCAN_CHUNK = 16


class _ChunkedScan(torch.autograd.Function):
    """``selective_scan`` without ``D``: forward and backward stepped chunk by chunk (see ``SCAN_CHUNK``).

    Saves the inputs and the state at each chunk's start (``[T / L, B, N, E]``), not the
    ``[T, B, N, E]`` states: backward recomputes each chunk from its start state, then runs the
    adjoint recurrence ``g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}`` backwards through it. The
    state is laid out ``[N, E]``, channels last, so every broadcast over the state axis runs
    along contiguous channels and the read-outs over ``N`` or ``E`` are batched matrix products.
    """

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
        u_t, d_t = u.permute(2, 0, 1).contiguous(), delta.permute(2, 0, 1).contiguous()  # [B, E, T] -> [T, B, E]
        B_t, C_t = B.permute(2, 0, 1).contiguous(), C.permute(2, 0, 1).contiguous()  # [B, N, T] -> [T, B, N]
        A_t = A.t().contiguous()  # [N, E]
        T, batch, E = u_t.shape
        starts = list(range(0, T, chunk))
        states = u.new_zeros(len(starts), batch, A_t.shape[0], E)  # [T / L, B, N, E]
        y = torch.empty_like(u_t)
        h = states[0]
        for i, t0 in enumerate(starts):
            t1 = min(t0 + chunk, T)
            states[i] = h
            a, hs = _decays_and_inputs(d_t[t0:t1], u_t[t0:t1], A_t, B_t[t0:t1])
            _step(a, hs, h)
            h = hs[-1]
            y[t0:t1] = (C_t[t0:t1, :, None, :] @ hs).squeeze(2)  # [L, B, 1, N] @ [L, B, N, E] -> [L, B, E]
        ctx.save_for_backward(u_t, d_t, A_t, B_t, C_t, states)
        ctx.chunk = chunk
        return y.permute(1, 2, 0)  # [T, B, E] -> [B, E, T]

    @staticmethod
    def backward(ctx, gy: Tensor):
        u_t, d_t, A_t, B_t, C_t, states = ctx.saved_tensors
        gy_t = gy.permute(2, 0, 1).contiguous()  # [T, B, E]
        T = u_t.shape[0]
        gu, gd = torch.empty_like(u_t), torch.empty_like(d_t)
        gB, gC = torch.empty_like(B_t), torch.empty_like(C_t)
        gA = torch.zeros_like(A_t)
        carry = torch.zeros_like(states[0])  # exp(delta A) g at the first step of the chunk after this one
        for i in reversed(range(states.shape[0])):
            t0 = i * ctx.chunk
            t1 = min(t0 + ctx.chunk, T)
            d, u, Bc, gyc = d_t[t0:t1], u_t[t0:t1], B_t[t0:t1], gy_t[t0:t1]
            a, hs = _decays_and_inputs(d, u, A_t, Bc)
            _step(a, hs, states[i])
            g = C_t[t0:t1, :, :, None] * gyc[:, :, None, :]  # dL/dh_t from the read-out: [L, B, N, E]
            g[-1] += carry
            for k in range(g.shape[0] - 2, -1, -1):
                torch.addcmul(g[k], a[k + 1], g[k + 1], out=g[k])
            carry = a[0] * g[0]
            gC[t0:t1] = (hs @ gyc[..., None]).squeeze(-1)  # [L, B, N, E] @ [L, B, E, 1] -> [L, B, N]
            du = d * u
            g_du = (Bc[:, :, None, :] @ g).squeeze(2)  # through delta B u: [L, B, 1, N] @ [L, B, N, E] -> [L, B, E]
            gB[t0:t1] = (g @ du[..., None]).squeeze(-1)
            g_dA = g.mul_(a)  # through exp(delta A), times h_{t-1}; g is spent
            g_dA[1:] *= hs[:-1]
            g_dA[0] *= states[i]
            gd[t0:t1] = g_du * u + (g_dA * A_t).sum(2)
            gu[t0:t1] = g_du * d
            gA += (g_dA * d[:, :, None, :]).sum((0, 1))
        # [T, B, E] -> [B, E, T], [N, E] -> [E, N], [T, B, N] -> [B, N, T]
        return gu.permute(1, 2, 0), gd.permute(1, 2, 0), gA.t(), gB.permute(1, 2, 0), gC.permute(1, 2, 0), None


def _decays_and_inputs(d: Tensor, u: Tensor, A_t: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``exp(delta A)`` and ``delta B u`` over a chunk: ``d, u [L, B, E]``, ``A_t [N, E]``, ``B [L, B, N]`` -> ``[L, B, N, E]`` each.

    ``delta >= 0`` and ``A < 0``: every exponent is <= 0, so nothing overflows.
    """
    return torch.exp(d[:, :, None, :] * A_t), B[..., None] * (d * u)[:, :, None, :]


def _step(a: Tensor, hs: Tensor, h: Tensor) -> None:
    """In place: ``hs[l] = a[l] * hs[l - 1] + hs[l]`` from the state ``h`` before the chunk (``hs`` enters as ``delta B u``)."""
    torch.addcmul(hs[0], a[0], h, out=hs[0])
    for k in range(1, hs.shape[0]):
        torch.addcmul(hs[k], a[k], hs[k - 1], out=hs[k])


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, chunk: int = SCAN_CHUNK) -> Tensor:
    """Mamba's selective scan (module docstring), linear in ``T`` in time and memory.

    Args:
        u: inputs ``[B, E, T]``.
        delta: step sizes ``[B, E, T]``, >= 0 (after the softplus; 0 where a step is to be skipped).
        A: ``[E, N]``, real and negative.
        B, C: the input-dependent input and read-out matrices, ``[B, N, T]``.
        D: ``[E]`` skip weights, or None.
        chunk: steps per chunk of the pure-PyTorch path (``SCAN_CHUNK``).

    Returns:
        ``y [B, E, T]`` in ``u``'s dtype promoted to at least float32. On CUDA with ``mamba_ssm``
        installed, the official kernel ``selective_scan_fn`` computes the same thing.
    """
    if selective_scan_fn is not None and u.is_cuda:
        # the kernel wants delta, B and C in u's dtype (autocast leaves the softplus in fp32), A and D in fp32
        dt = u.dtype
        D = None if D is None else D.float()
        return selective_scan_fn(
            u.contiguous(), delta.to(dt).contiguous(), A.float().contiguous(), B.to(dt).contiguous(), C.to(dt).contiguous(), D
        )
    if chunk < 1:
        raise ValueError(f"selective_scan chunk must be >= 1, got {chunk}")
    dtype = torch.promote_types(torch.promote_types(u.dtype, A.dtype), torch.float32)
    y = _ChunkedScan.apply(u.to(dtype), delta.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype), chunk)
    return y if D is None else y + D.to(dtype)[:, None] * u


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """Causal 1-D convolution: output ``t`` reads inputs ``t - k + 1 .. t`` (zeros before the start).

    ``x [B, C_in, T]``, ``weight [C_out, C_in / groups, k]`` -> ``[B, C_out, T]``.
    """
    return F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight, bias, groups=groups)


DIRECTIONS = ("forward", "backward", "bidirectional")


class MambaCore(nn.Module):
    """Mamba's mixer between its input and output projections, one direction in scan order.

    ``forward(xz [B, 2E, T], mask [B, 1, T]) -> [B, E, T]``, zero at invalid steps::

        x, z  = xz                                          # E channels each
        u     = SiLU(causal depthwise conv_k(x))            # conv1d, kernel conv_kernel, with bias
        dt, B, C = x_proj(u)                                # E -> R + 2N, no bias
        delta = softplus(dt_proj(dt))                       # R -> E, bias initialised so delta ~ logU[dt_min, dt_max]
        y     = selective_scan(u, delta, -exp(A_log), B, C, D) * SiLU(z)

    ``A_log = log(1 .. N)`` for every channel (S4D-real), ``D = 1``, ``dt_proj.weight`` uniform in
    ``+-R^-0.5``, the conv bias 0 (ActionMamba and CausalTAD zero every bias but ``dt_proj``'s).
    The parameters are named and shaped as in ``mamba_ssm``'s ``Mamba``. ``u`` and ``delta`` are
    zeroed at invalid steps, so a padded step leaves the state as it is.
    """

    def __init__(self, inner: int, state_dim: int, conv_kernel: int, dt_rank: int, dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        if state_dim < 1 or conv_kernel < 1 or dt_rank < 1:
            raise ValueError(f"MambaCore: state_dim, conv_kernel and dt_rank must be >= 1, got {state_dim}, {conv_kernel}, {dt_rank}")
        self.inner, self.state_dim, self.dt_rank = inner, state_dim, dt_rank
        self.conv1d = nn.Conv1d(inner, inner, conv_kernel, groups=inner, padding=conv_kernel - 1)  # as the official; forward pads causally
        nn.init.zeros_(self.conv1d.bias)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * state_dim, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state_dim + 1, dtype=torch.float32)).repeat(inner, 1))  # [E, N]
        self.D = nn.Parameter(torch.ones(inner))
        # weight decay would pull A towards -1 for every state (the official module marks both so)
        self.A_log._no_weight_decay = self.D._no_weight_decay = True

    def forward(self, xz: Tensor, mask: Tensor) -> Tensor:
        x, z = xz.chunk(2, dim=1)
        u = causal_conv1d(x.masked_fill(~mask, 0.0), self.conv1d.weight, self.conv1d.bias, self.inner)
        u = F.silu(u).masked_fill(~mask, 0.0)
        dt, B, C = (self.x_proj.weight @ u).split([self.dt_rank, self.state_dim, self.state_dim], dim=1)  # [B, R + 2N, T]
        delta = F.softplus(self.dt_proj.weight @ dt + self.dt_proj.bias[:, None]).masked_fill(~mask, 0.0)  # [B, E, T]
        y = selective_scan(u, delta, -torch.exp(self.A_log.float()), B, C, self.D.float())
        return (y.to(z.dtype) * F.silu(z)).masked_fill(~mask, 0.0)


class SelectiveSSM(nn.Module):
    """Mamba's mixer, masked: ``forward(x [B, C, T], mask [B, 1, T]) -> [B, C, T]``, zero at invalid steps.

    ``in_proj`` (``C -> 2E`` per direction, no bias, ``E = expand * C``), ``MambaCore``, and
    ``out_proj`` (``E -> C`` per direction, no bias). ``direction``: ``"forward"`` (the output at
    ``t`` reads steps ``<= t`` only), ``"backward"`` (``>= t``: the same scan on the time-flipped
    sequence), or ``"bidirectional"``: the Video Mamba Suite's decomposed bidirectional Mamba
    (DBM, ActionMamba's mixer): ``in_proj`` gives each direction its own ``x, z`` (``C -> 4E``),
    both directions share the core (one scan over a batch of the forward and the flipped
    sequences), and ``out_proj`` reads both directions' outputs concatenated (``2E -> C``).
    ``dt_rank="auto"`` is ``ceil(C / 16)``. Shapes as ``mamba_ssm``'s ``Mamba`` (and the Suite's
    ``mamba_new.Mamba`` for DBM), whose parameters are those of this module with the core's
    ``core.`` prefix dropped.
    """

    def __init__(
        self,
        channels: int,
        state_dim: int = 16,
        expand: float = 2,
        conv_kernel: int = 4,
        dt_rank: int | str = "auto",
        direction: str = "forward",
    ):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"SelectiveSSM direction must be one of {DIRECTIONS}, got {direction!r}")
        if not expand > 0:
            raise ValueError(f"SelectiveSSM expand must be > 0, got {expand} (Mamba: 2, ActionMamba: 1)")
        E = int(expand * channels)
        ways = 2 if direction == "bidirectional" else 1
        self.direction = direction
        self.in_proj = nn.Linear(channels, 2 * E * ways, bias=False)
        self.core = MambaCore(E, state_dim, conv_kernel, math.ceil(channels / 16) if dt_rank == "auto" else int(dt_rank))
        self.out_proj = nn.Linear(E * ways, channels, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        check_inputs(x, mask, 1, "SelectiveSSM")
        xz = self.in_proj.weight @ x.masked_fill(~mask, 0.0)  # [2E * ways, C] @ [B, C, T] -> [B, 2E * ways, T]
        if self.direction == "forward":
            y = self.core(xz, mask)
        elif self.direction == "backward":
            y = self.core(xz.flip(-1), mask.flip(-1)).flip(-1)
        else:
            forward, backward = xz.chunk(2, dim=1)
            both = self.core(torch.cat([forward, backward.flip(-1)]), torch.cat([mask, mask.flip(-1)]))  # [2B, E, T]
            forward, backward = both.chunk(2)
            y = torch.cat([forward, backward.flip(-1)], dim=1)  # [B, 2E, T]
        return (self.out_proj.weight @ y).masked_fill(~mask, 0.0)  # [B, E * ways, T] -> [B, C, T]


class MambaBlock(nn.Module):
    """Pre-norm residual Mamba block: ``x + DropPath(SelectiveSSM(LN(x)))``.

    ``forward(x [B, C, T], mask [B, 1, T]) -> ([B, C, T / stride], [B, 1, T / stride])``.

    ``direction="causal"``: one forward scan, so the output at ``t`` depends on steps ``<= t``
    only. ``"bidirectional"``: ActionMamba's DBM mixer (see ``SelectiveSSM``). At ``stride=2``
    the input is first max-pooled (kernel 3, masked), and the block runs at the output
    resolution, as ``SGPBlock`` does; ActionMamba (``MaskMambaBlock`` in the Video Mamba Suite's
    TAD code) runs the mixer at the input resolution and max-pools after the residual.

    ActionMamba on THUMOS14 uses DBM with ``expand=1``, ``conv_kernel=4``, ``state_dim=16`` (2 stem
    blocks, 5 stride-2 blocks, C = 512, drop path 0.3), a LayerNorm with eps 1e-6 (as here), and
    LayerScale (``AffineDropPath``, left out here, as elsewhere in ``tal_models.layers``).
    """

    def __init__(
        self,
        channels: int,
        stride: int = 1,
        direction: str = "bidirectional",
        state_dim: int = 16,
        expand: float = 2,
        conv_kernel: int = 4,
        drop_path: float = 0.0,
    ):
        super().__init__()
        check_stride("MambaBlock", stride)
        if direction not in ("bidirectional", "causal"):
            raise ValueError(f"MambaBlock direction must be 'bidirectional' (ActionMamba's DBM) or 'causal', got {direction!r}")
        self.stride = stride
        self.norm = LayerNormC(channels, eps=1e-6)
        ssm_direction = "forward" if direction == "causal" else "bidirectional"
        self.mixer = SelectiveSSM(channels, state_dim, expand, conv_kernel, direction=ssm_direction)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        check_inputs(x, mask, self.stride, "MambaBlock")
        if self.stride > 1:
            x, mask = masked_max_pool(x, mask, 3, self.stride)
        else:
            x = x.masked_fill(~mask, 0.0)
        return x + self.drop_path(self.mixer(self.norm(x), mask)), mask
