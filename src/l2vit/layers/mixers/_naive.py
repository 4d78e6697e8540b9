"""Plain, obviously-correct reference computations shared by the mixer parity tests.

Nothing here is used on the hot path. Each function forms the full attention matrix explicitly.
"""
from __future__ import annotations

import torch

__all__ = ['softmax_attention_naive']


def softmax_attention_naive(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` for ``(..., N, d)`` inputs.

    Args:
        q, k, v: Queries, keys, values with matching leading dimensions.
        scale: Multiplier on the logits (``d ** -0.5`` in every L²ViT mixer).
        key_mask: Optional boolean mask broadcastable to ``(..., 1, N)``; False keys get zero weight.
    """
    logits = (q * scale) @ k.transpose(-2, -1)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float('-inf'))
    return logits.softmax(dim=-1) @ v
