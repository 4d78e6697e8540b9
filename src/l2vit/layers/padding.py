"""Bottom/right zero padding to a multiple of a size, as every padding step of the official model does.

These helpers have shape-dependent control flow, so they are registered as FX leaf functions
(``register_notrace_function``; reason: padding amounts are Python ints derived from the input shape).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = ['pad_nchw_to_multiple', 'pad_nhwc_to_multiple']


@register_notrace_function  # reason: pad sizes depend on the input shape
def pad_nchw_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a ``(B, C, H, W)`` tensor at the bottom and right so that H and W are multiples of ``multiple``."""
    pad_h = (multiple - x.shape[-2] % multiple) % multiple
    pad_w = (multiple - x.shape[-1] % multiple) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


@register_notrace_function  # reason: pad sizes depend on the input shape
def pad_nhwc_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` tensor at the bottom and right so that H and W are multiples of ``multiple``."""
    pad_h = (multiple - x.shape[1] % multiple) % multiple
    pad_w = (multiple - x.shape[2] % multiple) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x
