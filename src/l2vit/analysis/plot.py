"""Figures of the analysis (matplotlib, no pyplot: figures render with the Agg canvas and never open a window)."""
from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .._io import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .report import AnalysisResult

__all__ = ['OverlayPanel', 'plot_attention_overlays', 'plot_per_layer', 'plot_erf', 'save_figure']

_MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X')


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure
    # fixed margins instead of a layout engine: constrained layout costs more than drawing these figures
    return Figure(figsize=(width, height), dpi=100)


def _margins(fig: Figure, top_in: float, bottom_in: float = 0.1, left_in: float = 0.3, right_in: float = 0.1,
             **spacing: float) -> None:
    """Margins in inches, so titles keep their room whatever the figure's size."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left_in / w, right=1 - right_in / w, bottom=bottom_in / h, top=1 - top_in / h, **spacing)


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` to PNG and write it atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format='png', pil_kwargs={'compress_level': 1})
    return atomic_write_bytes(path, buf.getvalue())


class OverlayPanel:
    """One column of an overlay figure: a source's maps for the query points of one block and image.

    Args:
        title: Column title (the source's label).
        maps: ``(Q, H, W)`` maps on the token grid (head-averaged), or None when the source lacks this block.
        stride: Input pixels per token.
        notes: One short text per query point (e.g. its entropy), drawn in the panel corner.
    """

    def __init__(self, title: str, maps: torch.Tensor | None, stride: int, notes: Sequence[str] | None = None):
        self.title = title
        self.maps = maps
        self.stride = stride
        self.notes = list(notes) if notes is not None else None


def plot_attention_overlays(
        image: torch.Tensor,
        panels: Sequence[OverlayPanel],
        query_pixels: Sequence[tuple[float, float]],
        title: str = '',
) -> Figure:
    """Attention of chosen query points over the input image, one row per query, one column per source.

    Each map is scaled to its own maximum, so the colours show the *shape* of a distribution: a concentrated map
    lights up a few tokens, a dispersed one the whole image.

    Args:
        image: Display image ``(H, W, 3)`` in ``[0, 1]``.
        panels: One :class:`OverlayPanel` per source.
        query_pixels: ``(y, x)`` pixel position of each query (marked with a cross).
        title: Figure title.
    """
    img = image.detach().cpu().clamp(0, 1).numpy()
    gray = img.mean(-1)  # the maps are drawn over a grey copy, so image colours cannot pass for attention
    H, W = img.shape[:2]
    rows, cols = len(query_pixels), len(panels) + 1
    fig = _figure(2.2 * cols, 2.2 * rows + 0.9)
    _margins(fig, top_in=0.9, wspace=0.04, hspace=0.04)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (qy, qx) in enumerate(query_pixels):
        ax = axes[r][0]
        ax.imshow(img)
        ax.plot([qx], [qy], marker='+', color='red', markersize=12, mew=2)
        ax.set_ylabel(f'query {r} ({qy:.0f}, {qx:.0f})', fontsize=8)
        if r == 0:
            ax.set_title('input', fontsize=9)
        for c, panel in enumerate(panels, start=1):
            ax = axes[r][c]
            ax.imshow(gray, cmap='gray', vmin=0., vmax=1.)
            if panel.maps is not None:
                m = panel.maps[r].detach().float().cpu()
                m = m / m.max().clamp_min(1e-12)
                gh, gw = m.shape
                ax.imshow(m.numpy(), cmap='inferno', alpha=0.7, interpolation='nearest', vmin=0., vmax=1.,
                          extent=(0, gw * panel.stride, gh * panel.stride, 0))
                if panel.notes is not None:
                    ax.text(0.02, 0.02, panel.notes[r], transform=ax.transAxes, fontsize=7, color='white',
                            bbox=dict(facecolor='black', alpha=0.6, pad=1, linewidth=0))
            else:
                ax.text(0.5, 0.5, 'no such block', transform=ax.transAxes, ha='center', fontsize=8)
            ax.plot([qx], [qy], marker='+', color='cyan', markersize=10, mew=1.5)
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            if r == 0:
                ax.set_title(panel.title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_per_layer(
        result: AnalysisResult,
        metric: str,
        ylabel: str,
        reference: str | None = None,
) -> Figure:
    """One metric per attention block and source: a panel for window attention, one for global attention.

    Lines are head means; faint dots are the individual heads.

    Args:
        result: The analysis.
        metric: A key of :meth:`AttentionStats.to_dict` (``'entropy'``, ``'distance_px'``, ``'top9_mass'``, ...).
        ylabel: Axis label.
        reference: Another metric drawn dashed in grey, once per block (e.g. ``'uniform_distance_px'``).
    """
    kinds = [('window', 'window attention (LWA)'), ('global', 'global attention')]
    present = [(k, t) for k, t in kinds if any(b.is_global == (k == 'global') for s in result.sources
                                               for b in s.blocks)]
    fig = _figure(5.5 * len(present), 3.8)
    _margins(fig, top_in=0.35, bottom_in=0.75, left_in=0.7, wspace=0.25)
    axes = fig.subplots(1, max(1, len(present)), squeeze=False)[0]
    for ax, (kind, title) in zip(axes, present):
        order: list[str] = []
        for source in result.sources:
            for b in source.blocks:
                if b.is_global == (kind == 'global') and b.name not in order:
                    order.append(b.name)
        xs = {name: i for i, name in enumerate(order)}
        ref_drawn: dict[str, float] = {}
        for s_idx, source in enumerate(result.sources):
            blocks = [b for b in source.blocks if b.name in xs]
            values = [b.stats.to_dict()[metric] for b in blocks]
            x = [xs[b.name] for b in blocks]
            line, = ax.plot(x, [v['mean'] for v in values], marker=_MARKERS[s_idx % len(_MARKERS)],
                            label=source.label)
            for xi, v in zip(x, values):
                ax.scatter([xi] * len(v['per_head']), v['per_head'], s=8, alpha=0.3, color=line.get_color())
            if reference is not None:
                for b in blocks:
                    ref_drawn.setdefault(b.name, b.stats.to_dict()[reference]['mean'])
        if ref_drawn:
            ax.plot([xs[n] for n in ref_drawn], list(ref_drawn.values()), ls='--', color='grey', label='uniform')
        labels = {b.name: b.label.split(' ')[0] for s in result.sources for b in s.blocks}
        ax.set_xticks(range(len(order)), [labels[n] for n in order], rotation=45, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.ticklabel_format(axis='y', useOffset=False)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plot_erf(maps: Mapping[str, Mapping[str, torch.Tensor]], title: str = '') -> Figure:
    """ERF heat maps, one row per block, one column per condition (``'with LCM'``, ``'without LCM'``).

    Shown as ``log10(1 + erf / max · 1000)`` scaled to ``[0, 1]`` per row, so that conditions of a block share a
    colour scale and the weak, far-reaching part of a field stays visible.

    Args:
        maps: ``{block label: {condition: (H, W) map}}``.
        title: Figure title.
    """
    rows = len(maps)
    cols = max((len(v) for v in maps.values()), default=1)
    fig = _figure(2.6 * cols + 1.0, 2.6 * max(rows, 1) + 0.5)
    _margins(fig, top_in=0.8, right_in=0.2, wspace=0.05, hspace=0.35)
    axes = fig.subplots(max(rows, 1), cols, squeeze=False)
    for r, (block, conditions) in enumerate(maps.items()):
        peak = max(float(m.max()) for m in conditions.values()) or 1.
        image = None
        for c, (name, m) in enumerate(conditions.items()):
            shown = torch.log10(1 + m.detach().double().cpu() / peak * 1000) / math.log10(1001)
            image = axes[r][c].imshow(shown.numpy(), cmap='RdYlGn', vmin=0., vmax=1., interpolation='nearest')
            axes[r][c].set_title(f'{block}\n{name}', fontsize=8)
        for c in range(len(conditions), cols):
            axes[r][c].axis('off')
        if image is not None:
            fig.colorbar(image, ax=list(axes[r]), shrink=0.8, label='log-scaled |grad|')
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
