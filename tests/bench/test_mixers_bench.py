"""The mixer benchmark: mixer-alone workloads, the backbone per mixer, the scaling guard, slopes and the outputs."""
from __future__ import annotations

import csv
import io
import sys

import pytest

from l2vit.bench.memory import rss_peak_supported
from l2vit.bench.mixers import (
    REFERENCE_MIXER,
    ScalingGuard,
    _extrapolate,
    mixer_slopes,
    mixer_sweep,
    mixers_markdown,
    plot_mixers,
    resolve_mixers,
    series_name,
)
from l2vit.bench.report import read_results, write_results
from l2vit.bench.runner import BenchConfig, run_config, run_sweep
from l2vit.cli import build_parser, main
from l2vit.cli.bench import _mixer_configs, _settings
from l2vit.layers import create_mixer, is_local_mixer, list_mixers

_FAST = dict(warmup=0, min_reps=2, min_time=0.0, threads=1)


def test_resolve_mixers():
    everything = resolve_mixers(['all'])
    assert everything[-1] == REFERENCE_MIXER and len(everything) == len(set(everything))
    assert set(everything) == {m for m in list_mixers() if not is_local_mixer(m)} | {REFERENCE_MIXER}
    assert resolve_mixers(['softmax', 'linear', 'softmax']) == ['softmax', 'linear']
    with pytest.raises(ValueError, match="unknown token mixer 'nope'"):
        resolve_mixers(['linear', 'nope'])
    with pytest.raises(ValueError, match='no mixers'):
        resolve_mixers([])


def test_mixer_config_fields_and_labels():
    cfg = BenchConfig('linear', 8, 8, kind='mixer')
    assert (cfg.dim, cfg.heads) == (64, 2)
    assert cfg.label() == 'mixer linear d64h2 8x8 b1 infer fp32 cpu'
    assert BenchConfig('l2vit_tiny', 224, 224, global_mixer='softmax').label() == \
        'l2vit_tiny[softmax] 224x224 b1 infer fp32 cpu'
    with pytest.raises(ValueError, match='kind must be one of'):
        BenchConfig('linear', 8, 8, kind='layer')
    with pytest.raises(ValueError, match="apply to kind 'mixer' only"):
        BenchConfig('l2vit_tiny', 224, 224, dim=64)
    with pytest.raises(ValueError, match="global_mixer applies to kind 'model'"):
        BenchConfig('linear', 8, 8, kind='mixer', global_mixer='softmax')
    with pytest.raises(ValueError, match='channels_last'):
        BenchConfig('linear', 8, 8, kind='mixer', channels_last=True)
    with pytest.raises(ValueError, match='positive'):
        BenchConfig('linear', 8, 8, kind='mixer', heads=0)


def test_mixer_sweep_orders_sizes_within_each_mixer():
    configs = mixer_sweep(['linear', 'softmax'], [(8, 8), (4, 4), (4, 4)], dim=16, heads=2, backbone='test_l2vit',
                          backbone_sizes=[(96, 96), (64, 64)], device='cpu', threads=1)
    alone = [(c.model, c.height) for c in configs if c.kind == 'mixer']
    backbone = [(c.global_mixer, c.height) for c in configs if c.kind == 'model']
    assert alone == [('linear', 4), ('linear', 8), ('softmax', 4), ('softmax', 8)]
    assert backbone == [('linear', 64), ('linear', 96), ('softmax', 64), ('softmax', 96)]
    assert all(c.dim == 16 and c.threads == 1 for c in configs if c.kind == 'mixer')
    assert all(c.model == 'test_l2vit' and c.dim is None for c in configs if c.kind == 'model')
    assert not [c for c in mixer_sweep(['linear'], [(4, 4)], backbone=None) if c.kind == 'model']


