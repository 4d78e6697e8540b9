"""The inference fast paths (in-place activations, folded norms, chunked mixers and MLPs) against the plain forward.

Every fast path must give the plain form's values; chunk sizes are shrunk here so that even small maps are split
into many chunks, padded window rows and multi-image batches included. The plain form is forced with a global
forward hook (the fast paths stand aside whenever a hook could observe a tensor).
"""
from __future__ import annotations

import contextlib

import pytest
import timm
import torch
from torch.nn.modules.module import register_module_forward_hook

from l2vit.layers import (
    ConvStem,
    LinearGlobalAttention,
    LocalConcentration,
    LocalWindowAttention,
    _fastpath,
    fast_paths,
)
from l2vit.layers import lcm as lcm_module
from l2vit.layers.mlp import Mlp
from tests.helpers import OFFICIAL_CASES, assert_within
from tests.models.test_official_parity import _build, _load_case

GRIDS = [(14, 14), (12, 20), (7, 9), (23, 16)]


@contextlib.contextmanager
def plain_forward():
    """Run every module through its plain forward (a global hook makes every fast path stand aside)."""
    handle = register_module_forward_hook(lambda module, args, output: None)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of a few tokens, and no size below which maps are left whole."""
    monkeypatch.setattr(_fastpath, 'CHUNK_BYTES', 4 * 96 * 20)
    monkeypatch.setattr(_fastpath, 'SPLIT_BYTES', 0)
    monkeypatch.setattr(_fastpath, 'MIN_CHUNK_ROWS', 8)
    monkeypatch.setattr(lcm_module, 'BAND_BYTES', 1)  # LCM bands of the fewest rows allowed


def _both(module, *args):
    with torch.inference_mode():
        fast = module(*args)
        with plain_forward():
            plain = module(*args)
    return fast, plain


@pytest.mark.parametrize('grid', GRIDS, ids=lambda g: f'{g[0]}x{g[1]}')
@pytest.mark.parametrize('mask_padding', [False, True], ids=['official', 'masked'])
def test_chunked_window_attention_matches_plain(tiny_chunks, grid, mask_padding):
    mixer = LocalWindowAttention(32, 2, window_size=7, mask_padding=mask_padding).double().eval()
    x = torch.randn(3, *grid, 32, dtype=torch.float64)
    with torch.no_grad():
        assert mixer.chunked_residual(x, None) is not None  # the chunked route really runs
    fast, plain = _both(mixer, x)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)
    norm = torch.nn.LayerNorm(32).double()
    with torch.inference_mode():
        torch.testing.assert_close(mixer.chunked_residual(x, norm), x + plain_of(mixer, norm(x)), rtol=0, atol=1e-12)


def plain_of(module, x):
    with plain_forward():
        return module(x)


@pytest.mark.parametrize('grid', GRIDS, ids=lambda g: f'{g[0]}x{g[1]}')
@pytest.mark.parametrize('scale', [0.05, 20.0], ids=['clamp-active', 'clamp-inactive'])
def test_chunked_linear_attention_matches_plain(tiny_chunks, grid, scale):
    mixer = LinearGlobalAttention(32, 2).double().eval()
    with torch.no_grad():
        mixer.qkv.weight.mul_(scale * 50)
        mixer.temperature.uniform_(0.05, 0.5)
    x = torch.randn(3, *grid, 32, dtype=torch.float64)
    with torch.no_grad():
        assert mixer.chunked_residual(x, None) is not None
    fast, plain = _both(mixer, x)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-12)
    norm = torch.nn.LayerNorm(32).double()
    with torch.inference_mode():
        torch.testing.assert_close(mixer.chunked_residual(x, norm), x + plain_of(mixer, norm(x)))


def test_chunked_mlp_and_small_maps(tiny_chunks, monkeypatch):
    from l2vit.layers.mlp import mlp_residual_chunked
    mlp, norm = Mlp(32, 128).double().eval(), torch.nn.LayerNorm(32).double()
    x = torch.randn(2, 9, 11, 32, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(mlp_residual_chunked(x, norm, mlp), x + mlp(norm(x)), rtol=0, atol=1e-12)
    monkeypatch.setattr(_fastpath, 'SPLIT_BYTES', 2 ** 30)  # too small to split: the callers run the plain form
    assert mlp_residual_chunked(x, norm, mlp) is None
    assert LinearGlobalAttention(32, 2).chunked_residual(x.float(), None) is None


def test_in_place_activation_respects_hooks_and_autograd():
    mlp = Mlp(16, 64).eval()
    seen = []
    mlp.fc1.register_forward_hook(lambda m, a, out: seen.append(out))
    x = torch.randn(5, 16)
    with torch.inference_mode():
        mlp(x)
        torch.testing.assert_close(seen[0], mlp.fc1(x))  # the hook's tensor was not overwritten by the GELU
    # with autograd the activation runs out of place, and gradients flow
    y = Mlp(16, 64)(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_relu_runs_in_place_under_autograd_only_after_layers_that_do_not_save_their_output():
    from l2vit.layers._fastpath import activation
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    for producer in (torch.nn.Linear(8, 8), torch.nn.Conv2d(8, 8, 1)):
        producer.double()
        inp = x if isinstance(producer, torch.nn.Linear) else x.view(6, 8, 1, 1)
        out = producer(inp)
        y = activation(torch.nn.ReLU(), out, producer)
        assert y is out  # in place, although a gradient flows
        (g,) = torch.autograd.grad((y * y).sum(), x)
        (g0,) = torch.autograd.grad((torch.relu(producer(inp)) ** 2).sum(), x)
        torch.testing.assert_close(g, g0, rtol=0, atol=0)
    # GELU's backward needs its input: out of place under autograd; a layer that may save its output: out of place
    lin = torch.nn.Linear(8, 8).double()
    out = lin(x)
    assert activation(torch.nn.GELU(), out, lin) is not out
    out = torch.nn.Sigmoid()(x)
    assert activation(torch.nn.ReLU(), out, torch.nn.Sigmoid()) is not out
    # a hook on the producer sees its output as returned: out of place
    handle = lin.register_forward_hook(lambda m, a, o: None)
    out = lin(x)
    assert activation(torch.nn.ReLU(), out, lin) is not out
    handle.remove()


def test_folded_stem_and_in_place_lcm_match_plain():
    stem, lcm = ConvStem(3, 16).double(), LocalConcentration(16).double()
    for bn in (stem.bn1, stem.bn2, lcm.bn):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    stem.eval(), lcm.eval()
    x = torch.randn(2, 3, 37, 50, dtype=torch.float64)
    fast, plain = _both(stem, x)
    torch.testing.assert_close(fast, plain)
    t = torch.randn(2, 9, 10, 16, dtype=torch.float64)
    fast, plain = _both(lcm, t)
    torch.testing.assert_close(fast, plain)
    stem.train()  # batch statistics: no folding
    with torch.no_grad():
        torch.testing.assert_close(stem(x), plain_of(stem, x))


def _random_bn(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)


# (batch, H, W, band bytes): bands of p + q rows, of rows with a short last band, one band, images one by one and
# in groups of two; maps shorter than the kernel
LCM_CASES = [(1, 23, 9, 1), (2, 30, 7, 4 * 16 * 7 * 11), (1, 5, 9, 1), (3, 12, 10, 8 * 12 * 10 * 16),
             (3, 12, 10, 8 * 12 * 10 * 16 * 2), (1, 2, 3, 1), (2, 13, 6, 10 ** 9)]


@pytest.mark.parametrize('case', LCM_CASES, ids=lambda c: 'x'.join(map(str, c)))
@pytest.mark.parametrize('kernel', [7, 3])
def test_banded_lcm_matches_plain(monkeypatch, case, kernel):
    B, H, W, band = case
    monkeypatch.setattr(lcm_module, 'BAND_BYTES', band)
    lcm, norm = LocalConcentration(16, kernel).double().eval(), torch.nn.LayerNorm(16).double()
    _random_bn(lcm.bn)
    x = torch.randn(B, H, W, 16, dtype=torch.float64)
    with torch.inference_mode():
        ref = x + plain_of(lcm, norm(x))
        if B * H * W * 16 * 8 <= band:
            assert lcm.chunked_residual(x, norm) is None  # one band: the plain form
            return
        torch.testing.assert_close(lcm.chunked_residual(x, norm), ref, rtol=0, atol=1e-12)
        own = x.clone()
        out = lcm.chunked_residual(own, norm, into=own)  # in place: every band normed before it is overwritten
        assert out is own
        torch.testing.assert_close(own, ref, rtol=0, atol=1e-12)
        other = torch.zeros(B, H, W, 16)  # a buffer of the wrong dtype is not used
        assert lcm.chunked_residual(x, norm, into=other).dtype == torch.float64 and not other.any()


def test_banded_lcm_only_for_same_padded_depthwise_convs(monkeypatch):
    monkeypatch.setattr(lcm_module, 'BAND_BYTES', 1)
    lcm, norm = LocalConcentration(8), torch.nn.LayerNorm(8)
    x = torch.randn(1, 20, 6, 8)
    with torch.inference_mode():
        assert lcm.chunked_residual(x, norm) is not None
        lcm.conv2.dilation = (2, 2)
        assert lcm.chunked_residual(x, norm) is None


def test_probe_hooks_see_full_queries_and_keys(tiny_chunks):
    """Analysis hooks on q_probe / k_probe make the mixer take the plain route: they see all N tokens."""
    model = timm.create_model('test_l2vit').eval()
    seen = {}
    attn = model.stages[0].blocks[1].attn
    attn.q_probe.register_forward_hook(lambda m, a, o: seen.update(q=o.shape))
    with torch.inference_mode():
        model(torch.randn(2, 3, 64, 96))
    assert seen['q'] == (2, 1, 16 * 24, 16)


@pytest.mark.parametrize('size', [(64, 96), (97, 75)])
def test_whole_model_fast_path_matches_plain(tiny_chunks, size):
    model = timm.create_model('test_l2vit', num_classes=7).double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    fast, plain = _both(model, x)
    torch.testing.assert_close(fast, plain, rtol=1e-9, atol=1e-11)
    with torch.inference_mode():
        feats = model.forward_intermediates(x, intermediates_only=True)
        with plain_forward():
            ref = model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(feats, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('case', OFFICIAL_CASES)
def test_fast_paths_keep_official_parity(tiny_chunks, case):
    """The official fixtures at their tolerance, with every fast path forced into many small chunks."""
    meta, tensors, state_dict = _load_case(case)
    model = _build(meta, state_dict)
    with torch.inference_mode():
        final, stages = model.forward_intermediates(tensors['input'])
        logits = model.forward_head(final)
    assert_within(logits, tensors['logits'], name='logits')
    for i, stage in enumerate(stages):
        assert_within(stage.flatten(2).transpose(1, 2), tensors[f'stage{i}'], name=f'stage{i}')


def test_chunking_is_for_the_cpu_only():
    assert _fastpath.chunk_rows(384, 10 ** 6) > 0
    assert _fastpath.chunk_rows(384, 10 ** 6, device='cpu') > 0
    assert _fastpath.chunk_rows(384, 10 ** 6, device='cuda') == 0
    assert _fastpath.chunk_rows(384, 100) == 0  # too small to split


def test_fast_paths_switch():
    model = timm.create_model('test_l2vit').eval()
    x = torch.randn(2, 3, 64, 96)
    assert _fastpath.fast_paths_enabled()
    with fast_paths(False):
        assert not _fastpath.unobserved(model)
        with torch.inference_mode():
            plain = model(x)
    assert _fastpath.fast_paths_enabled() and _fastpath.unobserved(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), plain)


def test_chunked_routes_write_into_a_given_buffer(tiny_chunks):
    """``into`` / ``out`` may be the input itself (each chunk reads the tokens it writes); a buffer that does not fit
    (wrong dtype, not contiguous) is ignored and a new tensor returned."""
    from l2vit.layers.mlp import mlp_residual_chunked
    norm = torch.nn.LayerNorm(32).double()
    window = LocalWindowAttention(32, 2, window_size=7).double().eval()
    linear = LinearGlobalAttention(32, 2).double().eval()
    mlp = Mlp(32, 128).double().eval()
    routes = [lambda x, buf: window.chunked_residual(x, norm, into=buf),
              lambda x, buf: linear.chunked_residual(x, norm, into=buf),
              lambda x, buf: mlp_residual_chunked(x, norm, mlp, out=buf)]
    with torch.inference_mode():
        for route in routes:
            for grid in ((14, 14), (12, 20)):  # whole windows, and padded ones
                x = torch.randn(2, *grid, 32, dtype=torch.float64)
                ref = route(x, None)
                same = x.clone()
                out = route(same, same)
                assert out.data_ptr() == same.data_ptr()
                torch.testing.assert_close(out, ref, rtol=0, atol=0)
                for unfit in (torch.empty_like(x, dtype=torch.float32), torch.empty_like(x).transpose(1, 2)
                              .contiguous().transpose(1, 2)):
                    out = route(x, unfit)
                    assert out.data_ptr() != unfit.data_ptr()
                    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _blocks(model):
    return [b for stage in model.stages for b in stage.blocks]


def test_blocks_update_their_own_map_in_place_only(tiny_chunks, monkeypatch):
    """In inference a block writes its residual branches into the map it made itself (CPE output onwards): same
    values, its input untouched, and a tensor a hook has seen (module output or input) is never written."""
    model = timm.create_model('test_l2vit').double().eval()
    blocks = _blocks(model)
    assert {b.local_module for b in blocks} >= {'cpe', 'lcm'}
    into = []
    import l2vit.models.l2vit as l2vit_module
    real = l2vit_module.mlp_residual_chunked
    monkeypatch.setattr(l2vit_module, 'mlp_residual_chunked',
                        lambda x, norm, mlp, out=None: into.append(out is not None) or real(x, norm, mlp, out=out))
    for block in blocks:
        x = torch.randn(2, 9, 11, block.norm1.normalized_shape[0], dtype=torch.float64)
        x0 = x.clone()
        into.clear()
        fast, plain = _both(block, x)
        assert into == [True]  # the MLP branch wrote into the block's own map (the plain run never chunks)
        torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
        assert torch.equal(x, x0)  # the block's input
        modules = dict(block.named_modules())
        for name in ('cpe.0', 'norm3', 'cpe.1', 'norm2'):  # what a hook sees stays as it was when it saw it
            module = modules.get(name)
            if module is None:
                continue
            seen = []
            handle = module.register_forward_hook(
                lambda m, args, out: seen.append((args[0], args[0].clone(), out, out.clone())))
            with torch.inference_mode():
                torch.testing.assert_close(block(x), plain, rtol=1e-12, atol=1e-12)
            handle.remove()
            (arg, arg0, out, out0), = seen
            assert torch.equal(arg, arg0) and torch.equal(out, out0), name
