"""Numerical identity with the official implementation, on the oracle data in ../shared/fixtures/official.

Each case holds official-named weights, an input and the official model's outputs. The weights go through
``checkpoint_filter_fn``, the conversion users use for official checkpoints; we compare logits, the four stage
outputs, the pooled features and (cases d, e) every embedding and block output, at the fixtures' tolerance
``max|err| <= 5e-6 * max(1, max|expected|)``.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from l2vit import L2ViT, checkpoint_filter_fn
from tests.helpers import OFFICIAL_CASES, assert_within, require_official_fixtures


def _load_case(name: str):
    root = require_official_fixtures()
    meta = json.loads((root / f'{name}.json').read_text())
    tensors = load_file(root / f'{name}.safetensors')
    state_dict = {k.removeprefix('state_dict.'): v for k, v in tensors.items() if k.startswith('state_dict.')}
    return meta, tensors, state_dict


def _build(meta: dict, state_dict: dict, **overrides) -> L2ViT:
    kw = meta['constructor_kwargs']
    assert kw['block_type'] == 'mix_local_enhanced_vit' and kw['conv_stem'] and kw['conv_stem_type'] == '2L'
    model = L2ViT(
        in_chans=kw['in_chans'],
        num_classes=kw['num_classes'],
        depths=kw['depths'],
        dims=kw['dims'],
        num_heads=kw['num_heads'],
        window_size=kw['window_size'],
        mlp_ratio=kw['mlp_ratio'],
        drop_path_rate=kw['drop_path_rate'],
        **overrides,
    )
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    return model.eval()


def _tokens(x_nchw: torch.Tensor) -> torch.Tensor:
    return x_nchw.flatten(2).transpose(1, 2)  # B, H*W, C in row-major grid order, as the fixtures store them


@pytest.mark.parametrize('case', OFFICIAL_CASES)
@pytest.mark.parametrize('fused_attn', [True, False], ids=['sdpa', 'explicit'])
def test_matches_official_outputs(case, fused_attn):
    meta, tensors, state_dict = _load_case(case)
    model = _build(meta, state_dict)
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = fused_attn
    with torch.no_grad():
        final, stages = model.forward_intermediates(tensors['input'])
        pooled = model.forward_head(final, pre_logits=True)
        logits = model.forward_head(final)
        logits_direct = model(tensors['input'])
    assert_within(logits, tensors['logits'], name='logits')
    assert_within(logits_direct, tensors['logits'], name='logits (forward)')
    assert_within(pooled, tensors['features'], name='features')
    for i, stage in enumerate(stages):
        assert list(stage.shape[2:]) == meta['stage_token_grid_hw'][f'stage{i}']
        assert_within(_tokens(stage), tensors[f'stage{i}'], name=f'stage{i}')


@pytest.mark.parametrize('case', [c for c in OFFICIAL_CASES if 'deep' in c])
def test_matches_official_block_outputs(case):
    """Cases d and e store every embedding and block output: odd depths, window/linear order, stem padding."""
    meta, tensors, state_dict = _load_case(case)
    model = _build(meta, state_dict)
    captured = {}

    def keep(name):
        def hook(module, args, output):
            captured[name] = output.reshape(output.shape[0], -1, output.shape[-1])  # NHWC -> B, N, C
        return hook

    model.stem.register_forward_hook(keep('debug.embed0'))
    for i, stage in enumerate(model.stages):
        if i > 0:
            stage.downsample.register_forward_hook(keep(f'debug.embed{i}'))
        for j, block in enumerate(stage.blocks):
            block.register_forward_hook(keep(f'debug.stage{i}.block{j}'))
    with torch.no_grad():
        model(tensors['input'])
    debug_names = sorted(k for k in tensors if k.startswith('debug.'))
    assert sorted(captured) == debug_names
    for name in debug_names:
        assert_within(captured[name], tensors[name], name=name)


def test_block_types_follow_the_official_alternation():
    meta, _, state_dict = _load_case('case_deep_160')
    model = _build(meta, state_dict)
    mixers = [[b.mixer for b in s.blocks] for s in model.stages]
    assert mixers == [['window'], ['window'], ['window', 'linear', 'window'], ['window']]


def test_deliberate_mistakes_are_caught():
    """The comparison is sharp enough to see the fixtures' listed mistakes (here: a clamp of 1 and masking)."""
    meta, tensors, state_dict = _load_case('case_small_pad')
    for wrong in (dict(clamp_min=1.0), dict(mask_padding=True)):
        model = _build(meta, state_dict, **wrong)
        with torch.no_grad():
            logits = model(tensors['input'])
        with pytest.raises(AssertionError, match='exceeds tolerance'):
            assert_within(logits, tensors['logits'])
