"""Castling-ViT's linear-angular attention: official fixtures (inference and sparse forms), reference, quirks."""
from __future__ import annotations

import math

import pytest
import torch

from l2vit.layers.mixers.castling import (
    LinearAngularAttention,
    SparseLinearAngularAttention,
    castling_from_official,
    castling_sparse_weights,
    linear_angular_attention,
)
from tests.layers.mixers._fixtures import assert_close_abs, capture, fast_vs_reference, load_case, state_dict_of

CASES = ['case_infer_14x14', 'case_sparse_14x14', 'case_infer_12x20', 'case_sparse_12x20']


@pytest.mark.parametrize('case', CASES)
def test_matches_official_fixture(case):
    meta, t = load_case('castling_vit', case)
    kw = meta['constructor_kwargs']
    H, W = meta['token_grid_hw_of_input']
    C, heads = kw['in_channels'], kw['num_heads']
    cls = SparseLinearAngularAttention if kw['sparse_reg'] else LinearAngularAttention
    mixer = cls(C, heads, qkv_bias=kw['qkv_bias'], res_kernel_size=kw['res_kernel_size']).eval()
    assert mixer.sparse_reg == kw['sparse_reg']
    mixer.load_state_dict(castling_from_official(state_dict_of(t)), strict=True)
    seen = capture(mixer, {'q_hat': 'q_probe', 'k_hat': 'k_probe', 'dconv_v': 'dconv', 'pre_proj': '<proj'})
    x = t['input']
    with torch.no_grad():
        out = mixer(x.reshape(-1, H, W, C)).reshape(x.shape)
        assert_close_abs(out, t['output'], atol=3e-6, name='output')

        def dbg(name, actual):
            expected = t[f'debug.{name}']
            assert_close_abs(actual, expected, atol=5e-6 * expected.abs().max().item(), name=name)

        for name in ('q_hat', 'k_hat', 'dconv_v', 'pre_proj'):
            dbg(name, seen[name])
        v = mixer.qkv(x).reshape(*x.shape[:2], 3, heads, -1)[:, :, 2].transpose(1, 2)
        dbg('v', v)
        # ½v + q̂·G/π from the official q̂, k̂, v pins G and the ½·v_i term
        mixed = linear_angular_attention(t['debug.q_hat'], t['debug.k_hat'], t['debug.v'])
        expected = 0.5 * t['debug.v'] + t['debug.q_hat_kv'] / math.pi
        assert_close_abs(mixed, expected, atol=5e-6 * t['debug.q_hat_kv'].abs().max().item(), name='u')
        if kw['sparse_reg']:
            q, k = mixer.qkv(x).reshape(*x.shape[:2], 3, heads, -1)[:, :, :2].permute(2, 0, 3, 1, 4).unbind(0)
            weights = castling_sparse_weights(q, k, mixer.scale)
            assert torch.equal((weights > 0).to(torch.uint8), t['debug.sparse_mask'])
            dbg('sparse_v', weights @ t['debug.v'])


@pytest.mark.parametrize('cls', [LinearAngularAttention, SparseLinearAngularAttention], ids=['infer', 'sparse'])
def test_fast_path_matches_reference(cls):
    mixer = cls(32, 2).double()
    fast_vs_reference(mixer, torch.randn(2, 5, 7, 32, dtype=torch.float64))


def test_conv_runs_along_the_flattened_sequence():
    """The 1-D residual conv mixes the last token of a row with the first of the next (official behaviour)."""
    mixer = LinearAngularAttention(4, 1, res_kernel_size=3).eval()
    with torch.no_grad():
        mixer.dconv.weight.copy_(torch.tensor([1., 0., 0.]).view(1, 1, 3, 1))  # out_i = v_{i-1}
        v = torch.randn(1, 1, 6, 4)
        conv = mixer.dconv(v)
    torch.testing.assert_close(conv[0, 0, 3], v[0, 0, 2])  # token (1, 0) of a 2x3 grid sees token (0, 2)
    assert torch.equal(conv[0, 0, 0], torch.zeros(4))


def test_zero_vectors_stay_finite_and_sparse_form_shares_weights():
    mixer = LinearAngularAttention(8, 2, qkv_bias=False).eval()
    assert torch.isfinite(mixer(torch.zeros(1, 3, 3, 8))).all()
    sparse = SparseLinearAngularAttention(8, 2, qkv_bias=False)
    sparse.load_state_dict(mixer.state_dict(), strict=True)
    assert LinearAngularAttention(8, 2, sparse_reg=True).sparse_reg
