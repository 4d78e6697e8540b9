"""The related-work mixers as a family: registry, any resolution, half precision, FX/TorchScript, backbone swap."""
from __future__ import annotations

import re
import warnings

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules, set_layer_config
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from l2vit.bench import count_macs
from l2vit.layers import create_mixer, fast_paths, get_mixer, is_local_mixer, list_mixers
from l2vit.layers.mixers import (
    castling_from_official,
    fcvit_from_official,
    flatten_from_official,
    inline_from_official,
    masa_from_official,
    rala_from_official,
    vicinity_from_official,
    vig_gla_from_official,
    vitality_from_official,
)
from tests.helpers import REPO_ROOT

CONVERTERS = {
    'flatten': flatten_from_official,
    'inline': inline_from_official,
    'rala': rala_from_official,
    'rala_softmax': rala_from_official,
    'vig_gla': vig_gla_from_official,
    'masa': masa_from_official,
    'masa_decomposed': masa_from_official,
    'vicinity': vicinity_from_official,
    'castling': castling_from_official,
    'castling_sparse': castling_from_official,
    'vitality': vitality_from_official,
    'fcvit': fcvit_from_official,
}
FAMILY = list(CONVERTERS)
# linear in N (the others are softmax-based, or add an N×N sparse term)
LINEAR = ['flatten', 'inline', 'rala', 'vig_gla', 'vicinity', 'castling', 'fcvit']
NO_N_BY_N = LINEAR + ['masa_decomposed']  # softmax along rows and columns only: O(N·(H+W))
GRIDS = [(14, 14), (12, 20), (7, 9), (1, 1)]


def _tracer_kwargs():
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


class _Wrap(torch.nn.Module):
    """FX feature extraction wants a parent module; this one only calls the mixer."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, x):
        return self.mixer(x)


def test_registry_lists_the_family():
    assert set(FAMILY) <= set(list_mixers())
    for name in FAMILY:
        cls = get_mixer(name)
        assert not is_local_mixer(name) and cls.mixer_name == name
        assert callable(cls.reference), name
        mixer = create_mixer(name, 32, 2, window_size=7)
        assert mixer.use_reference is False
        # the converter is the identity on our own layout, so a converted state dict always loads strictly
        mixer.load_state_dict(CONVERTERS[name](mixer.state_dict()), strict=True)
        with pytest.raises(ValueError, match='no .* entries under prefix'):
            CONVERTERS[name](mixer.state_dict(), prefix='no.such.module.')


@pytest.mark.parametrize('name', FAMILY)
def test_any_resolution_forward_backward(name):
    mixer = create_mixer(name, 64, 2, window_size=7)
    for grid in GRIDS:
        mixer.zero_grad()
        x = torch.randn(2, *grid, 64, requires_grad=True)
        out = mixer(x)
        assert out.shape == x.shape and torch.isfinite(out).all(), grid
        out.square().mean().backward()
        missing = [n for n, p in mixer.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, f'{grid}: parameters without a finite gradient: {missing}'
        assert torch.isfinite(x.grad).all()
        with torch.no_grad():
            assert torch.isfinite(mixer.eval()(x)).all()
        mixer.train()


@pytest.mark.parametrize('name', FAMILY)
def test_half_precision_autocast(name):
    mixer = create_mixer(name, 64, 2, window_size=7).eval()
    x = torch.randn(2, 12, 20, 64)
    with torch.no_grad():
        ref = mixer(x)
        scale = max(1.0, ref.abs().max().item())
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast('cpu', dtype=dtype):
                out = mixer(x)
            assert torch.isfinite(out).all(), dtype
            err = (out.float() - ref).abs().max().item()
            assert err <= 0.05 * scale, f'{dtype}: max error {err:.3g} vs output scale {scale:.3g}'
    mixer.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mixer(x.requires_grad_())
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in mixer.parameters())


@pytest.mark.parametrize('name', LINEAR)
def test_linear_mixers_stay_finite_in_float16_at_large_token_counts(name):
    """56×56 tokens with large activations: un-normalised sums over N would overflow float16."""
    mixer = create_mixer(name, 32, 1, window_size=7).eval()
    x = torch.randn(1, 56, 56, 32) * 8 + 4
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):
        assert torch.isfinite(mixer(x)).all()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize('name', FAMILY)
def test_only_quadratic_mixers_form_n_by_n(name):
    """No intermediate of a sub-quadratic mixer reaches N² elements (64×64 tokens, batch 1), forward and backward."""
    n = 64 * 64
    mixer = create_mixer(name, 32, 2, window_size=7, device='meta')
    x = torch.randn(1, 64, 64, 32, device='meta', requires_grad=True)
    with _LargestTensor() as largest:
        mixer(x).sum().backward()
    if name in NO_N_BY_N:
        assert largest.numel < n * n // 16, f'{name} formed a tensor of {largest.numel} elements (N² = {n * n})'
    else:
        assert largest.numel >= n * n  # the check can see an N×N matrix when there is one


@pytest.mark.filterwarnings('ignore:The nodes obtained by tracing the model in train mode')  # vitality's buffers
@pytest.mark.parametrize('name', FAMILY)
def test_mixer_fx_and_torchscript(name):
    mixer = create_mixer(name, 32, 2, window_size=7).eval()
    x = torch.randn(2, 5, 7, 32)
    with torch.no_grad():
        eager = mixer(x)
        train_nodes, eval_nodes = get_graph_node_names(_Wrap(mixer), tracer_kwargs=_tracer_kwargs())
        fx = create_feature_extractor(_Wrap(mixer), train_return_nodes=[train_nodes[-1]],
                                      eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=_tracer_kwargs()).eval()
        torch.testing.assert_close(next(iter(fx(x).values())), eager, rtol=0, atol=0)
        mixer.eval()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # torch.jit.script is deprecated in torch 2.14 but still what timm tests
            scripted = torch.jit.script(mixer)
        torch.testing.assert_close(scripted(x), eager)


@pytest.mark.parametrize('name', FAMILY)
def test_backbone_swap(name):
    model = timm.create_model('test_l2vit', global_mixer=name, num_classes=5)
    cls = get_mixer(name)
    for stage in model.stages:
        kinds = [type(block.attn) for block in stage.blocks]
        assert kinds == [get_mixer('window'), cls], kinds  # LWA blocks stay, the global ones are swapped
        assert stage.blocks[1].local_module == 'lcm'
    out = model.train()(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'parameters without gradient: {missing}'
    with torch.no_grad():
        model.eval()
        assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()  # the smallest input: stage 4 is 1x1
        maps = model.forward_intermediates(torch.randn(1, 3, 64, 96), intermediates_only=True)
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 16, 24), (32, 8, 12), (64, 4, 6), (128, 2, 3)]


def test_docs_table_matches_the_code():
    """docs/mixers.md's params / GMACs of l2vit_tiny per global mixer are computed by the package, so cannot drift."""
    rows = {}
    for line in (REPO_ROOT / 'docs' / 'mixers.md').read_text().splitlines():
        cells = [c.strip() for c in line.split('|')[1:-1]]
        if len(cells) == 8 and cells[0].strip('`') in FAMILY:
            rows[cells[0].strip('`')] = cells[4:7]
    assert sorted(rows) == sorted(FAMILY)
    for name, (params, gmacs, mixer_gmacs) in rows.items():
        model = timm.create_model('l2vit_tiny', global_mixer=name, device='meta')
        assert f'{sum(p.numel() for p in model.parameters()):,}' == params, name
        report = count_macs(model, (3, 224, 224))
        global_attn = re.compile(r'stages\.\d+\.blocks\.\d*[13579]\.attn')  # odd blocks hold the global mixer
        mixers = sum(v for k, v in report.by_module.items() if global_attn.fullmatch(k))
        assert (f'{report.total / 1e9:.2f}', f'{mixers / 1e9:.2f}') == (gmacs, mixer_gmacs), name


