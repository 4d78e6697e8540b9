"""Image + mask folders (ADE20K layout) and the mmseg training / test pipelines."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from l2vit.data import DataError
from l2vit.integrations import ADE20K_CLASSES, SegEvalTransform, SegFolderDataset, SegTrainTransform
from l2vit.integrations.seg_data import rescale_size


def _ds(root, split='training', **kw):
    kw.setdefault('num_classes', 3)
    return SegFolderDataset(root / 'images' / split, root / 'annotations' / split, **kw)


def test_reduce_zero_label_as_mmseg(tmp_path):
    (tmp_path / 'i').mkdir()
    (tmp_path / 'm').mkdir()
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / 'i' / 'a.png')
    Image.fromarray(np.array([[0, 1, 2], [3, 255, 1]], np.uint8)).save(tmp_path / 'm' / 'a.png')
    label = SegFolderDataset(tmp_path / 'i', tmp_path / 'm', num_classes=3).load_label(0)
    assert label.tolist() == [[255, 0, 1], [2, 255, 0]]
    plain = SegFolderDataset(tmp_path / 'i', tmp_path / 'm', num_classes=4, reduce_zero_label=False)
    assert plain.load_label(0).tolist() == [[0, 1, 2], [3, 255, 1]]
    with pytest.raises(DataError, match='label 3 but there are 3 classes'):
        SegFolderDataset(tmp_path / 'i', tmp_path / 'm', num_classes=3, reduce_zero_label=False).load_label(0)


def test_pairs_warnings_and_errors(ade_root, tmp_path):
    ds = _ds(ade_root)
    assert len(ds) == 5 and ds.name(0) == 'img_000'
    image, label = ds[0]
    assert image.shape == (3, 50, 67) and image.dtype == torch.uint8 and label.shape == (50, 67)
    with pytest.warns(UserWarning, match='no labelled pixel'):
        _, ignored = ds[4]  # the all-"other" mask
    assert (ignored == 255).all()
    with pytest.raises(DataError, match='mask folder not found'):
        SegFolderDataset(ade_root / 'images' / 'training', tmp_path / 'nope', num_classes=3)
    (tmp_path / 'masks').mkdir()
    with pytest.raises(DataError, match='have no mask'):
        SegFolderDataset(ade_root / 'images' / 'training', tmp_path / 'masks', num_classes=3)
    (tmp_path / 'images').mkdir()
    Image.new('RGB', (67, 50)).save(tmp_path / 'images' / 'a.jpg')
    Image.new('RGB', (67, 50)).save(tmp_path / 'masks' / 'a.png')
    with pytest.raises(DataError, match='single-channel'):
        SegFolderDataset(tmp_path / 'images', tmp_path / 'masks', num_classes=3).load_label(0)


def test_train_pipeline_crops_pads_and_is_seeded(ade_root):
    tf = SegTrainTransform(scale=(128, 64), crop_size=(48, 48))
    ds = _ds(ade_root, transform=tf)
    image, label = ds[(2, 0)]  # 40x90 rescaled into (128, 64) x [0.5, 2]: may be smaller than the crop
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32 and label.shape == (48, 48)
    assert set(label.unique().tolist()) <= {0, 1, 2, 255}
    torch.testing.assert_close(ds[(1, 5)][0], ds[(1, 5)][0])
    # padding: a tiny rescale leaves a border of ignore labels and zero (normalised) pixels
    small = SegTrainTransform(scale=(20, 10), ratio_range=(1.0, 1.0), crop_size=(48, 48), photometric=False)
    img, lab = small(torch.full((3, 40, 60), 128, dtype=torch.uint8), torch.zeros(40, 60, dtype=torch.long))
    assert lab[-1].eq(255).all() and img[:, -1].eq(0).all() and lab[0, 0] == 0


def test_crop_avoids_single_class_crops():
    torch.manual_seed(0)
    label = torch.zeros(100, 100, dtype=torch.long)
    label[:, 90:] = 1  # class 1 only near the right border
    tf = SegTrainTransform(crop_size=(20, 20), cat_max_ratio=0.75)
    hits = 0
    for _ in range(20):
        _, crop = tf._random_crop(torch.zeros(3, 100, 100), label)
        counts = torch.bincount(crop.reshape(-1), minlength=2)
        hits += int(counts.max() / counts.sum() < 0.75)
    assert hits > 5  # a uniform crop position would hit the narrow band ~1 time in 20


def test_eval_pipeline_and_rescale_rule():
    assert rescale_size((512, 683), (2048, 512)) == (512, 683)
    assert rescale_size((300, 1000), (2048, 512)) == (512, 1707)
    assert rescale_size((100, 5000), (2048, 512)) == (41, 2048)
    tf = SegEvalTransform((128, 64))
    image, label = tf(torch.zeros(3, 50, 67, dtype=torch.uint8), torch.ones(50, 67, dtype=torch.long))
    assert image.shape == (3, 64, 86) and label.shape == (50, 67)
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == 'wall' and ADE20K_CLASSES[-1] == 'flag'
