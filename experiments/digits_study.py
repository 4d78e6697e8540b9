"""Train small L²ViT variants over several seeds and report accuracy, cost and attention concentration.

Two suites share one protocol (the digits demo recipe, shortened to ``--epochs``):

* ``ablation`` (the analysis issue): global softmax vs plain ReLU linear vs enhanced linear (L²ViT) in the same
  backbone, and the paper's knobs: all-LWA, all-LGA, LGA without its LCM, clamp value, temperature placement.
* ``mixers`` (the mixer-family issue): every registered global mixer in place of LGA's attention (blocks keep the
  LCM), next to L²ViT's own linear attention and global softmax.

Each (variant, seed) trains in its own process (``--jobs`` at a time, one thread each) and writes
``<output>/<variant>/seed<k>/result.json``: final validation top-1 of the model and of its EMA, training throughput
(median over epochs), inference throughput and the peak memory of one training step, and the concentration
metrics of :func:`l2vit.analysis.analyze_model` on validation images. ``reanalyze --timing`` recomputes the metrics
from the saved weights and re-measures throughput one model at a time (the training runs share the cores, so their
own timings are noisy). ``report`` aggregates the runs as mean ± 95% Student-t interval over seeds (speed and memory:
the median) into ``results[_<suite>].{md,csv,json}``.

    python experiments/digits_study.py run --suite ablation --seeds 0 1 2 --output runs/study
    python experiments/digits_study.py run --suite mixers --seeds 0 1 2 --output runs/study
    python experiments/digits_study.py reanalyze --output runs/study --timing     # on an otherwise idle machine
    python experiments/digits_study.py report --output runs/study --suite ablation
    python experiments/digits_study.py run --suite ablation --data-dir /data/my_imagefolder --input-size 64 ...

Runs already finished (``result.json`` present) are skipped, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# mixer family (the baselines 'linear' = L²ViT and 'softmax' are in the ablation suite)
FAMILY = ['flatten', 'inline', 'rala', 'rala_softmax', 'vig_gla', 'masa', 'masa_decomposed', 'vicinity', 'castling',
          'castling_sparse', 'vitality', 'fcvit']

# variant -> (model kwargs on top of the recipe's, description)
ABLATION: dict[str, tuple[dict[str, Any], str]] = {
    'l2vit': ({}, 'L²ViT: LWA + enhanced LGA (ReLU linear + LCM), clamp 100, τ on the output'),
    'softmax': ({'global_mixer': 'softmax', 'use_lcm': False}, 'LWA + global softmax attention (no LCM)'),
    'softmax_lcm': ({'global_mixer': 'softmax'}, 'LWA + global softmax attention + LCM'),
    'linear_plain': ({'use_lcm': False}, 'LWA + plain ReLU linear attention (LGA without LCM)'),
    'all_lwa': ({'block_pattern': ['window']}, 'every block LWA'),
    'all_lga': ({'block_pattern': ['linear']}, 'every block enhanced LGA'),
    'clamp_0.01': ({'clamp_min': 0.01}, 'L²ViT with denominator clamp 0.01'),
    'clamp_1': ({'clamp_min': 1.0}, 'L²ViT with denominator clamp 1'),
    'clamp_1e4': ({'clamp_min': 1e4}, 'L²ViT with denominator clamp 10⁴'),
    'temp_key': ({'mixer_kwargs': {'linear': {'temperature': 'key'}}}, 'L²ViT with τ on φ(k) instead of the output'),
    'temp_fixed': ({'mixer_kwargs': {'linear': {'temperature': 'fixed'}}}, 'L²ViT with a fixed τ = d^-1/2'),
}
MIXERS: dict[str, tuple[dict[str, Any], str]] = {
    'l2vit': ABLATION['l2vit'],
    'softmax_lcm': ABLATION['softmax_lcm'],
    **{f'mixer_{m}': ({'global_mixer': m}, f'LWA + {m} in place of LGA\'s attention (+ LCM)') for m in FAMILY},
}
SUITES = {'ablation': ABLATION, 'mixers': MIXERS}
VARIANTS = {**ABLATION, **MIXERS}

METRICS = ('val_top1', 'ema_val_top1', 'val_loss', 'ema_val_loss', 'train_images_per_s', 'infer_images_per_s', 'train_step_peak_mib',
           'infer_peak_mib', 'params_k', 'macs_m', 'global/entropy', 'global/distance_px', 'global/top1_mass', 'window/entropy',
           'window/distance_px', 'erf/with_lcm/mean_distance_px', 'erf/without_lcm/mean_distance_px',
           'erf/with_lcm/center_fraction', 'erf/without_lcm/center_fraction', 'erf/block/mean_distance_px',
           'global/top9_mass', 'global/negative_mass', 'global/clamped_fraction', 'global/row_mass')


def _config(variant: str, seed: int, args: argparse.Namespace, run_dir: Path):
    from l2vit.engine.config import config_from_dict
    from l2vit.engine.presets import DIGITS_DEMO
    data = copy.deepcopy(DIGITS_DEMO)
    kwargs, _ = VARIANTS[variant]
    data['model']['kwargs'].update(copy.deepcopy(kwargs))
    data.update(epochs=args.epochs, seed=seed, output=str(run_dir), threads=1, device='cpu')
    data['log'] = {**data.get('log', {}), 'progress': 'none'}
    data['checkpoint'] = {**data.get('checkpoint', {}), 'keep_last': 1}
    if args.data_dir:
        data['data']['data_dir'] = args.data_dir
        data['data'].pop('mean', None)
        data['data'].pop('std', None)
    if args.input_size:
        data['data']['input_size'] = args.input_size
    return config_from_dict(data)


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant with one seed in this process and measure it."""
    import timm
    import torch

    from l2vit.bench import count_macs
    from l2vit.bench.memory import measure_peak_memory
    from l2vit.bench.timing import time_callable
    from l2vit.engine.checkpoint import atomic_write_text
    from l2vit.engine.trainer import Trainer

    run_dir = Path(args.output) / variant / f'seed{seed}'
    cfg = _config(variant, seed, args, run_dir / 'train')
    torch.set_num_threads(1)
    # memory first, while this process's heap is fresh (after training, freed memory would hide the peak)
    size = cfg.data.input_size
    probe = timm.create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    batch = torch.randn(cfg.batch_size, 3, size, size)
    step_peak = measure_peak_memory(lambda: probe(batch).sum().backward()).peak / 2 ** 20
    with torch.no_grad():
        infer_peak = measure_peak_memory(lambda: probe.eval()(batch)).peak / 2 ** 20
    macs = count_macs(probe.eval(), (3, size, size)).total / 1e6
    t0 = time.perf_counter()
    trainer = Trainer(cfg, overwrite=True)
    result = trainer.fit()
    wall = time.perf_counter() - t0
    torch.set_num_threads(1)
    model = trainer.model.eval()
    out: dict[str, Any] = {
        'variant': variant, 'seed': seed, 'description': VARIANTS[variant][1], 'status': result.status,
        'epochs': cfg.epochs, 'wall_s': round(wall, 1), 'model_kwargs': VARIANTS[variant][0],
        'params_k': sum(p.numel() for p in model.parameters()) / 1e3,
        'val_top1': result.final.get('val_top1', math.nan), 'ema_val_top1': result.final.get('ema_val_top1', math.nan),
        'val_loss': result.final.get('val_loss', math.nan), 'ema_val_loss': result.final.get('ema_val_loss', math.nan),
        'train_images_per_s': statistics.median(r['train_images_per_s'] for r in trainer.history)
        if trainer.history else math.nan,
    }
    images = next(iter(trainer.val_loader))[0]
    images = images[:64]
    with torch.no_grad():
        stats = time_callable(lambda: model(images), warmup=2, min_reps=5, min_time=1.0, max_reps=50)
    out['infer_images_per_s'] = images.shape[0] / stats.median
    out.update(train_step_peak_mib=step_peak, infer_peak_mib=infer_peak, macs_m=macs)
    if result.status == 'completed':
        out.update(_concentration(model, images[:16], variant))
    atomic_write_text(run_dir / 'result.json', json.dumps(out, indent=1) + '\n')
    return out


