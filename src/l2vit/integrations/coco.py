"""COCO-format detection data: an annotation json + an image folder, read with pycocotools.

Targets follow torchvision's detection contract: ``boxes`` (N, 4) XYXY in pixels, ``labels`` (N,) int64 in
``1..K`` (0 is the background), ``masks`` (N, H, W) uint8 when masks are asked for, and ``image_id``. Category ids
of the json map to contiguous labels in sorted id order; :attr:`CocoDetection.cat_ids` maps them back.

What cannot be learnt from is left out with a warning rather than a crash: crowd regions, boxes with no area after
clipping to the image (degenerate boxes), and, when masks are used, instances whose segmentation is missing or
decodes to an empty mask. Images left without any instance are kept as negatives, or skipped with ``skip_empty``
(the official recipe skips them in training).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..data import DataError, sample_seed

__all__ = ['CocoDetection', 'load_coco', 'collate_detection', 'DataError']

_logger = logging.getLogger(__name__)


def load_coco(ann_file: str | os.PathLike):
    """A pycocotools ``COCO`` object for ``ann_file``, quietly, with a clear error for missing or malformed files."""
    from pycocotools.coco import COCO

    path = Path(ann_file)
    if not path.is_file():
        raise DataError(f'annotation file not found: {path} (expected a COCO-format json)')
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f'{path} is not valid JSON: {e}') from e
    if not isinstance(data, dict) or not isinstance(data.get('images'), list) or not isinstance(
            data.get('categories'), list):
        raise DataError(f'{path} is not a COCO-format annotation file: expected a JSON object with "images" and '
                        '"categories" lists (and "annotations")')
    data.setdefault('annotations', [])
    for i, ann in enumerate(data['annotations']):
        missing = [k for k in ('id', 'image_id', 'category_id', 'bbox') if k not in ann]
        if missing:
            raise DataError(f'{path}: annotation #{i} lacks {", ".join(missing)}')
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _has_segmentation(ann: dict) -> bool:
    seg = ann.get('segmentation')
    if isinstance(seg, list):
        return any(len(poly) >= 6 for poly in seg)
    return isinstance(seg, dict) and 'counts' in seg


class CocoDetection(Dataset):
    """Images and instance targets of a COCO-format split.

    Items are ``(image, target)``: a ``tv_tensors.Image`` (uint8 RGB, or what ``transforms`` makes of it) and the
    target dict. Keys may be an index or ``(index, epoch)`` (from :class:`~l2vit.data.EpochSampler`): augmentation
    then runs under a seed derived from ``(seed, epoch, index)``, so a resumed run sees the same batches.

    Args:
        ann_file: COCO-format annotation json.
        image_dir: Folder the images' ``file_name`` entries are relative to.
        transforms: torchvision ``transforms.v2`` callable on ``(image, target)``.
        with_masks: Decode instance masks (Mask R-CNN); instances without a usable segmentation are dropped.
        skip_empty: Leave out images with no usable instance (training); evaluation keeps every image.
        seed: Base seed of the per-sample augmentation seeds.
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike,
                 transforms: Callable | None = None, with_masks: bool = False, skip_empty: bool = False,
                 seed: int = 0):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataError(f'image folder not found: {self.image_dir}')
        self.coco = load_coco(ann_file)
        self.transforms = transforms
        self.with_masks = with_masks
        self.seed = seed
        self.cat_ids = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise DataError(f'{self.ann_file} defines no category')
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.class_names = [str(self.coco.cats[c].get('name', c)) for c in self.cat_ids]
        self._anns = self._usable_annotations()
        ids = sorted(self.coco.imgs)
        empty = [i for i in ids if not self._anns[i]]
        if empty:
            what = 'skipped' if skip_empty else 'kept as negatives (no object)'
            warnings.warn(f'{self.ann_file.name}: {len(empty)} of {len(ids)} image(s) have no usable annotation '
                          f'(e.g. image id {empty[0]}); they are {what}', stacklevel=2)
        self.ids = [i for i in ids if self._anns[i]] if skip_empty else ids
        if not self.ids:
            raise DataError(f'{self.ann_file} has no image{" with annotations" if skip_empty else ""}')

    def _usable_annotations(self) -> dict[int, list[dict]]:
        """Per image, the annotations worth training on; counts and warns about the rest."""
        out: dict[int, list[dict]] = {i: [] for i in self.coco.imgs}
        degenerate, no_seg, orphans = [], [], 0
        for ann in self.coco.dataset['annotations']:
            img = self.coco.imgs.get(ann['image_id'])
            if img is None or ann['category_id'] not in self.label_of:
                orphans += 1
                continue
            if ann.get('iscrowd', 0):
                continue  # crowd regions are neither positives nor negatives (COCOeval ignores them too)
            x, y, w, h = (float(v) for v in ann['bbox'])
            x1, y1 = max(0., x), max(0., y)
            x2, y2 = min(float(img['width']), x + w), min(float(img['height']), y + h)
            if not (x2 - x1 >= 1 and y2 - y1 >= 1):
                degenerate.append(ann['id'])
                continue
            if self.with_masks and not _has_segmentation(ann):
                no_seg.append(ann['id'])
                continue
            out[ann['image_id']].append(ann)
        name = self.ann_file.name
        if degenerate:
            warnings.warn(f'{name}: {len(degenerate)} annotation(s) with a degenerate box (under 1 px wide or high '
                          f'inside the image, e.g. annotation id {degenerate[0]}) are ignored', stacklevel=3)
        if no_seg:
            warnings.warn(f'{name}: {len(no_seg)} annotation(s) without a usable segmentation (e.g. annotation id '
                          f'{no_seg[0]}) are ignored for mask training', stacklevel=3)
        if orphans:
            warnings.warn(f'{name}: {orphans} annotation(s) refer to unknown images or categories and are ignored',
                          stacklevel=3)
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def image_info(self, index: int) -> dict:
        """The json ``images`` entry of item ``index``."""
        return self.coco.imgs[self.ids[index]]

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of item ``index``."""
        info = self.image_info(index)
        path = self.image_dir / info['file_name']
        try:
            with Image.open(path) as im:
                return im.convert('RGB')
        except (OSError, ValueError) as e:
            raise DataError(f'cannot read image {path} (image id {info["id"]}): {e}') from e

    def target(self, index: int, size: tuple[int, int]) -> dict[str, Any]:
        """The raw target of item ``index`` for an image of ``size`` = (height, width)."""
        info = self.image_info(index)
        h, w = size
        if (info.get('height'), info.get('width')) != (h, w):
            warnings.warn(f'image id {info["id"]} is {w}x{h} but the json says {info.get("width")}x'
                          f'{info.get("height")}; boxes are clipped to the real size', stacklevel=2)
        anns = self._anns[info['id']]
        masks = []
        keep = []
        for ann in anns:
            if self.with_masks:
                with warnings.catch_warnings():
                    # pycocotools' decode trips numpy 2's __array__(copy=) deprecation; harmless
                    warnings.simplefilter('ignore', DeprecationWarning)
                    m = self.coco.annToMask(ann)  # decoded at the json's image size
                if m.shape != (h, w):
                    m = _resize_mask(m, (h, w))
                if not m.any():
                    warnings.warn(f'image id {info["id"]}: annotation id {ann["id"]} has an empty mask; the instance '
                                  'is ignored', stacklevel=2)
                    continue
                masks.append(m)
            keep.append(ann)
        boxes = torch.tensor([ann['bbox'] for ann in keep], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        target: dict[str, Any] = {
            'boxes': tv_tensors.BoundingBoxes(boxes, format='XYXY', canvas_size=(h, w)),
            'labels': torch.tensor([self.label_of[a['category_id']] for a in keep], dtype=torch.int64),
            'image_id': int(info['id']),
        }
        if self.with_masks:
            stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8)
            target['masks'] = tv_tensors.Mask(torch.from_numpy(stacked))
        return target

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, dict[str, Any]]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        pil = self.load_image(index)
        image = tv_tensors.Image(torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1))
        target = self.target(index, (pil.height, pil.width))
        if self.transforms is not None:
            # fork_rng: the per-sample seed leaves the training RNG streams untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, epoch, self.ids[index]))
                image, target = self.transforms(image, target)
        return image, target


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.NEAREST))


def _plain(t: Any) -> Any:
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t


def collate_detection(batch: Sequence[tuple[Any, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Lists of images and targets (torchvision detectors take lists), tv_tensors turned into plain tensors."""
    images = [_plain(item[0]) for item in batch]
    targets = [{k: _plain(v) for k, v in item[1].items()} for item in batch]
    return images, targets
