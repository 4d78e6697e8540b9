"""Metrics: COCO box / mask mAP through pycocotools, and segmentation mIoU from a confusion matrix.

Detection metrics use mmdet's names (``bbox_mAP``, ``bbox_mAP_50``, ..., ``segm_mAP_l``) so numbers compare
directly with the paper's tables. Segmentation follows mmseg: per-class IoU = intersection / union over the whole
split (NaN for classes absent from both prediction and ground truth), mIoU = their NaN-mean, plus overall pixel
accuracy (aAcc) and mean class accuracy (mAcc), all ignoring pixels labelled ``ignore_index``.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ['COCO_STAT_NAMES', 'detections_to_coco', 'coco_evaluate', 'confusion_matrix', 'segmentation_metrics',
           'format_coco_metrics', 'format_segmentation_metrics']

# order of COCOeval.stats (the first six) as mmdet names them
COCO_STAT_NAMES = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')


def detections_to_coco(output: Mapping[str, torch.Tensor], image_id: int, cat_ids: Sequence[int],
                       mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """One image's torchvision detections as COCO result entries.

    Args:
        output: ``boxes`` (N, 4) XYXY, ``scores``, ``labels`` (1-based), optionally ``masks`` (N, 1, H, W) in [0, 1].
        image_id: COCO image id.
        cat_ids: Category id of each label ``1..K`` (``cat_ids[label - 1]``).
        mask_threshold: Mask probability above which a pixel belongs to the instance.

    Returns:
        Dicts with ``image_id``, ``category_id``, ``bbox`` (XYWH), ``score`` and, with masks, ``segmentation`` (RLE).
    """
    boxes = output['boxes'].detach().float().cpu()
    if boxes.numel() == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output['scores'].detach().float().cpu().tolist()
    labels = output['labels'].detach().cpu().tolist()
    rles = None
    if 'masks' in output:
        from pycocotools import mask as mask_util
        binary = (output['masks'].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    results = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        if not 1 <= label <= len(cat_ids):
            continue  # background or out-of-range label: not a COCO category
        entry: dict[str, Any] = {'image_id': int(image_id), 'category_id': int(cat_ids[label - 1]),
                                 'bbox': [round(v, 3) for v in box], 'score': float(score)}
        if rles is not None:
            rle = dict(rles[i])
            rle['counts'] = rle['counts'].decode('ascii')
            entry['segmentation'] = rle
        results.append(entry)
    return results


def coco_evaluate(coco_gt: Any, results: Sequence[dict[str, Any]], iou_types: Sequence[str] = ('bbox',),
                  image_ids: Sequence[int] | None = None) -> tuple[dict[str, float], str]:
    """COCO mAP of ``results`` against the ground truth ``coco_gt`` (a pycocotools ``COCO``).

    Args:
        coco_gt: Ground truth.
        results: COCO result entries (see :func:`detections_to_coco`).
        iou_types: ``'bbox'`` and / or ``'segm'``.
        image_ids: Evaluate on these images only (default: every image of ``coco_gt``).

    Returns:
        ``({'bbox_mAP': ..., 'bbox_mAP_50': ..., ...}, printed COCOeval summary)``. With no detection at all every
        metric is 0.0 (pycocotools cannot load an empty result list) and a warning says so. Metrics that COCOeval
        reports as -1 (no ground truth of that size) are NaN.
    """
    from pycocotools.cocoeval import COCOeval

    metrics: dict[str, float] = {}
    text = []
    ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(set(int(i) for i in image_ids))
    for iou_type in iou_types:
        if iou_type not in ('bbox', 'segm'):
            raise ValueError(f"iou_types entries must be 'bbox' or 'segm', got '{iou_type}'")
        usable = [r for r in results if iou_type != 'segm' or 'segmentation' in r]
        if not usable:
            warnings.warn(f'no {iou_type} detection to evaluate: every {iou_type} metric is 0', stacklevel=2)
            metrics.update({f'{iou_type}_{n}': 0.0 for n in COCO_STAT_NAMES})
            continue
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes([dict(r) for r in usable])
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        text.append(f'{iou_type}:\n' + '\n'.join(line for line in buf.getvalue().splitlines()
                                                 if line.lstrip().startswith('Average')))
        for name, value in zip(COCO_STAT_NAMES, ev.stats[:6]):
            metrics[f'{iou_type}_{name}'] = float(value) if value >= 0 else math.nan
    return metrics, '\n'.join(text)


def format_coco_metrics(metrics: Mapping[str, float]) -> str:
    """``bbox mAP 41.2 (50: 63.0, 75: 45.1, s/m/l: 24.0/44.5/55.0)`` lines, in percent."""
    lines = []
    for kind in ('bbox', 'segm'):
        if f'{kind}_mAP' not in metrics:
            continue
        m = {n: 100 * metrics[f'{kind}_{n}'] for n in COCO_STAT_NAMES}
        lines.append(f'{kind} mAP {m["mAP"]:.1f} (50: {m["mAP_50"]:.1f}, 75: {m["mAP_75"]:.1f}, '
                     f's/m/l: {m["mAP_s"]:.1f}/{m["mAP_m"]:.1f}/{m["mAP_l"]:.1f})')
    return '\n'.join(lines)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = ground truth, columns = prediction.

    Pixels whose target is ``ignore_index`` (or outside ``0..num_classes-1``) are left out.
    """
    if pred.shape != target.shape:
        raise ValueError(f'prediction {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape')
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    valid = (t != ignore_index) & (t >= 0) & (t < num_classes)
    idx = t[valid] * num_classes + p[valid].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu()


