"""The L2ViT model itself: exact sizes, architecture facts from the spec, any input size, clear errors."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from l2vit import L2ViT
from l2vit.layers import LinearGlobalAttention, LocalWindowAttention
from l2vit.models.l2vit import MIN_INPUT_SIZE
from tests.helpers import OFFICIAL_VARIANTS, official_manifest

PARAMS = {
    'l2vit_tiny': 28_596_781,
    'l2vit_small': 50_199_157,
    'l2vit_base': 88_577_188,
    'l2vit_base_384': 88_577_188,
}


@pytest.mark.parametrize('name', list(PARAMS))
def test_exact_parameter_count(name):
    model = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize('name', list(OFFICIAL_VARIANTS))
def test_state_dict_matches_official_manifest(name):
    """Same entries, shapes and dtypes as the official model, up to the container renames of the filter."""
    from l2vit.models.l2vit import _official_to_native
    manifest = official_manifest(OFFICIAL_VARIANTS[name])
    ours = {k: (list(v.shape), str(v.dtype).removeprefix('torch.'))
            for k, v in timm.create_model(name, device='meta').state_dict().items()}
    theirs = {_official_to_native(e['name']): (e['shape'], e['dtype']) for e in manifest['state_dict']}
    assert ours == theirs
    assert len(ours) == manifest['num_state_dict_entries']


def test_variant_configs():
    for name, dims, depths, window in [
        ('l2vit_tiny', [96, 192, 384, 768], [2, 2, 6, 2], 7),
        ('l2vit_small', [96, 192, 384, 768], [2, 2, 18, 2], 7),
        ('l2vit_base', [128, 256, 512, 1024], [2, 2, 18, 2], 7),
        ('l2vit_base_384', [128, 256, 512, 1024], [2, 2, 18, 2], 12),
    ]:
        model = timm.create_model(name, device='meta')
        assert [f['num_chs'] for f in model.feature_info] == dims
        assert [len(s.blocks) for s in model.stages] == depths
        for stage in model.stages:
            for j, block in enumerate(stage.blocks):
                # LWA at even index, LGA (with LCM) at odd, restarting in every stage; head dim 32 everywhere
                assert isinstance(block.attn, LocalWindowAttention if j % 2 == 0 else LinearGlobalAttention)
                assert (block.local_mp is not None) == (j % 2 == 1)
                assert len(block.cpe) == (2 if j % 2 == 0 else 1)
                assert block.attn.head_dim == 32
                if j % 2 == 0:
                    assert block.attn.window_size == window


def test_initialisation_follows_official():
    model = L2ViT(depths=(2, 2, 2, 2), dims=(32, 64, 128, 256))
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert m.weight.abs().max() <= 2.0, name  # trunc-normal with absolute bounds +-2
            assert m.bias is None or not m.bias.any(), name
        if isinstance(m, LinearGlobalAttention):
            assert torch.allclose(m.temperature, torch.full_like(m.temperature, 32 ** -0.5))
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            assert m.eps == 1e-5 and (m.weight == 1).all() and not m.bias.any()
    big = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight.numel() > 30000]
    std = torch.cat([w.flatten() for w in big]).std().item()
    assert 0.018 < std < 0.022
    scaled = L2ViT(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), head_init_scale=0.0)
    assert not scaled.head.fc.weight.any()


def test_drop_path_schedule_is_linear_over_all_blocks():
    model = L2ViT(depths=(2, 2, 6, 2), dims=(32, 64, 128, 256), drop_path_rate=0.3)
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for s in model.stages for b in s.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 12).tolist())


def test_options_beyond_the_paper():
    model = L2ViT(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128), clamp_min=1.0, mask_padding=True,
                  block_pattern=('window', 'softmax'))
    assert model.stages[0].blocks[1].mixer == 'softmax' and model.stages[0].blocks[1].local_mp is not None
    assert model.stages[0].blocks[0].attn.mask_padding
    per_stage = L2ViT(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128),
                      block_pattern=[('window',), ('window', 'linear'), ('linear',), ('softmax', 'linear')])
    assert [[b.mixer for b in s.blocks] for s in per_stage.stages] == [
        ['window', 'window'], ['window', 'linear'], ['linear', 'linear'], ['softmax', 'linear']]
    swapped = timm.create_model('test_l2vit', global_mixer='softmax')
    assert [b.mixer for b in swapped.stages[2].blocks] == ['window', 'softmax']
    assert swapped.stages[2].blocks[1].local_mp is not None
    with pytest.raises(ValueError, match="unknown token mixer 'nope'"):
        timm.create_model('test_l2vit', global_mixer='nope')
    plain = L2ViT(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128), use_lcm=False)
    assert all(b.local_mp is None for s in plain.stages for b in s.blocks)
    clamp = L2ViT(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128), mixer_kwargs={'linear': {'clamp_min': 3.0}})
    assert clamp.stages[0].blocks[1].attn.clamp_min == 3.0
    with pytest.raises(ValueError, match='unknown token mixer'):
        L2ViT(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128), block_pattern=('window', 'nope'))
    with pytest.raises(ValueError, match='one entry per stage'):
        L2ViT(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128), num_heads=(1, 2))


@pytest.mark.parametrize('size', [(224, 224), (224, 320), (257, 191), (96, 96), (512, 1024)])
def test_any_input_size_forward_backward(size):
    model = timm.create_model('test_l2vit', num_classes=7)
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    feats = model.forward_intermediates(x.detach(), intermediates_only=True)
    h, w = size
    for i, f in enumerate(feats):
        stride = 4 * 2 ** i
        assert f.shape[2:] == (-(-h // stride), -(-w // stride))


def test_tiny_at_odd_sizes():
    model = timm.create_model('l2vit_tiny').eval()
    with torch.no_grad():
        for size in [(257, 191), (96, 96)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 1000)


@pytest.mark.parametrize('in_chans', [1, 4])
def test_other_input_channels(in_chans):
    model = timm.create_model('test_l2vit', in_chans=in_chans)
    model(torch.randn(2, in_chans, 96, 96)).sum().backward()


def test_bad_input_gives_clear_errors():
    model = timm.create_model('test_l2vit').eval()
    with pytest.raises(ValueError, match=r'4-D image batch .* 3-D'):
        model(torch.randn(3, 96, 96))
    with pytest.raises(ValueError, match='expected 3 input channels.*got 1'):
        model(torch.randn(1, 1, 96, 96))
    with pytest.raises(ValueError, match='floating-point.*uint8'):
        model(torch.zeros(1, 3, 96, 96, dtype=torch.uint8))
    with pytest.raises(ValueError, match=f'below the minimum of {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}'):
        model(torch.randn(1, 3, 16, 96))
    with pytest.raises(ValueError, match='4-D'):
        model.forward_intermediates(torch.randn(96, 96))
    model(torch.randn(1, 3, MIN_INPUT_SIZE, MIN_INPUT_SIZE))  # the stated minimum itself works
