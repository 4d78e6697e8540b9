"""Drawing detections and class maps, and writing them as PNG."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from l2vit.integrations import draw_detections, draw_segmentation, palette, save_png


def test_detections_are_drawn_above_the_score_threshold():
    image = torch.full((3, 40, 50), 100, dtype=torch.uint8)
    mask = torch.zeros(2, 1, 40, 50)
    mask[0, 0, 10:20, 10:30] = 0.9
    out = {'boxes': torch.tensor([[10., 10., 30., 20.], [0., 0., 5., 5.]]), 'labels': torch.tensor([1, 2]),
           'scores': torch.tensor([0.9, 0.1]), 'masks': mask}
    drawn = draw_detections(image, out, ['a', 'b'], score_threshold=0.5)
    assert drawn.shape == image.shape and drawn.dtype == torch.uint8
    assert not torch.equal(drawn[:, 15, 20], image[:, 15, 20])  # mask overlay inside the kept detection
    assert torch.equal(drawn[:, 2, 2], image[:, 2, 2])  # the low-score one is not drawn
    no_masks = {k: v for k, v in out.items() if k != 'masks'}
    assert torch.equal(draw_detections(image, no_masks, ['a', 'b'], score_threshold=0.95), image)


def test_class_map_overlay_keeps_ignored_pixels():
    image = torch.full((3, 4, 4), 200, dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 2, 255]] * 4)
    drawn = draw_segmentation(image, pred, 3, alpha=1.0)
    for c in range(3):
        assert drawn[:, 0, c].tolist() == list(palette(3)[c])
    assert drawn[:, 0, 3].tolist() == [200, 200, 200]
    assert len(set(palette(150))) == 150


def test_png_round_trip(tmp_path):
    image = torch.randint(0, 256, (3, 7, 9), dtype=torch.uint8)
    path = save_png(image, tmp_path / 'sub' / 'x.png')
    assert np.array_equal(np.asarray(Image.open(path)), image.permute(1, 2, 0).numpy())
    assert [p.name for p in path.parent.iterdir()] == ['x.png']  # no temporary file left behind
