"""Every registered token mixer: the contract, and the fast path against its plain reference (values and grads)."""
from __future__ import annotations

import pytest
import torch

from l2vit.layers import (
    TEMPERATURE_PLACEMENTS,
    LinearGlobalAttention,
    LocalWindowAttention,
    create_mixer,
    fast_paths,
    get_mixer,
    linear_attention,
    linear_attention_naive,
    list_mixers,
    register_mixer,
    softmax_attention_naive,
    window_partition,
    window_reverse,
)
from l2vit.layers.padding import pad_nhwc_to_multiple

GRIDS = [(14, 14), (12, 20), (7, 9), (3, 3), (1, 1)]


def test_registry():
    assert {'window', 'linear', 'softmax'} <= set(list_mixers())
    assert get_mixer('window').is_local and not get_mixer('linear').is_local
    with pytest.raises(ValueError, match="unknown token mixer 'flash'; expected one of"):
        get_mixer('flash')
    with pytest.raises(ValueError, match='already registered'):
        register_mixer('window', local=True)(type('Other', (torch.nn.Module,), {}))


@pytest.mark.parametrize('grid', GRIDS, ids=lambda g: f'{g[0]}x{g[1]}')
@pytest.mark.parametrize('name', list_mixers())
def test_mixer_contract(name, grid):
    mixer = create_mixer(name, 32, 2, window_size=7)
    x = torch.randn(2, *grid, 32, requires_grad=True)
    out = mixer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())
    assert torch.isfinite(x.grad).all()