def _analysis_images(cfg, count: int = 16):
    """The first ``count`` validation images of the run's data, normalised as in evaluation."""
    import torch

    from l2vit.data import build_eval_transform, build_sources
    d = cfg.data
    _, val = build_sources(d.data_dir, d.train_split, d.val_split, d.val_fraction)
    tf = build_eval_transform(d.input_size, d.crop_pct, d.interpolation, d.mean, d.std)
    return torch.stack([tf(val.load(i)) for i in range(min(count, len(val)))])


def _concentration(model, images, label: str) -> dict[str, float]:
    from l2vit.analysis import analyze_model
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # mixers without attention maps are reported as such
        result = analyze_model(model, images, label=label, erf=True)
    out = {k: float(v) for k, v in result.summary().items()}
    for block in result.blocks:  # per block too: averages over stages of 64, 16 and 4 tokens can hide a stage effect
        stats = block.stats.to_dict()
        for key in ('entropy', 'distance_px', 'top1_mass'):
            out[f'block/{block.name}/{key}'] = float(stats[key]['mean'])
    return out


def _throughput(model, images, batch: int) -> tuple[float, float]:
    """Images/s of inference and of a training step (forward, cross-entropy backward, AdamW) at ``batch``."""
    import torch

    from l2vit.bench.timing import time_callable
    x = images[:batch]
    if x.shape[0] < batch:
        x = x.repeat((batch + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:batch]
    model = copy.deepcopy(model)
    with torch.no_grad():
        infer = time_callable(lambda: model.eval()(x), warmup=2, min_reps=10, min_time=1.0, max_reps=100)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.arange(batch) % model.num_classes

    def step():
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train = time_callable(step, warmup=2, min_reps=5, min_time=1.5, max_reps=50)
    return batch / infer.median, batch / train.median


def cmd_reanalyze(args: argparse.Namespace) -> int:
    """Recompute the concentration metrics of finished runs from their final weights (e.g. after the analysis
    tools learned another mixer), updating each ``result.json`` in place. With ``--timing`` also re-measure
    throughput one model at a time (run it on an otherwise idle machine: the training runs share the cores)."""
    import torch

    from l2vit.engine.checkpoint import atomic_write_text
    from l2vit.engine.weights import build_inference_model
    torch.set_num_threads(1)
    for path in sorted(Path(args.output).glob('*/seed*/result.json')):
        r = json.loads(path.read_text())
        if args.variants and r['variant'] not in args.variants:
            continue
        weights = path.parent / 'train' / 'checkpoints' / f'epoch-{r["epochs"]:04d}'
        if r['status'] != 'completed' or not weights.is_dir():
            print(f'{path.parent}: skipped (status {r["status"]}, weights {weights} present: {weights.is_dir()})')
            continue
        cfg = _config(r['variant'], r['seed'], args, path.parent / 'train')
        model = build_inference_model(weights, use_ema=False).model.eval()
        images = _analysis_images(cfg, 64 if args.timing else 16)
        metrics = _concentration(model, images[:16], r['variant'])
        r = {k: v for k, v in r.items() if not k.startswith(('global/', 'window/', 'erf/', 'block/'))}
        r.update(metrics)
        if args.timing:
            r['infer_images_per_s'], r['train_images_per_s'] = _throughput(model, images, cfg.batch_size)
            r['timing'] = (f'one model at a time, {torch.get_num_threads()} thread, batch {cfg.batch_size}: '
                           f'inference and a training step (forward, backward, AdamW)')
        with open(path.parent / 'train' / 'summary.csv', newline='') as f:
            last = list(csv.DictReader(f))[-1]
        r.update({k: float(last[k]) for k in ('val_loss', 'ema_val_loss') if last.get(k)})
        atomic_write_text(path, json.dumps(r, indent=1) + '\n')
        print(f'{path.parent}: {len(metrics)} metrics', flush=True)
    return 0


def _pending(variants: list[str], seeds: list[int], output: Path) -> list[tuple[str, int]]:
    return [(v, s) for s in seeds for v in variants if not (output / v / f'seed{s}' / 'result.json').is_file()]


def cmd_run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    variants = list(SUITES[args.suite]) if args.suite else []
    variants += [v for v in args.variants or [] if v not in variants]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f'unknown or no variants {unknown}; choose from {sorted(VARIANTS)} or --suite {list(SUITES)}')
    todo = _pending(variants, args.seeds, output)
    print(f'{len(todo)} runs to do ({len(variants)} variants x seeds {args.seeds}, {args.jobs} at a time)', flush=True)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    base = [sys.executable, __file__, 'one', '--output', str(output), '--epochs', str(args.epochs)]
    if args.data_dir:
        base += ['--data-dir', args.data_dir]
    if args.input_size:
        base += ['--input-size', str(args.input_size)]
    running: list[tuple[subprocess.Popen, str, int, float]] = []
    failed = 0
    while todo or running:
        while todo and len(running) < args.jobs:
            v, s = todo.pop(0)
            log = output / v / f'seed{s}' / 'run.log'
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, 'w') as f:
                proc = subprocess.Popen(base + ['--variant', v, '--seed', str(s)], stdout=f, stderr=subprocess.STDOUT,
                                        env=env)
            running.append((proc, v, s, time.perf_counter()))
        time.sleep(1)
        for item in [r for r in running if r[0].poll() is not None]:
            proc, v, s, start = item
            running.remove(item)
            res = output / v / f'seed{s}' / 'result.json'
            if proc.returncode == 0 and res.is_file():
                r = json.loads(res.read_text())
                print(f'{v} seed {s}: top-1 {r["val_top1"]:.2f}% ({time.perf_counter() - start:.0f}s)', flush=True)
            else:
                failed += 1
                print(f'{v} seed {s}: FAILED (exit {proc.returncode}); see {res.parent / "run.log"}', flush=True)
    return 1 if failed else 0


