"""FCViT's token mixer: official fixtures (paper and module-default settings), the context statistics, mapping."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from l2vit.layers.mixers.fcvit import (
    FCViTTokenMixer,
    GlobalContext,
    context_similarity,
    context_similarity_naive,
    fcvit_from_official,
)
from tests.layers.mixers._fixtures import (
    assert_close_abs,
    capture,
    fast_vs_reference,
    fixture_dir,
    load_case,
    state_dict_of,
)

CASES = ['case_paper_14x14', 'case_paper_12x20', 'case_defaults_14x14']


def _build(params, dim):
    gc, sm = params['global_context'], params['spatial_mixer']
    return FCViTTokenMixer(
        dim, kernel_sizes=(sm['mix_size_1'], sm['mix_size_2']), gc_heads=gc['head'], gc_reduction=gc['gc_reduction'],
        compete=gc['compete'], fc_factor=sm['fc_factor'], fc_min_value=sm['fc_min_value'],
        spatial_att=sm['useSpatialAtt'])


@pytest.mark.parametrize('case', CASES)
def test_matches_official_fixture(case):
    meta, t = load_case('fcvit', case)
    kw = meta['constructor_kwargs']
    mixer = _build(kw['params'], kw['dim']).eval()
    mixer.load_state_dict(fcvit_from_official(state_dict_of(t)), strict=True)
    names = {'gc1': 'gc1', 'gc2': 'gc2', 'dw1': 'dw1', 'dw2': 'dw2', 'fc1': 'fc1', 'fc2': 'fc2'}
    if mixer.spatial_att is not None:
        names['spatial_att_in'] = '<spatial_att'
    seen = capture(mixer, names)
    x = t['input']
    with torch.no_grad():
        out = mixer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        assert_close_abs(out, t['output'], atol=3e-5, name='output')

        def dbg(name, actual):
            expected = t[f'debug.{name}']
            assert_close_abs(actual, expected, atol=3e-6 * expected.abs().max().item(), name=name)

        for name in ('gc1', 'gc2', 'dw1', 'dw2', 'fc1', 'fc2'):
            dbg(name, seen[name])
        dbg('mix1_out', F.gelu(seen['fc1']))
        if 'spatial_att_in' in seen:
            dbg('spatial_att_in', seen['spatial_att_in'])
        dbg('gc1_vector', mixer.gc1.context_vector(x.flatten(2).mean(-1)))
        y1 = t['debug.mix1_out']
        dbg('gc2_vector', mixer.gc2.context_vector(y1.flatten(2).mean(-1)))
        B, C, H, W = x.shape
        for gc, src, name in ((mixer.gc1, x, 'sim1'), (mixer.gc2, y1, 'sim2')):
            sim = gc.similarity(src.reshape(B, C, H * W)).reshape(B, -1, H, W)
            expected = t[f'derived.{name}']
            assert_close_abs(sim, expected, atol=3e-6 * expected.abs().max().item(), name=name)


def test_paper_settings_are_the_defaults():
    args = json.loads((fixture_dir('fcvit') / 'paper_models_token_mixer_args.json').read_text())
    ours = FCViTTokenMixer(64)
    official = _build(args['paper_params'], 64)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in official.state_dict().items()}


def test_similarity_matches_reference_and_mixer_grads():
    x = torch.randn(2, 16, 30, dtype=torch.float64)
    torch.testing.assert_close(context_similarity(x, 8), context_similarity_naive(x, 8))
    z = context_similarity(x, 8).flatten(1)
    torch.testing.assert_close(z.mean(-1), torch.zeros(2, dtype=torch.float64))
    mixer = FCViTTokenMixer(32, spatial_att=True, compete=False, kernel_sizes=(5, 7)).double()
    fast_vs_reference(mixer, torch.randn(2, 5, 7, 32, dtype=torch.float64))


def test_bad_dims_and_single_token():
    with pytest.raises(ValueError, match='context heads'):
        FCViTTokenMixer(20)
    with pytest.raises(ValueError, match='kernel_sizes'):
        FCViTTokenMixer(32, kernel_sizes=(4, 5))
    gc = GlobalContext(16)
    assert torch.isfinite(gc(torch.randn(1, 16, 1, 1))).all()
