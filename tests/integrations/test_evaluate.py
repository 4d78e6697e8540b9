"""The evaluation loops score a model that returns the ground truth at 1.0, and load weights from files."""
from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from l2vit.integrations import CocoDetection, L2ViTBackbone, SegEvalTransform, SegFolderDataset, collate_detection
from l2vit.integrations.config import SegTestConfig
from l2vit.integrations.det_task import evaluate_detector
from l2vit.integrations.det_transforms import detection_eval_transforms
from l2vit.integrations.seg_task import IndexedDataset, collate_indexed, evaluate_segmenter


class _DetOracle(nn.Module):
    """Returns each image's ground-truth instances as torchvision detections (masks as probabilities)."""

    def __init__(self, dataset: CocoDetection):
        super().__init__()
        self.targets = [dataset[i][1] for i in range(len(dataset))]
        self.calls = 0

    def forward(self, images):
        out = []
        for _ in images:
            t = self.targets[self.calls]
            self.calls += 1
            out.append({'boxes': t['boxes'].as_subclass(torch.Tensor).clone(), 'labels': t['labels'],
                        'scores': torch.ones(len(t['labels'])), 'masks': t['masks'].float()[:, None]})
        return out


class _ColourOracle(nn.Module):
    """Reads the class back from the (normalised) red channel, where the test data wrote ``40 * class``."""

    def forward(self, x):
        red = x[:, 0] * 58.395 + 123.675
        cls = (red / 40).round().long().clamp(0, 2)
        return {'out': torch.nn.functional.one_hot(cls, 3).permute(0, 3, 1, 2).float()}


def test_detection_evaluation_of_the_ground_truth_is_perfect(coco_root, tmp_path):
    ds = CocoDetection(coco_root / 'val.json', coco_root / 'val', transforms=detection_eval_transforms(),
                       with_masks=True)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_detection)
    metrics, results, _ = evaluate_detector(_DetOracle(ds), ds, loader, torch.device('cpu'), tmp_path, draw=1,
                                            score_threshold=0.5)
    assert metrics['bbox_mAP'] == pytest.approx(1.0) and metrics['segm_mAP'] == pytest.approx(1.0)
    assert {r['category_id'] for r in results} <= {3, 7, 9}
    assert [p.name for p in tmp_path.glob('*.png')] == ['100.png']


def test_segmentation_evaluation_of_the_ground_truth_is_perfect(tmp_path):
    g = torch.Generator().manual_seed(0)
    for d in ('img', 'ann'):
        (tmp_path / d).mkdir()
    for i, (h, w) in enumerate(((45, 70), (33, 50))):
        label = torch.randint(0, 4, (h // 5 + 1, w // 5 + 1), generator=g).repeat_interleave(5, 0)
        label = label.repeat_interleave(5, 1)[:h, :w]  # 0 = "other" (ignored), 1..3 the classes
        image = torch.zeros(h, w, 3, dtype=torch.uint8)
        image[..., 0] = 40 * (label - 1).clamp(min=0)
        Image.fromarray(image.numpy()).save(tmp_path / 'img' / f'{i}.png')
        Image.fromarray(label.to(torch.uint8).numpy()).save(tmp_path / 'ann' / f'{i}.png')
    ds = SegFolderDataset(tmp_path / 'img', tmp_path / 'ann', num_classes=3, transform=SegEvalTransform(None))
    loader = DataLoader(IndexedDataset(ds), batch_size=1, collate_fn=collate_indexed)
    for mode in ('whole', 'slide'):
        test = SegTestConfig(mode=mode, scale=None, crop_size=(32, 32), stride=(20, 20))
        m = evaluate_segmenter(_ColourOracle(), ds, loader, torch.device('cpu'), test, ['a', 'b', 'c'],
                               tmp_path / mode, draw=2)
        assert m['mIoU'] == 1.0 and m['aAcc'] == 1.0, mode
        assert sorted(p.name for p in (tmp_path / mode).glob('*.png')) == ['0.png', '1.png']


def test_backbone_weights_from_files(tmp_path):
    clf = timm.create_model('test_l2vit', num_classes=5)
    sd = {k: v.clone() for k, v in clf.state_dict().items()}
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    # an official-style release: raw weights and EMA weights
    torch.save({'model': sd, 'model_ema': ema, 'epoch': 299}, tmp_path / 'release.pth')
    raw = L2ViTBackbone('test_l2vit', pretrained=tmp_path / 'release.pth')
    torch.testing.assert_close(raw.model.stem.conv1.weight, sd['stem.conv1.weight'])
    with_ema = L2ViTBackbone('test_l2vit', pretrained=tmp_path / 'release.pth', pretrained_ema=True)
    torch.testing.assert_close(with_ema.model.stem.conv1.weight, ema['stem.conv1.weight'])
    # a converted / local-dir directory and a bare safetensors file
    (tmp_path / 'conv').mkdir()
    save_file(sd, tmp_path / 'conv' / 'model.safetensors')
    (tmp_path / 'conv' / 'config.json').write_text(json.dumps({'architecture': 'test_l2vit', 'num_classes': 5}))
    for src in (f'local-dir:{tmp_path / "conv"}', tmp_path / 'conv' / 'model.safetensors'):
        bb = L2ViTBackbone('test_l2vit', out_indices=(2, 3), pretrained=src)
        torch.testing.assert_close(bb.model.stages[2].blocks[0].mlp.fc1.weight, sd['stages.2.blocks.0.mlp.fc1.weight'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ValueError, match='not found'):
            L2ViTBackbone('test_l2vit', pretrained=tmp_path / 'missing.pth')
