"""Small dense-prediction datasets made in the test: coloured shapes on textured backgrounds.

Detection: a COCO-format json (boxes, RLE masks, three categories with non-contiguous ids) and a PNG folder.
Segmentation: the ADE20K layout (``images/<split>/*.jpg``, ``annotations/<split>/*.png``, 0 = "other").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ({'id': 3, 'name': 'square'}, {'id': 7, 'name': 'disc'}, {'id': 9, 'name': 'triangle'})
_COLOURS = ((230, 40, 40), (40, 200, 60), (50, 80, 240))


def textured_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Noise plus stripes of random frequency and phase, so shapes must be told from texture."""
    yy, xx = np.mgrid[0:h, 0:w]
    f, phase = rng.uniform(0.2, 0.6), rng.uniform(0, 6.3)
    stripes = 40 * np.sin(f * (xx + 0.5 * yy) + phase)[..., None]
    base = rng.uniform(90, 160, size=3)
    img = base + stripes + rng.normal(0, 12, size=(h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


def draw_shape(kind: int, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Binary mask ``(h, w)`` of shape ``kind`` (0 square, 1 disc, 2 triangle) inside ``box`` (x1, y1, x2, y2)."""
    h, w = size
    canvas = Image.new('L', (w, h), 0)
    d = ImageDraw.Draw(canvas)
    x1, y1, x2, y2 = box
    if kind == 0:
        d.rectangle([x1, y1, x2 - 1, y2 - 1], fill=1)
    elif kind == 1:
        d.ellipse([x1, y1, x2 - 1, y2 - 1], fill=1)
    else:
        d.polygon([((x1 + x2) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def make_coco(root: Path, sizes: list[tuple[int, int]], objects: int = 2, seed: int = 0, empty: int = 0,
              degenerate: int = 0, no_segmentation: int = 0, name: str = 'train') -> tuple[Path, Path]:
    """Write ``root/<name>/*.png`` and ``root/<name>.json``; returns ``(json, image folder)``.

    Args:
        sizes: ``(h, w)`` of each image with objects.
        objects: Shapes per image.
        empty: Extra images with no annotation.
        degenerate: Extra zero-width boxes added to the first image.
        no_segmentation: Extra annotations without segmentation added to the first image.
    """
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(seed)
    img_dir = root / name
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    all_sizes = list(sizes) + [sizes[0]] * empty
    for i, (h, w) in enumerate(all_sizes):
        image_id = 100 + i
        img = textured_background(rng, h, w)
        if i < len(sizes):
            for _ in range(objects):
                kind = int(rng.integers(0, 3))
                bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
                x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                mask = draw_shape(kind, (x1, y1, x1 + bw, y1 + bh), (h, w))
                img[mask > 0] = _COLOURS[kind]
                rle = mask_util.encode(np.asfortranarray(mask))
                anns.append({'id': len(anns) + 1, 'image_id': image_id, 'category_id': CATEGORIES[kind]['id'],
                             'bbox': _tight_box(mask), 'area': float(mask.sum()), 'iscrowd': 0,
                             'segmentation': {'size': [h, w], 'counts': rle['counts'].decode('ascii')}})
        Image.fromarray(img).save(img_dir / f'{image_id}.png')
        images.append({'id': image_id, 'file_name': f'{image_id}.png', 'height': h, 'width': w})
    for _ in range(degenerate):
        anns.append({'id': len(anns) + 1, 'image_id': 100, 'category_id': 3, 'bbox': [5.0, 5.0, 0.0, 10.0],
                     'area': 0.0, 'iscrowd': 0, 'segmentation': []})
    for _ in range(no_segmentation):
        anns.append({'id': len(anns) + 1, 'image_id': 100, 'category_id': 7, 'bbox': [2.0, 2.0, 10.0, 10.0],
                     'area': 100.0, 'iscrowd': 0, 'segmentation': []})
    ann_file = root / f'{name}.json'
    ann_file.write_text(json.dumps({'images': images, 'annotations': anns, 'categories': list(CATEGORIES)}))
    return ann_file, img_dir


def make_ade(root: Path, split: str, sizes: list[tuple[int, int]], num_classes: int = 3, seed: int = 0,
             ignore_only: int = 0) -> Path:
    """Write ``root/images/<split>/*.jpg`` and ``root/annotations/<split>/*.png`` (0 = other, 1..K classes).

    ``ignore_only`` extra images have an all-zero mask (nothing labelled after ``reduce_zero_label``).
    """
    rng = np.random.default_rng(seed)
    (root / 'images' / split).mkdir(parents=True, exist_ok=True)
    (root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(list(sizes) + [sizes[0]] * ignore_only):
        img = textured_background(rng, h, w)
        label = np.zeros((h, w), dtype=np.uint8)
        if i < len(sizes):
            for kind in range(num_classes):
                bw, bh = int(rng.integers(w // 3, w // 2)), int(rng.integers(h // 3, h // 2))
                x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                mask = draw_shape(kind % 3, (x1, y1, x1 + bw, y1 + bh), (h, w)) > 0
                img[mask] = _COLOURS[kind % 3]
                label[mask] = kind + 1
        Image.fromarray(img).save(root / 'images' / split / f'img_{i:03d}.jpg', quality=95)
        Image.fromarray(label).save(root / 'annotations' / split / f'img_{i:03d}.png')
    return root
