"""The benchmark tooling: timing statistics, peak memory, the runner, results files, plots and targets."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time

import pytest
import torch

from l2vit.bench.memory import measure_peak_memory, rss_peak_supported
from l2vit.bench.report import fit_slope, markdown_tables, plot_scaling, read_results, write_results
from l2vit.bench.runner import BenchConfig, run_config, run_group, run_sweep
from l2vit.bench.targets import evaluate_targets, format_targets
from l2vit.bench.timing import TimingStats, time_callable, time_interleaved
from l2vit.cli import build_parser, main
from l2vit.cli.bench import _configs, _settings, parse_size


def test_time_callable_counts_and_orders():
    calls = []
    stats = time_callable(lambda: calls.append(1), warmup=3, min_reps=4, min_time=0.0)
    assert len(calls) == 7 and stats.reps == 4 and stats.warmup == 3
    assert stats.min <= stats.q25 <= stats.median <= stats.q75 <= stats.max
    bounded = time_callable(lambda: None, warmup=0, min_reps=2, min_time=60.0, max_reps=11)
    assert bounded.reps == 11  # min_time not reached, max_reps stops it
    s = TimingStats.from_samples([4.0, 1.0, 3.0, 2.0], warmup=0)
    assert (s.median, s.min, s.max) == (2.5, 1.0, 4.0)
    with pytest.raises(ValueError, match='min_reps'):
        time_callable(lambda: None, min_reps=0)


def test_time_interleaved_alternates_and_rotates():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    stats = time_interleaved(fns, warmup=1, min_reps=3, min_time=0.0)
    assert [s.reps for s in stats] == [3, 3, 3] and all(s.warmup == 1 for s in stats)
    # warm-up round in order, then each round starts one later: no function always follows the same one
    assert calls == [0, 1, 2, 0, 1, 2, 1, 2, 0, 2, 0, 1]
    bounded = time_interleaved([lambda: None, lambda: None], warmup=0, min_reps=1, min_time=60.0, max_reps=7)
    assert [s.reps for s in bounded] == [7, 7]
    # max_time: rounds stop once min_reps are done and the rounds took max_time per function
    slow = time_interleaved([lambda: time.sleep(0.01)] * 2, warmup=0, min_reps=2, min_time=60.0, max_time=0.03)
    assert 2 <= slow[0].reps <= 4
    with pytest.raises(ValueError, match='at least one'):
        time_interleaved([])
    with pytest.raises(ValueError, match='min_reps'):
        time_interleaved([lambda: None], min_reps=0)


_PEAK_SCRIPT = """
import torch
from l2vit.bench.memory import measure_peak_memory
def work():
    t = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched, then freed
    return float(t[0])
