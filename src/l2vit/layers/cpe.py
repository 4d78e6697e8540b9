"""Conditional position encoding (CPE): a residual depth-wise convolution on the token grid (spec §2.4)."""
from __future__ import annotations

import torch
from torch import nn

from ._fastpath import unobserved

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
        # NHWC -> NCHW is a view with channels_last strides, which the depth-wise conv consumes directly; its output
        # is channels_last too, so the permute back is contiguous NHWC
        x = x.permute(0, 3, 1, 2)
        y = self.proj(x)
        y = x + y if torch.jit.is_scripting() else self._residual(x, y)
        return y.permute(0, 2, 3, 1)

    @torch.jit.unused
    def _residual(self, x, y):  # unannotated: TorchScript reads Tensor -> Tensor (and never calls it)
        # A conv does not save its output for backward, so adding in place is exact and one tensor less. It is done
        # on the conv's own output, not on the NHWC view of it: an in-place op on a view makes autograd's backward
        # copy the whole gradient twice (CopySlices).
        if unobserved(self.proj) and y.dtype == x.dtype and y.shape == x.shape:
            return y.add_(x)
        return x + y
