"""Castling-ViT's linear-angular attention (inference form, and the training form with its sparse softmax term).

You et al., "Castling-ViT: Compressing Self-Attention via Switching Towards Linear-Angular Attention at Vision
Transformer Inference", CVPR 2023 (https://github.com/GATECH-EIC/Castling-ViT, commit c7b75c1, class
``LinAngularAttention``; the repository calls it an unofficial miniature of the paper's block). Per head, with
``q̂ = q/‖q‖``, ``k̂ = k/‖k‖``:

    u_i = ½·v_i + (1/π)·q̂_i · Σ_j k̂_jᵀ v_j      [+ Σ_j M_ij A_ij v_j,  A = softmax(q kᵀ / √d),  M = A > 0.02]
    o_i = u_i / ‖u_i‖ + Σ_t w[t] · v_{i+t−⌊K/2⌋}                      (1-D depth-wise conv along the token sequence)

The angular kernel ``1 − θ(q, k)/π`` is approximated by its linear terms; the official code keeps the token's own
``½·v_i`` (not ``½·Σ_j v_j``) and replaces the kernel normaliser by the L2 normalisation of u. The bracketed sparse
softmax term is the training-time auxiliary branch (``sparse_reg=True``, registered as ``'castling_sparse'``);
it forms N×N weights (O(N²·d)). The inference form is O(N·d²) per head and forms no N×N matrix.

The 9-tap depth-wise conv runs along the flattened row-major sequence, so it mixes tokens across row boundaries and
zero-pads only at the two ends of the sequence; this is kept as is (the module never sees H and W officially).
The official L2 normalisations have no epsilon; here the norm is clamped at 1e-12 (``F.normalize``), which changes
nothing except that an exactly-zero vector maps to zero instead of NaN.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._registry import register_mixer
from ._common import autocast_device, check_divisible, query_index, select_official

__all__ = [
    'LinearAngularAttention', 'SparseLinearAngularAttention', 'linear_angular_attention',
    'linear_angular_attention_naive', 'castling_sparse_weights', 'castling_from_official',
]


def linear_angular_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """kv-first ``½·v + (1/π)·q̂ (k̂ᵀ v)`` on unit-norm ``(B, heads, N, d)`` queries/keys (before the output norm)."""
    return 0.5 * v + (1.0 / math.pi) * (q @ (k.transpose(-2, -1) @ v))


def linear_angular_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """qk-first reference of :func:`linear_angular_attention`: forms the cosine matrix ``q̂ k̂ᵀ`` explicitly."""
    return 0.5 * v + (1.0 / math.pi) * ((q @ k.transpose(-2, -1)) @ v)


def castling_sparse_weights(q: torch.Tensor, k: torch.Tensor, scale: float, threshold: float = 0.02) -> torch.Tensor:
    """The training branch's ``M ⊙ A``: softmax weights of the raw q/k above ``threshold``, not renormalised."""
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn * (attn > threshold).to(attn.dtype)


