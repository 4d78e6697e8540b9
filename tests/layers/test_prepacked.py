"""linear_inference (oneDNN-reordered weights for CPU float32 inference) against its naive twin, F.linear."""
from __future__ import annotations

import copy
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from l2vit.layers import clear_packed_weights, fast_paths, linear_inference, prepacked

pytestmark = pytest.mark.skipif(not prepacked.packing_available(), reason='PyTorch built without oneDNN')


@pytest.fixture(autouse=True)
def _reordered_route(monkeypatch):
    # these tests are about the reordered route: fix it on, whichever route this CPU measured faster
    monkeypatch.setenv('L2VIT_PACKED_WEIGHTS', '1')


def _close(a, b):
    # the same sums as F.linear's, possibly in another order: float32 rounding of a K-term dot product
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _packed_rows(layer):
    return set(prepacked._packed.get(layer, {}))


@pytest.mark.parametrize('gelu', [False, True], ids=['linear', 'gelu'])
@pytest.mark.parametrize('bias', [True, False], ids=['bias', 'nobias'])
def test_matches_f_linear(gelu, bias):
    layer = torch.nn.Linear(96, 288, bias=bias)
    inputs = [torch.randn(37, 96), torch.randn(2, 49, 96), torch.randn(2, 7, 5, 192)[..., ::2],  # strided
              torch.randn(1, 96)]
    with torch.inference_mode():
        for x in inputs:
            ref = F.linear(x, layer.weight, layer.bias)
            ref = F.gelu(ref) if gelu else ref
            out = linear_inference(layer, x, gelu=gelu)
            assert out.shape == ref.shape and out.dtype == torch.float32
            _close(out, ref)
    assert _packed_rows(layer) == {(0, 288)}  # the reordered route really ran


def test_row_blocks_are_separate_weights():
    layer = torch.nn.Linear(32, 96)
    x = torch.randn(50, 32)
    with torch.inference_mode():
        for rows in [(0, 32), (32, 96), (0, 96)]:
            ref = F.linear(x, layer.weight[rows[0]:rows[1]], layer.bias[rows[0]:rows[1]])
            _close(linear_inference(layer, x, rows=rows), ref)
    assert _packed_rows(layer) == {(0, 32), (32, 96), (0, 96)}


def test_weight_changes_are_followed():
    layer = torch.nn.Linear(16, 24)
    x = torch.randn(10, 16)

    def check():
        with torch.inference_mode():
            _close(linear_inference(layer, x), F.linear(x, layer.weight, layer.bias))

    check()
    with torch.no_grad():
        layer.weight.mul_(-2)  # in place: the version counter moves
    check()
    layer.load_state_dict({'weight': torch.randn(24, 16), 'bias': torch.randn(24)})
    check()
    layer.weight.data = torch.randn(24, 16)  # new storage
    check()
    for _ in range(3):  # swaps with no call in between: the freed storage may come back at the cached address
        layer.weight.data = torch.randn(24, 16)
        layer.weight.data = torch.randn(24, 16)
        check()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    optimizer.step()
    check()


def test_fallbacks_are_plain_f_linear():
    layer = torch.nn.Linear(16, 24)
    x = torch.randn(10, 16)
    double = copy.deepcopy(layer).double()
    with torch.inference_mode():  # float64: F.linear exactly
        assert torch.equal(linear_inference(double, x.double(), gelu=True),
                           F.gelu(F.linear(x.double(), double.weight, double.bias)))
    with fast_paths(False), torch.inference_mode():
        assert torch.equal(linear_inference(layer, x), F.linear(x, layer.weight, layer.bias))
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.inference_mode():
        assert linear_inference(layer, x).dtype == torch.bfloat16  # autocast's own linear
    assert not _packed_rows(layer) and not _packed_rows(double)
    # a gradient to compute: F.linear and an out-of-place GELU, so autograd works
    y = linear_inference(layer, x.requires_grad_(), gelu=True)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.func.grad(lambda t: F.gelu(F.linear(t, layer.weight, layer.bias)).sum())(
        x.detach()))
    assert not _packed_rows(layer)


