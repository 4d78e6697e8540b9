"""Evaluation: loss, top-1 and top-5 over a (possibly sharded) loader, summed exactly across DDP ranks."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .distributed import all_reduce_sum

__all__ = ['evaluate']


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None,
             on_bad: Callable[[list[tuple[str, str]]], Any] | None = None) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 (percent) of ``model`` on ``loader``.

    Each rank sees its own shard (no padding); counts and sums are all-reduced, so every image counts exactly
    once. Unreadable images are left out and passed to ``on_bad``.

    Returns:
        ``{'loss', 'top1', 'top5', 'images', 'bad_images'}``.
    """
    was_training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = count = bad = 0.
    for x, y, skipped in loader:
        if skipped:
            bad += len(skipped)
            if on_bad is not None:
                on_bad(skipped)
        if len(y) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction='sum').item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(y[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += len(y)
    totals = all_reduce_sum([loss_sum, correct1, correct5, count, bad], device=device).tolist()
    loss_sum, correct1, correct5, count, bad = totals
    model.train(was_training)
    if count == 0:
        raise ValueError('the evaluation data yielded no readable image')
    return {'loss': loss_sum / count, 'top1': 100. * correct1 / count, 'top5': 100. * correct5 / count,
            'images': int(count), 'bad_images': int(bad)}