@pytest.mark.parametrize('name', FAMILY)
def test_meta_device_build_and_mac_count(name):
    """Shape-only use (``device='meta'``), as the MAC counter and the benchmarks need it."""
    model = timm.create_model('test_l2vit', global_mixer=name, device='meta')
    report = count_macs(model, (3, 64, 96))
    assert report.total > 0 and report.by_module['stages.0.blocks.1.attn'] > 0


def test_per_stage_patterns_and_mixer_kwargs():
    # RAVLT's hybrid: RALA in stages 1-2, its softmax sibling in stages 3-4 (here alternating with LWA)
    ravlt_like = [('window', 'rala')] * 2 + [('window', 'rala_softmax')] * 2
    model = timm.create_model('test_l2vit', block_pattern=ravlt_like, num_classes=3)
    assert [s.blocks[1].attn.mixer_name for s in model.stages] == ['rala', 'rala', 'rala_softmax', 'rala_softmax']
    # RMT-like: decomposed MaSA early, full MaSA in the last stage; per-mixer keyword arguments
    pattern = [('masa_decomposed',), ('window', 'masa_decomposed'), ('window', 'vig_gla'), ('masa',)]
    model = timm.create_model('test_l2vit', block_pattern=pattern, num_classes=3,
                              mixer_kwargs={'masa': {'heads_range': 6.}, 'vig_gla': {'chunk_size': 8}})
    assert [b.attn.mixer_name for b in model.stages[0].blocks] == ['masa_decomposed'] * 2
    assert model.stages[3].blocks[0].attn.heads_range == 6. and model.stages[2].blocks[1].attn.chunk_size == 8
    assert model.stages[0].blocks[0].attn.heads_range == 4.  # kwargs go to their own mixer only
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unknown token mixer 'flaten'"):
        timm.create_model('test_l2vit', global_mixer='flaten')


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:The nodes obtained by tracing the model in train mode')
@pytest.mark.parametrize('name', FAMILY)
def test_backbone_fx_and_torchscript(name):
    """timm's FX (forward and backward) and TorchScript checks for the swapped backbone."""
    model = timm.create_model('test_l2vit', global_mixer=name).eval()
    x = torch.randn(1, 3, 96, 128)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=_tracer_kwargs())
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                  tracer_kwargs=_tracer_kwargs()).eval()
    model.eval()
    with torch.no_grad():
        traced = next(iter(fx(x).values()))
        with fast_paths(False):  # FX runs the plain forward: bit-identical to eager's plain forward
            torch.testing.assert_close(traced, model(x), rtol=0, atol=0)
        # eager inference takes the chunked fast paths: same values up to float rounding
        torch.testing.assert_close(traced, model(x))
    fx.train()
    next(iter(fx(torch.randn(2, 3, 96, 128)).values())).mean().backward()
    assert not [n for n, p in fx.named_parameters() if p.grad is None]
    with set_layer_config(scriptable=True):
        model = timm.create_model('test_l2vit', global_mixer=name).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
