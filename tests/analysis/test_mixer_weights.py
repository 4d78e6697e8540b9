"""Every global mixer's ``attention_weights`` are its own mixing: rows applied to its values give its output.

Each case rebuilds the mixer's output from ``attention_weights(x)`` applied to the mixer's values, plus the branches
the rows leave out (convolutions on V, gates, normalisations), computed from the mixer's own submodules, in float64
on a non-square 3×5 grid. Query subsets give the same rows as the full matrix.
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

from l2vit.analysis import analyze_model, capture_attention_inputs, global_attention_rows
from l2vit.analysis.attention_maps import ROW_SEMANTICS
from l2vit.layers import create_mixer, list_mixers
from l2vit.layers.mixers._common import query_index

H, W, DIM, HEADS, BATCH = 3, 5, 16, 2, 2
N = H * W
TOL = {'rtol': 1e-9, 'atol': 1e-10}


def _mixer(name: str, std: float = 0.5, **kwargs) -> torch.nn.Module:
    """A float64 eval-mode mixer with large random weights (peaked rows; clamps and thresholds exercised)."""
    torch.manual_seed(0)
    mixer = create_mixer(name, DIM, HEADS, dtype=torch.float64, **kwargs).eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0., std)
    return mixer


def _input() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(BATCH, H, W, DIM, dtype=torch.float64)


def _merge(o: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, d)`` → ``(B, N, heads·d)``."""
    B, heads, n, d = o.shape
    return o.transpose(1, 2).reshape(B, n, heads * d)


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, C)`` → ``(B, heads, N, C / heads)``."""
    B, n, C = t.shape
    return t.reshape(B, n, heads, C // heads).transpose(1, 2)


def _qkv_values(m, x):
    return _split(m.qkv(x.reshape(BATCH, N, DIM)).chunk(3, dim=-1)[2], m.num_heads)


def _softmax_out(m, x, w):
    return m.proj(_merge(w @ _qkv_values(m, x)))


def _castling_out(m, x, w):
    v = _qkv_values(m, x)
    return m.proj(_merge(F.normalize(w @ v, dim=-1) + m.dconv(v)))


def _flatten_out(m, x, w):
    v = _qkv_values(m, x)
    d = m.head_dim
    dwc = m.dwc(v.reshape(-1, N, d).transpose(1, 2).reshape(-1, d, H, W)).reshape(BATCH, m.num_heads, d, N)
    return m.proj(_merge(w @ v + dwc.transpose(-2, -1)))


def _inline_out(m, x, w):
    tokens = x.reshape(BATCH, N, DIM)
    v = m.qkv(tokens).chunk(3, dim=-1)[2]
    return m.proj(_merge(w @ _split(v, m.num_heads)) + m.dynamic_residual(tokens, v, H, W))


def _rala_out(m, x, w):
    _, _, v, o = m.qkvo(x).chunk(4, dim=-1)
    lepe = m.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return m.proj((_merge(w @ m._heads(v)).reshape(BATCH, H, W, DIM) + lepe) * o)


def _masa_out(m, x, w):
    v = m.v_proj(x)
    lepe = m.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    o = w @ _split(v.reshape(BATCH, N, DIM), m.num_heads)
    return m.out_proj(_merge(o).reshape(BATCH, H, W, DIM) + lepe)


def _vicinity_out(m, x, w):
    tokens = x.reshape(BATCH, N, DIM)
    gate = m.se_fc(tokens.mean(dim=1)).unsqueeze(1)
    y = m._clamp(m.out_proj(_merge(w @ _split(m.v_proj(tokens), m.num_heads))))
    return m._clamp(y + y * gate)


def _vig_out(m, x, w):
    local = m.in_proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(BATCH, N, DIM)
    gate = torch.sigmoid(m.g_proj(local)).reshape(BATCH, N, m.num_heads, m.head_v_dim)
    v = _split(m.qkv_proj(local).split([m.key_dim, m.key_dim, DIM], dim=-1)[2], m.num_heads)
    o = (w @ v).transpose(1, 2)  # B, N, heads, d_v
    y = m.g_norm(o) * gate + m.l_norm(local.reshape(BATCH, N, m.num_heads, m.head_v_dim)) * (1 - gate)
    y = y.reshape(BATCH, N, DIM)
    return m.o_proj(F.silu(y) if m.use_out_act else y)


def _vitality_setup(m):
    with torch.no_grad():  # a trained quantiser's range; a fresh one has zero buffers (degenerate output)
        m.quant.running_zero_point.fill_(-3.)
        m.quant.running_range.fill_(6.)


# name, constructor kwargs, output from (mixer, x, weights), extra setup
CASES = [
    ('softmax', {}, _softmax_out, None),
    ('linear', {'clamp_min': 1.}, lambda m, x, w: _softmax_out(m, x, w), None),
    ('linear', {'clamp_min': 1e4}, lambda m, x, w: _softmax_out(m, x, w), None),
    ('linear', {'clamp_min': 1e4, 'temperature': 'key'}, lambda m, x, w: _softmax_out(m, x, w), None),
    ('linear', {'clamp_min': 1., 'temperature': 'fixed'}, lambda m, x, w: _softmax_out(m, x, w), None),
    ('castling', {}, _castling_out, None),
    ('castling_sparse', {}, _castling_out, None),
    ('flatten', {}, _flatten_out, None),
    ('inline', {}, _inline_out, None),
    ('inline', {'kernel_func': 'relu'}, _inline_out, None),
    ('rala', {}, _rala_out, None),
    ('rala_softmax', {}, _rala_out, None),
    ('masa', {}, _masa_out, None),
    ('masa_decomposed', {}, _masa_out, None),
    ('vicinity', {'abs_clamp': False}, _vicinity_out, None),
    ('vicinity', {}, _vicinity_out, None),  # the official clamps, inactive at these magnitudes
    ('vig_gla', {'chunk_size': 4}, _vig_out, None),
    ('vig_gla', {'chunk_size': 8, 'halve_in_eval': True, 'use_act_in_conv': True, 'use_out_act': True}, _vig_out,
     None),
    ('vitality', {}, _softmax_out, _vitality_setup),
    ('vitality', {'sparse': False}, _softmax_out, None),
]


def _case_id(case) -> str:
    name, kwargs, _, _ = case
    return name + ''.join(f'-{k}={v}' for k, v in kwargs.items())


@pytest.mark.parametrize('case', CASES, ids=[_case_id(c) for c in CASES])
def test_rows_times_values_are_the_mixer_output(case):
    name, kwargs, output, setup = case
    mixer = _mixer(name, **kwargs)
    if setup is not None:
        setup(mixer)
    x = _input()
    with torch.no_grad():
        expected = mixer(x).reshape(BATCH, N, DIM)
        weights = mixer.attention_weights(x)
        assert weights.shape == (BATCH, mixer.num_heads, N, N)
        torch.testing.assert_close(output(mixer, x, weights).reshape(BATCH, N, DIM), expected, **TOL)
        # a subset of queries (repeated, unordered) gives exactly those rows of the full matrix
        idx = torch.tensor([7, 0, 14, 7, 5])
        torch.testing.assert_close(mixer.attention_weights(x, idx), weights[:, :, idx], **TOL)


def test_rows_are_not_trivial():
    """The parity above could not pass with the wrong rows: e.g. uniform rows or rows of another head differ."""
    x = _input()
    for name in ('flatten', 'masa_decomposed', 'vig_gla', 'rala'):
        with torch.no_grad():
            w = _mixer(name).attention_weights(x)
        assert (w - w.mean(-1, keepdim=True)).abs().amax() > 1e-3, name
        assert (w[:, 0] - w[:, 1]).abs().amax() > 1e-3, name


def test_linear_clamp_and_temperature_show_in_the_rows():
    x = _input()
    with torch.no_grad():
        free = _mixer('linear', clamp_min=1.)
        tau = free.temperature.reshape(1, -1, 1)
        torch.testing.assert_close(free.attention_weights(x).sum(-1), tau.expand(BATCH, -1, N), **TOL)
        clamped = _mixer('linear', clamp_min=1e4).attention_weights(x).sum(-1)
        assert (clamped / tau < 0.5).all()  # every normaliser clamped: rows lose mass


def test_analysis_rows_of_linear_attention_follow_the_temperature_placement():
    """With τ on the keys (and every normaliser clamped, so τ matters) the exact path, from the probes or recomputed,
    gives the mixer's own rows."""
    torch.manual_seed(0)
    model = timm.create_model('test_l2vit', num_classes=0,
                              mixer_kwargs={'linear': {'temperature': 'key', 'clamp_min': 1e4}}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('attn.temperature'):
                p.fill_(3.)
        record = capture_attention_inputs(model, _images(), blocks=['stages.0.blocks.1'])[0]
        expected = record.module.attention_weights(record.tokens)
        assert record.q_phi is not None
        torch.testing.assert_close(global_attention_rows(record), expected)
        recomputed = dataclasses.replace(record, q_phi=None, k_phi=None)
        torch.testing.assert_close(global_attention_rows(recomputed), expected)


def test_vitality_training_rows_use_batch_statistics_without_updating_the_quantiser():
    mixer = _mixer('vitality')
    mixer.train()
    x = _input()
    with torch.no_grad():
        weights = mixer.attention_weights(x)
        assert not mixer.quant.running_range.any()  # no update by attention_weights
        expected = mixer(x).reshape(BATCH, N, DIM)  # training forward (no dropout): batch statistics
    torch.testing.assert_close(_softmax_out(mixer, x, weights), expected, **TOL)


def test_fcvit_rows_are_the_pooling_of_its_global_context():
    mixer = _mixer('fcvit')
    x = _input()
    idx = torch.tensor([3, 11])
    with torch.no_grad():
        gc = mixer.gc1
        weights = mixer.attention_weights(x, idx)  # B, gc heads, Q, N
        tokens = x.reshape(BATCH, N, DIM)
        pooled = weights @ _split(tokens, gc.heads)  # B, heads, Q, d: what each query reads from the map
        context = gc.context_vector(_merge(pooled))  # B, Q, C
        sim = gc.similarity(tokens.transpose(1, 2))[:, :, idx]  # B, heads, Q
        out = sim.transpose(1, 2).repeat_interleave(DIM // gc.heads, dim=-1) * context
        expected = gc(x.permute(0, 3, 1, 2)).reshape(BATCH, DIM, N)[:, :, idx].transpose(1, 2)
    assert weights.shape == (BATCH, gc.heads, 2, N)
    torch.testing.assert_close(out, expected, **TOL)


def test_every_global_mixer_has_rows_and_a_row_note():
    for name in list_mixers():
        cls = type(create_mixer(name, DIM, HEADS)) if name != 'window' else None
        if cls is None:
            continue
        assert callable(getattr(cls, 'attention_weights', None)), name
        assert name in ROW_SEMANTICS, name


def test_vicinity_with_spatial_reduction_raises():
    mixer = _mixer('vicinity', sr_ratio=2)
    with pytest.raises(NotImplementedError, match='reduced grid'):
        mixer.attention_weights(_input())


def test_query_index_checks():
    assert query_index(None, 4, torch.device('cpu')).tolist() == [0, 1, 2, 3]
    assert query_index(torch.tensor([3, 0], dtype=torch.int32), 4, torch.device('cpu')).dtype == torch.long
    for bad in (torch.tensor([0.5]), torch.tensor([[1]]), torch.tensor([4]), torch.tensor([-1]), [1, 2]):
        with pytest.raises(ValueError, match='quer'):
            query_index(bad, 4, torch.device('cpu'))


def _images(size: int = 32) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(2, 3, size, size)


def test_analysis_covers_a_new_mixer_with_global_metrics_and_erfs():
    torch.manual_seed(0)
    model = timm.create_model('test_l2vit', num_classes=0, global_mixer='flatten').eval()
    source = analyze_model(model, _images(), query_points=[(0.5, 0.5)], erf=True)
    summary = source.summary()
    for key in ('global/entropy', 'global/top9_mass', 'global/distance_px', 'global/negative_mass',
                'erf/with_lcm/area_ratio@0.5', 'erf/without_lcm/mean_distance_px', 'window/entropy'):
        assert key in summary, key
    kinds = [b.kind for b in source.blocks]
    assert kinds.count('flatten') == 4 and kinds.count('window') == 4
    assert [e.name for e in source.erf] == [b.name for b in source.blocks if b.kind == 'flatten']
    block = next(b for b in source.blocks if b.kind == 'flatten')
    assert 'focused' in block.to_dict()['row_semantics']
    assert block.stats.negative_mass == [0.] * block.heads  # focused rows are non-negative
    # the statistics are those of the mixer's own rows
    record = capture_attention_inputs(model, _images(), blocks=[block.name])[0]
    rows = global_attention_rows(record)
    torch.testing.assert_close(rows, record.module.attention_weights(record.tokens))
    p = rows / rows.sum(-1, keepdim=True)
    top1 = p.amax(-1).mean(dim=(0, 2)).double()
    torch.testing.assert_close(torch.tensor(block.stats.topk_mass[1], dtype=torch.float64), top1, rtol=1e-5, atol=1e-6)


def test_signed_rows_and_other_heads_in_the_analysis():
    torch.manual_seed(0)
    blocks = ['stages.0.blocks.1', 'stages.1.blocks.1']
    model = timm.create_model('test_l2vit', num_classes=0, global_mixer='inline').eval()
    with torch.no_grad():  # the tiny random init gives rows of nearly 1/N; larger q, k make some weights negative
        for name, p in model.named_parameters():
            if name.endswith('attn.qkv.weight'):
                p.mul_(15.)
    inline = analyze_model(model, _images(), query_points=[(0.5, 0.5)], erf=False, blocks=blocks)
    for b in inline.blocks:  # rows sum to one but are signed
        assert b.stats.row_mass == pytest.approx([1.] * b.heads)
        assert all(0. < v < 1. for v in b.stats.negative_mass)
    fcvit = analyze_model(timm.create_model('test_l2vit', num_classes=0, global_mixer='fcvit').eval(), _images(),
                          query_points=[(0.5, 0.5)], erf=False, blocks=blocks)
    for b in fcvit.blocks:  # 8 context heads whatever num_heads; uniform rows by construction
        assert b.heads == 8 and b.maps.shape[1] == 8
        assert b.stats.entropy == pytest.approx([1.] * 8)


def test_mixer_without_rows_is_skipped_but_its_erf_is_computed():
    torch.manual_seed(0)
    model = timm.create_model('test_l2vit', num_classes=0, global_mixer='vicinity',
                              mixer_kwargs={'vicinity': {'sr_ratio': 2}}).eval()
    blocks = ['stages.0.blocks.0', 'stages.0.blocks.1']
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        source = analyze_model(model, _images(), query_points=[(0.5, 0.5)], erf=True, blocks=blocks)
    assert any('stages.0.blocks.1' in str(w.message) and 'reduced grid' in str(w.message) for w in caught)
    assert [b.kind for b in source.blocks] == ['window']
    assert [e.name for e in source.erf] == ['stages.0.blocks.1']
    assert set(source.erf[0].maps) == {'with_lcm', 'without_lcm'}
    assert 'erf/with_lcm/area_ratio@0.5' in source.summary()


def test_mixer_without_the_method_is_skipped_with_a_warning(monkeypatch):
    from l2vit.layers.mixers import FocusedLinearAttention

    torch.manual_seed(0)
    model = timm.create_model('test_l2vit', num_classes=0, global_mixer='flatten').eval()
    monkeypatch.delattr(FocusedLinearAttention, 'attention_weights')
    with pytest.warns(UserWarning, match=r"no attention maps for mixer\(s\) \['flatten'\]"):
        source = analyze_model(model, _images(), query_points=[(0.5, 0.5)], erf=True,
                               blocks=['stages.0.blocks.0', 'stages.0.blocks.1'])
    assert [b.kind for b in source.blocks] == ['window']
    assert [e.label for e in source.erf] == ['s0.b1 flatten+LCM']