print(measure_peak_memory(work).peak, measure_peak_memory(lambda: None).peak)
"""


@pytest.mark.skipif(not rss_peak_supported(), reason='needs Linux /proc/self/clear_refs to reset the RSS peak')
def test_cpu_peak_memory_sees_a_transient_allocation():
    # a fresh process, as the benchmark uses: in a long-lived one freed memory stays resident and hides new peaks
    out = subprocess.run([sys.executable, '-c', _PEAK_SCRIPT], capture_output=True, text=True, check=True).stdout
    peak, idle = (int(v) for v in out.split())
    assert 60 * 2 ** 20 <= peak <= 200 * 2 ** 20
    assert idle < 16 * 2 ** 20
    assert measure_peak_memory(lambda: None).method == 'rss_hwm'


def test_config_validation():
    with pytest.raises(ValueError, match='mode must be one of'):
        BenchConfig('m', 224, 224, mode='eval')
    with pytest.raises(ValueError, match="cast must be 'none' for fp32"):
        BenchConfig('m', 224, 224, dtype='bf16')
    assert BenchConfig('m', 224, 320, dtype='bf16', cast='model', batch=4).label() == 'm 224x320 b4 infer bf16-model cpu'
    assert parse_size('512') == (512, 512) and parse_size('320x480') == (320, 480)
    with pytest.raises(ValueError, match='HxW'):
        parse_size('big')
    with pytest.raises(ValueError, match='freeze applies to compiled inference only'):
        BenchConfig('m', 224, 224, freeze=True)
    with pytest.raises(ValueError, match='freeze applies to compiled inference only'):
        BenchConfig('m', 224, 224, compile=True, freeze=True, mode='train')
    frozen = BenchConfig('m', 224, 224, compile=True, freeze=True)
    assert frozen.label() == 'm 224x224 b1 infer fp32 cpu compiled-frozen'
    with pytest.raises(ValueError, match='peak memory cannot be measured: set memory=False'):
        BenchConfig('m', 224, 224, paired=True)
    assert BenchConfig('m', 224, 224, paired=True, memory=False).label() == 'm 224x224 b1 infer fp32 cpu paired'


def test_run_config_in_process_rows():
    fast = dict(warmup=0, min_reps=2, min_time=0.0, threads=1)
    row = run_config(BenchConfig('test_l2vit', 64, 96, batch=2, **fast))
    assert row['status'] == 'ok' and row['reps'] == 2 and row['img_per_s'] > 0
    assert row['time_q25_ms'] <= row['time_ms'] <= row['time_q75_ms']
    train = run_config(BenchConfig('test_l2vit', 64, 64, mode='train', dtype='bf16', cast='autocast', **fast))
    assert train['status'] == 'ok'
    bad = run_config(BenchConfig('no_such_model_anywhere', 64, 64, **fast))
    assert bad['status'] == 'error' and 'no_such_model_anywhere' in bad['error']


def test_sweep_in_a_fresh_process_with_costs():
    """One isolated configuration: the worker process, its JSON result line, MACs from the counter."""
    rows = run_sweep([BenchConfig('test_l2vit', 64, 64, warmup=0, min_reps=1, min_time=0.0, threads=1)],
                     isolate=True, timeout=120)
    (row,) = rows
    assert row['status'] == 'ok', row['error']
    assert row['gmacs'] == pytest.approx(0.0150, rel=0.05) and row['params_m'] == pytest.approx(0.735, rel=0.01)
    assert row['gflops'] == pytest.approx(2 * row['gmacs'] / (row['time_ms'] / 1e3))
    if rss_peak_supported():
        assert row['mem_method'] == 'rss_hwm' and row['peak_mib'] > 0


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc allocator setting')
def test_sweep_keeps_freed_memory_in_the_worker_when_asked(monkeypatch):
    """``keep_freed_memory`` is made in the configuration's own process; where the environment already configures
    glibc's allocator, the row says it could not be made instead of timing something else."""
    cfg = BenchConfig('test_l2vit', 64, 64, warmup=0, min_reps=1, min_time=0.0, threads=1, memory=False,
                      keep_freed_memory=True)
    for name in ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_', 'GLIBC_TUNABLES'):
        monkeypatch.delenv(name, raising=False)
    (row,) = run_sweep([cfg], isolate=True, timeout=120)
    assert row['status'] == 'ok' and row['keep_freed_memory'] is True, row['error']
    monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', '1000000')
    (row,) = run_sweep([cfg], isolate=True, timeout=120)
    assert row['status'] == 'unsupported' and 'MALLOC_TRIM_THRESHOLD_' in row['error']
    # a paired group shares the setting: both members say why
    pair = [dataclasses.replace(cfg, paired=True), dataclasses.replace(cfg, paired=True, global_mixer='softmax')]
    assert [r['status'] for r in run_sweep(pair, isolate=True, timeout=120)] == ['unsupported'] * 2


_PAIRED = dict(warmup=0, min_reps=3, min_time=0.0, threads=1, memory=False, paired=True)


