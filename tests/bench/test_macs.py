"""The MAC counter: the README / paper figures, attention matmuls included, and a consistent breakdown."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from l2vit.bench import count_macs
from l2vit.layers import LinearGlobalAttention, LocalWindowAttention


@pytest.mark.parametrize('name, size, gmacs', [
    ('l2vit_tiny', 224, 4.71),
    ('l2vit_small', 224, 9.02),
    ('l2vit_base', 224, 15.86),
    ('l2vit_base_384', 384, 47.47),
])
def test_macs_match_published_figures(name, size, gmacs):
    report = count_macs(timm.create_model(name, device='meta'), (3, size, size))
    assert report.total / 1e9 == pytest.approx(gmacs, rel=0.03)
    assert sum(report.per_stage.values()) == report.total
    assert list(report.per_stage) == ['stem', 'stages.0', 'stages.1', 'stages.2', 'stages.3', 'head']


def test_attention_matmuls_are_counted():
    """Window attention through SDPA (which PyTorch's counter skips on CPU) and linear attention's matmuls."""
    N, C, heads, d = 14 * 14, 64, 2, 32

    class Wrap(nn.Module):
        def __init__(self, mixer):
            super().__init__()
            self.mixer = mixer

        def forward(self, x):
            return self.mixer(x.permute(0, 2, 3, 1))

    linears = 4 * N * C * C  # qkv + proj
    window = count_macs(Wrap(LocalWindowAttention(C, heads, window_size=7)), (C, 14, 14)).total
    assert window == linears + 2 * N * 49 * C  # q·kᵀ and attn·v inside 7x7 windows
    linear = count_macs(Wrap(LinearGlobalAttention(C, heads)), (C, 14, 14)).total
    assert linear == linears + 2 * N * C * d + N * C  # kᵀv, q·(kv), q·Σk
    explicit = LocalWindowAttention(C, heads, window_size=7)
    explicit.fused_attn = False
    assert count_macs(Wrap(explicit), (C, 14, 14)).total == window


def test_macs_scale_linearly_with_batch_and_restore_mode():
    model = timm.create_model('test_l2vit').train()
    one = count_macs(model, (3, 96, 96)).total
    assert count_macs(model, (3, 96, 96), batch_size=3).total == 3 * one
    assert model.training
    assert 'stages.0.blocks.1.attn' in count_macs(model, (3, 96, 96)).by_module
    assert 'total' in count_macs(model, (3, 96, 96)).format()


def test_sdpa_formula_matches_explicit_attention():
    q = torch.randn(2, 3, 10, 4)
    k = torch.randn(2, 3, 12, 4)

    class Sdpa(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(q, k, k)

    class Explicit(nn.Module):
        def forward(self, x):
            return (q @ k.transpose(-2, -1)).softmax(-1) @ k

    assert count_macs(Sdpa(), (1, 1, 1)).total == count_macs(Explicit(), (1, 1, 1)).total == 2 * 3 * 10 * 12 * 4 * 2
