"""Checkpoint directories: atomic, complete or absent, pruned, linked; RNG states round-trip in plain tensors."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from l2vit.engine.checkpoint import CheckpointManager, find_resume_checkpoint, read_checkpoint
from l2vit.engine.rng import get_rng_state, set_rng_state
from l2vit.models import CheckpointError


def _state(epoch: int, updates: int = 0) -> dict:
    return {'epoch': epoch, 'epoch_updates': updates, 'rng': [get_rng_state()], 'config': {'a': [1, 2]},
            'history': [{'epoch': 1, 'val_top1': 50.0}]}


def test_save_read_prune_and_link(tmp_path):
    model, ema = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for e in (1, 2, 3):
        mgr.save(mgr.epoch_name(e), model, ema, _state(e), {'architecture': 'x'})
        mgr.prune((e, 0))
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['epoch-0002', 'epoch-0003']
    rec = mgr.save(mgr.recovery_name(3, 5), model, None, _state(3, 5))
    mgr.prune((3, 5))
    assert rec.name == 'e0003-u000005'
    assert find_resume_checkpoint(tmp_path)[0] == rec  # newest progress first
    mgr.save(mgr.recovery_name(3, 9), model, None, _state(3, 9))
    mgr.prune((3, 9))
    assert [p.name for p in (tmp_path / 'checkpoints' / 'recovery').iterdir()] == ['e0003-u000009']

    ck = read_checkpoint(tmp_path / 'checkpoints' / 'epoch-0003' / 'state.pt')
    torch.testing.assert_close(ck.model['weight'], model.weight.detach())
    torch.testing.assert_close(ck.model_ema['bias'], ema.bias.detach())
    assert ck.progress == (3, 0) and ck.state['config'] == {'a': [1, 2]}
    assert torch.load(ck.path / 'state.pt', weights_only=True)['version'] == 1
    assert read_checkpoint(rec.parent / 'e0003-u000009').model_ema is None

    best = mgr.link(ck.path, 'best')
    assert (best / 'model.safetensors').stat().st_ino == (ck.path / 'model.safetensors').stat().st_ino
    for e in (4, 5):
        mgr.save(mgr.epoch_name(e), model, ema, _state(e))
        mgr.prune((e, 0))
    assert not ck.path.exists() and read_checkpoint(best).progress == (3, 0)  # hard links outlive pruning


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(mgr.epoch_name(1), torch.nn.Linear(2, 2), None, _state(1))
    root = tmp_path / 'checkpoints'
    (root / '.tmp-epoch-0002-123').mkdir()  # a save killed before its rename
    (root / '.tmp-epoch-0002-123' / 'model.safetensors').write_bytes(b'partial')
    (root / 'epoch-0005').mkdir()  # not ours / no state.pt
    assert [p.name for p in find_resume_checkpoint(tmp_path)] == ['epoch-0001']
    mgr.prune((1, 0))
    assert not (root / '.tmp-epoch-0002-123').exists()  # leftovers of dead processes are removed
    with pytest.raises(CheckpointError, match='no state.pt'):
        read_checkpoint(root / 'epoch-0005')
    (root / 'epoch-0001' / 'state.pt').write_bytes(b'\x00' * 10)
    with pytest.raises(CheckpointError, match='not a complete PyTorch checkpoint'):
        read_checkpoint(root / 'epoch-0001')


def test_rng_state_round_trip_is_plain():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # a cached gaussian in numpy's state
    random.gauss(0, 1)
    state = get_rng_state()
    expected = random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected
    flat = [state['python']['state'], state['numpy']['keys'], state['torch']]
    assert all(isinstance(t, torch.Tensor) for t in flat)
