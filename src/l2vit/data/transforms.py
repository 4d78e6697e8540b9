"""Train and eval transforms from timm's ``create_transform``, with the official evaluation crop rule."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from timm.data import create_transform

__all__ = ['eval_crop', 'build_train_transform', 'build_eval_transform']


def eval_crop(input_size: int, crop_pct: float | None = None) -> tuple[float, str]:
    """``(crop_pct, crop_mode)`` for evaluation.

    The official rule (spec §5.1) when ``crop_pct`` is None: below 384 px resize the shorter side to
    ``input_size / 0.875`` and center-crop; at 384 px and above resize straight to ``input_size`` x ``input_size``.
    """
    if crop_pct is not None:
        return crop_pct, 'center'
    return (0.875, 'center') if input_size < 384 else (1.0, 'squash')


def build_train_transform(
        input_size: int,
        *,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        vflip: float = 0.,
        color_jitter: float | None = 0.4,
        auto_augment: str | None = 'rand-m9-mstd0.5-inc1',
        interpolation: str = 'bicubic',
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        reprob: float = 0.25,
        remode: str = 'pixel',
        recount: int = 1,
) -> Callable[[Any], Any]:
    """timm's ImageNet training transform: RandomResizedCrop, flip, RandAugment, normalise, random erasing."""
    return create_transform(
        input_size,
        is_training=True,
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        vflip=vflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
    )


def build_eval_transform(
        input_size: int,
        crop_pct: float | None = None,
        interpolation: str = 'bicubic',
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
) -> Callable[[Any], Any]:
    """Resize + center crop (or direct resize at >= 384 px, see :func:`eval_crop`), then normalise."""
    crop_pct, crop_mode = eval_crop(input_size, crop_pct)
    return create_transform(input_size, is_training=False, interpolation=interpolation, mean=tuple(mean),
                            std=tuple(std), crop_pct=crop_pct, crop_mode=crop_mode)
