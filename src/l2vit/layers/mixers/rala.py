"""RALA, the rank-augmented linear attention of RAVLT, as an L²ViT token mixer.

Fan et al., "Breaking the Low-Rank Dilemma of Linear Attention", CVPR 2025 (https://github.com/qhfan/RALA,
commit a86314f, class ``GateLinearAttentionNoSilu``). With ``φ(t) = ELU(t) + 1``, ``s = d^-1/2`` and the 2-D RoPE
``R`` of :mod:`._rotary`, per image and head:

    α   = softmax_j(s · q̄ · φ(k_j)),   q̄ = mean_i φ(q_i)          (KV-buffer rank augmentation)
    k'_j = N · α_j · φ(k_j)
    O_i = R(φ(q_i)) · [(1/N) Σ_j R(k'_j)ᵀ v_j] / (φ(q_i) · mean_j k'_j + 1e-6)      (RoPE in the numerator only)
    out = proj((O + LePE(V)) ⊙ o)                                   (output rank augmentation: gate o, no SiLU)

q, k, v and the gate o come from one 1×1 projection; LePE is a 5×5 depth-wise conv on V. Cost O(N·C·d + N·C·25);
no N×N matrix is formed. RoPE tables are rebuilt for every grid, so any (H, W) works (as officially).
The official code takes NCHW maps and 1×1 *convolutions*; here the same weights act as ``nn.Linear`` on NHWC tokens.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._registry import register_mixer
from ._common import autocast_device, check_divisible, conv1x1_to_linear, query_index, select_official
from ._rotary import apply_rotary, rala_rope_tables

__all__ = [
    'RankAugmentedLinearAttention', 'rala_key_logits', 'rala_reweight_keys', 'rala_linear_attention',
    'rala_attention_weights', 'rala_linear_attention_naive', 'rala_from_official',
]


def rala_key_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits ``s · q̄ · φ(k_j)`` of the key re-weighting, ``(B, heads, N)``, from feature-mapped q and k."""
    return (scale * q.mean(dim=-2, keepdim=True) @ k.transpose(-2, -1)).squeeze(-2)


def rala_reweight_keys(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``k'_j = N · softmax_j(s · q̄ · φ(k_j)) · φ(k_j)``; the factor N cancels in O except against the 1e-6."""
    n = k.shape[-2]
    alpha = rala_key_logits(q, k, scale).softmax(dim=-1).unsqueeze(-1)  # B, heads, N, 1
    return k * alpha * n


def rala_linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sin: torch.Tensor,
        cos: torch.Tensor,
        eps: float = 1e-6,
) -> torch.Tensor:
    """kv-first RALA attention on ``(B, heads, N, d)``: φ(q), re-weighted keys k', values; RoPE tables ``(N, d)``."""
    n = k.shape[-2]
    z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps)  # un-rotated denominator
    kv = (apply_rotary(k, sin, cos).transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)
    return apply_rotary(q, sin, cos) @ kv * z


