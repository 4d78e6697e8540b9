"""``l2vit bench``: time and memory of timm models across input sizes, batch sizes, precisions and devices.

Each configuration (model × size × batch × mode × precision) gets warm-up calls, then timed calls until enough
calls and seconds are done; the median and the interquartile range are reported, with CUDA synchronised around
every call. Peak memory is measured on the first call: CUDA's max allocated bytes, or on CPU the peak RSS of a
fresh process per configuration minus its baseline. MACs come from ``l2vit.bench.count_macs``. A model that cannot
run a configuration (fixed input size, out of memory, timeout, error) gets a row saying so and the sweep goes on.

With --paired (or ``paired: true`` on a suite sweep) the models of each configuration are timed in one process,
alternating call by call, so slow drift of the machine between processes does not enter the ratios between them
(on these shared CPUs it moves a ratio by up to 40% between runs); such rows carry no peak memory. The targets take
their speed ratios from paired rows where the run has them.

Writes OUT/results.json, OUT/results.csv (environment header + rows), OUT/scaling_*.png (log-log time and memory
against pixels with fitted slopes) and OUT/results.md (tables, and the project's targets where the run covers them).

With --mixers it benchmarks token mixers instead of models: each mixer alone (dim --mixer-dim, --mixer-heads heads)
on square token grids (--tokens: grid sides), then --backbone (l2vit_tiny) with each mixer as its global mixer at
--backbone-sizes. A size whose time or memory, extrapolated from the mixer's smaller sizes, would pass --timeout or
the memory cap is recorded as skipped; each CPU process's data memory is capped (--memory-limit), so a
misjudged one ends as oom. Writes OUT/mixers.json, OUT/mixers.csv, OUT/mixers_*.png (log-log time and memory
against tokens or pixels, with fitted slopes per mixer) and OUT/mixers.md (slopes per mixer, then every cell).

Examples:
  l2vit bench --sizes 224 512 1024 --batch-sizes 1
  l2vit bench --models l2vit_tiny swin_tiny_patch4_window7_224 --sizes 224 --batch-sizes 16 --dtypes fp32 bf16
  l2vit bench --suite benchmarks/suites/cpu.yaml --out benchmarks/results/cpu
  l2vit bench --mixers all --tokens 14 28 56 112 256 --backbone-sizes 224 448 896 --threads 2 --out mixer-results
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

DEFAULT_MODELS = ('l2vit_tiny', 'swin_tiny_patch4_window7_224', 'convnext_tiny', 'deit_small_patch16_224')
DEFAULT_SIZES = ('224', '384', '512', '768', '1024')
DEFAULT_TOKENS = ('14', '28', '56', '112', '256')
DEFAULT_BACKBONE_SIZES = ('224', '448', '896')
_SWEEP_KEYS = ('models', 'sizes', 'batch_sizes', 'modes', 'dtypes', 'casts', 'compile', 'freeze', 'paired', 'warmup',
               'min_reps', 'min_time', 'max_time', 'keep_freed_memory')
_MIXER_KEYS = ('mixers', 'mixer_dim', 'mixer_heads', 'tokens', 'backbone', 'backbone_sizes')


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('bench', help='benchmark time and memory of models across sizes, batches and precisions',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--suite', default=None, metavar='YAML',
                   help='a suite file: its settings replace the defaults, and its "sweeps" list runs one sweep per '
                        'entry (keys: models, sizes, batch_sizes, modes, dtypes, casts, compile, freeze, paired, '
                        'warmup, min_reps, min_time, max_time, keep_freed_memory)')
    p.add_argument('--models', nargs='+', default=None, help=f'timm model names (default: {" ".join(DEFAULT_MODELS)})')
    p.add_argument('--sizes', nargs='+', default=None, metavar='S|HxW',
                   help=f'input sizes, square (512) or HxW (512x1024) (default: {" ".join(DEFAULT_SIZES)})')
    p.add_argument('--batch-sizes', nargs='+', type=int, default=None, help='batch sizes (default: 1)')
    p.add_argument('--modes', nargs='+', choices=('infer', 'train'), default=None,
                   help='infer: forward in inference mode; train: forward, backward and an AdamW step '
                        '(default: infer)')
    p.add_argument('--dtypes', nargs='+', choices=('fp32', 'bf16', 'fp16'), default=None,
                   help='precisions (default: fp32)')
    p.add_argument('--casts', nargs='+', choices=('autocast', 'model'), default=None,
                   help='how bf16/fp16 is applied: torch.autocast, or the model and input cast (default: autocast)')
    p.add_argument('--device', default=None, help='cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)')
    p.add_argument('--threads', type=int, default=None, help='CPU threads per configuration (default: PyTorch\'s)')
    p.add_argument('--compile', action='store_true', default=None, help='torch.compile every model')
    p.add_argument('--freeze', action='store_true', default=None,
                   help='compile inference with the weights frozen into the graph (l2vit.export.compile_for_inference:'
                        ' oneDNN prepacks them and fuses pointwise ops; the fastest bf16 CPU path); implies '
                        '--compile; training configurations are compiled without it')
    p.add_argument('--paired', action='store_true', default=None,
                   help='time the models of each configuration in one process, alternating call by call, so drift '
                        'between processes does not enter their ratios (no peak memory: the models share the '
                        'process)')
    p.add_argument('--keep-freed-memory', action='store_true', default=None,
                   help='run every configuration with glibc keeping large freed blocks for reuse, as l2vit\'s own '
                        'train / eval / predict commands do on CPU (l2vit.engine.malloc); default: glibc\'s settings')
    p.add_argument('--slow-half-precision', action='store_true', default=None,
                   help='time bf16/fp16 (and check bf16 precision) on a CPU for which oneDNN has no kernels of that '
                        'precision too; by default such configurations are recorded as skipped, since PyTorch\'s '
                        'generic fallback takes minutes per call')
    p.add_argument('--channels-last', action='store_true', default=None,
                   help='put every model and input in channels-last memory format')
    p.add_argument('--warmup', type=int, default=None, help='untimed calls before timing (default: 2)')
    p.add_argument('--min-reps', type=int, default=None, help='fewest timed calls (default: 5)')
    p.add_argument('--min-time', type=float, default=None, help='fewest seconds of timed calls (default: 2)')
    p.add_argument('--max-time', type=float, default=None,
                   help='no timed call starts after this many seconds once --min-reps are done (default: 60)')
    p.add_argument('--timeout', type=float, default=None,
                   help='seconds a CPU configuration may take before it is recorded as a timeout (default: 900)')
    p.add_argument('--no-memory', dest='memory', action='store_false', default=None,
                   help='skip the peak-memory measurement')
    p.add_argument('--no-gemm', dest='gemm', action='store_false', default=None,
                   help='skip measuring the device\'s matrix-multiply rate (the efficiency yardstick)')
    p.add_argument('--check-precision', dest='check_precision', nargs='*', default=None, metavar='MODEL',
                   help='also compare bf16 logits with fp32 on real photos for these models (no names: l2vit_tiny)')
    p.add_argument('--checkpoint', default=None, help='weights file for --check-precision (default: random weights)')
    p.add_argument('--no-plot', dest='plot', action='store_false', default=None, help='skip the PNG plots')
    p.add_argument('--out', default=None, help='output folder (default: bench-results)')
    p.add_argument('--memory-limit', type=float, default=None, metavar='MIB',
                   help='cap each CPU configuration process\'s data memory at this many MiB: an allocation past it '
                        'is recorded as oom (default: none; with --mixers 80%% of the memory available at the start)')
    mix = p.add_argument_group('mixer benchmark (replaces the model sweep)')
    mix.add_argument('--mixers', nargs='+', default=None, metavar='NAME',
                     help="token mixers to benchmark alone and inside --backbone ('all': every registered global "
                          "mixer and 'window' for reference)")
    mix.add_argument('--mixer-dim', type=int, default=None, help='token width of the mixers alone (default: 64)')
    mix.add_argument('--mixer-heads', type=int, default=None, help='heads of the mixers alone (default: 2)')
    mix.add_argument('--tokens', nargs='*', default=None, metavar='S|HxW',
                     help=f'token grids of the mixers alone, a side S (S×S tokens) or HxW; none: skip the mixers '
                          f'alone (default: {" ".join(DEFAULT_TOKENS)})')
    mix.add_argument('--backbone', default=None,
                     help='model built with each mixer as its global_mixer (default: l2vit_tiny)')
    mix.add_argument('--backbone-sizes', nargs='*', default=None, metavar='S|HxW',
                     help=f'image sizes of the backbone; none: skip the backbone '
                          f'(default: {" ".join(DEFAULT_BACKBONE_SIZES)})')
    p.set_defaults(run=run)


def parse_size(text: str | int) -> tuple[int, int]:
    """``'512'`` → (512, 512); ``'512x1024'`` → (512, 1024) (height × width)."""
    text = str(text).lower()
    try:
        parts = [int(v) for v in text.split('x')]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"size must be a positive int (512) or HxW (512x1024), got '{text}'")
    return parts[0], parts[1]


def _load_suite(path: str) -> dict[str, Any]:
    import yaml
    suite_path = Path(path)
    if not suite_path.is_file():
        raise FileNotFoundError(f'suite file not found: {path}')
    suite = yaml.safe_load(suite_path.read_text()) or {}
    if not isinstance(suite, dict):
        raise ValueError(f'{path}: a suite must be a mapping of settings, got {type(suite).__name__}')
    known = {'name', 'sweeps', *_SWEEP_KEYS, *_MIXER_KEYS, 'device', 'threads', 'channels_last', 'warmup',
             'min_reps', 'min_time', 'max_time', 'timeout', 'memory', 'gemm', 'check_precision', 'checkpoint', 'plot',
             'out', 'memory_limit'}
    unknown = set(suite) - known
    for sweep in suite.get('sweeps', []):
        unknown |= set(sweep) - set(_SWEEP_KEYS) - {'name'}
    if unknown:
        raise ValueError(f'{path}: unknown suite keys {sorted(unknown)}; expected some of {sorted(known)}')
    return suite


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Merge defaults < suite < command line; return (settings, sweeps)."""
    import torch
    settings: dict[str, Any] = dict(
        models=list(DEFAULT_MODELS), sizes=list(DEFAULT_SIZES), batch_sizes=[1], modes=['infer'], dtypes=['fp32'],
        casts=['autocast'], device='cuda' if torch.cuda.is_available() else 'cpu', threads=None, compile=False,
        freeze=False, paired=False, keep_freed_memory=False, slow_half_precision=False, channels_last=False, warmup=2, min_reps=5, min_time=2.0, max_time=60.0,
        timeout=900.0,
        memory=True, gemm=True, check_precision=None, checkpoint=None, plot=True, out='bench-results',
        memory_limit=None, mixers=None, mixer_dim=64, mixer_heads=2, tokens=list(DEFAULT_TOKENS), backbone='l2vit_tiny',
        backbone_sizes=list(DEFAULT_BACKBONE_SIZES))
    suite = _load_suite(args.suite) if args.suite else {}
    settings.update({k: v for k, v in suite.items() if k != 'sweeps'})
    cli = {k: v for k, v in vars(args).items() if k in settings and v is not None}
    settings.update(cli)
    if settings['mixers']:
        model_keys = sorted({k for k in ('models', 'sizes', 'sweeps') if k in suite or k in cli})
        if model_keys:
            raise ValueError(f'{", ".join(model_keys)} belong to the model sweep, which --mixers replaces; give the '
                             f'mixer benchmark --tokens, --backbone and --backbone-sizes instead')
        if settings['channels_last']:
            raise ValueError('--channels-last does not apply to --mixers (mixer inputs are (B, H, W, C) tokens)')
        if settings['freeze']:
            raise ValueError('--freeze does not apply to --mixers (use --compile)')
        if settings['paired']:
            raise ValueError('--paired does not apply to --mixers (each mixer is timed in its own process)')
    elif any(k in cli or k in suite for k in _MIXER_KEYS):
        given = sorted(k for k in _MIXER_KEYS if k in cli or k in suite)
        raise ValueError(f'{", ".join(given)} belong to the mixer benchmark: give --mixers too')
    if settings['check_precision'] == []:
        settings['check_precision'] = ['l2vit_tiny']
    base = {k: settings[k] for k in _SWEEP_KEYS}
    sweeps = [dict(base, **{k: v for k, v in s.items() if k != 'name'}) for s in suite.get('sweeps', [])]
    cli_sweep = {k: cli[k] for k in _SWEEP_KEYS if k in cli}
    if not sweeps:
        sweeps = [base]
    elif cli_sweep:  # command-line sweep keys narrow every suite sweep
        sweeps = [dict(s, **cli_sweep) for s in sweeps]
    return settings, sweeps


