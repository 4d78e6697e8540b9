"""COCO-format dataset and the detection augmentation: targets, warnings on unusable annotations, clear errors."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torchvision import tv_tensors

from l2vit.data import DataError
from l2vit.integrations import CocoDetection, RandomSizeCrop, collate_detection, detection_train_transforms


def _quiet_dataset(root, **kw) -> CocoDetection:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return CocoDetection(root / 'train.json', root / 'train', **kw)


def test_targets_follow_torchvision_conventions(coco_root):
    ds = _quiet_dataset(coco_root, with_masks=True)
    assert ds.cat_ids == [3, 7, 9] and ds.class_names == ['square', 'disc', 'triangle']
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 64, 80)
    boxes, masks = target['boxes'], target['masks']
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and boxes.shape == (2, 4)
    assert target['labels'].tolist() and all(1 <= v <= 3 for v in target['labels'].tolist())
    assert masks.shape == (2, 64, 80)
    for box, mask in zip(boxes, masks):  # tight boxes around the drawn shapes
        ys, xs = torch.nonzero(mask, as_tuple=True)
        torch.testing.assert_close(box, torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
    images, targets = collate_detection([ds[0], ds[1]])
    assert type(images[0]) is torch.Tensor and type(targets[0]['boxes']) is torch.Tensor


def test_unusable_annotations_warn_instead_of_crashing(coco_root):
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(coco_root / 'train.json', coco_root / 'train', with_masks=True, skip_empty=True)
    text = ' | '.join(str(w.message) for w in record)
    assert 'degenerate box' in text and 'without a usable segmentation' in text and 'no usable annotation' in text
    assert len(ds) == 4 and 104 not in ds.ids  # the image without annotations is skipped for training
    keep = _quiet_dataset(coco_root, with_masks=True, skip_empty=False)
    assert len(keep) == 5
    _, target = keep[keep.ids.index(104)]
    assert target['boxes'].shape == (0, 4) and target['masks'].shape == (0, 64, 80)
    # boxes only (RetinaNet): the annotation without segmentation is usable
    assert len(_quiet_dataset(coco_root, with_masks=False)[0][1]['boxes']) == 3


def test_an_empty_mask_drops_its_instance_with_a_warning(tmp_path, coco_root):
    data = json.loads((coco_root / 'train.json').read_text())
    ann = next(a for a in data['annotations'] if a['image_id'] == 101)
    ann['segmentation'] = [[0, 0, 0, 0, 0, 0]]  # a polygon of no area
    (tmp_path / 'x.json').write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ds = CocoDetection(tmp_path / 'x.json', coco_root / 'train', with_masks=True)
    with pytest.warns(UserWarning, match='empty mask'):
        _, target = ds[ds.ids.index(101)]
    assert len(target['boxes']) == 1 == len(target['masks']) == len(target['labels'])


def test_bad_inputs_raise_clear_errors(tmp_path, coco_root):
    with pytest.raises(DataError, match='annotation file not found'):
        CocoDetection(tmp_path / 'missing.json', coco_root / 'train')
    (tmp_path / 'bad.json').write_text('{"images": 3}')
    with pytest.raises(DataError, match='not a COCO-format annotation file'):
        CocoDetection(tmp_path / 'bad.json', coco_root / 'train')
    with pytest.raises(DataError, match='image folder not found'):
        CocoDetection(coco_root / 'train.json', tmp_path / 'nowhere')


def test_train_augmentation_keeps_boxes_masks_and_labels_together(coco_root):
    tf = detection_train_transforms(policy='detr', scales=[48, 56, 64], max_size=96, crop_scales=[64],
                                    crop_size=(30, 50))
    ds = _quiet_dataset(coco_root, with_masks=True, transforms=tf)
    for epoch in range(4):
        image, target = ds[(0, epoch)]
        assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        assert len(target['boxes']) == len(target['masks']) == len(target['labels'])
        for box, mask in zip(target['boxes'], target['masks']):
            assert box[2] - box[0] >= 1 and box[3] - box[1] >= 1
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(xs):  # the mask lies inside its box (up to resampling)
                assert xs.min() >= box[0] - 1.5 and xs.max() <= box[2] + 0.5
                assert ys.min() >= box[1] - 1.5 and ys.max() <= box[3] + 0.5
    # the same (index, epoch) always gives the same sample; another epoch another one
    a, b = ds[(1, 3)], ds[(1, 3)]
    torch.testing.assert_close(a[0], b[0])
    assert any(ds[(1, e)][0].shape != a[0].shape or not torch.equal(ds[(1, e)][0], a[0]) for e in range(4))


def test_random_size_crop_stays_in_range():
    crop = RandomSizeCrop(20, 30)
    for _ in range(20):
        out = crop(tv_tensors.Image(torch.zeros(3, 40, 25)))
        assert 20 <= out.shape[-2] <= 30 and 20 <= out.shape[-1] <= 25
    assert crop(tv_tensors.Image(torch.zeros(3, 10, 12))).shape[-2:] == (10, 12)  # smaller than the range
    with pytest.raises(ValueError):
        RandomSizeCrop(5, 4)
