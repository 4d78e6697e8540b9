"""Global softmax self-attention over all tokens: the quadratic baseline that linear attention approximates.

Not part of the released L²ViT models; it lets the same backbone be built with softmax in the global blocks
(``block_pattern=('window', 'softmax')``) for the paper's softmax-versus-linear comparison.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from torch import nn

from .._registry import register_mixer
from ._common import query_index
from ._naive import softmax_attention_naive

__all__ = ['GlobalSoftmaxAttention']


@register_mixer('softmax', local=False)
class GlobalSoftmaxAttention(nn.Module):
    """Multi-head softmax self-attention over all ``H·W`` tokens of a ``(B, H, W, C)`` map (O(N²) time).

    Args:
        dim: Channels.
        num_heads: Heads; ``dim`` must be divisible by it.
        qkv_bias: Bias on the qkv projection.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        window_size: Accepted for the shared mixer signature and ignored.
    """
    reference = staticmethod(softmax_attention_naive)

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            window_size: int | None = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x.reshape(B, N, C)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B, heads, N, head_dim
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            out = attn @ v
        out = out.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(out))

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``softmax(q_n kᵀ · scale)`` ``(B, heads, Q, N)`` of the given flat query tokens (None: all N).

        ``rows @ v`` per head, through ``proj``, is the mixer's output in eval mode (dropout is not applied).
        Rows are non-negative and sum to one.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        B, H, W, C = x.shape
        N = H * W
        idx = query_index(queries, N, x.device)
        qkv = self.qkv(x.reshape(B, N, C)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        return ((q[:, :, idx] * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
