"""``l2vit train``: train or fine-tune with a YAML recipe plus overrides; resumable, distributed with torchrun.

With neither ``--config`` nor ``--data-dir`` it trains the built-in digits demo (scikit-learn's 8x8 handwritten
digits, no download) in a few minutes on a CPU. With ``--data-dir`` only, it runs the paper's ImageNet-1K recipe
(spec §5.1) on that ImageFolder tree. Examples::

    l2vit train                                           # the digits demo
    l2vit train --config configs/train/l2vit_tiny_in1k.yaml --data-dir /data/imagenet --output runs/tiny
    l2vit train ... --resume auto                         # continue after a crash or Ctrl-C
    torchrun --nproc_per_node 8 -m l2vit train --config ... # DDP (nccl on GPUs, gloo on CPU)
    l2vit train ... --set optim.lr=1e-3 --set ema.enabled=false
"""
from __future__ import annotations

import argparse

__all__ = ['add_parser', 'run', 'resolve_config']

# flag -> dotted config key
_FLAG_KEYS = {
    'model': 'model.name',
    'data_dir': 'data.data_dir',
    'output': 'output',
    'epochs': 'epochs',
    'batch_size': 'batch_size',
    'seed': 'seed',
    'device': 'device',
    'lr': 'optim.lr',
    'amp': 'amp',
    'workers': 'data.num_workers',
    'input_size': 'data.input_size',
    'update_freq': 'optim.update_freq',
    'finetune': 'finetune.checkpoint',
    'progress': 'log.progress',
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('train', help='train or fine-tune (built-in digits demo without arguments)',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', '-c', default=None, help='YAML recipe (configs/train/*.yaml)')
    p.add_argument('--model', default=None, help='timm model name, e.g. l2vit_tiny')
    p.add_argument('--data-dir', default=None, help='ImageFolder root with train/ and val/ class folders '
                                                    '(default: the built-in digits)')
    p.add_argument('--output', '-o', default=None, help='run directory (checkpoints, logs, summary)')
    p.add_argument('--epochs', type=int, default=None)
    p.add_argument('--batch-size', '-b', type=int, default=None, help='batch per process')
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--resume', default=None, metavar='auto|PATH',
                   help="'auto': continue from the newest checkpoint of --output (start fresh if none); or a "
                        'checkpoint / run directory')
    p.add_argument('--device', default=None, help='auto, cpu, cuda or cuda:N')
    p.add_argument('--lr', type=float, default=None, help='peak learning rate')
    p.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default=None, help='autocast precision')
    p.add_argument('--workers', '-j', type=int, default=None, help='data loader processes per training process')
    p.add_argument('--input-size', type=int, default=None, help='training and evaluation image size')
    p.add_argument('--update-freq', type=int, default=None, help='gradient accumulation steps')
    p.add_argument('--finetune', default=None, metavar='PATH',
                   help='initial weights: run / checkpoint / converted dir, official .pth or .safetensors')
    p.add_argument('--progress', choices=('auto', 'bar', 'log', 'none'), default=None)
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='override any config key, e.g. --set optim.clip_grad=5.0 (repeatable)')
    p.add_argument('--overwrite', action='store_true',
                   help='delete the files of an earlier run in --output and start again')
    p.add_argument('--print-config', action='store_true', help='print the resolved config and exit')
    p.set_defaults(run=run)


def resolve_config(args: argparse.Namespace):
    """The :class:`~l2vit.engine.TrainConfig` described by the command line."""
    from ..engine.config import apply_overrides, collect_overrides, config_from_dict, load_config
    from ..engine.presets import DIGITS_DEMO

    overrides = collect_overrides(args, _FLAG_KEYS, args.overrides)
    if args.config is not None:
        return load_config(args.config, overrides)
    if args.data_dir is None:
        return config_from_dict(apply_overrides(DIGITS_DEMO, overrides))
    return load_config(None, overrides)


def run(args: argparse.Namespace) -> int:
    import yaml

    from ..engine.config import config_to_dict
    from ..engine.trainer import Trainer

    cfg = resolve_config(args)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end='')
        return 0
    result = Trainer(cfg, resume=args.resume, overwrite=args.overwrite).fit()
    return result.exit_code
