"""``l2vit seg``: train and evaluate UperNet on an L²ViT backbone, image + mask-PNG folders (ADE20K layout).

Examples::

    l2vit seg train -c configs/seg/upernet_l2vit_tiny_160k.yaml --data-root /data/ADEChallengeData2016 \\
        --pretrained L2ViT-Tiny-checkpoint-best-ema.pth -o runs/upernet_t
    l2vit seg train ... --resume auto
    torchrun --nproc_per_node 8 -m l2vit seg train ...
    l2vit seg eval runs/upernet_t                          # mIoU + per-class IoU, coloured overlays as PNG
    l2vit seg eval runs/upernet_t --mode slide             # sliding-window inference instead of whole image

Data: ``images/<split>`` and ``annotations/<split>`` under ``--data-root`` (mask PNGs of class indices, paired by
file name); ``reduce_zero_label`` and ignore index 255 as in ADE20K by default.
"""
from __future__ import annotations

import argparse

__all__ = ['add_parser', 'run']

_TRAIN_FLAGS = {'iters': 'iters', 'num_classes': 'model.num_classes'}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..integrations.cli_support import add_eval_arguments, add_train_arguments

    p = sub.add_parser('seg', help='semantic segmentation (UperNet)', description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest='seg_command', metavar='ACTION', required=True)

    t = actions.add_parser('train', help='train UperNet with a recipe (configs/seg/*.yaml)',
                           description='Train with the official ADE20K recipe (spec §6.4); flags override it.')
    add_train_arguments(t, 'configs/seg/*.yaml; default: UperNet 160k on L2ViT-T')
    t.add_argument('--iters', type=int, default=None, help='training iterations')
    t.add_argument('--num-classes', type=int, default=None, help='classes after reduce_zero_label (ADE20K: 150)')
    t.set_defaults(run=run)

    e = actions.add_parser('eval', help='mIoU and per-class IoU of a trained UperNet, overlays drawn as PNG',
                           description='Evaluate a run or checkpoint of `l2vit seg train` on an image + mask split.')
    add_eval_arguments(e)
    e.add_argument('--images', default=None, help='image folder (default: the recipe\'s data.val_images)')
    e.add_argument('--masks', default=None, help='mask folder (default: the recipe\'s data.val_masks)')
    e.add_argument('--mode', choices=('whole', 'slide'), default=None,
                   help='whole-image (official) or sliding-window inference (default: the recipe\'s test.mode)')
    e.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..integrations.cli_support import run_train

    if args.seg_command == 'train':
        return run_train('seg', args, _TRAIN_FLAGS)
    return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader, Subset

    from ..integrations.cli_support import apply_eval_overrides, eval_device, eval_output_dir, write_json
    from ..integrations.metrics import format_segmentation_metrics
    from ..integrations.runner import load_trained
    from ..integrations.seg_data import SegEvalTransform, SegFolderDataset
    from ..integrations.seg_task import (
        IndexedDataset,
        build_segmenter_from_config,
        collate_indexed,
        evaluate_segmenter,
        seg_class_names,
        seg_split,
    )

    cfg, state, weights, ckpt_dir = load_trained(args.checkpoint, 'seg')
    cfg = apply_eval_overrides('seg', cfg, args, {'mode': 'test.mode'})
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    d = cfg.data
    images, masks = seg_split(cfg, 'val', args.images, args.masks)
    dataset = SegFolderDataset(images, masks, cfg.model.num_classes, d.reduce_zero_label, d.ignore_index,
                               SegEvalTransform(cfg.test.scale, d.mean, d.std), d.mask_suffix)
    device = eval_device(args.device)
    model = build_segmenter_from_config(cfg, load_pretrained=False)
    model.load_state_dict(weights)
    model.to(device)
    indexed = IndexedDataset(dataset)
    subset = Subset(indexed, range(min(args.limit, len(dataset)))) if args.limit else indexed
    loader = DataLoader(subset, batch_size=1, collate_fn=collate_indexed, num_workers=d.num_workers)
    out_dir = eval_output_dir(ckpt_dir, args.output_dir)
    names = list(state.get('class_names') or seg_class_names(cfg))
    metrics = evaluate_segmenter(model, dataset, loader, device, cfg.test, names, out_dir / 'predictions',
                                 args.draw)
    write_json(out_dir / 'metrics.json', {'checkpoint': str(ckpt_dir), 'images': len(subset),
                                          'mode': cfg.test.mode, **metrics})
    print(format_segmentation_metrics(metrics))
    print(f'metrics: {out_dir / "metrics.json"}' + (f'; overlays: {out_dir / "predictions"}' if args.draw else ''))
    return 0
