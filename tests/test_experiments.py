"""experiments/digits_study.py: every variant builds, and the report aggregates runs as documented."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math

import pytest
import timm

from tests.helpers import REPO_ROOT


@pytest.fixture(scope='module')
def study():
    spec = importlib.util.spec_from_file_location('digits_study', REPO_ROOT / 'experiments' / 'digits_study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_builds_the_model_it_describes(study, tmp_path):
    args = argparse.Namespace(epochs=3, data_dir=None, input_size=None)
    for variant in study.VARIANTS:
        cfg = study._config(variant, 0, args, tmp_path / variant)
        assert cfg.epochs == 3 and cfg.seed == 0 and cfg.threads == 1
        model = timm.create_model(cfg.model.name, num_classes=10, device='meta', **cfg.model.kwargs)
        mixers = [b.attn.mixer_name for s in model.stages for b in s.blocks]
        kwargs = study.VARIANTS[variant][0]
        if 'global_mixer' in kwargs:
            assert mixers[1::2] == [kwargs['global_mixer']] * 3
        elif 'block_pattern' in kwargs:
            assert set(mixers) == set(kwargs['block_pattern'])
        else:
            assert mixers == ['window', 'linear'] * 3
    lga = timm.create_model('test_l2vit', device='meta', **study._config('temp_key', 0, args, tmp_path).model.kwargs)
    assert lga.stages[0].blocks[1].attn.temperature_placement == 'key'
    assert lga.stages[0].blocks[1].local_mp is not None
    plain = timm.create_model('test_l2vit', device='meta', **study._config('linear_plain', 0, args, tmp_path).model.kwargs)
    assert plain.stages[0].blocks[1].local_mp is None


def test_report_mean_and_interval(study, tmp_path):
    tops = [98.0, 99.0, 100.0]
    for seed, top in enumerate(tops):
        d = tmp_path / 'l2vit' / f'seed{seed}'
        d.mkdir(parents=True)
        (d / 'result.json').write_text(json.dumps({
            'variant': 'l2vit', 'seed': seed, 'status': 'completed', 'val_top1': top, 'infer_images_per_s': 100. * seed,
            'global/entropy': 0.5}))
    assert study.main(['report', '--output', str(tmp_path), '--suite', 'ablation']) == 0
    rows = json.loads((tmp_path / 'results_ablation.json').read_text())
    assert [r['variant'] for r in rows] == ['l2vit']
    top = rows[0]['val_top1']
    assert top['mean'] == 99.0 and top['n'] == 3
    assert math.isclose(top['ci95'], 4.302653 / math.sqrt(3), rel_tol=1e-6)
    table = (tmp_path / 'results_ablation.md').read_text()
    assert '| l2vit | 3 | 99.00 ± 2.48 |' in table and '| 100 |' in table  # speed: the median over seeds
    with pytest.raises(SystemExit, match='no result.json'):
        study.main(['report', '--output', str(tmp_path / 'empty')])