def _heads(mixer, x):
    """The mixer's own q, k, v for tokens ``x`` (B, N, C) -> (B, heads, N, d) each."""
    B, N, C = x.shape
    qkv = mixer.qkv(x).reshape(B, N, 3, mixer.num_heads, mixer.head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _grads(out, params):
    return torch.autograd.grad(out.square().sum(), params)


@pytest.mark.parametrize('grid', GRIDS, ids=lambda g: f'{g[0]}x{g[1]}')
@pytest.mark.parametrize('fused', [True, False], ids=['sdpa', 'explicit'])
def test_window_attention_matches_reference(grid, fused):
    torch.manual_seed(0)
    mixer = LocalWindowAttention(32, 2, window_size=7).double()
    mixer.fused_attn = fused
    x = torch.randn(2, *grid, 32, dtype=torch.float64)
    out = mixer(x)

    # reference: pad, cut windows, explicit softmax per window, stitch back, crop
    ws = 7
    xp = pad_nhwc_to_multiple(x, ws)
    Hp, Wp = xp.shape[1:3]
    ref = torch.zeros_like(xp)
    for i in range(0, Hp, ws):
        for j in range(0, Wp, ws):
            win = xp[:, i:i + ws, j:j + ws].reshape(2, ws * ws, 32)
            q, k, v = _heads(mixer, win)
            o = softmax_attention_naive(q, k, v, mixer.scale).transpose(1, 2).reshape(2, ws * ws, 32)
            ref[:, i:i + ws, j:j + ws] = mixer.proj(o).reshape(2, ws, ws, 32)
    ref = ref[:, :grid[0], :grid[1]]
    torch.testing.assert_close(out, ref)
    params = list(mixer.parameters())
    for a, b in zip(_grads(out, params), _grads(ref, params)):
        torch.testing.assert_close(a, b)


def test_window_padding_mask_option():
    torch.manual_seed(0)
    mixer = LocalWindowAttention(16, 1, window_size=7, mask_padding=True).double()
    x = torch.randn(1, 5, 6, 16, dtype=torch.float64)
    q, k, v = _heads(mixer, x.reshape(1, 30, 16))  # one window, masked = attention over the 30 real tokens only
    ref = mixer.proj(softmax_attention_naive(q, k, v, mixer.scale).transpose(1, 2).reshape(1, 30, 16))
    for fused in (True, False):
        mixer.fused_attn = fused
        torch.testing.assert_close(mixer(x), ref.reshape(1, 5, 6, 16))
    # without padding the mask changes nothing
    x = torch.randn(1, 7, 14, 16, dtype=torch.float64)
    unmasked = LocalWindowAttention(16, 1, window_size=7).double()
    unmasked.load_state_dict(mixer.state_dict())
    torch.testing.assert_close(mixer(x), unmasked(x))


def test_window_partition_round_trip():
    x = torch.randn(2, 14, 21, 5)
    windows = window_partition(x, 7)
    assert windows.shape == (2 * 2 * 3, 49, 5)
    assert torch.equal(windows[1].reshape(7, 7, 5), x[0, :7, 7:14])  # row-major window order
    assert torch.equal(window_reverse(windows, 7, 14, 21), x)
    assert torch.equal(window_reverse(window_partition(pad_nhwc_to_multiple(x[:, :10, :15], 7), 7), 7, 10, 15),
                       x[:, :10, :15])


@pytest.mark.parametrize('scale', [0.05, 1.0, 20.0], ids=['clamp-active', 'mixed', 'clamp-inactive'])
@pytest.mark.parametrize('grid', GRIDS, ids=lambda g: f'{g[0]}x{g[1]}')
def test_linear_attention_matches_reference(grid, scale):
    torch.manual_seed(0)
    mixer = LinearGlobalAttention(32, 2).double()
    with torch.no_grad():
        mixer.qkv.weight.mul_(scale * 50)
        mixer.temperature.uniform_(0.05, 0.5)
    x = torch.randn(2, *grid, 32, dtype=torch.float64)
    out = mixer(x)
    q, k, v = _heads(mixer, x.reshape(2, -1, 32))
    ref = linear_attention_naive(q.relu(), k.relu(), v, mixer.temperature, 100.)
    ref = mixer.proj(ref.transpose(1, 2).reshape(2, -1, 32)).reshape(out.shape)
    torch.testing.assert_close(out, ref)
    params = list(mixer.parameters())
    for a, b in zip(_grads(out, params), _grads(ref, params)):
        torch.testing.assert_close(a, b)


def test_linear_attention_clamp_regimes_and_row_sums():
    """Rows of A sum to min(1, rowsum/100); the clamp shrinks the output exactly when it is active."""
    torch.manual_seed(0)
    q, k = torch.rand(1, 1, 50, 8, dtype=torch.float64), torch.rand(1, 1, 50, 8, dtype=torch.float64)
    ones = torch.ones(1, 1, 50, 1, dtype=torch.float64)
    for s in (0.3, 3.0):  # raw row sums ~ 50*2*s^2: ~9 (clamped) and ~900 (not clamped)
        rowsum = (q * s) @ (k * s).sum(-2, keepdim=True).transpose(-2, -1)
        row_of_a = linear_attention_naive(q * s, k * s, ones, torch.tensor(1.0), 100.)
        torch.testing.assert_close(row_of_a, (rowsum / 100).clamp(max=1))
        torch.testing.assert_close(linear_attention(q * s, k * s, ones, torch.tensor(1.0), 100.), row_of_a)
    with pytest.raises(ValueError, match='clamp_min must be > 0'):
        LinearGlobalAttention(32, 2, clamp_min=0)


def test_linear_attention_temperature_scales_output_only():
    mixer = LinearGlobalAttention(32, 4)
    assert mixer.temperature.shape == (4, 1, 1)
    torch.testing.assert_close(mixer.temperature, torch.full((4, 1, 1), 8 ** -0.5))
    q, k, v = (torch.rand(1, 4, 30, 8) for _ in range(3))
    t = torch.tensor([1., 2., 3., 4.]).view(4, 1, 1)
    torch.testing.assert_close(linear_attention(q, k, v, t), t * linear_attention(q, k, v, torch.tensor(1.0)))


@pytest.mark.parametrize('scale', [0.05, 20.0], ids=['clamp-active', 'clamp-inactive'])
def test_linear_attention_temperature_placements(scale):
    """'key' puts τ on φ(k): it cancels unless the clamp is active; 'fixed' is the output form with a frozen τ."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 32, dtype=torch.float64)
    mixers = {p: LinearGlobalAttention(32, 2, temperature=p).double() for p in TEMPERATURE_PLACEMENTS}
    state = mixers['output'].state_dict()
    with torch.no_grad():
        state['qkv.weight'].mul_(scale * 50)
        state['temperature'].copy_(torch.tensor([0.3, 3.0]).view(2, 1, 1))
    for m in mixers.values():
        m.load_state_dict(state)  # same keys whatever the placement
    assert [n for n, _ in mixers['fixed'].named_parameters()] == ['qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias']
    assert 'temperature' in mixers['fixed'].state_dict() and 'temperature' in dict(mixers['key'].named_parameters())
    torch.testing.assert_close(mixers['fixed'](x), mixers['output'](x))
    q, k, v = _heads(mixers['key'], x.reshape(2, -1, 32))
    tau = state['temperature']
    ref = linear_attention_naive(q.relu(), tau * k.relu(), v, torch.tensor(1.0, dtype=x.dtype), 100.)
    ref = mixers['key'].proj(ref.transpose(1, 2).reshape(2, -1, 32)).reshape(x.shape)
    out = mixers['key'](x)
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        plain = mixers['key'].proj(linear_attention_naive(q.relu(), k.relu(), v, torch.tensor(1.0, dtype=x.dtype), 100.)
                                   .transpose(1, 2).reshape(2, -1, 32)).reshape(x.shape)
    # without the clamp τ on the keys cancels out; with it the output changes
    assert torch.allclose(out, plain) == (scale > 1)
    out.sum().backward()
    assert mixers['key'].temperature.grad is not None
    with pytest.raises(ValueError, match='temperature must be one of'):
        LinearGlobalAttention(32, 2, temperature='query')


def test_linear_attention_probes_see_feature_mapped_qk():
    mixer = LinearGlobalAttention(16, 2)
    seen = {}
    mixer.q_probe.register_forward_hook(lambda m, a, o: seen.setdefault('q', o))
    mixer.k_probe.register_forward_hook(lambda m, a, o: seen.setdefault('k', o))
    mixer(torch.randn(1, 4, 5, 16))
    assert seen['q'].shape == (1, 2, 20, 8) and (seen['q'] >= 0).all() and (seen['k'] >= 0).all()


@pytest.mark.parametrize('fused', [True, False], ids=['sdpa', 'explicit'])
def test_global_softmax_matches_reference(fused):
    torch.manual_seed(0)
    mixer = get_mixer('softmax')(32, 4).double()
    mixer.fused_attn = fused
    x = torch.randn(2, 6, 5, 32, dtype=torch.float64)
    q, k, v = _heads(mixer, x.reshape(2, 30, 32))
    ref = mixer.proj(softmax_attention_naive(q, k, v, mixer.scale).transpose(1, 2).reshape(2, 30, 32))
    torch.testing.assert_close(mixer(x), ref.reshape(2, 6, 5, 32))


@pytest.mark.parametrize('batch', [1, 3])
def test_split_heads_training_route_matches_plain(batch):
    from l2vit.layers.mixers import linear_attn
    heads, N, C = 2, 10, 8
    qkv0 = torch.randn(batch, N, 3 * C, dtype=torch.float64)
    qkv0[..., :2 * C].mul_(2).sub_(0.5)  # q and k with many negatives: ReLU's mask matters
    weights = [torch.randn(batch, heads, N, C // heads, dtype=torch.float64) for _ in range(3)]

    def run(split, used=(0, 1, 2), create_graph=False):
        qkv = qkv0.clone().requires_grad_()
        outs = split(qkv, heads)
        loss = sum((outs[i] * weights[i]).sin().sum() for i in used)
        (grad,) = torch.autograd.grad(loss, qkv, create_graph=create_graph)
        return outs, grad, qkv

    outs, grad, _ = run(linear_attn.split_heads)
    ref_outs, ref_grad, _ = run(linear_attn._split_heads_plain)
    assert type(outs[0].grad_fn).__name__ == '_SplitHeadsBackward'
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b) and a.is_contiguous() == b.is_contiguous()
    assert torch.equal(grad, ref_grad)
    # an output nobody uses (v in attention_weights): zero gradient there
    assert torch.equal(run(linear_attn.split_heads, used=(0, 1))[1], run(linear_attn._split_heads_plain, used=(0, 1))[1])
    # double backward (create_graph) through the differentiable form
    _, g, qkv = run(linear_attn.split_heads, create_graph=True)
    _, g0, qkv0_ = run(linear_attn._split_heads_plain, create_graph=True)
    (gg,) = torch.autograd.grad((g ** 2).sum(), qkv)
    (gg0,) = torch.autograd.grad((g0 ** 2).sum(), qkv0_)
    torch.testing.assert_close(gg, gg0, rtol=1e-12, atol=1e-12)
    # inference, half precision and fast paths off take the plain route
    with torch.no_grad():
        assert linear_attn.split_heads(qkv0, heads)[0].grad_fn is None
    with fast_paths(False):
        q = linear_attn.split_heads(qkv0.clone().requires_grad_(), heads)[0]
        assert type(q.grad_fn).__name__ != '_SplitHeadsBackward'
    q = linear_attn.split_heads(qkv0.to(torch.bfloat16).requires_grad_(), heads)[0]
    assert q.dtype == torch.float32 and type(q.grad_fn).__name__ != '_SplitHeadsBackward'
