"""``l2vit eval`` and ``l2vit predict`` on our runs, converted directories and official-style .pth files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from l2vit.cli import main
from tests.engine.synthetic import to_official_name, train_tiny_run
from tests.helpers import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):  # tiny models: see tests.helpers.torch_threads
        yield

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        return train_tiny_run(tmp_path_factory.mktemp('cli_run'))
    finally:
        torch.set_num_threads(threads)


def _eval_json(capsys, *argv) -> dict:
    assert main(['eval', '--json', '--device', 'cpu', '--workers', '0', *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_our_run_ema_and_raw_any_resolution(run, capsys):
    run_dir, data = run
    best_ema = json.loads((run_dir / 'checkpoints' / 'best_ema' / 'config.json').read_text())
    assert best_ema['architecture'] == 'test_l2vit'
    ema = _eval_json(capsys, '--checkpoint', str(run_dir))  # the data it was trained on, its val split
    assert ema['weights'] == 'ema' and ema['images'] == 12 and ema['bad_images'] == 1
    assert ema['img_size'] == [32, 32] and ema['checkpoint'].endswith('best_ema')
    summary = [line.split(',') for line in (run_dir / 'summary.csv').read_text().splitlines()]
    col = summary[0].index('ema_val_top1')
    assert ema['top1'] == pytest.approx(max(float(r[col]) for r in summary[1:]))  # the best-EMA epoch
    raw = _eval_json(capsys, '--checkpoint', str(run_dir / 'checkpoints' / 'epoch-0002'), '--no-ema',
                     '--data-dir', str(data))
    col = summary[0].index('val_top1')
    assert raw['weights'] == 'raw' and raw['top1'] == pytest.approx(float(summary[2][col]))
    assert raw['loss'] == pytest.approx(float(summary[2][summary[0].index('val_loss')]), rel=1e-5)
    big = _eval_json(capsys, '--checkpoint', str(run_dir), '--img-size', '48', '--data-dir', str(data))
    assert big['img_size'] == [48, 48] and big['crop_pct'] == 0.875 and 0 <= big['top5'] <= 100
    assert main(['eval', '--checkpoint', str(run_dir), '--device', 'cpu', '--workers', '0']) == 0
    assert 'top-1' in capsys.readouterr().out


def test_eval_checks_the_classes(run, tmp_path, capsys):
    run_dir, data = run
    shutil.copytree(data / 'val', tmp_path / 'val')
    shutil.move(tmp_path / 'val' / 'class_2', tmp_path / 'val' / 'other')
    assert main(['eval', '--checkpoint', str(run_dir), '--data-dir', str(tmp_path), '--device', 'cpu']) == 2
    assert 'differ from the training classes' in capsys.readouterr().err


def test_eval_and_predict_official_pth_and_converted_dir(run, tmp_path, capsys):
    run_dir, data = run
    model = timm.create_model('local-dir:' + str(run_dir / 'checkpoints' / 'epoch-0002'), pretrained=True)
    sd = {to_official_name(k): v for k, v in model.state_dict().items()}
    pth = tmp_path / 'release.pth'
    torch.save({'model': sd, 'model_ema': sd, 'epoch': 1}, pth)
    official = _eval_json(capsys, '--checkpoint', str(pth), '--model', 'test_l2vit', '--data-dir', str(data),
                          '--img-size', '32')  # the training run's eval: 0.875 center crop
    ours = _eval_json(capsys, '--checkpoint', str(run_dir / 'checkpoints' / 'epoch-0002'), '--no-ema',
                      '--data-dir', str(data))
    assert official['top1'] == pytest.approx(ours['top1']) and official['loss'] == pytest.approx(ours['loss'])
    converted = tmp_path / 'converted'
    timm.models.save_for_hf(model, converted, safe_serialization=True)
    conv = _eval_json(capsys, '--checkpoint', str(converted), '--data-dir', str(data))
    assert conv['loss'] == pytest.approx(ours['loss'])


def test_predict_table_and_json(run, tmp_path, capsys):
    run_dir, data = run
    images = tmp_path / 'imgs'
    images.mkdir()
    shutil.copy(data / 'val' / 'class_0' / '0.png', images / 'zero.png')
    shutil.copy(data / 'val' / 'class_2' / '1.png', images / 'two.png')
    (images / 'broken.png').write_bytes(b'nope')
    assert main(['predict', str(images), '--checkpoint', str(run_dir), '--topk', '2', '--json']) == 0
    out = json.loads(capsys.readouterr().out)
    preds = {p['file'].rsplit('/', 1)[1]: p for p in out['predictions']}
    assert 'error' in preds['broken.png']
    top = preds['zero.png']['topk']
    assert len(top) == 2 and top[0]['prob'] >= top[1]['prob'] and top[0]['label'].startswith('class_')
    assert sum(t['prob'] for t in top) <= 1.0 + 1e-6
    assert main(['predict', str(images / 'two.png'), '--checkpoint', str(run_dir), '-k', '3']) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ['file', 'rank', 'prob', 'class'] and len(table) == 4
    assert main(['predict', str(tmp_path / 'missing.png'), '--checkpoint', str(run_dir)]) == 2


def test_predict_uses_imagenet_names_for_1000_classes(tmp_path, capsys):
    model = timm.create_model('test_l2vit', num_classes=1000)
    path = tmp_path / 'in1k.safetensors'
    from safetensors.torch import save_file
    save_file(model.state_dict(), path)
    img = tmp_path / 'x.png'
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    assert main(['predict', str(img), '--checkpoint', str(path), '--model', 'test_l2vit', '--json', '-k', '1']) == 0
    label = json.loads(capsys.readouterr().out)['predictions'][0]['topk'][0]['label']
    from timm.data import ImageNetInfo
    assert label in ImageNetInfo().label_descriptions()


@pytest.mark.slow
def test_eval_and_predict_frozen(run, tmp_path, capsys):
    run_dir, data = run
    torch._dynamo.reset()
    plain = _eval_json(capsys, '--checkpoint', str(run_dir), '--batch-size', '5')
    frozen = _eval_json(capsys, '--checkpoint', str(run_dir), '--batch-size', '5', '--freeze')  # 5, 5, 2: a recompile
    assert frozen['images'] == plain['images'] == 12 and frozen['top1'] == plain['top1']
    assert frozen['loss'] == pytest.approx(plain['loss'], rel=1e-4)
    image = str(data / 'val' / 'class_0' / '0.png')
    assert main(['predict', image, '--checkpoint', str(run_dir), '--json']) == 0
    ref = json.loads(capsys.readouterr().out)['predictions'][0]['topk']
    assert main(['predict', image, '--checkpoint', str(run_dir), '--json', '--freeze', '--amp', 'bf16']) == 0
    top = json.loads(capsys.readouterr().out)['predictions'][0]['topk']
    assert top[0]['index'] == ref[0]['index'] and top[0]['prob'] == pytest.approx(ref[0]['prob'], abs=0.02)
