"""``l2vit train`` command line: flags map onto the config, errors exit 2 with a clear message, a tiny run works."""
from __future__ import annotations

import argparse

import pytest
import yaml

from l2vit.cli import build_parser, main
from l2vit.cli.train import resolve_config
from l2vit.engine.config import config_from_dict
from l2vit.engine.presets import DIGITS_DEMO
from tests.engine.synthetic import make_image_folder, read_events, write_recipe
from tests.helpers import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):  # tiny models: see tests.helpers.torch_threads
        yield


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(['train', *argv])


def test_no_arguments_is_the_digits_demo_and_flags_override():
    assert resolve_config(_args()) == config_from_dict(DIGITS_DEMO)
    cfg = resolve_config(_args('--model', 'l2vit_small', '--epochs', '3', '--batch-size', '6', '--seed', '5',
                               '--device', 'cpu', '--output', 'x', '--lr', '0.01', '--amp', 'bf16', '--workers', '2',
                               '--input-size', '64', '--update-freq', '2', '--set', 'optim.clip_grad=1.5',
                               '--set', 'ema.enabled=false'))
    assert (cfg.model.name, cfg.epochs, cfg.batch_size, cfg.seed, cfg.device, cfg.output) == (
        'l2vit_small', 3, 6, 5, 'cpu', 'x')
    assert (cfg.optim.lr, cfg.amp, cfg.data.num_workers, cfg.data.input_size, cfg.optim.update_freq) == (
        0.01, 'bf16', 2, 64, 2)
    assert cfg.optim.clip_grad == 1.5 and not cfg.ema.enabled
    assert cfg.data.data_dir is None and cfg.model.kwargs  # still the demo's model shape
    # --data-dir alone: the paper's ImageNet-1K recipe on that folder
    paper = resolve_config(_args('--data-dir', '/data/imagenet'))
    assert paper.model.name == 'l2vit_tiny' and paper.optim.lr == 4e-3 and paper.data.data_dir == '/data/imagenet'


def test_print_config(capsys):
    assert main(['train', '--print-config', '--epochs', '4']) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed['epochs'] == 4 and printed['model']['name'] == 'test_l2vit'


@pytest.mark.parametrize('argv, message', [
    (['--model', 'no_such_net', '--data-dir', '.'], "unknown model 'no_such_net'"),
    (['--set', 'optim.bogus=1'], 'unknown config key(s) optim.bogus'),
    (['--set', 'epochs'], 'section.key=value'),
    (['--config', 'no/such.yaml'], 'config file not found'),
    (['--data-dir', '/no/such/dir', '--device', 'cpu'], 'data dir not found'),
])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, message):
    assert main(['train', '--output', str(tmp_path / 'run'), *argv]) == 2
    assert message in capsys.readouterr().err


def test_tiny_training_run_through_the_cli(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', num_classes=2, train_per_class=4, val_per_class=2)
    recipe = write_recipe(tmp_path / 'r.yaml', epochs=1, **{'sched.warmup_epochs': 0})
    out = tmp_path / 'run'
    assert main(['train', '--config', str(recipe), '--data-dir', str(data), '--output', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'final validation top-1' in text and str(out / 'summary.csv') in text
    assert read_events(out, 'end')[0]['status'] == 'completed'
    assert yaml.safe_load((out / 'config.yaml').read_text())['data']['data_dir'] == str(data)
    # the same command again refuses to clobber the run
    assert main(['train', '--config', str(recipe), '--data-dir', str(data), '--output', str(out)]) == 2
    assert '--resume auto' in capsys.readouterr().err
