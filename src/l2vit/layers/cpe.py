"""Conditional position encoding (CPE): a residual depth-wise convolution on the token grid (spec §2.4)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ['ConvPosEnc']


class ConvPosEnc(nn.Module):
    """``x + DWConv(x)`` on ``(B, H, W, C)`` tokens, no activation, no norm, no drop-path.

    Args:
        dim: Channels.
        kernel_size: Depth-wise kernel size (the official models use 3).
    """

    def __init__(self, dim: int, kernel_size: int = 3, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.proj = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC -> NCHW is a view with channels_last strides, which the depth-wise conv consumes directly
        return x + self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
