"""Detection training and evaluation on COCO-format data: what ``l2vit det train`` / ``l2vit det eval`` run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import DataError
from ..engine.distributed import all_gather_objects, broadcast_object
from .coco import CocoDetection, collate_detection
from .config import DetConfig
from .det_transforms import detection_eval_transforms, detection_train_transforms
from .detection import build_detector
from .draw import draw_detections, save_png
from .metrics import coco_evaluate, detections_to_coco, format_coco_metrics
from .runner import DenseTrainer

__all__ = ['DetTrainer', 'build_detector_from_config', 'evaluate_detector', 'coco_split']


def build_detector_from_config(cfg: DetConfig, num_classes: int, load_pretrained: bool = True) -> nn.Module:
    """The detector a recipe describes, for ``num_classes`` object classes (the background is added)."""
    m = cfg.model
    backbone_kwargs = dict(m.backbone_kwargs, norm_eval=m.norm_eval, pretrained_ema=m.pretrained_ema)
    return build_detector(
        m.detector, num_classes + 1, backbone=m.backbone, pretrained=m.pretrained if load_pretrained else None,
        drop_path_rate=m.drop_path_rate, window_size=m.window_size, frozen_stages=m.frozen_stages,
        fpn_channels=m.fpn_channels, min_size=m.test_size, max_size=m.max_size, train_resize=False,
        backbone_kwargs=backbone_kwargs, **m.kwargs)


def coco_split(cfg: DetConfig, split: str, ann: str | None = None, images: str | None = None) -> tuple[Path, Path]:
    """``(annotation json, image folder)`` of ``split`` ('train' / 'val'), relative paths resolved under
    ``data.root``; ``ann`` / ``images`` replace the recipe's entries."""
    d = cfg.data
    ann = ann or getattr(d, f'{split}_ann')
    images = images or getattr(d, f'{split}_images')
    root = Path(d.root) if d.root else None
    if root is None and not (Path(ann).is_absolute() and Path(images).is_absolute()):
        raise DataError('data.root is not set: pass --data-root (the folder holding the annotation json and images) '
                        'or absolute annotation / image paths')

    def resolve(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() or root is None else root / p

    return resolve(ann), resolve(images)


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset: CocoDetection, loader: DataLoader, device: torch.device,
                      draw_dir: Path | None = None, draw: int = 0, score_threshold: float = 0.3,
                      amp_dtype: torch.dtype | None = None) -> tuple[dict[str, float], list[dict[str, Any]], str]:
    """COCO box (and mask) mAP of ``model`` on ``dataset`` (every rank evaluates its shard of ``loader``).

    Returns:
        ``(metrics, COCO result entries, COCOeval summary text)`` — the same on every rank.
    """
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    drawn = 0
    with_masks = dataset.with_masks
    for images, targets in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model([im.to(device, non_blocking=True) for im in images])
        for image, target, out in zip(images, targets, outputs):
            out = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in out.items()}
            results += detections_to_coco(out, target['image_id'], dataset.cat_ids)
            seen.append(int(target['image_id']))
            if draw_dir is not None and drawn < draw:
                picture = draw_detections((image * 255).round().clamp(0, 255).to(torch.uint8), out,
                                          dataset.class_names, score_threshold)
                save_png(picture, draw_dir / f'{target["image_id"]}.png')
                drawn += 1
    gathered = all_gather_objects((results, seen))
    results = [r for part, _ in gathered for r in part]
    seen = [i for _, ids in gathered for i in ids]
    metrics, text = {}, ''
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        iou_types = ('bbox', 'segm') if with_masks else ('bbox',)
        metrics, text = coco_evaluate(dataset.coco, results, iou_types, image_ids=seen)
    metrics, text = broadcast_object((metrics, text))
    model.train(was_training)
    return metrics, results, text


class DetTrainer(DenseTrainer):
    """Train a torchvision Mask R-CNN / RetinaNet on an L²ViT with the official recipe (spec §6.2)."""

    task = 'det'
    primary_metric = 'bbox_mAP'
    cfg: DetConfig

    def build_data(self) -> None:
        cfg = self.cfg
        with_masks = cfg.model.detector == 'mask_rcnn'
        a = cfg.aug
        train_tf = detection_train_transforms(a.hflip, a.policy, a.scales, a.max_size, a.crop_scales, a.crop_size)
        self.train_set = CocoDetection(*coco_split(cfg, 'train'), transforms=train_tf, with_masks=with_masks,
                                       skip_empty=cfg.data.skip_empty, seed=cfg.seed)
        self.val_set = CocoDetection(*coco_split(cfg, 'val'), transforms=detection_eval_transforms(),
                                     with_masks=with_masks, skip_empty=False, seed=cfg.seed)
        if self.val_set.cat_ids != self.train_set.cat_ids:
            raise DataError(f'training and validation annotations define different categories '
                            f'({len(self.train_set.cat_ids)} vs {len(self.val_set.cat_ids)}, or other ids)')
        self.class_names = self.train_set.class_names
        self.collate = collate_detection
        self.val_loader = self.eval_loader(self.val_set, cfg.batch_size, collate_detection)

    def build_model(self, load_pretrained: bool) -> nn.Module:
        return build_detector_from_config(self.cfg, len(self.class_names), load_pretrained)

    def describe_model(self) -> str:
        m = self.cfg.model
        return f'{m.detector} on {m.backbone}'

    def schedule_iters(self, iters_per_data_epoch: int) -> tuple[int, int, list[int]]:
        cfg = self.cfg
        total = cfg.epochs * iters_per_data_epoch
        milestones = [m * iters_per_data_epoch for m in cfg.sched.milestones] if cfg.sched.policy == 'step' else []
        return total, iters_per_data_epoch, milestones

    def eval_due(self, round_idx: int, last: bool) -> bool:
        return round_idx % self.cfg.eval_interval == 0 or last

    def round_label(self, round_idx: int, it: int) -> dict[str, Any]:
        return {'epoch': round_idx, 'iter': it}

    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [{k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in t.items()} for t in targets]
        return model(images, targets)

    def evaluate(self, model: nn.Module, draw_dir: Path | None) -> dict[str, Any]:
        metrics, _, text = evaluate_detector(model, self.val_set, self.val_loader, self.device, draw_dir,
                                             self.cfg.run.draw, amp_dtype=self.amp_dtype)
        return metrics

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return format_coco_metrics(metrics).replace('\n', '; ')

