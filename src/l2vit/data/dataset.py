"""A map-style dataset over an :class:`~l2vit.data.sources.ImageSource`: transforms, per-sample seeds, bad-image skips.

Per-sample seeds make augmentation a pure function of ``(seed, epoch, index)``: the same image gets the same crop in
every run, whatever the number of loader workers or processes, and a run resumed mid-epoch sees exactly the
batches an uninterrupted run would have seen. The seeded section saves and restores the global RNG states, so
loading in the main process (``num_workers=0``) does not disturb the training RNG streams (drop-path, Mixup).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .sources import BadImageError, ImageSource

__all__ = ['TransformedDataset', 'sample_seed', 'collate_skipping']

_MAX_SUBSTITUTES = 16


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends on all three numbers (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


class _SeededRNG:
    """Seed python ``random``, numpy and torch's CPU generator; in the main process restore their states on exit.

    Worker processes skip the restore: their global RNG streams serve nothing else (and numpy's state copy is the
    costly part, about 0.1 ms).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.restore = get_worker_info() is None

    def __enter__(self) -> None:
        if self.restore:
            self.states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        if self.restore:
            py, np_state, torch_state = self.states
            random.setstate(py)
            np.random.set_state(np_state)
            torch.default_generator.set_state(torch_state)


class TransformedDataset(Dataset):
    """Apply ``transform`` to the images of ``source`` under per-sample seeds, skipping unreadable images.

    Items are keyed by ``index`` or by ``(index, epoch)`` (what :class:`~l2vit.data.loader.EpochSampler` yields) and
    are ``(image, target, bad)`` where ``bad`` lists ``(description, reason)`` of images skipped on the way; the
    caller reports them (the training loop warns, counts and logs each one).

    Args:
        source: Where the images come from.
        transform: Image -> tensor transform (a timm transform).
        seed: Base seed of the per-sample seeds.
        on_error: ``'substitute'`` replaces an unreadable image by the next readable one (training: batch shapes
            stay fixed, Mixup keeps its even batch); ``'drop'`` returns ``None`` for it so that
            :func:`collate_skipping` leaves it out (evaluation: nothing is counted twice).
        seeded: Run ``transform`` under per-sample seeds (False for deterministic evaluation transforms).
    """

    def __init__(self, source: ImageSource, transform: Callable[[Any], torch.Tensor], seed: int = 0,
                 on_error: str = 'substitute', seeded: bool = True):
        if on_error not in ('substitute', 'drop'):
            raise ValueError(f"on_error must be 'substitute' or 'drop', got '{on_error}'")
        self.source = source
        self.transform = transform
        self.seed = seed
        self.on_error = on_error
        self.seeded = seeded

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | None, int, list[tuple[str, str]]]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        bad: list[tuple[str, str]] = []
        tries = _MAX_SUBSTITUTES if self.on_error == 'substitute' else 1
        for k in range(tries):
            i = (index + k) % len(self.source)
            try:
                image = self.source.load(i)
            except BadImageError as e:
                bad.append((self.source.describe(i), str(e)))
                continue
            if not self.seeded:
                return self.transform(image), self.source.target(i), bad
            with _SeededRNG(sample_seed(self.seed, epoch, i)):
                return self.transform(image), self.source.target(i), bad
        if self.on_error == 'drop':
            return None, self.source.target(index), bad
        raise RuntimeError(f'{tries} consecutive images starting at {self.source.describe(index)} could not be '
                           f'read; the data looks broken: {bad[-1][1]}')


def collate_skipping(batch: list[tuple[torch.Tensor | None, int, list]]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Stack images and targets, leaving out dropped (``None``) images; also returns the skipped-image list."""
    bad = [b for item in batch for b in item[2]]
    kept = [item for item in batch if item[0] is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images = torch.stack([item[0] for item in kept])
    targets = torch.tensor([item[1] for item in kept], dtype=torch.long)
    return images, targets, bad
