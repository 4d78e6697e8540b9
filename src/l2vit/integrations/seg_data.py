"""Semantic-segmentation data in the ADE20K layout, and the official (mmseg stock ADE20K) augmentation.

Layout: an image folder and a mask folder whose files pair by name (``images/training/x.jpg`` ↔
``annotations/training/x.png``). Masks are single-channel PNGs of class indices (palette PNGs are read as their
indices). With ``reduce_zero_label`` (ADE20K), 0 means "other" and becomes ``ignore_index`` while every other
label moves down by one, exactly as mmseg does.

Training pipeline (spec §6.4, mmseg's stock ``ade20k.py``): random rescale to (2048, 512) × [0.5, 2.0] keeping the
aspect ratio, 512×512 random crop in which no class covers more than 75% (10 tries), horizontal flip 0.5,
photometric distortion, normalisation, padding to 512×512 (image 0, mask ``ignore_index``). Test: rescale to
(2048, 512) keeping the ratio; metrics are computed at the original mask size.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..data import IMG_EXTENSIONS, DataError, sample_seed

__all__ = ['SegFolderDataset', 'SegTrainTransform', 'SegEvalTransform', 'rescale_size', 'SEG_MEAN', 'SEG_STD']

# mmseg's ImageNet normalisation on 0-255 pixels
SEG_MEAN = (123.675, 116.28, 103.53)
SEG_STD = (58.395, 57.12, 57.375)


def rescale_size(size: tuple[int, int], scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: ``(h, w)`` scaled by ``min(long/max(h, w), short/min(h, w))`` of ``scale``."""
    h, w = size
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (image.float() - m) / s


def _resize(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]):
    image = TF.resize(tv_tensors.Image(image), list(size), antialias=True).as_subclass(torch.Tensor)
    if label is not None:
        label = TF.resize(tv_tensors.Mask(label[None]), list(size)).as_subclass(torch.Tensor)[0]
    return image, label


class SegTrainTransform:
    """The training pipeline on ``(image uint8 (3, H, W), label uint8/int64 (H, W))`` under torch's global RNG.

    Args:
        scale: Base rescale ``(long, short)`` before the random ratio.
        ratio_range: Random ratio range of the rescale.
        crop_size: ``(h, w)`` of the random crop and of the padded output.
        cat_max_ratio: Largest share of the crop one class may cover (1.0 disables the retries).
        hflip: Horizontal flip probability.
        photometric: Apply mmseg's PhotoMetricDistortion.
        mean: Normalisation mean (0-255 pixels).
        std: Normalisation std (0-255 pixels).
        ignore_index: Label of ignored pixels (also the mask padding).
    """

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0),
                 crop_size: Sequence[int] = (512, 512), cat_max_ratio: float = 0.75, hflip: float = 0.5,
                 photometric: bool = True, mean: Sequence[float] = SEG_MEAN, std: Sequence[float] = SEG_STD,
                 ignore_index: int = 255):
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.cat_max_ratio = cat_max_ratio
        self.hflip = hflip
        self.photometric = photometric
        self.mean, self.std = tuple(mean), tuple(std)
        self.ignore_index = ignore_index

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def _crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = self.crop_size
        top = int(torch.randint(0, max(h - ch, 0) + 1, ()))
        left = int(torch.randint(0, max(w - cw, 0) + 1, ()))
        return top, left, min(ch, h), min(cw, w)

    def _random_crop(self, image: torch.Tensor, label: torch.Tensor):
        h, w = label.shape
        box = self._crop_box(h, w)
        if self.cat_max_ratio < 1:
            for _ in range(10):
                t, left, ch, cw = box
                counts = torch.bincount(label[t:t + ch, left:left + cw].reshape(-1).long(), minlength=256)
                if self.ignore_index < counts.numel():
                    counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if counts.numel() > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._crop_box(h, w)
        t, left, ch, cw = box
        return image[:, t:t + ch, left:left + cw], label[t:t + ch, left:left + cw]

    def _photometric(self, img: torch.Tensor) -> torch.Tensor:
        """mmseg PhotoMetricDistortion on a float 0-255 image (each step with probability 0.5)."""
        if torch.rand(()) < 0.5:
            img = (img + self._uniform(-32, 32)).clamp(0, 255)
        contrast_first = bool(torch.randint(0, 2, ()))

        def contrast(x: torch.Tensor) -> torch.Tensor:
            return (x * self._uniform(0.5, 1.5)).clamp(0, 255) if torch.rand(()) < 0.5 else x

        if contrast_first:
            img = contrast(img)
        if torch.rand(()) < 0.5:
            img = TF.adjust_saturation(img / 255, self._uniform(0.5, 1.5)) * 255
        if torch.rand(()) < 0.5:
            # OpenCV hue units of 2 degrees: a shift of d is d/180 of the colour wheel
            img = TF.adjust_hue(img / 255, int(torch.randint(-18, 19, ())) / 180) * 255
        if not contrast_first:
            img = contrast(img)
        return img

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = self._uniform(*self.ratio_range)
        size = rescale_size(tuple(label.shape), [s * ratio for s in self.scale])
        image, label = _resize(image, label, size)
        image, label = self._random_crop(image, label)
        if torch.rand(()) < self.hflip:
            image, label = image.flip(-1), label.flip(-1)
        image = image.float()
        if self.photometric:
            image = self._photometric(image)
        image = _normalize(image, self.mean, self.std)
        ch, cw = self.crop_size
        pad = (0, max(cw - image.shape[-1], 0), 0, max(ch - image.shape[-2], 0))
        image = F.pad(image, pad, value=0.)
        label = F.pad(label.long(), pad, value=self.ignore_index)
        return image, label