def test_run_group_times_models_together_and_records_failures():
    cfgs = [BenchConfig('test_l2vit', 64, 64, **_PAIRED), BenchConfig('no_such_model_anywhere', 64, 64, **_PAIRED),
            BenchConfig('test_l2vit', 64, 64, global_mixer='softmax', **_PAIRED)]
    a, bad, b = run_group(cfgs)
    assert bad['status'] == 'error' and 'no_such_model_anywhere' in bad['error']
    for row in (a, b):  # the failure does not stop the others
        assert row['status'] == 'ok' and row['reps'] == 3 and row['img_per_s'] > 0 and 'peak_mib' not in row
    assert run_group([]) == []


def test_sweep_runs_a_paired_group_in_one_fresh_process():
    """Paired configurations that differ only in the model run together, where the first of them comes; an
    unpaired configuration between them keeps its own process (and its memory)."""
    first = BenchConfig('test_l2vit', 64, 64, **_PAIRED)
    alone = BenchConfig('test_l2vit', 64, 64, warmup=0, min_reps=1, min_time=0.0, threads=1)
    other_size = BenchConfig('test_l2vit', 64, 96, **_PAIRED)
    second = BenchConfig('test_l2vit', 64, 64, global_mixer='softmax', **_PAIRED)
    rows = run_sweep([first, alone, other_size, second], isolate=True, timeout=120)
    assert [(r['global_mixer'], r['width'], r['paired']) for r in rows] == [
        (None, 64, True), ('softmax', 64, True), (None, 64, False), (None, 96, True)]
    assert all(r['status'] == 'ok' for r in rows), [r['error'] for r in rows]
    assert [r['reps'] for r in rows] == [3, 3, 1, 3]
    assert all(r.get('peak_mib') is None for r in rows if r['paired'])
    # a dead group process is every member's row
    rows = run_sweep([first, second], isolate=True, timeout=0.01)
    assert [r['status'] for r in rows] == ['timeout', 'timeout']


def _rows():
    rows = []
    for model, k, p in (('a', 1e-6, 1.0), ('b', 1e-10, 2.0)):  # time ∝ pixels^p
        for s in (224, 448, 896):
            px = s * s
            rows.append(dict(model=model, height=s, width=s, pixels=px, batch=1, mode='infer', dtype='fp32',
                             cast='none', device='cpu', status='ok', time_ms=k * px ** p * 1e3, img_per_s=1 / (k * px ** p),
                             time_q25_ms=1, time_q75_ms=2, peak_mib=px / 1e4, error=''))
    rows.append(dict(rows[0], model='c', status='oom', time_ms=None, img_per_s=None, error='killed'))
    return rows


def test_results_files_round_trip_and_plots(tmp_path):
    rows = _rows()
    write_results(tmp_path, {'device': 'cpu', 'threads': 2, 'nan': float('nan')}, rows)
    env, back = read_results(tmp_path)
    assert env['threads'] == 2 and env['nan'] is None and len(back) == len(rows)
    csv_text = (tmp_path / 'results.csv').read_text()
    assert csv_text.startswith('# device: cpu\n# threads: 2\n') and 'model,height,width' in csv_text
    assert not list(tmp_path.glob('.*.tmp'))
    (tmp_path / 'bad.json').write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match='not an l2vit benchmark results file'):
        read_results(tmp_path / 'bad.json')
    paired = [dict(r, paired=True, peak_mib=None) for r in rows]  # ratios, pair by pair: no scaling plot
    (png,) = plot_scaling(rows + paired, tmp_path)
    assert png.read_bytes()[:4] == b'\x89PNG' and png.name == 'scaling_infer_fp32_b1_cpu.png'
    table = markdown_tables(rows, reference='a')
    assert '| 224×224 |' in table and 'oom' in table and '×' in table