def _configs(settings: dict[str, Any], sweeps: list[dict[str, Any]]):
    from ..bench.runner import BenchConfig
    seen = set()
    for sweep in sweeps:
        sizes = [parse_size(s) for s in sweep['sizes']]
        for batch, mode, dtype, model, (h, w) in itertools.product(
                sweep['batch_sizes'], sweep['modes'], sweep['dtypes'], sweep['models'], sizes):
            for cast in (['none'] if dtype == 'fp32' else sweep['casts']):
                cfg = BenchConfig(
                    model=model, height=h, width=w, batch=batch, mode=mode, dtype=dtype, cast=cast,
                    device=settings['device'], threads=settings['threads'],
                    compile=bool(sweep['compile'] or sweep['freeze']),
                    freeze=bool(sweep['freeze'] and mode == 'infer'),
                    channels_last=settings['channels_last'], warmup=sweep['warmup'], min_reps=sweep['min_reps'],
                    min_time=sweep['min_time'], max_time=sweep['max_time'],
                    memory=bool(settings['memory'] and not sweep['paired']), paired=bool(sweep['paired']),
                    keep_freed_memory=bool(sweep['keep_freed_memory']))
                if cfg not in seen:
                    seen.add(cfg)
                    yield cfg


def _mixer_configs(settings: dict[str, Any]):
    from ..bench.mixers import mixer_sweep, resolve_mixers
    mixers = resolve_mixers(settings['mixers'])
    grids = [parse_size(s) for s in settings['tokens']]
    sizes = [parse_size(s) for s in settings['backbone_sizes']]
    common = {k: settings[k] for k in ('device', 'threads', 'compile', 'warmup', 'min_reps', 'min_time', 'max_time',
                                       'memory')}
    seen = set()
    for batch, mode, dtype in itertools.product(settings['batch_sizes'], settings['modes'], settings['dtypes']):
        for cast in (['none'] if dtype == 'fp32' else settings['casts']):
            for cfg in mixer_sweep(mixers, grids, settings['mixer_dim'], settings['mixer_heads'],
                                   settings['backbone'], sizes, batch=batch, mode=mode, dtype=dtype, cast=cast,
                                   **common):
                if cfg not in seen:
                    seen.add(cfg)
                    yield cfg


