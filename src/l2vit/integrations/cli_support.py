"""What ``l2vit det`` and ``l2vit seg`` share: recipe resolution from flags, training, evaluation output folders."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from .config import DetConfig, SegConfig, dense_config_to_dict, load_dense_config

__all__ = ['add_train_arguments', 'add_eval_arguments', 'resolve_train_config', 'run_train', 'eval_output_dir',
           'eval_device', 'write_json']

# flags of both `det train` and `seg train` -> dotted config keys
_COMMON_FLAGS = {
    'data_root': 'data.root',
    'output': 'output',
    'backbone': 'model.backbone',
    'pretrained': 'model.pretrained',
    'batch_size': 'batch_size',
    'lr': 'optim.lr',
    'seed': 'seed',
    'device': 'device',
    'amp': 'amp',
    'workers': 'data.num_workers',
    'threads': 'threads',
}


def add_train_arguments(p: argparse.ArgumentParser, recipes: str) -> None:
    """Flags common to ``det train`` and ``seg train``."""
    p.add_argument('--config', '-c', default=None, help=f'YAML recipe ({recipes})')
    p.add_argument('--data-root', default=None, help='dataset root the recipe\'s relative paths start from')
    p.add_argument('--output', '-o', default=None, help='run directory (checkpoints, logs, summary, predictions)')
    p.add_argument('--backbone', default=None, help='timm model name: l2vit_tiny, l2vit_small, l2vit_base, ...')
    p.add_argument('--pretrained', default=None, metavar='PATH',
                   help='backbone weights: official ImageNet .pth, converted dir, our run / checkpoint, '
                        '.safetensors, or an official mmdet / mmseg checkpoint')
    p.add_argument('--batch-size', '-b', type=int, default=None, help='images per process')
    p.add_argument('--lr', type=float, default=None, help='base learning rate')
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--device', default=None, help='auto, cpu, cuda or cuda:N')
    p.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default=None)
    p.add_argument('--workers', '-j', type=int, default=None, help='data loader processes')
    p.add_argument('--threads', type=int, default=None, help='CPU threads for torch ops')
    p.add_argument('--resume', default=None, metavar='auto|PATH',
                   help="'auto': continue from the newest checkpoint of --output (start fresh if none); or a "
                        'checkpoint / run directory')
    p.add_argument('--overwrite', action='store_true', help='delete an earlier run in --output and start again')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='override any recipe key, e.g. --set model.window_size=7 (repeatable)')
    p.add_argument('--print-config', action='store_true', help='print the resolved recipe and exit')


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Flags common to ``det eval`` and ``seg eval``."""
    p.add_argument('checkpoint', help='run directory (its best checkpoint, else the newest) or checkpoint directory')
    p.add_argument('--data-root', default=None, help='dataset root (default: the one the model was trained with)')
    p.add_argument('--output-dir', '-o', default=None,
                   help='where metrics.json and the drawn PNGs go (default: <run>/eval/<checkpoint>)')
    p.add_argument('--draw', type=int, default=8, help='images drawn as PNG (0: none)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--workers', '-j', type=int, default=None, help='data loader processes')
    p.add_argument('--threads', type=int, default=None, help='CPU threads for torch ops')
    p.add_argument('--limit', type=int, default=None, help='evaluate the first N images only (a quick look)')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='override a recipe key of the checkpoint, e.g. --set model.test_size=640 (repeatable)')


def _overrides(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    from ..engine.config import collect_overrides

    return collect_overrides(args, {**_COMMON_FLAGS, **flags}, args.overrides)


def resolve_train_config(task: str, args: argparse.Namespace, flags: dict[str, str]) -> DetConfig | SegConfig:
    """The recipe named by ``--config`` (or the default one) with flag and ``--set`` overrides applied."""
    return load_dense_config(task, args.config, _overrides(args, flags))


def run_train(task: str, args: argparse.Namespace, flags: dict[str, str]) -> int:
    """``l2vit det|seg train``: resolve the recipe, then train (or print it)."""
    import yaml

    cfg = resolve_train_config(task, args, flags)
    if args.print_config:
        print(yaml.safe_dump(dense_config_to_dict(cfg), sort_keys=False), end='')
        return 0
    if task == 'det':
        from .det_task import DetTrainer as Trainer
    else:
        from .seg_task import SegTrainer as Trainer  # type: ignore[assignment]
    return Trainer(cfg, resume=args.resume, overwrite=args.overwrite).fit().exit_code


def apply_eval_overrides(task: str, cfg: DetConfig | SegConfig, args: argparse.Namespace,
                         flags: dict[str, str]) -> DetConfig | SegConfig:
    """The checkpoint's recipe with the eval command's overrides."""
    from ..engine.config import apply_overrides
    from .config import dense_config_from_dict

    overrides = _overrides(args, flags)
    return dense_config_from_dict(task, apply_overrides(dense_config_to_dict(cfg), overrides))


def eval_output_dir(checkpoint_dir: Path, output_dir: str | None) -> Path:
    """``--output-dir``, or ``<run>/eval/<checkpoint name>`` for a checkpoint inside a run directory."""
    if output_dir is not None:
        return Path(output_dir)
    for parent in checkpoint_dir.parents:
        if parent.name == 'checkpoints':
            return parent.parent / 'eval' / checkpoint_dir.name
    return checkpoint_dir / 'eval'


def eval_device(name: str) -> torch.device:
    from ..engine.distributed import resolve_device

    return resolve_device(name)


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON file (NaN written as null)."""
    from ..engine.checkpoint import atomic_write_text
    from .runner import json_safe

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(json_safe(data), indent=2))
