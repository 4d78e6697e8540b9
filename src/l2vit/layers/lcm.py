"""Local Concentration Module (LCM), L²ViT's fix for the dispersed attention of linear attention (spec §2.8)."""
from __future__ import annotations

import torch
from torch import nn

from ._fastpath import activation, can_overwrite, frozen_bn_affine, unobserved
from .dwconv import depthwise_conv2d

__all__ = ['LocalConcentration']


class LocalConcentration(nn.Module):
    """DWConv k×k → GELU → BatchNorm2d → DWConv k×k on ``(B, H, W, C)`` tokens (no residual; the block adds it).

    The order is the official one: activation *before* the BatchNorm, nothing after the second convolution.
    Parameter names (``conv1``, ``bn``, ``conv2``) follow the official ``local_mp`` module.

    Args:
        dim: Channels.
        kernel_size: Depth-wise kernel size (7 in every released model).
        act_layer: Activation (exact-erf GELU in the official code).
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int = 7,
            act_layer: type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim, bias=True, **dd)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim, **dd)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim, bias=True, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # B, C, H, W as a channels_last view: no copy either way
        if torch.jit.is_scripting():
            x = self.conv2(self.bn(self.act(self.conv1(x))))
        else:
            x = depthwise_conv2d(self.conv2, self._act_bn(depthwise_conv2d(self.conv1, x)))
        return x.permute(0, 2, 3, 1)

    @torch.jit.unused
    def _act_bn(self, x):  # unannotated: TorchScript reads Tensor -> Tensor (and never calls it)
        x = activation(self.act, x, self.conv1)
        if not (can_overwrite(x, self.act) and unobserved(self.bn)):  # False while FX traces: no buffer is read
            return self.bn(x)
        bn = frozen_bn_affine(self.bn)
        if bn is None:
            return self.bn(x)
        # inference: the frozen BatchNorm as one in-place multiply-add (it cannot fold into conv2: the zero padding
        # of conv2 applies after the norm)
        scale, shift = (t.to(x.dtype).view(-1, 1, 1) for t in bn)
        return torch.addcmul(shift, x, scale, out=x)
