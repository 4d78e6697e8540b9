"""The analysis of several models and its report: numbers, maps, figures and JSON agree with each other."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from l2vit.analysis import (
    analyze,
    capture_attention_inputs,
    default_variants,
    global_attention_rows,
    images_from_tensor,
    normalized_entropy,
    write_report,
)

BLOCKS = ['stages.0.blocks.0', 'stages.0.blocks.1', 'stages.1.blocks.1']
QUERIES = [(0.5, 0.5), (0.1, 0.9)]


@pytest.fixture(scope='module')
def analysed():
    torch.manual_seed(0)
    model = timm.create_model('test_l2vit', num_classes=0).eval()
    with torch.no_grad():  # peakier attention than the tiny random init gives
        for name, p in model.named_parameters():
            if name.endswith('qkv.weight'):
                p.mul_(15.)
    models = {**default_variants(model), 'L²ViT': model}
    images = images_from_tensor(torch.randn(2, 3, 64, 72), model, names=['a.png', 'b.png'])
    result = analyze(models, images, query_points=QUERIES, topk=(1, 9), blocks=BLOCKS, chunk_size=50)
    return model, images, result


def test_result_structure_and_summary(analysed):
    model, _, result = analysed
    assert [s.label for s in result.sources] == ['softmax (same weights)', 'linear, no LCM (same weights)', 'L²ViT']
    main = result.sources[-1]
    assert [b.name for b in main.blocks] == BLOCKS
    assert [b.kind for b in main.blocks] == ['window', 'linear', 'linear']
    assert [b.kind for b in result.sources[0].blocks] == ['window', 'softmax', 'softmax']
    lga = main.blocks[1]
    assert lga.grid == (16, 18) and lga.stride == 4 and lga.maps.shape == (2, 1, 2, 16, 18)
    assert lga.query_tokens == [(7, 8), (1, 15)]
    # ERFs: with and without LCM for L²ViT's global blocks, the block alone without LCMs
    assert [e.name for e in main.erf] == BLOCKS[1:] and set(main.erf[0].maps) == {'with_lcm', 'without_lcm'}
    assert set(result.sources[1].erf[0].maps) == {'block'}
    summary = main.summary()
    assert summary['global/entropy'] == pytest.approx((lga.stats.to_dict()['entropy']['mean']
                                                       + main.blocks[2].stats.to_dict()['entropy']['mean']) / 2)
    for key in ('window/entropy', 'global/top9_mass', 'global/distance_px', 'erf/with_lcm/area_ratio@0.5',
                'erf/without_lcm/mean_distance_px'):
        assert key in summary
    # the query-point metrics are those of the exact attention rows
    record = capture_attention_inputs(model, analysed[1].tensor, blocks=[BLOCKS[1]])[0]
    rows = global_attention_rows(record, [7 * 18 + 8])[:, :, 0]
    expected = normalized_entropy(rows / rows.sum(-1, keepdim=True))
    torch.testing.assert_close(torch.tensor(lga.query_metrics[0]['entropy']), expected, rtol=1e-5, atol=1e-6)


def test_report_files(analysed, tmp_path):
    _, images, result = analysed
    files = write_report(result, tmp_path / 'out', images, figure_images=1)
    data = json.loads((tmp_path / 'out' / 'analysis.json').read_text())
    assert set(data['files'].values()) | {'analysis.json'} == {p.name for p in (tmp_path / 'out').iterdir()}
    # every number of the result is in the JSON
    for source, jsource in zip(result.sources, data['sources']):
        assert jsource['label'] == source.label and jsource['summary'] == pytest.approx(source.summary())
        for block, jblock in zip(source.blocks, jsource['blocks']):
            assert jblock['metrics'] == block.stats.to_dict()
        for erf, jerf in zip(source.erf, jsource['erf']):
            assert jerf['stats'] == json.loads(json.dumps(erf.stats))
    assert data['query_points'] == [list(q) for q in QUERIES] and data['images'] == ['a.png', 'b.png']
    tensors = load_file(files['tensors'])
    assert tensors['l2vit/stages.0.blocks.1/maps'].shape == (2, 1, 2, 16, 18)
    assert tensors['l2vit/stages.0.blocks.1/erf_without_lcm'].shape == (16, 18)
    torch.testing.assert_close(tensors['softmax_same_weights/stages.1.blocks.1/maps'],
                               result.sources[0].blocks[2].maps)
    # the figures: per-layer metrics, overlays of the two global blocks for one image, one ERF figure per model
    expected = {'entropy_per_layer', 'distance_px_per_layer', 'top1_mass_per_layer', 'top9_mass_per_layer',
                'attention_stages-0-blocks-1_img0', 'attention_stages-1-blocks-1_img0', 'erf_softmax_same_weights',
                'erf_linear_no_lcm_same_weights', 'erf_l2vit'}
    assert {k for k in files if k not in ('json', 'tensors')} == expected
    for key in expected:
        with Image.open(files[key]) as img:
            assert img.format == 'PNG' and min(img.size) > 100
    with pytest.raises(ValueError, match="figure_blocks must be 'global', 'all' or 'none'"):
        write_report(result, tmp_path / 'x', images, figure_blocks='some')
