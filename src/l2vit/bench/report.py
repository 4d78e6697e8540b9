"""Benchmark results on disk: CSV and JSON with an environment header, log-log scaling plots, a Markdown table.

``results.json`` holds ``{"environment": {...}, "rows": [...]}``; ``results.csv`` holds the same rows with the
environment as ``# key: value`` comment lines on top (``pandas.read_csv(path, comment='#')`` reads it). Files are
written to a temporary name, flushed to disk and renamed, so an interrupted run never leaves a torn file.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write_bytes, atomic_write_text

__all__ = ['write_results', 'read_results', 'fit_slope', 'plot_scaling', 'markdown_tables', 'results_markdown',
           'COLUMNS']

COLUMNS = (
    'model', 'height', 'width', 'pixels', 'batch', 'mode', 'dtype', 'cast', 'device', 'threads', 'compile', 'freeze',
    'channels_last', 'paired', 'keep_freed_memory', 'status', 'time_ms', 'time_q25_ms', 'time_q75_ms', 'time_min_ms', 'time_max_ms', 'reps',
    'img_per_s', 'peak_mib', 'baseline_mib', 'mem_method', 'gmacs', 'params_m', 'gflops', 'wall_s', 'error',
)


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_results(out_dir: str | Path, environment: dict[str, Any], rows: Sequence[dict[str, Any]],
                  name: str = 'results') -> None:
    """Write ``<name>.json`` and ``<name>.csv`` (environment header + one row per configuration)."""
    out_dir = Path(out_dir)
    rows = [_clean(r) for r in rows]
    environment = _clean(environment)
    atomic_write_text(out_dir / f'{name}.json', json.dumps({'environment': environment, 'rows': rows}, indent=1,
                                                           allow_nan=False))
    buf = io.StringIO()
    for key, value in environment.items():
        buf.write(f'# {key}: {value}\n')
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, *extra], extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ('' if v is None else v) for k, v in row.items()})
    atomic_write_text(out_dir / f'{name}.csv', buf.getvalue())


def read_results(path: str | Path, name: str = 'results') -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a ``results.json`` (or the folder holding ``<name>.json``): ``(environment, rows)``."""
    path = Path(path)
    if path.is_dir():
        path = path / f'{name}.json'
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or 'rows' not in data:
        raise ValueError(f'{path} is not an l2vit benchmark results file (expected {{"environment", "rows"}})')
    return data.get('environment', {}), data['rows']


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (1: linear in x, 2: quadratic); None under 2 points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def _group_key(row: dict[str, Any]) -> tuple:
    compiled = ('frozen' if row.get('freeze') else 'compiled') if row.get('compile') else ''
    return (row['mode'], row['dtype'], row.get('cast', 'none'), row['batch'], row['device'], compiled,
            bool(row.get('channels_last')), bool(row.get('paired')), bool(row.get('keep_freed_memory')))


def _group_title(key: tuple) -> str:
    mode, dtype, cast, batch, device, compiled, cl, paired, kept = key
    prec = dtype if dtype == 'fp32' else f'{dtype} ({cast})'
    extra = {'': '', 'compiled': ', compiled', 'frozen': ', compiled with frozen weights'}[compiled]
    extra += ', channels-last' if cl else ''
    extra += ', models alternating in one process' if paired else ''
    extra += ', freed memory kept for reuse' if kept else ''
    return f'{"inference" if mode == "infer" else "training step"}, {prec}, batch {batch}, {device}{extra}'


def _ok(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get('status') == 'ok' and r.get('time_ms')]


