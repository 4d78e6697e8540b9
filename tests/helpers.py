"""Helpers shared by the tests: the official fixtures folder and the fixtures' tolerance."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_FIXTURES = REPO_ROOT.parent / 'shared' / 'fixtures' / 'official'
OFFICIAL_CASES = ('case_small_224', 'case_small_pad', 'case_small_w12_384', 'case_deep_160', 'case_deep_pad_odd')
OFFICIAL_VARIANTS = {'l2vit_tiny': 'tiny', 'l2vit_small': 'small', 'l2vit_base': 'base', 'l2vit_base_384': 'base_384'}


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads, restoring the previous setting afterwards. Tests of tiny
    models use one: tensors of a few hundred elements gain nothing from a second thread, and its spin-waiting costs
    up to 30x when other processes share the CPUs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def require_official_fixtures() -> Path:
    """The official fixtures folder, or skip the calling test with the reason."""
    if not (OFFICIAL_FIXTURES / 'README.md').is_file():
        pytest.skip(f'official fixtures not found at {OFFICIAL_FIXTURES} (they live in ../shared/fixtures/official '
                    'next to the repository; this clone has none)')
    return OFFICIAL_FIXTURES


def official_manifest(variant: str) -> dict:
    """The official state_dict manifest (names, shapes, dtypes) of ``variant`` ('tiny', 'small', ...)."""
    root = require_official_fixtures()
    return json.loads((root / f'keys_l2vit_{variant}.json').read_text())


def official_random_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the official names and shapes of ``variant`` and random values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for entry in official_manifest(variant)['state_dict']:
        shape = entry['shape']
        if entry['dtype'] == 'int64':
            out[entry['name']] = torch.zeros(shape, dtype=torch.int64)
        elif entry['name'].endswith('running_var'):
            out[entry['name']] = torch.rand(shape, generator=g) + 0.5
        else:
            out[entry['name']] = torch.randn(shape, generator=g) * 0.02
    return out


def assert_within(actual: torch.Tensor, expected: torch.Tensor, rel: float = 5e-6, name: str = '') -> None:
    """The fixtures' tolerance: max |actual - expected| <= rel * max(1, max |expected|)."""
    assert actual.shape == expected.shape, f'{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}'
    tol = rel * max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f'{name}: max abs error {err:.3e} exceeds tolerance {tol:.3e}'
