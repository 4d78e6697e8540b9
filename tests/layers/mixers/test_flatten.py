"""FLatten's focused linear attention: official fixtures, fast path vs reference, positional-table resampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from l2vit.layers.mixers.flatten import (
    FocusedLinearAttention,
    flatten_from_official,
    focused_attention_weights,
    focused_linear_attention,
)
from tests.layers.mixers._fixtures import (
    assert_close_abs,
    assert_close_rel_max,
    capture,
    fast_vs_reference,
    load_case,
    state_dict_of,
)

CASES = {  # case -> (pos_size, official layout)
    'flatten_swin_14x14': ((14, 14), 'swin'),
    'flatten_pvt_12x20': ((12, 20), 'pvt'),
}


def _to_heads(t, heads):
    B, N, C = t.shape
    return t.reshape(B, N, heads, C // heads).transpose(1, 2)


@pytest.mark.parametrize('case', list(CASES))
def test_matches_official_fixture(case):
    meta, t = load_case('flatten', case)
    pos_size, layout = CASES[case]
    kw = meta['constructor_kwargs']
    H, W, C, heads = meta['H'], meta['W'], kw['dim'], kw['num_heads']
    official = state_dict_of(t)
    assert ('q.weight' in official) == (layout == 'pvt')
    mixer = FocusedLinearAttention(C, heads, pos_size=pos_size, focusing_factor=kw['focusing_factor'],
                                   kernel_size=kw['kernel_size'], qkv_bias=kw['qkv_bias']).eval()
    mixer.load_state_dict(flatten_from_official(official), strict=True)
    seen = capture(mixer, {'q_feat': 'q_probe', 'k_feat': 'k_probe', 'dwc': 'dwc', 'pre_proj': '<proj'})
    x = t['input']
    with torch.no_grad():
        out = mixer(x.reshape(-1, H, W, C)).reshape(x.shape)
        assert_close_abs(out, t['output'], atol=1e-5, rtol=1e-5, name='output')

        def dbg(name, actual):
            assert_close_rel_max(actual, t[f'debug.{name}'], 1e-5, name)

        _, k, v = mixer.qkv(x).chunk(3, dim=-1)
        dbg('k_plus_pos', k + mixer.pos_embed(H, W))
        dbg('softplus_scale', F.softplus(mixer.scale).flatten())
        dbg('q_feat', seen['q_feat'])
        dbg('k_feat', seen['k_feat'])
        dbg('v', _to_heads(v, heads))
        dbg('attn_linear', focused_linear_attention(t['debug.q_feat'], t['debug.k_feat'], t['debug.v']))
        dwc = seen['dwc'].reshape(x.shape[0], heads, C // heads, H * W).permute(0, 3, 1, 2).reshape(x.shape)
        dbg('dwc_out', dwc)
        dbg('pre_proj', seen['pre_proj'])
        dbg('attn_matrix_b0', focused_attention_weights(t['debug.q_feat'][0].double(), t['debug.k_feat'][0].double()))


def test_positional_table_kept_at_its_size_and_resampled_elsewhere():
    mixer = FocusedLinearAttention(16, 2, pos_size=(4, 6))
    with torch.no_grad():
        mixer.positional_encoding.normal_()
    assert mixer.pos_embed(4, 6) is mixer.positional_encoding  # bit for bit at the official size
    grid = mixer.positional_encoding.reshape(1, 4, 6, 16).permute(0, 3, 1, 2)
    up = F.interpolate(grid, size=(8, 12), mode='bicubic', align_corners=False, antialias=True)
    torch.testing.assert_close(mixer.pos_embed(8, 12), up.permute(0, 2, 3, 1).reshape(1, 96, 16))
    assert mixer.pos_embed(1, 1).shape == (1, 1, 16) and mixer.pos_embed(9, 2).shape == (1, 18, 16)
    with torch.no_grad():  # a constant table stays constant at any size
        mixer.positional_encoding.fill_(0.25)
    torch.testing.assert_close(mixer.pos_embed(7, 3), torch.full((1, 21, 16), 0.25))
    assert FocusedLinearAttention(16, 2, window_size=7).pos_size == (7, 7)
    assert FocusedLinearAttention(16, 2).pos_size == (7, 7)


@pytest.mark.parametrize('grid', [(5, 7), (1, 1)], ids=lambda g: f'{g[0]}x{g[1]}')
def test_fast_path_matches_reference(grid):
    mixer = FocusedLinearAttention(32, 2, pos_size=(4, 4)).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    fast_vs_reference(mixer, torch.randn(2, *grid, 32, dtype=torch.float64))


def test_official_key_mapping():
    C = 8
    pvt = {'scale': torch.zeros(1, 1, C), 'positional_encoding': torch.zeros(1, 6, C), 'q.weight': torch.ones(C, C),
           'q.bias': torch.ones(C), 'kv.weight': torch.full((2 * C, C), 2.), 'kv.bias': torch.full((2 * C,), 2.),
           'proj.weight': torch.zeros(C, C), 'proj.bias': torch.zeros(C), 'dwc.weight': torch.zeros(4, 1, 5, 5),
           'dwc.bias': torch.zeros(4)}
    full = {f'block1.0.attn.{k}': v for k, v in pvt.items()} | {'block1.0.norm1.weight': torch.ones(C)}
    sd = flatten_from_official(full, prefix='block1.0.attn')
    assert sd['qkv.weight'].shape == (3 * C, C)
    assert sd['qkv.weight'][:C].eq(1).all() and sd['qkv.weight'][C:].eq(2).all()
    FocusedLinearAttention(C, 2, pos_size=(2, 3)).load_state_dict(sd, strict=True)
    with pytest.raises(ValueError, match='no FLatten entries under prefix'):
        flatten_from_official(full, prefix='block2.0.attn.')
    with pytest.raises(ValueError, match='sr_ratio > 1'):
        flatten_from_official(pvt | {'sr.weight': torch.zeros(1)})


def test_bad_arguments():
    with pytest.raises(ValueError, match='multiple of num_heads'):
        FocusedLinearAttention(30, 4)
    with pytest.raises(ValueError, match='kernel_size'):
        FocusedLinearAttention(32, 2, kernel_size=4)
