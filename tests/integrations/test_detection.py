"""torchvision Mask R-CNN / RetinaNet on L2ViT: structure of the official recipe, training, any image size."""
from __future__ import annotations

import torch
from torchvision.models.detection import MaskRCNN, RetinaNet

from l2vit.integrations import L2ViTBackbone, LastLevelP6P7OnInput, build_mask_rcnn, build_retinanet

_SMALL_HEADS = dict(representation_size=64, mask_head_channels=32)


def _targets(sizes, with_masks=True):
    out = []
    for i, (h, w) in enumerate(sizes):
        boxes = torch.tensor([[4., 6., w * 0.6, h * 0.7]]) if i % 2 == 0 else torch.zeros(0, 4)
        t = {'boxes': boxes, 'labels': torch.ones(len(boxes), dtype=torch.int64)}
        if with_masks:
            masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
            for m, b in zip(masks, boxes.long()):
                m[b[1]:b[3], b[0]:b[2]] = 1
            t['masks'] = masks
        out.append(t)
    return out


def test_mask_rcnn_uses_stages_1_to_4_with_a_maxpool_p6():
    model = build_mask_rcnn(4, backbone='test_l2vit', fpn_channels=32, min_size=64, max_size=96, **_SMALL_HEADS)
    assert isinstance(model, MaskRCNN)
    assert model.backbone.body.out_indices == (0, 1, 2, 3)
    feats = model.backbone(torch.randn(1, 3, 64, 96))
    assert list(feats) == ['0', '1', '2', '3', 'pool']
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert model.rpn._post_nms_top_n['training'] == 1000  # mmdet 2.x RPN train proposals
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.box_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def test_retinanet_uses_stages_2_to_4_and_p6_p7_from_c5():
    model = build_retinanet(4, backbone='test_l2vit', fpn_channels=32, min_size=64, max_size=96)
    assert isinstance(model, RetinaNet)
    assert model.backbone.body.out_indices == (1, 2, 3) and model.backbone.body.strides == [8, 16, 32]
    extra = model.backbone.fpn.extra_blocks
    assert isinstance(extra, LastLevelP6P7OnInput) and not extra.use_P5 and extra.p6.in_channels == 128
    feats = model.backbone(torch.randn(1, 3, 64, 96))
    assert list(feats) == ['0', '1', '2', 'p6', 'p7']
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    assert model.detections_per_img == 100
    assert model.anchor_generator.num_anchors_per_location() == [9] * 5
    # P6 stays on C5 even when C5 has as many channels as the FPN (torchvision would switch to P5)
    same = build_retinanet(3, backbone=L2ViTBackbone('test_l2vit', out_indices=(1, 2, 3)), fpn_channels=128)
    assert not same.backbone.fpn.extra_blocks.use_P5


def _train_steps(model, images, targets, steps, lr=1e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_lowers_the_loss_with_empty_images_in_the_batch():
    torch.manual_seed(0)
    sizes = [(64, 80), (45, 77)]  # the second image has no object
    images = [torch.rand(3, h, w) for h, w in sizes]
    # (builder, head kwargs, masks, lr, steps, required drop): RetinaNet's focal loss starts flat (prior 0.01)
    cases = ((build_mask_rcnn, _SMALL_HEADS, True, 1e-3, 8, 0.8), (build_retinanet, {}, False, 3e-4, 10, 0.95))
    for build, kw, masks, lr, steps, drop in cases:
        model = build(3, backbone='test_l2vit', fpn_channels=32, min_size=64, max_size=96, **kw)
        losses = _train_steps(model, images, _targets(sizes, masks), steps=steps, lr=lr)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert sum(losses[-2:]) / 2 < drop * sum(losses[:2]) / 2, (build.__name__, losses)

def test_any_image_size_gives_detections_in_original_coordinates():
    model = build_mask_rcnn(3, backbone='test_l2vit', fpn_channels=32, min_size=64, max_size=96,
                            box_score_thresh=0.0, **_SMALL_HEADS).eval()
    sizes = [(37, 50), (67, 80), (33, 129)]
    with torch.no_grad():
        outs = model([torch.rand(3, h, w) for h, w in sizes])
    for (h, w), out in zip(sizes, outs):
        assert out['masks'].shape[-2:] == (h, w)
        if len(out['boxes']):
            assert out['boxes'][:, 2].max() <= w and out['boxes'][:, 3].max() <= h
    # the RoI pooling scales come from the strides, not from the first batch (torchvision guesses 2x wrong here)
    assert model.roi_heads.box_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def test_train_resize_switch():
    model = build_retinanet(3, backbone='test_l2vit', fpn_channels=32, min_size=64, max_size=96)
    assert not model.transform._skip_resize  # torchvision's behaviour for Python-API users
    model = build_retinanet(3, backbone='test_l2vit', fpn_channels=32, train_resize=False)
    model.train()
    image_list, _ = model.transform([torch.rand(3, 50, 70)], _targets([(50, 70)], with_masks=False))
    assert image_list.image_sizes == [(50, 70)]  # the data pipeline already chose the scale
