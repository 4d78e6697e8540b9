"""Recomputed attention maps reproduce each mixer's own output, on the grid and in chunks."""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from l2vit.analysis import (
    attention_maps,
    attention_statistics,
    capture_attention_inputs,
    global_attention_rows,
    iter_attention_rows,
    project_qkv,
    query_tokens,
    window_attention_weights,
)
from l2vit.layers.padding import pad_nhwc_to_multiple

# 72x60 images: stage grids 18x15, 9x8, 5x4, 3x2, so every LWA block pads its windows
IMAGES = (2, 3, 72, 60)


def _model(**kwargs):
    model = timm.create_model('test_l2vit', num_classes=0, **kwargs).eval()
    _scale_weights(model, 15.)
    return model


@pytest.fixture(scope='module')
def default_case():
    """The official configuration (LWA + LGA with LCM, clamp 100, unmasked padding): model, images, records."""
    torch.manual_seed(0)
    model = _model()
    images = torch.randn(IMAGES)
    return model, images, capture_attention_inputs(model, images)


def _module_outputs(model, images, records):
    """Each mixer's output in the model's own forward pass."""
    outputs, handles = {}, []
    for r in records:
        handles.append(r.module.register_forward_hook(lambda m, a, out, name=r.name: outputs.__setitem__(name, out)))
    with torch.no_grad():
        model.forward_features(images)
    for h in handles:
        h.remove()
    return outputs


def _scale_weights(model, factor):
    # random-init weights are tiny; larger ones give peaked softmax rows and linear rows with and without the clamp
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('qkv.weight'):
                p.mul_(factor)


def _lga_parity(model, images, records):
    records = [r for r in records if r.kind == 'linear']
    assert [r.name for r in records] == [f'stages.{i}.blocks.1' for i in range(4)]
    outputs = _module_outputs(model, images, records)
    clamped = []
    for r in records:
        B, H, W, C = r.tokens.shape
        with torch.no_grad():
            A = global_attention_rows(r)  # B, heads, N, N
            _, _, v = project_qkv(r.module, r.tokens)
            out = (r.module.temperature * (A @ v)).transpose(1, 2).reshape(B, H, W, C)
            out = r.module.proj(out)
        torch.testing.assert_close(out, outputs[r.name], rtol=1e-4, atol=1e-5)
        clamped.append(torch.cat([c.clamped.flatten() for c in iter_attention_rows(r)]).float().mean().item())
    return clamped


def test_qk_first_map_times_v_is_the_lga_output(default_case):
    clamped = _lga_parity(*default_case)
    assert 0 < max(clamped) and min(clamped) < 1  # rows with and without the clamp at 100 are both exercised


def test_qk_first_map_times_v_is_the_lga_output_without_clamp():
    model = _model(clamp_min=1.)
    images = torch.randn(IMAGES)
    assert max(_lga_parity(model, images, capture_attention_inputs(model, images))) == 0


