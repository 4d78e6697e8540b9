"""ViTALiTy's linear Taylor attention with its sparse component, as the released code computes it.

Dass et al., "ViTALiTy: Unifying Low-rank and Sparse Approximation for Vision Transformer Acceleration with a Linear
Taylor Attention", HPCA 2023 (https://github.com/GATECH-EIC/ViTALiTy, commit 4a1173c, class ``Attention`` with
``vitality=True`` and its 4-bit ``QuantMeasure``). Per head, with ``s = d^-1/2``:

    low-rank   k̂_j = k_j − mean_c(k_j)   (each key centred over its own d channels),   lr_i = q_i · Σ_j k̂_jᵀ v_j
    sparse     A = softmax(s · q̃ k̃ᵀ) on 4-bit fake-quantised q̃, k̃;   sp_i = Σ_j [A_ij > 0.002] A_ij v_j
    a_i = s · (sp_i + lr_i),   out = proj(a)

How the code departs from the paper (which derives exp(q·k) ≈ 1 + q·k with keys centred over the *tokens*, giving
``(1/N)(Σ_j v_j + Q K̂ᵀ V)``, and uses only that low-rank part at inference): the code centres each key over its
features, has neither the ``Σ_j v_j`` term nor the 1/N, scales by d^-1/2, and adds the sparse term in eval mode too.
``sparse=False`` gives the paper's inference form in the code's conventions (``proj(s · q K̂ᵀ V)``), which is linear:
O(N·d²) per head. With the sparse term (the default, as released) the mixer forms N×N weights, O(N²·d).

The quantiser uses the batch min/max of the whole q (or k) tensor in training, updating shared running buffers with
momentum 0.9 (twice per call: q's statistics, then k's), and the running buffers in eval; rounding is
round-half-to-even with a straight-through gradient. A fresh module has zero buffers, so its eval output is
degenerate until it has been trained (the official behaviour). Nothing depends on the grid: any N works.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .._registry import register_mixer
from ._common import autocast_device, check_divisible, query_index, select_official

__all__ = [
    'TaylorAttention', 'FakeQuantize', 'fake_quantize', 'taylor_lowrank_attention', 'taylor_lowrank_attention_naive',
    'vitality_sparse_weights', 'vitality_from_official',
]


def fake_quantize(
        x: torch.Tensor, zero_point: torch.Tensor, value_range: torch.Tensor, num_bits: int = 4) -> torch.Tensor:
    """Uniform fake quantisation ``round((x − z)/σ)`` clamped to ``[0, 2^b − 1]``, times σ, plus z.

    ``σ = max(range / (2^b − 1), 1e-8)``. The returned values are exactly the quantised ones; the gradient with
    respect to ``x`` passes straight through.
    """
    levels = 2. ** num_bits - 1.
    step = torch.clamp(value_range / levels, min=1e-8)
    quantised = (((x.detach() - zero_point) / step).round().clamp(0., levels) * step + zero_point).detach()
    return quantised + (x - x.detach())  # exact forward value; identity backward


class FakeQuantize(nn.Module):
    """ViTALiTy's ``QuantMeasure``: per-tensor fake quantisation with running min/range buffers.

    Args:
        num_bits: Bits per value (4).
        momentum: Weight of the old buffer value in the running update (0.9).
    """

    def __init__(self, num_bits: int = 4, momentum: float = 0.9, device=None, dtype=None):
        super().__init__()
        self.num_bits = num_bits
        self.momentum = momentum
        self.register_buffer('running_zero_point', torch.zeros(1, 1, 1, device=device, dtype=dtype))
        self.register_buffer('running_range', torch.zeros(1, 1, 1, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f'num_bits={self.num_bits}, momentum={self.momentum:g}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            # statistics of the whole tensor, so one sample's quantisation depends on the rest of the batch
            zero_point = x.detach().min().reshape(1, 1, 1)
            value_range = x.detach().max().reshape(1, 1, 1) - zero_point
            m = self.momentum
            self.running_zero_point.mul_(m).add_(zero_point.to(self.running_zero_point.dtype) * (1 - m))
            self.running_range.mul_(m).add_(value_range.to(self.running_range.dtype) * (1 - m))
        else:
            zero_point = self.running_zero_point.to(x.dtype)
            value_range = self.running_range.to(x.dtype)
        return fake_quantize(x, zero_point, value_range, self.num_bits)


def taylor_lowrank_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """kv-first ``q · Σ_j k̂_jᵀ v_j`` with feature-centred keys ``k̂`` (given), ``(B, heads, N, d)``."""
    return q @ (k.transpose(-2, -1) @ v)


def taylor_lowrank_attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """qk-first reference of :func:`taylor_lowrank_attention`: forms ``q k̂ᵀ`` (N×N) explicitly."""
    return (q @ k.transpose(-2, -1)) @ v


def vitality_sparse_weights(q: torch.Tensor, k: torch.Tensor, scale: float, threshold: float = 0.002) -> torch.Tensor:
    """``M ⊙ A`` of the sparse part from quantised q̃, k̃: softmax weights above ``threshold``, not renormalised."""
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return attn * (attn > threshold).to(attn.dtype)


@register_mixer('vitality', local=False)
class TaylorAttention(nn.Module):
    """ViTALiTy's Taylor attention over all tokens of a ``(B, H, W, C)`` map (low-rank + quantised sparse part).

    Args:
        dim: Channels.
        num_heads: Heads; ``dim`` must be divisible by it.
        window_size: Accepted for the shared signature and ignored (the attention is global).
        qkv_bias: Bias on the qkv projection (True in the DeiT models it was used in).
        attn_drop: Dropout on the per-head output (where the official code applies it).
        proj_drop: Dropout after the output projection.
        sparse: Add the quantised masked-softmax component (always on in the released code).
        sparse_threshold: Softmax weights at or below it are dropped (0.002).
        quant_bits: Bits of the fake quantisation of q and k (4).
        quant_momentum: Momentum of the running quantiser statistics (0.9).
    """
    reference = staticmethod(taylor_lowrank_attention_naive)

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            window_size: int | None = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            sparse: bool = True,
            sparse_threshold: float = 0.002,
            quant_bits: int = 4,
            quant_momentum: float = 0.9,
            device=None,
            dtype=None,
    ):
        super().__init__()
        check_divisible(dim, num_heads, 'dim', 'num_heads')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sparse = sparse
        self.sparse_threshold = float(sparse_threshold)
        self.use_reference = False

        # registration order follows the official state_dict (its unused 16-bit quantiser is left out)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.quant = FakeQuantize(quant_bits, quant_momentum, **dd)
        self.q_probe = nn.Identity()
        self.k_probe = nn.Identity()

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, sparse={self.sparse}, sparse_threshold={self.sparse_threshold:g}, '
                f'use_reference={self.use_reference}')

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            device_type = autocast_device(q)
            if device_type:
                # nothing normalises the low-rank sum: it grows with N past float16's range
                with torch.autocast(device_type=device_type, enabled=False):
                    return self._attend_fp(q.float(), k.float(), v.float())
        return self._attend_fp(q, k, v)

    def _attend_fp(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_hat = self.k_probe(k - k.mean(dim=-1, keepdim=True))
        q = self.q_probe(q)
        if self.use_reference:
            out = taylor_lowrank_attention_naive(q, k_hat, v)
        else:
            out = taylor_lowrank_attention(q, k_hat, v)
        if self.sparse:
            weights = vitality_sparse_weights(self.quant(q), self.quant(k), self.scale, self.sparse_threshold)
            out = weights @ v + out
        return out * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x.reshape(B, N, C)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B, heads, N, d
        out = self.attn_drop(self._attend(q, k, v)).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out)).reshape(B, H, W, C)

    def _quantize_without_update(self, t: torch.Tensor) -> torch.Tensor:
        """What ``self.quant(t)`` returns, without updating its running buffers (batch statistics in training)."""
        quant = self.quant
        if quant.training:
            zero_point = t.detach().min().reshape(1, 1, 1)
            value_range = t.detach().max().reshape(1, 1, 1) - zero_point
        else:
            zero_point = quant.running_zero_point.to(t.dtype)
            value_range = quant.running_range.to(t.dtype)
        return fake_quantize(t, zero_point, value_range, quant.num_bits)

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """The Taylor rows ``(B, heads, Q, N)`` of the given flat query tokens (None: all N), as the code computes.

        ``w_nm = s · (q_n·k̂_m + [A_nm > threshold]·A_nm)``, with k̂ the feature-centred keys and A the softmax of the
        4-bit quantised q̃, k̃ (the sparse term only with ``sparse=True``): ``w v`` per head, through ``proj``, is the
        mixer's output (attention dropout is not applied). Rows are signed and do not sum to one. The quantiser's
        running statistics are read (eval) or the batch's taken (training) but never updated here.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        B, H, W, C = x.shape
        N = H * W
        idx = query_index(queries, N, x.device)
        qkv = self.qkv(x.reshape(B, N, C)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)  # B, heads, N, d
        weights = q[:, :, idx] @ (k - k.mean(dim=-1, keepdim=True)).transpose(-2, -1)
        if self.sparse:
            # the quantiser's batch statistics are those of all tokens, so quantise first, then pick the queries
            q_quant = self._quantize_without_update(q)[:, :, idx]
            weights = weights + vitality_sparse_weights(
                q_quant, self._quantize_without_update(k), self.scale, self.sparse_threshold)
        return weights * self.scale


def vitality_from_official(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> dict[str, torch.Tensor]:
    """Map an official ViTALiTy ``Attention(vitality=True)`` state dict onto :class:`TaylorAttention`.

    Names are unchanged (``qkv``, ``proj``, ``quant.running_zero_point``, ``quant.running_range``); the buffers of the
    official 16-bit quantiser ``quant_16``, which its forward never reads, are dropped.

    Args:
        state_dict: Module state dict, or a whole DeiT state dict together with ``prefix``.
        prefix: E.g. ``'blocks.3.attn.'``.
    """
    sd = select_official(state_dict, prefix, 'ViTALiTy')
    return {k: v for k, v in sd.items() if not k.startswith('quant_16.')}
