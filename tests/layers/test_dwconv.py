"""l2vit's depth-wise convolution weight-gradient kernel and the training route through it, against PyTorch's own
convolution (the naive twin) and a float64 reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2vit.csrc import cpu_kernels
from l2vit.layers import LocalConcentration, depthwise_conv2d, depthwise_weight_grad, fast_paths
from l2vit.layers import dwconv as dwconv_mod
from tests.helpers import torch_threads


@pytest.fixture(scope='module', autouse=True)
def kernels():
    """The kernels must build on the project's machines (g++ and ninja are part of its setup): fail, don't skip."""
    module = cpu_kernels()
    assert module is not None, 'l2vit CPU kernels did not build (see the RuntimeWarning above)'
    return module


def _channels_last(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _reference_weight_grad(x, gy, k):
    c = x.shape[1]
    return torch.nn.grad.conv2d_weight(x.double(), (c, 1, k, k), gy.double(), padding=k // 2, groups=c)


# channels that fill 16-wide blocks, that leave a tail, fewer than one block; odd, non-square grids smaller than the
# kernel; batches smaller and larger than the thread count
@pytest.mark.parametrize('k', [3, 5, 7])
@pytest.mark.parametrize('shape', [(2, 32, 9, 13), (3, 21, 6, 5), (1, 7, 2, 3), (5, 40, 7, 7)])
def test_weight_grad_matches_float64(k, shape):
    torch.manual_seed(0)
    x, gy = _channels_last(*shape), _channels_last(*shape)
    ours = depthwise_weight_grad(x, gy, k)
    ref = _reference_weight_grad(x, gy, k)
    native = torch.nn.grad.conv2d_weight(x, ref.shape, gy, padding=k // 2, groups=shape[1])
    assert ours.shape == ref.shape == (shape[1], 1, k, k) and ours.dtype == torch.float32
    scale = ref.abs().max()
    assert (ours.double() - ref).abs().max() / scale < 2e-6
    # at least as accurate as PyTorch's own (with a little slack for ties in rounding)
    assert (ours.double() - ref).abs().max() <= 1.5 * (native.double() - ref).abs().max() + 1e-6 * scale


def test_weight_grad_any_layout_and_threads():
    torch.manual_seed(1)
    x, gy = torch.randn(4, 48, 11, 10), torch.randn(4, 48, 11, 10)  # NCHW-contiguous: copied to channels last
    ref = _reference_weight_grad(x, gy, 7)
    for threads in (1, 2):
        with torch_threads(threads):
            assert (depthwise_weight_grad(x, gy, 7).double() - ref).abs().max() / ref.abs().max() < 2e-6


def test_weight_grad_bad_input(kernels):
    x = _channels_last(2, 8, 5, 5)
    with pytest.raises(ValueError, match=r'one \(B, C, H, W\) shape'):
        depthwise_weight_grad(x, _channels_last(2, 8, 5, 6), 7)
    with pytest.raises(RuntimeError, match='kernel size of 3, 5 or 7'):
        depthwise_weight_grad(x, x, 9)
    with pytest.raises(RuntimeError, match='expected float32'):
        depthwise_weight_grad(x.double(), x.double(), 7)


def _grads(conv, x, gy, fast):
    conv.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with fast_paths(fast):
        y = depthwise_conv2d(conv, x)
    assert isinstance(y.grad_fn, dwconv_mod._DepthwiseConv2d._backward_cls) == fast, 'route taken iff fast'
    y.backward(gy)
    return y.detach(), x.grad, conv.weight.grad, conv.bias.grad


@pytest.mark.parametrize('k', [5, 7])
def test_autograd_matches_native(k):
    torch.manual_seed(2)
    conv = nn.Conv2d(24, 24, k, padding=k // 2, groups=24)
    x, gy = _channels_last(3, 24, 10, 12), _channels_last(3, 24, 10, 12)
    fast = _grads(conv, x, gy, True)
    plain = _grads(conv, x, gy, False)
    assert torch.equal(fast[0], plain[0])  # same forward
    assert torch.equal(fast[1], plain[1])  # same (oneDNN) input gradient
    for a, b in zip(fast[2:], plain[2:]):
        assert (a - b).abs().max() <= 2e-6 * b.abs().max()


def test_weight_only_and_no_bias():
    torch.manual_seed(3)
    conv = nn.Conv2d(16, 16, 7, padding=3, groups=16, bias=False)
    x = _channels_last(2, 16, 8, 8)  # no gradient wanted for the input
    y = depthwise_conv2d(conv, x)
    assert isinstance(y.grad_fn, dwconv_mod._DepthwiseConv2d._backward_cls)
    y.square().sum().backward()
    ref = torch.nn.grad.conv2d_weight(x, conv.weight.shape, 2 * y.detach(), padding=3, groups=16)
    assert (conv.weight.grad - ref).abs().max() <= 2e-6 * ref.abs().max()


def _route(conv, x):
    return dwconv_mod._fast_route(conv, x)


def test_route_only_where_it_changes_nothing_but_speed():
    conv = nn.Conv2d(16, 16, 7, padding=3, groups=16)
    x = _channels_last(2, 16, 8, 8)
    assert _route(conv, x)
    assert not _route(conv, x.contiguous())  # NCHW
    assert not _route(conv.double(), x.double())
    conv.float()
    with torch.no_grad():
        assert not _route(conv, x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not _route(conv, x)
    assert not _route(nn.Conv2d(16, 16, 3, padding=1, groups=16), x)  # 3×3: oneDNN's own is as fast
    assert not _route(nn.Conv2d(16, 16, 7, padding=2, groups=16), x)
    assert not _route(nn.Conv2d(16, 16, 7, padding=3, groups=16, stride=2), x)
    assert not _route(nn.Conv2d(16, 16, 7, padding=3, groups=8), x)
    assert not _route(nn.Conv2d(16, 16, 7, padding=3, groups=16, padding_mode='reflect'), x)
    handle = conv.register_forward_hook(lambda *a: None)
    assert not _route(conv, x)
    handle.remove()
    conv.weight.requires_grad_(False)
    assert not _route(conv, x)


def test_compile_sees_plain_convolution():
    conv = nn.Conv2d(8, 8, 7, padding=3, groups=8)
    x = _channels_last(1, 8, 6, 6)
    compiled = torch.compile(lambda t: depthwise_conv2d(conv, t), backend='eager', fullgraph=True)
    y = compiled(x)
    assert torch.allclose(y, conv(x), atol=1e-6)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv('L2VIT_CPU_KERNELS', '0')
    conv = nn.Conv2d(16, 16, 7, padding=3, groups=16)
    assert not _route(conv, _channels_last(2, 16, 8, 8))
    with pytest.raises(RuntimeError, match='not available'):
        depthwise_weight_grad(_channels_last(1, 4, 3, 3), _channels_last(1, 4, 3, 3), 7)


def test_lcm_training_gradients_match_plain():
    """The whole LCM (conv, GELU, BatchNorm in training mode, conv) through the route and through the plain
    forward: identical outputs and input gradients; parameter gradients as close to a float64 run as the plain
    ones (the bias gradients here are sums with cancellation, so both differ from float64 by float32 rounding)."""
    import copy
    torch.manual_seed(4)
    lcm = LocalConcentration(32, 7).train()
    x = torch.randn(2, 9, 11, 32)
    results = []
    for fast, dtype in ((True, torch.float32), (False, torch.float32), (False, torch.float64)):
        m = copy.deepcopy(lcm).to(dtype)
        xi = x.to(dtype).clone().requires_grad_()
        with fast_paths(fast):
            y = m(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y1, gx1, gp1), (y2, gx2, gp2), (_, _, gp64) = results
    assert torch.equal(y1, y2)
    assert (gx1 - gx2).abs().max() <= 1e-6 * gx2.abs().max()
    for name, ref in gp64.items():
        scale = ref.abs().max()
        err_fast = (gp1[name].double() - ref).abs().max()
        err_plain = (gp2[name].double() - ref).abs().max()
        assert err_fast <= 2 * err_plain + 1e-6 * scale, (name, err_fast, err_plain)


def test_double_backward_is_refused():
    conv = nn.Conv2d(8, 8, 7, padding=3, groups=8)
    x = _channels_last(1, 8, 6, 6).requires_grad_()
    y = depthwise_conv2d(conv, x)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable|double backward|differentiable'):
        g.sum().backward()


def test_plain_conv_shape_contract():
    # the route returns what conv(x) returns: the same shape, layout and dtype
    conv = nn.Conv2d(16, 16, 5, padding=2, groups=16)
    x = _channels_last(2, 16, 8, 7).requires_grad_()
    y = depthwise_conv2d(conv, x)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=2, groups=16)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
