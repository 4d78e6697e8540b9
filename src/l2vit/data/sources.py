"""Image sources: an ImageFolder tree or scikit-learn's bundled handwritten digits, behind one small interface.

A source lists samples and opens one image at a time; it applies no transform. Opening a corrupt or unreadable file
raises :class:`BadImageError`, which :class:`~l2vit.data.dataset.TransformedDataset` turns into a skip.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ['BadImageError', 'DataError', 'ImageSource', 'FolderSource', 'DigitsSource', 'IMG_EXTENSIONS', 'build_sources']

# torchvision's ImageFolder extensions
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class DataError(ValueError):
    """The data cannot be used: missing folder, no classes, no images, classes that differ between splits."""


class BadImageError(Exception):
    """One image could not be read (the file is corrupt, truncated or not an image)."""


class ImageSource:
    """Samples of a classification dataset: ``len``, class names, targets and RGB images."""

    classes: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def target(self, index: int) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        """The RGB image of sample ``index``; raises :class:`BadImageError` if it cannot be read."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A human-readable name of sample ``index`` (its file path) for warnings."""
        return f'sample {index}'


class FolderSource(ImageSource):
    """An ImageFolder split: ``root/<class>/**/<image>``, classes in sorted folder-name order (torchvision's).

    Args:
        root: The split folder (e.g. ``imagenet/train``).
        classes: Expected class names in index order (e.g. those of the training split); None: the folders found.

    Raises:
        DataError: when ``root`` is missing, has no class folders, a class folder has no image, or the class folders
            differ from ``classes``.
    """

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None):
        from torchvision.datasets.folder import find_classes, make_dataset

        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f'data folder not found: {self.root} (expected one sub-folder of images per class)')
        try:
            found, _ = find_classes(self.root)
        except FileNotFoundError:
            raise DataError(f'{self.root} has no class sub-folders; expected {self.root}/<class name>/<images> '
                            '(ImageFolder layout)') from None
        if classes is not None and found != list(classes):
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise DataError(f'the class folders of {self.root} differ from the training classes: '
                            f'missing {missing[:10]}{"..." if len(missing) > 10 else ""}, '
                            f'unexpected {extra[:10]}{"..." if len(extra) > 10 else ""}')
        self.classes = list(found)
        try:
            self.samples = make_dataset(self.root, {c: i for i, c in enumerate(self.classes)}, IMG_EXTENSIONS)
        except FileNotFoundError as e:
            raise DataError(f'{self.root}: {e}') from None

    def __len__(self) -> int:
        return len(self.samples)

    def target(self, index: int) -> int:
        return self.samples[index][1]

    def load(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            with open(path, 'rb') as f, Image.open(f) as img:
                return img.convert('RGB')
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            raise BadImageError(f'{path}: {type(e).__name__}: {e}') from e

    def describe(self, index: int) -> str:
        return self.samples[index][0]


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``digits.csv.gz`` as ``(images (N, 8, 8) in 0..16, targets)``.

    The file is read the way ``sklearn.datasets.load_digits`` reads it, without importing scikit-learn (whose
    import, with SciPy, takes seconds); ``load_digits`` itself is the fallback.
    """
    spec = importlib.util.find_spec('sklearn')
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / 'datasets' / 'data' / 'digits.csv.gz'
        if path.is_file():
            data = np.loadtxt(path, delimiter=',')
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError('the built-in digits need scikit-learn: pip install "l2vit[train]" or pass --data-dir') from None
    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


class DigitsSource(ImageSource):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download), as RGB images.

    The split is stratified by class and fixed (a permutation per class with seed 0, independent of the training
    seed), so every run and every tool sees the same validation images.

    Args:
        split: ``'train'`` or ``'val'``.
        val_fraction: Share of each class held out for validation.
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = 'train', val_fraction: float = 0.2):
        if split not in ('train', 'val'):
            raise DataError(f"digits split must be 'train' or 'val', got '{split}'")
        images, targets = _load_digits()
        # 0..16 intensities -> 0..255 grey levels
        images = np.rint(images * (255 / 16)).astype(np.uint8)
        rng = np.random.RandomState(0)
        val = np.zeros(len(targets), dtype=bool)
        for c in range(10):
            members = rng.permutation(np.flatnonzero(targets == c))
            val[members[:int(round(val_fraction * len(members)))]] = True
        keep = np.flatnonzero(val if split == 'val' else ~val)
        self.split = split
        self.images = images[keep]
        self.targets = targets[keep]

    def __len__(self) -> int:
        return len(self.images)

    def target(self, index: int) -> int:
        return int(self.targets[index])

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert('RGB')

    def describe(self, index: int) -> str:
        return f'digits/{self.split}[{index}]'


def build_sources(data_dir: str | None, train_split: str = 'train', val_split: str = 'val',
                  val_fraction: float = 0.2) -> tuple[ImageSource, ImageSource]:
    """``(train, val)`` sources: ImageFolder splits of ``data_dir``, or the built-in digits when it is None.

    Raises:
        DataError: for a missing or mis-structured folder, before anything is trained.
    """
    if data_dir is None:
        return DigitsSource('train', val_fraction), DigitsSource('val', val_fraction)
    if not os.path.isdir(data_dir):
        raise DataError(f'data dir not found: {data_dir}')
    missing = [s for s in (train_split, val_split) if not os.path.isdir(os.path.join(data_dir, s))]
    if missing:
        raise DataError(f'{data_dir} must contain {train_split}/ and {val_split}/ folders, each with one '
                        f'sub-folder of images per class; missing: {", ".join(m + "/" for m in missing)}')
    train = FolderSource(os.path.join(data_dir, train_split))
    val = FolderSource(os.path.join(data_dir, val_split), classes=train.classes)
    return train, val
