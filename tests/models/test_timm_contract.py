"""timm's model contract, for every registered l2vit model.

Mirrors what timm's own ``tests/test_models.py`` checks of a model (forward, backward, default cfgs, features_only
in every feature_cls, forward_intermediates, FX forward/backward, TorchScript), with its input-size caps, plus the
rest of the API (prune_intermediate_layers, reset_classifier, grad checkpointing, group_matcher,
no_weight_decay). The full-size variants run at reduced resolution, as upstream does.
"""
from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules, set_layer_config
from timm.optim import param_groups_weight_decay
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

# the full-size S/B/B-384 variants run every check too, in the slow suite (`make test-slow`, run by CI)
_BIG = ('l2vit_small', 'l2vit_base')
MODELS = [pytest.param(n, marks=pytest.mark.slow) if n.startswith(_BIG) else n for n in timm.list_models('*l2vit*')]
TAGS = [pytest.param(n, marks=pytest.mark.slow) if n.startswith(_BIG) else n
        for n in timm.list_models('*l2vit*', include_tags=True)]
TARGET_FWD_SIZE, TARGET_BWD_SIZE, TARGET_FFEAT_SIZE, TARGET_FX_SIZE, TARGET_JIT_SIZE = 384, 128, 96, 128, 128


def _input_size(model, target=None):
    """timm's rule: the cfg input size, scaled down (keeping aspect) until the longer side is <= target."""
    size = model.pretrained_cfg['input_size']
    if target is None or max(size[1:]) <= target:
        return size
    scale = target / max(size[1:])
    return (size[0], *(int(round(s * scale)) for s in size[1:]))


def test_all_variants_registered():
    assert {'l2vit_tiny', 'l2vit_small', 'l2vit_base', 'l2vit_base_384', 'test_l2vit'} <= set(timm.list_models())
    assert set(timm.list_models('l2vit_base*', include_tags=True)) == {
        'l2vit_base.orig_in1k', 'l2vit_base.orig_in22k', 'l2vit_base.orig_in22k_ft_in1k',
        'l2vit_base_384.orig_in22k_ft_in1k'}


@pytest.mark.parametrize('name', MODELS)
def test_model_forward(name):
    model = timm.create_model(name).eval()
    x = torch.randn(2, *_input_size(model, TARGET_FWD_SIZE))
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', MODELS)
def test_model_backward(name):
    model = timm.create_model(name, num_classes=42).train()
    x = torch.randn(2, *_input_size(model, TARGET_BWD_SIZE))
    out = model(x)
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f'parameters without gradient: {no_grad}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('name', TAGS)
def test_model_default_cfgs(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    for key in ('input_size', 'pool_size', 'crop_pct', 'interpolation', 'mean', 'std', 'first_conv', 'classifier',
                'paper_ids', 'paper_name', 'origin_url'):
        assert cfg.get(key), f'pretrained_cfg lacks {key}'
    assert cfg['paper_ids'] == 'arXiv:2501.16182' and cfg['interpolation'] == 'bicubic'
    assert model.num_classes == cfg['num_classes'] and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        feat = model.forward_features(x)  # NHWC
        assert feat.shape[1:3] == cfg['pool_size'] and feat.shape[-1] == model.num_features
        assert model.forward_head(feat, pre_logits=True).shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.head_hidden_size)
        model.reset_classifier(0, '')
        assert model(x).shape == (1, *cfg['pool_size'], model.num_features)
        no_head = timm.create_model(name, num_classes=0, global_pool='').eval()
        assert no_head(x).shape == (1, *cfg['pool_size'], no_head.num_features)
    state_dict = timm.create_model(name, device='meta').state_dict()
    assert cfg['classifier'] + '.weight' in state_dict and cfg['first_conv'] + '.weight' in state_dict


