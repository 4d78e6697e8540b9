"""The convolutional stem and the between-stage downsampling of L²ViT (spec §2.2, §2.3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._fastpath import activation, eager_inference, frozen_bn_affine
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
        # channels_last from the start (a copy of a 3-channel image): every conv then runs in NHWC and the final
        # permute to tokens is a free view instead of a copy of the stride-4 map
        x = pad_nchw_to_multiple(x.contiguous(memory_format=torch.channels_last), 4)
        if torch.jit.is_scripting():
            x = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        else:
            x = self._convs(x)
        return self.norm(x.permute(0, 2, 3, 1))  # B, H/4, W/4, C

    @torch.jit.unused
    def _convs(self, x):  # unannotated: TorchScript reads Tensor -> Tensor (and never calls it)
        fold = eager_inference(x, self)  # checked first: it is False while FX traces, before any buffer is read
        bn1 = frozen_bn_affine(self.bn1) if fold else None
        bn2 = frozen_bn_affine(self.bn2) if fold else None
        if bn1 is None or bn2 is None:
            # while training too, the ReLU overwrites BatchNorm's output (see activation): one stride-2 map, the
            # widest tensor of the model, less
            return self.bn2(self.conv2(activation(self.act, self.bn1(self.conv1(x)), self.bn1)))
        # inference: each frozen BatchNorm folded into the convolution before it (exact up to rounding), ReLU in
        # place: two passes over the stride-2 and stride-4 maps less, and no fresh tensor for them
        x = _conv_with_affine(self.conv1, x, *bn1)
        x = activation(self.act, x, self.bn1)
        return _conv_with_affine(self.conv2, x, *bn2)


def _conv_with_affine(conv: nn.Conv2d, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``conv(x) * scale + shift`` (per output channel) as one convolution with folded weight and bias."""
    weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return F.conv2d(x, weight, bias.to(conv.weight.dtype), conv.stride, conv.padding, conv.dilation, conv.groups)


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
