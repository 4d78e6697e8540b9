"""torchvision detectors on an L²ViT backbone: Mask R-CNN + FPN and RetinaNet + FPN, one call each (spec §6.2).

Both follow torchvision's conventions (``num_classes`` counts the background class 0; images are float RGB in
[0, 1], normalised and padded to a multiple of 32 by the model; ``model(images, targets)`` returns the losses in
training mode and ``model(images)`` the detections in eval mode), with the mmdet 2.x settings of the official
recipes where torchvision differs: 1000 RPN proposals per image in training, 100 RetinaNet detections per image,
an FPN over stages 1-4 (Mask R-CNN, max-pooled P6) or stages 2-4 with P6/P7 computed from C5 (RetinaNet).

Known differences from mmdet that torchvision's heads impose: RoIAlign uses ``aligned=False`` and sampling ratio 2
(mmdet: ``aligned=True``, adaptive sampling) and FPN convolutions use torchvision's initialisation.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)
from torchvision.ops.poolers import initLevelMapper

from .backbone import L2ViTBackbone

__all__ = ['L2ViTFPN', 'LastLevelP6P7OnInput', 'build_mask_rcnn', 'build_retinanet', 'DETECTORS', 'build_detector',
           'IMAGE_MEAN', 'IMAGE_STD']

# the official recipe's normalisation (mmdet: mean 123.675 / 116.28 / 103.53, std 58.395 / 57.12 / 57.375 on 0-255)
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class LastLevelP6P7OnInput(LastLevelP6P7):
    """P6 = conv3×3/2(C5), P7 = conv3×3/2(ReLU(P6)) — mmdet's ``add_extra_convs='on_input'``.

    torchvision's ``LastLevelP6P7`` switches to P5 when C5 happens to have as many channels as the FPN; the
    official RetinaNet always starts from C5.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.use_P5 = False


class L2ViTFPN(nn.Module):
    """An :class:`L2ViTBackbone` followed by torchvision's FPN: the ``backbone`` of a torchvision detector.

    Args:
        body: The multi-scale backbone.
        out_channels: FPN channels (256 in the official recipes).
        extra_blocks: torchvision extra FPN block (``LastLevelMaxPool`` / ``LastLevelP6P7OnInput``).

    The forward returns an ``OrderedDict`` of NCHW maps: ``'0'``, ``'1'``, ... for the backbone levels, then the
    names the extra block adds (``'pool'`` or ``'p6'``, ``'p7'``).
    """

    def __init__(self, body: L2ViTBackbone, out_channels: int = 256, extra_blocks: ExtraFPNBlock | None = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.channels), out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _fix_roi_scales(pool: nn.Module, strides: Sequence[int]) -> None:
    """Give a ``MultiScaleRoIAlign`` the backbone's strides instead of letting it guess them.

    torchvision infers each level's scale on the first forward from feature size / largest image size, rounded to a
    power of two. Padding to a multiple of 32 can make that guess wrong by 2x for small images (a 67-px image padded
    to 96), and the guess is then cached for the model's life. The strides are known, so they are set here.
    """
    if not isinstance(pool, MultiScaleRoIAlign) or len(pool.featmap_names) != len(strides):
        return
    pool.scales = [1.0 / s for s in strides]
    pool.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                      canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)


def _backbone(backbone: str | L2ViTBackbone, out_indices: Sequence[int], **kwargs: Any) -> L2ViTBackbone:
    if isinstance(backbone, L2ViTBackbone):
        if tuple(backbone.out_indices) != tuple(out_indices):
            raise ValueError(f'this detector needs backbone out_indices {tuple(out_indices)}, got '
                             f'{backbone.out_indices}')
        return backbone
    return L2ViTBackbone(backbone, out_indices=out_indices, **kwargs)


