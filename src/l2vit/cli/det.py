"""``l2vit det``: train and evaluate torchvision Mask R-CNN / RetinaNet on an L²ViT backbone, COCO-format data.

Examples::

    l2vit det train -c configs/det/mask_rcnn_l2vit_tiny_1x.yaml --data-root /data/coco \\
        --pretrained L2ViT-Tiny-checkpoint-best-ema.pth -o runs/mrcnn_t_1x
    l2vit det train ... --resume auto                       # continue after a crash or Ctrl-C
    torchrun --nproc_per_node 8 -m l2vit det train ...      # the official 8 x 2 images
    l2vit det eval runs/mrcnn_t_1x                          # box / mask mAP of the best checkpoint + drawn PNGs

Data: an annotation json and an image folder per split (``data.train_ann`` / ``data.train_images``, ``data.val_*``),
relative to ``--data-root``; COCO's own layout is the default.
"""
from __future__ import annotations

import argparse

__all__ = ['add_parser', 'run']

_TRAIN_FLAGS = {'detector': 'model.detector', 'epochs': 'epochs', 'max_iters': 'max_iters'}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..integrations.cli_support import add_eval_arguments, add_train_arguments

    p = sub.add_parser('det', help='object detection / instance segmentation (Mask R-CNN, RetinaNet)',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest='det_command', metavar='ACTION', required=True)

    t = actions.add_parser('train', help='train a detector with a recipe (configs/det/*.yaml)',
                           description='Train with the official recipe (spec §6.2); flags override the recipe.')
    add_train_arguments(t, 'configs/det/*.yaml; default: Mask R-CNN 1x on L2ViT-T')
    t.add_argument('--detector', choices=('mask_rcnn', 'retinanet'), default=None)
    t.add_argument('--epochs', type=int, default=None)
    t.add_argument('--max-iters', type=int, default=None, help='stop after this many iterations (short runs)')
    t.set_defaults(run=run)

    e = actions.add_parser('eval', help='COCO box / mask mAP of a trained detector, predictions drawn as PNG',
                           description='Evaluate a run or checkpoint of `l2vit det train` on a COCO-format split.')
    add_eval_arguments(e)
    e.add_argument('--ann', default=None, help='annotation json (default: the recipe\'s data.val_ann)')
    e.add_argument('--images', default=None, help='image folder (default: the recipe\'s data.val_images)')
    e.add_argument('--batch-size', '-b', type=int, default=2)
    e.add_argument('--score-threshold', type=float, default=0.3, help='smallest score drawn on the PNGs')
    e.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..integrations.cli_support import run_train

    if args.det_command == 'train':
        return run_train('det', args, _TRAIN_FLAGS)
    return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader, Subset

    from ..integrations.cli_support import apply_eval_overrides, eval_device, eval_output_dir, write_json
    from ..integrations.coco import CocoDetection, collate_detection
    from ..integrations.det_task import build_detector_from_config, coco_split, evaluate_detector
    from ..integrations.det_transforms import detection_eval_transforms
    from ..integrations.metrics import format_coco_metrics
    from ..integrations.runner import load_trained

    cfg, state, weights, ckpt_dir = load_trained(args.checkpoint, 'det')
    cfg = apply_eval_overrides('det', cfg, args, {})
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ann, images = coco_split(cfg, 'val', args.ann, args.images)
    dataset = CocoDetection(ann, images, transforms=detection_eval_transforms(),
                            with_masks=cfg.model.detector == 'mask_rcnn')
    if dataset.class_names != list(state['class_names']):
        raise ValueError(f'{ann} has categories {dataset.class_names} but the model was trained on '
                         f'{list(state["class_names"])}')
    device = eval_device(args.device)
    model = build_detector_from_config(cfg, len(dataset.class_names), load_pretrained=False)
    model.load_state_dict(weights)
    model.to(device)
    subset = Subset(dataset, range(min(args.limit, len(dataset)))) if args.limit else dataset
    loader = DataLoader(subset, batch_size=args.batch_size, collate_fn=collate_detection,
                        num_workers=cfg.data.num_workers)
    out_dir = eval_output_dir(ckpt_dir, args.output_dir)
    metrics, results, text = evaluate_detector(model, dataset, loader, device, out_dir / 'predictions', args.draw,
                                               args.score_threshold)
    write_json(out_dir / 'metrics.json', {'checkpoint': str(ckpt_dir), 'annotations': str(ann),
                                          'images': len(subset), **metrics})
    write_json(out_dir / 'detections.json', results)
    print(text)
    print(format_coco_metrics(metrics))
    print(f'metrics: {out_dir / "metrics.json"}; detections (COCO results format): {out_dir / "detections.json"}'
          + (f'; drawn predictions: {out_dir / "predictions"}' if args.draw else ''))
    return 0
