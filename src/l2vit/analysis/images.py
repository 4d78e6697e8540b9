"""Images for the analysis: files → the model's eval transform → a normalised batch, plus a displayable copy."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import create_transform, resolve_data_config
from torch import nn

__all__ = ['ImageBatch', 'IMAGE_EXTENSIONS', 'find_images', 'load_images', 'images_from_tensor']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


@dataclass
class ImageBatch:
    """Images ready for a model and for display.

    Attributes:
        tensor: Normalised batch ``(B, 3, H, W)``.
        display: The same images in ``[0, 1]``, ``(B, H, W, 3)``, for overlays.
        names: One name per image (file name, or ``image_<i>``).
    """
    tensor: torch.Tensor
    display: torch.Tensor
    names: list[str]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.tensor.shape[-2]), int(self.tensor.shape[-1])


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (their image files, sorted, not recursive) into a list of image files."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in directory {p}')
            found += files
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f'image not found: {p}')
    if not found:
        raise ValueError('no images given')
    return found


def _data_config(model: nn.Module, img_size: int | tuple[int, int] | None) -> dict:
    args = {}
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        args['input_size'] = (3, int(h), int(w))
    return resolve_data_config(args, model=model)


def load_images(
        paths: Sequence[str | os.PathLike],
        model: nn.Module,
        img_size: int | tuple[int, int] | None = None,
) -> ImageBatch:
    """Read image files with the model's eval transform (resize, centre crop, its mean/std).

    Args:
        paths: Image files and/or directories of image files.
        model: The model whose ``pretrained_cfg`` gives size, crop, interpolation, mean and std.
        img_size: Input size (side or ``(H, W)``) instead of the model's default.
    """
    from PIL import Image, UnidentifiedImageError

    cfg = _data_config(model, img_size)
    transform = create_transform(**{k: v for k, v in cfg.items() if k not in ('mean', 'std')}, normalize=False)
    display, names = [], []
    for path in find_images(paths):
        try:
            with Image.open(path) as img:
                x = transform(img.convert('RGB'))  # without normalisation timm's transform ends in a uint8 tensor
                display.append(x.float() / 255. if x.dtype == torch.uint8 else x.float())
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f'cannot read {path} as an image: {e}') from e
        names.append(path.name)
    display = torch.stack(display)  # B, 3, H, W in [0, 1]
    mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
    return ImageBatch((display - mean) / std, display.permute(0, 2, 3, 1).contiguous(), names)


def images_from_tensor(images: torch.Tensor, model: nn.Module, names: Sequence[str] | None = None) -> ImageBatch:
    """Wrap an already normalised batch ``(B, 3, H, W)``; the display copy undoes the model's mean/std."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError('expected a normalised floating-point image batch (B, C, H, W), got '
                         f'{getattr(images, "shape", type(images))}')
    cfg = _data_config(model, None)
    mean = torch.tensor(cfg['mean'], device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg['std'], device=images.device).view(1, -1, 1, 1)
    if images.shape[1] != mean.shape[1]:
        mean, std = mean.mean().view(1, 1, 1, 1), std.mean().view(1, 1, 1, 1)
    display = (images.detach() * std + mean).clamp(0, 1)
    if display.shape[1] != 3:
        display = display.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    names = list(names) if names is not None else [f'image_{i}' for i in range(images.shape[0])]
    if len(names) != images.shape[0]:
        raise ValueError(f'{len(names)} names for {images.shape[0]} images')
    return ImageBatch(images, display.permute(0, 2, 3, 1).cpu().contiguous(), names)
