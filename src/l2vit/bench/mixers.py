"""Mixer benchmark: time and peak memory of each token mixer alone, and of the backbone built with it, against size.

Two workloads, both ordinary :class:`~l2vit.bench.runner.BenchConfig` rows run by the same runner (fresh process per
configuration on CPU, timing statistics, peak memory, failures recorded as rows):

* **mixer alone** (``kind='mixer'``): one registered mixer (``l2vit.layers.create_mixer``) at width ``dim`` with
  ``heads`` heads on ``(batch, side, side, dim)`` tokens, for grid sides such as 14, 28, ..., 256 (196 to 65,536
  tokens). Its time and memory against the token count show the mixer's own complexity: slope 1 on a log-log plot
  is linear in the tokens, 2 quadratic.
* **backbone per mixer** (``kind='model'``, ``global_mixer=name``): ``l2vit_tiny`` with that mixer in every global
  block, on images of a few sizes: what the mixer costs inside the whole network, against pixels.

``'all'`` names every registered global (non-windowed) mixer plus ``'window'`` (Swin-style window attention, linear in
the tokens at a fixed window) as the reference. Large sizes of the quadratic mixers can take minutes or more memory
than the machine has; :class:`ScalingGuard` extrapolates each mixer's measured time and memory from its smaller sizes
and records a configuration that would exceed the timeout or the memory cap as ``'skipped'`` (with the prediction)
instead of running it, and the runner caps each isolated process's data memory so a misprediction ends as ``'oom'``.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .report import _group_key, _group_title, fit_slope, plot_scaling
from .runner import BenchConfig

__all__ = [
    'REFERENCE_MIXER', 'resolve_mixers', 'mixer_workload', 'mixer_cost', 'mixer_sweep', 'available_memory_mib',
    'ScalingGuard', 'default_memory_cap_mib', 'series_name', 'mixer_slopes', 'mixers_markdown', 'plot_mixers',
]

REFERENCE_MIXER = 'window'
_FAILED = ('oom', 'timeout', 'skipped')
_SIZE_FIELDS = ('height', 'width')
_MEMORY_FLOOR_MIB = 4.0  # RSS peaks below this are allocator noise, not a size trend


def resolve_mixers(names: Iterable[str]) -> list[str]:
    """Mixer names to benchmark, in order, without repeats; ``'all'`` expands to every registered global mixer
    followed by ``'window'`` (the windowed reference). Unknown names raise a ``ValueError`` listing the options."""
    from ..layers import get_mixer, is_local_mixer, list_mixers
    out: list[str] = []
    for name in names:
        if name == 'all':
            out += [m for m in list_mixers() if not is_local_mixer(m)] + [REFERENCE_MIXER]
        else:
            get_mixer(name)
            out.append(name)
    if not out:
        raise ValueError("no mixers given; name registered mixers or 'all'")
    return list(dict.fromkeys(out))


def _build_mixer(name: str, dim: int, heads: int, **kwargs) -> torch.nn.Module:
    from ..layers import create_mixer
    # the window size L²ViT's blocks pass to every mixer (only windowed ones use it)
    return create_mixer(name, dim, heads, window_size=7, **kwargs)


def mixer_workload(cfg: BenchConfig, device: torch.device | str
                   ) -> tuple[torch.nn.Module, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(mixer, tokens, loss)`` for a ``kind='mixer'`` configuration: the mixer ``cfg.model`` (randomly
    initialised) on ``device``, a ``(batch, height, width, dim)`` input and a training loss (mean square output)."""
    if cfg.kind != 'mixer':
        raise ValueError(f"mixer_workload needs a config of kind 'mixer', got kind '{cfg.kind}'")
    module = _build_mixer(cfg.model, cfg.dim, cfg.heads).to(device)
    x = torch.randn(cfg.batch, cfg.height, cfg.width, cfg.dim, device=device)

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.float().square().mean()
    return module, x, loss