@pytest.mark.parametrize('feature_cls', ['getter', 'list', 'dict', 'hook', 'fx'])
@pytest.mark.parametrize('name', MODELS)
def test_model_forward_features(name, feature_cls):
    model = timm.create_model(name, features_only=True, feature_cls=feature_cls).eval()
    assert model.feature_info.channels() == [f['num_chs'] for f in timm.create_model(name, device='meta').feature_info]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    size = _input_size(timm.create_model(name, device='meta'), TARGET_FFEAT_SIZE)
    with torch.no_grad():
        outs = model(torch.randn(1, *size))
    outs = list(outs.values()) if isinstance(outs, dict) else outs
    assert len(outs) == 4
    # as in timm: the default 'getter' returns NCHW; module-output wrappers return the model's own NHWC layout,
    # which they declare in output_fmt
    fmt = str(getattr(model, 'output_fmt', 'NCHW')).split('.')[-1]
    assert fmt == ('NCHW' if feature_cls == 'getter' else 'NHWC')
    c_axis, h_axis = (1, 2) if fmt == 'NCHW' else (3, 1)
    for o, c, r in zip(outs, model.feature_info.channels(), model.feature_info.reduction()):
        assert o.shape[c_axis] == c
        assert o.shape[h_axis] <= math.ceil(size[1] / r) + 1 and o.shape[h_axis + 1] <= math.ceil(size[2] / r) + 1
        assert torch.isfinite(o).all()


def test_features_only_out_indices():
    model = timm.create_model('l2vit_tiny', features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.channels() == [192, 768] and model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 128, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 192, 16, 12), (1, 768, 4, 3)]


@pytest.mark.parametrize('name', MODELS)
def test_model_forward_intermediates(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(model, TARGET_FFEAT_SIZE))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 4
        for t, info in zip(inter, model.feature_info):
            assert t.shape[1] == info['num_chs'] and t.is_contiguous()
            assert t.shape[2] == math.ceil(x.shape[2] / info['reduction'])
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        model.set_grad_checkpointing()
        final2, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final2, final, rtol=1e-4, atol=1e-5)
        last_n = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last_n] == [f['num_chs'] for f in model.feature_info[2:]]
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed, final.permute(0, 3, 1, 2))
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[0])


def test_prune_intermediate_layers():
    model = timm.create_model('test_l2vit').eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
        assert model.prune_intermediate_layers(indices=[1], prune_norm=True) == [1]
        assert len(model.stages) == 2 and model.num_classes == 0
        pruned = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    torch.testing.assert_close(pruned[0], full[1])


def _fx_model(model):
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    )


@pytest.mark.parametrize('name', MODELS)
def test_model_forward_fx(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(model, TARGET_FX_SIZE))
    with torch.no_grad():
        eager = model(x)
        fx_model = _fx_model(model)
        out = fx_model(x)
    out = tuple(out.values())[0] if isinstance(out, dict) else out
    # eager inference takes the fused/chunked fast paths (same values up to float rounding), FX the plain forward
    torch.testing.assert_close(out, eager)


@pytest.mark.parametrize('name', MODELS)
def test_model_backward_fx(name):
    model = timm.create_model(name, num_classes=42).train()
    fx_model = _fx_model(model).train()
    out = fx_model(torch.randn(2, *_input_size(model, TARGET_FX_SIZE)))
    out = tuple(out.values())[0] if isinstance(out, dict) else out
    out.mean().backward()
    no_grad = [n for n, p in fx_model.named_parameters() if p.grad is None]
    assert not no_grad, f'parameters without gradient through FX: {no_grad}'


def test_api_methods():
    model = timm.create_model('test_l2vit')
    assert model.get_classifier() is model.head.fc
    assert model.no_weight_decay() == set()
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    coarse = model.group_matcher(coarse=True)
    assert set(coarse) == {'stem', 'blocks'}
    model.reset_classifier(5, 'avg')
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    # timm's optimizer factory applies the official weight-decay rule: 1-D params and biases are not decayed,
    # the (heads, 1, 1) temperatures are
    param_groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    decayed = {id(p) for g in param_groups if g['weight_decay'] > 0 for p in g['params']}
    temperature = model.stages[0].blocks[1].attn.temperature
    assert id(temperature) in decayed and id(model.stem.norm.weight) not in decayed




@pytest.mark.parametrize('name', MODELS)
def test_model_forward_torchscript(name):
    with set_layer_config(scriptable=True):
        model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(model, TARGET_JIT_SIZE))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script is deprecated in torch 2.14 but still what timm tests
        scripted = torch.jit.script(model)
    with torch.no_grad():
        out = scripted(x)
        torch.testing.assert_close(out, model(x))
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()
