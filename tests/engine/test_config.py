"""Configuration: defaults are the paper's recipe, YAML inheritance and overrides, clear errors, shipped recipes."""
from __future__ import annotations

from pathlib import Path

import pytest

from l2vit.engine.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
)
from l2vit.engine.presets import DIGITS_DEMO

CONFIGS = Path(__file__).resolve().parents[2] / 'configs' / 'train'


def test_defaults_are_the_in1k_recipe():
    c = TrainConfig()
    assert (c.epochs, c.batch_size, c.optim.update_freq, c.optim.lr, c.optim.weight_decay) == (300, 128, 4, 4e-3, 0.05)
    assert (c.sched.sched, c.sched.warmup_epochs, c.sched.warmup_lr, c.sched.min_lr) == ('cosine', 20, 0.0, 1e-6)
    assert c.aug.auto_augment == 'rand-m9-mstd0.5-inc1' and c.aug.interpolation == 'bicubic'
    assert (c.aug.mixup, c.aug.cutmix, c.aug.mixup_switch_prob, c.aug.smoothing, c.aug.reprob) == (0.8, 1.0, 0.5, 0.1,
                                                                                                   0.25)
    assert c.ema.enabled and c.ema.decay == 0.9999 and c.ema.eval
    assert c.optim.decay_temperature and c.optim.clip_grad is None and c.amp == 'none'
    assert c.data.crop_pct is None and c.data.input_size == 224


def test_base_inheritance_overrides_and_errors(tmp_path):
    (tmp_path / 'base.yaml').write_text('optim: {lr: 1.0e-3, weight_decay: 0.1}\nepochs: 7\nsched: {warmup_epochs: 1}\n')
    (tmp_path / 'child.yaml').write_text('base: base.yaml\noptim: {lr: 2.0e-3}\nmodel: {kwargs: {dims: [8, 16]}}\n')
    cfg = load_config(tmp_path / 'child.yaml', {'optim.clip_grad': 5, 'aug.scale': [0.5, 1]})
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.epochs) == (2e-3, 0.1, 7)
    assert cfg.optim.clip_grad == 5.0 and cfg.aug.scale == (0.5, 1.0) and cfg.model.kwargs == {'dims': [8, 16]}
    assert config_from_dict(config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r'unknown config key\(s\) optim.lrr; valid keys in optim: opt, lr'):
        load_config(None, {'optim.lrr': 1})
    with pytest.raises(ConfigError, match='epochs: expected an integer, got 1.5'):
        load_config(None, {'epochs': 1.5})
    with pytest.raises(ConfigError, match='ema.enabled: expected true or false'):
        load_config(None, {'ema.enabled': 'yes please'})
    with pytest.raises(ConfigError, match='aug.scale: expected 2 values'):
        load_config(None, {'aug.scale': [0.1]})
    with pytest.raises(ConfigError, match='batch_size must be even when mixup'):
        load_config(None, {'batch_size': 3})
    with pytest.raises(ConfigError, match="amp must be none, bf16 or fp16, got 'fp8'"):
        load_config(None, {'amp': 'fp8'})
    with pytest.raises(ConfigError, match='config file not found'):
        load_config(tmp_path / 'nope.yaml')
    (tmp_path / 'loop.yaml').write_text('base: loop.yaml\n')
    with pytest.raises(ConfigError, match='loop'):
        load_config(tmp_path / 'loop.yaml')


def test_parse_override():
    assert parse_override('optim.lr=1e-3') == ('optim.lr', 1e-3)
    assert parse_override('ema.enabled=false') == ('ema.enabled', False)
    assert parse_override('aug.auto_augment=null') == ('aug.auto_augment', None)
    assert parse_override('model.kwargs={dims: [8, 16]}') == ('model.kwargs', {'dims': [8, 16]})
    with pytest.raises(ConfigError, match='section.key=value'):
        parse_override('optim.lr')
    assert apply_overrides({'a': {'b': 1}}, {'a.c': 2}) == {'a': {'b': 1, 'c': 2}}


def test_digits_yaml_equals_the_builtin_preset():
    assert load_config(CONFIGS / 'digits_demo.yaml') == config_from_dict(DIGITS_DEMO)


# spec §5.1-5.3: (model, epochs, per-GPU batch x update_freq, lr, min_lr, warmup epochs, warmup lr, weight decay,
# drop path, EMA, eval interval, input size)
_RECIPES = {
    'l2vit_tiny_in1k': ('l2vit_tiny', 300, 128 * 4, 4e-3, 1e-6, 20, 0.0, 0.05, 0.1, True, 1, 224),
    'l2vit_small_in1k': ('l2vit_small', 300, 128 * 4, 4e-3, 1e-6, 20, 0.0, 0.05, 0.3, True, 1, 224),
    'l2vit_base_in1k': ('l2vit_base', 300, 128 * 4, 4e-3, 1e-6, 20, 0.0, 0.05, 0.3, True, 1, 224),
    'l2vit_base_in22k': ('l2vit_base', 90, 128 * 1, 1e-3, 1e-5, 5, 1e-6, 0.05, 0.2, False, 10, 224),
    'l2vit_base_in22k_ft_in1k': ('l2vit_base', 30, 64 * 2, 4e-5, 4e-7, 5, 4e-8, 1e-8, 0.2, True, 1, 224),
    'l2vit_base_384_in22k_ft_in1k': ('l2vit_base_384', 30, 64 * 2, 4e-5, 4e-7, 5, 4e-8, 1e-8, 0.2, True, 1, 384),
}


@pytest.mark.parametrize('name', sorted(_RECIPES))
def test_shipped_imagenet_recipes_follow_the_spec(name):
    c = load_config(CONFIGS / f'{name}.yaml')
    got = (c.model.name, c.epochs, c.batch_size * c.optim.update_freq, c.optim.lr, c.sched.min_lr,
           c.sched.warmup_epochs, c.sched.warmup_lr, c.optim.weight_decay, c.model.drop_path_rate, c.ema.enabled,
           c.eval_interval, c.data.input_size)
    assert got == _RECIPES[name]
    # shared by all (spec §5.1): AdamW, cosine per step, RandAugment, Mixup/CutMix, smoothing, erasing, fp32, no clip
    assert (c.optim.opt, c.sched.sched, c.amp, c.optim.clip_grad, c.optim.decay_temperature) == (
        'adamw', 'cosine', 'none', None, True)
    assert (c.aug.auto_augment, c.aug.mixup, c.aug.cutmix, c.aug.smoothing, c.aug.reprob) == (
        'rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.1, 0.25)
    assert c.output == f'runs/{name}'
    if 'ft' in name:
        assert c.finetune.checkpoint == 'runs/l2vit_base_in22k' and not c.finetune.use_ema
