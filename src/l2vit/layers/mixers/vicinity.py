"""Vicinity Attention (VVT) as an L²ViT token mixer.

Sun et al., "Vicinity Vision Transformer", TPAMI 2023 (https://github.com/OpenNLPLab/Vicinity-Vision-Transformer,
commit 2c49e0f, class ``VicinityVisionAttention``). Tokens at (r, c) of an H×W grid get the angles
``a = (π/2)·r/H``, ``b = (π/2)·c/W``; per head, with ReLU features reduced to ``d = C / (heads · fr_ratio)``:

    q̃ = [q cos a, q sin a, q cos b, q sin b]  (k̃ likewise),  so  q̃_n·k̃_m = (q_n·k_m)·[cos(a_n−a_m) + cos(b_n−b_m)]
    o_n = clamp±( clamp±(q̃_n · clamp±(Σ_m k̃_mᵀ v_m)) · clamp±(1 / (q̃_n · Σ_m k̃_m + 1e-4)) )
    y = clamp±(W_o o),    out = clamp±(y + y ⊙ σ(W₂ ReLU(W₁ mean_n x_n)))        (Feature Preserving Connection)

where ``clamp±(t) = sign(t)·min(max(|t|, 1e-4), 1e4)`` is always on in the official code (``abs_clamp=False``
switches it off). The weight of two tokens falls with their row and column offsets: a 2-D locality bias inside a
linear attention. Cost O(N·C·d) (the 4d-wide features double the work of plain linear attention); no N×N matrix
is formed. The angles are recomputed from (H, W) for every input, so any grid works (as officially).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from timm.layers import register_notrace_function
from torch import nn

from .._registry import register_mixer
from ..padding import pad_nchw_to_multiple
from ._common import autocast_device, check_divisible, query_index, select_official

__all__ = [
    'VicinityAttention', 'abs_clamp', 'vicinity_angles', 'vicinity_features', 'vicinity_kv',
    'vicinity_linear_attention',    'vicinity_attention_weights', 'vicinity_attention_naive', 'vicinity_from_official',
]


def abs_clamp(t: torch.Tensor, low: float = 1e-4, high: float = 1e4) -> torch.Tensor:
    """``sign(t)·min(max(|t|, low), high)``: magnitudes kept in [low, high], signs kept, exact zeros stay zero."""
    return t.sign() * t.abs().clamp(low, high)


@register_notrace_function  # reason: the angle count is a Python int derived from the input shape
def vicinity_angles(H: int, W: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column angles ``(a, b)`` of the ``H·W`` row-major tokens, each ``(H·W,)``, float32 (as officially)."""
    rows = torch.arange(H, dtype=torch.float32, device=device)
    cols = torch.arange(W, dtype=torch.float32, device=device)
    a = (math.pi / 2) * rows / H
    b = (math.pi / 2) * cols / W
    return a.repeat_interleave(W), b.repeat(H)


