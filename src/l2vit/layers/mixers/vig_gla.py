"""ViG's bidirectional gated linear attention (the ``GLA2D`` mixer of ViG-H) as an L²ViT token mixer.

Liao et al., "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention", AAAI 2025
(https://github.com/hustvl/ViG, commit dfb9d32). With ``ℓ = DWConv3×3(x)`` (the "local" features), q, k, v and two
sets of per-token, per-key-channel decays ``α = exp(λ)``, ``λ = logsigmoid(γ) / 16``, both taken from ℓ:

    forward scan   S_t = diag(αᶠ_t) S_{t−1} + k_tᵀ v_t,    oᶠ_t = s · q_t S_t        (raster order, s = d_k^-1/2)
    backward scan  R_t = diag(αᵇ_t) R_{t+1} + k_tᵀ v_t,    oᵇ_t = s · q_t R_t
    o = (oᶠ + oᵇ) / 2,   y = RMSNorm(o) ⊙ g + RMSNorm(ℓ) ⊙ (1 − g),   g = σ(W_g ℓ),   out = W_o y

(per head, RMSNorm over the head's d_v channels with one weight shared by all heads). No normaliser, no feature
map, no positional parameter: any grid works as is.

The official inference kernel is a Triton recurrent scan (GPU only). Here the scan is computed *chunkwise* in plain
PyTorch (:func:`gated_linear_attention_chunked`, O(N·L·d) with chunk length L, plus an O((N/L)·d_k·d_v) recurrence
over chunks); :func:`gated_linear_attention_recurrent` is the token-by-token reference. Inside a chunk the decay
products are factorised around the chunk's middle token, so the float32 factors stay finite as long as every
per-token log decay λ is above −88/(L/2) (−5.5 at the default L = 32, i.e. gate logits above −88); ViG's /16 gate
normaliser keeps λ far from that.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import nn

from .._registry import register_mixer
from ._common import autocast_device, check_divisible, query_index, select_official

__all__ = [
    'BidirectionalGatedLinearAttention', 'gla_log_decay', 'gated_linear_attention_chunked',
    'gated_linear_attention_recurrent', 'bidirectional_gla', 'bidirectional_gla_recurrent', 'vig_gla_from_official',
]


def gla_log_decay(gate_logits: torch.Tensor, normalizer: float = 16.) -> torch.Tensor:
    """Per-token log decays ``λ = logsigmoid(γ) / normalizer`` (≤ 0)."""
    return F.logsigmoid(gate_logits) / normalizer


@register_notrace_function  # reason: chunk count and padding are Python ints derived from the input shape
def gated_linear_attention_chunked(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, chunk_size: int = 32,
) -> torch.Tensor:
    """Causal GLA ``o_t = Σ_{u≤t} Σ_i q_ti k_ui exp(Σ_{r=u+1..t} g_ri) v_u``, chunkwise.

    Args:
        q: Queries ``(B, heads, N, d_k)``, already scaled.
        k: Keys ``(B, heads, N, d_k)``.
        v: Values ``(B, heads, N, d_v)``.
        g: Log decays ``(B, heads, N, d_k)``, ≤ 0; the decay of step t acts on the state before token t is added.
        chunk_size: Chunk length L.
    """
    B, Hd, N, dk = q.shape
    dv = v.shape[-1]
    L = chunk_size
    pad = (L - N % L) % L
    if pad:  # trailing zero tokens with zero log decay change no earlier output of a causal scan
        q = F.pad(q, (0, 0, 0, pad))
        k = F.pad(k, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
        g = F.pad(g, (0, 0, 0, pad))
    nc = (N + pad) // L
    q = q.reshape(B, Hd, nc, L, dk)
    k = k.reshape(B, Hd, nc, L, dk)
    v = v.reshape(B, Hd, nc, L, dv)
    gc = g.reshape(B, Hd, nc, L, dk).cumsum(dim=-2)  # inclusive log decay from the chunk start

    # intra-chunk: exp(G_t − G_u) = exp(G_t − G_m) · exp(G_m − G_u) around the middle token m
    ref = gc[:, :, :, L // 2:L // 2 + 1]
    scores = (q * torch.exp(gc - ref)) @ (k * torch.exp(ref - gc)).transpose(-2, -1)  # B, heads, nc, L, L
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    out = scores.masked_fill(~causal, 0.) @ v

    # inter-chunk: the state at each chunk start, carried chunk by chunk (every exponent here is <= 0)
    g_last = gc[:, :, :, -1:]  # B, heads, nc, 1, dk
    q_in = q * torch.exp(gc)
    k_out = k * torch.exp(g_last - gc)
    state = torch.zeros(B, Hd, dk, dv, dtype=q.dtype, device=q.device)
    carried = []
    for c in range(nc):
        carried.append(q_in[:, :, c] @ state)
        state = state * torch.exp(g_last[:, :, c]).transpose(-2, -1) + k_out[:, :, c].transpose(-2, -1) @ v[:, :, c]
    out = out + torch.stack(carried, dim=2)
    return out.reshape(B, Hd, nc * L, dv)[:, :, :N]


def gated_linear_attention_recurrent(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference of :func:`gated_linear_attention_chunked` (the official kernel's recurrence)."""
    B, Hd, N, dk = q.shape
    state = torch.zeros(B, Hd, dk, v.shape[-1], dtype=q.dtype, device=q.device)
    outs = []
    for t in range(N):
        state = state * g[:, :, t].exp().unsqueeze(-1) + k[:, :, t].unsqueeze(-1) @ v[:, :, t].unsqueeze(-2)
        outs.append(q[:, :, t].unsqueeze(-2) @ state)
    return torch.cat(outs, dim=-2)


