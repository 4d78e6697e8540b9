"""COCO mAP and segmentation mIoU: perfect predictions score 1.0, known cases score what they should."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from l2vit.integrations import coco_evaluate, confusion_matrix, detections_to_coco, load_coco, segmentation_metrics
from l2vit.integrations.metrics import format_coco_metrics, format_segmentation_metrics


def _gt_as_results(coco) -> list[dict]:
    return [{'image_id': a['image_id'], 'category_id': a['category_id'], 'bbox': a['bbox'], 'score': 1.0,
             'segmentation': a['segmentation']} for a in coco.dataset['annotations']]


def test_ground_truth_fed_back_scores_map_one(coco_root):
    coco = load_coco(coco_root / 'val.json')
    metrics, text = coco_evaluate(coco, _gt_as_results(coco), ('bbox', 'segm'))
    for kind in ('bbox', 'segm'):
        assert metrics[f'{kind}_mAP'] == pytest.approx(1.0)
        assert metrics[f'{kind}_mAP_50'] == pytest.approx(1.0) and metrics[f'{kind}_mAP_75'] == pytest.approx(1.0)
        assert metrics[f'{kind}_mAP_s'] == pytest.approx(1.0)  # every synthetic object is small
        assert math.isnan(metrics[f'{kind}_mAP_l'])  # no large object: COCOeval's -1 becomes NaN
    assert 'Average Precision' in text and 'bbox mAP 100.0' in format_coco_metrics(metrics)


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # pycocotools decode vs numpy 2
def test_torchvision_outputs_round_trip_through_coco_results(coco_root):
    """GT boxes and masks as torchvision detections -> COCO results -> mAP 1.0 (label and XYWH mapping)."""
    coco = load_coco(coco_root / 'val.json')
    cat_ids = sorted(coco.getCatIds())
    results = []
    for img_id, img in coco.imgs.items():
        anns = coco.imgToAnns[img_id]
        boxes = torch.tensor([a['bbox'] for a in anns])
        boxes[:, 2:] += boxes[:, :2]
        masks = torch.from_numpy(np.stack([mask_util.decode(a["segmentation"]) for a in anns])).float()[:, None]
        out = {'boxes': boxes, 'scores': torch.ones(len(anns)),
               'labels': torch.tensor([cat_ids.index(a['category_id']) + 1 for a in anns]), 'masks': masks}
        results += detections_to_coco(out, img_id, cat_ids)
    metrics, _ = coco_evaluate(coco, results, ('bbox', 'segm'))
    assert metrics['bbox_mAP'] == pytest.approx(1.0) and metrics['segm_mAP'] == pytest.approx(1.0)
    # a wrong class halves nothing silently: it is simply a miss
    for r in results:
        r['category_id'] = cat_ids[(cat_ids.index(r['category_id']) + 1) % 3]
    assert coco_evaluate(coco, results)[0]['bbox_mAP'] < 0.5


def test_no_detection_gives_zero_with_a_warning(coco_root):
    coco = load_coco(coco_root / 'val.json')
    with pytest.warns(UserWarning, match='no bbox detection'):
        metrics, _ = coco_evaluate(coco, [])
    assert metrics['bbox_mAP'] == 0.0
    assert detections_to_coco({'boxes': torch.zeros(0, 4), 'scores': torch.zeros(0),
                               'labels': torch.zeros(0, dtype=torch.int64)}, 1, [1]) == []


def test_miou_of_perfect_and_known_predictions():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    m = segmentation_metrics(confusion_matrix(target.clone(), target, 3), ['a', 'b', 'c'])
    assert m['mIoU'] == 1.0 and m['aAcc'] == 1.0 and m['IoU'] == {'a': 1.0, 'b': 1.0, 'c': 1.0}
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])  # ignored pixels never count
    m = segmentation_metrics(confusion_matrix(pred, target, 3))
    # class 0: inter 1, union 3; class 1: inter 2, union 3; class 2: inter 1, union 2
    assert m['IoU'] == pytest.approx({'0': 1 / 3, '1': 2 / 3, '2': 1 / 2})
    assert m['mIoU'] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m['aAcc'] == pytest.approx(4 / 6)
    # a class absent from both prediction and ground truth is NaN and left out of the mean
    m = segmentation_metrics(confusion_matrix(target.clamp(max=1), target.clamp(max=1), 4))
    assert math.isnan(m['IoU']['3']) and m['mIoU'] == 1.0
    assert 'mIoU 100.00' in format_segmentation_metrics(m)


def test_ignore_only_targets_give_nan_with_a_warning():
    target = torch.full((4, 4), 255)
    conf = confusion_matrix(torch.zeros(4, 4, dtype=torch.long), target, 2)
    assert conf.sum() == 0
    with pytest.warns(UserWarning, match='no labelled pixel'):
        m = segmentation_metrics(conf)
    assert math.isnan(m['mIoU']) and math.isnan(m['aAcc'])