@register_mixer('castling', local=False)
class LinearAngularAttention(nn.Module):
    """Castling-ViT's linear-angular attention over all tokens of a ``(B, H, W, C)`` map (inference form).

    Args:
        dim: Channels.
        num_heads: Heads; ``dim`` must be divisible by it.
        window_size: Accepted for the shared signature and ignored (the attention is global).
        qkv_bias: Bias on the qkv projection (the official default is False; the L²ViT backbone passes True).
        attn_drop: Accepted for the shared signature; the official module builds but never applies it.
        proj_drop: Dropout after the output projection.
        res_kernel_size: Taps of the depth-wise conv along the token sequence (9).
        sparse_reg: Add the training-time masked-softmax term (O(N²)).
        sparse_threshold: Softmax weights at or below it are dropped from the sparse term (0.02).
    """
    reference = staticmethod(linear_angular_attention_naive)
    default_sparse_reg: bool = False

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            window_size: int | None = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            res_kernel_size: int = 9,
            sparse_reg: bool | None = None,
            sparse_threshold: float = 0.02,
            device=None,
            dtype=None,
    ):
        super().__init__()
        check_divisible(dim, num_heads, 'dim', 'num_heads')
        if res_kernel_size < 1 or res_kernel_size % 2 == 0:
            raise ValueError(f'res_kernel_size must be a positive odd int, got {res_kernel_size}')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sparse_reg = self.default_sparse_reg if sparse_reg is None else bool(sparse_reg)
        self.sparse_threshold = float(sparse_threshold)
        self.use_reference = False

        # registration order follows the official state_dict
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dconv = nn.Conv2d(
            num_heads, num_heads, (res_kernel_size, 1), padding=(res_kernel_size // 2, 0), groups=num_heads,
            bias=False, **dd)
        self.q_probe = nn.Identity()
        self.k_probe = nn.Identity()

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, sparse_reg={self.sparse_reg}, '
                f'sparse_threshold={self.sparse_threshold:g}, use_reference={self.use_reference}')

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            device_type = autocast_device(q)
            if device_type:
                # Σ k̂ᵀv is an un-normalised sum over all tokens, and the norms square it: float32 avoids overflow
                with torch.autocast(device_type=device_type, enabled=False):
                    return self._attend_fp(q.float(), k.float(), v.float())
        return self._attend_fp(q, k, v)

    def _attend_fp(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q_hat = self.q_probe(F.normalize(q, dim=-1))
        k_hat = self.k_probe(F.normalize(k, dim=-1))
        if self.use_reference:
            u = linear_angular_attention_naive(q_hat, k_hat, v)
        else:
            u = linear_angular_attention(q_hat, k_hat, v)
        if self.sparse_reg:
            u = u + castling_sparse_weights(q, k, self.scale, self.sparse_threshold) @ v
        return F.normalize(u, dim=-1) + self.dconv(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x.reshape(B, N, C)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B, heads, N, d
        out = self._attend(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out)).reshape(B, H, W, C)

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """The mixing rows ``(B, heads, Q, N)`` of u for the given flat query tokens (None: all N).

        ``w_nm = ½·[n = m] + (1/π)·q̂_n·k̂_m`` (plus ``M_nm A_nm`` with ``sparse_reg``): ``u = w v`` per head, as
        :func:`linear_angular_attention_naive` forms it. Rows are signed (cosines) and do not sum to one. Not part
        of them: the L2 normalisation of each u_n (a positive per-row factor) and the depth-wise conv on V along the
        token sequence (a separate, local branch); the output is ``proj(normalize(w v) + dconv(v))``.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        B, H, W, C = x.shape
        N = H * W
        idx = query_index(queries, N, x.device)
        qkv = self.qkv(x.reshape(B, N, C)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)  # B, heads, N, d
        q = q[:, :, idx]
        cosine = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        weights = cosine / math.pi + 0.5 * F.one_hot(idx, N).to(cosine.dtype)
        if self.sparse_reg:
            weights = weights + castling_sparse_weights(q, k, self.scale, self.sparse_threshold)
        return weights


@register_mixer('castling_sparse', local=False)
class SparseLinearAngularAttention(LinearAngularAttention):
    """Castling-ViT's training form: :class:`LinearAngularAttention` with ``sparse_reg=True`` (same weights).

    The paper drives the sparse term towards zero during training so that it can be dropped at inference; the
    released code has no such regulariser, so this mixer simply adds it.
    """
    default_sparse_reg: bool = True


def castling_from_official(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> dict[str, torch.Tensor]:
    """Map an official ``LinAngularAttention`` state dict onto the Castling mixers (names and shapes unchanged).

    ``sparse_reg`` adds no parameters, so one state dict serves both forms.

    Args:
        state_dict: Module state dict, or a model state dict together with ``prefix``.
        prefix: The module's prefix inside ``state_dict``.
    """
    return select_official(state_dict, prefix, 'Castling-ViT')