def test_inference_tensor_weights_take_the_plain_route():
    # a model built under inference_mode has weights without a version counter: a cached copy could not notice
    # in-place writes to them, so they are never packed (this used to raise "Inference tensors do not track
    # version counter" in the benchmark's precision check)
    with torch.inference_mode():
        model = timm.create_model('test_l2vit', num_classes=5).eval()
        x = torch.randn(2, 3, 64, 64)
        y = model(x)
        assert not any(_packed_rows(m) for m in model.modules())
        with fast_paths(False):
            torch.testing.assert_close(y, model(x), rtol=0, atol=1e-5)
        layer = model.stages[0].blocks[0].mlp.fc1
        z = torch.randn(3, layer.in_features)
        before = linear_inference(layer, z)
        layer.weight.mul_(2)  # in place, no version bump: the plain route sees it
        torch.testing.assert_close(linear_inference(layer, z), F.linear(z, layer.weight, layer.bias))
        assert not torch.equal(before, linear_inference(layer, z))


def test_cache_is_outside_the_module_and_can_be_cleared():
    model = timm.create_model('test_l2vit').eval()
    keys = list(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)
    packed = [m for m in model.modules() if _packed_rows(m)]
    assert packed  # MLPs and mixers took the route
    assert list(model.state_dict()) == keys
    # no module holds a reordered (opaque oneDNN) tensor, so deep copies and pickles never see one
    assert not any(isinstance(v, torch.Tensor) and v.is_mkldnn for m in model.modules() for v in vars(m).values())
    clone = copy.deepcopy(model)
    assert not any(_packed_rows(m) for m in clone.modules())
    with torch.inference_mode():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    clear_packed_weights(packed[0])
    assert not _packed_rows(packed[0]) and _packed_rows(packed[-1])
    model.train()  # training makes them stale: dropped
    assert not any(_packed_rows(m) for m in model.modules())


def test_whole_model_float32_matches_plain_route():
    model = timm.create_model('test_l2vit', num_classes=7).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        fast = model(x)
        with fast_paths(False):
            plain = model(x)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert any(_packed_rows(m) for m in model.modules())