def build_mask_rcnn(
        num_classes: int,
        backbone: str | L2ViTBackbone = 'l2vit_tiny',
        pretrained: str | os.PathLike | None = None,
        drop_path_rate: float = 0.1,
        window_size: int | None = None,
        frozen_stages: int = -1,
        fpn_channels: int = 256,
        representation_size: int = 1024,
        mask_head_channels: int = 256,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        train_resize: bool = True,
        backbone_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN + FPN on L²ViT stages 1-4 (strides 4-32; FPN levels P2-P6), as the official recipe.

    Args:
        num_classes: Classes including the background (torchvision convention: 81 for COCO's 80 categories).
        backbone: timm model name or a built :class:`L2ViTBackbone` with ``out_indices=(0, 1, 2, 3)``.
        pretrained: Backbone weights (ImageNet or a detector/segmenter checkpoint; see :class:`L2ViTBackbone`).
        drop_path_rate: Backbone stochastic depth (official: 0.1 for T/S and 0.2 for B at 1x; +0.1 at 3x).
        window_size: LWA window; None keeps the model's own (the official detection code always uses 7).
        frozen_stages: Backbone stages to freeze (mmdet convention, -1: none).
        fpn_channels: FPN width (256).
        representation_size: Width of the two shared FC layers of the box head (1024).
        mask_head_channels: Channels of the four mask-head convolutions (256).
        min_size: Test-time shorter side (the last entry when a sequence); in training, a random entry when
            ``train_resize``.
        max_size: Longer-side cap (1333).
        train_resize: Let the model resize training images (torchvision's behaviour). ``l2vit det train`` turns it
            off because its data pipeline does the official multi-scale / crop augmentation.
        backbone_kwargs: Further :class:`L2ViTBackbone` / ``timm.create_model`` arguments.
        **kwargs: torchvision ``MaskRCNN`` arguments (``box_score_thresh``, ``rpn_post_nms_top_n_test``, ...).
    """
    body = _backbone(backbone, (0, 1, 2, 3), pretrained=pretrained, drop_path_rate=drop_path_rate,
                     window_size=window_size, frozen_stages=frozen_stages, **(backbone_kwargs or {}))
    net = L2ViTFPN(body, fpn_channels, LastLevelMaxPool())
    # torchvision builds the predictors from num_classes only at the default head widths; build them here so the
    # head widths are free (torchvision then wants num_classes=None)
    defaults: dict[str, Any] = dict(
        rpn_post_nms_top_n_train=1000,  # mmdet 2.x RPN train max_per_img
        box_head=TwoMLPHead(fpn_channels * 7 ** 2, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        mask_head=MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes),
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
    )
    model = MaskRCNN(net, num_classes=None, min_size=min_size, max_size=max_size, **{**defaults, **kwargs})
    model.transform._skip_resize = not train_resize
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        _fix_roi_scales(pool, body.strides)
    return model


def build_retinanet(
        num_classes: int,
        backbone: str | L2ViTBackbone = 'l2vit_tiny',
        pretrained: str | os.PathLike | None = None,
        drop_path_rate: float = 0.1,
        window_size: int | None = None,
        frozen_stages: int = -1,
        fpn_channels: int = 256,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        train_resize: bool = True,
        backbone_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
) -> RetinaNet:
    """RetinaNet + FPN on L²ViT stages 2-4 (strides 8-32) with P6/P7 from C5: levels P3-P7, as the official recipe.

    Arguments as :func:`build_mask_rcnn`; ``num_classes`` also counts the background (label 0 is never predicted);
    ``**kwargs`` go to torchvision ``RetinaNet`` (``score_thresh``, ``topk_candidates``, ...). Focal loss γ 2,
    α 0.25, L1 box loss, anchors of octave base 4 with 3 scales and ratios 0.5/1/2: torchvision's defaults.
    """
    body = _backbone(backbone, (1, 2, 3), pretrained=pretrained, drop_path_rate=drop_path_rate,
                     window_size=window_size, frozen_stages=frozen_stages, **(backbone_kwargs or {}))
    net = L2ViTFPN(body, fpn_channels, LastLevelP6P7OnInput(body.channels[-1], fpn_channels))
    defaults: dict[str, Any] = dict(detections_per_img=100, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    model = RetinaNet(net, num_classes=num_classes, min_size=min_size, max_size=max_size, **{**defaults, **kwargs})
    model.transform._skip_resize = not train_resize
    return model


DETECTORS = {'mask_rcnn': build_mask_rcnn, 'retinanet': build_retinanet}


def build_detector(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``build_mask_rcnn`` or ``build_retinanet`` by name (``'mask_rcnn'`` / ``'retinanet'``)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector '{name}'; expected one of {', '.join(DETECTORS)}")
    return DETECTORS[name](num_classes, **kwargs)
