"""Helpers for the related-work mixer tests: the official fixture cases and their tolerances."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO_ROOT

MIXER_FIXTURES = REPO_ROOT.parent / 'shared' / 'fixtures' / 'mixers'


def fixture_dir(mixer: str) -> Path:
    """The folder of ``mixer``'s official fixtures, or skip the calling test with the reason."""
    path = MIXER_FIXTURES / mixer
    if not (path / 'README.md').is_file():
        pytest.skip(f'mixer fixtures not found at {path} (they live in ../shared/fixtures/mixers next to the '
                    'repository; this clone has none)')
    return path


def load_case(mixer: str, case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(sidecar JSON, tensors)`` of one fixture case."""
    path = fixture_dir(mixer)
    meta = json.loads((path / f'{case}.json').read_text())
    return meta, load_file(path / f'{case}.safetensors')


def state_dict_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official module state dict stored in a case (``state_dict.<name>`` entries)."""
    return {k[len('state_dict.'):]: v for k, v in tensors.items() if k.startswith('state_dict.')}


def assert_close_abs(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0., name: str = ''):
    """``|actual − expected| <= atol + rtol·|expected|`` elementwise, with the worst offender in the message."""
    assert actual.shape == expected.shape, f'{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}'
    actual, expected = actual.detach().double(), expected.double()
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    worst = excess.max().item()
    err = (actual - expected).abs().max().item()
    assert worst <= 0, f'{name}: max abs error {err:.3e} exceeds atol {atol:.1e} + rtol {rtol:.1e}·|expected|'


def assert_close_rel_max(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = ''):
    """``max |actual − expected| <= rel · max(1, max |expected|)`` (the fixtures' per-tensor debug tolerance)."""
    scale = max(1.0, expected.abs().max().item())
    assert_close_abs(actual, expected, rel * scale, 0., name)


def capture(module: torch.nn.Module, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Hook submodules of ``module``: ``{key: submodule path}``; a leading '<' captures the submodule's input.

    Returns the dict the hooks fill on the next forward.
    """
    seen: dict[str, torch.Tensor] = {}
    for key, path in names.items():
        sub = module.get_submodule(path.lstrip('<'))
        if path.startswith('<'):
            sub.register_forward_pre_hook(lambda m, a, key=key: seen.__setitem__(key, a[0].detach()))
        else:
            sub.register_forward_hook(lambda m, a, o, key=key: seen.__setitem__(key, o.detach()))
    return seen


def fast_vs_reference(mixer: torch.nn.Module, x: torch.Tensor, atol: float = 1e-10, rtol: float = 1e-7) -> None:
    """The mixer's fast path and its plain reference (``use_reference``) agree in output and every gradient."""
    params = [p for p in mixer.parameters() if p.requires_grad]
    results = []
    for ref in (False, True):
        mixer.use_reference = ref
        xi = x.clone().requires_grad_(True)
        out = mixer(xi)
        grads = torch.autograd.grad(out.square().sum(), [xi] + params, allow_unused=True)
        results.append((out.detach(), grads))
    mixer.use_reference = False
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast, ref, atol=atol, rtol=rtol)
    names = ['input'] + [n for n, p in mixer.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, fast_grads, ref_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, name=name: f'grad of {name}: {m}')