def test_fit_slope():
    xs = [1e4, 1e5, 1e6]
    assert fit_slope(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    assert fit_slope(xs, [x ** 2 for x in xs]) == pytest.approx(2.0)
    assert fit_slope([5.0], [1.0]) is None


def test_targets_from_rows():
    def row(model, size, batch, tp, mode='infer', dtype='fp32', cast='none', peak=None, gflops=None):
        return dict(model=model, height=size, width=size, batch=batch, mode=mode, dtype=dtype, cast=cast,
                    device='cpu', status='ok', img_per_s=tp, peak_mib=peak, gflops=gflops)
    rows = [row('l2vit_tiny', 224, 1, 20), row('swin_tiny_patch4_window7_224', 224, 1, 18),
            row('l2vit_tiny', 224, 16, 30, gflops=150), row('swin_tiny_patch4_window7_224', 224, 16, 28),
            row('l2vit_tiny', 224, 16, 80, dtype='bf16', cast='model'),
            row('l2vit_tiny', 512, 1, 5, peak=100), row('l2vit_tiny', 1024, 1, 1.2, peak=420),
            row('swin_tiny_patch4_window7_224', 1024, 1, 1.0, peak=400), row('deit_small_patch16_224', 1024, 1, 0.5)]
    targets = evaluate_targets(rows, {'gemm_gflops': {'fp32': 200.0}})
    assert [t.passed for t in targets] == [True, False, True, True, True, False, True, None]
    text = format_targets(targets)
    assert '**missed**' in text and 'not measured' in text and '150 of 200 GFLOP/s' in text
    # a row with freed memory kept is shown beside the GEMM share, never judged in place of the default one
    kept = dict(row('l2vit_tiny', 224, 16, 40, gflops=180), keep_freed_memory=True)
    again = evaluate_targets(rows + [kept], {'gemm_gflops': {'fp32': 200.0}})
    assert [t.value for t in again] == [t.value for t in targets]
    assert again[2].detail == '150 of 200 GFLOP/s; with freed memory kept for reuse: 0.900'


def test_speed_targets_prefer_paired_rows():
    def row(model, tp, paired=False, mode='infer', batch=16):
        return dict(model=model, height=224, width=224, batch=batch, mode=mode, dtype='fp32', cast='none',
                    device='cpu', status='ok', img_per_s=tp, paired=paired)
    swin = 'swin_tiny_patch4_window7_224'
    rows = [row('l2vit_tiny', 30), row(swin, 28), row('l2vit_tiny', 5.0, mode='train'),
            row(swin, 5.5, mode='train'), row('l2vit_tiny', 5.6, True, 'train'), row(swin, 5.2, True, 'train')]
    targets = {t.name: t for t in evaluate_targets(rows, {})}
    train = targets['training step 224² batch 16: l2vit_tiny ÷ Swin-T']
    assert train.value == pytest.approx(5.6 / 5.2) and train.passed
    assert train.detail == f'paired in one process; separate processes: {5.0 / 5.5:.3f}'
    b16 = targets['fp32 224² batch 16: l2vit_tiny ÷ Swin-T throughput']
    assert b16.value == pytest.approx(30 / 28) and b16.detail == 'separate processes'
    # paired rows never stand in for the other figures (memory, GEMM share): only their own pair
    only_paired = evaluate_targets([row('l2vit_tiny', 30, True), row(swin, 20, True)], {})
    assert [t.value is not None for t in only_paired].count(True) == 1
    table = markdown_tables(rows)
    assert '**training step, fp32, batch 16, cpu, models alternating in one process**' in table
    assert '| 224×224 | 5.60 | 5.20 ×1.08 |' in table


def _b16(tp, dtype='bf16', cast='autocast', compile=False, freeze=False, model='l2vit_tiny'):
    return dict(model=model, height=224, width=224, batch=16, mode='infer', dtype=dtype, cast=cast, device='cpu',
                status='ok', img_per_s=tp, compile=compile, freeze=freeze)


def _bf16_targets(rows, env=None):
    targets = evaluate_targets(rows, env or {})
    speed = next(t for t in targets if t.name.startswith('bf16 224'))
    agreement = next((t for t in targets if 'agreement' in t.name), None)
    return speed, agreement


def test_bf16_target_compares_the_fastest_paths():
    eager = [_b16(20, 'fp32', 'none'), _b16(40), _b16(42, cast='model')]
    t, _ = _bf16_targets(eager)
    assert t.value == pytest.approx(2.1) and not t.passed and t.detail == 'bf16 model ÷ fp32'
    # a CPU without oneDNN bf16 kernels is named next to the figure (it is still judged)
    t, _ = _bf16_targets(eager, {'cpu_bf16': 'none'})
    assert t.value == pytest.approx(2.1) and t.detail.endswith('; this CPU has no bf16 matrix kernels in oneDNN '
                                                               '(cpu_bf16: none)')
    assert _bf16_targets(eager, {'cpu_bf16': 'amx'})[0].detail == 'bf16 model ÷ fp32'
    # a frozen compiled bf16 model is an inference path too; a slower compiled fp32 row does not lower the baseline
    frozen = _b16(56, cast='model', compile=True, freeze=True)
    t, _ = _bf16_targets(eager + [frozen, _b16(18, 'fp32', 'none', compile=True, freeze=True)])
    assert t.value == pytest.approx(2.8) and t.passed
    assert t.detail == 'bf16 model, compiled with frozen weights ÷ fp32'
    # a faster compiled fp32 row raises it
    t, _ = _bf16_targets(eager + [frozen, _b16(28, 'fp32', 'none', compile=True)])
    assert t.value == pytest.approx(2.0) and t.detail.endswith('÷ fp32, compiled')
    # the other targets still read eager rows only
    t16 = next(t for t in evaluate_targets(eager + [_b16(40, 'fp32', 'none', compile=True),
                                                    _b16(10, 'fp32', 'none', model='swin_tiny_patch4_window7_224')],
                                           {}) if 'batch 16: l2vit' in t.name)
    assert t16.value == pytest.approx(2.0)


def test_bf16_targets_judge_one_path_that_is_fast_and_agrees():
    rep = dict(model='l2vit_tiny', dtype='bf16', images=64, weights='random', decisive_images=40,
               decisive_agreement=1.0, max_abs_error=0.02, rel_error=0.001)
    env = {'precision': [dict(rep, cast='autocast', top1_agreement=1.0),
                         dict(rep, cast='model', top1_agreement=0.98),
                         dict(rep, cast='autocast', top1_agreement=0.995, freeze=True),
                         dict(rep, cast='model', top1_agreement=0.98, freeze=True)]}
    fp32 = _b16(20, 'fp32', 'none')
    # the fastest path (model cast, frozen) flips too many images: the fastest one that agrees is judged
    rows = [fp32, _b16(30), _b16(35, cast='model'), _b16(54, compile=True, freeze=True),
            _b16(58, cast='model', compile=True, freeze=True)]
    speed, agreement = _bf16_targets(rows, env)
    assert speed.value == pytest.approx(2.7) and speed.passed
    assert speed.detail == ('bf16 autocast, compiled with frozen weights ÷ fp32; fastest bf16 path bf16 model, '
                            'compiled with frozen weights: 2.900')
    assert agreement.value == 0.995 and agreement.passed
    assert 'the path above: autocast, compiled with frozen weights' in agreement.detail
    assert 'every path: autocast 1.000, model 0.980, autocast, compiled with frozen weights 0.995' in agreement.detail
    # no path both checked and agreeing: the fastest is judged, and misses
    rows = [fp32, _b16(35, cast='model'), _b16(58, cast='model', compile=True, freeze=True)]
    env_bad = {'precision': [p for p in env['precision'] if p['cast'] == 'model']}
    speed, agreement = _bf16_targets(rows, env_bad)
    assert speed.value == pytest.approx(2.9) and agreement.value == 0.98 and not agreement.passed
    # a plain compiled path is never checked: the worst agreement stands in for it
    speed, agreement = _bf16_targets([fp32, _b16(40, cast='model', compile=True)], env_bad)
    assert speed.value == pytest.approx(2.0)
    assert agreement.value == 0.98 and 'worst path (the path above was not checked): model' in agreement.detail


def test_cli_freeze_applies_to_inference_configs():
    args = build_parser().parse_args(['bench', '--models', 'a', '--sizes', '64', '--modes', 'infer', 'train',
                                      '--freeze'])
    configs = list(_configs(*_settings(args)))
    assert [(c.mode, c.compile, c.freeze) for c in configs] == [('infer', True, True), ('train', True, False)]
    with pytest.raises(ValueError, match='--freeze does not apply to --mixers'):
        _settings(build_parser().parse_args(['bench', '--mixers', 'linear', '--freeze']))


def test_cli_settings_suite_and_dedup(tmp_path):
    suite = tmp_path / 'suite.yaml'
    suite.write_text('name: demo\nthreads: 2\nsweeps:\n  - models: [a, b]\n    sizes: [224, 320x480]\n'
                     '  - models: [a]\n    sizes: [224]\n    dtypes: [fp32, bf16]\n    casts: [autocast, model]\n')
    args = build_parser().parse_args(['bench', '--suite', str(suite), '--min-reps', '3'])
    settings, sweeps = _settings(args)
    assert settings['threads'] == 2 and settings['min_reps'] == 3 and len(sweeps) == 2
    configs = list(_configs(settings, sweeps))
    labels = [c.label() for c in configs]
    assert len(labels) == len(set(labels)) == 6  # a/b × 2 sizes, + a bf16 ×2 casts (a 224 fp32 only once)
    assert all(c.min_reps == 3 and c.threads == 2 for c in configs)
    suite.write_text('sweeps:\n  - model: [a]\n')
    with pytest.raises(ValueError, match="unknown suite keys \\['model'\\]"):
        _settings(build_parser().parse_args(['bench', '--suite', str(suite)]))


def test_cli_paired_sweeps(tmp_path):
    args = build_parser().parse_args(['bench', '--models', 'a', 'b', '--sizes', '64', '--paired'])
    configs = list(_configs(*_settings(args)))
    assert [(c.model, c.paired, c.memory) for c in configs] == [('a', True, False), ('b', True, False)]
    suite = tmp_path / 'suite.yaml'
    suite.write_text('sweeps:\n  - models: [a, b]\n    sizes: [64]\n  - models: [a, b]\n    sizes: [64]\n'
                     '    paired: true\n')
    configs = list(_configs(*_settings(build_parser().parse_args(['bench', '--suite', str(suite)]))))
    assert [(c.paired, c.memory) for c in configs] == [(False, True)] * 2 + [(True, False)] * 2
    with pytest.raises(ValueError, match='--paired does not apply to --mixers'):
        _settings(build_parser().parse_args(['bench', '--mixers', 'linear', '--paired']))


def test_cli_keep_freed_memory_flag_and_suite_key(tmp_path):
    args = build_parser().parse_args(['bench', '--models', 'a', '--sizes', '64', '--keep-freed-memory'])
    assert [c.keep_freed_memory for c in _configs(*_settings(args))] == [True]
    suite = tmp_path / 's.yaml'
    suite.write_text('models: [a]\nsizes: [64]\nsweeps:\n  - {}\n  - keep_freed_memory: true\n')
    configs = list(_configs(*_settings(build_parser().parse_args(['bench', '--suite', str(suite)]))))
    assert [c.keep_freed_memory for c in configs] == [False, True]


def test_cli_reports_bad_input(capsys):
    assert main(['bench', '--sizes', 'huge', '--no-gemm']) == 2
    assert 'HxW' in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    out = tmp_path / 'run'
    code = main(['bench', '--models', 'test_l2vit', '--sizes', '64', '96', '64x96', '--batch-sizes', '2',
                 '--min-reps', '1', '--min-time', '0', '--warmup', '0', '--threads', '1', '--no-gemm',
                 '--out', str(out)])
    assert code == 0
    env, rows = read_results(out)
    assert env['threads'] == 1 and env['torch'] == torch.__version__
    assert [r['status'] for r in rows] == ['ok'] * 3
    assert (out / 'results.md').read_text().startswith('# Benchmark')
    assert len(list(out.glob('scaling_*.png'))) == 1
    assert all(math.isfinite(r['time_ms']) for r in rows)


def test_environment_header_names_the_cpu_kernels():
    from l2vit.bench.env import cpu_bf16, environment
    env = environment('cpu', threads=2)
    assert env['threads'] == 2 and env['device'] == 'cpu' and env['mkldnn'] == torch.backends.mkldnn.is_available()
    assert env['cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    assert env['cpu_bf16'] == cpu_bf16() and env['cpu_bf16'] in ('amx', 'avx512', 'none')
    assert 'fused_gelu' not in env and 'packed_weights' not in env  # per row: each process measures its own


def test_rows_record_the_linear_route_their_process_took(monkeypatch):
    from l2vit.layers import prepacked
    fast = dict(warmup=0, min_reps=1, min_time=0.0, threads=1)
    row = run_config(BenchConfig('test_l2vit', 64, 64, **fast))
    assert row['status'] == 'ok' and row['linear_route'] == prepacked.routes_taken()
    assert row['linear_route'] in ('F.linear', 'oneDNN', 'oneDNN + fused GELU')
    if prepacked.packing_available():
        fused = prepacked.gelu_fused()
        assert row['linear_route'] == ('F.linear' if not prepacked.packing_enabled()
                                       else 'oneDNN + fused GELU' if fused else 'oneDNN')
    # never measured nor fixed in a process: nothing to record; fixed by the environment: what it says
    monkeypatch.setattr(prepacked, '_choice', None)
    monkeypatch.delenv('L2VIT_PACKED_WEIGHTS', raising=False)
    assert prepacked.routes_taken() is None
    monkeypatch.setenv('L2VIT_PACKED_WEIGHTS', '0')
    assert prepacked.routes_taken() == 'F.linear'
    if prepacked.packing_available():
        monkeypatch.setenv('L2VIT_PACKED_WEIGHTS', '1')
        for value, route in (('0', 'oneDNN'), ('1', 'oneDNN + fused GELU')):
            monkeypatch.setenv('L2VIT_FUSED_GELU', value)
            assert prepacked.routes_taken() == route


def test_missing_half_kernels_names_the_cpu(monkeypatch):
    from l2vit.bench import env as bench_env
    assert bench_env.missing_half_kernels('fp32') is None
    assert bench_env.missing_half_kernels('bf16', 'cuda') is None
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: False)
    reason = bench_env.missing_half_kernels('bf16')
    assert reason.startswith(f'no bf16 kernels for this CPU ({torch.backends.cpu.get_cpu_capability()})')
    assert '--slow-half-precision' in reason
    if torch.backends.mkldnn.is_available():
        monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: True)
        assert bench_env.missing_half_kernels('bf16') is None


