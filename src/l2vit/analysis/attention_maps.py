"""Attention weights of a captured block, recomputed from its input tokens and its own ``qkv`` weights.

* LWA (``'window'``): ``softmax(q kᵀ · scale)`` inside each ``window_size²`` window. The tokens are zero-padded at the
  bottom/right to a multiple of the window exactly as the mixer does, so padded positions act as keys (their k is
  the qkv bias) unless the mixer masks them (``mask_padding``). Maps are placed back on the image's token grid.
* LGA (``'linear'``): the query-key-first form of L²ViT's linear attention (spec §4),
  ``A_nm = φ(q_n)·φ(k_m) / max(Σ_m' φ(q_n)·φ(k_m'), clamp_min)`` with the mixer's ``clamp_min``. φ(q), φ(k) are
  those the mixer exposed at its ``q_probe`` / ``k_probe`` hooks during capture, else ReLU of the recomputed q, k.
  ``τ · A V`` through ``proj`` is the mixer's output; the per-head temperature τ does not change a row's shape.
* Global softmax (``'softmax'``): ``softmax(q kᵀ · scale)`` over all tokens.
* Any other mixer (``'flatten'``, ``'inline'``, ``'masa'``, ...): its own ``attention_weights(tokens, queries)``,
  the rows of the token mixing it applies to its values (computed in eval mode). Some are signed or do not sum to
  one (see :data:`ROW_SEMANTICS`); the metrics read every row as ``|w| / Σ|w|``.

Global maps are only ever formed for a chunk of queries at a time (:func:`iter_attention_rows`) or for chosen query
tokens (:func:`attention_maps`); nothing here materialises all ``N × N`` weights of a large image.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.padding import pad_nhwc_to_multiple
from .capture import SUPPORTED_MIXERS, AttentionInput, eval_mode

__all__ = [
    'RowChunk', 'project_qkv', 'linear_attention_rows', 'softmax_attention_rows', 'global_attention_rows',
    'mixer_attention_rows', 'window_attention_weights', 'iter_attention_rows', 'attention_maps', 'token_centers',
    'pairwise_distances', 'ROW_SEMANTICS', 'ROW_METRICS_RULE', 'row_semantics',
]

# What a row of each mixer's weights is; reported per block in the analysis JSON. Excluded branches are those whose
# mixing is not one row over tokens per head (per-channel convolutions, output gates, normalisations).
ROW_SEMANTICS: dict[str, str] = {
    'window': 'softmax inside the window: non-negative, sums to 1',
    'softmax': 'softmax over all tokens: non-negative, sums to 1',
    'linear': 'qk-first A = φ(q)φ(k)ᵀ / max(Σ, clamp_min) without the output temperature (with '
              "temperature='key' the keys carry τ): non-negative, sums to 1, less where the clamp acts",
    'castling': '½·[n = m] + (1/π)·cos(q_n, k_m): signed, does not sum to 1; the L2 normalisation of u and the '
                'depth-wise conv on V are not included',
    'castling_sparse': '½·[n = m] + (1/π)·cos(q_n, k_m) + thresholded softmax: signed, does not sum to 1; the L2 '
                       'normalisation of u and the depth-wise conv on V are not included',
    'fcvit': 'uniform 1/N: the global context pools all tokens through their mean (the per-query z-score scales '
             'the pooled context after its MLP); the depth-wise convs are not included',
    'flatten': 'focused linear attention φ(q)φ(k)ᵀ / (N·(φ(q)·k̄ + eps)): non-negative, sums to 1 up to eps; the '
               'depth-wise conv on V is not included',
    'inline': 'injective weights (s·q·k − s·q·k̄ + 1) / N: signed, sums to 1; the dynamic 3x3 residual is not '
              'included',
    'rala': 'R(φ(q))·R(k′) / (N·(φ(q)·k̄′ + eps)): signed (RoPE), need not sum to 1; LePE and the output gate are '
            'not included',
    'rala_softmax': 'softmax of RoPE-rotated q·k: non-negative, sums to 1; LePE and the output gate are not included',
    'masa': 'softmax with the Manhattan decay bias: non-negative, sums to 1; LePE is not included',
    'masa_decomposed': 'column softmax × row softmax of the two 1-D passes: non-negative, sums to 1; LePE is not '
                       'included',
    'vicinity': 'vicinity-weighted ReLU linear attention, divided by Σ + eps: non-negative, sums to 1 up to eps '
                '(exact while the official magnitude clamps are inactive)',
    'vig_gla': 'half the forward plus half the backward decayed scan, s·q·k·γ^Δ: signed, no normaliser; the '
               'per-row RMSNorm, gate and local path are not included',
    'vitality': 's·(q·k̂ + thresholded softmax of quantised q, k): signed, does not sum to 1',
}
# How the metrics read any row (stated once in the report settings).
ROW_METRICS_RULE = ('metrics use p = |w| / Σ|w| per row (for non-negative rows the plain renormalisation); '
                    'row_mass is the signed Σ w before it, negative_mass the share of Σ|w| on negative weights; '
                    'rows with Σ|w| = 0 are empty and skipped')


def row_semantics(kind: str) -> str:
    """What a row of mixer ``kind``'s attention weights is (sign, sum, branches left out)."""
    return ROW_SEMANTICS.get(kind, 'rows of the mixer\'s attention_weights (sign and sum not documented here)')


