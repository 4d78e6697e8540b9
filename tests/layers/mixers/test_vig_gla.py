"""ViG's bidirectional GLA: official fixtures, chunked scan vs token-by-token recurrence, stability."""
from __future__ import annotations

import pytest
import torch

from l2vit.layers.mixers.vig_gla import (
    BidirectionalGatedLinearAttention,
    bidirectional_gla,
    gated_linear_attention_chunked,
    gated_linear_attention_recurrent,
    gla_log_decay,
    vig_gla_from_official,
)
from tests.layers.mixers._fixtures import (
    assert_close_abs,
    assert_close_rel_max,
    capture,
    fast_vs_reference,
    load_case,
    state_dict_of,
)

CASES = ['gla2d_vigh_14x14', 'gla2d_vigh_12x20', 'gla_plain_vigt_14x14']


def _build(meta):
    kw = meta['constructor_kwargs_effective']
    return BidirectionalGatedLinearAttention(
        kw['d_model'], kw['num_heads'], expand_k=kw['expand_k'], gate_low_rank_dim=kw['gate_low_rank_dim'],
        gate_logit_normalizer=kw['gate_logit_normalizer'], norm_eps=kw['layernorm_eps'],
        use_act_in_conv=kw['use_act_in_conv'], use_out_act=kw['use_out_act'],
        halve_in_eval=meta['official_class'] == 'GatedLinearAttention')


@pytest.mark.parametrize('case', CASES)
def test_matches_official_fixture(case):
    meta, t = load_case('vig', case)
    H, W = meta['grid_hw']
    mixer = _build(meta).eval()
    mixer.load_state_dict(vig_gla_from_official(state_dict_of(t)), strict=True)
    seen = capture(mixer, {'local': 'in_proj', 'q': 'q_probe', 'k': 'k_probe', 'mixed': '<o_proj'})
    x = t['input']
    channel_first = x.dim() == 4
    with torch.no_grad():
        out = mixer(x.permute(0, 2, 3, 1) if channel_first else x.reshape(x.shape[0], H, W, -1))
        out = out.permute(0, 3, 1, 2) if channel_first else out.reshape(x.shape)
        assert_close_abs(out, t['output'], atol=1e-5, rtol=1e-5, name='output')

        def dbg(name, actual):
            assert_close_rel_max(actual, t[f'debug.{name}'], 1e-5, name)

        local = seen['local'].flatten(2).transpose(1, 2)
        dbg('local_out', local)
        dbg('q', seen['q'])
        dbg('k', seen['k'])
        v = mixer.qkv_proj(local)[..., 2 * mixer.key_dim:]
        dbg('v', v.reshape(*v.shape[:2], mixer.num_heads, -1).transpose(1, 2))
        g_fwd, g_bwd = gla_log_decay(mixer.gk_proj(local)).chunk(2, dim=-1)
        dbg('log_decay_fw', g_fwd.reshape(*g_fwd.shape[:2], mixer.num_heads, -1).transpose(1, 2))
        dbg('log_decay_bw', g_bwd.reshape(*g_bwd.shape[:2], mixer.num_heads, -1).transpose(1, 2))
        q = t['debug.q'] * mixer.scale
        k, v, lf, lb = t['debug.k'], t['debug.v'], t['debug.log_decay_fw'], t['debug.log_decay_bw']
        dbg('attn_fwd', gated_linear_attention_chunked(q, k, v, lf))
        dbg('attn_bwd', gated_linear_attention_chunked(q.flip(2), k.flip(2), v.flip(2), lb.flip(2)).flip(2))
        dbg('attn_out', bidirectional_gla(q, k, v, lf, lb))
        dbg('gate', torch.sigmoid(mixer.g_proj(local)))
        dbg('mixed', seen['mixed'])


@pytest.mark.parametrize('chunk_size', [1, 5, 32])
@pytest.mark.parametrize('n', [1, 13, 40])
def test_chunked_scan_matches_recurrence(n, chunk_size):
    q, k = torch.randn(2, 3, n, 4, dtype=torch.float64), torch.randn(2, 3, n, 4, dtype=torch.float64)
    v = torch.randn(2, 3, n, 6, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(2, 3, n, 4, dtype=torch.float64) * 3 - 1)
    params = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), g.requires_grad_()]
    fast = gated_linear_attention_chunked(q, k, v, g, chunk_size)
    ref = gated_linear_attention_recurrent(q, k, v, g)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(torch.autograd.grad(fast.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(a, b)


def test_strong_decays_stay_finite():
    """Per-token log decays down to -5 (gate logits near -80) over a 32-token chunk: finite and exact."""
    q, k, v = (torch.randn(1, 1, 64, 4) for _ in range(3))
    g = torch.full((1, 1, 64, 4), -5.0)
    fast = gated_linear_attention_chunked(q, k, v, g)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, gated_linear_attention_recurrent(q, k, v, g), atol=1e-5, rtol=1e-5)


def test_fast_path_matches_reference():
    mixer = BidirectionalGatedLinearAttention(32, 2, chunk_size=8).double()
    with torch.no_grad():
        mixer.gk_proj[1].bias.uniform_(-4, 2)
    fast_vs_reference(mixer, torch.randn(2, 5, 7, 32, dtype=torch.float64))


def test_plain_vig_halves_only_in_eval():
    mixer = BidirectionalGatedLinearAttention(16, 1, halve_in_eval=True)
    twin = BidirectionalGatedLinearAttention(16, 1)
    twin.load_state_dict(mixer.state_dict())
    x = torch.randn(1, 4, 4, 16)
    torch.testing.assert_close(mixer.train()(x), twin.train()(x))
    assert not torch.allclose(mixer.eval()(x), twin.eval()(x))


def test_key_mapping_rejects_unsupported_options():
    sd = BidirectionalGatedLinearAttention(16, 2).state_dict()
    assert vig_gla_from_official({f'layers.0.blocks.1.op.{k}': v for k, v in sd.items()},
                                 'layers.0.blocks.1.op.').keys() == sd.keys()
    with pytest.raises(ValueError, match='rope / dirpe'):
        vig_gla_from_official(sd | {'dirpe.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match='key width'):
        BidirectionalGatedLinearAttention(12, 4)
