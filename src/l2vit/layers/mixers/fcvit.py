"""FCViT's token mixer (global-context modulation + large depth-wise conv + bottleneck MLP, twice).

Ma et al., "A Close Look at Spatial Modeling: From Attention to Convolution", arXiv 2212.12552
(https://github.com/ma-xu/FCViT, commit 77e5a9d, class ``TokenMixer`` with ``GlobalContext``). The global context
of a map X, with its token mean μ split into 8 heads of d = C/8 channels:

    sim[m, n] = d^-1/2 · X_m[:, n] · μ_m,   ŝ = α_m · (sim − mean) / (std + 1e-5) + β_m   (z-score over all 8·N
    values of the sample, Bessel-corrected std),   G(X)[m·d + c, n] = ŝ[m, n] · g[m·d + c],
    g = W₂ max(u[:C/8], u[C/8:]) + b₂,  u = W₁ μ + b₁                                (the paper's "compete" form)

and the mixer ``X₁ = X + G₁(X);  Y₁ = GELU(MLP₁(DW₁(X₁)));  X₂ = Y₁ + G₂(Y₁);  Y₂ = GELU(MLP₂(DW₂(X₂)))``, with
11×11 depth-wise convs and ``MLP = 1×1 (C→max(C/8, 16)) → GELU → 1×1 (→C)``; no residual inside the mixer.
Attention is reduced to the rank-1 modulation G: cost O(N·C·(k² + C/8)), no N×N matrix. Nothing depends on the
grid size except through the statistics, so any grid works (as officially).

FCViT always uses 8 context heads, whatever the backbone's ``num_heads``; ``qkv_bias`` and ``attn_drop`` have no
counterpart and are ignored.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._registry import register_mixer
from ._common import autocast_device, check_divisible, query_index, select_official

__all__ = [
    'FCViTTokenMixer', 'GlobalContext', 'SpatialAttention', 'context_similarity', 'context_similarity_naive',
    'fcvit_from_official',
]


def context_similarity(x: torch.Tensor, heads: int, eps: float = 1e-5) -> torch.Tensor:
    """Z-scored per-head token similarity to the mean token, ``(B, heads, N)`` from ``(B, C, N)`` (before α, β)."""
    B, C, N = x.shape
    d = C // heads
    x = x.reshape(B, heads, d, N)
    sim = (x * x.mean(dim=-1, keepdim=True)).sum(dim=2) * d ** -0.5  # B, heads, N
    flat = sim.reshape(B, heads * N)
    mean = flat.mean(dim=-1, keepdim=True)
    std = flat.std(dim=-1, keepdim=True)  # Bessel-corrected, as officially
    return ((flat - mean) / (std + eps)).reshape(B, heads, N)


def context_similarity_naive(x: torch.Tensor, heads: int, eps: float = 1e-5) -> torch.Tensor:
    """Reference of :func:`context_similarity`: one head at a time, statistics written out from sums."""
    B, C, N = x.shape
    d = C // heads
    mu = x.mean(dim=-1)  # B, C
    sims = []
    for m in range(heads):
        xm = x[:, m * d:(m + 1) * d]  # B, d, N
        sims.append(torch.einsum('bcn,bc->bn', xm, mu[:, m * d:(m + 1) * d]) / d ** 0.5)
    sim = torch.stack(sims, dim=1)  # B, heads, N
    count = heads * N
    mean = sim.sum(dim=(1, 2), keepdim=True) / count
    var = ((sim - mean) ** 2).sum(dim=(1, 2), keepdim=True) / (count - 1)
    return (sim - mean) / (var.sqrt() + eps)


class GlobalContext(nn.Module):
    """FCViT's weighted global context: a rank-1 (per head) modulation ``ŝ ⊗ g`` of a ``(B, C, H, W)`` map.

    Args:
        dim: Channels; divisible by ``heads`` and by ``reduction``.
        heads: Context heads (8).
        reduction: The context MLP's hidden width is ``dim / reduction`` (8).
        compete: The paper's form, ``fc2(max(halves of fc1(μ)))``; False: ``fc.2(GELU(fc.0(μ)))``.
    """

    def __init__(self, dim: int, heads: int = 8, reduction: int = 8, compete: bool = True, device=None, dtype=None):
        super().__init__()
        check_divisible(dim, heads, 'dim', 'the context heads')
        check_divisible(dim, reduction, 'dim', 'gc_reduction')
        dd = {'device': device, 'dtype': dtype}
        self.heads = heads
        self.compete = compete
        self.use_reference = False
        hidden = dim // reduction
        self.rescale_weight = nn.Parameter(torch.ones(heads, **dd))
        self.rescale_bias = nn.Parameter(torch.zeros(heads, **dd))
        if compete:
            self.fc1 = nn.Linear(dim, 2 * hidden, **dd)
            self.fc2 = nn.Linear(hidden, dim, **dd)
            self.fc = None
        else:
            self.fc1 = None
            self.fc2 = None
            self.fc = nn.Sequential(nn.Linear(dim, hidden, **dd), nn.GELU(), nn.Linear(hidden, dim, **dd))

    def context_vector(self, mu: torch.Tensor) -> torch.Tensor:
        """The channel context ``g`` ``(B, C)`` from the token mean ``μ`` ``(B, C)``."""
        if self.fc1 is not None and self.fc2 is not None:
            u1, u2 = self.fc1(mu).chunk(2, dim=-1)
            return self.fc2(torch.maximum(u1, u2))
        assert self.fc is not None
        return self.fc(mu)

    def similarity(self, x: torch.Tensor) -> torch.Tensor:
        """``ŝ`` after the per-head affine, ``(B, heads, N)``, from ``(B, C, N)`` tokens."""
        sim = context_similarity_naive(x, self.heads) if self.use_reference else context_similarity(x, self.heads)
        return sim * self.rescale_weight[:, None] + self.rescale_bias[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            device_type = autocast_device(x)
            if device_type:
                # the z-score divides by (std + 1e-5); in half precision a small std loses the epsilon's meaning
                with torch.autocast(device_type=device_type, enabled=False):
                    return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = x.reshape(B, C, H * W)
        sim = self.similarity(tokens)  # B, heads, N
        g = self.context_vector(tokens.mean(dim=-1)).reshape(B, self.heads, C // self.heads, 1)
        return (sim.unsqueeze(2) * g).reshape(B, C, H, W)


class SpatialAttention(nn.Module):
    """FCViT's optional spatial gate ``x ⊙ σ(1×1(GELU(1×1(DW3×3(x)))))`` (official names ``spatial_att.{0,1,3}``)."""

    def __init__(self, dim: int, reduction: int = 8, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.spatial_att = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd),
            nn.Conv2d(dim, dim // reduction, 1, **dd),
            nn.GELU(),
            nn.Conv2d(dim // reduction, dim, 1, **dd),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.spatial_att(x)


@register_mixer('fcvit', local=False)
class FCViTTokenMixer(nn.Module):
    """FCViT's token mixer on a ``(B, H, W, C)`` map.

    Args:
        dim: Channels; divisible by ``gc_heads`` and ``gc_reduction``.
        num_heads: Ignored: FCViT's context always has ``gc_heads`` heads.
        window_size: Ignored.
        qkv_bias: Ignored (no q/k/v).
        attn_drop: Ignored (no attention weights).
        proj_drop: Dropout on the output.
        kernel_sizes: Sides of the two depth-wise convs ((11, 11) in every released model).
        gc_heads: Heads of the global context (8).
        gc_reduction: Hidden width of the context MLP is ``dim / gc_reduction`` (8).
        compete: The paper's competing context MLP (True in every released model).
        fc_factor: The bottleneck MLP's hidden width is ``max(dim / fc_factor, fc_min_value)``.
        fc_min_value: See ``fc_factor`` (16).
        spatial_att: Gate the output with FCViT's spatial attention (the module default, no released model).
    """
    reference = staticmethod(context_similarity_naive)
    __jit_unused_properties__ = ['use_reference']

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            *,
            window_size: int | None = None,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            kernel_sizes: tuple[int, int] = (11, 11),
            gc_heads: int = 8,
            gc_reduction: int = 8,
            compete: bool = True,
            fc_factor: int = 8,
            fc_min_value: int = 16,
            spatial_att: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if len(kernel_sizes) != 2 or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f'kernel_sizes must be two positive odd ints, got {kernel_sizes}')
        dd = {'device': device, 'dtype': dtype}
        hidden = max(dim // fc_factor, fc_min_value)
        self.kernel_sizes = tuple(kernel_sizes)

        # registration order follows the official state_dict
        self.gc1 = GlobalContext(dim, gc_heads, gc_reduction, compete, **dd)
        self.dw1 = nn.Conv2d(dim, dim, kernel_sizes[0], padding=kernel_sizes[0] // 2, groups=dim, **dd)
        self.fc1 = nn.Sequential(nn.Conv2d(dim, hidden, 1, **dd), nn.GELU(), nn.Conv2d(hidden, dim, 1, **dd))
        self.gc2 = GlobalContext(dim, gc_heads, gc_reduction, compete, **dd)
        self.dw2 = nn.Conv2d(dim, dim, kernel_sizes[1], padding=kernel_sizes[1] // 2, groups=dim, **dd)
        self.fc2 = nn.Sequential(nn.Conv2d(dim, hidden, 1, **dd), nn.GELU(), nn.Conv2d(hidden, dim, 1, **dd))
        self.spatial_att = SpatialAttention(dim, **dd) if spatial_att else None
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def use_reference(self) -> bool:
        return self.gc1.use_reference

    @use_reference.setter
    def use_reference(self, value: bool) -> None:
        self.gc1.use_reference = self.gc2.use_reference = bool(value)

    def extra_repr(self) -> str:
        return f'kernel_sizes={self.kernel_sizes}, spatial_att={self.spatial_att is not None}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = x + self.gc1(x)
        x = F.gelu(self.fc1(self.dw1(x)))
        x = x + self.gc2(x)
        x = F.gelu(self.fc2(self.dw2(x)))
        if self.spatial_att is not None:
            x = self.spatial_att(x)
        return self.proj_drop(x.permute(0, 2, 3, 1))

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """The token mixing of the first global context, ``(B, gc_heads, Q, N)`` rows of ``1/N``.

        The only step of the mixer that reads other tokens without a convolution is the global context, and it
        reads them through their mean: every query gets ``G_n = ŝ_n ⊙ g(Σ_m w_nm X_m)`` with ``w_nm = 1/N``, the
        per-query factor ŝ_n (a signed z-score) and the MLP g acting *after* the pooling. So the rows are uniform by
        construction, whatever the input: FCViT's global part does not concentrate; its locality is in the 11×11
        depth-wise convs, which the effective receptive field shows and rows over tokens cannot. The second context
        pools the (convolved) map the same way.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        B, H, W, C = x.shape
        N = H * W
        idx = query_index(queries, N, x.device)
        return x.new_full((B, self.gc1.heads, idx.numel(), N), 1. / N)


def fcvit_from_official(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> dict[str, torch.Tensor]:
    """Map an official FCViT ``TokenMixer`` state dict onto :class:`FCViTTokenMixer` (names and shapes unchanged).

    Args:
        state_dict: Module state dict, or a whole FCViT state dict together with ``prefix``.
        prefix: E.g. ``'network.0.1.token_mixer.'``.
    """
    return select_official(state_dict, prefix, 'FCViT')