def test_run_config_mixers_in_process():
    for name in ('linear', 'softmax'):
        for side in (4, 8):
            row = run_config(BenchConfig(name, side, side, kind='mixer', dim=16, heads=2, **_FAST))
            assert row['status'] == 'ok', row['error']
            assert row['reps'] == 2 and row['time_q25_ms'] <= row['time_ms'] <= row['time_q75_ms']
    train = run_config(BenchConfig('flatten', 8, 8, kind='mixer', dim=16, heads=2, mode='train', dtype='bf16',
                                   cast='autocast', **_FAST))
    assert train['status'] == 'ok', train['error']
    backbone = run_config(BenchConfig('test_l2vit', 64, 64, global_mixer='softmax', **_FAST))
    assert backbone['status'] == 'ok', backbone['error']
    # forced failures: heads that do not divide the width, a global mixer the model does not know
    bad = run_config(BenchConfig('linear', 8, 8, kind='mixer', dim=16, heads=3, **_FAST))
    assert bad['status'] == 'error' and bad['error']
    unknown = run_config(BenchConfig('test_l2vit', 64, 64, global_mixer='no_such_mixer', **_FAST))
    assert unknown['status'] == 'error' and 'no_such_mixer' in unknown['error']


def test_sweep_costs_skip_hook_and_rows():
    seen = []

    def skip(cfg, rows):
        seen.append(len(rows))
        return 'too big for this test' if cfg.height > 4 else None
    configs = mixer_sweep(['linear'], [(4, 4), (8, 8)], dim=16, heads=2, backbone=None, **_FAST)
    rows = run_sweep(configs, isolate=False, skip=skip)
    assert seen == [0, 1]
    assert [r['status'] for r in rows] == ['ok', 'skipped'] and rows[1]['error'] == 'too big for this test'
    assert rows[0]['tokens'] == 16 and rows[0]['kind'] == 'mixer' and rows[0]['dim'] == 16
    # cost on the meta device: at least the q, k, v and output projections of 16 tokens, 16 wide
    assert rows[0]['gmacs'] * 1e9 >= 4 * 16 * 16 * 16
    assert rows[0]['params_m'] * 1e6 == sum(p.numel() for p in create_mixer('linear', 16, 2).parameters())
    assert rows[0]['gflops'] > 0 and 'time_ms' not in rows[1]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the data-memory cap is a Linux resource limit')
def test_isolated_mixer_under_a_memory_cap_becomes_oom():
    """Through the fresh-process path: the worker rebuilds the mixer config, caps its data memory and records the
    failed 4 GiB input allocation as oom (a mixer that runs in a fresh process: the slow end-to-end test)."""
    huge = BenchConfig('linear', 512, 1024, kind='mixer', dim=2048, heads=2, warmup=0, min_reps=1, min_time=0.0,
                       threads=1)  # the input alone is 4 GiB
    (row,) = run_sweep([huge], isolate=True, timeout=120, memory_limit_mib=3072)
    assert row['status'] == 'oom', row
    assert "can't allocate memory" in row['error'] and row['threads'] == 1  # the worker's own row, not a kill
    assert row['kind'] == 'mixer' and row['tokens'] == 512 * 1024 and row['gmacs'] > 0  # counted on meta all the same


def _series(model, kind, sizes, t0, p, mem0=None, **extra):
    rows = []
    for s in sizes:
        px = s * s
        rows.append(dict(model=model, kind=kind, height=s, width=s, pixels=px, batch=1, mode='infer', dtype='fp32',
                         cast='none', device='cpu', compile=False, channels_last=False, status='ok',
                         time_ms=t0 * px ** p, peak_mib=None if mem0 is None else mem0 * px ** p,
                         baseline_mib=300.0, error='', **extra))
    return rows


