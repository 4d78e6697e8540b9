"""Concentration metrics on distributions and blocks with known answers."""
from __future__ import annotations

import math

import pytest
import torch

from l2vit.analysis import (
    AttentionInput,
    attention_statistics,
    entropy,
    mean_distance,
    normalized_entropy,
    renormalize_rows,
    topk_mass,
)
from l2vit.analysis.attention_maps import pairwise_distances, token_centers
from l2vit.layers import GlobalSoftmaxAttention, LinearGlobalAttention


def test_entropy_uniform_is_one_and_one_hot_is_zero():
    for n in (2, 7, 49, 3136):
        uniform = torch.full((3, n), 1. / n)
        torch.testing.assert_close(normalized_entropy(uniform), torch.ones(3))
        torch.testing.assert_close(entropy(uniform), torch.full((3,), math.log(n)))
        one_hot = torch.zeros(3, n)
        one_hot[:, n // 2] = 1.
        assert normalized_entropy(one_hot).abs().max() == 0.
    # two equal keys out of four: log 2 / log 4
    torch.testing.assert_close(normalized_entropy(torch.tensor([.5, .5, 0., 0.])), torch.tensor(.5))


def test_entropy_with_fewer_allowed_keys():
    # uniform over 4 of 8 keys is uniform when only those 4 may be attended to
    p = torch.tensor([[.25] * 4 + [0.] * 4])
    torch.testing.assert_close(normalized_entropy(p, torch.tensor([4.])), torch.ones(1))
    torch.testing.assert_close(normalized_entropy(p), torch.full((1,), 2 / 3))  # log 4 / log 8
    # a single allowed key: entropy 0 by definition, not 0/0
    assert normalized_entropy(torch.tensor([[1., 0.]]), torch.tensor([1.])).item() == 0.


def test_topk_mass_and_distance():
    p = torch.tensor([.1, .4, .2, .3])
    assert topk_mass(p, 1).item() == pytest.approx(.4)
    assert topk_mass(p, 2).item() == pytest.approx(.7)
    assert topk_mass(p, 99).item() == pytest.approx(1.)
    with pytest.raises(ValueError, match='k must be >= 1'):
        topk_mass(p, 0)
    # a one-hot row 3 rows down and 4 columns right on a stride-8 grid is 5 tokens = 40 px away
    centers = token_centers(6, 6, stride=8)
    assert centers[0].tolist() == [4., 4.] and centers[7].tolist() == [12., 12.]
    dist = pairwise_distances(centers[:1], centers)[0]
    one_hot = torch.zeros(36)
    one_hot[3 * 6 + 4] = 1.
    assert mean_distance(one_hot, dist).item() == pytest.approx(40.)
    half = torch.zeros(36)
    half[0], half[3 * 6 + 4] = .5, .5
    assert mean_distance(half, dist).item() == pytest.approx(20.)


def test_renormalize_rows_marks_empty_rows():
    rows = torch.tensor([[1., 3.], [0., 0.], [.02, .02]])
    p, mass, empty = renormalize_rows(rows)
    torch.testing.assert_close(p, torch.tensor([[.25, .75], [0., 0.], [.5, .5]]))
    torch.testing.assert_close(mass, torch.tensor([4., 0., .04]))
    assert empty.tolist() == [False, True, False]


def _record(module, tokens, kind, stride=8):
    H, W = tokens.shape[1:3]
    return AttentionInput(name='stages.0.blocks.1', kind=kind, module=module, tokens=tokens, stride=stride,
                          image_size=(H * stride, W * stride), has_lcm=False, stage=0)


def test_statistics_of_a_linear_block_with_uniform_rows():
    """Keys that are all equal give every query a uniform row: entropy 1, top-k = k/N, the uniform distance."""
    H, W, C = 5, 6, 8
    mixer = LinearGlobalAttention(C, 2, clamp_min=100.)
    with torch.no_grad():
        mixer.qkv.weight.zero_()
        mixer.qkv.bias.fill_(1.)  # q = k = v = 1: φ(q)·φ(k) = head_dim = 4 for every pair
    rec = _record(mixer, torch.randn(2, H, W, C), 'linear')
    stats = attention_statistics(rec, topk=(1, 9), chunk_size=7)
    N = H * W
    assert stats.num_keys == N and stats.num_queries == 2 * N
    assert stats.entropy == pytest.approx([1., 1.])
    assert stats.topk_mass[1] == pytest.approx([1 / N] * 2)
    assert stats.topk_mass[9] == pytest.approx([9 / N] * 2)
    assert stats.distance_px == pytest.approx(stats.uniform_distance_px)
    centers = token_centers(H, W, 8)
    assert stats.uniform_distance_px[0] == pytest.approx(pairwise_distances(centers, centers).mean().item(), rel=1e-5)
    # each row sums to 4·30 = 120 before the clamp at 100, so the clamp is inactive and rows hold their full mass
    assert stats.row_mass == pytest.approx([1., 1.]) and stats.clamped_fraction == [0., 0.]
    mixer.clamp_min = 480.
    stats = attention_statistics(rec)
    assert stats.row_mass == pytest.approx([.25, .25]) and stats.clamped_fraction == [1., 1.]
    assert stats.entropy == pytest.approx([1., 1.])  # the clamp scales a row, it does not change its shape


def test_statistics_of_softmax_blocks_with_known_targets():
    """Tokens are one-hot positions; q picks a target token, k the token itself: each row is one-hot on the target."""
    H, W = 4, 5
    N = H * W
    tokens = torch.eye(N).reshape(1, H, W, N)
    big = 20.

    def mixer_attending_to(target: list[int]) -> GlobalSoftmaxAttention:
        m = GlobalSoftmaxAttention(N, 1)
        with torch.no_grad():
            m.qkv.weight.zero_()
            m.qkv.bias.zero_()
            m.qkv.weight[:N] = big * torch.eye(N)[:, target]  # q_n = big · e_target(n)
            m.qkv.weight[N:2 * N] = big * torch.eye(N)  # k_m = big · e_m
        return m

    # attend to yourself: entropy 0, top-1 mass 1, distance 0
    stats = attention_statistics(_record(mixer_attending_to(list(range(N))), tokens, 'softmax'), chunk_size=3)
    assert stats.entropy[0] == pytest.approx(0., abs=1e-6)
    assert stats.topk_mass[1][0] == pytest.approx(1.)
    assert stats.distance_px[0] == pytest.approx(0., abs=1e-4)

    # attend to the token one row down (wrapping to the top): known distances in pixels
    target = [((n // W + 1) % H) * W + n % W for n in range(N)]
    stats = attention_statistics(_record(mixer_attending_to(target), tokens, 'softmax', stride=16), chunk_size=6)
    expected = sum(16. * (1 if n // W < H - 1 else H - 1) for n in range(N)) / N
    assert stats.distance_px[0] == pytest.approx(expected, rel=1e-4)
    assert stats.entropy[0] == pytest.approx(0., abs=1e-6)
