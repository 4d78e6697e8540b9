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
        if torch.jit.is_scripting():
            return x + self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x):  # unannotated: TorchScript reads Tensor -> Tensor (and never calls it)
        x_nchw = x.permute(0, 3, 1, 2)
        y = self.proj(x_nchw)
        # A conv does not save its output for backward, so adding in place is exact and one tensor less. It is done
        # on the conv's own output, not on the NHWC view of it: an in-place op on a view makes autograd's backward
        # copy the whole gradient twice (CopySlices). Traced graphs (unobserved() is False) keep the plain
        # out-of-place form, so compilers see the same graph as always (inductor would otherwise fuse the add into
        # the convolution, in its precision).
        if unobserved(self.proj) and y.dtype == x.dtype:
            return y.add_(x_nchw).permute(0, 2, 3, 1)
        return x + y.permute(0, 2, 3, 1)