def plot_scaling(
        rows: Sequence[dict[str, Any]],
        out_dir: str | Path,
        environment: dict[str, Any] | None = None,
        *,
        series: str | Callable[[dict[str, Any]], str] = 'model',
        x_label: str = 'pixels (H × W); hollow: non-square',
        time_label: str = 'time per image (ms)',
        prefix: str = 'scaling',
        title: str | None = None,
        top_slope: bool = False,
) -> list[Path]:
    """One PNG per (mode, precision, batch, device): time per image and peak memory against pixels, log-log, with
    each model's fitted slope in the legend (slope 1 = linear in pixels, 2 = quadratic). Returns the paths. Paired
    rows (timed for the ratio between models, one size at a time) are not plotted.

    Args:
        rows: Result rows (only ``'ok'`` ones are drawn).
        out_dir: Folder for the PNGs, named ``<prefix>_<mode>_<dtype>..._<device>.png``.
        environment: The run's environment (its ``device_name`` goes into the title).
        series: The row key (or a function of the row) naming the line a row belongs to.
        x_label: Label of the x axis (the ``pixels`` field: H × W of the input, tokens for a mixer).
        time_label: Label of the time axis (time per batch element).
        prefix: File-name prefix.
        title: Put before each plot's title.
        top_slope: Also give, for lines of 3 points or more, the slope between the two largest sizes (closer to
            the asymptotic order where fixed overheads flatten the small sizes).
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    name_of = series if callable(series) else (lambda r: r[series])
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in _ok(rows):
        groups[_group_key(r)].append(r)
    paths = []
    for key, group in groups.items():
        if len({r['pixels'] for r in group}) < 2 or key[7]:
            continue  # one size: nothing to scale; paired rows are timed for their ratios, pair by pair
        lines = list(dict.fromkeys(name_of(r) for r in group))
        many = len(lines) > 10  # past the colour cycle: vary the line style too, shrink the legend
        fig, axes = plt.subplots(1, 2, figsize=(14, 6) if many else (12, 4.8))
        for i, line_name in enumerate(lines):
            pts = sorted((r['pixels'], r['time_ms'] / r['batch'], r.get('peak_mib'), r['height'] != r['width'])
                         for r in group if name_of(r) == line_name)
            for ax, col in ((axes[0], 1), (axes[1], 2)):
                valid = [(p[0], p[col], p[3]) for p in pts if p[col]]
                if not valid:
                    continue
                slope = fit_slope([v[0] for v in valid], [v[1] for v in valid])
                label = line_name + (f'  (slope {slope:.2f}' if slope is not None else '')
                if slope is not None and top_slope and len(valid) > 2:
                    top = fit_slope([v[0] for v in valid[-2:]], [v[1] for v in valid[-2:]])
                    label += f'; top {top:.2f}' if top is not None else ''
                label += ')' if slope is not None else ''
                line, = ax.plot([v[0] for v in valid], [v[1] for v in valid], marker='o', label=label,
                                linestyle=('-', '--', '-.')[i // 10 % 3])
                odd = [v for v in valid if v[2]]
                if odd:  # non-square sizes: hollow markers on the same line
                    ax.plot([v[0] for v in odd], [v[1] for v in odd], linestyle='none', marker='o', markersize=9,
                            markerfacecolor='white', color=line.get_color())
        for ax, ylabel in ((axes[0], time_label), (axes[1], 'peak memory (MiB)')):
            ax.set_xscale('log')
            ax.set_yscale('log')
            _slope_guides(ax)
            ax.yaxis.set_major_formatter(FuncFormatter(_tick_label))
            ax.yaxis.set_minor_formatter(FuncFormatter(_tick_label))
            ax.set_xlabel(x_label)
            ax.set_ylabel(ylabel)
            ax.grid(True, which='both', alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # e.g. no memory measured: an empty panel, no legend
                ax.legend(fontsize=7 if many else 8)
        device = (environment or {}).get('device_name', key[4])
        fig.suptitle(f'{title + ": " if title else ""}{_group_title(key)} — {device}', fontsize=10)
        fig.tight_layout()
        mode, dtype, cast, batch, dev, compiled, cl, paired, kept = key
        name = f'{prefix}_{mode}_{dtype}{"" if dtype == "fp32" else "_" + cast}_b{batch}_{dev.replace(":", "")}'
        name += (f'_{compiled}' if compiled else '') + ('_cl' if cl else '') + ('_paired' if paired else '') + ('_kept' if kept else '') + '.png'
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        fig.savefig(buf, format='png', dpi=110)
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def _slope_guides(ax) -> None:
    """Faint dashed lines of slope 1 and 2 through the lower left of the data, to read the slopes against."""
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1]
    if not lines:
        return
    x0 = min(min(ln.get_xdata()) for ln in lines)
    x1 = max(max(ln.get_xdata()) for ln in lines)
    y0 = min(min(ln.get_ydata()) for ln in lines)
    top = max(max(ln.get_ydata()) for ln in lines)
    for power, style in ((1, '--'), (2, ':')):
        ax.plot([x0, x1], [y0, y0 * (x1 / x0) ** power], color='gray', linestyle=style, linewidth=0.8, alpha=0.6,
                label=f'slope {power}')
    ax.set_ylim(bottom=y0 / 1.3, top=top * 1.3)


def _tick_label(value: float, _pos) -> str:
    """Plain numbers on log axes, for the 1-2-5 ticks only (the rest stay unlabelled)."""
    if value <= 0:
        return ''
    lead = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f'{value:g}' if round(lead, 6) in (1, 2, 5) else ''


def markdown_tables(rows: Sequence[dict[str, Any]], reference: str = 'l2vit_tiny') -> str:
    """Markdown tables, one per (mode, precision, batch, device): throughput (images/s), peak memory and the
    reference model's throughput relative to each other model, per input size. Failed cells say why."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[_group_key(r)].append(r)
    out = []
    for key, group in groups.items():
        models = list(dict.fromkeys(r['model'] for r in group))
        sizes = sorted({(r['height'], r['width']) for r in group}, key=lambda s: (s[0] * s[1], s))
        cells = {(r['model'], r['height'], r['width']): r for r in group}
        out.append(f'**{_group_title(key)}** — images/s (peak MiB); ×: {reference} relative to that model\n')
        out.append('| size | ' + ' | '.join(models) + ' |')
        out.append('|---' * (len(models) + 1) + '|')
        for h, w in sizes:
            ref = cells.get((reference, h, w))
            ref_tp = ref.get('img_per_s') if ref and ref.get('status') == 'ok' else None
            line = [f'{h}×{w}']
            for m in models:
                r = cells.get((m, h, w))
                if r is None:
                    line.append('')
                elif r.get('status') != 'ok':
                    line.append(r.get('status', '?'))
                else:
                    text = f'{r["img_per_s"]:.2f}'
                    text += f' ({r["peak_mib"]:.0f})' if r.get('peak_mib') is not None else ''
                    if m != reference and ref_tp:
                        text += f' ×{ref_tp / r["img_per_s"]:.2f}'
                    line.append(text)
            out.append('| ' + ' | '.join(line) + ' |')
        out.append('')
    return '\n'.join(out)


def results_markdown(environment: dict[str, Any], rows: Sequence[dict[str, Any]]) -> tuple[str, list]:
    """``results.md`` of a model sweep: header, one table per group and the project's targets the run covers.

    Returns ``(markdown, targets)``; ``targets`` is empty when the run covers none of them. It reads rows and
    environment only, so a saved ``results.json`` can be rendered again (e.g. after a target's rule changed).
    """
    from .targets import evaluate_targets, format_targets
    targets = evaluate_targets(list(rows), environment)
    if all(t.value is None for t in targets):
        targets = []  # the run covers none of them
    env = environment
    md = [f'# Benchmark: {env.get("suite", "")}\n', f'{env.get("device_name")}; torch {env.get("torch")}, timm '
          f'{env.get("timm")}, l2vit {env.get("l2vit")}; {env.get("threads")} threads; {env.get("date")}\n',
          markdown_tables(rows)]
    if targets:
        md += ['## Targets\n', format_targets(targets), '']
    return '\n'.join(md), targets
