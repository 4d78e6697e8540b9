"""L²ViT's enhanced linear global attention: a ReLU-kernel linear attention over all tokens (spec §2.7).

Per head, with φ = ReLU on queries and keys (not values), learnable temperature τ and clamp value c (100):

    out_n = φ(q_n) · (τ · Σ_m φ(k_m) v_mᵀ) / max(φ(q_n) · Σ_m φ(k_m), c)

The module computes this "kv-first", in O(N·d²) time and O(d²) state per head; no N×N matrix is formed.
``linear_attention_naive`` is the equivalent "qk-first" form, which forms the attention matrix
``A_nm = φ(q_n)·φ(k_m) / max(Σ_m' φ(q_n)·φ(k_m'), c)`` explicitly (the form used to visualise it).
"""
from __future__ import annotations

import torch
from torch import nn

from .._registry import register_mixer

__all__ = ['LinearGlobalAttention', 'linear_attention', 'linear_attention_naive']


def linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        temperature: torch.Tensor,
        clamp_min: float = 100.,
) -> torch.Tensor:
    """kv-first ReLU linear attention on feature-mapped ``(B, heads, N, d)`` queries/keys.

    Args:
        q: ReLU-mapped queries.
        k: ReLU-mapped keys.
        v: Values.
        temperature: Per-head scale broadcastable to ``(B, heads, d, d)``; it multiplies the numerator only.
        clamp_min: Lower bound on the denominator ``φ(q)·Σφ(k)``.
    """
    kv = (k.transpose(-2, -1) @ v) * temperature  # B, heads, d, d
    z = k.sum(dim=-2, keepdim=True)  # B, heads, 1, d
    denom = (q @ z.transpose(-2, -1)).clamp(min=clamp_min)  # B, heads, N, 1
    return (q @ kv) / denom


def linear_attention_naive(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        temperature: torch.Tensor,
        clamp_min: float = 100.,
) -> torch.Tensor:
    """qk-first reference of :func:`linear_attention`: forms ``A`` (N×N per head) explicitly."""
    scores = q @ k.transpose(-2, -1)  # B, heads, N, N
    attn = scores / scores.sum(dim=-1, keepdim=True).clamp(min=clamp_min)
    return temperature * (attn @ v)


@register_mixer('linear', local=False)
class LinearGlobalAttention(nn.Module):
    """Global ReLU-kernel linear attention with a learnable per-head temperature and a clamped denominator.

    Input and output are ``(B, H, W, C)``. The feature-mapped queries and keys pass through ``q_probe`` /
    ``k_probe`` (identities), so analysis code can hook them by name.

    Args:
        dim: Channels.
        num_heads: Heads; ``dim`` must be divisible by it.
        qkv_bias: Bias on the qkv projection (True in every official block).
        attn_drop: Accepted for the shared mixer signature; linear attention forms no attention weights to drop.
        proj_drop: Dropout after the output projection.
        clamp_min: Lower bound on the denominator (100 in the official code).
        window_size: Accepted for the shared mixer signature and ignored (the attention is global).
    """
    reference = staticmethod(linear_attention_naive)

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            clamp_min: float = 100.,
            window_size: int | None = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        if not clamp_min > 0:
            raise ValueError(f'clamp_min must be > 0 (the denominator is clamped from below), got {clamp_min}')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.clamp_min = float(clamp_min)

        # registration order follows the official state_dict: temperature, qkv, proj
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), self.head_dim ** -0.5, **dd))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_probe = nn.Identity()
        self.k_probe = nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, clamp_min={self.clamp_min:g}'

    def reset_parameters(self) -> None:
        """Reset the temperature to its initial value ``head_dim ** -0.5``."""
        nn.init.constant_(self.temperature, self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x.reshape(B, N, C)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B, heads, N, head_dim
        q = self.q_probe(torch.relu(q))
        k = self.k_probe(torch.relu(k))
        out = linear_attention(q, k, v, self.temperature, self.clamp_min)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(out))