def test_extrapolation_and_scaling_guard():
    assert _extrapolate([(100, 1.0), (400, 4.0)], 1600) == pytest.approx((16.0, 1.0))
    assert _extrapolate([(100, 1.0), (400, 64.0)], 1600)[1] == 2.0  # noisy slopes are clamped to [1, 2]
    assert _extrapolate([(100, 1.0), (400, 1.0)], 1600)[1] == 1.0
    assert _extrapolate([(100, 2.0)], 200) == pytest.approx((8.0, 2.0))  # one point: assume quadratic

    mixer = dict(warmup=1, min_reps=3, min_time=0.0, kind='mixer', dim=64, heads=2)
    # quadratic: 100 ms at 56², so ~1.6 s at 112² and ~44 s per call at 256²
    rows = _series('softmax', 'mixer', [28, 56], 100 / 56 ** 4, 2, dim=64, heads=2, threads=None, warmup=1,
                   min_reps=3, min_time=0.0, max_time=60.0, memory=True, global_mixer=None)
    guard = ScalingGuard(timeout=60, memory_limit_mib=1e9, available=lambda device: None)
    assert guard(BenchConfig('softmax', 112, 112, **mixer), rows) is None
    rows[-1].update(wall_s=60.0, reps=3)  # 59.5 s of process start and building beyond its five 0.1 s calls
    assert 'timeout 60 s' in guard(BenchConfig('softmax', 112, 112, **mixer), rows)
    rows[-1].update(wall_s=None)
    reason = guard(BenchConfig('softmax', 256, 256, **mixer), rows)
    assert reason and 'timeout 60 s' in reason and 'slope 2.00' in reason
    assert guard(BenchConfig('linear', 256, 256, **mixer), rows) is None  # another series: nothing known
    assert guard(BenchConfig('softmax', 256, 256, **dict(mixer, dim=32)), rows) is None
    # memory: 100 MiB at 56², quadratic, against a 2 GiB cap
    mem_rows = _series('masa', 'mixer', [28, 56], 1e-9, 2, dim=64, heads=2, threads=None, warmup=1, min_reps=3,
                       min_time=0.0, max_time=60.0, memory=True, global_mixer=None)
    for r in mem_rows:
        r['peak_mib'] = 100 * (r['pixels'] / 56 ** 2) ** 2
    mem_guard = ScalingGuard(timeout=None, memory_limit_mib=2048, available=lambda device: None)
    assert mem_guard(BenchConfig('masa', 112, 112, **mixer), mem_rows) is None  # 1.6 GiB + 300 MiB fits
    assert 'the 2048 MiB cap' in mem_guard(BenchConfig('masa', 256, 256, **mixer), mem_rows)
    assert mem_guard(BenchConfig('masa', 256, 256, **dict(mixer, memory=False)), mem_rows) is None
    # a smaller size that ran out of memory (or time) rules out the larger ones
    mem_rows[-1]['status'] = 'oom'
    assert mem_guard(BenchConfig('masa', 112, 112, **mixer), mem_rows) == '56x56 was oom'


def _report_rows():
    rows = []
    for name, p in (('linear', 1), ('softmax', 2), ('window', 1)):
        rows += _series(name, 'mixer', [14, 28, 56], 1e-3, p, mem0=1e-2, dim=64, heads=2)
        rows += _series('l2vit_tiny', 'model', [224, 448], 1e-4, 1 + (name == 'softmax') / 2, mem0=1e-3,
                        global_mixer=name)
    rows.append(dict(rows[0], height=256, width=256, pixels=65536, status='skipped', time_ms=None, peak_mib=None,
                     error='predicted 900 s per call'))
    return rows


def test_slopes_markdown_plots_and_files(tmp_path):
    rows = _report_rows()
    slopes = mixer_slopes(rows)
    ((alone_key, alone), (backbone_key, backbone)) = sorted(slopes.items(), key=lambda kv: kv[0][1])
    assert alone_key[1] == 'alone' and backbone_key[1] == 'backbone'
    assert alone['linear']['time'] == pytest.approx(1.0) and alone['softmax']['time'] == pytest.approx(2.0)
    assert alone['softmax']['memory_top'] == pytest.approx(2.0) and alone['softmax']['largest'] == 56 ** 2
    assert alone['linear']['not_run'] == 1 and alone['softmax']['not_run'] == 0
    assert backbone['softmax']['time'] == pytest.approx(1.5) and backbone['window']['memory'] == pytest.approx(1.0)
    assert series_name(rows[-2]) == 'window' and series_name(rows[0]) == 'linear'

    env = {'device_name': 'test CPU', 'suite': 'demo', 'threads': 1}
    text = mixers_markdown(rows, env)
    assert text.startswith('# Mixer benchmark: demo')
    assert '| softmax | 2.00 | 2.00 | 2.00 | 2.00 | 3,136 | 1.50 | 1.50 | 0 |' in text
    assert '| linear | 1.00 | 1.00 | 1.00 | 1.00 | 3,136 | 1.00 | 1.00 | 1 |' in text
    assert '| mixer | 14² | 28² | 56² | 256² |' in text and '| global mixer | 224² | 448² |' in text
    assert 'skipped' in text and 'predicted 900 s per call' in text

    pngs = plot_mixers(rows, tmp_path, env)
    assert sorted(p.name for p in pngs) == ['mixers_alone_infer_fp32_b1_cpu.png',
                                            'mixers_backbone_infer_fp32_b1_cpu.png']
    assert all(p.read_bytes()[:4] == b'\x89PNG' for p in pngs)

    write_results(tmp_path, env, rows, name='mixers')
    back_env, back = read_results(tmp_path, name='mixers')
    assert back_env['suite'] == 'demo' and len(back) == len(rows)
    text = (tmp_path / 'mixers.csv').read_text()
    table = list(csv.DictReader(io.StringIO(''.join(ln + '\n' for ln in text.splitlines()
                                                    if not ln.startswith('#')))))
    assert {'kind', 'dim', 'heads', 'global_mixer'} <= set(table[0])
    assert table[-1]['status'] == 'skipped' and table[0]['kind'] == 'mixer' and table[3]['global_mixer'] == 'linear'
    assert not (tmp_path / 'results.json').exists()


