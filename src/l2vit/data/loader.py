"""Samplers and loaders: deterministic per-epoch order, resumable mid-epoch, sharded over DDP ranks."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from .dataset import collate_skipping

__all__ = ['EpochSampler', 'ShardSampler', 'build_train_loader', 'build_eval_loader']


class EpochSampler(Sampler[tuple[int, int]]):
    """DistributedSampler's order (shuffle with ``seed + epoch``, pad by wrapping, rank ``r`` takes every
    ``num_replicas``-th index from ``r``), yielding ``(index, epoch)`` and able to start part-way through an epoch.

    Args:
        num_samples: Dataset length.
        num_replicas: Processes sharing the data (1 without DDP).
        rank: This process's rank.
        shuffle: Shuffle each epoch.
        seed: Base seed of the per-epoch permutation (same on every rank).
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(num_samples / num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip its first ``start`` samples of this rank (mid-epoch resume)."""
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.num_replicas
        order += (order * math.ceil(total / len(order)))[:total - len(order)]
        mine = order[self.rank:total:self.num_replicas]
        return iter([(i, self.epoch) for i in mine[self.start:]])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank``, in order, without padding (evaluation counts each image once)."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, num_samples, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _worker_kwargs(num_workers: int, pin_memory: bool) -> dict:
    kw = dict(num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_skipping)
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=2)
    return kw


def build_train_loader(dataset: Dataset, sampler: EpochSampler, batch_size: int, num_workers: int = 0,
                       pin_memory: bool = False, seed: int = 0) -> DataLoader:
    """A loader of full batches (``drop_last``) in ``sampler``'s order.

    The loader draws worker seeds from its own generator, never from the global RNG, so creating an iterator at a
    different moment (after a resume) leaves the training RNG streams untouched.
    """
    return DataLoader(
        dataset,
        batch_sampler=BatchSampler(sampler, batch_size, drop_last=True),
        generator=torch.Generator().manual_seed(seed),
        **_worker_kwargs(num_workers, pin_memory),
    )


def build_eval_loader(dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, num_workers: int = 0,
                      pin_memory: bool = False) -> DataLoader:
    """This rank's shard of ``dataset`` in order, batches of ``batch_size`` (the last one may be smaller)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), num_replicas, rank),
        generator=torch.Generator().manual_seed(0),
        **_worker_kwargs(num_workers, pin_memory),
    )
