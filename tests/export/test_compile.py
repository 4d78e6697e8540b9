"""torch.compile: one graph (no graph breaks) and, with dynamic=True, no recompilation when the resolution changes."""
from __future__ import annotations

import pytest
import timm
import torch
from torch._dynamo.utils import counters


@pytest.mark.slow
@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'autograd'])
def test_fullgraph_dynamic_does_not_recompile_per_size(grad):
    torch._dynamo.reset()
    counters.clear()
    model = timm.create_model('test_l2vit').eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend='eager')  # graph capture and guards
    # every side above 224 px: more than one window per side in every stage (sizes at or below 224 px on a side
    # share a handful of other graphs, where a stage has a single window per side)
    sizes = [(256, 288), (320, 480), (417, 301), (512, 256)]
    with torch.set_grad_enabled(grad):
        for h, w in sizes:
            x = torch.randn(2, 3, h, w)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counters['stats']['unique_graphs'] == 1
    assert not counters['graph_break']


@pytest.mark.slow
def test_inductor_matches_eager():
    torch._dynamo.reset()
    model = timm.create_model('test_l2vit').eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for shape in [(2, 3, 256, 320), (1, 3, 300, 260)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