class SegEvalTransform:
    """Test pipeline: keep-ratio rescale to ``scale`` (None: original size) and normalisation; the label is kept at
    its original size (metrics are computed there)."""

    def __init__(self, scale: Sequence[int] | None = (2048, 512), mean: Sequence[float] = SEG_MEAN,
                 std: Sequence[float] = SEG_STD):
        self.scale = tuple(scale) if scale is not None else None
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale is not None:
            image, _ = _resize(image, None, rescale_size(tuple(image.shape[-2:]), self.scale))
        return _normalize(image, self.mean, self.std), label.long()


class SegFolderDataset(Dataset):
    """Images and label masks paired by file name (ADE20K layout).

    Items are ``(image, label)`` after ``transform`` (uint8 ``(3, H, W)`` and int64 ``(H, W)`` without one). Keys
    may be an index or ``(index, epoch)``; the transform then runs under a seed derived from ``(seed, epoch,
    index)`` so a resumed run sees the same batches.

    Args:
        image_dir: Folder of images (any extension PIL reads; searched recursively).
        mask_dir: Folder of masks with the same relative paths and ``mask_suffix``.
        num_classes: Number of classes after ``reduce_zero_label``; larger labels are an error.
        reduce_zero_label: Map 0 to ``ignore_index`` and shift the other labels down by one (ADE20K).
        ignore_index: Label of pixels left out of loss and metrics.
        transform: Callable on ``(image, label)`` tensors.
        mask_suffix: Extension of mask files.
        seed: Base seed of the per-sample augmentation seeds.
    """

    def __init__(self, image_dir: str | os.PathLike, mask_dir: str | os.PathLike, num_classes: int,
                 reduce_zero_label: bool = True, ignore_index: int = 255, transform=None, mask_suffix: str = '.png',
                 seed: int = 0):
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for d, what in ((self.image_dir, 'image'), (self.mask_dir, 'mask')):
            if not d.is_dir():
                raise DataError(f'{what} folder not found: {d}')
        images = sorted(p for p in self.image_dir.rglob('*') if p.suffix.lower() in IMG_EXTENSIONS)
        if not images:
            raise DataError(f'no image in {self.image_dir} (extensions: {", ".join(IMG_EXTENSIONS)})')
        pairs, orphans = [], []
        for p in images:
            m = (self.mask_dir / p.relative_to(self.image_dir)).with_suffix(mask_suffix)
            (pairs if m.is_file() else orphans).append((p, m))
        if orphans:
            raise DataError(f'{len(orphans)} of {len(images)} image(s) in {self.image_dir} have no mask in '
                            f'{self.mask_dir}, e.g. {orphans[0][0].name} (expected {orphans[0][1]})')
        self.samples = pairs
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        """The image path of item ``index`` relative to the image folder, without extension."""
        return str(self.samples[index][0].relative_to(self.image_dir).with_suffix(''))

    def load_image(self, index: int) -> torch.Tensor:
        """uint8 RGB ``(3, H, W)``."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert('RGB'), dtype=np.uint8).copy()
        except (OSError, ValueError) as e:
            raise DataError(f'cannot read image {path}: {e}') from e
        return torch.from_numpy(arr).permute(2, 0, 1)

    def load_label(self, index: int) -> torch.Tensor:
        """int64 ``(H, W)`` class indices (``reduce_zero_label`` applied); warns when no pixel is labelled."""
        path = self.samples[index][1]
        try:
            with Image.open(path) as im:
                if im.mode not in ('L', 'P', 'I', 'I;16'):
                    raise DataError(f'mask {path} has mode {im.mode}; expected a single-channel PNG of class '
                                    'indices (mode L or P)')
                arr = np.asarray(im, dtype=np.int64).copy()
        except OSError as e:
            raise DataError(f'cannot read mask {path}: {e}') from e
        label = torch.from_numpy(arr)
        if self.reduce_zero_label:
            # mmseg: 0 ("other") and 255 (already ignored) become ignored, the rest move down by one
            ignored = (label == 0) | (label == 255)
            label = label - 1
            label[ignored] = self.ignore_index
        valid = label[label != self.ignore_index]
        if valid.numel() == 0:
            warnings.warn(f'mask {path} has no labelled pixel (every pixel is ignore_index {self.ignore_index}'
                          f'{" after reduce_zero_label" if self.reduce_zero_label else ""}); it adds nothing to '
                          'loss or metrics', stacklevel=2)
        elif int(valid.max()) >= self.num_classes or int(valid.min()) < 0:
            hint = '' if self.reduce_zero_label else ' (is reduce_zero_label needed?)'
            raise DataError(f'mask {path} has label {int(valid.max())} but there are {self.num_classes} classes'
                            f'{hint}')
        return label

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, label = self.load_image(index), self.load_label(index)
        if image.shape[-2:] != label.shape:
            raise DataError(f'{self.samples[index][0].name} is {tuple(image.shape[-2:])} but its mask is '
                            f'{tuple(label.shape)} (height, width)')
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                image, label = self.transform(image, label)
        return image, label
