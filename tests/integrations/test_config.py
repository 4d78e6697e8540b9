"""The shipped recipes match the official settings (spec §6.2, §6.4); bad recipes fail naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from l2vit.integrations import DetConfig, SegConfig, load_dense_config
from l2vit.integrations.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / 'configs'
# spec §6.2: max drop-path per detector / schedule / variant
DROP_PATH = {('1x', 'tiny'): 0.1, ('1x', 'small'): 0.1, ('1x', 'base'): 0.2,
             ('3x', 'tiny'): 0.2, ('3x', 'small'): 0.2, ('3x', 'base'): 0.3}


@pytest.mark.parametrize('detector', ['mask_rcnn', 'retinanet'])
@pytest.mark.parametrize('schedule,variant', sorted(DROP_PATH))
def test_detection_recipes(detector, schedule, variant):
    cfg = load_dense_config('det', CONFIGS / 'det' / f'{detector}_l2vit_{variant}_{schedule}.yaml')
    assert isinstance(cfg, DetConfig)
    assert (cfg.model.detector, cfg.model.backbone) == (detector, f'l2vit_{variant}')
    assert cfg.model.drop_path_rate == DROP_PATH[schedule, variant]
    assert (cfg.epochs, cfg.sched.milestones) == ((12, [8, 11]) if schedule == '1x' else (36, [27, 33]))
    o, s, a = cfg.optim, cfg.sched, cfg.aug
    assert (o.opt, o.lr, o.weight_decay, o.betas, o.decay_norm_and_bias, o.clip_grad) == (
        'adamw', 1e-4, 0.05, (0.9, 0.999), True, None)
    assert (s.policy, s.gamma, s.warmup_iters, s.warmup_ratio) == ('step', 0.1, 500, 0.001)
    assert (a.policy, a.hflip, a.scales, a.max_size, a.crop_scales, a.crop_size) == (
        'detr', 0.5, list(range(480, 801, 32)), 1333, [400, 500, 600], (384, 600))
    assert (cfg.batch_size, cfg.model.window_size, cfg.model.test_size, cfg.amp) == (2, 7, 800, 'none')


@pytest.mark.parametrize('variant', ['tiny', 'small', 'base'])
def test_segmentation_recipes(variant):
    cfg = load_dense_config('seg', CONFIGS / 'seg' / f'upernet_l2vit_{variant}_160k.yaml')
    assert isinstance(cfg, SegConfig)
    m, o, s = cfg.model, cfg.optim, cfg.sched
    assert (m.backbone, m.drop_path_rate, m.num_classes, m.channels, m.pool_scales) == (
        f'l2vit_{variant}', 0.3, 150, 512, [1, 2, 3, 6])
    assert (m.aux_channels, m.aux_weight, m.dropout) == (256, 0.4, 0.1)
    assert (o.lr, o.weight_decay, o.decay_norm_and_bias) == (6e-5, 0.01, True)
    assert (s.policy, s.power, s.min_lr, s.warmup_iters, s.warmup_ratio) == ('poly', 1.0, 0.0, 1500, 1e-6)
    assert (cfg.iters, cfg.batch_size, cfg.test.mode, cfg.test.scale) == (160000, 2, 'whole', (2048, 512))
    assert (cfg.aug.crop_size, cfg.aug.ratio_range, cfg.aug.cat_max_ratio) == ((512, 512), (0.5, 2.0), 0.75)
    assert (cfg.data.reduce_zero_label, cfg.data.ignore_index) == (True, 255)


def test_defaults_are_the_official_recipes():
    for task, path in (('det', 'det/mask_rcnn_l2vit_tiny_1x.yaml'), ('seg', 'seg/upernet_l2vit_tiny_160k.yaml')):
        default, recipe = load_dense_config(task), load_dense_config(task, CONFIGS / path)
        for section in ('optim', 'sched', 'aug', 'batch_size', 'amp'):
            assert getattr(default, section) == getattr(recipe, section), (task, section)
        assert (default.model.backbone, default.model.drop_path_rate) == ('l2vit_tiny', recipe.model.drop_path_rate)


def test_one_key_of_a_section_keeps_the_tasks_defaults_for_the_others():
    cfg = load_dense_config('seg', None, {'optim.lr': 1e-4, 'sched.warmup_iters': 10})
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-4, 0.01)
    assert (cfg.sched.policy, cfg.sched.warmup_iters, cfg.sched.warmup_ratio) == ('poly', 10, 1e-6)
    cfg = load_dense_config('det', None, {'sched.warmup_iters': 10})
    assert (cfg.sched.policy, cfg.sched.milestones, cfg.optim.weight_decay) == ('step', [8, 11], 0.05)


def test_bad_recipes_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match='model.detectr'):
        load_dense_config('det', None, {'model.detectr': 'x'})
    with pytest.raises(ConfigError, match='model.detector must be'):
        load_dense_config('det', None, {'model.detector': 'yolo'})
    with pytest.raises(ConfigError, match="'seg' recipe"):
        load_dense_config('det', CONFIGS / 'seg' / 'upernet_160k.yaml')
    with pytest.raises(ConfigError, match='milestones'):
        load_dense_config('det', None, {'sched.milestones': [0]})
    with pytest.raises(ConfigError, match='test.mode'):
        load_dense_config('seg', None, {'test.mode': 'tiles'})
