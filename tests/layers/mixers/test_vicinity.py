"""VVT's vicinity attention: official fixtures (incl. the clamp stress case and sr 2), reference, clamps."""
from __future__ import annotations

import pytest
import torch

from l2vit.layers.mixers.vicinity import (
    VicinityAttention,
    abs_clamp,
    vicinity_angles,
    vicinity_attention_weights,
    vicinity_features,
    vicinity_from_official,
    vicinity_kv,
    vicinity_linear_attention,
)
from tests.layers.mixers._fixtures import (
    assert_close_abs,
    assert_close_rel_max,
    capture,
    fast_vs_reference,
    load_case,
    state_dict_of,
)

CASES = {  # case -> output atol (README); the stress case's float32 error is larger by construction
    'vicinity_14x14': 1e-5,
    'vicinity_12x20': 1e-5,
    'vicinity_clamps_14x14': 1e-4,
    'vicinity_sr2_14x14': 1e-5,
}


@pytest.mark.parametrize('case', list(CASES))
def test_matches_official_fixture(case):
    meta, t = load_case('vvt', case)
    kw = meta['constructor_kwargs_effective']
    H, W = meta['grid_hw']
    C, heads = kw['embed_dim'], kw['num_heads']
    mixer = VicinityAttention(C, heads, fr_ratio=kw['fr_ratio'], sr_ratio=kw['sr_ratio'],
                              se_reduction=kw['se_reduction']).eval()
    mixer.load_state_dict(vicinity_from_official(state_dict_of(t)), strict=True)
    seen = capture(mixer, {'q_feat': 'q_probe', 'k_feat': 'k_probe', 'out_proj': 'out_proj'})
    x = t['input']
    atol = CASES[case]
    with torch.no_grad():
        out = mixer(x.reshape(-1, H, W, C)).reshape(x.shape)
        assert_close_abs(out, t['output'], atol=atol, rtol=1e-5, name='output')

        def dbg(name, actual, rel=1e-5):
            assert_close_rel_max(actual, t[f'debug.{name}'], rel, name)

        # fixture defect: debug.q_feat holds the official (N, B, heads, d) memory under a (B, N, heads, d) label
        # (every other debug tensor is laid out as labelled); read it back in its true order
        q_feat = t['debug.q_feat'].reshape(H * W, -1, heads, mixer.head_dim).transpose(0, 1)
        assert_close_rel_max(seen['q_feat'].transpose(1, 2), q_feat, 1e-5, 'q_feat')
        dbg('k_feat', seen['k_feat'].transpose(1, 2))
        a, b = vicinity_angles(H, W, torch.device('cpu'))
        dbg('angle_row_a', a, 1e-7)
        dbg('angle_col_b', b, 1e-7)
        a_k, b_k = a, b
        if 'debug.angle_row_a_kv' in t:
            a_k, b_k = vicinity_angles(H // 2, W // 2, torch.device('cpu'))
            dbg('angle_row_a_kv', a_k, 1e-7)
            dbg('angle_col_b_kv', b_k, 1e-7)
        q4 = vicinity_features(q_feat.transpose(1, 2), a, b)
        k4 = vicinity_features(t['debug.k_feat'].transpose(1, 2), a_k, b_k)
        v = t['debug.v'].transpose(1, 2)
        dbg('kv_state', vicinity_kv(k4, v))  # pins the feature order, which the output cannot see
        dbg('attn_normalised', vicinity_linear_attention(q4, k4, v).transpose(1, 2), atol)
        dbg('out_proj', abs_clamp(seen['out_proj']), atol)
        dbg('se_gate', mixer.se_fc(x.mean(dim=1)))


@pytest.mark.parametrize('sr_ratio', [1, 2])
def test_fast_path_matches_reference_without_clamps(sr_ratio):
    mixer = VicinityAttention(32, 2, sr_ratio=sr_ratio, abs_clamp=False).double()
    fast_vs_reference(mixer, torch.randn(2, 6, 8, 32, dtype=torch.float64))


def test_vicinity_weights_closed_form():
    """The 4d-feature dot product equals (q·k)·[cos(Δa) + cos(Δb)]; a token weighs itself twice its q·k."""
    a, b = vicinity_angles(3, 4, torch.device('cpu'))
    q, k = torch.rand(1, 1, 12, 5, dtype=torch.float64), torch.rand(1, 1, 12, 5, dtype=torch.float64)
    a, b = a.double(), b.double()
    direct = vicinity_features(q, a, b) @ vicinity_features(k, a, b).transpose(-2, -1)
    closed = vicinity_attention_weights(q, k, a, b, a, b)
    torch.testing.assert_close(direct, closed)
    torch.testing.assert_close(closed.diagonal(dim1=-2, dim2=-1), 2 * (q * k).sum(-1))
    assert a.max() < torch.pi / 2 and b.max() < torch.pi / 2  # denominators H and W, not H-1 and W-1


def test_abs_clamp():
    t = torch.tensor([0., 1e-6, -1e-6, 0.5, -2e5, 3e4])
    torch.testing.assert_close(abs_clamp(t), torch.tensor([0., 1e-4, -1e-4, 0.5, -1e4, 1e4]))
    mixer = VicinityAttention(16, 2).eval()
    unclamped = VicinityAttention(16, 2, abs_clamp=False).eval()
    unclamped.load_state_dict(mixer.state_dict())
    x = torch.randn(1, 4, 4, 16)
    torch.testing.assert_close(mixer(x), unclamped(x), atol=3e-4, rtol=0)  # inactive clamps move only ~1e-4


def test_odd_grid_with_spatial_reduction():
    mixer = VicinityAttention(16, 2, sr_ratio=2)
    assert mixer(torch.randn(1, 5, 3, 16)).shape == (1, 5, 3, 16)
    with pytest.raises(ValueError, match='reduced width'):
        VicinityAttention(16, 3)