@pytest.mark.parametrize('value', ['0', 'off', 'False'])
def test_environment_turns_packing_off(monkeypatch, value):
    model = timm.create_model('test_l2vit', num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        packed_out = model(x)
    assert any(_packed_rows(m) for m in model.modules())
    clear_packed_weights(model)
    monkeypatch.setenv('L2VIT_PACKED_WEIGHTS', value)
    assert not prepacked.packing_enabled()
    with torch.inference_mode():
        plain_out = model(x)
        layer = model.stages[0].blocks[0].mlp.fc1
        z = torch.randn(5, layer.in_features)
        assert torch.equal(linear_inference(layer, z, gelu=True), F.gelu(F.linear(z, layer.weight, layer.bias)))
    assert not any(_packed_rows(m) for m in model.modules())
    torch.testing.assert_close(plain_out, packed_out, rtol=0, atol=1e-5)
    monkeypatch.setenv('L2VIT_PACKED_WEIGHTS', '1')
    assert prepacked.packing_enabled()


class _RecordOps(TorchDispatchMode):
    """The aten / mkldnn ops a block of code runs, with their string arguments (the post-op names)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.name(), tuple(a for a in args if isinstance(a, str))))
        return func(*args, **(kwargs or {}))


def _gelu_route(layer, x):
    with torch.inference_mode(), _RecordOps() as ops:
        out = linear_inference(layer, x, gelu=True)
    names = [name for name, _ in ops.calls]
    fused = [attrs for name, attrs in ops.calls if name == 'mkldnn::_linear_pointwise' and 'gelu' in attrs]
    return out, bool(fused), 'aten::gelu_' in names


@pytest.mark.parametrize('value, fused', [('1', True), ('on', True), ('0', False), ('False', False)])
def test_gelu_fusion_follows_the_environment(monkeypatch, value, fused):
    monkeypatch.setenv('L2VIT_FUSED_GELU', value)
    assert prepacked.gelu_fused() is fused
    layer = torch.nn.Linear(48, 160)
    x = torch.randn(3, 11, 48)
    out, ran_fused, ran_separate = _gelu_route(layer, x)
    assert (ran_fused, ran_separate) == (fused, not fused)
    _close(out, F.gelu(F.linear(x, layer.weight, layer.bias)))
    assert _packed_rows(layer) == {(0, 160)}  # both forms use the reordered weight


def test_routes_are_measured_once_without_touching_the_random_stream(monkeypatch):
    monkeypatch.delenv('L2VIT_FUSED_GELU', raising=False)
    monkeypatch.delenv('L2VIT_PACKED_WEIGHTS', raising=False)
    monkeypatch.setattr(prepacked, '_choice', None)
    calls = []
    measure = prepacked._time_routes
    monkeypatch.setattr(prepacked, '_time_routes', lambda: calls.append(1) or measure())
    state = torch.get_rng_state()
    choice = prepacked.route_choice()
    assert set(choice) == {'packed', 'fused_gelu'} and all(isinstance(v, bool) for v in choice.values())
    assert calls == [1] and torch.equal(torch.get_rng_state(), state)
    assert prepacked.packing_enabled() is choice['packed'] and prepacked.gelu_fused() is choice['fused_gelu']
    assert calls == [1]  # kept for the process
    layer = torch.nn.Linear(32, 64)
    x = torch.randn(9, 32)
    out, ran_fused, ran_separate = _gelu_route(layer, x)
    if choice['packed']:
        assert (ran_fused, ran_separate) == (choice['fused_gelu'], not choice['fused_gelu'])
        assert _packed_rows(layer) == {(0, 64)}
    else:  # F.linear, then the in-place GELU; no reordered copy
        assert (ran_fused, ran_separate) == (False, True) and not _packed_rows(layer)
    _close(out, F.gelu(F.linear(x, layer.weight, layer.bias)))


@pytest.mark.parametrize('fast', ['packed', 'plain'])
def test_measured_choice_follows_the_faster_form(monkeypatch, fast):
    monkeypatch.delenv('L2VIT_PACKED_WEIGHTS', raising=False)
    monkeypatch.setattr(prepacked, '_choice', None)
    real = time.perf_counter
    slow = F.linear if fast == 'packed' else torch.ops.mkldnn._linear_pointwise
    clock = [0.0]

    def fake_clock():  # real time, plus 10 ms for every call of the slow form so far
        return real() + clock[0]

    def slowed(*args, **kwargs):
        clock[0] += 0.01
        return slow(*args, **kwargs)
    monkeypatch.setattr(prepacked.time, 'perf_counter', fake_clock)
    if fast == 'packed':
        monkeypatch.setattr(prepacked.F, 'linear', slowed)
    else:
        monkeypatch.setattr(torch.ops.mkldnn, '_linear_pointwise', slowed)
    assert prepacked.route_choice()['packed'] is (fast == 'packed')
    assert prepacked.packing_enabled() is (fast == 'packed')


def test_gelu_forms_agree(monkeypatch):
    layer = torch.nn.Linear(96, 384)
    x = torch.randn(300, 96) * 3
    outs = []
    for value in ('1', '0'):
        monkeypatch.setenv('L2VIT_FUSED_GELU', value)
        outs.append(_gelu_route(layer, x)[0])
    # oneDNN's GELU post-op and PyTorch's GELU: the same exact-erf GELU, up to last-bit rounding
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', ['L2VIT_FUSED_GELU', 'L2VIT_PACKED_WEIGHTS'])
def test_bad_route_settings_are_refused(monkeypatch, name):
    monkeypatch.setenv(name, 'maybe')
    with pytest.raises(ValueError, match=f"{name} must be 1 or 0.*'maybe'"):
        prepacked.gelu_fused() if name == 'L2VIT_FUSED_GELU' else prepacked.packing_enabled()
