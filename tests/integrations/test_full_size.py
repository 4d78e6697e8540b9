"""Full-size models of the shipped recipes (slow): a training step and inference, official weights for S/B, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2vit.integrations import L2ViTBackbone, load_dense_config
from l2vit.integrations.det_task import build_detector_from_config
from l2vit.integrations.seg_task import build_segmenter_from_config

from ..helpers import official_random_state_dict
from .conftest import det_overrides

CONFIGS = Path(__file__).resolve().parents[2] / 'configs'
pytestmark = pytest.mark.slow


@pytest.mark.parametrize('recipe,params', [('mask_rcnn_l2vit_tiny_1x', 48_107_386),
                                           ('retinanet_l2vit_tiny_1x', 38_787_778)])
def test_tiny_detectors_train_and_infer(recipe, params):
    cfg = load_dense_config('det', CONFIGS / 'det' / f'{recipe}.yaml')
    model = build_detector_from_config(cfg, 80)  # COCO: 80 categories + background
    assert sum(p.numel() for p in model.parameters()) == params
    images = [torch.rand(3, 320, 448), torch.rand(3, 288, 416)]
    targets = []
    for h, w in ((320, 448), (288, 416)):
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 20:120, 30:200] = 1
        masks[1, 150:260, 100:300] = 1
        targets.append({'boxes': torch.tensor([[30., 20., 200., 120.], [100., 150., 300., 260.]]),
                        'labels': torch.tensor([1, 17]), 'masks': masks})
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 427, 640)])[0]  # resized to 800 short side inside, boxes mapped back
    assert out['boxes'].shape[1] == 4 and (out['boxes'][:, 2] <= 640).all()


def test_tiny_upernet_trains_on_official_crops():
    cfg = load_dense_config('seg', CONFIGS / 'seg' / 'upernet_l2vit_tiny_160k.yaml')
    model = build_segmenter_from_config(cfg).train()
    assert sum(p.numel() for p in model.parameters()) == 60_250_289
    x, y = torch.randn(2, 3, 512, 512), torch.randint(0, 150, (2, 512, 512))
    losses = model.loss(model(x), y)
    sum(losses.values()).backward()
    assert set(losses) == {'loss_seg', 'loss_aux'} and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize('variant', ['small', 'base'])
def test_official_small_and_base_weights_load(variant):
    official = official_random_state_dict(variant)
    bb = L2ViTBackbone(f'l2vit_{variant}', out_indices=(0, 1, 2, 3), window_size=7)
    assert bb.load_pretrained({'model': official}) == ['norm0', 'norm1', 'norm2', 'norm3']


def test_detection_under_torchrun_with_two_gloo_processes(coco_root, tmp_path):
    ov = det_overrides(coco_root, tmp_path / 'ddp', epochs=2, batch_size=1)
    args = []
    for k, v in ov.items():
        args += ['--set', f'{k}={json.dumps(v)}']  # JSON is YAML
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    env['PYTHONPATH'] = str(Path(__file__).resolve().parents[2] / 'src') + os.pathsep + env.get('PYTHONPATH', '')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '-m', 'l2vit', 'det', 'train',
           '--threads', '1', *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '2 process(es) x 1' in proc.stdout
    assert (tmp_path / 'ddp' / 'checkpoints' / 'epoch-0002' / 'model.safetensors').is_file()
    assert 'bbox_mAP' in (tmp_path / 'ddp' / 'summary.csv').read_text()
