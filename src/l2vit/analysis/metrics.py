"""Concentration metrics of attention distributions: entropy, top-k mass and attention distance.

The functions here act on rows of attention weights ``(..., K)`` (one row per query, one column per key) and know
nothing about models. :func:`attention_statistics` applies them, chunk by chunk, to every query of a captured block,
so no ``N × N`` matrix is ever held in memory.

Conventions (see ``docs/analysis.md``):

* Rows are turned into probability distributions ``p = |w| / Σ|w|`` before entropy, top-k mass and distance are
  taken. For softmax and window attention this changes nothing; for L²ViT's linear attention it undoes the clamp of
  the normaliser (``max(Σ, 100)``), which scales a row without changing its shape. How much of a row the clamp
  removed is reported separately as ``row_mass`` (1 where the clamp is inactive). Some other mixers' rows are signed
  (InLine, RALA's RoPE, Castling's cosines, ViG's scans, ViTALiTy's Taylor term): their metrics describe where the
  *magnitude* of the mixing goes; ``row_mass`` is the signed sum and ``negative_mass`` the share of ``Σ|w|`` on
  negative weights.
* Entropy is normalised by ``log K``, where ``K`` counts the keys a query may attend to, so 1 means uniform and 0
  means all weight on one key. ``K`` differs between window (``window_size²``) and global (``H·W``) attention, so
  normalised entropies of the two kinds are not comparable; the raw entropy in nats is reported too.
* Distances are Euclidean, between token centres, in input pixels (token grid distance × the stage's stride).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .attention_maps import iter_attention_rows
from .capture import AttentionInput

__all__ = [
    'entropy', 'normalized_entropy', 'topk_mass', 'mean_distance', 'renormalize_rows', 'AttentionStats',
    'attention_statistics', 'DEFAULT_TOPK',
]

# 1 key, a 3×3 neighbourhood's worth of keys and a 7×7 window's worth of keys
DEFAULT_TOPK: tuple[int, ...] = (1, 9, 49)


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy ``-Σ p log p`` in nats along ``dim`` (``0 · log 0 = 0``)."""
    return -torch.special.xlogy(p, p).sum(dim)


def normalized_entropy(
        p: torch.Tensor,
        num_keys: int | torch.Tensor | None = None,
        dim: int = -1,
) -> torch.Tensor:
    """Entropy divided by ``log(num_keys)``: 1 for a uniform row over ``num_keys`` keys, 0 for a one-hot row.

    Args:
        p: Probability rows (each sums to 1 along ``dim``).
        num_keys: Keys a query may attend to (default: the size of ``dim``); a tensor gives one count per row.
            Rows with a single allowed key have entropy 0 by definition.
        dim: The key dimension.
    """
    h = entropy(p, dim)
    if num_keys is None:
        num_keys = p.shape[dim]
    log_n = torch.log(torch.as_tensor(num_keys, dtype=h.dtype, device=h.device))
    return torch.where(log_n > 0, h / log_n.clamp_min(1e-12), torch.zeros_like(h))


