"""The mmcv learning-rate rules of the official recipes, per iteration."""
from __future__ import annotations

import pytest
import torch

from l2vit.integrations import LrSchedule


def test_step_schedule_with_linear_warmup():
    s = LrSchedule(total_iters=1200, policy='step', milestones=[800, 1100], gamma=0.1, warmup_iters=500,
                   warmup_ratio=0.001)
    assert s.lr(1e-4, 0) == pytest.approx(1e-7)  # warm-up starts at ratio x lr
    assert s.lr(1e-4, 250) == pytest.approx(1e-4 * (1 - 0.5 * 0.999))
    assert s.lr(1e-4, 500) == pytest.approx(1e-4)
    assert s.lr(1e-4, 799) == pytest.approx(1e-4) and s.lr(1e-4, 800) == pytest.approx(1e-5)
    assert s.lr(1e-4, 1100) == pytest.approx(1e-6)


def test_poly_schedule_multiplies_its_own_value_during_warmup():
    s = LrSchedule(total_iters=1000, policy='poly', power=1.0, min_lr=0.0, warmup_iters=100, warmup_ratio=1e-6)
    assert s.lr(6e-5, 0) == pytest.approx(6e-5 * 1e-6)
    assert s.lr(6e-5, 50) == pytest.approx(6e-5 * 0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert s.lr(6e-5, 500) == pytest.approx(3e-5)
    assert s.lr(6e-5, 1000) == 0.0


def test_apply_sets_every_group_from_its_initial_lr():
    opt = torch.optim.SGD([{'params': [torch.zeros(1, requires_grad=True)], 'lr': 1.0},
                           {'params': [torch.zeros(1, requires_grad=True)], 'lr': 0.5}])
    s = LrSchedule(total_iters=10, policy='step', milestones=[5], gamma=0.1)
    s.apply(opt, 7)
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([0.1, 0.05])
    s.apply(opt, 1)  # from the initial lr, not from the current one
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError, match='policy'):
        LrSchedule(10, policy='cosine')
