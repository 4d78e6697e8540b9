"""Rotary position tables of the qhfan family (RMT, RALA/RAVLT): interleaved channel pairs, float32 tables.

Both rotate each adjacent channel pair ``(t_2i, t_2i+1)`` of a head by an angle (``t·cos + ρ(t)·sin`` with
``ρ(t)_(2i, 2i+1) = (−t_2i+1, t_2i)``, "rotate every two", not rotate-half). They differ in the positions:

* RALA: 2-D. The first half of each head encodes the row index, the second half the column index;
  ``ω_m = 1 / 10000^(m/(d/4−1))``, m < d/4, each frequency used by one channel pair.
* RMT: 1-D raster index ``p = r·W + c`` on every channel pair; ``θ_i = 1 / 10000^(i/(d/2−1))``, i < d/2.

Tables are rebuilt for every ``(H, W)`` (they have no parameters), exactly as the official code does per stage call.
"""
from __future__ import annotations

import torch
from timm.layers import register_notrace_function

__all__ = ['rotate_every_two', 'apply_rotary', 'rala_rope_tables', 'rmt_rope_tables']


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """``ρ(t)``: each channel pair ``(a, b)`` becomes ``(−b, a)``."""
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """``x·cos + ρ(x)·sin`` with tables broadcastable to ``x``."""
    return x * cos + rotate_every_two(x) * sin


def _frequencies(count: int, device: torch.device) -> torch.Tensor:
    # the official expression, in float32: linspace includes both ends, so the slowest frequency is exactly 1e-4
    angle = 1.0 / (10000 ** torch.linspace(0, 1, count, device=device))
    return angle.unsqueeze(-1).repeat(1, 2).flatten()  # each frequency serves one channel pair


@register_notrace_function  # reason: table sizes are Python ints derived from the input shape
def rala_rope_tables(H: int, W: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RALA's 2-D tables ``(sin, cos)``, each ``(H·W, head_dim)`` in row-major token order, float32."""
    angle = _frequencies(head_dim // 4, device)  # head_dim / 2
    index_h = torch.arange(H, device=device).to(angle)
    index_w = torch.arange(W, device=device).to(angle)
    ang_h = (index_h[:, None] * angle[None, :]).unsqueeze(1).expand(H, W, head_dim // 2)
    ang_w = (index_w[:, None] * angle[None, :]).unsqueeze(0).expand(H, W, head_dim // 2)
    sin = torch.cat([torch.sin(ang_h), torch.sin(ang_w)], dim=-1).reshape(H * W, head_dim)
    cos = torch.cat([torch.cos(ang_h), torch.cos(ang_w)], dim=-1).reshape(H * W, head_dim)
    return sin, cos


@register_notrace_function  # reason: table sizes are Python ints derived from the input shape
def rmt_rope_tables(H: int, W: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RMT's tables ``(sin, cos)``, each ``(H, W, head_dim)``, of the raster index ``r·W + c``, float32."""
    angle = _frequencies(head_dim // 2, device)  # head_dim
    index = torch.arange(H * W, device=device).to(angle)
    ang = index[:, None] * angle[None, :]
    return torch.sin(ang).reshape(H, W, head_dim), torch.cos(ang).reshape(H, W, head_dim)