def segmentation_metrics(conf: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, mAcc, aAcc and per-class IoU / accuracy from a confusion matrix (fractions in [0, 1]).

    Returns:
        ``{'mIoU', 'mAcc', 'aAcc', 'IoU': {name: iou}, 'Acc': {name: acc}}``; a class with no ground-truth and no
        predicted pixel has IoU NaN and does not count in mIoU (mmseg's rule). With no valid pixel at all, every
        value is NaN and a warning says so.
    """
    conf = conf.double()
    n = conf.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f'{len(names)} class names for a {n}-class confusion matrix')
    inter = conf.diag()
    gt = conf.sum(1)
    union = gt + conf.sum(0) - inter
    with np.errstate(divide='ignore', invalid='ignore'):
        iou = (inter / union).numpy()
        acc = (inter / gt).numpy()
    total = float(conf.sum())
    if total == 0:
        warnings.warn('no labelled pixel (every pixel is ignore_index): segmentation metrics are NaN', stacklevel=2)

    def nanmean(x: np.ndarray) -> float:
        return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan

    return {
        'mIoU': nanmean(iou),
        'mAcc': nanmean(acc),
        'aAcc': float(inter.sum() / total) if total else math.nan,
        'IoU': {name: float(v) for name, v in zip(names, iou)},
        'Acc': {name: float(v) for name, v in zip(names, acc)},
    }


def format_segmentation_metrics(metrics: Mapping[str, Any], per_class: bool = True) -> str:
    """A summary line, optionally followed by a per-class IoU / accuracy table (percent)."""
    lines = [f'mIoU {100 * metrics["mIoU"]:.2f}  mAcc {100 * metrics["mAcc"]:.2f}  aAcc {100 * metrics["aAcc"]:.2f}']
    if per_class:
        width = max([len(k) for k in metrics['IoU']] + [5])
        lines.append(f'{"class":<{width}}  {"IoU":>6}  {"Acc":>6}')
        for name, iou in metrics['IoU'].items():
            acc = metrics['Acc'][name]
            lines.append(f'{name:<{width}}  {_pct(iou):>6}  {_pct(acc):>6}')
    return '\n'.join(lines)


def _pct(x: float) -> str:
    return 'nan' if math.isnan(x) else f'{100 * x:.2f}'
