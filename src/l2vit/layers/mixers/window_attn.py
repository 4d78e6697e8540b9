"""Local Window Attention (LWA): softmax attention inside non-overlapping windows (spec §2.5).

Plain windows, no shift, no relative position bias. The map is zero-padded at the bottom/right to a multiple of the
window *after* the block's LayerNorm, and by default the padded positions are not masked: they act as keys and values
(their k/v equal the qkv bias), exactly as in the official code. ``mask_padding=True`` masks them out instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, use_fused_attn
from torch import nn

from .._fastpath import chunk_rows, eager_inference, result_buffer
from .._registry import register_mixer
from ..padding import pad_nhwc_to_multiple
from ..prepacked import linear_inference
from ..qkv import split_qkv
from ._naive import softmax_attention_naive

__all__ = ['LocalWindowAttention', 'window_partition', 'window_reverse', 'window_key_mask']


@register_notrace_function  # reason: window counts are Python ints derived from the input shape
def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split a padded ``(B, Hp, Wp, C)`` map into ``(B * nWin, window_size², C)`` windows, row-major."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


@register_notrace_function  # reason: window counts are Python ints derived from the input shape
def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Merge ``(B * nWin, window_size², C)`` windows back into a map and crop it to ``(B, H, W, C)``."""
    Hp = (H + window_size - 1) // window_size * window_size
    Wp = (W + window_size - 1) // window_size * window_size
    C = windows.shape[-1]
    x = windows.view(-1, Hp // window_size, Wp // window_size, window_size, window_size, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, C)
    return x[:, :H, :W, :]


@register_notrace_function  # reason: the mask depends on the input shape
def window_key_mask(H: int, W: int, window_size: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """Boolean key mask ``(batch * nWin, 1, 1, window_size²)``, True for real tokens; None when nothing is padded."""
    Hp = (H + window_size - 1) // window_size * window_size
    Wp = (W + window_size - 1) // window_size * window_size
    if Hp == H and Wp == W:
        return None
    valid = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool, device=device)
    valid[:, :H, :W] = True
    valid = window_partition(valid, window_size)  # nWin, ws*ws, 1
    return valid.squeeze(-1).repeat(batch, 1)[:, None, None, :]


@register_mixer('window', local=True)
class LocalWindowAttention(nn.Module):
    """Multi-head softmax self-attention within ``window_size × window_size`` windows of a ``(B, H, W, C)`` map.

    Args:
        dim: Channels.
        num_heads: Attention heads; ``dim`` must be divisible by it.
        window_size: Window side length (7 for the 224-px models, 12 for ``l2vit_base_384``).
        qkv_bias: Bias on the qkv projection (True in every official block).
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        mask_padding: Exclude zero-padded positions from the keys (not official; the official code leaves them in).
    """
    reference = staticmethod(softmax_attention_naive)

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            window_size: int = 7,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            mask_padding: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        if window_size < 1:
            raise ValueError(f'window_size must be a positive int, got {window_size}')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        self.mask_padding = mask_padding
        self.fused_attn = use_fused_attn()

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, window_size={self.window_size}, mask_padding={self.mask_padding}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x):  # unannotated: TorchScript reads Tensor -> Tensor (and never calls it)
        if eager_inference(x, self):
            out = self.chunked_residual(x, None)
            if out is not None:
                return out
            return self._forward(x, packed=True)
        return self._forward(x)

    def _forward(self, x: torch.Tensor, packed: bool = False) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        windows = window_partition(pad_nhwc_to_multiple(x, ws), ws)  # B*nW, ws*ws, C
        mask = window_key_mask(H, W, ws, B, x.device) if self.mask_padding else None
        return window_reverse(self._attend(windows, mask, packed), ws, H, W)

    def _attend(self, windows: torch.Tensor, mask: torch.Tensor | None, packed: bool = False) -> torch.Tensor:
        """Attention within each of ``(B * nW, ws * ws, C)`` windows, output projection included. ``packed``: the
        projections through :func:`~l2vit.layers.prepacked.linear_inference` (eager inference only)."""
        if packed and not torch.jit.is_scripting():
            return self.proj_drop(self._attend_packed(windows, mask))
        return self.proj_drop(self.proj(self._mix(self.qkv(windows), mask)))

    @torch.jit.unused
    def _attend_packed(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return linear_inference(self.proj, self._mix(linear_inference(self.qkv, windows), mask))

    def _mix(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``(B * nW, ws * ws, 3C)`` qkv projections → attention output ``(B * nW, ws * ws, C)``, before ``proj``."""
        Bw, N = qkv.shape[0], qkv.shape[1]
        C = qkv.shape[2] // 3
        q, k, v = split_qkv(qkv, self.num_heads)  # B*nW, heads, ws*ws, head_dim (strided views: SDPA reads them)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=self.attn_drop.p if self.training else 0.,
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                attn = attn.masked_fill(~mask, float('-inf'))
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v
        return out.transpose(1, 2).reshape(Bw, N, C)  # a view for SDPA's heads-last output

    @torch.jit.unused
    def chunked_residual(self, x, norm, into=None):  # unannotated: TorchScript reads Tensors (never calls it)
        """Inference route for ``x + self(norm(x))`` (``norm`` a module), or ``self(x)`` when ``norm`` is None.

        Works through groups of window rows of one image at a time: norm, zero padding, partition, attention,
        merge and residual add of a group all happen in cache, and no full-size normed map, padded map, window
        tensor, qkv or attention output is ever allocated. Each window is computed exactly as in the plain form.
        Returns None when the map is too small to be worth splitting (the caller then runs the plain form).

        ``into``: where to write the result, e.g. ``x`` itself (each group of window rows reads only the rows it
        writes); used when it is contiguous, of ``x``'s shape and the result's dtype, else a new tensor is returned.
        """
        B, H, W, C = x.shape
        ws = self.window_size
        nh, nw = (H + ws - 1) // ws, (W + ws - 1) // ws
        Hp, Wp = nh * ws, nw * ws
        row_tokens = ws * Wp
        tokens = chunk_rows(3 * C, B * nh * row_tokens, device=x.device)
        if tokens == 0 or B * nh < 2:
            return None
        rows = min(max(1, tokens // row_tokens), nh)  # window rows per chunk, within one image
        padded = Hp != H or Wp != W
        mask = window_key_mask(H, W, ws, B, x.device) if self.mask_padding else None
        out = None
        for b in range(B):
            for ih0 in range(0, nh, rows):
                ih1 = min(ih0 + rows, nh)
                g, r0, r1 = ih1 - ih0, ih0 * ws, min(ih1 * ws, H)
                src = x[b, r0:r1]
                tok = norm(src) if norm is not None else src
                if padded:
                    buf = tok.new_zeros((g * ws, Wp, C))
                    buf[:r1 - r0, :W] = tok
                    tok = buf
                windows = tok.reshape(g, ws, nw, ws, C).permute(0, 2, 1, 3, 4).reshape(-1, ws * ws, C)
                chunk_mask = mask[(b * nh + ih0) * nw:(b * nh + ih1) * nw] if mask is not None else None
                y = self._attend(windows, chunk_mask, packed=True).view(g, nw, ws, ws, C).permute(0, 2, 1, 3, 4)
                if out is None:  # the dtype the plain form would give (autocast: the residual's promotion)
                    dtype = torch.result_type(src, y) if norm is not None else y.dtype
                    out = result_buffer(into, x, dtype)
                dst = out[b, r0:r1]
                if not padded:  # add straight from the window layout into the map layout
                    y, dst, src = y, dst.view(g, ws, nw, ws, C), src.reshape(g, ws, nw, ws, C)
                else:
                    y = y.reshape(g * ws, Wp, C)[:r1 - r0, :W]
                if norm is not None:
                    torch.add(src, y, out=dst)
                else:
                    dst.copy_(y)
        return out