def _progress(row: dict[str, Any]) -> None:
    from ..bench.runner import BenchConfig
    fields = {k: row[k] for k in BenchConfig.__dataclass_fields__}
    label = BenchConfig(**fields).label()
    if row['status'] == 'ok':
        spread = row['time_q75_ms'] - row['time_q25_ms']
        mem = f'{row["peak_mib"]:8.0f} MiB' if row.get('peak_mib') is not None else '       — MiB'
        unit = 'in/s ' if row.get('kind') == 'mixer' else 'img/s'  # mixers: token maps per second
        print(f'{label:<62} {row["time_ms"]:10.1f} ms ±{spread:7.1f} {row["img_per_s"]:9.2f} {unit} {mem}',
              flush=True)
    else:
        print(f'{label:<62} {row["status"]}: {row["error"][:100]}', flush=True)


def _slow_half(settings: dict[str, Any], dtype: str, device: str) -> str | None:
    """Why ``dtype`` is not measured on ``device`` (half precision on a CPU without oneDNN kernels for it: the
    configurations are recorded as skipped, the GEMM rate and the precision check left out), or None, always None
    with ``--slow-half-precision``."""
    from ..bench.env import missing_half_kernels
    return None if settings['slow_half_precision'] else missing_half_kernels(dtype, device)


