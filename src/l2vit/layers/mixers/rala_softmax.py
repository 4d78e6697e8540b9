"""The softmax mixer of RAVLT's late stages (``VanillaSelfAttention``): RALA's block with softmax attention.

Same parameters and wiring as :class:`RankAugmentedLinearAttention` (fused q/k/v/gate projection, 5×5 LePE on V,
output gate, 2-D RoPE), but no feature map and no key re-weighting:

    O = softmax_j(s · R(q_i)·R(k_j)) V,    out = proj((O + LePE(V)) ⊙ o)

The released RAVLT uses RALA in stages 1–2 and this mixer in stages 3–4; in the L²ViT backbone the same hybrid is
``block_pattern=[('window', 'rala')] * 2 + [('window', 'rala_softmax')] * 2``. Cost O(N²·C): it forms N×N weights
(through ``F.scaled_dot_product_attention`` when timm's fused attention is on). Not the same as the existing
``'softmax'`` mixer, which has neither RoPE, LePE nor the gate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn

from .._registry import register_mixer
from ._common import query_index
from ._naive import softmax_attention_naive
from ._rotary import apply_rotary
from .rala import RankAugmentedLinearAttention

__all__ = ['RALASoftmaxAttention']


@register_mixer('rala_softmax', local=False)
class RALASoftmaxAttention(RankAugmentedLinearAttention):
    """RAVLT's softmax attention with RoPE, LePE and the output gate on a ``(B, H, W, C)`` map.

    Arguments as :class:`RankAugmentedLinearAttention`; ``attn_drop`` drops attention weights here. Official
    state dicts load through :func:`rala_from_official`.
    """
    reference = staticmethod(softmax_attention_naive)

    def __init__(self, dim: int, num_heads: int, *, attn_drop: float = 0., **kwargs):
        super().__init__(dim, num_heads, attn_drop=attn_drop, **kwargs)
        self.attn_drop = float(attn_drop)
        self.fused_attn = use_fused_attn()

    def _attend(
            self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
    ) -> torch.Tensor:
        # softmax attention is at home in half precision: no float32 core here, unlike RALA's
        return self._attend_fp(q, k, v, sin.to(q.dtype), cos.to(q.dtype))

    def _attend_fp(
            self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
    ) -> torch.Tensor:
        q = self.q_probe(apply_rotary(q, sin, cos))
        k = self.k_probe(apply_rotary(k, sin, cos))
        drop = self.attn_drop if self.training else 0.
        if self.use_reference:
            return softmax_attention_naive(q, k, v, self.scale)
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return F.dropout(attn, drop, self.training) @ v

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``softmax(s · R(q_n)·R(k_m))`` ``(B, heads, Q, N)`` of the given flat query tokens (None: all N).

        Non-negative, summing to one. LePE on V and the output gate are not part of them: the output is
        ``proj((rows @ v + LePE(v)) ⊙ o)`` in eval mode (attention dropout is not applied).

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        N = x.shape[1] * x.shape[2]
        idx = query_index(queries, N, x.device)
        q, k, _, _ = self.qkvo(x).chunk(4, dim=-1)
        sin, cos = self._rotary_tables(x)
        q = apply_rotary(self._heads(q)[:, :, idx], sin[idx], cos[idx])
        k = apply_rotary(self._heads(k), sin, cos)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
