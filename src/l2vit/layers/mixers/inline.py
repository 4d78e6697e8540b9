"""InLine attention (injective linear attention with a dynamic local residual) as an L²ViT token mixer.

Han et al., "Bridging the Divide: Reconsidering Softmax and Linear Attention", NeurIPS 2024
(https://github.com/LeapLabTHU/InLine, commit e463a6f). Per head, with ``s = d^-1/2``, k̄ and v̄ the token means:

    O_i = (s/N) · φ(q_i) · Σ_j φ(k_j)ᵀ v_j + (1 − s · φ(q_i)·k̄) · v̄

i.e. attention weights ``w_ij = (s·φ(q_i)·φ(k_j) − s·φ(q_i)·k̄ + 1) / N`` that sum to one without a denominator
(they may be negative). φ is the identity in every released model. A 3×3 depth-wise convolution on V whose kernel
is predicted per image from the token mean of the mixer input is added before the output projection.
Cost O(N·C·d + N·C·9); no N×N matrix is formed. There is no size-dependent parameter, so any grid works as is
(the official Swin-file module derives H = W = √N and therefore only takes square grids).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._registry import register_mixer
from ._common import autocast_device, check_divisible, merge_q_kv, query_index, select_official

__all__ = [
    'InLineAttention', 'injective_attention_weights', 'injective_linear_attention', 'injective_linear_attention_naive',
    'inline_from_official',
]

_KERNELS = ('identity', 'relu', 'leakyrelu', 'exp')


def injective_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """kv-first injective linear attention on ``(B, heads, N, d)`` tensors (official operation order)."""
    n = k.shape[-2]
    kv = (k.transpose(-2, -1) * (scale / n) ** 0.5) @ (v * (scale / n) ** 0.5)  # (s/N) Σ kᵀv
    k_mean = k.mean(dim=-2, keepdim=True)
    v_mean = v.mean(dim=-2, keepdim=True)
    return q @ kv + (1 - (q @ k_mean.transpose(-2, -1)) * scale) * v_mean


def injective_attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The N×N weights ``w_ij = (s·q_i·k_j − s·q_i·k̄ + 1) / N``; every row sums to one (entries may be negative)."""
    n = k.shape[-2]
    k_mean = k.mean(dim=-2, keepdim=True)
    return (scale * (q @ k.transpose(-2, -1)) - scale * (q @ k_mean.transpose(-2, -1)) + 1) / n


def injective_linear_attention_naive(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """qk-first reference of :func:`injective_linear_attention`: forms the N×N weights explicitly, then ``w v``."""
    return injective_attention_weights(q, k, scale) @ v


@register_mixer('inline', local=False)
class InLineAttention(nn.Module):
    """InLine attention over all tokens of a ``(B, H, W, C)`` map, with its dynamic 3×3 depth-wise residual.

    Args:
        dim: Channels.
        num_heads: Heads; ``dim`` must be divisible by it (the kernel predictor is grouped by head).
        window_size: Accepted for the shared signature and ignored (the attention is global).
        qkv_bias: Bias on the qkv projection (True in every released model).
        attn_drop: Accepted for the shared signature; there are no attention weights to drop.
        proj_drop: Dropout after the output projection.
        kernel_func: Feature map φ of q and k over all channels: 'identity' (every released model), 'relu',
            'leakyrelu' (slope 0.01) or 'exp' (``exp(0.2·t)``), as the official Swin-file module offers.
    """
    reference = staticmethod(injective_linear_attention_naive)

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            window_size: int | None = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            kernel_func: str = 'identity',
            device=None,
            dtype=None,
    ):
        super().__init__()
        check_divisible(dim, num_heads, 'dim', 'num_heads')
        if kernel_func not in _KERNELS:
            raise ValueError(f'kernel_func must be one of {_KERNELS}, got {kernel_func!r}')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.kernel_func = kernel_func
        self.use_reference = False

        # registration order follows the official state_dict
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_probe = nn.Identity()
        self.k_probe = nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.residual = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size=1, groups=num_heads, **dd),
            nn.GELU(),
            nn.Conv1d(dim, dim * 9, kernel_size=1, groups=num_heads, **dd),
        )

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, kernel_func={self.kernel_func}, use_reference={self.use_reference}'

    def _phi(self, t: torch.Tensor) -> torch.Tensor:
        if self.kernel_func == 'relu':
            return torch.relu(t)
        if self.kernel_func == 'leakyrelu':
            return F.leaky_relu(t, 0.01)
        if self.kernel_func == 'exp':
            return torch.exp(0.2 * t)
        return t

    def dynamic_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image, per-channel 3×3 kernels ``(B, C, 3, 3)`` predicted from the token mean of ``x`` ``(B, N, C)``."""
        B, N, C = x.shape
        return self.residual(x.mean(dim=1).unsqueeze(-1)).reshape(B, C, 3, 3)

    def dynamic_residual(self, x: torch.Tensor, v: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Every image's V ``(B, N, C)`` convolved with its own predicted 3×3 kernels (zero padding, no bias)."""
        B, N, C = v.shape
        kernel = self.dynamic_kernel(x).reshape(B * C, 1, 3, 3).to(v.dtype)
        # batch folded into channels: one grouped conv applies each image's kernels to that image only
        v_img = v.transpose(1, 2).reshape(1, B * C, H, W)
        return F.conv2d(v_img, kernel, padding=1, groups=B * C).reshape(B, C, N).transpose(1, 2)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            device_type = autocast_device(q)
            if device_type:
                # the un-normalised (s/N)·Σkᵀv and the 1 − s·q·k̄ correction lose too much in float16
                with torch.autocast(device_type=device_type, enabled=False):
                    return self._attend_fp(q.float(), k.float(), v.float())
        return self._attend_fp(q, k, v)

    def _attend_fp(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.use_reference:
            return injective_linear_attention_naive(q, k, v, self.scale)
        return injective_linear_attention(q, k, v, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N = H * W
        x = x.reshape(B, N, C)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = self.q_probe(self._phi(q).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2))
        k = self.k_probe(self._phi(k).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2))
        local = self.dynamic_residual(x, v, H, W)
        v = v.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        out = self._attend(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out + local)).reshape(B, H, W, C)

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """The injective rows ``(B, heads, Q, N)`` of the given flat query tokens (None: all N).

        :func:`injective_attention_weights` of the mixer's own φ(q), φ(k): rows sum to one but are signed. The
        dynamic 3×3 depth-wise residual on V is a separate, local branch and not part of them: the output is
        ``proj(rows @ v + residual)``.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        B, H, W, C = x.shape
        N = H * W
        idx = query_index(queries, N, x.device)
        q, k, _ = self.qkv(x.reshape(B, N, C)).chunk(3, dim=-1)
        q = self._phi(q[:, idx]).reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self._phi(k).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        return injective_attention_weights(q, k, self.scale)


def inline_from_official(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> dict[str, torch.Tensor]:
    """Map an official ``InLineAttention`` state dict (Swin or PVT file) onto :class:`InLineAttention`.

    Names are the official ones; the PVT file's separate ``q`` and ``kv`` projections are concatenated into
    ``qkv`` (rows q, k, v).

    Args:
        state_dict: Module state dict, or a whole model state dict together with ``prefix``.
        prefix: E.g. ``'layers.0.blocks.1.attn.'`` (InLine-Swin) or ``'block1.0.attn.'`` (InLine-PVT).
    """
    return merge_q_kv(select_official(state_dict, prefix, 'InLine'))
