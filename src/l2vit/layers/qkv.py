"""Splitting a fused qkv projection into per-head queries, keys and values, with a one-pass backward.

The attention mixers project ``(B, N, C)`` tokens to ``(B, N, 3C)`` with one linear layer and read q, k and v as
strided views of it, heads interleaved along channels. Written with ``view → permute → unbind``, autograd's backward
stacks the three gradients into a new ``(3, B, heads, N, d)`` tensor and then copies that into the projection's
``(B, N, 3C)`` layout: two passes over a qkv-sized tensor and two fresh allocations per block, in every training
step. :func:`split_qkv` gives the same views, and in eager training its backward writes the three gradients straight
into one ``(B, N, 3, heads, d)`` tensor instead (one pass, one allocation).

The plain ``view → permute → unbind`` is its naive twin and what runs everywhere else: without a gradient, while
TorchScript, FX, dynamo or ``torch.jit.trace`` trace the model (they see ordinary view ops, which compilers and
exporters handle), and with the fast paths turned off (:func:`l2vit.layers.fast_paths`).
"""
from __future__ import annotations

import torch

from ._fastpath import unobserved

__all__ = ['split_qkv', 'split_qkv_naive', 'qkv_gradient']


def split_qkv_naive(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, N, 3C)`` → ``q, k, v``, each a ``(B, heads, N, C // heads)`` strided view of ``qkv``."""
    B, N = qkv.shape[0], qkv.shape[1]
    q, k, v = qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def qkv_gradient(shape: torch.Size, num_heads: int, grads: tuple, relu_outputs: tuple = (None, None, None)
                 ) -> torch.Tensor:
    """The ``(B, N, 3C)`` gradient of a qkv projection of ``shape`` from the gradients of its q, k and v, each
    ``(B, heads, N, d)`` (None: zero), written into one new tensor in one pass. Where ``relu_outputs[i]`` is given,
    the gradient passes ReLU's backward on the way (zero where that output is zero), in the same pass.

    Not differentiable where a ReLU output is given (it writes through ``threshold_backward``'s out variant).
    """
    B, N, C3 = shape
    like = next(g for g in grads if g is not None)  # autograd calls a backward only when one is defined
    out = like.new_empty((B, N, 3, num_heads, C3 // (3 * num_heads)))
    slots = out.permute(2, 0, 3, 1, 4)  # 3, B, heads, N, d
    for i, (g, relu_out) in enumerate(zip(grads, relu_outputs)):
        slot = slots[i]  # a single view (not unbind's): copy_ into it stays differentiable for double backward
        if g is None:
            slot.zero_()
        elif relu_out is None:
            slot.copy_(g)
        else:  # ReLU's gradient (autograd's own op for it), written into the strided slot
            torch.ops.aten.threshold_backward.grad_input(g, relu_out, 0, grad_input=slot)
    return out.view(B, N, C3)


class _SplitQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, num_heads):
        ctx.shape = qkv.shape
        ctx.num_heads = num_heads
        return split_qkv_naive(qkv, num_heads)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        return qkv_gradient(ctx.shape, ctx.num_heads, (grad_q, grad_k, grad_v)), None


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, N, 3C)`` qkv projection → ``q, k, v``, each a ``(B, heads, N, C // heads)`` strided view of it (rows
    ``[0, C)``, ``[C, 2C)``, ``[2C, 3C)``; head ``h`` is channels ``[h·d, (h+1)·d)`` of each).

    Same values as :func:`split_qkv_naive`; in eager training the gradient reaches ``qkv`` in one pass (see the
    module docstring). The views must not be modified in place when ``qkv`` needs a gradient.
    """
    if torch.jit.is_scripting():
        return split_qkv_naive(qkv, num_heads)
    return _split_qkv_eager(qkv, num_heads)


@torch.jit.unused
def _split_qkv_eager(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # unobserved() first: False while FX / dynamo / torch.jit.trace trace (qkv may be a proxy), and with the fast
    # paths off
    if unobserved() and torch.is_grad_enabled() and qkv.requires_grad and qkv.dim() == 3:
        q, k, v = _SplitQKV.apply(qkv, num_heads)
        return q, k, v
    return split_qkv_naive(qkv, num_heads)