def test_cli_mixer_settings(tmp_path):
    args = build_parser().parse_args(['bench', '--mixers', 'linear', 'softmax', '--tokens', '4', '8x6',
                                      '--backbone', 'test_l2vit', '--backbone-sizes', '64', '--mixer-dim', '16',
                                      '--threads', '1'])
    settings, _ = _settings(args)
    configs = list(_mixer_configs(settings))
    assert [c.label() for c in configs] == [
        'mixer linear d16h2 4x4 b1 infer fp32 cpu', 'mixer linear d16h2 8x6 b1 infer fp32 cpu',
        'mixer softmax d16h2 4x4 b1 infer fp32 cpu', 'mixer softmax d16h2 8x6 b1 infer fp32 cpu',
        'test_l2vit[linear] 64x64 b1 infer fp32 cpu', 'test_l2vit[softmax] 64x64 b1 infer fp32 cpu']
    no_backbone = _settings(build_parser().parse_args(['bench', '--mixers', 'all', '--backbone-sizes']))[0]
    assert {c.kind for c in _mixer_configs(no_backbone)} == {'mixer'}
    suite = tmp_path / 'mixers.yaml'
    suite.write_text('name: m\nmixers: [all]\ntokens: [14, 28]\nbackbone_sizes: [224]\nmemory_limit: 4096\n')
    settings, _ = _settings(build_parser().parse_args(['bench', '--suite', str(suite)]))
    assert settings['memory_limit'] == 4096 and len(list(_mixer_configs(settings))) == 3 * len(resolve_mixers(['all']))
    for bad, match in ((['--mixers', 'linear', '--models', 'a'], 'models belong to the model sweep'),
                       (['--mixer-dim', '32'], 'give --mixers too'),
                       (['--mixers', 'linear', '--channels-last'], 'channels-last')):
        with pytest.raises(ValueError, match=match):
            _settings(build_parser().parse_args(['bench', *bad]))


def test_cli_mixers_reports_bad_input(capsys):
    assert main(['bench', '--mixers', 'no_such_mixer', '--no-gemm']) == 2
    assert "unknown token mixer 'no_such_mixer'" in capsys.readouterr().err
    assert main(['bench', '--mixers', 'linear', '--tokens', 'wide', '--no-gemm']) == 2
    assert 'HxW' in capsys.readouterr().err


@pytest.mark.slow
def test_cli_mixers_end_to_end(tmp_path):
    out = tmp_path / 'run'
    code = main(['bench', '--mixers', 'linear', 'softmax', '--tokens', '4', '8', '--mixer-dim', '16',
                 '--backbone', 'test_l2vit', '--backbone-sizes', '64', '--min-reps', '1', '--min-time', '0',
                 '--warmup', '0', '--threads', '1', '--no-gemm', '--out', str(out)])
    assert code == 0
    env, rows = read_results(out, name='mixers')
    assert env['mixer_memory_cap_mib'] is None or env['mixer_memory_cap_mib'] > 0
    assert [r['status'] for r in rows] == ['ok'] * 6
    if rss_peak_supported():
        assert all(r['mem_method'] == 'rss_hwm' and r['peak_mib'] is not None for r in rows)
    assert (out / 'mixers.md').read_text().startswith('# Mixer benchmark: command line')
    assert sorted(p.name for p in out.glob('mixers_*.png')) == ['mixers_alone_infer_fp32_b1_cpu.png']
