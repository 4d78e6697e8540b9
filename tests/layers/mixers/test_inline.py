"""InLine attention: official fixtures, fast path vs reference, the dynamic residual and the weights' row sums."""
from __future__ import annotations

import pytest
import torch

from l2vit.layers.mixers.inline import (
    InLineAttention,
    injective_attention_weights,
    injective_linear_attention,
    inline_from_official,
)
from tests.layers.mixers._fixtures import (
    assert_close_abs,
    assert_close_rel_max,
    capture,
    fast_vs_reference,
    load_case,
    state_dict_of,
)


@pytest.mark.parametrize('case', ['inline_swin_14x14', 'inline_pvt_12x20'])
def test_matches_official_fixture(case):
    meta, t = load_case('inline', case)
    kw = meta['constructor_kwargs']
    H, W, C, heads = meta['H'], meta['W'], kw['dim'], kw['num_heads']
    mixer = InLineAttention(C, heads, qkv_bias=kw['qkv_bias']).eval()
    mixer.load_state_dict(inline_from_official(state_dict_of(t)), strict=True)
    seen = capture(mixer, {'q': 'q_probe', 'k': 'k_probe', 'pre_proj': '<proj'})
    x = t['input']
    with torch.no_grad():
        out = mixer(x.reshape(-1, H, W, C)).reshape(x.shape)
        assert_close_abs(out, t['output'], atol=1e-5, rtol=1e-5, name='output')

        def dbg(name, actual):
            assert_close_rel_max(actual, t[f'debug.{name}'], 1e-5, name)

        dbg('q', seen['q'])
        dbg('k', seen['k'])
        v = mixer.qkv(x).chunk(3, dim=-1)[2]
        dbg('v', v.reshape(*v.shape[:2], heads, -1).transpose(1, 2))
        dbg('attn_linear', injective_linear_attention(t['debug.q'], t['debug.k'], t['debug.v'], mixer.scale))
        dbg('kernel_mlp_in', x.mean(dim=1).unsqueeze(-1))
        dbg('dyn_kernel', mixer.dynamic_kernel(x))
        dbg('residual_conv_out', mixer.dynamic_residual(x, v, H, W))
        dbg('pre_proj', seen['pre_proj'])
        weights = injective_attention_weights(t['debug.q'][0].double(), t['debug.k'][0].double(), mixer.scale)
        dbg('attn_matrix_b0', weights)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1], dtype=torch.float64))


@pytest.mark.parametrize('kernel_func', ['identity', 'relu', 'leakyrelu', 'exp'])
def test_fast_path_matches_reference(kernel_func):
    mixer = InLineAttention(32, 2, kernel_func=kernel_func).double()
    fast_vs_reference(mixer, torch.randn(2, 5, 7, 32, dtype=torch.float64))


def test_each_image_uses_its_own_kernel():
    """The residual of an image does not depend on the other images of the batch."""
    mixer = InLineAttention(16, 2).eval()
    x = torch.randn(3, 4, 5, 16)
    with torch.no_grad():
        together = mixer(x)
        alone = torch.cat([mixer(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone)


def test_official_key_mapping_and_errors():
    C = 8
    ours = InLineAttention(C, 2).state_dict()
    pvt = {k: v for k, v in ours.items() if not k.startswith('qkv.')}
    pvt |= {'q.weight': ours['qkv.weight'][:C], 'q.bias': ours['qkv.bias'][:C],
            'kv.weight': ours['qkv.weight'][C:], 'kv.bias': ours['qkv.bias'][C:]}
    sd = inline_from_official({f'block1.0.attn.{k}': v for k, v in pvt.items()}, prefix='block1.0.attn.')
    assert sd.keys() == ours.keys() and all(torch.equal(sd[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match='kernel_func'):
        InLineAttention(C, 2, kernel_func='softmax')
