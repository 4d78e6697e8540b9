"""FLatten Transformer's Focused Linear Attention (FLA) as an L²ViT token mixer.

Han et al., "FLatten Transformer: Vision Transformer using Focused Linear Attention", ICCV 2023
(https://github.com/LeapLabTHU/FLatten-Transformer, commit abdb115). Per head, with means over the N keys:

    φ(t) = ‖u‖ · u^p / ‖u^p‖,   u = (ReLU(t) + 1e-6) / softplus(s)      (norms over all C channels, p = 3)
    O_i  = φ(q_i) · [(1/N) Σ_j φ(k_j)ᵀ v_j] / (φ(q_i) · (1/N) Σ_j φ(k_j) + 1e-6) + DWC(V)_i

with a learned absolute positional table P added to the keys before φ, and a 5×5 depth-wise convolution on V whose
weights are shared by all heads (the "rank restoration"). Cost O(N·C·d + N·C·k²); no N×N matrix is formed.

Any resolution: the official table P has exactly ``window_size²`` rows (and the official Swin-file module only takes
square grids). Here P is stored at its official size ``pos_size`` and resampled bicubically (timm's
``resample_abs_pos_embed``) to the actual grid at run time; at ``pos_size`` itself it is used unchanged, bit for bit.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, to_2tuple
from torch import nn

from .._registry import register_mixer
from ._common import autocast_device, check_divisible, merge_q_kv, query_index, select_official

__all__ = [
    'FocusedLinearAttention', 'focusing_feature_map', 'focused_attention_weights', 'focused_linear_attention',
    'focused_linear_attention_naive', 'flatten_from_official',
]


def focusing_feature_map(t: torch.Tensor, scale: torch.Tensor, focusing_factor: float) -> torch.Tensor:
    """FLatten's focused map over the last (channel) axis: keep the norm of ``u``, sharpen its direction.

    Args:
        t: Queries or keys ``(..., C)``, all heads together (the norms are over all C channels, not per head).
        scale: The learned pre-softplus scale ``(1, 1, C)``.
        focusing_factor: The power ``p`` (3 in every released model).
    """
    u = (torch.relu(t) + 1e-6) / F.softplus(scale)
    u_norm = u.norm(2, dim=-1, keepdim=True)
    u_pow = u ** focusing_factor
    return (u_pow / u_pow.norm(2, dim=-1, keepdim=True)) * u_norm


def focused_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """kv-first mean-normalised linear attention on feature-mapped ``(B, heads, N, d)`` tensors (official order)."""
    n = k.shape[-2]
    z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps)  # B, heads, N, 1
    kv = (k.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)  # B, heads, d, d: (1/N) Σ φ(k)ᵀ v
    return q @ kv * z


def focused_attention_weights(q: torch.Tensor, k: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The equivalent N×N weights ``A_ij = φ(q_i)·φ(k_j) / (N·(φ(q_i)·k̄ + eps))`` (for references and analysis)."""
    n = k.shape[-2]
    return (q @ k.transpose(-2, -1)) / (n * (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps))


