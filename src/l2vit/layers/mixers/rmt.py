"""RMT's Manhattan Self-Attention (MaSA), full and decomposed, as L²ViT token mixers.

Fan et al., "RMT: Retentive Networks Meet Vision Transformers", CVPR 2024 (https://github.com/qhfan/RMT,
commit 32ea214, classes ``VisionRetentionAll`` and ``VisionRetentionChunk``). Per head h, with the fixed decay
``γ_h = 1 − 2^(−initial_value − heads_range·h/heads)``, rotary q', k' (1-D raster positions, :mod:`._rotary`) and
``k`` pre-scaled by ``d^-1/2``:

    full        A = softmax_m(q'_n·k'_m + (|Δr| + |Δc|)·log γ_h),   O = A V                      O(N²·C)
    decomposed  rows first: softmax over the keys of the same row with |Δc|·log γ_h, applied to V;
                then columns: softmax over the keys of the same column with |Δr|·log γ_h, applied
                to the row result                                                            O(N·(H+W)·C)
    out = W_o (O + LePE(V))                                                                   (LePE: 5×5 DW conv)

Adding ``|Δ|·log γ`` to the logits multiplies exp(q'·k') by γ^|Δ| *before* the row is renormalised. Neither form
is a linear attention. The tables (decay masks, rotary sin/cos) are rebuilt from (H, W) for every input (RMT builds
them once per stage call, outside the mixer), so any grid works; the official stage buffers ``Relpos.angle`` and
``Relpos.decay`` are fixed functions of the arguments and are not stored.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import nn

from .._registry import register_mixer
from ._common import check_divisible, query_index, select_official
from ._rotary import apply_rotary, rmt_rope_tables

__all__ = [
    'ManhattanSelfAttention', 'DecomposedManhattanSelfAttention', 'masa_log_decay', 'masa_mask_full',
    'masa_masks_decomposed', 'masa_full', 'masa_full_naive', 'masa_decomposed', 'masa_decomposed_naive',
    'masa_from_official',
]


def masa_log_decay(num_heads: int, initial_value: float, heads_range: float, device: torch.device) -> torch.Tensor:
    """``log γ_h`` per head, float32, as the official ``RetNetRelPos2d`` computes it."""
    h = torch.arange(num_heads, dtype=torch.float32, device=device)
    return torch.log(1 - 2 ** (-initial_value - heads_range * h / num_heads))


@register_notrace_function  # reason: mask sizes are Python ints derived from the input shape
def masa_mask_full(H: int, W: int, log_decay: torch.Tensor) -> torch.Tensor:
    """``(heads, N, N)`` additive mask ``(|Δr| + |Δc|)·log γ_h`` over row-major tokens."""
    rows = torch.arange(H, device=log_decay.device).to(log_decay).repeat_interleave(W)
    cols = torch.arange(W, device=log_decay.device).to(log_decay).repeat(H)
    dist = (rows[:, None] - rows[None, :]).abs() + (cols[:, None] - cols[None, :]).abs()
    return dist * log_decay[:, None, None]


@register_notrace_function  # reason: mask sizes are Python ints derived from the input shape
def masa_masks_decomposed(H: int, W: int, log_decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask_h, mask_w)``: ``(heads, H, H)`` and ``(heads, W, W)`` additive masks ``|Δ|·log γ_h``."""
    index_h = torch.arange(H, device=log_decay.device).to(log_decay)
    index_w = torch.arange(W, device=log_decay.device).to(log_decay)
    mask_h = (index_h[:, None] - index_h[None, :]).abs() * log_decay[:, None, None]
    mask_w = (index_w[:, None] - index_w[None, :]).abs() * log_decay[:, None, None]
    return mask_h, mask_w


def masa_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Full MaSA on ``(B, heads, N, d)`` rotated q', scaled-and-rotated k', v with the ``(heads, N, N)`` mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=1.0)


