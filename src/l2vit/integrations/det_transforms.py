"""Detection augmentation of the official recipe (spec §6.2), in torchvision ``transforms.v2``.

Training: horizontal flip 0.5, then one of two policies picked at random (DETR-style AutoAugment):

* (a) resize the shorter side to a random value in {480, 512, ..., 800}, longer side at most 1333;
* (b) resize the shorter side to {400, 500, 600}, crop a random absolute size of 384-600 px per side (crops
  without objects allowed), then resize as in (a).

Boxes and masks follow the image; boxes that fall out or shrink under 1 px are removed with their labels and masks.
Evaluation only converts to float: the detector resizes to its test size and maps detections back.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ['RandomSizeCrop', 'detection_train_transforms', 'detection_eval_transforms', 'DETR_SCALES']

DETR_SCALES = tuple(range(480, 801, 32))


class RandomSizeCrop(v2.Transform):
    """Crop a random ``h × w`` region with each side drawn uniformly from ``[min_size, max_size]`` (capped at the
    image side), at a random position — mmdet's ``RandomCrop(crop_type='absolute_range')``.

    Args:
        min_size: Smallest crop side.
        max_size: Largest crop side.
    """

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 1 <= min_size <= max_size:
            raise ValueError(f'RandomSizeCrop needs 1 <= min_size <= max_size, got {min_size}, {max_size}')
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image = next(x for x in flat_inputs if isinstance(x, (tv_tensors.Image, torch.Tensor)) and not isinstance(
            x, (tv_tensors.BoundingBoxes, tv_tensors.Mask)))
        h, w = F.get_size(image)

        def side(n: int) -> int:
            return int(torch.randint(min(n, self.min_size), min(n, self.max_size) + 1, ()).item())

        ch, cw = side(h), side(w)
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        return dict(top=top, left=left, height=ch, width=cw)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def detection_train_transforms(
        hflip: float = 0.5,
        policy: str = 'detr',
        scales: Sequence[int] = DETR_SCALES,
        max_size: int = 1333,
        crop_scales: Sequence[int] = (400, 500, 600),
        crop_size: Sequence[int] = (384, 600),
) -> v2.Compose:
    """The training pipeline on ``(tv_tensors.Image uint8, target)``; images come out float in [0, 1].

    Args:
        hflip: Horizontal flip probability.
        policy: ``'detr'`` (the official two-policy choice), ``'multiscale'`` (policy (a) only) or ``'single'``
            (the largest of ``scales`` only).
        scales: Shorter-side sizes of policy (a) and of the last resize of policy (b).
        max_size: Longer-side cap.
        crop_scales: Shorter-side sizes before the crop of policy (b).
        crop_size: ``(min, max)`` crop side of policy (b).
    """
    multiscale = v2.RandomShortestSize(list(scales), max_size, antialias=True)
    if policy == 'detr':
        crop = v2.Compose([v2.RandomShortestSize(list(crop_scales), max_size, antialias=True),
                           RandomSizeCrop(int(crop_size[0]), int(crop_size[1])), multiscale])
        resize: v2.Transform = v2.RandomChoice([multiscale, crop])
    elif policy == 'multiscale':
        resize = multiscale
    elif policy == 'single':
        resize = v2.RandomShortestSize([max(scales)], max_size, antialias=True)
    else:
        raise ValueError(f"aug.policy must be 'detr', 'multiscale' or 'single', got '{policy}'")
    return v2.Compose([
        v2.RandomHorizontalFlip(hflip),
        resize,
        v2.SanitizeBoundingBoxes(min_size=1),
        v2.ToDtype(torch.float32, scale=True),
    ])


def detection_eval_transforms() -> v2.Compose:
    """Evaluation pipeline: uint8 → float in [0, 1] (the detector resizes to its test size itself)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