def focused_linear_attention_naive(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """qk-first reference of :func:`focused_linear_attention`: forms the N×N weights explicitly, then ``A v``."""
    return focused_attention_weights(q, k, eps) @ v


@register_mixer('flatten', local=False)
class FocusedLinearAttention(nn.Module):
    """FLatten's focused linear attention over all tokens of a ``(B, H, W, C)`` map, with its depth-wise conv branch.

    Args:
        dim: Channels.
        num_heads: Heads; ``dim`` must be divisible by it.
        window_size: The official constructor's window, i.e. the side of the positional table when ``pos_size`` is
            not given (in the L²ViT backbone: the LWA window, 7).
        qkv_bias: Bias on the qkv projection (True in every released model).
        attn_drop: Accepted for the shared signature; the official module has no attention weights to drop.
        proj_drop: Dropout after the output projection.
        focusing_factor: Power ``p`` of the focused map.
        kernel_size: Side of the depth-wise conv on V (shared by all heads).
        pos_size: ``(rows, cols)`` of the stored positional table; it is resampled to other grids at run time.
    """
    reference = staticmethod(focused_linear_attention_naive)

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            window_size: int | tuple[int, int] | None = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            focusing_factor: float = 3.,
            kernel_size: int = 5,
            pos_size: int | tuple[int, int] | None = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        check_divisible(dim, num_heads, 'dim', 'num_heads')
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be a positive odd int, got {kernel_size}')
        if focusing_factor <= 0:
            raise ValueError(f'focusing_factor must be > 0, got {focusing_factor}')
        pos = to_2tuple(pos_size if pos_size is not None else (window_size if window_size is not None else 7))
        if min(pos) < 1:
            raise ValueError(f'pos_size must be positive, got {pos}')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.focusing_factor = float(focusing_factor)
        self.pos_size: tuple[int, int] = (int(pos[0]), int(pos[1]))
        self.use_reference = False

        # registration order follows the official state_dict
        self.scale = nn.Parameter(torch.zeros(1, 1, dim, **dd))
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.pos_size[0] * self.pos_size[1], dim, **dd))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_probe = nn.Identity()
        self.k_probe = nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(
            self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2, groups=self.head_dim, **dd)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, focusing_factor={self.focusing_factor:g}, '
                f'pos_size={self.pos_size}, use_reference={self.use_reference}')

    def pos_embed(self, H: int, W: int) -> torch.Tensor:
        """The positional table for an ``H × W`` grid, ``(1, H·W, C)``: the stored one, or its bicubic resampling."""
        return resample_abs_pos_embed(
            self.positional_encoding, [H, W], old_size=[self.pos_size[0], self.pos_size[1]], num_prefix_tokens=0)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if not torch.jit.is_scripting():
            device_type = autocast_device(q)
            if device_type:
                # the focusing power (u³ with u down to 1e-6) underflows in half precision
                with torch.autocast(device_type=device_type, enabled=False):
                    return self._attend_fp(q.float(), k.float(), v.float(), H, W)
        return self._attend_fp(q, k, v, H, W)

    def _attend_fp(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = q.shape
        q = focusing_feature_map(q, self.scale, self.focusing_factor)
        k = focusing_feature_map(k, self.scale, self.focusing_factor)
        q = q.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        q = self.q_probe(q)
        k = self.k_probe(k)
        if self.use_reference:
            out = focused_linear_attention_naive(q, k, v)
        else:
            out = focused_linear_attention(q, k, v)
        # rank restoration: the same depth-wise conv on every head's V image (row-major tokens)
        v_img = v.reshape(B * self.num_heads, N, self.head_dim).transpose(1, 2).reshape(-1, self.head_dim, H, W)
        dwc = self.dwc(v_img).reshape(B, self.num_heads, self.head_dim, N).transpose(-2, -1)
        return (out + dwc).transpose(1, 2).reshape(B, N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x.reshape(B, H * W, C)).chunk(3, dim=-1)
        k = k + self.pos_embed(H, W)
        out = self._attend(q, k, v, H, W)
        return self.proj_drop(self.proj(out)).reshape(B, H, W, C)

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """The focused-attention rows ``(B, heads, Q, N)`` of the given flat query tokens (None: all N).

        :func:`focused_attention_weights` of the mixer's own φ(q), φ(k) (keys with the positional table): non-negative
        rows that sum to one up to the 1e-6 in the normaliser. The depth-wise conv on V is a separate, local branch
        and not part of them: the output is ``proj(rows @ v + DWC(v))``.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        B, H, W, C = x.shape
        N = H * W
        idx = query_index(queries, N, x.device)
        q, k, _ = self.qkv(x.reshape(B, N, C)).chunk(3, dim=-1)
        k = k + self.pos_embed(H, W)
        # the focused map acts on each token's channels alone, so the chosen queries can be mapped by themselves
        q = focusing_feature_map(q[:, idx], self.scale, self.focusing_factor)
        k = focusing_feature_map(k, self.scale, self.focusing_factor)
        q = q.reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        return focused_attention_weights(q, k)


def flatten_from_official(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> dict[str, torch.Tensor]:
    """Map an official ``FocusedLinearAttention`` state dict (Swin or PVT file) onto :class:`FocusedLinearAttention`.

    Names are the official ones; the PVT file's separate ``q`` and ``kv`` projections are concatenated into
    ``qkv`` (rows q, k, v). Build the module with ``pos_size`` equal to the official grid (``window_size`` for the
    Swin file, the ``(H, W)`` whose product is ``num_patches`` for the PVT file).

    Args:
        state_dict: Module state dict, or a whole model state dict together with ``prefix``.
        prefix: E.g. ``'layers.0.blocks.1.attn.'`` (FLatten-Swin) or ``'block1.0.attn.'`` (FLatten-PVT).
    """
    return merge_q_kv(select_official(state_dict, prefix, 'FLatten'))
