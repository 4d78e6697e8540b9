"""``l2vit eval``: top-1 / top-5 / loss of a checkpoint on an ImageFolder split, at any resolution.

The checkpoint is a run or checkpoint directory of ``l2vit train`` (EMA weights when present, ``--no-ema`` for the
raw ones), a directory made by ``l2vit convert``, or an official release ``.pth``. Without ``--data-dir`` a run of
ours is evaluated on the validation split it was trained with (the built-in digits for the demo). Examples::

    l2vit eval --checkpoint runs/digits_demo
    l2vit eval --checkpoint L2ViT-Base-checkpoint-best-ema.pth --data-dir /data/imagenet        # val/ split
    l2vit eval --checkpoint weights/l2vit_base --data-dir /data/imagenet --img-size 288 --json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ['add_parser', 'run', 'load_for_inference', 'training_config_of']


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``eval`` and ``predict``: weights, resolution, device."""
    p.add_argument('--checkpoint', '-c', required=True,
                   help='run / checkpoint directory, converted directory, official .pth or .safetensors file')
    p.add_argument('--model', default=None,
                   help='model name (needed only for bare weight files whose architecture cannot be inferred)')
    p.add_argument('--no-ema', dest='use_ema', action='store_false', help='use the raw weights, not the EMA ones')
    p.add_argument('--img-size', type=int, default=None, help='input resolution (default: the checkpoint\'s)')
    p.add_argument('--crop-pct', type=float, default=None,
                   help='center-crop fraction (default: 0.875 below 384 px, direct resize at >= 384)')
    p.add_argument('--batch-size', '-b', type=int, default=64)
    p.add_argument('--workers', '-j', type=int, default=2, help='data loader processes')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--amp', choices=('none', 'bf16', 'fp16'), default='none')
    p.add_argument('--freeze', action='store_true',
                   help='run the model compiled with its weights frozen (l2vit.export.compile_for_inference): the '
                        'first batch compiles (about half a minute for l2vit_tiny on 2 cores), later ones run faster; '
                        'on CPU the fastest way with --amp bf16')
    p.add_argument('--no-keep-freed-memory', dest='keep_freed_memory', action='store_false',
                   help="keep glibc's default allocator settings on CPU (by default large freed blocks are kept for "
                        'reuse: faster batches, more resident memory; see l2vit.engine.malloc)')
    p.add_argument('--json', action='store_true', help='print JSON instead of text')


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('eval', help='top-1 / top-5 / loss of a checkpoint on an image folder',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.add_argument('--data-dir', default=None,
                   help='ImageFolder root (its --split sub-folder is used when present) or a class-folder tree')
    p.add_argument('--split', default='val', help='sub-folder of --data-dir to evaluate (default: %(default)s)')
    p.set_defaults(run=run)


def training_config_of(source: Any) -> dict[str, Any] | None:
    """The training config stored in one of our checkpoints, or None for other sources."""
    if source.kind != 'ours':
        return None
    import torch
    # memory-mapped: only the config is read, not the optimizer state of a large model
    state = torch.load(source.path / 'state.pt', map_location='cpu', weights_only=True, mmap=True)
    return dict(state.get('config') or {}) or None


def load_for_inference(args: argparse.Namespace, device=None):
    """``(InferenceModel, transform, device, amp dtype, net)`` from the shared arguments; ``net`` runs the images:
    ``im.model`` itself, or with ``--freeze`` that model compiled with frozen weights."""
    import torch
    from timm.data import create_transform

    from ..data import eval_crop
    from ..engine.distributed import resolve_device
    from ..engine.malloc import keep_freed_memory_for_run
    from ..engine.weights import build_inference_model

    device = device or resolve_device(args.device)
    keep_freed_memory_for_run(args.keep_freed_memory, device)  # CPU: for the rest of this process
    im = build_inference_model(args.checkpoint, args.model, use_ema=args.use_ema)
    im.model.to(device)
    data_cfg = dict(im.data_config)
    if args.img_size is not None:
        data_cfg['input_size'] = (data_cfg['input_size'][0], args.img_size, args.img_size)
        data_cfg['crop_pct'], data_cfg['crop_mode'] = eval_crop(args.img_size, args.crop_pct)
    elif args.crop_pct is not None:
        data_cfg['crop_pct'], data_cfg['crop_mode'] = args.crop_pct, 'center'
    im.data_config = data_cfg
    transform = create_transform(**data_cfg, is_training=False)
    amp = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.amp]
    net = im.model
    if args.freeze:
        from ..export import compile_for_inference
        net = compile_for_inference(im.model)
    return im, transform, device, amp, net


def _eval_source(args: argparse.Namespace, im: Any):
    from ..data import DataError, DigitsSource, FolderSource

    if args.data_dir is None:
        train_cfg = training_config_of(im.source)
        if train_cfg is None:
            raise DataError('pass --data-dir: only run directories of l2vit train remember their data')
        data = train_cfg.get('data', {})
        if data.get('data_dir') is None:
            return DigitsSource('val', data.get('val_fraction', 0.2))
        args.data_dir, args.split = data['data_dir'], data.get('val_split', 'val')
    root = os.path.join(args.data_dir, args.split) if args.split else args.data_dir
    if not os.path.isdir(root):
        root = args.data_dir
    return FolderSource(root, classes=im.class_names)


def run(args: argparse.Namespace) -> int:
    from ..data import DataError, TransformedDataset, build_eval_loader
    from ..engine.distributed import cleanup_distributed, init_distributed
    from ..engine.evaluate import evaluate

    info, device = init_distributed(args.device)
    try:
        im, transform, device, amp, net = load_for_inference(args, device)
        source = _eval_source(args, im)
        num_classes = im.model.num_classes
        if len(source.classes) != num_classes:
            raise DataError(f'{getattr(source, "root", "the data")} has {len(source.classes)} class folders but the '
                            f'checkpoint classifier has {num_classes} classes')
        skipped: list[tuple[str, str]] = []
        dataset = TransformedDataset(source, transform, on_error='drop', seeded=False)
        loader = build_eval_loader(dataset, args.batch_size, info.world_size, info.rank, args.workers,
                                   device.type == 'cuda')
        res = evaluate(net, loader, device, amp, on_bad=skipped.extend)
    finally:
        cleanup_distributed()
    if not info.is_main:
        return 0
    for path, reason in skipped:
        print(f'warning: skipped unreadable image {reason}', file=sys.stderr)
    size = im.data_config['input_size']
    out = {
        'checkpoint': str(im.source.path), 'model': im.model_name, 'weights': im.weights,
        'img_size': list(size[1:]), 'crop_pct': im.data_config.get('crop_pct'),
        'crop_mode': im.data_config.get('crop_mode'), 'top1': res['top1'], 'top5': res['top5'],
        'loss': res['loss'], 'images': res['images'], 'bad_images': res['bad_images'],
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f'{im.model_name} ({"EMA" if im.weights == "ema" else "raw"} weights of {im.source.path}) at {size[1]}x{size[2]}, '
              f'crop {out["crop_pct"]} ({out["crop_mode"]}):')
        print(f'top-1 {res["top1"]:.3f}%  top-5 {res["top5"]:.3f}%  loss {res["loss"]:.4f}  '
              f'on {res["images"]} images' + (f' ({res["bad_images"]} unreadable, skipped)' if res['bad_images']
                                               else ''))
    return 0
