"""compile_for_inference: inductor with frozen weights, the fastest half-precision CPU path."""
from __future__ import annotations

import pytest
import timm
import torch
from torch._dynamo.utils import counters

from l2vit.export import FrozenInference, compile_for_inference


def test_wrapper_is_inference_only_and_keeps_one_state_dict():
    model = timm.create_model('test_l2vit')
    frozen = compile_for_inference(model)
    assert isinstance(frozen, FrozenInference) and frozen.model is model and not model.training
    assert not frozen.training and frozen.train(False) is frozen  # restoring eval mode, as evaluate() does
    assert list(frozen.state_dict()) == [f'model.{k}' for k in model.state_dict()]
    assert frozen.eval() is frozen and frozen.dtype == torch.float32
    with pytest.raises(RuntimeError, match='inference only'):
        frozen.train()
    with pytest.raises(ValueError, match='dtype must be a floating-point torch dtype'):
        compile_for_inference(model, dtype=torch.int8)
    with pytest.raises(ValueError, match='autocast must be a floating-point torch dtype'):
        compile_for_inference(model, autocast='bf16')


def test_wrapper_applies_its_autocast_and_keeps_the_callers():
    """``autocast=`` runs calls under autocast; without it, an autocast around the call still applies (a frozen model
    under the caller's ``torch.autocast`` must not silently run in fp32)."""
    seen = []

    def record(x):
        seen.append((torch.is_autocast_enabled('cpu'), torch.get_autocast_dtype('cpu'),
                     torch.is_inference_mode_enabled()))
        return x

    x = torch.randn(1, 3, 32, 32)
    for kwargs in ({}, {'autocast': torch.bfloat16}):
        frozen = compile_for_inference(timm.create_model('test_l2vit'), **kwargs)
        frozen.__dict__['_compiled'] = record  # the wrapper's contract, without compiling
        frozen(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            frozen(x)
    assert seen == [(False, torch.bfloat16, True), (True, torch.bfloat16, True),
                    (True, torch.bfloat16, True), (True, torch.bfloat16, True)]


def _model_input_and_reference():
    """A fresh dynamo cache, ``test_l2vit`` in eval mode, an input and the eager fp32 output for it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('test_l2vit').eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        return model, x, model(x)


@pytest.mark.slow
def test_frozen_model_matches_eager_with_prepacked_weights():
    model, x, ref = _model_input_and_reference()
    counters.clear()
    out = compile_for_inference(model)(x)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    if torch.backends.mkldnn.is_available():  # frozen weights are what lets inductor prepack them for oneDNN
        assert counters['inductor']['mkldnn_linear_weight_pack_matcher_count'] > 0
        assert counters['inductor']['mkldnn_conv_weight_pack_matcher_count'] > 0


@pytest.mark.slow
@pytest.mark.parametrize('kwargs, weight_dtype', [
    ({'dtype': torch.bfloat16}, torch.bfloat16),  # a bf16 model; fp32 input, cast by the wrapper
    ({'autocast': torch.bfloat16}, torch.float32),  # fp32 weights under bf16 autocast
], ids=['bf16_model', 'bf16_autocast'])
def test_frozen_bf16_is_close_to_fp32(kwargs, weight_dtype):
    model, x, ref = _model_input_and_reference()
    out = compile_for_inference(model, **kwargs)(x)
    assert out.dtype == torch.bfloat16 and next(model.parameters()).dtype == weight_dtype
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 3e-2
