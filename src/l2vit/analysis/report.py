"""The whole analysis of one or more models on a set of images, and its report: figures, JSON and tensors.

For an experiment script the entry points are::

    from l2vit.analysis import analyze, analyze_model, write_report
    source = analyze_model(model, images, erf=True)   # one model
    print(source.summary())                           # flat {'global/entropy': ..., 'erf/with_lcm/...': ...}
    result = analyze({'softmax': m0, 'linear': m1, 'L²ViT': m2}, images)
    write_report(result, 'out/analysis', images)       # PNGs + analysis.json + analysis_tensors.safetensors
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .._io import atomic_write_bytes
from ..version import __version__
from .attention_maps import ROW_METRICS_RULE, attention_maps, pairwise_distances, row_semantics, token_centers
from .capture import (
    AttentionInput,
    attention_blocks,
    block_label,
    block_stage,
    capture_attention_inputs,
    capture_module_inputs,
    query_tokens,
    token_stride,
)
from .erf import DEFAULT_ERF_FRACTIONS, block_erf, erf_statistics
from .images import ImageBatch
from .metrics import DEFAULT_TOPK, AttentionStats, attention_statistics, normalized_entropy, renormalize_rows

__all__ = [
    'BlockResult', 'ErfResult', 'SourceResult', 'AnalysisResult', 'analyze_model', 'analyze', 'write_report',
    'DEFAULT_QUERY_POINTS',
]

# centre, upper left, lower right (image fractions, y then x)
DEFAULT_QUERY_POINTS: tuple[tuple[float, float], ...] = ((0.5, 0.5), (0.25, 0.25), (0.75, 0.7))
_CONDITION_TITLES = {'with_lcm': 'with LCM', 'without_lcm': 'LCM removed', 'block': 'block (no LCM)'}


@dataclass
class BlockResult:
    """Metrics and query-point maps of one attention block of one model.

    Attributes:
        name: Block name (``'stages.1.blocks.1'``).
        label: Short label (``'s1.b1 linear+LCM'``).
        kind: Mixer name (``'window'``, ``'linear'``, ``'softmax'``, ``'flatten'``, ...).
        has_lcm: The block has a Local Concentration Module.
        grid: Token grid ``(H, W)``.
        stride: Input pixels per token.
        heads: Attention heads.
        stats: Metrics over all queries (:class:`AttentionStats`).
        query_tokens: Token ``(row, col)`` of each query point.
        maps: ``(B, heads, Q, H, W)`` maps of the query points (CPU, float32).
        query_metrics: Global blocks: per query point, the metrics of its exact row (per image and head).
        row_semantics: What a row of this mixer's weights is (sign, sum, branches left out).
    """
    name: str
    label: str
    kind: str
    has_lcm: bool
    grid: tuple[int, int]
    stride: int
    heads: int
    stats: AttentionStats
    query_tokens: list[tuple[int, int]]
    maps: torch.Tensor
    query_metrics: list[dict[str, Any]] = field(default_factory=list)
    row_semantics: str = ''

    @property
    def is_global(self) -> bool:
        return self.kind != 'window'

    def to_dict(self) -> dict[str, Any]:
        return {
            'name': self.name, 'label': self.label, 'mixer': self.kind, 'lcm': self.has_lcm,
            'grid': list(self.grid), 'stride': self.stride, 'heads': self.heads,
            'metrics': self.stats.to_dict(),
            'query_tokens': [list(t) for t in self.query_tokens],
            'query_metrics': self.query_metrics,
            'row_semantics': self.row_semantics,
        }


@dataclass
class ErfResult:
    """Effective receptive field of one global block (any mixer), with and (where it has one) without its LCM.

    Attributes:
        name: Block name.
        label: Short label.
        stride: Input pixels per token of the block's grid.
        maps: ``{'with_lcm' | 'without_lcm' | 'block': (H, W) map}`` (``'block'`` for a block without LCM).
        stats: :func:`erf_statistics` of each map.
    """
    name: str
    label: str
    stride: int
    maps: dict[str, torch.Tensor]
    stats: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {'name': self.name, 'label': self.label, 'stride': self.stride, 'grid': list(next(
            iter(self.maps.values())).shape), 'stats': self.stats}


@dataclass
class SourceResult:
    """Everything measured on one model."""
    label: str
    model_name: str
    model_args: dict[str, Any]
    blocks: list[BlockResult]
    erf: list[ErfResult]

    def summary(self) -> dict[str, float]:
        """Flat averages over blocks: ``'{global|window}/{metric}'`` and ``'erf/{condition}/{stat}'``.

        Each attention metric is the mean over blocks of that kind of the head means; the ERF numbers are means
        over the global blocks (every global block, also those whose mixer gives no attention rows). This is the
        row an experiment table wants per trained model.
        """
        out: dict[str, float] = {}
        for group in ('global', 'window'):
            blocks = [b for b in self.blocks if b.is_global == (group == 'global')]
            if not blocks:
                continue
            dicts = [b.stats.to_dict() for b in blocks]
            for key, value in dicts[0].items():
                if isinstance(value, dict):
                    out[f'{group}/{key}'] = sum(d[key]['mean'] for d in dicts) / len(dicts)
        for condition in sorted({c for e in self.erf for c in e.stats}):
            stats = [e.stats[condition] for e in self.erf if condition in e.stats]
            out[f'erf/{condition}/mean_distance_px'] = sum(s['mean_distance_px'] for s in stats) / len(stats)
            out[f'erf/{condition}/center_fraction'] = sum(s['center_fraction'] for s in stats) / len(stats)
            for t in stats[0]['area_ratio']:
                out[f'erf/{condition}/area_ratio@{t:g}'] = sum(s['area_ratio'][t] for s in stats) / len(stats)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            'label': self.label, 'model': self.model_name, 'model_args': _jsonable(self.model_args),
            'summary': self.summary(),
            'blocks': [b.to_dict() for b in self.blocks],
            'erf': [e.to_dict() for e in self.erf],
        }


@dataclass
class AnalysisResult:
    """The analysis of several models (sources) on the same images."""
    sources: list[SourceResult]
    image_names: list[str]
    image_size: tuple[int, int]
    query_points: list[tuple[float, float]]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            'l2vit_version': __version__,
            'images': self.image_names,
            'image_size': list(self.image_size),
            'query_points': [list(p) for p in self.query_points],
            'settings': _jsonable(self.settings),
            'sources': [s.to_dict() for s in self.sources],
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every map, keyed ``'<source>/<block>/maps'`` and ``'<source>/<block>/erf_<condition>'``."""
        out = {}
        for source, slug in zip(self.sources, _slugs([s.label for s in self.sources])):
            for b in source.blocks:
                out[f'{slug}/{b.name}/maps'] = b.maps
            for e in source.erf:
                for condition, m in e.maps.items():
                    out[f'{slug}/{e.name}/erf_{condition}'] = m
        return {k: v.detach().float().cpu().contiguous().clone() for k, v in out.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _slugs(labels: Sequence[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        ascii_label = unicodedata.normalize('NFKD', label).encode('ascii', 'ignore').decode()  # 'L²ViT' -> 'L2ViT'
        slug = re.sub(r'[^a-z0-9]+', '_', ascii_label.lower()).strip('_') or 'model'
        base, n = slug, 2
        while slug in out:
            slug, n = f'{base}_{n}', n + 1
        out.append(slug)
    return out


def _query_metrics(maps: torch.Tensor, tokens: Sequence[tuple[int, int]], stride: int) -> list[dict[str, Any]]:
    """Exact per-row metrics of global query maps ``(B, heads, Q, H, W)``."""
    B, heads, Q, H, W = maps.shape
    p, mass, _ = renormalize_rows(maps.reshape(B, heads, Q, H * W).double())
    centers = token_centers(H, W, stride).double()
    out = []
    for i, (r, c) in enumerate(tokens):
        dist = pairwise_distances(centers[r * W + c][None], centers)[0]
        out.append({
            'token': [r, c],
            'entropy': normalized_entropy(p[:, :, i]).tolist(),
            'distance_px': (p[:, :, i] * dist).sum(-1).tolist(),
            'row_mass': mass[:, :, i].tolist(),
        })
    return out


def analyze_model(
        model: nn.Module,
        images: torch.Tensor | ImageBatch,
        label: str = 'model',
        query_points: Sequence[tuple[float, float]] = DEFAULT_QUERY_POINTS,
        topk: Sequence[int] = DEFAULT_TOPK,
        chunk_size: int = 256,
        max_queries: int | None = None,
        erf: bool = True,
        blocks: Sequence[str] | None = None,
) -> SourceResult:
    """Measure one model: attention metrics of every attention block, query-point maps, ERFs of global blocks.

    Blocks whose mixer gives no attention rows (see :func:`~l2vit.analysis.capture_attention_inputs`) are left out
    of the attention metrics with a warning; their ERFs are still computed when they are global.

    Args:
        model: An L²ViT-style model (any mixer mix), run in eval mode.
        images: Normalised image batch ``(B, C, H, W)`` or an :class:`ImageBatch`.
        label: Name of this model in figures and JSON.
        query_points: ``(y, x)`` image fractions whose maps are kept.
        topk: ``k`` values of the top-k mass.
        chunk_size: Queries (or windows) per chunk in the all-query statistics.
        max_queries: Subsample global-attention queries to at most this many per image (default: all).
        erf: Also compute block ERFs (with and without LCM) of every global block, whatever its mixer.
        blocks: Restrict to these block names (default: all attention blocks).
    """
    x = images.tensor if isinstance(images, ImageBatch) else images
    param = next(model.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    records = capture_attention_inputs(model, x, blocks)
    results, erfs = [], []
    for record in records:
        with torch.no_grad():
            stats = attention_statistics(record, topk=topk, chunk_size=chunk_size, max_queries=max_queries)
            tokens = query_tokens(query_points, record.grid_size, record.stride, record.image_size)
            maps = attention_maps(record, tokens).float().cpu()
        results.append(BlockResult(
            name=record.name, label=record.label, kind=record.kind, has_lcm=record.has_lcm,
            grid=record.grid_size, stride=record.stride, heads=record.num_heads, stats=stats,
            query_tokens=tokens, maps=maps,
            query_metrics=_query_metrics(maps, tokens, record.stride) if record.is_global else [],
            row_semantics=row_semantics(record.kind),
        ))
    if erf:
        erfs = _global_block_erfs(model, x, records, blocks)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    args = timm.models.get_model_args(model)
    return SourceResult(label, cfg.get('architecture', type(model).__name__), args, results, erfs)


def _global_block_erfs(
        model: nn.Module,
        x: torch.Tensor,
        records: Sequence[AttentionInput],
        blocks: Sequence[str] | None,
) -> list[ErfResult]:
    """ERFs of every global attention block (mixer not local), in model order, with and without LCM."""
    recorded = {r.name: r for r in records}
    wanted = [(n, b) for n, b in attention_blocks(model)
              if not getattr(b.attn, 'is_local', False) and (blocks is None or n in set(blocks))]
    # blocks whose mixer gives no attention rows were not captured: their inputs come from one more forward pass
    missing = [n for n, _ in wanted if n not in recorded]
    inputs = capture_module_inputs(model, x, missing) if missing else {}
    image_size = (int(x.shape[-2]), int(x.shape[-1]))
    out = []
    for name, block in wanted:
        record = recorded.get(name)
        tokens = record.block_input if record is not None else inputs[name]
        has_lcm = getattr(block, 'local_mp', None) is not None
        stride = record.stride if record is not None else token_stride(
            model, block_stage(name), image_size, (tokens.shape[1], tokens.shape[2]))
        conditions = {'with_lcm': True, 'without_lcm': False} if has_lcm else {'block': True}
        maps = {c: block_erf(model, x, name, with_lcm=w, block_input=tokens).float().cpu()
                for c, w in conditions.items()}
        out.append(ErfResult(
            name=name, label=block_label(name, block.attn.mixer_name, has_lcm), stride=stride, maps=maps,
            stats={c: erf_statistics(m, DEFAULT_ERF_FRACTIONS, cell_size=stride) for c, m in maps.items()},
        ))
    return out


def analyze(
        models: Mapping[str, nn.Module],
        images: torch.Tensor | ImageBatch,
        query_points: Sequence[tuple[float, float]] = DEFAULT_QUERY_POINTS,
        **kwargs: Any,
) -> AnalysisResult:
    """Run :func:`analyze_model` on each ``{label: model}`` with the same images and settings."""
    if not models:
        raise ValueError('no models to analyse')
    names = images.names if isinstance(images, ImageBatch) else [f'image_{i}' for i in range(images.shape[0])]
    tensor = images.tensor if isinstance(images, ImageBatch) else images
    sources = [analyze_model(m, images, label=label, query_points=query_points, **kwargs)
               for label, m in models.items()]
    settings = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in kwargs.items()}
    settings.setdefault('topk', list(DEFAULT_TOPK))
    settings['erf_fractions'] = list(DEFAULT_ERF_FRACTIONS)
    settings['row_metrics'] = ROW_METRICS_RULE
    return AnalysisResult(sources, list(names), (int(tensor.shape[-2]), int(tensor.shape[-1])),
                          [tuple(map(float, p)) for p in query_points], settings)


def write_report(
        result: AnalysisResult,
        output_dir: str | os.PathLike,
        images: ImageBatch | None = None,
        figure_images: int = 2,
        figure_blocks: str = 'global',
) -> dict[str, Path]:
    """Write figures, ``analysis.json`` and ``analysis_tensors.safetensors`` into ``output_dir``.

    Args:
        result: The analysis.
        output_dir: Output folder (created). Files of the same name are replaced atomically.
        images: The analysed images, for the overlays (no overlays without them).
        figure_images: Overlay figures for at most this many images.
        figure_blocks: ``'global'`` (overlays of global-attention blocks only), ``'all'`` or ``'none'``.

    Returns:
        ``{kind: path}`` of every file written.
    """
    from safetensors.torch import save as save_safetensors

    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("the analysis figures need matplotlib: pip install 'l2vit[analysis]'") from e
    from .plot import OverlayPanel, plot_attention_overlays, plot_erf, plot_per_layer, save_figure

    if figure_blocks not in ('global', 'all', 'none'):
        raise ValueError(f"figure_blocks must be 'global', 'all' or 'none', got {figure_blocks!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files['tensors'] = atomic_write_bytes(out / 'analysis_tensors.safetensors', save_safetensors(
        result.tensors(), metadata={'l2vit_version': __version__, 'layout': 'maps: (images, heads, queries, H, W)'}))

    for metric, ylabel, ref in [('entropy', 'row entropy / log(keys)', None),
                                ('distance_px', 'mean attention distance (px)', 'uniform_distance_px'),
                                *[(f'top{k}_mass', f'top-{k} mass', None) for k in result.settings['topk']]]:
        files[f'{metric}_per_layer'] = save_figure(plot_per_layer(result, metric, ylabel, ref),
                                                   out / f'{metric}_per_layer.png')

    if images is not None and figure_blocks != 'none':
        H, W = result.image_size
        pixels = [(fy * (H - 1), fx * (W - 1)) for fy, fx in result.query_points]
        names = []
        for s in result.sources:
            names += [b.name for b in s.blocks if b.name not in names and (figure_blocks == 'all' or b.is_global)]
        for name in names:
            for i in range(min(figure_images, images.tensor.shape[0])):
                panels = []
                for s in result.sources:
                    b = next((b for b in s.blocks if b.name == name), None)
                    if b is None:
                        panels.append(OverlayPanel(s.label, None, 1))
                        continue
                    p, _, _ = renormalize_rows(b.maps[i].flatten(-2))
                    notes = [f'H={sum(q["entropy"][i]) / b.heads:.2f} d={sum(q["distance_px"][i]) / b.heads:.0f}px'
                             for q in b.query_metrics] or None
                    panels.append(OverlayPanel(f'{s.label}\n{b.kind}', p.mean(0).reshape(b.maps.shape[2:]),
                                               b.stride, notes))
                fig = plot_attention_overlays(images.display[i], panels, pixels,
                                              title=f'{name} · {result.image_names[i]} (head mean, rows sum to 1)')
                key = f'attention_{re.sub(r"[^a-z0-9]+", "-", name.lower())}_img{i}'
                files[key] = save_figure(fig, out / f'{key}.png')

    for source, slug in zip(result.sources, _slugs([s.label for s in result.sources])):
        if source.erf:
            maps = {e.label: {_CONDITION_TITLES.get(c, c): m for c, m in e.maps.items()} for e in source.erf}
            files[f'erf_{slug}'] = save_figure(plot_erf(maps, title=f'ERF of global blocks · {source.label}'),
                                               out / f'erf_{slug}.png')

    report = result.to_dict()
    report['files'] = {k: p.name for k, p in files.items()}
    files['json'] = atomic_write_bytes(out / 'analysis.json',
                                       json.dumps(report, indent=1, allow_nan=False).encode())
    return files