def rala_attention_weights(
        q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The equivalent N×N weights ``R(φ(q_i))·R(k'_j) / (N·(φ(q_i)·k̄' + eps))`` (rows need not sum to one)."""
    n = k.shape[-2]
    num = apply_rotary(q, sin, cos) @ apply_rotary(k, sin, cos).transpose(-2, -1)
    return num / (n * (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps))


def rala_linear_attention_naive(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sin: torch.Tensor,
        cos: torch.Tensor,
        eps: float = 1e-6,
) -> torch.Tensor:
    """qk-first reference of :func:`rala_linear_attention`: forms the N×N weights explicitly."""
    return rala_attention_weights(q, k, sin, cos, eps) @ v


@register_mixer('rala', local=False)
class RankAugmentedLinearAttention(nn.Module):
    """RALA over all tokens of a ``(B, H, W, C)`` map: re-weighted keys, 2-D RoPE, LePE and an output gate.

    Args:
        dim: Channels.
        num_heads: Heads; the head dim ``dim / num_heads`` must be a multiple of 4 (row and column RoPE halves).
        window_size: Accepted for the shared signature and ignored (the attention is global).
        qkv_bias: Bias on the fused q/k/v/gate projection (the official module always has one).
        attn_drop: Accepted for the shared signature; there are no attention weights to drop.
        proj_drop: Dropout after the output projection.
        lepe_kernel_size: Side of the depth-wise LePE conv on V (5 officially).
    """
    reference = staticmethod(rala_linear_attention_naive)

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            window_size: int | None = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            lepe_kernel_size: int = 5,
            device=None,
            dtype=None,
    ):
        super().__init__()
        check_divisible(dim, num_heads, 'dim', 'num_heads')
        check_divisible(dim // num_heads, 4, 'head dim (dim / num_heads)', 'the RoPE layout')
        if lepe_kernel_size < 1 or lepe_kernel_size % 2 == 0:
            raise ValueError(f'lepe_kernel_size must be a positive odd int, got {lepe_kernel_size}')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.use_reference = False

        # registration order follows the official state_dict
        self.qkvo = nn.Linear(dim, dim * 4, bias=qkv_bias, **dd)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel_size, padding=lepe_kernel_size // 2, groups=dim, **dd)
        self.q_probe = nn.Identity()
        self.k_probe = nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, use_reference={self.use_reference}'

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, H, W, C = t.shape
        return t.reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(
            self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
    ) -> torch.Tensor:
        if not torch.jit.is_scripting():
            device_type = autocast_device(q)
            if device_type:
                # k' grows to N·φ(k) and the normaliser holds a 1e-6: float16 overflows / rounds both away
                with torch.autocast(device_type=device_type, enabled=False):
                    return self._attend_fp(q.float(), k.float(), v.float(), sin, cos)
        return self._attend_fp(q, k, v, sin.to(q.dtype), cos.to(q.dtype))

    def _attend_fp(
            self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
    ) -> torch.Tensor:
        q = self.q_probe(F.elu(q) + 1)
        k = self.k_probe(rala_reweight_keys(q, F.elu(k) + 1, self.scale))
        if self.use_reference:
            return rala_linear_attention_naive(q, k, v, sin, cos)
        return rala_linear_attention(q, k, v, sin, cos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v, o = self.qkvo(x).chunk(4, dim=-1)  # B, H, W, C each
        lepe = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        sin, cos = rala_rope_tables(H, W, self.head_dim, x.device)
        out = self._attend(self._heads(q), self._heads(k), self._heads(v), sin, cos)
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj((out + lepe) * o))

    def _rotary_tables(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables ``(sin, cos)`` ``(H·W, head_dim)`` of ``x``'s grid, in its dtype."""
        sin, cos = rala_rope_tables(x.shape[1], x.shape[2], self.head_dim, x.device)
        return sin.to(x.dtype), cos.to(x.dtype)

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """The RALA rows ``(B, heads, Q, N)`` of the given flat query tokens (None: all N).

        The rows of :func:`rala_attention_weights` with the mixer's own φ(q) and re-weighted keys k' (whose softmax
        re-weighting uses the mean of *all* queries): ``R(φ(q_n))·R(k'_m) / (N·(φ(q_n)·k̄' + 1e-6))``. RoPE makes
        them signed, and they need not sum to one. LePE on V and the output gate are not part of them: the output
        is ``proj((rows @ v + LePE(v)) ⊙ o)``.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        B, H, W, C = x.shape
        N = H * W
        idx = query_index(queries, N, x.device)
        q, k, _, _ = self.qkvo(x).chunk(4, dim=-1)
        sin, cos = self._rotary_tables(x)
        q = F.elu(self._heads(q)) + 1
        k = rala_reweight_keys(q, F.elu(self._heads(k)) + 1, self.scale)
        q = q[:, :, idx]
        num = apply_rotary(q, sin[idx], cos[idx]) @ apply_rotary(k, sin, cos).transpose(-2, -1)  # B, heads, Q, N
        return num / (N * (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6))


def rala_from_official(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> dict[str, torch.Tensor]:
    """Map an official ``GateLinearAttentionNoSilu`` / ``VanillaSelfAttention`` state dict onto RALA / RALA-softmax.

    Names are unchanged (``qkvo``, ``lepe``, ``proj``); the 1×1 convolution weights ``(out, in, 1, 1)`` of ``qkvo``
    and ``proj`` become linear weights ``(out, in)``. The stage's ``RoPE.angle`` buffer is not needed (the tables are
    recomputed from the head dim).

    Args:
        state_dict: Module state dict, or a whole RAVLT state dict together with ``prefix``.
        prefix: E.g. ``'layers.0.blocks.1.attn.'``.
    """
    return conv1x1_to_linear(select_official(state_dict, prefix, 'RALA'), ('qkvo', 'proj'))
