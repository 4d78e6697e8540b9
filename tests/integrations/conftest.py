"""Dense-prediction tests: one torch thread (2 shared CPU cores thrash with more), small generated datasets."""
import warnings

import pytest

from tests.helpers import torch_threads

from .synthetic import make_ade, make_coco

DET_SIZES = [(64, 80), (72, 64), (64, 64), (80, 96)]
SEG_SIZES = [(50, 67), (64, 64), (40, 90), (64, 48)]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):  # tiny models: see tests.helpers.torch_threads
        yield


@pytest.fixture(scope='session')
def coco_root(tmp_path_factory):
    """train: 4 images with 2 shapes each, 1 image without annotation, 1 degenerate box, 1 annotation without
    segmentation; val: 2 images."""
    root = tmp_path_factory.mktemp('coco')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        make_coco(root, DET_SIZES, empty=1, degenerate=1, no_segmentation=1, name='train')
        make_coco(root, [(64, 80), (70, 66)], name='val', seed=1)
    return root


@pytest.fixture(scope='session')
def ade_root(tmp_path_factory):
    """training: 4 images + 1 with an all-"other" mask; validation: 2 images; 3 classes."""
    root = tmp_path_factory.mktemp('ade')
    make_ade(root, 'training', SEG_SIZES, ignore_only=1)
    make_ade(root, 'validation', [(50, 67), (45, 70)], seed=1)
    return root


def det_overrides(root, output, **extra):
    """A tiny Mask R-CNN recipe on the generated COCO data (2 iterations per epoch)."""
    ov = {
        'data.root': str(root), 'data.train_ann': 'train.json', 'data.train_images': 'train',
        'data.val_ann': 'val.json', 'data.val_images': 'val', 'data.num_workers': 0,
        'model.backbone': 'test_l2vit', 'model.fpn_channels': 32, 'model.window_size': None,
        'model.kwargs': {'representation_size': 64, 'mask_head_channels': 32},
        'model.test_size': 64, 'model.max_size': 96,
        'aug.scales': [56, 64], 'aug.max_size': 96, 'aug.crop_scales': [64], 'aug.crop_size': [40, 60],
        'epochs': 3, 'eval_interval': 1, 'sched.milestones': [2], 'sched.warmup_iters': 2, 'optim.lr': 1e-3,
        'run.log_interval': 1, 'run.draw': 2, 'output': str(output), 'device': 'cpu',
    }
    ov.update(extra)
    return ov


def seg_overrides(root, output, **extra):
    """A tiny UperNet recipe on the generated ADE-layout data."""
    ov = {
        'data.root': str(root), 'data.num_workers': 0, 'model.backbone': 'test_l2vit', 'model.window_size': None,
        'model.num_classes': 3, 'model.channels': 32, 'model.aux_channels': 16,
        'aug.scale': [128, 64], 'aug.crop_size': [48, 48], 'test.scale': [128, 64],
        'iters': 6, 'eval_interval': 3, 'sched.warmup_iters': 2, 'optim.lr': 1e-3, 'run.log_interval': 1,
        'run.draw': 2, 'batch_size': 2, 'output': str(output), 'device': 'cpu',
    }
    ov.update(extra)
    return ov
