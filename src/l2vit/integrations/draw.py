"""Drawing predictions on images (torchvision's drawing utilities) and writing them as PNG atomically."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .._io import atomic_path
from .ade import palette

__all__ = ['draw_detections', 'draw_segmentation', 'save_png']


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a uint8 ``(3, H, W)`` image as PNG through a temporary file, fsync and ``os.replace``."""
    arr = image.detach().cpu().permute(1, 2, 0).numpy().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format='PNG')
    return Path(path)


def draw_detections(image: torch.Tensor, output: Mapping[str, torch.Tensor], class_names: Sequence[str],
                    score_threshold: float = 0.3, mask_threshold: float = 0.5, alpha: float = 0.45) -> torch.Tensor:
    """Boxes, labels with scores and (when present) instance masks over ``image``.

    Args:
        image: uint8 ``(3, H, W)``.
        output: torchvision detections of this image (``boxes``, ``labels`` 1-based, ``scores``, optional ``masks``
            ``(N, 1, H, W)`` probabilities or ``(N, H, W)`` binary masks).
        class_names: Name of label ``i`` at ``class_names[i - 1]``.
        score_threshold: Draw only detections scoring at least this.
        mask_threshold: Mask probability threshold.
        alpha: Mask opacity.

    Returns:
        The drawn uint8 image.
    """
    scores = output.get('scores')
    keep = torch.ones(len(output['boxes']), dtype=torch.bool) if scores is None else scores.cpu() >= score_threshold
    boxes = output['boxes'].detach().cpu()[keep]
    labels = output['labels'].detach().cpu()[keep].tolist()
    colours = palette(max(len(class_names), 1) + 1)
    box_colours = [colours[lab % len(colours)] for lab in labels]
    out = image.detach().cpu()
    if 'masks' in output and keep.any():
        masks = output['masks'].detach().cpu()[keep]
        masks = (masks[:, 0] if masks.dim() == 4 else masks).float() > mask_threshold
        out = draw_segmentation_masks(out, masks, alpha=alpha, colors=box_colours)
    if len(boxes):
        names = [class_names[lab - 1] if 1 <= lab <= len(class_names) else str(lab) for lab in labels]
        text = names if scores is None else [f'{n} {s:.2f}' for n, s in zip(names, scores.cpu()[keep].tolist())]
        out = draw_bounding_boxes(out, boxes, labels=text, colors=box_colours, width=2)
    return out


def draw_segmentation(image: torch.Tensor, pred: torch.Tensor, num_classes: int, alpha: float = 0.5,
                      ignore_index: int | None = 255) -> torch.Tensor:
    """A coloured class map blended over ``image`` (uint8 ``(3, H, W)``; ``pred`` int ``(H, W)``, same size).

    Pixels equal to ``ignore_index`` keep the image's colours.
    """
    if pred.shape != image.shape[-2:]:
        raise ValueError(f'prediction {tuple(pred.shape)} and image {tuple(image.shape[-2:])} sizes differ')
    lut = torch.tensor(palette(num_classes) + [(0, 0, 0)], dtype=torch.float32)  # last row: never used
    p = pred.detach().cpu().long()
    valid = (p >= 0) & (p < num_classes)
    if ignore_index is not None:
        valid &= p != ignore_index
    colour = lut[torch.where(valid, p, num_classes)].permute(2, 0, 1)
    img = image.detach().cpu().float()
    blended = torch.where(valid[None], (1 - alpha) * img + alpha * colour, img)
    return blended.round().clamp(0, 255).to(torch.uint8)
