"""Bottom/right zero padding to a multiple of a size, as every padding step of the official model does.

These helpers have shape-dependent control flow, so they are registered as FX leaf functions
(``register_notrace_function``; reason: padding amounts are Python ints derived from the input shape). Under
``torch.compile`` / ``torch.export`` / ``torch.jit.trace`` they always pad (possibly by zero) instead of branching on
the size, so one graph serves every resolution (no guard on ``H % multiple``, no recompile per size, and an exported
graph stays valid for sizes other than the traced one). Ceilings are computed as ``(n + m - 1) // m``: floor division
of negative numbers (``-(-n // m)``) is exported to ONNX as a truncating division, which is wrong for them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = ['pad_nchw_to_multiple', 'pad_nhwc_to_multiple', 'is_compiling']


def is_compiling() -> bool:
    """True while the code is traced into a graph that must serve every input size: dynamo (``torch.compile``,
    ``torch.export``, the ONNX exporter) or ``torch.jit.trace`` (the TorchScript-based ONNX exporter)."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


@register_notrace_function  # reason: pad sizes depend on the input shape
def pad_nchw_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a ``(B, C, H, W)`` tensor at the bottom and right so that H and W are multiples of ``multiple``."""
    pad_h = (x.shape[-2] + multiple - 1) // multiple * multiple - x.shape[-2]
    pad_w = (x.shape[-1] + multiple - 1) // multiple * multiple - x.shape[-1]
    if is_compiling() or pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


@register_notrace_function  # reason: pad sizes depend on the input shape
def pad_nhwc_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` tensor at the bottom and right so that H and W are multiples of ``multiple``."""
    pad_h = (x.shape[1] + multiple - 1) // multiple * multiple - x.shape[1]
    pad_w = (x.shape[2] + multiple - 1) // multiple * multiple - x.shape[2]
    if is_compiling() or pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x
