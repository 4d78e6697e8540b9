"""Semantic-segmentation training and evaluation on image + mask folders: what ``l2vit seg train|eval`` run."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DataError
from ..engine.distributed import all_reduce_sum
from .ade import ADE20K_CLASSES
from .config import SegConfig, SegTestConfig
from .draw import draw_segmentation, save_png
from .metrics import confusion_matrix, format_segmentation_metrics, segmentation_metrics
from .runner import DenseTrainer
from .seg_data import SegEvalTransform, SegFolderDataset, SegTrainTransform
from .upernet import UperNet, build_upernet, slide_inference, whole_inference

__all__ = ['SegTrainer', 'build_segmenter_from_config', 'evaluate_segmenter', 'seg_class_names', 'seg_split',
           'IndexedDataset', 'collate_segmentation', 'collate_indexed']


def seg_class_names(cfg: SegConfig) -> list[str]:
    """The recipe's class names, ADE20K's for 150 classes, else ``class <i>``."""
    if cfg.data.class_names is not None:
        return list(cfg.data.class_names)
    if cfg.model.num_classes == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES)
    return [f'class {i}' for i in range(cfg.model.num_classes)]


def build_segmenter_from_config(cfg: SegConfig, load_pretrained: bool = True) -> UperNet:
    """The UperNet a recipe describes."""
    m = cfg.model
    return build_upernet(
        m.num_classes, backbone=m.backbone, pretrained=m.pretrained if load_pretrained else None,
        drop_path_rate=m.drop_path_rate, window_size=m.window_size, frozen_stages=m.frozen_stages,
        backbone_kwargs=dict(m.backbone_kwargs, norm_eval=m.norm_eval, pretrained_ema=m.pretrained_ema),
        channels=m.channels, pool_scales=tuple(m.pool_scales), dropout=m.dropout,
        aux_index=2 if m.aux_weight > 0 else None, aux_channels=m.aux_channels, aux_weight=m.aux_weight,
        ignore_index=cfg.data.ignore_index)


def seg_split(cfg: SegConfig, split: str, images: str | None = None, masks: str | None = None) -> tuple[Path, Path]:
    """``(image folder, mask folder)`` of ``split`` ('train' / 'val') resolved under ``data.root``."""
    d = cfg.data
    images = images or getattr(d, f'{split}_images')
    masks = masks or getattr(d, f'{split}_masks')
    root = Path(d.root) if d.root else None
    if root is None and not (Path(images).is_absolute() and Path(masks).is_absolute()):
        raise DataError('data.root is not set: pass --data-root (the folder holding images/ and annotations/) or '
                        'absolute image / mask folders')

    def resolve(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() or root is None else root / p

    return resolve(images), resolve(masks)


class IndexedDataset(Dataset):
    """``(item..., index)``: evaluation needs the index to draw the original image."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return (*self.dataset[index], index)


def collate_segmentation(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack same-size training crops."""
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])


def collate_indexed(batch: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One evaluation image (sizes differ): ``(image (1, 3, h, w), label (1, H, W), index)``."""
    if len(batch) != 1:
        raise ValueError('segmentation evaluation runs one image at a time')
    image, label, index = batch[0]
    return image[None], label[None], index


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, dataset: SegFolderDataset, loader: DataLoader, device: torch.device,
                       test: SegTestConfig, class_names: Sequence[str], draw_dir: Path | None = None, draw: int = 0,
                       amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """mIoU, mAcc, aAcc and per-class IoU of ``model`` on ``dataset`` at the original mask sizes.

    ``loader`` yields ``(image, label, index)`` (see :class:`IndexedDataset`); every rank evaluates its shard and the
    confusion matrices are summed. Coloured overlays of the first ``draw`` images go to ``draw_dir``.
    """
    was_training = model.training
    model.eval()
    k = len(class_names)
    conf = torch.zeros(k, k, dtype=torch.int64)
    drawn = 0
    for image, label, index in loader:
        image = image.to(device, non_blocking=True)
        size = label.shape[-2:]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if test.mode == 'slide':
                logits = slide_inference(model, image, k, test.crop_size, test.stride, out_size=size)
            else:
                logits = whole_inference(model, image, out_size=size)
        pred = logits.float().argmax(1).cpu()
        conf += confusion_matrix(pred, label, k, dataset.ignore_index)
        if draw_dir is not None and drawn < draw:
            overlay = draw_segmentation(dataset.load_image(index), pred[0], k, ignore_index=None)
            save_png(overlay, draw_dir / f'{dataset.name(index)}.png')
            drawn += 1
    conf = all_reduce_sum(conf.double(), device=device).round().long().cpu()
    model.train(was_training)
    return segmentation_metrics(conf, class_names)


class SegTrainer(DenseTrainer):
    """Train UperNet on an L²ViT with the official ADE20K recipe (spec §6.4)."""

    task = 'seg'
    primary_metric = 'mIoU'
    cfg: SegConfig

    def build_data(self) -> None:
        cfg, d, a = self.cfg, self.cfg.data, self.cfg.aug
        self.class_names = seg_class_names(cfg)
        train_tf = SegTrainTransform(a.scale, a.ratio_range, a.crop_size, a.cat_max_ratio, a.hflip, a.photometric,
                                     d.mean, d.std, d.ignore_index)
        common = dict(num_classes=cfg.model.num_classes, reduce_zero_label=d.reduce_zero_label,
                      ignore_index=d.ignore_index, mask_suffix=d.mask_suffix, seed=cfg.seed)
        self.train_set = SegFolderDataset(*seg_split(cfg, 'train'), transform=train_tf, **common)
        self.val_set = SegFolderDataset(*seg_split(cfg, 'val'), transform=SegEvalTransform(cfg.test.scale, d.mean,
                                                                                           d.std), **common)
        self.collate = collate_segmentation
        self.val_loader = self.eval_loader(IndexedDataset(self.val_set), 1, collate_indexed)

    def build_model(self, load_pretrained: bool) -> nn.Module:
        return build_segmenter_from_config(self.cfg, load_pretrained)

    def describe_model(self) -> str:
        return f'UperNet on {self.cfg.model.backbone}'

    def schedule_iters(self, iters_per_data_epoch: int) -> tuple[int, int, list[int]]:
        cfg = self.cfg
        milestones = list(cfg.sched.milestones) if cfg.sched.policy == 'step' else []
        return cfg.iters, min(cfg.eval_interval, cfg.iters), milestones

    def round_label(self, round_idx: int, it: int) -> dict[str, Any]:
        return {'iter': it}

    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch
        out = model(images.to(self.device, non_blocking=True))
        return self.model.loss(out, labels.to(self.device, non_blocking=True))

    def evaluate(self, model: nn.Module, draw_dir: Path | None) -> dict[str, Any]:
        return evaluate_segmenter(model, self.val_set, self.val_loader, self.device, self.cfg.test, self.class_names,
                                  draw_dir, self.cfg.run.draw, self.amp_dtype)

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return format_segmentation_metrics(metrics, per_class=False)