def vicinity_features(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[t cos a, t sin a, t cos b, t sin b]`` for ``(B, heads, N, d)`` features and ``(N,)`` angles."""
    a, b = a[:, None].to(t.dtype), b[:, None].to(t.dtype)
    return torch.cat([t * torch.cos(a), t * torch.sin(a), t * torch.cos(b), t * torch.sin(b)], dim=-1)


def vicinity_kv(k: torch.Tensor, v: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """The ``(B, heads, 4d, d)`` state ``clamp±(Σ_m k̃_mᵀ v_m)``; rows in feature order (cos a, sin a, cos b, sin b)."""
    kv = k.transpose(-2, -1) @ v
    return abs_clamp(kv) if clamp else kv


def vicinity_linear_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-4, clamp: bool = True,
) -> torch.Tensor:
    """kv-first normalised linear attention on the 4d-wide vicinity features, with the official clamps."""
    kv = vicinity_kv(k, v, clamp)
    z = 1 / (q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1) + eps)  # B, heads, N, 1
    if clamp:
        return abs_clamp(abs_clamp(q @ kv) * abs_clamp(z))
    return (q @ kv) * z


def vicinity_attention_weights(
        q: torch.Tensor, k: torch.Tensor, a_q: torch.Tensor, b_q: torch.Tensor, a_k: torch.Tensor, b_k: torch.Tensor,
) -> torch.Tensor:
    """Un-normalised N×M weights ``(q_n·k_m)·[cos(a_n − a_m) + cos(b_n − b_m)]`` from the d-wide features."""
    a_q, b_q, a_k, b_k = a_q.to(q.dtype), b_q.to(q.dtype), a_k.to(q.dtype), b_k.to(q.dtype)
    vicinity = torch.cos(a_q[:, None] - a_k[None, :]) + torch.cos(b_q[:, None] - b_k[None, :])
    return (q @ k.transpose(-2, -1)) * vicinity


def vicinity_attention_naive(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a_q: torch.Tensor, b_q: torch.Tensor, a_k: torch.Tensor,
        b_k: torch.Tensor, eps: float = 1e-4,
) -> torch.Tensor:
    """qk-first reference without the clamps: the closed-form vicinity weights, row-normalised (+ eps), times V."""
    attn = vicinity_attention_weights(q, k, a_q, b_q, a_k, b_k)
    return attn @ v / (attn.sum(dim=-1, keepdim=True) + eps)


@register_mixer('vicinity', local=False)
class VicinityAttention(nn.Module):
    """VVT's vicinity attention over all tokens of a ``(B, H, W, C)`` map, with feature reduction and the FPC gate.

    Args:
        dim: Channels.
        num_heads: Heads; ``dim / fr_ratio`` must be divisible by it.
        window_size: Accepted for the shared signature and ignored (the attention is global).
        qkv_bias: Bias on the q/k/v projections (the official module always has them).
        attn_drop: Accepted for the shared signature; there are no attention weights to drop.
        proj_drop: Dropout on the output.
        fr_ratio: Feature reduction: q, k, v have ``dim / fr_ratio`` channels (2 in every model).
        sr_ratio: Spatial reduction of keys and values by an ``sr × sr`` strided conv + LayerNorm (1 in every model;
            the map is zero-padded bottom/right to a multiple of it first, so any grid works).
        se_reduction: Reduction of the gate's hidden layer (1 in every model).
        abs_clamp: Apply the official magnitude clamps (always on officially).
    """
    reference = staticmethod(vicinity_attention_naive)

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            window_size: int | None = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            fr_ratio: int = 2,
            sr_ratio: int = 1,
            se_reduction: int = 1,
            abs_clamp: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        check_divisible(dim, fr_ratio, 'dim', 'fr_ratio')
        check_divisible(dim // fr_ratio, num_heads, 'reduced width (dim / fr_ratio)', 'num_heads')
        check_divisible(dim, se_reduction, 'dim', 'se_reduction')
        if sr_ratio < 1:
            raise ValueError(f'sr_ratio must be a positive int, got {sr_ratio}')
        dd = {'device': device, 'dtype': dtype}
        inner = dim // fr_ratio
        self.num_heads = num_heads
        self.head_dim = inner // num_heads
        self.sr_ratio = sr_ratio
        self.abs_clamp = abs_clamp
        self.use_reference = False

        # registration order follows the official state_dict
        self.k_proj = nn.Linear(dim, inner, bias=qkv_bias, **dd)
        self.v_proj = nn.Linear(dim, inner, bias=qkv_bias, **dd)
        self.q_proj = nn.Linear(dim, inner, bias=qkv_bias, **dd)
        self.out_proj = nn.Linear(inner, dim, **dd)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio, **dd)
            self.norm = nn.LayerNorm(dim, **dd)
        else:
            self.sr = None
            self.norm = None
        self.se_fc = nn.Sequential(
            nn.Linear(dim, dim // se_reduction, bias=False, **dd),
            nn.ReLU(),
            nn.Linear(dim // se_reduction, dim, bias=False, **dd),
            nn.Sigmoid(),
        )
        self.q_probe = nn.Identity()
        self.k_probe = nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, head_dim={self.head_dim}, sr_ratio={self.sr_ratio}, '
                f'abs_clamp={self.abs_clamp}, use_reference={self.use_reference}')

    def _clamp(self, t: torch.Tensor) -> torch.Tensor:
        return abs_clamp(t) if self.abs_clamp else t

    def _attend(
            self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: list[int], hw_kv: list[int],
    ) -> torch.Tensor:
        if not torch.jit.is_scripting():
            device_type = autocast_device(q)
            if device_type:
                # the sums over all tokens reach 1e3–1e6 before the 1e4 cap: beyond float16
                with torch.autocast(device_type=device_type, enabled=False):
                    return self._attend_fp(q.float(), k.float(), v.float(), hw, hw_kv)
        return self._attend_fp(q, k, v, hw, hw_kv)

    def _attend_fp(
            self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw: list[int], hw_kv: list[int],
    ) -> torch.Tensor:
        a_q, b_q = vicinity_angles(hw[0], hw[1], q.device)
        a_k, b_k = vicinity_angles(hw_kv[0], hw_kv[1], q.device)
        if self.use_reference:
            return vicinity_attention_naive(q, k, v, a_q, b_q, a_k, b_k)
        q4 = vicinity_features(q, a_q, b_q)
        k4 = vicinity_features(k, a_k, b_k)
        return vicinity_linear_attention(q4, k4, v, clamp=self.abs_clamp)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        gate = self.se_fc(tokens.mean(dim=1)).unsqueeze(1)  # B, 1, C
        if self.sr is not None and self.norm is not None:
            x_kv = self.sr(pad_nchw_to_multiple(x.permute(0, 3, 1, 2), self.sr_ratio))
            hw_kv = [x_kv.shape[2], x_kv.shape[3]]
            x_kv = self.norm(x_kv.flatten(2).transpose(1, 2))
        else:
            x_kv = tokens
            hw_kv = [H, W]
        q = self.q_probe(self._heads(torch.relu(self.q_proj(tokens))))
        k = self.k_probe(self._heads(torch.relu(self.k_proj(x_kv))))
        v = self._heads(self.v_proj(x_kv))
        out = self._attend(q, k, v, [H, W], hw_kv).transpose(1, 2).reshape(B, H * W, -1)
        y = self._clamp(self.out_proj(out))
        y = self._clamp(y + y * gate)
        return self.proj_drop(y).reshape(B, H, W, C)

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """The vicinity rows ``(B, heads, Q, N)`` of the given flat query tokens (None: all N).

        :func:`vicinity_attention_weights` of the mixer's own ReLU q, k, each row divided by its sum + 1e-4, as
        :func:`vicinity_attention_naive` forms them: non-negative rows summing to one up to the 1e-4. The official
        magnitude clamps (``abs_clamp``) act on the kv state, on each query's numerator and on its normaliser, not
        on the rows: the output is ``rows @ v`` (then ``out_proj`` and the gate) exactly while those magnitudes stay
        in [1e-4, 1e4], and a clamped approximation of it beyond.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.

        Raises:
            NotImplementedError: With ``sr_ratio > 1`` the keys are strided-conv features of a reduced grid, not
                tokens of the input map, so the rows would not be over its N tokens.
        """
        if self.sr is not None:
            raise NotImplementedError(
                f'vicinity attention with sr_ratio={self.sr_ratio} attends to keys of a {self.sr_ratio}x reduced grid '
                f'(strided conv + LayerNorm), not to the H·W input tokens; no per-token rows are defined')
        B, H, W, C = x.shape
        N = H * W
        idx = query_index(queries, N, x.device)
        tokens = x.reshape(B, N, C)
        q = self._heads(torch.relu(self.q_proj(tokens[:, idx])))
        k = self._heads(torch.relu(self.k_proj(tokens)))
        a, b = vicinity_angles(H, W, x.device)
        attn = vicinity_attention_weights(q, k, a[idx], b[idx], a, b)
        return attn / (attn.sum(dim=-1, keepdim=True) + 1e-4)


def vicinity_from_official(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> dict[str, torch.Tensor]:
    """Map an official ``VicinityVisionAttention`` state dict onto :class:`VicinityAttention` (names unchanged).

    Args:
        state_dict: Module state dict, or a whole VVT state dict together with ``prefix``.
        prefix: E.g. ``'block1.0.attn.'``.
    """
    return select_official(state_dict, prefix, 'Vicinity')