def bidirectional_gla(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor,
        chunk_size: int = 32,
) -> torch.Tensor:
    """``(oᶠ + oᵇ) / 2``: the backward scan is the forward scan of the reversed sequence with reversed decays."""
    fwd = gated_linear_attention_chunked(q, k, v, g_fwd, chunk_size)
    bwd = gated_linear_attention_chunked(q.flip(2), k.flip(2), v.flip(2), g_bwd.flip(2), chunk_size).flip(2)
    return (fwd + bwd) / 2


def bidirectional_gla_recurrent(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor,
        chunk_size: int = 32,
) -> torch.Tensor:
    """Reference of :func:`bidirectional_gla` with two explicit token-by-token scans (``chunk_size`` is unused)."""
    fwd = gated_linear_attention_recurrent(q, k, v, g_fwd)
    bwd = gated_linear_attention_recurrent(q.flip(2), k.flip(2), v.flip(2), g_bwd.flip(2)).flip(2)
    return (fwd + bwd) / 2


@register_mixer('vig_gla', local=False)
class BidirectionalGatedLinearAttention(nn.Module):
    """ViG's ``GLA2D``: local 3×3 conv, bidirectional gated linear attention and a 2-D locality gate.

    Args:
        dim: Channels (= the value width: ViG's ``expand_v`` is 1, which its locality gate requires).
        num_heads: Heads; ``dim * expand_k`` must be divisible by it.
        window_size: Accepted for the shared signature and ignored (the scans cover all tokens).
        qkv_bias: Accepted for the shared signature and ignored: ViG's projections have no bias.
        attn_drop: Accepted for the shared signature; there are no attention weights to drop.
        proj_drop: Dropout after the output projection.
        expand_k: Key width as a fraction of ``dim`` (0.5 in every paper model).
        gate_low_rank_dim: Bottleneck of the decay projection (16).
        gate_logit_normalizer: Divisor of the log decays (16).
        norm_eps: RMSNorm epsilon (1e-6 in the paper models).
        use_act_in_conv: SiLU after the 3×3 conv (plain ViG-T only).
        use_out_act: SiLU before the output projection (plain ViG-T only).
        halve_in_eval: Reproduce the plain-ViG module's extra halving of the attention output in eval mode (an
            official train/eval mismatch; ``GLA2D``, the hierarchical mixer, does not have it).
        chunk_size: Chunk length of the chunkwise scan.
    """
    reference = staticmethod(bidirectional_gla_recurrent)

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            window_size: int | None = None,
            qkv_bias: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            expand_k: float = 0.5,
            gate_low_rank_dim: int = 16,
            gate_logit_normalizer: float = 16.,
            norm_eps: float = 1e-6,
            use_act_in_conv: bool = False,
            use_out_act: bool = False,
            halve_in_eval: bool = False,
            chunk_size: int = 32,
            device=None,
            dtype=None,
    ):
        super().__init__()
        key_dim = int(dim * expand_k)
        check_divisible(dim, num_heads, 'dim', 'num_heads')
        check_divisible(key_dim, num_heads, 'key width (dim * expand_k)', 'num_heads')
        if chunk_size < 1:
            raise ValueError(f'chunk_size must be a positive int, got {chunk_size}')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.head_k_dim = key_dim // num_heads
        self.head_v_dim = dim // num_heads
        self.scale = self.head_k_dim ** -0.5
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.use_out_act = use_out_act
        self.halve_in_eval = halve_in_eval
        self.chunk_size = chunk_size
        self.use_reference = False

        # registration order follows the official state_dict
        conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False, **dd)
        self.in_proj = nn.Sequential(conv, nn.SiLU()) if use_act_in_conv else nn.Sequential(conv)
        self.qkv_proj = nn.Linear(dim, 2 * key_dim + dim, bias=False, **dd)
        self.gk_proj = nn.Sequential(
            nn.Linear(dim, gate_low_rank_dim, bias=False, **dd),
            nn.Linear(gate_low_rank_dim, 2 * key_dim, bias=True, **dd),
        )
        self.o_proj = nn.Linear(dim, dim, bias=False, **dd)
        self.g_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps, **dd)
        self.l_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps, **dd)
        self.g_proj = nn.Linear(dim, dim, bias=True, **dd)
        self.q_probe = nn.Identity()
        self.k_probe = nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, head_k_dim={self.head_k_dim}, head_v_dim={self.head_v_dim}, '
                f'chunk_size={self.chunk_size}, use_reference={self.use_reference}')

    def _mix(self, local: torch.Tensor, qkv: torch.Tensor, gk: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            device_type = autocast_device(qkv)
            if device_type:
                # decays are exponentials of cumulative sums and RMSNorm meets eps = 1e-6: keep them in float32
                with torch.autocast(device_type=device_type, enabled=False):
                    return self._mix_fp(local.float(), qkv.float(), gk.float(), gate.float())
        return self._mix_fp(local, qkv, gk, gate)

    def _mix_fp(self, local: torch.Tensor, qkv: torch.Tensor, gk: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        B, N, C = local.shape
        hk, hv = self.head_k_dim, self.head_v_dim
        q, k, v = qkv.split([self.key_dim, self.key_dim, C], dim=-1)
        q = self.q_probe(q.reshape(B, N, self.num_heads, hk).transpose(1, 2))
        k = self.k_probe(k.reshape(B, N, self.num_heads, hk).transpose(1, 2))
        v = v.reshape(B, N, self.num_heads, hv).transpose(1, 2)
        g_fwd, g_bwd = gla_log_decay(gk, self.gate_logit_normalizer).split([self.key_dim, self.key_dim], dim=-1)
        g_fwd = g_fwd.reshape(B, N, self.num_heads, hk).transpose(1, 2)
        g_bwd = g_bwd.reshape(B, N, self.num_heads, hk).transpose(1, 2)
        if self.use_reference:
            o = bidirectional_gla_recurrent(q * self.scale, k, v, g_fwd, g_bwd)
        else:
            o = bidirectional_gla(q * self.scale, k, v, g_fwd, g_bwd, self.chunk_size)
        if self.halve_in_eval and not self.training:
            o = o / 2
        o = o.transpose(1, 2)  # B, N, heads, d_v
        gate = gate.reshape(B, N, self.num_heads, hv)
        y = self.g_norm(o) * gate + self.l_norm(local.reshape(B, N, self.num_heads, hv)) * (1 - gate)
        return y.reshape(B, N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        local = self.in_proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, H * W, C)
        gate = torch.sigmoid(self.g_proj(local))
        y = self._mix(local, self.qkv_proj(local), self.gk_proj(local), gate)
        if self.use_out_act:
            y = F.silu(y)
        return self.proj_drop(self.o_proj(y)).reshape(B, H, W, C)

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """The decayed two-directional rows ``(B, heads, Q, N)`` of the given flat query tokens (None: all N).

        With inclusive cumulative log decays ``F_t = Σ_{r≤t} λᶠ_r`` and exclusive ones ``E_t = Σ_{r<t} λᵇ_r``:

            w_tu = ½ · s · Σ_i q_ti k_ui · ([u ≤ t]·exp(F_ti − F_ui) + [u ≥ t]·exp(E_ui − E_ti))

        (halved again in eval mode with ``halve_in_eval``), so that ``o = w v`` per head is the mean of the two
        scans (the token itself is in both). Rows are signed (q and k have no feature map) and have no normaliser.
        The 3×3 conv that q, k, v, the decays and the gate are computed from, the RMSNorm of o (a positive per-row
        factor and a per-channel weight) and the gated local path are not part of them: the output is
        ``o_proj(RMSNorm(w v) ⊙ g + RMSNorm(ℓ) ⊙ (1 − g))``. One ``Q × N`` slice per key channel is formed at a
        time.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        B, H, W, C = x.shape
        N = H * W
        idx = query_index(queries, N, x.device)
        hk = self.head_k_dim
        local = self.in_proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, N, C)
        q, k, _ = self.qkv_proj(local).split([self.key_dim, self.key_dim, C], dim=-1)
        q = q[:, idx].reshape(B, -1, self.num_heads, hk).transpose(1, 2) * self.scale  # B, heads, Q, hk
        k = k.reshape(B, N, self.num_heads, hk).transpose(1, 2)
        g_fwd, g_bwd = gla_log_decay(self.gk_proj(local), self.gate_logit_normalizer).split(
            [self.key_dim, self.key_dim], dim=-1)
        cum_fwd = g_fwd.reshape(B, N, self.num_heads, hk).transpose(1, 2).cumsum(dim=2)  # F, inclusive
        g_bwd = g_bwd.reshape(B, N, self.num_heads, hk).transpose(1, 2)
        cum_bwd = g_bwd.cumsum(dim=2) - g_bwd  # E, exclusive
        keys = torch.arange(N, device=x.device)
        before = keys[None, :] <= idx[:, None]  # Q, N: keys the forward scan has seen
        after = keys[None, :] >= idx[:, None]
        weights = q.new_zeros(B, self.num_heads, idx.numel(), N)
        for i in range(hk):
            # exponents are <= 0 where the mask keeps them; the clamp keeps the discarded ones finite
            fwd = (cum_fwd[:, :, idx, i, None] - cum_fwd[:, :, None, :, i]).clamp(max=0.).exp()
            bwd = (cum_bwd[:, :, None, :, i] - cum_bwd[:, :, idx, i, None]).clamp(max=0.).exp()
            decay = torch.where(before, fwd, 0.) + torch.where(after, bwd, 0.)
            weights += q[:, :, :, i, None] * k[:, :, None, :, i] * decay
        weights = weights / 2
        if self.halve_in_eval and not self.training:
            weights = weights / 2
        return weights


def vig_gla_from_official(state_dict: Mapping[str, torch.Tensor], prefix: str = '') -> dict[str, torch.Tensor]:
    """Map an official ViG ``GLA2D`` / ``GatedLinearAttention`` state dict onto the ``vig_gla`` mixer.

    The names are the official ones (``in_proj.0``, ``qkv_proj``, ``gk_proj.{0,1}``, ``o_proj``, ``g_norm``,
    ``l_norm``, ``g_proj``), so this only selects and checks. ``GLA2D``'s channel-first 1×1 layers store
    ``nn.Linear`` weights already. Build plain-ViG-T mixers with ``use_act_in_conv=True, use_out_act=True,
    halve_in_eval=True``.

    Args:
        state_dict: Module state dict, or a whole model state dict together with ``prefix``.
        prefix: E.g. ``'layers.0.blocks.1.op.'`` (ViG-H) or ``'blocks.3.attn.'`` (plain ViG).
    """
    sd = select_official(state_dict, prefix, 'ViG GLA')
    extra = sorted(k for k in sd if k.startswith(('rotary', 'dirpe', 'out_gate')))
    if extra:
        raise ValueError(f'the official module uses options this mixer does not implement (rope / dirpe / out gate): '
                         f'{extra}')
    return sd
