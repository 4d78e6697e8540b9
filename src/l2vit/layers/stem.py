"""The convolutional stem and the between-stage downsampling of L²ViT (spec §2.2, §2.3)."""
from __future__ import annotations

import torch
from torch import nn

from .padding import pad_nchw_to_multiple

__all__ = ['ConvStem', 'Downsample']


class ConvStem(nn.Module):
    """Stride-4 stem: Conv3×3/2 → BN → ReLU → Conv3×3/2 → BN, then LayerNorm on the tokens.

    The image is zero-padded at the bottom/right to a multiple of 4 first. Input ``(B, C, H, W)``, output
    ``(B, ceil(H/4), ceil(W/4), dim)`` (NHWC).

    Args:
        in_chans: Image channels.
        dim: Output channels (width of stage 1); the hidden width is ``dim // 2``.
        norm_layer: Token norm applied after the convolutions.
    """

    def __init__(
            self,
            in_chans: int,
            dim: int,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        hidden = dim // 2
        self.conv1 = nn.Conv2d(in_chans, hidden, 3, stride=2, padding=1, bias=True, **dd)
        self.bn1 = nn.BatchNorm2d(hidden, **dd)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(hidden, dim, 3, stride=2, padding=1, bias=True, **dd)
        self.bn2 = nn.BatchNorm2d(dim, **dd)
        self.norm = norm_layer(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_nchw_to_multiple(x, 4)
        x = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.norm(x.permute(0, 2, 3, 1))  # B, H/4, W/4, C


class Downsample(nn.Module):
    """Pre-norm patch merging: LayerNorm → zero-pad to even size → Conv2×2/2, on ``(B, H, W, C)`` tokens.

    The LayerNorm runs *before* the padding, so padded positions are exact zeros. Output grid is
    ``ceil(H/2) × ceil(W/2)``; there is no norm after the convolution.

    Args:
        dim: Input channels.
        out_dim: Output channels.
        norm_layer: Token norm applied first.
    """

    def __init__(
            self,
            dim: int,
            out_dim: int,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        # registration order follows the official state_dict (proj, then norm); the norm runs first
        self.proj = nn.Conv2d(dim, out_dim, 2, stride=2, bias=True, **dd)
        self.norm = norm_layer(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).permute(0, 3, 1, 2)  # B, C, H, W
        x = self.proj(pad_nchw_to_multiple(x, 2))
        return x.permute(0, 2, 3, 1)  # B, H/2, W/2, C'