def topk_mass(p: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Total weight of the ``k`` largest entries along ``dim`` (all of them when ``k`` exceeds the row length)."""
    if k < 1:
        raise ValueError(f'k must be >= 1, got {k}')
    k = min(k, p.shape[dim])
    return p.topk(k, dim=dim).values.sum(dim)


def mean_distance(p: torch.Tensor, distances: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Expected query-key distance ``Σ_m p_m d_m`` of rows ``p`` under ``distances`` (broadcastable to ``p``)."""
    return (p * distances).sum(dim)


def renormalize_rows(rows: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probability view ``|w| / Σ|w|`` of attention rows (for non-negative rows: the rows divided by their sum).

    Returns:
        ``(p, mass, empty)``: the probability rows, the signed sums ``Σ w``, and a mask of rows with ``Σ|w| = 0``
        (e.g. a query whose ReLU-mapped vector is all zero attends to nothing; its ``p`` is left at 0 and it should
        be skipped).
    """
    magnitude = rows.abs()
    total = magnitude.sum(dim)
    empty = total <= 0
    p = magnitude / torch.where(empty, torch.ones_like(total), total).unsqueeze(dim)
    return p, rows.sum(dim), empty


@dataclass
class AttentionStats:
    """Per-head means over every (image, query) pair of one attention block.

    Attributes:
        entropy: Row entropy / log(keys), per head.
        entropy_nats: Row entropy in nats, per head.
        topk_mass: ``{k: per-head mean mass of the k largest weights}``.
        distance_px: Mean attention distance in input pixels, per head.
        uniform_distance_px: The same for a uniform row over the allowed keys (a reference for ``distance_px``).
        row_mass: Mean signed row sum before renormalisation (1 for softmax; less where a linear-attention clamp
            is active; other values for mixers whose rows do not sum to one), per head.
        negative_mass: Mean share of a row's ``Σ|w|`` on negative weights (0 unless the mixer's rows are signed).
        clamped_fraction: Fraction of rows whose normaliser was clamped (linear attention; else 0), per head.
        empty_fraction: Fraction of rows with no weight at all (skipped by the other metrics), per head.
        num_keys: Keys per query (``window_size²`` or ``H·W``).
        num_queries: (image, query) pairs averaged over.
    """
    entropy: list[float]
    entropy_nats: list[float]
    topk_mass: dict[int, list[float]]
    distance_px: list[float]
    uniform_distance_px: list[float]
    row_mass: list[float]
    negative_mass: list[float]
    clamped_fraction: list[float]
    empty_fraction: list[float]
    num_keys: int
    num_queries: int

    def to_dict(self) -> dict:
        """Plain JSON-able dict with per-head lists and their means."""
        def entry(values: list[float]) -> dict:
            return {'mean': float(sum(values) / len(values)), 'per_head': [float(v) for v in values]}
        return {
            'entropy': entry(self.entropy),
            'entropy_nats': entry(self.entropy_nats),
            **{f'top{k}_mass': entry(v) for k, v in self.topk_mass.items()},
            'distance_px': entry(self.distance_px),
            'uniform_distance_px': entry(self.uniform_distance_px),
            'row_mass': entry(self.row_mass),
            'negative_mass': entry(self.negative_mass),
            'clamped_fraction': entry(self.clamped_fraction),
            'empty_fraction': entry(self.empty_fraction),
            'num_keys': self.num_keys,
            'num_queries': self.num_queries,
        }


def attention_statistics(
        record: AttentionInput,
        topk: Sequence[int] = DEFAULT_TOPK,
        chunk_size: int = 256,
        max_queries: int | None = None,
) -> AttentionStats:
    """Concentration metrics of one captured block, over all its queries, computed in chunks of queries.

    Args:
        record: A block captured by :func:`~l2vit.analysis.capture_attention_inputs`.
        topk: Values of ``k`` for the top-k mass.
        chunk_size: Queries (global attention) or windows (window attention) per chunk; bounds memory at
            ``chunk_size × keys × heads × batch`` weights.
        max_queries: Use at most this many evenly spaced query tokens per image (global attention only;
            default: all).
    """
    if not topk or any(int(k) < 1 for k in topk):
        raise ValueError(f'topk must be a non-empty sequence of ints >= 1, got {topk}')
    heads = record.num_heads
    dev = record.tokens.device
    names = ('entropy', 'entropy_nats', 'distance_px', 'uniform_distance_px', 'row_mass', 'negative', 'clamped',
             'empty')
    sums = {name: torch.zeros(heads, dtype=torch.float64, device=dev) for name in names}
    topk_sums = {int(k): torch.zeros(heads, dtype=torch.float64, device=dev) for k in topk}
    rows_total = 0  # real (image, query) pairs; the same for every head
    kept_total = torch.zeros(heads, dtype=torch.float64, device=dev)  # of which non-empty, per head
    num_keys = 0

    def add(name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        sums[name] += torch.where(mask, values.expand_as(mask), 0.).sum(dim=(0, 2))  # per head

    for chunk in iter_attention_rows(record, chunk_size=chunk_size, max_queries=max_queries):
        rows = chunk.rows.double()  # G, heads, Q, K
        num_keys = rows.shape[-1]
        real = chunk.query_valid[:, None, :].expand(rows.shape[:3])  # G, heads, Q
        p, mass, empty = renormalize_rows(rows)
        keep = real & ~empty
        allowed = chunk.key_allowed.double()  # G or 1, K
        n_allowed = allowed.sum(-1)  # G or 1
        dist = chunk.distances_px.double()  # Q, K
        uniform = (dist[None] * allowed[:, None, :]).sum(-1) / n_allowed[:, None]  # G or 1, Q
        add('entropy', normalized_entropy(p, n_allowed[:, None, None]), keep)
        add('entropy_nats', entropy(p), keep)
        add('distance_px', mean_distance(p, dist), keep)
        add('uniform_distance_px', uniform[:, None, :], real)
        add('row_mass', mass, real)
        add('negative', (p * (rows < 0)).sum(-1), keep)
        add('empty', empty.double(), real)
        if chunk.clamped is not None:
            add('clamped', chunk.clamped.double(), real)
        for k in topk_sums:
            topk_sums[k] += torch.where(keep, topk_mass(p, k), 0.).sum(dim=(0, 2))
        rows_total += int(chunk.query_valid.sum())
        kept_total += keep.double().sum(dim=(0, 2))

    if rows_total == 0:
        raise ValueError(f'block {record.name} has no query tokens to measure')
    kept = kept_total.clamp_min(1)

    def mean(name: str, denom: torch.Tensor | float) -> list[float]:
        return (sums[name] / denom).tolist()

    return AttentionStats(
        entropy=mean('entropy', kept),
        entropy_nats=mean('entropy_nats', kept),
        topk_mass={k: (v / kept).tolist() for k, v in topk_sums.items()},
        distance_px=mean('distance_px', kept),
        uniform_distance_px=mean('uniform_distance_px', rows_total),
        row_mass=mean('row_mass', rows_total),
        negative_mass=mean('negative', kept),
        clamped_fraction=mean('clamped', rows_total),
        empty_fraction=mean('empty', rows_total),
        num_keys=num_keys,
        num_queries=rows_total,
    )