def _half_guard(settings: dict[str, Any]):
    """The sweep's ``skip`` for :func:`_slow_half` configurations."""
    return lambda cfg, _rows: _slow_half(settings, cfg.dtype, cfg.device)


def run(args: argparse.Namespace) -> int:
    import torch

    from .._io import atomic_write_text
    from ..bench.env import environment
    from ..bench.gemm import gemm_gflops
    from ..bench.report import plot_scaling, results_markdown, write_results
    from ..bench.runner import DTYPES, run_sweep
    from ..bench.targets import format_targets
    settings, sweeps = _settings(args)
    mixers = bool(settings['mixers'])
    configs = list(_mixer_configs(settings) if mixers else _configs(settings, sweeps))
    if not configs:
        raise ValueError('nothing to run: the sweep has no models, sizes or batch sizes' if not mixers else
                         'nothing to run: the mixer benchmark has no --tokens, --backbone-sizes or batch sizes')
    device = settings['device']
    if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available")
    if settings['threads']:
        torch.set_num_threads(settings['threads'])
    out = Path(settings['out'])
    env = environment(device, settings['threads'])
    env['suite'] = settings.get('name') or (args.suite or 'command line')
    print(f'l2vit bench: {len(configs)} configurations on {env["device_name"]}, torch {env["torch"]}, '
          f'{env["threads"]} threads -> {out}', flush=True)
    if settings['gemm']:
        dtypes = sorted({c.dtype for c in configs} | {'fp32'}, key=list(DTYPES).index)
        # half precision without kernels on this CPU: not measured (a 2048² bf16 multiply takes half a minute)
        env['gemm_gflops'] = {d: None if _slow_half(settings, d, device) else round(gemm_gflops(DTYPES[d], device), 1)
                              for d in dtypes}
        print('GEMM rate (2048², GFLOP/s): ' + ', '.join(f'{k} {"not measured" if v is None else f"{v:.0f}"}'
                                                          for k, v in env['gemm_gflops'].items()))
    slow_half = _slow_half(settings, 'bf16', device)
    if settings['check_precision'] and slow_half:
        env['precision_skipped'] = slow_half
        print(f'precision check skipped: {slow_half}', flush=True)
    elif settings['check_precision']:
        from ..bench.precision import precision_check
        env['precision'] = []
        # every bf16 path the sweep times: autocast and model cast, and compiled with frozen weights if it has that
        paths = [('autocast', False), ('model', False)]
        paths += sorted({(c.cast, True) for c in configs if c.freeze and c.dtype == 'bf16'})
        for model in settings['check_precision']:
            for cast, freeze in paths:
                rep = precision_check(model, 'bf16', cast, checkpoint=settings['checkpoint'], device=device,
                                      freeze=freeze)
                env['precision'].append(rep.as_dict())
                how = cast + (', frozen' if freeze else '')
                print(f'precision {model} bf16 {how}: top-1 agreement {rep.top1_agreement:.3f} on {rep.images} '
                      f'photos ({rep.weights} weights; {rep.decisive_images} decisive: {rep.decisive_agreement}), '
                      f'max |Δlogit| {rep.max_abs_error:.3g}', flush=True)
    if mixers:
        return _run_mixers(settings, configs, env, out)
    rows: list[dict[str, Any]] = []

    def on_result(row):
        rows.append(row)
        _progress(row)
        write_results(out, env, rows)  # after every row: an interrupted sweep keeps what it measured

    run_sweep(configs, timeout=settings['timeout'], on_result=on_result, skip=_half_guard(settings),
              memory_limit_mib=settings['memory_limit'])
    plots = plot_scaling(rows, out, env) if settings['plot'] else []
    md, targets = results_markdown(env, rows)
    atomic_write_text(out / 'results.md', md)
    print(f'wrote {out / "results.csv"}, results.json, results.md' + (f' and {len(plots)} plot(s)' if plots else ''))
    if targets:
        print(format_targets(targets))
    _report_failures(rows, 'results.csv')
    return 0


