"""Built-in recipes that need no file: the digits demo (``l2vit train`` with no ``--config`` and no ``--data-dir``).

``configs/train/digits_demo.yaml`` holds the same values (a test keeps the two equal).
"""
from __future__ import annotations

from typing import Any

__all__ = ['DIGITS_DEMO']

# A 0.4M-parameter, three-stage L2ViT on 32 px upsampled 8x8 digits: window 4 (the 8x8 first-stage map holds four
# windows), light augmentation (no flips: they change digits), no Mixup, short warm-up, EMA with timm's warm-up.
DIGITS_DEMO: dict[str, Any] = {
    'model': {
        'name': 'test_l2vit',
        'drop_path_rate': 0.05,
        'kwargs': {'dims': [32, 64, 128], 'depths': [2, 2, 2], 'num_heads': [1, 2, 4], 'window_size': 4},
    },
    'data': {
        'data_dir': None,
        'input_size': 32,
        'crop_pct': 1.0,
        'mean': [0.305, 0.305, 0.305],  # digits pixel statistics
        'std': [0.376, 0.376, 0.376],
        'num_workers': 0,  # images are in memory; worker processes would only compete for the CPU cores
        'val_fraction': 0.2,
    },
    'aug': {
        'auto_augment': None, 'scale': [0.75, 1.0], 'ratio': [0.85, 1.18], 'hflip': 0.0, 'color_jitter': None,
        'reprob': 0.0, 'mixup': 0.0, 'cutmix': 0.0, 'smoothing': 0.1,
    },
    'optim': {'lr': 3e-3, 'weight_decay': 0.05, 'update_freq': 1},
    'sched': {'warmup_epochs': 1, 'warmup_lr': 1e-5, 'min_lr': 1e-5},
    'ema': {'enabled': True, 'decay': 0.999, 'warmup': True},
    'checkpoint': {'keep_last': 1},
    'log': {'interval': 10},
    'epochs': 20,
    'batch_size': 64,
    'device': 'auto',
    # one thread: this network's ops are too small to gain from intra-op parallelism, which collapses on busy cores
    'threads': 1,
    'output': 'runs/digits_demo',
}