def mixer_cost(name: str, height: int, width: int, dim: int, heads: int) -> tuple[float | None, float | None]:
    """``(GMACs per input, parameters in millions)`` of mixer ``name`` on ``height × width`` tokens of width ``dim``,
    counted on the meta device; Nones where the mixer cannot be built, GMACs None where counting fails."""
    from .runner import module_cost
    try:
        module = _build_mixer(name, dim, heads, device='meta')
    except Exception:  # noqa: BLE001 (a mixer that cannot be built is reported by its run)
        return None, None
    return module_cost(module, (height, width, dim))


def mixer_sweep(
        mixers: Sequence[str],
        grids: Sequence[tuple[int, int]] = ((14, 14), (28, 28), (56, 56), (112, 112), (256, 256)),
        dim: int = 64,
        heads: int = 2,
        backbone: str | None = 'l2vit_tiny',
        backbone_sizes: Sequence[tuple[int, int]] = ((224, 224), (448, 448), (896, 896)),
        **config: Any,
) -> list[BenchConfig]:
    """The configurations of a mixer benchmark: every mixer alone over ``grids``, then ``backbone`` with each mixer
    as its ``global_mixer`` over ``backbone_sizes``; sizes ascending within each mixer (what :class:`ScalingGuard`
    extrapolates from).

    Args:
        mixers: Registered mixer names (see :func:`resolve_mixers`).
        grids: Token grids ``(height, width)`` for the mixers alone; empty skips that part.
        dim: Token width of the mixers alone.
        heads: Heads of the mixers alone.
        backbone: timm model taking ``global_mixer``; None skips that part.
        backbone_sizes: Image sizes ``(height, width)`` for the backbone; empty skips that part.
        **config: Other :class:`BenchConfig` fields shared by all (batch, mode, dtype, cast, device, threads, ...).
    """
    def area(size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        return size[0] * size[1], size
    configs = [BenchConfig(model=m, height=h, width=w, kind='mixer', dim=dim, heads=heads, **config)
               for m in mixers for h, w in sorted(set(grids), key=area)]
    if backbone:
        configs += [BenchConfig(model=backbone, height=h, width=w, global_mixer=m, **config)
                    for m in mixers for h, w in sorted(set(backbone_sizes), key=area)]
    return configs


def available_memory_mib(device: str = 'cpu') -> float | None:
    """Memory a new allocation can get now, in MiB: ``MemAvailable`` of ``/proc/meminfo`` on CPU, the device's free
    memory on CUDA; None where unknown."""
    dev = torch.device(device)
    if dev.type == 'cuda':
        free, _total = torch.cuda.mem_get_info(dev)
        return free / 2 ** 20
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _series_key(item: BenchConfig | dict[str, Any]) -> tuple:
    """Every configuration field but the size: rows with the same key form one scaling series (a row without a
    field, e.g. one written before the field existed, has its default)."""
    fields = BenchConfig.__dataclass_fields__
    if isinstance(item, dict):
        return tuple(item.get(k, fields[k].default) for k in fields if k not in _SIZE_FIELDS)
    return tuple(getattr(item, k) for k in fields if k not in _SIZE_FIELDS)


def _extrapolate(points: Sequence[tuple[float, float]], x: float) -> tuple[float, float]:
    """``(y at x, slope used)`` from the log-log line through the last two ``(x, y)`` points, its slope clamped to
    [1, 2] (no mixer scales below linear, and noise at small sizes must not predict worse than quadratic); from one
    point, slope 2 (the worst case)."""
    x1, y1 = points[-1]
    slope = 2.0
    if len(points) > 1:
        x0, y0 = points[-2]
        if x1 > x0 and y0 > 0 and y1 > 0:
            slope = min(2.0, max(1.0, math.log(y1 / y0) / math.log(x1 / x0)))
    return y1 * (x / x1) ** slope, slope


class ScalingGuard:
    """``run_sweep`` ``skip`` hook: skip a configuration whose time or memory, extrapolated from the same series at
    smaller sizes, would exceed the timeout or the memory available, and the larger sizes of a series once one size
    ran out of memory or time.

    Time: each call's median is extrapolated (log-log through the two largest sizes measured, slope clamped to
    [1, 2]) and multiplied by the calls a configuration makes (memory call, warm-up, timed calls); with the fixed
    cost the largest size had beyond its calls (process start, building), that is checked against ``timeout``. Memory: peak plus baseline, extrapolated the same way, against ``memory_limit_mib`` and 90% of the
    memory available at the time (:func:`available_memory_mib`).

    Args:
        timeout: Seconds a configuration may take (the sweep's timeout); None: no time check.
        memory_limit_mib: Memory cap of one configuration; None: only what is available.
        available: Memory available on a device now, in MiB (None: unknown); default :func:`available_memory_mib`.
    """

    def __init__(self, timeout: float | None = None, memory_limit_mib: float | None = None,
                 available: Callable[[str], float | None] | None = None):
        self.timeout = timeout
        self.memory_limit_mib = memory_limit_mib
        self.available = available or available_memory_mib

    def __call__(self, cfg: BenchConfig, rows: Sequence[dict[str, Any]]) -> str | None:
        size = cfg.height * cfg.width
        key = _series_key(cfg)
        prior = sorted((r for r in rows if _series_key(r) == key and r['height'] * r['width'] < size),
                       key=lambda r: r['height'] * r['width'])
        for r in prior:
            if r.get('status') in _FAILED:
                return f'{r["height"]}x{r["width"]} was {r["status"]}'
        ok = [r for r in prior if r.get('status') == 'ok' and r.get('time_ms')]
        if not ok:
            return None
        if self.timeout:
            t, slope = _extrapolate([(r['height'] * r['width'], r['time_ms'] / 1e3) for r in ok], size)
            calls_before = (1 if cfg.memory else 0) + cfg.warmup
            timed = max(cfg.min_reps * t, min(cfg.min_time, cfg.max_time) + t)
            wall = _overhead(ok[-1]) + calls_before * t + timed
            if wall > self.timeout:
                return (f'predicted {t:.1f} s per call (slope {slope:.2f}), ~{wall:.0f} s in all > timeout '
                        f'{self.timeout:.0f} s')
        limit = self._memory_limit(cfg.device)
        mem = [r for r in ok if (r.get('peak_mib') or 0) >= _MEMORY_FLOOR_MIB]
        if limit is not None and mem and cfg.memory:
            peak, slope = _extrapolate([(r['height'] * r['width'], r['peak_mib']) for r in mem], size)
            total = peak + (mem[-1].get('baseline_mib') or 0)
            if total > limit:
                return f'predicted peak {peak:.0f} MiB (slope {slope:.2f}) + baseline > the {limit:.0f} MiB cap'
        return None

    def _memory_limit(self, device: str) -> float | None:
        available = self.available(device)
        limits = [v for v in (self.memory_limit_mib, None if available is None else 0.9 * available) if v]
        return min(limits) if limits else None


def _overhead(row: dict[str, Any]) -> float:
    """Seconds a row's run took beyond its calls (process start, imports, building the model): wall time minus the
    memory call, the warm-up and the timed calls at the median."""
    calls = (1 if row.get('memory', True) else 0) + (row.get('warmup') or 0) + (row.get('reps') or 0)
    return max(0.0, (row.get('wall_s') or 0.0) - calls * row['time_ms'] / 1e3)


def series_name(row: dict[str, Any]) -> str:
    """The mixer a row measures: the mixer itself (``kind='mixer'``) or the backbone's global mixer."""
    if row.get('kind') == 'mixer':
        return row['model']
    return row.get('global_mixer') or row['model']


def _split(rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = list(rows)
    return [r for r in rows if r.get('kind') == 'mixer'], [r for r in rows if r.get('kind') != 'mixer']


def mixer_slopes(rows: Sequence[dict[str, Any]]) -> dict[tuple, dict[str, dict[str, float | None]]]:
    """Fitted log-log slopes per (group, part, mixer): ``{(group key, 'alone'|'backbone'): {mixer: slopes}}``.

    ``slopes`` holds ``time`` and ``memory`` (all sizes that ran), ``time_top`` and ``memory_top`` (the two largest
    sizes only: closer to the asymptotic order, as fixed overheads dominate small sizes), ``largest`` (the largest
    size that ran, in tokens or pixels) and ``not_run`` (sizes with another status). Time is per batch element.
    """
    out: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for part, part_rows in zip(('alone', 'backbone'), _split(rows)):
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for r in part_rows:
            groups[(_group_key(r), series_name(r))].append(r)
        for (gkey, name), series in groups.items():
            ok = sorted((r for r in series if r.get('status') == 'ok' and r.get('time_ms')), key=lambda r: r['pixels'])
            t = [(r['pixels'], r['time_ms'] / r['batch']) for r in ok]
            m = [(r['pixels'], r['peak_mib']) for r in ok if r.get('peak_mib')]
            out[(gkey, part)][name] = {
                'time': fit_slope(*zip(*t)) if t else None,
                'time_top': fit_slope(*zip(*t[-2:])) if t else None,
                'memory': fit_slope(*zip(*m)) if m else None,
                'memory_top': fit_slope(*zip(*m[-2:])) if m else None,
                'largest': ok[-1]['pixels'] if ok else None,
                'not_run': sum(r.get('status') != 'ok' for r in series),
            }
    return dict(out)


def _slope(value: float | None) -> str:
    return '—' if value is None else f'{value:.2f}'


def _size(row: dict[str, Any]) -> str:
    h, w = row['height'], row['width']
    return f'{h}²' if h == w else f'{h}×{w}'


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ''
    if row.get('status') != 'ok':
        return row.get('status', '?')
    mem = row.get('peak_mib')
    return f'{row["time_ms"] / row["batch"]:.3g} ({"—" if mem is None else format(mem, ".0f")})'


def _size_table(rows: Sequence[dict[str, Any]], head: str) -> list[str]:
    sizes = sorted({(r['height'], r['width']) for r in rows}, key=lambda s: (s[0] * s[1], s))
    names = list(dict.fromkeys(series_name(r) for r in rows))
    cells = {(series_name(r), r['height'], r['width']): r for r in rows}
    lines = [f'| {head} | ' + ' | '.join(_size({'height': h, 'width': w}) for h, w in sizes) + ' |',
             '|---' * (len(sizes) + 1) + '|']
    for name in names:
        lines.append(f'| {name} | ' + ' | '.join(_cell(cells.get((name, h, w))) for h, w in sizes) + ' |')
    return lines


def mixers_markdown(rows: Sequence[dict[str, Any]], environment: dict[str, Any] | None = None) -> str:
    """The mixer benchmark as Markdown: per (mode, precision, batch, device), a table of fitted slopes per mixer
    (alone against tokens, in the backbone against pixels), then the measurements (ms per input, peak MiB) per size,
    failed cells saying why, and the reasons of the configurations that did not run."""
    env = environment or {}
    alone, backbone = _split(rows)
    slopes = mixer_slopes(rows)
    out = [f'# Mixer benchmark: {env.get("suite", "")}'.rstrip(': ') + '\n']
    if env:
        out.append(f'{env.get("device_name", "")}; torch {env.get("torch", "?")}, timm {env.get("timm", "?")}, '
                   f'l2vit {env.get("l2vit", "?")}; {env.get("threads", "?")} threads; {env.get("date", "")}\n')
    if alone:
        dims = sorted({(r['dim'], r['heads']) for r in alone})
        out.append('Mixers alone: ' + ', '.join(f'dim {d}, {h} heads' for d, h in dims) +
                   '; input (batch, side, side, dim), tokens = side². ')
    if backbone:
        out.append('Backbone: ' + ', '.join(sorted({r['model'] for r in backbone})) +
                   ' with the mixer in every global block (`global_mixer`), images H × W. ')
    out.append('Slopes are least-squares fits of log time (per input) and log peak memory against log tokens '
               '(alone) or log pixels (backbone): 1 is linear, 2 quadratic; "top" fits the two largest sizes only '
               '(fixed overheads flatten the small sizes). Memory is the activation memory of one call.\n')
    for gkey in dict.fromkeys(_group_key(r) for r in rows):
        out.append(f'## {_group_title(gkey)}\n')
        a, b = slopes.get((gkey, 'alone'), {}), slopes.get((gkey, 'backbone'), {})
        names = list(dict.fromkeys([*a, *b]))
        out.append('| mixer | time vs tokens | top | memory vs tokens | top | largest tokens | backbone time vs '
                   'pixels | backbone memory vs pixels | not run |')
        out.append('|---' * 9 + '|')
        for name in names:
            sa, sb = a.get(name, {}), b.get(name, {})
            largest = sa.get('largest')
            out.append(f'| {name} | {_slope(sa.get("time"))} | {_slope(sa.get("time_top"))} | '
                       f'{_slope(sa.get("memory"))} | {_slope(sa.get("memory_top"))} | '
                       f'{"—" if largest is None else f"{largest:,}"} | {_slope(sb.get("time"))} | '
                       f'{_slope(sb.get("memory"))} | {sa.get("not_run", 0) + sb.get("not_run", 0)} |')
        out.append('')
        group_alone = [r for r in alone if _group_key(r) == gkey]
        group_backbone = [r for r in backbone if _group_key(r) == gkey]
        if group_alone:
            out += ['**Mixers alone**: ms per input (peak MiB), by token grid\n',
                    *_size_table(group_alone, 'mixer'), '']
        if group_backbone:
            out += ['**Backbone**: ms per image (peak MiB), by image size\n',
                    *_size_table(group_backbone, 'global mixer'), '']
    failed = [r for r in rows if r.get('status') != 'ok']
    if failed:
        out.append('## Not run\n')
        for r in failed:
            what = f'{series_name(r)} alone' if r.get('kind') == 'mixer' else f'{r["model"]}[{series_name(r)}]'
            out.append(f'* {what} {r["height"]}×{r["width"]}, {r["mode"]} {r["dtype"]} b{r["batch"]}: '
                       f'{r["status"]} ({r.get("error") or "no reason recorded"})')
        out.append('')
    return '\n'.join(out)


def plot_mixers(rows: Sequence[dict[str, Any]], out_dir: str | Path, environment: dict[str, Any] | None = None,
                ) -> list[Path]:
    """Log-log plots with fitted slopes per mixer: ``mixers_alone_*.png`` (time per input and peak memory against
    tokens) and ``mixers_backbone_*.png`` (time per image and peak memory against pixels); legends give each fit
    over all sizes and over the two largest ("top"). Returns the paths."""
    alone, backbone = _split(rows)
    paths = []
    if alone:
        dims = ', '.join(sorted({f'dim {r["dim"]}, {r["heads"]} heads' for r in alone}))
        paths += plot_scaling(alone, out_dir, environment, series=series_name, prefix='mixers_alone',
                              x_label='tokens (grid side²)', time_label='time per input (ms)',
                              title=f'mixers alone ({dims})', top_slope=True)
    if backbone:
        models = ', '.join(sorted({r['model'] for r in backbone}))
        paths += plot_scaling(backbone, out_dir, environment, series=series_name, prefix='mixers_backbone',
                              title=f'{models} per global mixer', top_slope=True)
    return paths


def default_memory_cap_mib(fraction: float = 0.8) -> float | None:
    """``fraction`` of the CPU memory available now: the default data cap of each isolated configuration (None
    where unknown, or where the cap, a POSIX resource limit, cannot be set)."""
    available = available_memory_mib('cpu')
    return None if available is None or os.name != 'posix' else fraction * available
