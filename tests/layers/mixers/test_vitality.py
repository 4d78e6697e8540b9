"""ViTALiTy's Taylor attention: official fixtures (eval and train-mode quantiser), reference, quantiser details."""
from __future__ import annotations

import pytest
import torch

from l2vit.layers.mixers.vitality import (
    FakeQuantize,
    TaylorAttention,
    fake_quantize,
    taylor_lowrank_attention,
    vitality_from_official,
    vitality_sparse_weights,
)
from tests.layers.mixers._fixtures import assert_close_abs, capture, fast_vs_reference, load_case, state_dict_of

CASES = ['case_eval_197', 'case_eval_241', 'case_train_197']


def _rel(actual, expected, name, rel=2e-6):
    assert_close_abs(actual, expected, atol=rel * expected.abs().max().item(), name=name)


@pytest.mark.parametrize('case', CASES)
def test_matches_official_fixture(case):
    meta, t = load_case('vitality', case)
    kw = meta['constructor_kwargs']
    C, heads = kw['dim'], kw['num_heads']
    mixer = TaylorAttention(C, heads, qkv_bias=kw['qkv_bias'])
    mixer.train(meta['mode'].startswith('train'))
    official = state_dict_of(t)
    assert 'quant_16.running_range' in official
    mixer.load_state_dict(vitality_from_official(official), strict=True)
    quantised = []
    mixer.quant.register_forward_hook(lambda m, a, o: quantised.append(o.detach()))
    seen = capture(mixer, {'q': 'q_probe', 'pre_proj': '<proj'})
    x = t['input']  # (B, N, C) with a CLS token: the mixer has no spatial notion, so a 1 x N grid carries it
    with torch.no_grad():
        out = mixer(x.unsqueeze(1)).squeeze(1)
    _rel(out, t['output'], 'output')
    _rel(seen['pre_proj'].reshape(t['output_attn'].transpose(1, 2).shape).transpose(1, 2), t['output_attn'], 'attn')
    _rel(seen['q'], t['debug.q'], 'q')
    assert_close_abs(quantised[0], t['debug.quant_q'], atol=1e-6, name='quant_q')
    assert_close_abs(quantised[1], t['debug.quant_k'], atol=1e-6, name='quant_k')
    weights = vitality_sparse_weights(t['debug.quant_q'], t['debug.quant_k'], mixer.scale)
    assert torch.equal((weights > 0).to(torch.uint8), t['derived.sparse_mask'])
    _rel(weights @ t['debug.v'], t['derived.sparse_v'], 'sparse_v')
    k_hat = t['debug.k'] - t['debug.k'].mean(dim=-1, keepdim=True)
    _rel(k_hat.transpose(-2, -1) @ t['debug.v'], t['derived.kv'], 'kv')
    if 'buffers_after.quant.running_range' in t:  # train mode: batch statistics, buffers updated twice
        for name in ('running_zero_point', 'running_range'):
            assert_close_abs(getattr(mixer.quant, name), t[f'buffers_after.quant.{name}'], atol=1e-6, name=name)
    else:
        # the paper's inference form (low-rank only) in the code's conventions
        lowrank = TaylorAttention(C, heads, qkv_bias=kw['qkv_bias'], sparse=False).eval()
        lowrank.load_state_dict(mixer.state_dict())
        with torch.no_grad():
            _rel(lowrank(x.unsqueeze(1)).squeeze(1), t['derived.lowrank_only_output'], 'lowrank_only_output')
        lr = taylor_lowrank_attention(t['debug.q'], k_hat, t['debug.v'])
        _rel((weights @ t['debug.v'] + lr) * mixer.scale, t['output_attn'], 'attn from official q/k/v')


@pytest.mark.parametrize('sparse', [True, False], ids=['sparse', 'lowrank'])
def test_fast_path_matches_reference(sparse):
    mixer = TaylorAttention(32, 2, sparse=sparse).double().train()
    fast_vs_reference(mixer, torch.randn(2, 5, 7, 32, dtype=torch.float64))


def test_fake_quantize():
    x = torch.tensor([-1., -0.5, 0.24, 0.26, 2., 9.], requires_grad=True)
    z, r = torch.tensor(-1.), torch.tensor(1.5)  # step 0.1, levels 0..15
    out = fake_quantize(x, z, r)
    torch.testing.assert_close(out, torch.tensor([-1., -0.5, 0.2, 0.3, 0.5, 0.5]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones(6))  # straight-through
    # round half to even, with step 1: 0.5 -> 0 and 1.5 -> 2
    torch.testing.assert_close(fake_quantize(torch.tensor([0.5, 1.5]), torch.tensor(0.), torch.tensor(15.)),
                               torch.tensor([0., 2.]))


def test_quantiser_statistics():
    quant = FakeQuantize()
    x = torch.tensor([[-2., 1.], [0., 6.]])
    quant.train()(x)
    torch.testing.assert_close(quant.running_zero_point.flatten(), torch.tensor([-0.2]))
    torch.testing.assert_close(quant.running_range.flatten(), torch.tensor([0.8]))
    before = quant.running_range.clone()
    quant.eval()(x)
    assert torch.equal(quant.running_range, before)
    mixer = TaylorAttention(16, 2).eval()  # fresh buffers: degenerate but finite, as officially
    assert torch.isfinite(mixer(torch.randn(1, 4, 4, 16))).all()
    assert vitality_from_official({'quant_16.running_range': torch.zeros(1, 1, 1), 'qkv.weight': torch.zeros(1)}) \
        .keys() == {'qkv.weight'}