def _lwa_parity(model, images, records, mask_padding):
    records = [r for r in records if r.kind == 'window']
    outputs = _module_outputs(model, images, records)
    for r in records:
        B, H, W, C = r.tokens.shape
        ws = r.module.window_size
        with torch.no_grad():
            weights, valid, allowed = window_attention_weights(r)  # B*nW, heads, ws², ws²
            padded = pad_nhwc_to_multiple(r.tokens, ws)
            Hp, Wp = padded.shape[1:3]
            windows = padded.reshape(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
            _, _, v = project_qkv(r.module, windows)
            out = r.module.proj((weights @ v).transpose(1, 2).reshape(-1, ws * ws, C))
            out = out.reshape(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        torch.testing.assert_close(out[:, :H, :W], outputs[r.name], rtol=1e-4, atol=1e-5)
        assert valid.shape == (B * (Hp // ws) * (Wp // ws), ws * ws) and int(valid.sum()) == B * H * W
        assert bool(allowed.all()) != mask_padding


def test_window_maps_times_v_are_the_lwa_output(default_case):
    _lwa_parity(*default_case, mask_padding=False)


def test_window_maps_times_v_are_the_lwa_output_with_masked_padding():
    model = _model(mask_padding=True, block_pattern=('window',), depths=(1, 1, 1, 1))
    images = torch.randn(IMAGES)
    _lwa_parity(model, images, capture_attention_inputs(model, images), mask_padding=True)


def test_global_softmax_rows_times_v_are_the_softmax_output():
    model = _model(global_mixer='softmax', depths=(2, 2, 0, 0))
    images = torch.randn(IMAGES)
    records = [r for r in capture_attention_inputs(model, images) if r.kind == 'softmax']
    assert len(records) == 2
    outputs = _module_outputs(model, images, records)
    for r in records:
        B, H, W, C = r.tokens.shape
        with torch.no_grad():
            _, _, v = project_qkv(r.module, r.tokens)
            out = r.module.proj((global_attention_rows(r) @ v).transpose(1, 2).reshape(B, H, W, C))
        torch.testing.assert_close(out, outputs[r.name], rtol=1e-4, atol=1e-5)


def test_recomputed_feature_maps_match_the_mixer_probes(default_case):
    """φ(q), φ(k) from (tokens, qkv) equal what the LGA mixer exposes at its q_probe / k_probe hooks."""
    model, images, records = default_case
    records = [r for r in records if r.kind == 'linear']
    seen = {}
    handles = [h for r in records for h in (
        r.module.q_probe.register_forward_hook(lambda m, a, o, n=r.name: seen.__setitem__((n, 'q'), o)),
        r.module.k_probe.register_forward_hook(lambda m, a, o, n=r.name: seen.__setitem__((n, 'k'), o)))]
    with torch.no_grad():
        model.forward_features(images)
    for h in handles:
        h.remove()
    for r in records:
        q, k, _ = project_qkv(r.module, r.tokens)
        torch.testing.assert_close(torch.relu(q), seen[r.name, 'q'])
        torch.testing.assert_close(torch.relu(k), seen[r.name, 'k'])
        # capture keeps the probes' values; without them the rows come from the recomputed q, k: the same rows
        assert r.q_phi is not None and r.k_phi is not None
        torch.testing.assert_close(global_attention_rows(dataclasses.replace(r, q_phi=None, k_phi=None)),
                                   global_attention_rows(r))


def test_query_maps_are_rows_placed_on_the_grid(default_case):
    records = {r.name: r for r in default_case[2]}

    lga = records['stages.0.blocks.1']
    H, W = lga.grid_size
    assert (H, W) == (18, 15)
    tokens = [(0, 0), (9, 7), (17, 14)]
    maps = attention_maps(lga, tokens)
    assert maps.shape == (2, lga.num_heads, 3, H, W)
    rows = global_attention_rows(lga, [r * W + c for r, c in tokens])
    torch.testing.assert_close(maps.flatten(-2), rows)

    lwa = records['stages.0.blocks.0']  # 18x15 grid, windows of 7, padded to 21x21: 3x3 windows per image
    ws = 7
    maps = attention_maps(lwa, [(10, 3), (17, 14)])
    weights, _, _ = window_attention_weights(lwa)
    # query (10, 3) of image 0: window (1, 0), local index 3*7+3
    expected = weights[1 * 3 + 0, :, 3 * ws + 3].reshape(-1, ws, ws)
    torch.testing.assert_close(maps[0, :, 0, 7:14, 0:7], expected)
    assert maps[0, :, 0].sum(dim=(-2, -1)).sub(1).abs().max() < 1e-5  # an interior window keeps all its mass
    outside = maps[0, :, 0].clone()
    outside[:, 7:14, 0:7] = 0
    assert outside.abs().max() == 0
    # query (17, 14) of image 1 sits in the padded corner window: 4x1 real tokens of 49 keys, the rest is padding
    corner = maps[1, :, 1]
    assert corner[:, 14:18, 14:15].sum() > 0 and corner[:, :14].abs().max() == 0 and corner[:, :, :14].abs().max() == 0
    assert (corner.sum(dim=(-2, -1)) < 1).all()


def test_chunked_statistics_do_not_depend_on_the_chunk_size(default_case):
    records = [r for r in default_case[2] if r.stage == 0]
    for r in records:
        ref = attention_statistics(r, chunk_size=100_000)
        chunked = attention_statistics(r, chunk_size=13)
        for a, b in zip(ref.to_dict().values(), chunked.to_dict().values()):
            if isinstance(a, dict):
                assert a['per_head'] == pytest.approx(b['per_head'], rel=1e-6, abs=1e-9)
            else:
                assert a == b
    lga = records[1]
    sizes = [c.rows.shape for c in iter_attention_rows(lga, chunk_size=64)]
    N = 18 * 15
    assert all(s[-1] == N and s[2] <= 64 for s in sizes) and sum(s[2] for s in sizes) == N  # never N x N at once
    sub = attention_statistics(lga, max_queries=50)
    assert sub.num_queries == 2 * 50


def test_query_tokens():
    assert query_tokens([(0.5, 0.5), (0., 0.), (1., 1.)], (25, 23), 4, (100, 90)) == [(12, 11), (0, 0), (24, 22)]
    with pytest.raises(ValueError, match=r'fractions of the image size in \[0, 1\]'):
        query_tokens([(50, 50)], (25, 23), 4, (100, 90))
