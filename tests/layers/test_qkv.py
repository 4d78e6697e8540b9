"""split_qkv: the same views as view → permute → unbind, with a one-pass backward in eager training."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import get_graph_node_names

from l2vit.layers import fast_paths
from l2vit.layers.qkv import split_qkv, split_qkv_naive


def _backward_node(t: torch.Tensor) -> str:
    return type(t.grad_fn).__name__


@pytest.mark.parametrize('shape, heads', [((3, 49, 72), 3), ((2, 100, 96), 4), ((1, 7, 6), 1)])
def test_same_views_and_gradients_as_unbind(shape, heads):
    qkv = torch.randn(*shape, dtype=torch.float64)
    weights = [torch.randn(shape[0], heads, shape[1], shape[2] // (3 * heads), dtype=torch.float64)
               for _ in range(3)]

    def grad(fn):
        t = qkv.clone().requires_grad_()
        q, k, v = fn(t, heads)
        # q, k, v as an attention would use them (nonlinear, so every element's gradient differs)
        loss = sum(((a * w).sin()).sum() for a, w in zip((q, k, v), weights))
        loss.backward()
        return (q, k, v), t.grad

    (q, k, v), g = grad(split_qkv)
    (q0, k0, v0), g0 = grad(split_qkv_naive)
    assert _backward_node(q) == '_SplitQKVBackward' and _backward_node(q0) == 'UnbindBackward0'
    for a, b in zip((q, k, v), (q0, k0, v0)):
        assert a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
    assert g.shape == qkv.shape and g.is_contiguous()
    assert torch.equal(g, g0)


def test_unused_outputs_get_zero_gradient():
    qkv = torch.randn(2, 10, 24, requires_grad=True)
    q, k, _ = split_qkv(qkv, 2)
    (q * k).sum().backward()
    assert torch.all(qkv.grad[..., 16:] == 0)
    ref = qkv.detach().clone().requires_grad_()
    q0, k0, _ = split_qkv_naive(ref, 2)
    (q0 * k0).sum().backward()
    assert torch.equal(qkv.grad, ref.grad)


def test_double_backward_matches_unbind():
    qkv0 = torch.randn(2, 9, 24, dtype=torch.float64)
    w = torch.randn(2, 9, 24, dtype=torch.float64)

    def grad_of_grad(split):
        qkv = qkv0.clone().requires_grad_()
        q, k, v = split(qkv, 2)
        (g,) = torch.autograd.grad((q * k).sin().sum() + (v ** 3).sum(), qkv, create_graph=True)
        (gg,) = torch.autograd.grad((g * w).sum(), qkv)
        return gg

    torch.testing.assert_close(grad_of_grad(split_qkv), grad_of_grad(split_qkv_naive), rtol=1e-12, atol=1e-12)


def test_plain_views_where_nothing_is_trained_or_fast_paths_are_off():
    qkv = torch.randn(2, 10, 24)
    assert split_qkv(qkv, 2)[0].grad_fn is None  # no gradient asked for
    qkv.requires_grad_()
    with torch.no_grad():
        assert split_qkv(qkv, 2)[0].grad_fn is None
    with fast_paths(False):
        assert _backward_node(split_qkv(qkv, 2)[0]) == 'UnbindBackward0'
    assert _backward_node(split_qkv(qkv, 2)[0]) == '_SplitQKVBackward'


@pytest.mark.parametrize('mixer', ['window', 'linear'])
def test_mixers_train_through_it(mixer):
    from l2vit.layers import create_mixer
    torch.manual_seed(0)
    m = create_mixer(mixer, 32, 2, window_size=4).double()
    x = torch.randn(2, 8, 8, 32, dtype=torch.float64)

    def grads():
        m.zero_grad()
        y = m(x.requires_grad_(False).clone().requires_grad_())
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        return [p.grad.clone() for p in m.parameters()]

    fast = grads()
    with fast_paths(False):
        plain = grads()
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fx_traces_the_plain_views():
    # FX sees the view ops (a proxy cannot take the autograd-function route); the timm contract tests run the
    # traced model's backward
    model = timm.create_model('test_l2vit', num_classes=3).train()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, _ = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    assert any('unbind' in n for n in train_nodes)
    assert not any('SplitQKV' in n for n in train_nodes)
