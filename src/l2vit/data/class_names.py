"""Human-readable class names for a classifier head."""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ['class_names_for']


def class_names_for(num_classes: int, names: Sequence[str] | None = None) -> list[str]:
    """Names of the ``num_classes`` outputs.

    ``names`` (e.g. the training dataset's classes, stored with our checkpoints) win when their count matches.
    Otherwise ImageNet heads get ImageNet names from timm's bundled class info (1000 classes: ImageNet-1K,
    21841: ImageNet-22K, ... no network needed); anything else gets ``class <i>``.
    """
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({'num_classes': num_classes})
    if subset is not None:
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f'class {i}' for i in range(num_classes)]
