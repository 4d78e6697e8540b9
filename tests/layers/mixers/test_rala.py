"""RALA and RAVLT's softmax mixer: official fixtures (with RoPE tables), fast path vs reference, key mapping."""
from __future__ import annotations

import pytest
import torch

from l2vit.layers.mixers._rotary import apply_rotary, rala_rope_tables
from l2vit.layers.mixers.rala import (
    RankAugmentedLinearAttention,
    rala_attention_weights,
    rala_from_official,
    rala_key_logits,
    rala_linear_attention,
)
from l2vit.layers.mixers.rala_softmax import RALASoftmaxAttention
from tests.layers.mixers._fixtures import (
    assert_close_abs,
    assert_close_rel_max,
    capture,
    fast_vs_reference,
    load_case,
    state_dict_of,
)


def _nhwc(t):
    return t.permute(0, 2, 3, 1)


def _load(cls, case):
    meta, t = load_case('rala', case)
    kw = meta['constructor_kwargs']
    mixer = cls(kw['dim'], kw['num_heads']).eval()
    mixer.load_state_dict(rala_from_official(state_dict_of(t)), strict=True)
    return meta, t, mixer


@pytest.mark.parametrize('case', ['rala_14x14', 'rala_12x20', 'vanilla_softmax_12x20'])
def test_rope_tables_match_official(case):
    meta, t = load_case('rala', case)
    head_dim = meta['head_dim']
    sin, cos = rala_rope_tables(meta['H'], meta['W'], head_dim, torch.device('cpu'))
    assert_close_abs(sin, t['sin'], atol=5e-7, name='sin')
    assert_close_abs(cos, t['cos'], atol=5e-7, name='cos')
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
    torch.testing.assert_close(t['rope.angle'], angle.repeat_interleave(2), rtol=0, atol=1e-7)


@pytest.mark.parametrize('case', ['rala_14x14', 'rala_12x20'])
def test_rala_matches_official_fixture(case):
    meta, t, mixer = _load(RankAugmentedLinearAttention, case)
    seen = capture(mixer, {'q_feat': 'q_probe', 'k_weighted': 'k_probe', 'lepe': 'lepe', 'pre_proj': '<proj'})
    with torch.no_grad():
        out = mixer(_nhwc(t['input']))
        assert_close_abs(out.permute(0, 3, 1, 2), t['output'], atol=1e-5, rtol=1e-5, name='output')

        def dbg(name, actual):
            assert_close_rel_max(actual, t[f'debug.{name}'], 1e-5, name)

        dbg('q_feat', seen['q_feat'])
        dbg('k_weighted', seen['k_weighted'])  # pins the factor N that the output cannot see
        logits = rala_key_logits(t['debug.q_feat'], t['debug.k_feat'], mixer.scale)
        dbg('eff_logits', logits)
        dbg('eff', logits.softmax(-1))
        sin, cos = t['sin'], t['cos']
        dbg('q_rope', apply_rotary(t['debug.q_feat'], sin, cos))
        dbg('k_rope', apply_rotary(t['debug.k_weighted'], sin, cos))
        v = mixer.qkvo(_nhwc(t['input'])).chunk(4, dim=-1)[2]
        v = v.reshape(v.shape[0], -1, mixer.num_heads, mixer.head_dim).transpose(1, 2)
        dbg('attn_linear', rala_linear_attention(t['debug.q_feat'], t['debug.k_weighted'], v, sin, cos))
        dbg('lepe', seen['lepe'])
        dbg('pre_proj', seen['pre_proj'].permute(0, 3, 1, 2))
        weights = rala_attention_weights(t['debug.q_feat'][0].double(), t['debug.k_weighted'][0].double(),
                                         sin.double(), cos.double())
        dbg('attn_matrix_b0', weights)


def test_rala_softmax_matches_official_fixture():
    meta, t, mixer = _load(RALASoftmaxAttention, 'vanilla_softmax_12x20')
    seen = capture(mixer, {'q_rope': 'q_probe', 'k_rope': 'k_probe', 'lepe': 'lepe', 'pre_proj': '<proj'})
    for fused in (True, False):
        mixer.fused_attn = fused
        with torch.no_grad():
            out = mixer(_nhwc(t['input']))
        assert_close_abs(out.permute(0, 3, 1, 2), t['output'], atol=1e-5, rtol=1e-5, name=f'output fused={fused}')
        for name in ('q_rope', 'k_rope', 'lepe'):
            assert_close_rel_max(seen[name], t[f'debug.{name}'], 1e-5, name)
        assert_close_rel_max(seen['pre_proj'].permute(0, 3, 1, 2), t['debug.pre_proj'], 1e-5, 'pre_proj')
    attn = ((t['debug.q_rope'][0] * mixer.scale) @ t['debug.k_rope'][0].transpose(-2, -1)).softmax(-1)
    assert_close_rel_max(attn, t['debug.attn_matrix_b0'], 1e-5, 'attn_matrix_b0')


@pytest.mark.parametrize('cls', [RankAugmentedLinearAttention, RALASoftmaxAttention], ids=['rala', 'rala_softmax'])
def test_fast_path_matches_reference(cls):
    mixer = cls(32, 2).double().eval()
    fast_vs_reference(mixer, torch.randn(2, 5, 7, 32, dtype=torch.float64))


def test_rope_layout():
    """Row positions rotate the first half of each head, column positions the second; pairs are interleaved."""
    sin, cos = rala_rope_tables(3, 5, 8, torch.device('cpu'))
    sin, cos = sin.reshape(3, 5, 8), cos.reshape(3, 5, 8)
    assert torch.equal(sin[:, 0, 4:], torch.zeros(3, 4)) and torch.equal(sin[0, :, :4], torch.zeros(5, 4))
    torch.testing.assert_close(sin[2, 0, :4], torch.sin(2 * torch.tensor([1., 1., 1e-4, 1e-4])))
    x = torch.tensor([1., 2., 3., 4.])
    rotated = apply_rotary(x, torch.ones(4), torch.zeros(4))
    assert torch.equal(rotated, torch.tensor([-2., 1., -4., 3.]))


def test_key_mapping_and_head_dim_check():
    ours = RankAugmentedLinearAttention(16, 2).state_dict()
    official = {k: (v[:, :, None, None] if k in ('qkvo.weight', 'proj.weight') else v) for k, v in ours.items()}
    official = {f'layers.0.blocks.1.attn.{k}': v for k, v in official.items()} | {'layers.0.RoPE.angle': torch.ones(2)}
    sd = rala_from_official(official, prefix='layers.0.blocks.1.attn.')
    assert sd.keys() == ours.keys() and all(torch.equal(sd[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match='multiple of the RoPE layout'):
        RankAugmentedLinearAttention(24, 4)  # head dim 6
