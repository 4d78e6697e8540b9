"""Optimizer groups (weight-decay rule, temperature option) and the per-iteration warm-up + cosine schedule."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from l2vit.engine.config import OptimConfig, SchedConfig
from l2vit.engine.optim import build_optimizer, build_scheduler


def _decay_of(model, optimizer) -> dict[str, float]:
    wd = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    return {n: wd[id(p)] for n, p in model.named_parameters()}


@pytest.mark.parametrize('decay_temperature', [True, False])
def test_weight_decay_groups(decay_temperature):
    model = timm.create_model('test_l2vit', num_classes=3)
    opt = build_optimizer(model, OptimConfig(decay_temperature=decay_temperature))
    assert isinstance(opt, torch.optim.AdamW)
    wd = _decay_of(model, opt)
    temps = [n for n in wd if n.endswith('.temperature')]
    assert temps and all(wd[n] == (0.05 if decay_temperature else 0.0) for n in temps)
    assert all(wd[n] == 0.0 for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith('.bias'))
    assert wd['stem.conv1.weight'] == wd['head.fc.weight'] == 0.05
    # depth-wise conv kernels decay, as in the official recipe
    dw = [n for n in wd if n.endswith(('local_mp.conv1.weight', 'local_mp.conv2.weight')) or '.cpe.' in n
          and n.endswith('.weight')]
    assert len(dw) > 10 and all(wd[n] == 0.05 for n in dw)


def test_extra_no_weight_decay_patterns_and_layer_decay():
    model = timm.create_model('test_l2vit', num_classes=3)
    wd = _decay_of(model, build_optimizer(model, OptimConfig(no_weight_decay=['head.*'])))
    assert wd['head.fc.weight'] == 0.0 and wd['stem.conv1.weight'] == 0.05
    opt = build_optimizer(model, OptimConfig(layer_decay=0.5))
    scales = {g['lr_scale'] for g in opt.param_groups}
    assert max(scales) == 1.0 and min(scales) < 0.1


def test_fused_step_where_torch_has_one():
    torch.manual_seed(0)
    model = timm.create_model('test_l2vit', num_classes=3)
    twin = timm.create_model('test_l2vit', num_classes=3)
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer(model, OptimConfig(lr=1e-3))
    plain = build_optimizer(twin, OptimConfig(lr=1e-3, fused=False))
    assert all(g['fused'] for g in fused.param_groups) and not any(g['fused'] for g in plain.param_groups)
    assert [len(g['params']) for g in fused.param_groups] == [len(g['params']) for g in plain.param_groups]
    for step in range(3):  # the same update rule: parameters agree to float32 rounding
        for p, q in zip(model.parameters(), twin.parameters()):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        fused.step()
        plain.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert build_optimizer(model, OptimConfig(opt='sgd')).param_groups[0]['fused']
    # an optimizer without a fused step: the default one, or a clear error when fused is required
    assert not build_optimizer(model, OptimConfig(opt='lamb')).param_groups[0].get('fused')
    with pytest.raises(ValueError, match='no fused step'):
        build_optimizer(model, OptimConfig(opt='lamb', fused=True))


def test_schedule_warms_up_linearly_then_cosine_per_iteration():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=4e-3)
    updates, epochs, warmup = 10, 30, 5
    sched = build_scheduler(opt, SchedConfig(warmup_epochs=warmup, warmup_lr=0.0, min_lr=1e-6), epochs, updates)
    lrs = []
    for t in range(epochs * updates):
        sched.step_update(num_updates=t)
        lrs.append(opt.param_groups[0]['lr'])
    w = warmup * updates
    assert lrs[0] == 0.0
    assert all(math.isclose(lrs[t], 4e-3 * t / w) for t in range(w))  # linear from 0
    assert math.isclose(lrs[w], 4e-3)  # peak right after warm-up
    total = (epochs - warmup) * updates
    for t in (w + 7, w + total // 2, epochs * updates - 1):
        expected = 1e-6 + 0.5 * (4e-3 - 1e-6) * (1 + math.cos(math.pi * (t - w) / total))
        assert math.isclose(lrs[t], expected, rel_tol=1e-9), t
    assert lrs[-1] < 2e-6 and all(a >= b for a, b in zip(lrs[w:], lrs[w + 1:]))
