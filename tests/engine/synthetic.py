"""Small synthetic ImageFolder trees and a tiny training recipe, shared by the engine and CLI tests."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

_COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (150, 40, 200))


def make_image_folder(root: Path, num_classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                      size: int = 36, seed: int = 0) -> Path:
    """``root/{train,val}/class_<k>/<i>.png``: noisy images whose dominant colour is the class."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for c in range(num_classes):
            d = root / split / f'class_{c}'
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 90, (size, size, 3)) + np.array(_COLOURS[c % len(_COLOURS)]) * 0.6
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f'{i}.png')
    return root


def tiny_recipe(**overrides: Any) -> dict[str, Any]:
    """The paper recipe's components (RandAugment, Mixup/CutMix, random erasing, drop-path, EMA, AdamW, cosine with
    warm-up) on test_l2vit at 32 px, small enough for a few seconds on one CPU thread."""
    cfg: dict[str, Any] = {
        'model': {'name': 'test_l2vit', 'drop_path_rate': 0.1},
        'data': {'input_size': 32, 'num_workers': 0, 'val_batch_size': 8},
        'optim': {'lr': 1e-3, 'update_freq': 1},
        'sched': {'warmup_epochs': 1, 'warmup_lr': 1e-5, 'min_lr': 1e-5},
        'ema': {'enabled': True, 'decay': 0.9},
        'log': {'progress': 'log', 'interval': 1, 'step_events': True, 'plot': True},
        'epochs': 2,
        'batch_size': 4,
        'threads': 1,
        'device': 'cpu',
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split('.')
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def write_recipe(path: Path, **overrides: Any) -> Path:
    path.write_text(yaml.safe_dump(tiny_recipe(**overrides)))
    return path


def read_events(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    import json
    path = Path(run_dir) / 'events.jsonl'
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if kind is None or e['event'] == kind]


def cli_env() -> dict[str, str]:
    """Environment for l2vit subprocesses: this checkout's sources, one thread, no warning noise."""
    import os
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    env['PYTHONPATH'] = str(Path(__file__).resolve().parents[2] / 'src') + os.pathsep + env.get('PYTHONPATH', '')
    return env


def run_cli(cmd: list[str], timeout: float = 240.):
    """Run ``cmd`` in its own process group; on timeout kill the whole group (torchrun workers included)."""
    import os
    import signal
    import subprocess
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f'{" ".join(cmd)} timed out after {timeout} s:\n{out}\n{err}') from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _corrupt(path: Path) -> None:
    path.write_bytes(b'\x89PNG\r\n\x1a\n not really a png')


def train_tiny_run(root: Path) -> tuple[Path, Path]:
    """Train the tiny recipe for 2 epochs on a 3-class folder with one corrupt image in train/ and in val/."""
    from l2vit.engine import Trainer, config_from_dict
    data = make_image_folder(root / 'data')
    _corrupt(data / 'train' / 'class_1' / 'corrupt.png')
    _corrupt(data / 'val' / 'class_2' / 'corrupt.png')
    run_dir = root / 'run'
    cfg = config_from_dict(tiny_recipe(output=str(run_dir), **{'data.data_dir': str(data),
                                                               'checkpoint.recovery_interval': 4}))
    result = Trainer(cfg).fit()
    assert result.status == 'completed'
    return run_dir, data


_NATIVE_TO_OFFICIAL = (
    (r'^stem\.conv1\.', 'downsample_layers.0.proj.proj.0.'), (r'^stem\.bn1\.', 'downsample_layers.0.proj.proj.1.'),
    (r'^stem\.conv2\.', 'downsample_layers.0.proj.proj.3.'), (r'^stem\.bn2\.', 'downsample_layers.0.proj.proj.4.'),
    (r'^stem\.norm\.', 'downsample_layers.0.norm.'), (r'^stages\.(\d+)\.downsample\.', r'downsample_layers.\1.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.'), (r'^head\.fc\.', 'head.'),
)


def to_official_name(key: str) -> str:
    """The official repository's name of a native state-dict key (the inverse of checkpoint_filter_fn's renames)."""
    for pattern, repl in _NATIVE_TO_OFFICIAL:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key
