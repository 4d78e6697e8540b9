"""Data: sources and their errors, seeded per-sample augmentation, resumable sharded sampling, transforms, names."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from l2vit.data import (
    DataError,
    DigitsSource,
    EpochSampler,
    FolderSource,
    ShardSampler,
    TransformedDataset,
    build_eval_transform,
    build_sources,
    build_train_transform,
    class_names_for,
    collate_skipping,
    eval_crop,
)


def _folder(root, classes=('a', 'b'), n=3, size=12):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / c / f'{i}.png')
    return root


def test_digits_split_is_fixed_and_stratified():
    train, val = DigitsSource('train'), DigitsSource('val')
    assert (len(train), len(val)) == (1438, 359) and train.classes == [str(i) for i in range(10)]
    counts = np.bincount(val.targets)
    assert counts.min() >= 35 and counts.max() <= 37
    img = val.load(0)
    assert img.mode == 'RGB' and img.size == (8, 8)
    np.testing.assert_array_equal(DigitsSource('val').images, val.images)
    with pytest.raises(DataError, match="'train' or 'val'"):
        DigitsSource('test')


def test_folder_source_and_errors(tmp_path):
    src = FolderSource(_folder(tmp_path / 'train'))
    assert src.classes == ['a', 'b'] and len(src) == 6 and src.target(5) == 1
    assert src.describe(0).endswith('a/0.png') and src.load(0).mode == 'RGB'
    (tmp_path / 'train' / 'a' / '3.png').write_bytes(b'broken')
    from l2vit.data import BadImageError
    with pytest.raises(BadImageError, match='3.png'):
        FolderSource(tmp_path / 'train').load(3)
    with pytest.raises(DataError, match='differ from the training classes'):
        FolderSource(tmp_path / 'train', classes=['a', 'c'])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='no class sub-folders'):
        FolderSource(tmp_path / 'empty')
    with pytest.raises(DataError, match='must contain train/ and val/'):
        build_sources(str(tmp_path))
    _folder(tmp_path / 'val')
    train, val = build_sources(str(tmp_path))
    assert train.classes == val.classes
    assert len(build_sources(None)[1]) == 359


def test_seeded_samples_ignore_and_keep_the_global_rng(tmp_path):
    src = FolderSource(_folder(tmp_path / 'train', size=40))
    tf = build_train_transform(32)  # RandomResizedCrop, flip, RandAugment, random erasing: all random
    ds = TransformedDataset(src, tf, seed=7)
    torch.manual_seed(0)
    a = ds[(2, 5)][0]
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = torch.rand(1), np.random.rand(), random.random()
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    b = ds[(2, 5)][0]
    after = torch.rand(1), np.random.rand(), random.random()
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # a function of (seed, epoch, index) only
    assert after == before  # the training RNG streams are untouched
    assert not torch.equal(ds[(2, 6)][0], a)  # another epoch, another crop
    assert not torch.equal(TransformedDataset(src, tf, seed=8)[(2, 5)][0], a)


def test_bad_images_are_substituted_or_dropped(tmp_path):
    root = _folder(tmp_path / 'train')
    (root / 'a' / '1.png').write_bytes(b'not an image')
    src = FolderSource(root)
    tf = build_eval_transform(32, crop_pct=1.0)
    x, y, bad = TransformedDataset(src, tf, on_error='substitute')[1]
    assert x.shape == (3, 32, 32) and y == 0 and len(bad) == 1 and bad[0][0].endswith('a/1.png')
    item = TransformedDataset(src, tf, on_error='drop', seeded=False)[1]
    assert item[0] is None
    images, targets, skipped = collate_skipping([item, TransformedDataset(src, tf)[0]])
    assert images.shape == (1, 3, 32, 32) and targets.tolist() == [0] and len(skipped) == 1


def test_epoch_sampler_shards_pads_and_resumes():
    full = [i for i, _ in EpochSampler(10, 1, 0, seed=3)]
    assert sorted(full) == list(range(10))
    s = EpochSampler(10, 1, 0, seed=3)
    s.set_epoch(1)
    assert [i for i, _ in s] != full and all(e == 1 for _, e in s)
    ranks = [EpochSampler(10, 4, r, seed=3) for r in range(4)]
    assert all(len(r) == 3 for r in ranks)
    merged = [i for r in ranks for i, _ in r]
    assert len(merged) == 12 and set(merged) == set(range(10))  # padded by wrapping, as DistributedSampler
    padded = full + full[:2]
    assert all([i for i, _ in ranks[r]] == padded[r::4] for r in range(4))  # DistributedSampler's order
    s = EpochSampler(10, 1, 0, seed=3)
    s.set_epoch(0, start=4)
    assert [i for i, _ in s] == full[4:] and len(s) == 6
    assert list(ShardSampler(10, 3, 1)) == [1, 4, 7]


def test_eval_crop_rule_and_transforms():
    assert eval_crop(224) == (0.875, 'center') and eval_crop(384) == (1.0, 'squash')
    assert eval_crop(384, 0.9) == (0.9, 'center')
    img = Image.new('RGB', (500, 300))
    assert build_eval_transform(224)(img).shape == (3, 224, 224)
    assert build_eval_transform(384)(img).shape == (3, 384, 384)
    names = [type(t).__name__ for t in build_train_transform(224).transforms]
    assert names[:3] == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment']
    assert names[-1] == 'RandomErasing'


def test_class_names():
    assert class_names_for(3, ['x', 'y', 'z']) == ['x', 'y', 'z']
    names = class_names_for(1000)
    assert names[0].startswith('tench') and len(names) == 1000
    assert class_names_for(4) == ['class 0', 'class 1', 'class 2', 'class 3']
