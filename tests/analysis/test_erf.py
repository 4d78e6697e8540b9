"""Effective receptive fields: known supports of convolutions, and the LCM switch of an LGA block."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from l2vit.analysis import block_erf, build_variant, effective_receptive_field, erf_statistics, image_erf, lcm_disabled


def _dwconv(channels: int, k: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)
    with torch.no_grad():
        conv.weight.copy_(torch.rand_like(conv.weight) + 0.1)  # no zero taps, so the support is the whole kernel
    return conv


def test_erf_of_a_depthwise_conv_is_its_kernel():
    conv = _dwconv(4, 7)
    erf = effective_receptive_field(conv, torch.randn(3, 4, 21, 19))
    assert erf.shape == (21, 19)
    support = erf > 0
    assert support.sum() == 49 and support[7:14, 6:13].all()  # 7x7 around the centre (10, 9)
    # d out[c, 10, 9] / d x[c, 10 + i - 3, 9 + j - 3] = w[c, i, j] (cross-correlation), summed over channels
    torch.testing.assert_close(erf[7:14, 6:13], conv.weight.abs().sum(dim=(0, 1)))


def test_erf_grows_with_depth_and_ignores_identity_on_request():
    a, b = _dwconv(2, 7), _dwconv(2, 7)
    x = torch.randn(2, 2, 31, 31)
    erf = effective_receptive_field(nn.Sequential(a, b), x)
    assert (erf > 0).sum() == 13 * 13 and (erf[9:22, 9:22] > 0).all()
    residual = effective_receptive_field(lambda t: t + a(t), x)
    branch = effective_receptive_field(lambda t: t + a(t), x, exclude_identity=True)
    torch.testing.assert_close(branch, effective_receptive_field(a, x))
    assert residual[15, 15] == pytest.approx(branch[15, 15].item() + 2, rel=1e-5)  # identity adds 1 per channel
    # channels-last layout and another output position
    nhwc = effective_receptive_field(lambda t: a(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), x.permute(0, 2, 3, 1),
                                     channels_last=True, center=(1, 4))
    assert (nhwc > 0).sum() == 5 * 7 and (nhwc[0:5, 1:8] > 0).all()  # clipped at the top border
    with pytest.raises(ValueError, match="exclude_identity needs an output of the input's shape"):
        effective_receptive_field(nn.Conv2d(2, 3, 1), x, exclude_identity=True)


def test_erf_statistics_on_known_maps():
    spike = torch.zeros(11, 11)
    spike[5, 5] = 2.
    s = erf_statistics(spike, cell_size=8)
    assert s['side'] == {0.2: 1, 0.3: 1, 0.5: 1, 0.99: 1}
    assert s['area_ratio'][0.5] == pytest.approx(1 / 121)
    assert s['center_fraction'] == 1. and s['mean_distance_px'] == 0.
    square = torch.zeros(11, 11)
    square[3:8, 3:8] = 1.  # 25 cells: the 3x3 core holds 9/25 = 0.36
    s = erf_statistics(square, fractions=(0.3, 0.36, 0.5, 1.0))
    assert s['side'] == {0.3: 3, 0.36: 3, 0.5: 5, 1.0: 5}
    assert s['area_ratio'][1.0] == pytest.approx(25 / 121)
    ring = torch.zeros(11, 11)
    ring[5, 8] = ring[5, 2] = 1.
    assert erf_statistics(ring, cell_size=4)['mean_distance_px'] == pytest.approx(12.)
    with pytest.raises(ValueError, match=r'fractions must lie in \(0, 1\]'):
        erf_statistics(spike, fractions=(0.,))
    with pytest.raises(ValueError, match='expected an ERF map'):
        erf_statistics(torch.zeros(3))


def test_block_erf_without_lcm_is_the_block_of_a_model_without_lcm():
    model = timm.create_model('test_l2vit', num_classes=0).eval()
    images = torch.randn(2, 3, 64, 64)
    block = 'stages.0.blocks.1'  # the first LGA block: its input does not depend on any LCM
    with_lcm = block_erf(model, images, block)
    without = block_erf(model, images, block, with_lcm=False)
    assert model.get_submodule(block).local_mp is not None  # restored after the context
    reference = block_erf(build_variant(model, use_lcm=False), images, block)
    torch.testing.assert_close(without, reference)
    assert with_lcm.shape == (16, 16) and not torch.allclose(with_lcm, without)

    # with the attention's output switched off, what is left is local: the 3x3 CPE alone (MLP and norms are
    # per-token), or the CPE followed by the LCM's two 7x7 depth-wise convolutions, 15x15 tokens
    local = copy.deepcopy(model)
    with torch.no_grad():
        local.get_submodule(block).attn.proj.weight.zero_()
        local.get_submodule(block).attn.proj.bias.zero_()
    support = (block_erf(local, images, block) > 0).nonzero()
    assert support.min(0).values.tolist() == [1, 1] and support.max(0).values.tolist() == [15, 15]
    support = (block_erf(local, images, block, with_lcm=False) > 0).nonzero()
    assert support.min(0).values.tolist() == [7, 7] and support.max(0).values.tolist() == [9, 9]
    with pytest.raises(ValueError, match='has no Local Concentration Module'):
        with lcm_disabled(model.get_submodule('stages.0.blocks.0')):
            pass


def test_image_erf_is_local_for_window_attention_and_global_for_lga():
    images = torch.randn(1, 3, 128, 128)
    local = timm.create_model('test_l2vit', num_classes=0, block_pattern=('window',), depths=(1, 1, 1, 1)).eval()
    lga = timm.create_model('test_l2vit', num_classes=0, block_pattern=('linear',), depths=(1, 1, 1, 1)).eval()
    erf_local, erf_lga = image_erf(local, images, stage=0), image_erf(lga, images, stage=0)
    assert erf_local.shape == erf_lga.shape == (128, 128)
    # stage-0 token (16, 16) covers pixels 64..67; a 7-token window plus one CPE tap stays within pixels ~24..107
    assert erf_local[:16].abs().max() == 0 and erf_local[:, 112:].abs().max() == 0
    # global attention reaches the far borders (a few pixels get no gradient where the stem's ReLU is off)
    assert (erf_lga[:16] > 0).float().mean() > 0.9 and (erf_lga[:, 112:] > 0).float().mean() > 0.9
