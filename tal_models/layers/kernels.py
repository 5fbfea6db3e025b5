"""Hand-written autograd kernels: layer norm over the channels of [B, C, T], and LN fused with a 1x1 projection or with an MLP.

Each has ``infer``, the same forward with plain ops and nothing kept for backward: what runs when
grad is off (``tal_models.layers.norm``), and what a TorchScript trace or an ONNX export records
(an ``autograd.Function`` is a Python call that neither can save).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``[B, C, T]`` -> the input normalised over ``C`` at every step, and ``1 / std`` ``[B, 1, T]``.
    (Two plain reductions: ``torch.var_mean`` over the strided channel axis is ~7x slower on CPU.)"""
    centred = x - x.mean(dim=1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(dim=1, keepdim=True) + eps)
    return centred.mul_(rstd), rstd


class ChannelLayerNorm(torch.autograd.Function):
    """Layer norm over dim 1 of ``[B, C, T]``, computed in that layout: no transposed copies
    around ``F.layer_norm`` (which wants ``C`` last), a contiguous output for the next
    convolution, and only the normalised input and ``1 / std`` kept for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        x_hat, rstd = _normalize(x, eps)
        ctx.save_for_backward(x_hat, rstd, weight)
        return torch.addcmul(bias[:, None], x_hat, weight[:, None])

    @staticmethod
    def infer(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        return torch.addcmul(bias[:, None], _normalize(x, eps)[0], weight[:, None])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x_hat, rstd, weight = ctx.saved_tensors
        return *_layer_norm_backward(grad_out, x_hat, rstd, weight), None


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution ``[B, I, T] -> [B, O, T]`` (oneDNN's kernel: faster than a broadcast matmul here)."""
    return F.conv1d(x, weight, bias)


def _pointwise_grads(grad_out: Tensor, x: Tensor, weight: Tensor, needs: tuple[bool, bool, bool]):
    """Gradients of ``_pointwise`` w.r.t. (x, weight, bias), by the convolution's own backward kernel."""
    return torch.ops.aten.convolution_backward(grad_out, x, weight, [weight.shape[0]], [1], [0], [1], False, [0], 1, list(needs))


def _layer_norm_backward(grad_n: Tensor, x_hat: Tensor, rstd: Tensor, weight: Tensor):
    """Gradients of ``x_hat * weight + bias`` w.r.t. (x, weight, bias), ``x_hat`` the normalised ``x``."""
    g = grad_n * weight[:, None]
    # d/dx of (x - mean) / std for each step: rstd * (g - mean(g) - x_hat * mean(g * x_hat))
    grad_x = (g - g.mean(dim=1, keepdim=True) - x_hat * (g * x_hat).mean(dim=1, keepdim=True)).mul_(rstd)
    return grad_x, (grad_n * x_hat).sum(dim=(0, 2)), grad_n.sum(dim=(0, 2))


class NormPointwise(torch.autograd.Function):
    """``conv1x1(LN(x))`` keeping only the normalised input for backward (``LN(x)`` is recomputed
    from it: one multiply-add), instead of both the normalised input and ``LN(x)``."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, weight, bias):
        x_hat, rstd = _normalize(x, eps)
        ctx.save_for_backward(x_hat, rstd, ln_weight, ln_bias, weight)
        ctx.has_bias = bias is not None
        return _pointwise(torch.addcmul(ln_bias[:, None], x_hat, ln_weight[:, None]), weight, bias)

    @staticmethod
    def infer(x, ln_weight, ln_bias, eps, weight, bias):
        return _pointwise(torch.addcmul(ln_bias[:, None], _normalize(x, eps)[0], ln_weight[:, None]), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, rstd, ln_weight, ln_bias, weight = ctx.saved_tensors
        n = torch.addcmul(ln_bias[:, None], x_hat, ln_weight[:, None])
        grad_n, grad_w, grad_b = _pointwise_grads(grad_out, n, weight, (True, ctx.needs_input_grad[4], ctx.has_bias))
        grad_x, grad_lw, grad_lb = _layer_norm_backward(grad_n, x_hat, rstd, ln_weight)
        return grad_x, grad_lw, grad_lb, None, grad_w, grad_b


class NormMLP(torch.autograd.Function):
    """``fc2(gelu(fc1(LN(x))))`` keeping only the normalised input for backward and recomputing
    the rest there. The MLP's activations are its widest (``4C`` for ActionFormer): keeping one
    ``C``-wide tensor instead of ``C + C + 4C + 4C`` cuts the encoder's training memory by a
    quarter, for one more ``fc1`` product in backward."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, w1, b1, w2, b2):
        x_hat, rstd = _normalize(x, eps)
        ctx.save_for_backward(x_hat, rstd, ln_weight, ln_bias, w1, b1, w2)
        n = torch.addcmul(ln_bias[:, None], x_hat, ln_weight[:, None])
        return _pointwise(F.gelu(_pointwise(n, w1, b1)), w2, b2)

    @staticmethod
    def infer(x, ln_weight, ln_bias, eps, w1, b1, w2, b2):
        n = torch.addcmul(ln_bias[:, None], _normalize(x, eps)[0], ln_weight[:, None])
        return _pointwise(F.gelu(_pointwise(n, w1, b1)), w2, b2)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, rstd, ln_weight, ln_bias, w1, b1, w2 = ctx.saved_tensors
        n = torch.addcmul(ln_bias[:, None], x_hat, ln_weight[:, None])
        h = _pointwise(n, w1, b1)
        grad_a, grad_w2, grad_b2 = _pointwise_grads(grad_out, F.gelu(h), w2, (True, True, True))
        grad_h = torch.ops.aten.gelu_backward(grad_a, h)
        del h, grad_a
        grad_n, grad_w1, grad_b1 = _pointwise_grads(grad_h, n, w1, (True, True, True))
        grad_x, grad_lw, grad_lb = _layer_norm_backward(grad_n, x_hat, rstd, ln_weight)
        return grad_x, grad_lw, grad_lb, None, grad_w1, grad_b1, grad_w2, grad_b2
