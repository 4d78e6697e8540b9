"""``l2vit det train|eval`` and ``l2vit seg train|eval`` on data made in the test."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml

from l2vit.cli import main

from ..integrations.synthetic import make_ade, make_coco

_DET_SET = [
    'data.train_ann=train.json', 'data.train_images=train', 'data.val_ann=val.json', 'data.val_images=val',
    'data.num_workers=0', 'model.fpn_channels=32', 'model.window_size=null',
    'model.kwargs={representation_size: 64, mask_head_channels: 32}', 'model.test_size=64', 'model.max_size=96',
    'aug.scales=[56, 64]', 'aug.max_size=96', 'aug.crop_scales=[64]', 'aug.crop_size=[40, 60]',
    'sched.milestones=[1]', 'sched.warmup_iters=1', 'eval_interval=1', 'run.log_interval=1',
]
_SEG_SET = [
    'model.num_classes=3', 'model.channels=32', 'model.aux_channels=16', 'model.window_size=null',
    'data.num_workers=0', 'aug.scale=[128, 64]', 'aug.crop_size=[48, 48]', 'test.scale=[128, 64]',
    'eval_interval=2', 'sched.warmup_iters=1', 'run.log_interval=1',
]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield
    torch.set_num_threads(n)


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ('--set', item)]


def test_det_train_then_eval(tmp_path, capsys):
    make_coco(tmp_path / 'coco', [(64, 80), (72, 64), (64, 64), (80, 96)], name='train')
    make_coco(tmp_path / 'coco', [(64, 80), (70, 66)], name='val', seed=1)
    run = tmp_path / 'run'
    args = ['det', 'train', '--data-root', str(tmp_path / 'coco'), '--backbone', 'test_l2vit', '--epochs', '1',
            '--lr', '1e-3', '--device', 'cpu', '--threads', '1', '-o', str(run), *_sets(_DET_SET)]
    assert main(args) == 0
    assert (run / 'checkpoints' / 'epoch-0001' / 'model.safetensors').is_file()
    assert (run / 'summary.csv').is_file() and yaml.safe_load((run / 'config.yaml').read_text())['task'] == 'det'
    assert main(['det', 'train', *args[2:]]) == 2  # the run exists: refuses without --resume / --overwrite
    assert '--resume auto' in capsys.readouterr().err
    assert main(['det', 'eval', str(run), '--draw', '2', '--device', 'cpu', '--threads', '1']) == 0
    out = capsys.readouterr().out
    assert 'bbox mAP' in out and 'segm mAP' in out
    metrics = json.loads((run / 'eval' / 'best' / 'metrics.json').read_text())
    assert {'bbox_mAP', 'segm_mAP_50', 'images'} <= set(metrics) and metrics['images'] == 2
    assert isinstance(json.loads((run / 'eval' / 'best' / 'detections.json').read_text()), list)
    assert len(list((run / 'eval' / 'best' / 'predictions').glob('*.png'))) == 2


def test_seg_train_then_eval_whole_and_slide(tmp_path, capsys):
    make_ade(tmp_path / 'ade', 'training', [(50, 67), (64, 64), (40, 90), (64, 48)])
    make_ade(tmp_path / 'ade', 'validation', [(50, 67), (45, 70)], seed=1)
    run = tmp_path / 'run'
    assert main(['seg', 'train', '--data-root', str(tmp_path / 'ade'), '--backbone', 'test_l2vit', '--iters', '2',
                 '--lr', '1e-3', '--device', 'cpu', '--threads', '1', '-o', str(run), *_sets(_SEG_SET)]) == 0
    for mode in ('whole', 'slide'):
        out_dir = tmp_path / f'eval_{mode}'
        assert main(['seg', 'eval', str(run), '--mode', mode, '--set', 'test.crop_size=[32, 32]', '--set',
                     'test.stride=[24, 24]', '-o', str(out_dir), '--device', 'cpu', '--threads', '1']) == 0
        out = capsys.readouterr().out
        assert 'mIoU' in out and 'class 2' in out  # the per-class table
        metrics = json.loads((out_dir / 'metrics.json').read_text())
        assert metrics['mode'] == mode and set(metrics['IoU']) == {'class 0', 'class 1', 'class 2'}
        assert sorted(p.name for p in (out_dir / 'predictions').glob('*.png')) == ['img_000.png', 'img_001.png']


def test_clear_errors_and_print_config(tmp_path, capsys):
    assert main(['det', 'train', '--epochs', '1', '-o', str(tmp_path / 'x'), '--device', 'cpu']) == 2
    assert 'data.root is not set' in capsys.readouterr().err
    assert main(['seg', 'eval', str(tmp_path / 'missing')]) == 2
    assert 'not found' in capsys.readouterr().err
    assert main(['det', 'train', '--set', 'model.detectr=x', '--print-config']) == 2
    assert main(['det', 'train', '-c', 'configs/det/retinanet_l2vit_base_3x.yaml', '--print-config',
                 '--set', 'model.window_size=null']) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg['model']['detector'] == 'retinanet' and cfg['model']['drop_path_rate'] == 0.3
    assert cfg['model']['window_size'] is None