def _report_failures(rows: list[dict[str, Any]], where: str) -> None:
    failed = [r for r in rows if r['status'] not in ('ok', 'unsupported', 'oom', 'timeout', 'skipped')]
    if failed:
        print(f'{len(failed)} configuration(s) failed with errors; see {where}', file=sys.stderr)


def _run_mixers(settings: dict[str, Any], configs: list, env: dict[str, Any], out: Path) -> int:
    """The mixer benchmark: run ``configs`` (mixers alone, then the backbone per mixer) and write OUT/mixers.*."""
    import torch

    from .._io import atomic_write_text
    from ..bench.mixers import ScalingGuard, default_memory_cap_mib, mixers_markdown, plot_mixers
    from ..bench.report import write_results
    from ..bench.runner import run_sweep
    cap = settings['memory_limit']
    if cap is None and torch.device(settings['device']).type == 'cpu':
        cap = default_memory_cap_mib()
    env['mixer_memory_cap_mib'] = None if cap is None else round(cap)
    rows: list[dict[str, Any]] = []

    def on_result(row):
        rows.append(row)
        _progress(row)
        write_results(out, env, rows, name='mixers')  # after every row: an interrupted sweep keeps what it measured

    scaling, half = ScalingGuard(timeout=settings['timeout'], memory_limit_mib=cap), _half_guard(settings)

    def guard(cfg, done):
        return half(cfg, done) or scaling(cfg, done)

    run_sweep(configs, timeout=settings['timeout'], on_result=on_result, skip=guard, memory_limit_mib=cap)
    plots = plot_mixers(rows, out, env) if settings['plot'] else []
    atomic_write_text(out / 'mixers.md', mixers_markdown(rows, env))
    print(f'wrote {out / "mixers.csv"}, mixers.json, mixers.md' + (f' and {len(plots)} plot(s)' if plots else ''))
    _report_failures(rows, 'mixers.csv')
    return 0