@dataclass
class RowChunk:
    """A chunk of attention rows with what the metrics need to read them.

    Attributes:
        rows: Weights ``(G, heads, Q, K)`` as the model defines them (linear attention: the clamped ``A``; other
            mixers: their ``attention_weights``, possibly signed). ``G`` is the batch for global attention and
            ``batch × windows`` for window attention.
        query_valid: ``(G, Q)``, True for queries that are real tokens (not window padding).
        key_allowed: ``(G or 1, K)``, True for keys a query may attend to (False: masked padding).
        distances_px: ``(Q, K)`` query-key distances in input pixels.
        clamped: ``(G, heads, Q)``, True where a linear-attention normaliser was clamped; None for other mixers.
    """
    rows: torch.Tensor
    query_valid: torch.Tensor
    key_allowed: torch.Tensor
    distances_px: torch.Tensor
    clamped: torch.Tensor | None = None


def token_centers(height: int, width: int, stride: float, device: torch.device | None = None) -> torch.Tensor:
    """Input-pixel centres ``(height·width, 2)`` (y, x) of a row-major token grid with the given stride."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1).reshape(-1, 2)


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(len(a), len(b))`` between two sets of (y, x) points."""
    return (a[:, None, :] - b[None, :, :]).square().sum(-1).sqrt()