def test_cli_records_half_precision_without_kernels_as_skipped(tmp_path, monkeypatch):
    from l2vit.bench import env as bench_env
    why = 'no bf16 kernels for this CPU (TEST) in oneDNN'
    monkeypatch.setattr(bench_env, 'missing_half_kernels', lambda dtype, device='cpu': why if dtype == 'bf16' else None)
    args = ['bench', '--models', 'test_l2vit', '--sizes', '32', '--dtypes', 'fp32', 'bf16', '--check-precision',
            '--min-reps', '1', '--min-time', '0', '--warmup', '0', '--threads', '1', '--no-plot',
            '--no-memory', '--out', str(tmp_path)]
    assert main(args) == 0
    env, rows = read_results(tmp_path)
    assert [(r['dtype'], r['status']) for r in rows] == [('fp32', 'ok'), ('bf16', 'skipped')]
    assert env['gemm_gflops']['fp32'] > 0 and env['gemm_gflops']['bf16'] is None  # not measured either
    assert rows[1]['error'] == why and env['precision_skipped'] == why and 'precision' not in env
    settings, _ = _settings(build_parser().parse_args(args + ['--slow-half-precision']))
    from l2vit.cli.bench import _half_guard
    cfg = BenchConfig(model='test_l2vit', height=32, width=32, dtype='bf16', cast='autocast')
    assert _half_guard(settings)(cfg, []) is None
    assert _half_guard(_settings(build_parser().parse_args(args))[0])(cfg, []) == why
