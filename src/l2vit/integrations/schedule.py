"""The learning-rate schedules of the official dense recipes, exactly as mmcv computes them, per iteration.

* ``step`` (mmdet, by epoch): ``lr = base · gamma^k`` with ``k`` the number of milestones reached;
* ``poly`` (mmseg, by iteration): ``lr = (base - min_lr) · (1 - it / total)^power + min_lr``;
* linear warm-up over the first ``warmup_iters`` iterations, multiplying the regular lr by
  ``1 - (1 - it / warmup_iters) · (1 - warmup_ratio)`` (from ``warmup_ratio`` up to 1).

The lr is a pure function of the iteration, so resuming needs only the iteration count.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ['LrSchedule']


@dataclass(frozen=True)
class LrSchedule:
    """Per-iteration lr factors.

    Args:
        total_iters: Iterations of the whole schedule.
        policy: ``'step'`` or ``'poly'``.
        milestones: Step policy: iterations at which the lr is multiplied by ``gamma``.
        gamma: Step factor.
        power: Poly exponent.
        min_lr: Poly floor (absolute lr).
        warmup_iters: Linear warm-up length (0: none).
        warmup_ratio: Warm-up starting factor.
    """
    total_iters: int
    policy: str = 'step'
    milestones: Sequence[int] = ()
    gamma: float = 0.1
    power: float = 1.0
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 0.001

    def __post_init__(self):
        if self.policy not in ('step', 'poly'):
            raise ValueError(f"policy must be 'step' or 'poly', got '{self.policy}'")

    def lr(self, base_lr: float, it: int) -> float:
        """The lr of the update made at (0-based) iteration ``it``."""
        if self.policy == 'step':
            regular = base_lr * self.gamma ** sum(it >= m for m in self.milestones)
        else:
            progress = min(it, self.total_iters) / max(self.total_iters, 1)
            regular = (base_lr - self.min_lr) * (1 - progress) ** self.power + self.min_lr
        if it < self.warmup_iters:
            regular *= 1 - (1 - it / self.warmup_iters) * (1 - self.warmup_ratio)
        return regular

    def apply(self, optimizer: torch.optim.Optimizer, it: int) -> float:
        """Set every parameter group's lr for iteration ``it`` (from its ``initial_lr``); returns the first."""
        for g in optimizer.param_groups:
            g.setdefault('initial_lr', g['lr'])
            g['lr'] = self.lr(g['initial_lr'], it)
        return optimizer.param_groups[0]['lr']
