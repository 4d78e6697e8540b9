"""The README's model table is computed by the package, so it cannot drift from the code."""
from __future__ import annotations

import re

import timm

from l2vit.bench import count_macs
from tests.helpers import REPO_ROOT


def test_readme_model_table_matches_the_code():
    rows = re.findall(r'^\| `(\w+)` \| [\d-]+ \| [\d-]+ \| (\d+) \| (\d+) \| ([\d,]+) \| ([\d.]+) \|',
                      (REPO_ROOT / 'README.md').read_text(), flags=re.M)
    assert len(rows) == 5
    for name, window, size, params, gmacs in rows:
        model = timm.create_model(name, device='meta')
        assert model.stages[0].blocks[0].attn.window_size == int(window)
        assert model.pretrained_cfg['input_size'][1] == int(size)
        assert sum(p.numel() for p in model.parameters()) == int(params.replace(',', ''))
        assert f'{count_macs(model, (3, int(size), int(size))).total / 1e9:.2f}' == gmacs