def cmd_one(args: argparse.Namespace) -> int:
    run_one(args.variant, args.seed, args)
    return 0


def _fmt(ci, digits: int) -> str:
    return ci.format(digits) if not math.isnan(ci.mean) else 'n/a'


def cmd_report(args: argparse.Namespace) -> int:
    from l2vit.analysis.stats import mean_ci
    output = Path(args.output)
    results: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(output.glob('*/seed*/result.json')):
        r = json.loads(path.read_text())
        results.setdefault(r['variant'], []).append(r)
    if not results:
        raise SystemExit(f'no result.json under {output}; run the study first')
    rows = []
    wanted = SUITES[args.suite] if args.suite else VARIANTS
    stem = f'results_{args.suite}' if args.suite else 'results'
    for variant in [v for v in wanted if v in results]:
        runs = sorted(results[variant], key=lambda r: r['seed'])
        row: dict[str, Any] = {'variant': variant, 'description': VARIANTS[variant][1],
                               'seeds': [r['seed'] for r in runs], 'status': [r['status'] for r in runs]}
        for m in METRICS:
            vals = [r[m] for r in runs if m in r]
            if vals:
                ci = mean_ci(vals)
                row[m] = {'mean': ci.mean, 'ci95': ci.half_width, 'n': ci.n, 'values': vals}
        rows.append(row)
    (output / f'{stem}.json').write_text(json.dumps(rows, indent=1) + '\n')
    with open(output / f'{stem}.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['variant', 'n'] + [f'{m}_{s}' for m in METRICS for s in ('mean', 'ci95')])
        for row in rows:
            w.writerow([row['variant'], len(row['seeds'])] + [
                row[m][s] if m in row else '' for m in METRICS for s in ('mean', 'ci95')])

    def cell(row, m, digits):
        if m not in row:
            return '—'
        return _fmt(mean_ci(row[m]['values']), digits)

    def median(row, m, digits):  # one architecture's speed measured once per seed: the median says more than a CI
        return f'{statistics.median(row[m]["values"]):.{digits}f}' if m in row else '—'
    lines = ['| variant | seeds | top-1 % | EMA top-1 % | val loss | train img/s (median) | infer img/s (median) | step MiB (median) | global entropy '
             '| global dist px | window entropy | global-block ERF dist px (with / without LCM) |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for row in rows:
        if 'erf/with_lcm/mean_distance_px' in row:
            erf = f'{cell(row, "erf/with_lcm/mean_distance_px", 2)} / {cell(row, "erf/without_lcm/mean_distance_px", 2)}'
        else:
            erf = f'{cell(row, "erf/block/mean_distance_px", 2)} (no LCM)'
        lines.append(f'| {row["variant"]} | {len(row["seeds"])} | {cell(row, "val_top1", 2)} '
                     f'| {cell(row, "ema_val_top1", 2)} | {cell(row, "val_loss", 3)} '
                     f'| {median(row, "train_images_per_s", 0)} '
                     f'| {median(row, "infer_images_per_s", 0)} | {median(row, "train_step_peak_mib", 1)} '
                     f'| {cell(row, "global/entropy", 3)} | {cell(row, "global/distance_px", 2)} '
                     f'| {cell(row, "window/entropy", 3)} | {erf} |')
    (output / f'{stem}.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    for name in ('run', 'one'):
        q = sub.add_parser(name)
        q.add_argument('--output', default='runs/study')
        q.add_argument('--epochs', type=int, default=12)
        q.add_argument('--data-dir', default=None, help='ImageFolder root (default: the built-in digits)')
        q.add_argument('--input-size', type=int, default=None)
        if name == 'run':
            q.add_argument('--suite', choices=list(SUITES), default=None)
            q.add_argument('--variants', nargs='*', default=None)
            q.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
            q.add_argument('--jobs', type=int, default=2, help='runs at a time (one thread each)')
        else:
            q.add_argument('--variant', required=True, choices=sorted(VARIANTS))
            q.add_argument('--seed', type=int, required=True)
    q = sub.add_parser('report')
    q.add_argument('--output', default='runs/study')
    q.add_argument('--suite', choices=list(SUITES), default=None, help='only this suite (results_<suite>.*)')
    q = sub.add_parser('reanalyze')
    q.add_argument('--output', default='runs/study')
    q.add_argument('--variants', nargs='*', default=None)
    q.add_argument('--timing', action='store_true', help='also re-measure throughput, one model at a time')
    q.add_argument('--epochs', type=int, default=12)
    q.add_argument('--data-dir', default=None)
    q.add_argument('--input-size', type=int, default=None)
    args = p.parse_args(argv)
    return {'run': cmd_run, 'one': cmd_one, 'report': cmd_report, 'reanalyze': cmd_reanalyze}[args.cmd](args)


if __name__ == '__main__':
    sys.exit(main())