def masa_full_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`masa_full` with the explicit softmax matrix (the official operation order)."""
    return ((q @ k.transpose(-2, -1)) + mask).softmax(dim=-1) @ v


def masa_decomposed(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor,
) -> torch.Tensor:
    """Decomposed MaSA on ``(B, heads, H, W, d)`` tensors: a softmax along each row, then along each column."""
    attn_w = ((q @ k.transpose(-2, -1)) + mask_w[:, None]).softmax(dim=-1)  # B, heads, H, W, W
    v = attn_w @ v
    q, k, v = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)  # B, heads, W, H, d
    attn_h = ((q @ k.transpose(-2, -1)) + mask_h[:, None]).softmax(dim=-1)  # B, heads, W, H, H
    return (attn_h @ v).transpose(2, 3)


def masa_decomposed_naive(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_h: torch.Tensor, mask_w: torch.Tensor,
) -> torch.Tensor:
    """Reference of :func:`masa_decomposed`: each pass as an N×N softmax that masks out other rows / columns."""
    B, Hd, H, W, d = q.shape
    rows = torch.arange(H, device=q.device).repeat_interleave(W)
    cols = torch.arange(W, device=q.device).repeat(H)
    same_row = rows[:, None] == rows[None, :]
    same_col = cols[:, None] == cols[None, :]
    q, k, v = q.reshape(B, Hd, H * W, d), k.reshape(B, Hd, H * W, d), v.reshape(B, Hd, H * W, d)
    logits = q @ k.transpose(-2, -1)
    bias_w = mask_w[:, cols][:, :, cols]  # heads, N, N: |Δc|·log γ
    bias_h = mask_h[:, rows][:, :, rows]  # heads, N, N: |Δr|·log γ
    v = (logits + bias_w).masked_fill(~same_row, float('-inf')).softmax(dim=-1) @ v
    out = (logits + bias_h).masked_fill(~same_col, float('-inf')).softmax(dim=-1) @ v
    return out.reshape(B, Hd, H, W, d)


@register_mixer('masa', local=False)
class ManhattanSelfAttention(nn.Module):
    """RMT's full Manhattan self-attention over all tokens of a ``(B, H, W, C)`` map (O(N²)).

    Args:
        dim: Channels.
        num_heads: Heads; the head dim must be even (rotary pairs).
        window_size: Accepted for the shared signature and ignored.
        qkv_bias: Bias on the q/k/v projections (the official module always has them).
        attn_drop: Accepted for the shared signature; the official module applies no attention dropout.
        proj_drop: Dropout after the output projection.
        initial_value: ``γ_h = 1 − 2^(−initial_value − heads_range·h/heads)`` (2 in every RMT model).
        heads_range: See ``initial_value`` (RMT-T/S: 4 in stages 1–2, 6 in stages 3–4).
        lepe_kernel_size: Side of the depth-wise LePE conv on V (5).
    """
    reference = staticmethod(masa_full_naive)
    decomposed: bool = False

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            window_size: int | None = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            initial_value: float = 2.,
            heads_range: float = 4.,
            lepe_kernel_size: int = 5,
            device=None,
            dtype=None,
    ):
        super().__init__()
        check_divisible(dim, num_heads, 'dim', 'num_heads')
        check_divisible(dim // num_heads, 2, 'head dim (dim / num_heads)', 'the rotary pairs')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.initial_value = float(initial_value)
        self.heads_range = float(heads_range)
        self.use_reference = False

        # registration order follows the official state_dict
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel_size, padding=lepe_kernel_size // 2, groups=dim, **dd)
        self.out_proj = nn.Linear(dim, dim, **dd)
        self.q_probe = nn.Identity()
        self.k_probe = nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, initial_value={self.initial_value:g}, '
                f'heads_range={self.heads_range:g}, use_reference={self.use_reference}')

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, H, W, C = t.shape
        return t.reshape(B, H, W, self.num_heads, self.head_dim).permute(0, 3, 1, 2, 4)  # B, heads, H, W, d

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
        B, Hd, H, W, d = q.shape
        mask = masa_mask_full(H, W, log_decay)
        q, k, v = q.reshape(B, Hd, H * W, d), k.reshape(B, Hd, H * W, d), v.reshape(B, Hd, H * W, d)
        out = masa_full_naive(q, k, v, mask) if self.use_reference else masa_full(q, k, v, mask)
        return out.reshape(B, Hd, H, W, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q = self.q_proj(x)
        k = self.k_proj(x) * self.scaling
        v = self.v_proj(x)
        lepe = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        sin, cos = rmt_rope_tables(H, W, self.head_dim, x.device)
        sin, cos = sin.to(q.dtype), cos.to(q.dtype)
        q = self.q_probe(apply_rotary(self._heads(q), sin, cos))
        k = self.k_probe(apply_rotary(self._heads(k), sin, cos))
        v = self._heads(v)
        log_decay = masa_log_decay(self.num_heads, self.initial_value, self.heads_range, x.device)
        out = self._attend(q, k, v, log_decay.to(q.dtype))  # B, heads, H, W, d
        out = out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        return self.proj_drop(self.out_proj(out + lepe))

    def _rotated_qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward's rotated q', scaled-and-rotated k' ``(B, heads, H, W, d)`` and ``log γ`` ``(heads,)``."""
        H, W = x.shape[1], x.shape[2]
        sin, cos = rmt_rope_tables(H, W, self.head_dim, x.device)
        sin, cos = sin.to(x.dtype), cos.to(x.dtype)
        q = apply_rotary(self._heads(self.q_proj(x)), sin, cos)
        k = apply_rotary(self._heads(self.k_proj(x) * self.scaling), sin, cos)
        log_decay = masa_log_decay(self.num_heads, self.initial_value, self.heads_range, x.device)
        return q, k, log_decay.to(x.dtype)

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``softmax_m(q'_n·k'_m + (|Δr| + |Δc|)·log γ_h)`` ``(B, heads, Q, N)`` of the given flat query
        tokens (None: all N), the decay bias formed for those queries only.

        Non-negative, summing to one. LePE on V is not part of them: the output is ``out_proj(rows @ v + LePE(v))``.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        B, H, W, C = x.shape
        N = H * W
        idx = query_index(queries, N, x.device)
        q, k, log_decay = self._rotated_qk(x)
        q = q.reshape(B, self.num_heads, N, self.head_dim)[:, :, idx]
        k = k.reshape(B, self.num_heads, N, self.head_dim)
        rows = torch.arange(H, device=x.device).repeat_interleave(W)
        cols = torch.arange(W, device=x.device).repeat(H)
        dist = (rows[idx, None] - rows[None, :]).abs() + (cols[idx, None] - cols[None, :]).abs()  # Q, N
        return ((q @ k.transpose(-2, -1)) + dist.to(x.dtype) * log_decay[:, None, None]).softmax(dim=-1)


