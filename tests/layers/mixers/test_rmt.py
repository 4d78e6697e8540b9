"""RMT's MaSA (full and decomposed): official fixtures and tables, fast path vs reference, key mapping."""
from __future__ import annotations

import pytest
import torch

from l2vit.layers.mixers._rotary import rmt_rope_tables
from l2vit.layers.mixers.rmt import (
    DecomposedManhattanSelfAttention,
    ManhattanSelfAttention,
    masa_decomposed,
    masa_from_official,
    masa_full,
    masa_log_decay,
    masa_mask_full,
    masa_masks_decomposed,
)
from tests.layers.mixers._fixtures import (
    assert_close_abs,
    assert_close_rel_max,
    capture,
    fast_vs_reference,
    load_case,
    state_dict_of,
)

CASES = ['masa_decomposed_14x14', 'masa_decomposed_12x20', 'masa_full_14x14', 'masa_full_12x20']


def _build(meta):
    kw, rel = meta['constructor_kwargs_effective'], meta['relpos_constructor_kwargs']
    cls = DecomposedManhattanSelfAttention if 'decomposed' in meta['case'] else ManhattanSelfAttention
    return cls(kw['embed_dim'], kw['num_heads'], initial_value=rel['initial_value'], heads_range=rel['heads_range'])


@pytest.mark.parametrize('case', CASES)
def test_tables_match_official(case):
    meta, t = load_case('rmt', case)
    H, W = meta['grid_hw']
    rel = meta['relpos_constructor_kwargs']
    heads, head_dim = rel['num_heads'], rel['embed_dim'] // rel['num_heads']
    log_decay = masa_log_decay(heads, rel['initial_value'], rel['heads_range'], torch.device('cpu'))
    # float32 log/pow may differ by an ulp between CPUs (vectorised math libraries)
    torch.testing.assert_close(log_decay, t['relpos_module.decay'], rtol=0, atol=1e-7)
    torch.testing.assert_close(torch.log(torch.tensor(meta['gamma_per_head'])), log_decay)
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 2))
    torch.testing.assert_close(t['relpos_module.angle'], angle.repeat_interleave(2), rtol=0, atol=1e-7)
    sin, cos = rmt_rope_tables(H, W, head_dim, torch.device('cpu'))
    assert_close_abs(sin, t['rel_pos.sin'], atol=2e-5, name='sin')
    assert_close_abs(cos, t['rel_pos.cos'], atol=2e-5, name='cos')
    if 'decomposed' in case:
        mask_h, mask_w = masa_masks_decomposed(H, W, log_decay)
        assert_close_abs(mask_h, t['rel_pos.mask_h'], atol=2e-5, name='mask_h')
        assert_close_abs(mask_w, t['rel_pos.mask_w'], atol=2e-5, name='mask_w')
    else:
        assert_close_abs(masa_mask_full(H, W, log_decay), t['rel_pos.mask'], atol=2e-5, name='mask')


@pytest.mark.parametrize('case', CASES)
def test_matches_official_fixture(case):
    meta, t = load_case('rmt', case)
    mixer = _build(meta).eval()
    mixer.load_state_dict(masa_from_official(state_dict_of(t)), strict=True)
    seen = capture(mixer, {'qr': 'q_probe', 'kr': 'k_probe', 'lepe': 'lepe', 'pre_out_proj': '<out_proj'})
    with torch.no_grad():
        # our own tables: the README's tolerance for implementations that build them is 2e-5
        assert_close_abs(mixer(t['input']), t['output'], atol=2e-5, rtol=1e-5, name='output')
        for name in ('qr', 'kr', 'pre_out_proj'):
            assert_close_rel_max(seen[name], t[f'debug.{name}'], 2e-5, name)
        assert_close_rel_max(seen['lepe'].permute(0, 2, 3, 1), t['debug.lepe'], 1e-5, 'lepe')

        # the attention core fed the official tables and rotated q/k: the README's 1e-5
        v = mixer.v_proj(t['input'])
        B, H, W, C = v.shape
        v = v.reshape(B, H, W, mixer.num_heads, -1).permute(0, 3, 1, 2, 4)
        if 'decomposed' in case:
            o = masa_decomposed(t['debug.qr'], t['debug.kr'], v, t['rel_pos.mask_h'], t['rel_pos.mask_w'])
        else:
            q, k = t['debug.qr'].flatten(2, 3), t['debug.kr'].flatten(2, 3)
            o = masa_full(q, k, v.flatten(2, 3), t['rel_pos.mask']).reshape(v.shape)
            if 'debug.attn' in t:
                attn = (q @ k.transpose(-2, -1) + t['rel_pos.mask']).softmax(-1)
                assert_close_rel_max(attn, t['debug.attn'], 1e-5, 'attn')
        o = o.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        assert_close_rel_max(o + t['debug.lepe'], t['debug.pre_out_proj'], 1e-5, 'pre_out_proj from official tables')


@pytest.mark.parametrize('cls', [ManhattanSelfAttention, DecomposedManhattanSelfAttention], ids=['full', 'decomposed'])
@pytest.mark.parametrize('grid', [(5, 7), (1, 4)], ids=lambda g: f'{g[0]}x{g[1]}')
def test_fast_path_matches_reference(cls, grid):
    mixer = cls(32, 4, heads_range=6.).double().eval()
    fast_vs_reference(mixer, torch.randn(2, *grid, 32, dtype=torch.float64))


def test_decomposed_differs_from_full_and_decay_ordering():
    log_decay = masa_log_decay(4, 2., 4., torch.device('cpu'))
    torch.testing.assert_close(log_decay.exp(), torch.tensor([0.75, 0.875, 0.9375, 0.96875]))
    full = ManhattanSelfAttention(16, 2).eval()
    dec = DecomposedManhattanSelfAttention(16, 2).eval()
    dec.load_state_dict(full.state_dict())
    x = torch.randn(1, 4, 5, 16)
    assert not torch.allclose(full(x), dec(x), atol=1e-4)
    x = torch.randn(1, 1, 6, 16)  # a single row: the column pass is the identity, so both forms agree
    torch.testing.assert_close(full(x), dec(x))


def test_key_mapping():
    ours = ManhattanSelfAttention(16, 2).state_dict()
    official = {('lepe.conv.' + k[5:] if k.startswith('lepe.') else k): v for k, v in ours.items()}
    official = {f'layers.0.blocks.1.retention.{k}': v for k, v in official.items()}
    official['layers.0.Relpos.angle'] = torch.ones(8)
    sd = masa_from_official(official, 'layers.0.blocks.1.retention.')
    assert sd.keys() == ours.keys() and all(torch.equal(sd[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match='rotary pairs'):
        ManhattanSelfAttention(15, 5)
