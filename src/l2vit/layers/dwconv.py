"""Depth-wise convolution whose CPU training backward computes the weight gradient with l2vit's own kernel.

For large depth-wise kernels oneDNN's weight gradient runs far below the CPU's arithmetic rate: for the LCM's 7×7
convolutions it is most of a convolution's backward and ~6 % of a training step (docs/performance.md). The forward,
the input gradient and the bias gradient stay PyTorch's; only the weight gradient comes from
``l2vit.csrc`` (``depthwise_weight_grad``), which is more accurate than oneDNN's too (shorter running sums).

:func:`depthwise_conv2d` takes that route only when it can change nothing but speed: eager training on the CPU in
float32, channels-last input, stride 1, "same" zero padding, an odd square kernel of :data:`FAST_KERNEL_SIZES`, no
hooks on the convolution, no autocast, and the kernels built. Everything else — inference, GPUs, bf16, tracing,
``torch.compile`` / ``torch.export`` / ONNX — runs ``conv(x)`` unchanged, which is also the naive twin the parity
tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..csrc import cpu_kernels
from ._fastpath import unobserved

__all__ = ['depthwise_conv2d', 'depthwise_weight_grad', 'is_same_depthwise', 'FAST_KERNEL_SIZES']

# oneDNN's own weight gradient is as fast or faster for 3×3 (measured, docs/performance.md)
FAST_KERNEL_SIZES = (5, 7)


def depthwise_weight_grad(x: torch.Tensor, grad_y: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Weight gradient ``(C, 1, k, k)`` of a depth-wise, stride-1, zero-padded "same" convolution of ``x`` given the
    gradient ``grad_y`` of its output, both ``(B, C, H, W)`` float32 on the CPU (any layout; channels-last is free).

    Raises ``RuntimeError`` when the CPU kernels are not available (see :func:`l2vit.csrc.cpu_kernels`).
    """
    kernels = cpu_kernels()
    if kernels is None:
        raise RuntimeError('l2vit CPU kernels are not available (disabled by L2VIT_CPU_KERNELS or failed to build)')
    if x.dim() != 4 or x.shape != grad_y.shape:
        raise ValueError(f'expected x and grad_y of one (B, C, H, W) shape, got {tuple(x.shape)} and '
                         f'{tuple(grad_y.shape)}')
    return kernels.depthwise_weight_grad(
        x.permute(0, 2, 3, 1).contiguous(), grad_y.permute(0, 2, 3, 1).contiguous(), int(kernel_size))


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        k = weight.shape[-1]
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:  # oneDNN's input gradient (fast); asking it for the bias gradient too would run its weight gradient
            grad_x = torch.ops.aten.convolution_backward(
                grad_y, x, weight, None, [1, 1], list(ctx.padding), [1, 1], False, [0, 0], weight.shape[0],
                [True, False, False])[0]
        if need_w:
            grad_w = depthwise_weight_grad(x, grad_y, k)
        if need_b:  # False when bias is None
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def is_same_depthwise(conv: nn.Conv2d, channels: int) -> bool:
    """Whether ``conv`` is a depth-wise convolution of ``channels`` channels with an odd square kernel, stride 1 and
    "same" zero padding (``k // 2``, no dilation)."""
    k = conv.kernel_size[0]
    return (conv.kernel_size == (k, k) and k % 2 == 1 and conv.padding == (k // 2, k // 2)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == 'zeros'
            and conv.groups == conv.in_channels == conv.out_channels == channels)


def _fast_route(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    weight = conv.weight
    return (
        unobserved(conv)  # first: False while FX / dynamo / TorchScript trace (x may be a proxy) or hooks watch conv
        and torch.is_grad_enabled() and weight.requires_grad
        and x.device.type == 'cpu' and x.dtype == torch.float32 and weight.dtype == torch.float32
        and x.dim() == 4 and x.permute(0, 2, 3, 1).is_contiguous()
        and conv.kernel_size[0] in FAST_KERNEL_SIZES and is_same_depthwise(conv, x.shape[1])
        and not torch.is_autocast_enabled('cpu')
        and cpu_kernels() is not None
    )


def depthwise_conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a depth-wise ``nn.Conv2d``, through l2vit's weight-gradient kernel where that is exactly the
    same computation (see the module docstring); the parameters stay ``conv``'s, so checkpoints are unchanged."""
    if not _fast_route(conv, x):
        return conv(x)
    return _DepthwiseConv2d.apply(x, conv.weight, conv.bias, conv.padding)