@register_mixer('masa_decomposed', local=False)
class DecomposedManhattanSelfAttention(ManhattanSelfAttention):
    """RMT's decomposed Manhattan self-attention (rows, then columns) on a ``(B, H, W, C)`` map (O(N·(H+W))).

    Arguments and weights as :class:`ManhattanSelfAttention`.
    """
    reference = staticmethod(masa_decomposed_naive)
    decomposed: bool = True

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
        mask_h, mask_w = masa_masks_decomposed(q.shape[2], q.shape[3], log_decay)
        if self.use_reference:
            return masa_decomposed_naive(q, k, v, mask_h, mask_w)
        return masa_decomposed(q, k, v, mask_h, mask_w)

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """The composite rows ``(B, heads, Q, N)`` of the two 1-D passes for the given flat query tokens (None: all).

        The column pass mixes the row pass's outputs, so query (r, c) weighs key (r', c') by
        ``A^col_c[r, r'] · A^row_r'[c, c']``: its column softmax over the tokens (r', c), times the row softmax of
        each of those tokens over its own row. Rows are non-negative and sum to one; every key of the grid can get
        weight. Per query this forms one H-long column row and H row rows of W (Q·N values per head). LePE on V is
        not part of them: the output is ``out_proj(rows @ v + LePE(v))``.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        B, H, W, C = x.shape
        idx = query_index(queries, H * W, x.device)
        q, k, log_decay = self._rotated_qk(x)  # B, heads, H, W, d
        r, c = idx // W, idx % W
        index_h = torch.arange(H, device=x.device)
        index_w = torch.arange(W, device=x.device)
        # second pass: query (r, c) over the tokens (r', c) of its column
        col_bias = (r[:, None] - index_h[None, :]).abs().to(x.dtype) * log_decay[:, None, None]  # heads, Q, H
        attn_col = (torch.einsum('bhqd,bhrqd->bhqr', q[:, :, r, c], k[:, :, :, c]) + col_bias).softmax(dim=-1)
        # first pass: each token (r', c) over the tokens (r', c') of its row
        row_bias = (c[:, None] - index_w[None, :]).abs().to(x.dtype) * log_decay[:, None, None]  # heads, Q, W
        logits_row = torch.einsum('bhrqd,bhrwd->bhqrw', q[:, :, :, c], k) + row_bias[:, :, None, :]
        attn_row = logits_row.softmax(dim=-1)  # B, heads, Q, H, W
        return (attn_col.unsqueeze(-1) * attn_row).reshape(B, self.num_heads, idx.numel(), H * W)


def masa_from_official(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> dict[str, torch.Tensor]:
    """Map an official ``VisionRetentionAll`` / ``VisionRetentionChunk`` state dict onto the MaSA mixers.

    Names are unchanged except ``lepe.conv.*`` → ``lepe.*`` (the official DWConv2d wrapper). Build the mixer with
    the stage's ``initial_value`` and ``heads_range``; the stage buffers ``Relpos.angle`` / ``Relpos.decay`` are
    recomputed, not loaded.

    Args:
        state_dict: Module state dict, or a whole RMT state dict together with ``prefix``.
        prefix: E.g. ``'layers.0.blocks.1.retention.'``.
    """
    sd = select_official(state_dict, prefix, 'MaSA')
    return {('lepe.' + k[len('lepe.conv.'):] if k.startswith('lepe.conv.') else k): v for k, v in sd.items()}
