"""CPE, LCM, stem and downsampling: the official operation order, padding and shapes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from l2vit.layers import ConvPosEnc, ConvStem, Downsample, LocalConcentration


def test_cpe_is_residual_depthwise_conv():
    cpe = ConvPosEnc(8).double()
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    ref = x + F.conv2d(x.permute(0, 3, 1, 2), cpe.proj.weight, cpe.proj.bias, padding=1, groups=8).permute(0, 2, 3, 1)
    torch.testing.assert_close(cpe(x), ref)


def test_cpe_training_adds_in_place_on_the_conv_output_not_a_view():
    cpe = ConvPosEnc(8).double()
    x0 = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    gy = torch.randn(2, 5, 6, 8, dtype=torch.float64)

    def grads(fn):
        cpe.zero_grad()
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.backward(gy)
        return y, [x.grad, cpe.proj.weight.grad, cpe.proj.bias.grad]

    def plain(x):
        return x + F.conv2d(x.permute(0, 3, 1, 2), cpe.proj.weight, cpe.proj.bias, padding=1,
                            groups=8).permute(0, 2, 3, 1)

    y, g = grads(cpe)
    y0, g0 = grads(plain)
    torch.testing.assert_close(y, y0, rtol=0, atol=1e-14)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    # an in-place op on the NHWC view would make autograd copy the gradient (CopySlices / AsStrided nodes)
    nodes, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            todo.extend(n for n, _ in node.next_functions)
    names = {type(n).__name__ for n in nodes}
    assert 'CopySlices' not in names and not any('AsStrided' in n for n in names), names
    assert y.is_contiguous()


def test_lcm_order_is_conv_gelu_bn_conv():
    lcm = LocalConcentration(8).double().eval()
    with torch.no_grad():
        lcm.bn.running_mean.uniform_(-1, 1)
        lcm.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 9, 10, 8, dtype=torch.float64)
    y = x.permute(0, 3, 1, 2)
    y = F.conv2d(y, lcm.conv1.weight, lcm.conv1.bias, padding=3, groups=8)
    y = F.gelu(y)
    y = (y - lcm.bn.running_mean[:, None, None]) / (lcm.bn.running_var[:, None, None] + 1e-5).sqrt()
    y = y * lcm.bn.weight[:, None, None] + lcm.bn.bias[:, None, None]
    y = F.conv2d(y, lcm.conv2.weight, lcm.conv2.bias, padding=3, groups=8)
    torch.testing.assert_close(lcm(x), y.permute(0, 2, 3, 1))


def test_stem_pads_image_to_multiple_of_4():
    stem = ConvStem(3, 16).eval()
    x = torch.randn(1, 3, 197, 171)
    out = stem(x)
    assert out.shape == (1, 50, 43, 16)
    padded = F.pad(x, (0, 1, 0, 3))
    torch.testing.assert_close(out, stem(padded))


def test_downsample_norms_before_padding():
    down = Downsample(8, 16).double()
    with torch.no_grad():
        down.norm.bias.uniform_(-1, 1)  # a non-zero LN bias would leak into padded cells if padding came first
    x = torch.randn(1, 5, 7, 8, dtype=torch.float64)
    out = down(x)
    assert out.shape == (1, 3, 4, 16)
    y = F.pad(down.norm(x).permute(0, 3, 1, 2), (0, 1, 0, 1))
    torch.testing.assert_close(out, F.conv2d(y, down.proj.weight, down.proj.bias, stride=2).permute(0, 2, 3, 1))


def test_stem_training_relu_in_place_keeps_gradients_and_running_stats():
    torch.manual_seed(0)
    stem = ConvStem(3, 16).double().train()
    plain = ConvStem(3, 16).double().train()
    plain.load_state_dict(stem.state_dict())
    x = torch.randn(2, 3, 20, 24, dtype=torch.float64)
    gy = torch.randn(2, 5, 6, 16, dtype=torch.float64)

    def run(m, forward):
        xi = x.clone().requires_grad_()
        y = forward(m, xi)
        y.backward(gy)
        return y, [xi.grad] + [p.grad for p in m.parameters()] + [m.bn1.running_mean, m.bn1.running_var]

    def reference(m, xi):  # the official order, out of place
        h = F.relu(m.bn1(m.conv1(xi)))
        return m.norm(m.bn2(m.conv2(h)).permute(0, 2, 3, 1))

    y, got = run(stem, lambda m, xi: m(xi))
    y0, want = run(plain, reference)
    assert y.grad_fn is not None
    torch.testing.assert_close(y, y0, rtol=0, atol=1e-13)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the ReLU ran in place on the BatchNorm's output
    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        stem(x.clone().requires_grad_())
    assert 'relu_.default' in ops and 'relu.default' not in ops


def test_cpe_traced_graph_keeps_the_plain_residual():
    # compilers and exporters see x + permute(conv(permute(x))) in NHWC, as always: an add on the conv's own output
    # lets inductor fuse it into a frozen half-precision convolution, in that precision (it flipped a bf16 answer)
    cpe = ConvPosEnc(8)
    gm = torch.fx.symbolic_trace(cpe)
    adds = [n for n in gm.graph.nodes if n.op == 'call_function' and 'add' in getattr(n.target, '__name__', '')]
    assert len(adds) == 1 and adds[0].target.__name__ == 'add'  # out of place
    placeholder = next(n for n in gm.graph.nodes if n.op == 'placeholder')
    assert placeholder in adds[0].args  # the residual is the NHWC input itself
    x = torch.randn(2, 5, 6, 8)
    torch.testing.assert_close(gm(x), cpe(x))
