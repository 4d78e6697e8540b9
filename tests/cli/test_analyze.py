"""``l2vit analyze``: from images and a model (random or a checkpoint) to figures and a JSON of every number."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from l2vit.cli import main
from tests.helpers import torch_threads

SMALL = ['--img-size', '64', '--blocks', 'stages.0.blocks.0', 'stages.0.blocks.1', '--topk', '9',
         '--figure-images', '1']


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    with torch_threads(1):  # tiny models: see tests.helpers.torch_threads
        yield


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / f'img{i}.jpg')
    return folder


def test_random_model_with_same_weight_variants(images, tmp_path, capsys):
    out = tmp_path / 'out'
    assert main(['analyze', '--model', 'test_l2vit', '--images', str(images), '--output', str(out), *SMALL,
                 '--queries', '0.5,0.5', '0.9,0.1']) == 0
    printed = capsys.readouterr().out
    assert 'analysing 3 model(s) on 2 image(s) of 64x64' in printed and 'ERF50 +LCM' in printed
    data = json.loads((out / 'analysis.json').read_text())
    assert [s['label'] for s in data['sources']] == [
        'softmax (same weights)', 'linear, no LCM (same weights)', 'L²ViT (linear + LCM)']
    assert data['query_points'] == [[0.5, 0.5], [0.9, 0.1]] and data['images'] == ['img0.jpg', 'img1.jpg']
    main_source = data['sources'][-1]
    assert main_source['model'] == 'test_l2vit'
    assert [b['mixer'] for b in main_source['blocks']] == ['window', 'linear']
    assert 0 < main_source['blocks'][1]['metrics']['entropy']['mean'] <= 1
    for name in ('analysis_tensors.safetensors', 'entropy_per_layer.png', 'distance_px_per_layer.png',
                 'top9_mass_per_layer.png', 'attention_stages-0-blocks-1_img0.png', 'erf_l2vit_linear_lcm.png'):
        assert (out / name).is_file(), name


def test_checkpoint_with_trained_counterpart(images, tmp_path, capsys):
    torch.manual_seed(3)
    model = timm.create_model('test_l2vit', num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / 'l2vit.safetensors')
    out = tmp_path / 'out'
    assert main(['analyze', '--checkpoint', str(tmp_path / 'l2vit.safetensors'), '--model', 'test_l2vit',
                 '--compare', 'softmax=test_l2vit,global_mixer=softmax,num_classes=10', '--label', 'mine',
                 '--images', str(images / 'img0.jpg'), '--output', str(out), '--no-erf', *SMALL]) == 0
    data = json.loads((out / 'analysis.json').read_text())
    assert [s['label'] for s in data['sources']] == ['softmax', 'mine']  # --compare turns off same-weight variants
    assert [b['mixer'] for b in data['sources'][0]['blocks']] == ['window', 'softmax']
    assert data['sources'][1]['model_args']['num_classes'] == 10 and data['sources'][1]['erf'] == []
    assert not list(out.glob('erf_*.png'))


@pytest.mark.parametrize('argv, message', [
    (['--images', 'IMAGES'], 'give --checkpoint (trained weights) or --model NAME'),
    (['--model', 'test_l2vit', '--images', 'MISSING'], 'image not found'),
    (['--model', 'test_l2vit', '--images', 'IMAGES', '--queries', '0.5'], 'query points must look like 0.5,0.25'),
    (['--model', 'test_l2vit', '--images', 'IMAGES', '--img-size', '64by64'], '--img-size must look like 224'),
    (['--model', 'test_l2vit', '--images', 'IMAGES', '--model-kwargs', 'use_lcm'], 'must look like KEY=VALUE'),
    (['--model', 'test_l2vit', '--images', 'IMAGES', '--compare', 'x'], 'must look like LABEL=SPEC'),
    (['--model', 'test_l2vit', '--images', 'IMAGES', '--blocks', 'stages.9'], 'unknown attention block'),
    (['--checkpoint', 'NOFILE.pth', '--images', 'IMAGES'], 'checkpoint file not found'),
])
def test_bad_input_is_a_clear_error(argv, message, images, tmp_path, capsys):
    argv = [a.replace('IMAGES', str(images)).replace('MISSING', str(tmp_path / 'missing.png'))
            .replace('NOFILE', str(tmp_path / 'nofile')) for a in argv]
    assert main(['analyze', *argv, '--output', str(tmp_path / 'out')]) == 2
    assert message in capsys.readouterr().err