def project_qkv(attn: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mixer's own queries, keys and values for ``tokens`` ``(B, ..., C)``: each ``(B, heads, N, head_dim)``."""
    B, C = tokens.shape[0], tokens.shape[-1]
    heads = int(attn.num_heads)
    x = tokens.reshape(B, -1, C)
    qkv = attn.qkv(x).reshape(B, x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return q, k, v


def _scale(attn: nn.Module, head_dim: int) -> float:
    return float(getattr(attn, 'scale', head_dim ** -0.5))


def linear_attention_rows(
        q_phi: torch.Tensor,
        k_phi: torch.Tensor,
        clamp_min: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-key-first linear attention ``A = φ(q)φ(k)ᵀ / max(rowsum, clamp_min)`` on feature-mapped inputs.

    Args:
        q_phi: Feature-mapped queries ``(..., Q, d)``.
        k_phi: Feature-mapped keys ``(..., K, d)``.
        clamp_min: Lower bound on each row's normaliser.

    Returns:
        ``(A, clamped)``: weights ``(..., Q, K)`` and a ``(..., Q)`` mask of rows whose normaliser was clamped.
    """
    scores = q_phi @ k_phi.transpose(-2, -1)
    denom = scores.sum(-1, keepdim=True)
    return scores / denom.clamp(min=clamp_min), denom.squeeze(-1) < clamp_min


def softmax_attention_rows(
        q: torch.Tensor,
        k: torch.Tensor,
        scale: float,
        key_allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale)`` rows ``(..., Q, K)``; keys where ``key_allowed`` is False get zero weight."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if key_allowed is not None:
        logits = logits.masked_fill(~key_allowed, float('-inf'))
    return logits.softmax(dim=-1)


def _queries_keys(record: AttentionInput) -> tuple[torch.Tensor, torch.Tensor]:
    """What a global block's rows are made of: φ(q), φ(k) for linear attention (the probes' values when captured,
    else ReLU of the recomputed q, k, the keys times τ where the mixer puts τ on them), plain q, k for softmax."""
    if record.kind == 'linear' and record.q_phi is not None and record.k_phi is not None:
        return record.q_phi, record.k_phi
    q, k, _ = project_qkv(record.module, record.tokens)
    if record.kind == 'linear':
        k = torch.relu(k)
        if getattr(record.module, 'temperature_placement', 'output') == 'key':
            k = k * record.module.temperature.to(k.dtype)
        return torch.relu(q), k
    return q, k


def mixer_attention_rows(
        record: AttentionInput,
        query_index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Rows ``(B, heads, Q, N)`` from the mixer's own ``attention_weights`` (in eval mode), for any global mixer."""
    fn = getattr(record.module, 'attention_weights', None)
    if not callable(fn):
        raise ValueError(f'{record.name}: mixer {record.kind!r} has no attention_weights method')
    dev = record.tokens.device
    idx = None if query_index is None else torch.as_tensor(query_index, device=dev, dtype=torch.long).reshape(-1)
    with eval_mode(record.module):
        return fn(record.tokens, idx)


def _global_rows(record: AttentionInput, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if record.kind == 'linear':
        return linear_attention_rows(q, k, float(record.module.clamp_min))
    if record.kind == 'softmax':
        return softmax_attention_rows(q, k, _scale(record.module, q.shape[-1])), None
    raise ValueError(f'{record.name}: no global attention rows for mixer {record.kind!r}')


def global_attention_rows(
        record: AttentionInput,
        query_index: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Rows ``(B, heads, Q, N)`` of a global block's attention for the given flat query indices (default: all)."""
    if record.kind not in SUPPORTED_MIXERS:
        return mixer_attention_rows(record, query_index)
    q, k = _queries_keys(record)
    if query_index is not None:
        q = q[:, :, torch.as_tensor(query_index, device=q.device, dtype=torch.long)]
    return _global_rows(record, q, k)[0]


def _partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` → ``(B · nWin, ws², C)``, windows in row-major order, tokens row-major inside."""
    B, Hp, Wp, C = x.shape
    x = x.reshape(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def _window_valid(record: AttentionInput) -> torch.Tensor:
    """``(B · nWin, ws²)``: True for real tokens, False for padding."""
    H, W = record.grid_size
    ws = int(record.module.window_size)
    valid = pad_nhwc_to_multiple(torch.ones(1, H, W, 1, device=record.tokens.device), ws) > 0
    return _partition(valid, ws)[..., 0].repeat(record.tokens.shape[0], 1)


def window_attention_weights(
        record: AttentionInput,
        window_index: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax weights of the LWA windows of a captured block.

    Args:
        record: A captured ``'window'`` block.
        window_index: Which of the ``B · nWin`` windows (default: all).

    Returns:
        ``(weights, query_valid, key_allowed)``: ``(G, heads, ws², ws²)``, ``(G, ws²)``, ``(G, ws²)``.
    """
    if record.kind != 'window':
        raise ValueError(f'{record.name} is a {record.kind!r} block, not window attention')
    attn = record.module
    ws = int(attn.window_size)
    windows = _partition(pad_nhwc_to_multiple(record.tokens, ws), ws)
    valid = _window_valid(record)
    if window_index is not None:
        windows, valid = windows[window_index], valid[window_index]
    q, k, _ = project_qkv(attn, windows)
    allowed = valid if getattr(attn, 'mask_padding', False) else torch.ones_like(valid)
    weights = softmax_attention_rows(q, k, _scale(attn, q.shape[-1]), allowed[:, None, None, :])
    return weights, valid, allowed


def _even_subset(n: int, max_count: int | None, device: torch.device) -> torch.Tensor:
    if max_count is None or max_count >= n:
        return torch.arange(n, device=device)
    if max_count < 1:
        raise ValueError(f'max_queries must be >= 1, got {max_count}')
    return torch.linspace(0, n - 1, max_count, device=device).round().long().unique()


def iter_attention_rows(
        record: AttentionInput,
        chunk_size: int = 256,
        max_queries: int | None = None,
) -> Iterator[RowChunk]:
    """Yield the attention rows of every query of a captured block, a chunk at a time.

    Args:
        record: A captured block.
        chunk_size: Queries per chunk (global attention) or windows per chunk (window attention).
        max_queries: Global attention only: at most this many evenly spaced query tokens per image.
    """
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    dev = record.tokens.device
    if record.kind == 'window':
        ws = int(record.module.window_size)
        local = token_centers(ws, ws, record.stride, device=dev)
        dist = pairwise_distances(local, local)  # the same geometry in every window
        total = _window_valid(record).shape[0]
        for start in range(0, total, chunk_size):
            weights, valid, allowed = window_attention_weights(record, slice(start, start + chunk_size))
            yield RowChunk(weights, valid, allowed, dist)
        return

    H, W = record.grid_size
    B = record.tokens.shape[0]
    exact = record.kind in SUPPORTED_MIXERS
    if exact:
        q, k = _queries_keys(record)
    centers = token_centers(H, W, record.stride, device=dev)
    index = _even_subset(H * W, max_queries, dev)
    allowed = torch.ones(1, H * W, dtype=torch.bool, device=dev)
    for start in range(0, index.numel(), chunk_size):
        idx = index[start:start + chunk_size]
        if exact:
            rows, clamped = _global_rows(record, q[:, :, idx], k)
        else:
            rows, clamped = mixer_attention_rows(record, idx), None
        valid = torch.ones(B, idx.numel(), dtype=torch.bool, device=dev)
        yield RowChunk(rows, valid, allowed, pairwise_distances(centers[idx], centers), clamped)


def attention_maps(record: AttentionInput, tokens: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Attention of chosen query tokens, on the block's token grid.

    Args:
        record: A captured block.
        tokens: Query tokens ``(row, col)`` on the block's grid (see :func:`~l2vit.analysis.query_tokens`).

    Returns:
        ``(B, heads, Q, H, W)``: weight of each key token for each query, as the model defines it (linear
        attention: the clamped ``A``). Window maps are zero outside the query's window; weight that window
        attention puts on padded positions lies outside the grid and is not shown.
    """
    H, W = record.grid_size
    B = record.tokens.shape[0]
    for r, c in tokens:
        if not (0 <= r < H and 0 <= c < W):
            raise ValueError(f'query token {(r, c)} lies outside the {H}x{W} token grid of {record.name}')
    if record.is_global:
        flat = [r * W + c for r, c in tokens]
        return global_attention_rows(record, flat).reshape(B, record.num_heads, len(tokens), H, W)

    ws = int(record.module.window_size)
    padded = pad_nhwc_to_multiple(record.tokens, ws)
    Hp, Wp = padded.shape[1:3]
    valid = pad_nhwc_to_multiple(torch.ones(1, H, W, 1, device=padded.device), ws)[..., 0].reshape(1, -1) > 0
    out = padded.new_zeros(B, record.num_heads, len(tokens), Hp, Wp)
    for i, (r, c) in enumerate(tokens):
        r0, c0 = r // ws * ws, c // ws * ws
        window = padded[:, r0:r0 + ws, c0:c0 + ws]
        q, k, _ = project_qkv(record.module, window)
        q = q[:, :, (r - r0) * ws + (c - c0)][:, :, None]  # B, heads, 1, d
        allowed = valid.reshape(Hp, Wp)[r0:r0 + ws, c0:c0 + ws].reshape(1, 1, 1, -1)
        if not getattr(record.module, 'mask_padding', False):
            allowed = torch.ones_like(allowed)
        weights = softmax_attention_rows(q, k, _scale(record.module, q.shape[-1]), allowed)
        out[:, :, i, r0:r0 + ws, c0:c0 + ws] = weights.reshape(B, record.num_heads, ws, ws)
    return out[..., :H, :W]
