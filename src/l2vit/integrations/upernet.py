"""UperNet on an L²ViT backbone (spec §6.4), written here after mmseg's ``UPerHead`` and ``FCNHead``.

* Backbone: all four stages, a fresh LayerNorm per output (:class:`L2ViTBackbone`).
* Decode head: Pyramid Pooling Module on the last level (pool scales 1, 2, 3, 6), FPN top-down path over the four
  levels, all 512 channels with conv-BN-ReLU blocks, the four levels upsampled and fused, dropout 0.1, 1×1 classifier.
* Auxiliary head on stage 3: one 3×3 conv-BN-ReLU of 256 channels, dropout 0.1, 1×1 classifier; loss weight 0.4.
* Loss: cross-entropy on logits upsampled to the label size, ``ignore_index`` 255, averaged over all pixels
  (ignored ones count in the denominator, as mmseg's default ``avg_non_ignore=False``), so a batch with no labelled
  pixel gives 0, not NaN.

Like torchvision's segmentation models, the forward returns ``{'out': logits}`` at the input resolution, plus
``'aux'`` in training mode. Inputs are normalised images of any size: they are zero-padded to a multiple of 32 and
the logits cropped back.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import L2ViTBackbone

__all__ = ['ConvBNReLU', 'PPM', 'UPerHead', 'FCNHead', 'UperNet', 'build_upernet', 'slide_inference',
           'whole_inference']


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) → BatchNorm → ReLU: mmcv's ``ConvModule`` with ``norm_cfg=BN``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1):
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


class PPM(nn.Module):
    """Pyramid Pooling Module: adaptive average pools → 1×1 conv-BN-ReLU → upsample back, one branch per scale."""

    def __init__(self, in_chs: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_chs, channels, 1)) for s in pool_scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_upsample(stage(x), x.shape[-2:]) for stage in self.stages]


class _Classifier(nn.Module):
    """Dropout2d → 1×1 conv to the classes (mmseg ``conv_seg``, weights normal(0, 0.01), bias 0)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(nn.Module):
    """UperNet decode head over multi-level features (finest first).

    Args:
        in_channels: Channels of each input level.
        channels: Width of every internal conv (512).
        num_classes: Output classes.
        pool_scales: PPM scales on the last level.
        dropout: Dropout before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.psp_modules = PPM(in_channels[-1], channels, pool_scales)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.cls = _Classifier(channels, num_classes, dropout)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([feats[-1], *self.psp_modules(feats[-1])], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + _upsample(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_upsample(x, size) for x in outs[1:]], dim=1))
        return self.cls(fused)


class FCNHead(nn.Module):
    """mmseg ``FCNHead`` as UperNet's auxiliary head: ``num_convs`` 3×3 conv-BN-ReLU, dropout, 1×1 classifier."""

    def __init__(self, in_chs: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(*[ConvBNReLU(in_chs if i == 0 else channels, channels, 3) for i in range(num_convs)])
        self.cls = _Classifier(channels, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.convs(x))


class UperNet(nn.Module):
    """Backbone + UPerHead (+ auxiliary FCNHead on one level).

    Args:
        backbone: A 4-level :class:`L2ViTBackbone`.
        num_classes: Output classes (150 for ADE20K).
        channels: UPerHead width (512).
        pool_scales: PPM scales.
        dropout: Dropout before both classifiers.
        aux_index: Backbone level of the auxiliary head (2 = stage 3), or None for no auxiliary head.
        aux_channels: Auxiliary head width (256).
        aux_weight: Weight of the auxiliary loss (0.4).
        ignore_index: Label ignored by the loss.
    """

    def __init__(self, backbone: L2ViTBackbone, num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, aux_index: int | None = 2,
                 aux_channels: int = 256, aux_weight: float = 0.4, ignore_index: int = 255):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        self.backbone = backbone
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.aux_index = aux_index
        self.size_divisor = max(backbone.strides)
        self.decode_head = UPerHead(backbone.channels, channels, num_classes, pool_scales, dropout)
        self.auxiliary_head = None
        if aux_index is not None:
            if not 0 <= aux_index < len(backbone.channels):
                raise ValueError(f'aux_index {aux_index} is not a backbone level (0..{len(backbone.channels) - 1})')
            self.auxiliary_head = FCNHead(backbone.channels[aux_index], aux_channels, num_classes, 1, dropout)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images ``(B, 3, H, W)`` → ``{'out': (B, K, H, W)}`` (+ ``'aux'`` in training mode)."""
        h, w = x.shape[-2:]
        d = self.size_divisor
        x = F.pad(x, (0, math.ceil(w / d) * d - w, 0, math.ceil(h / d) * d - h))
        feats = self.backbone(x)
        out = {'out': _upsample(self.decode_head(feats), x.shape[-2:])[..., :h, :w]}
        if self.training and self.auxiliary_head is not None:
            out['aux'] = _upsample(self.auxiliary_head(feats[self.aux_index]), x.shape[-2:])[..., :h, :w]
        return out

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            logits = _upsample(logits, target.shape[-2:])
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction='none').mean()

    def loss(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{'loss_seg': ..., 'loss_aux': 0.4 × ...}`` for an int64 target ``(B, H, W)``; sum them to train."""
        losses = {'loss_seg': self._ce(outputs['out'], target)}
        if 'aux' in outputs:
            losses['loss_aux'] = self.aux_weight * self._ce(outputs['aux'], target)
        return losses


def build_upernet(
        num_classes: int = 150,
        backbone: str | L2ViTBackbone = 'l2vit_tiny',
        pretrained: str | os.PathLike | None = None,
        drop_path_rate: float = 0.3,
        window_size: int | None = None,
        frozen_stages: int = -1,
        backbone_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
) -> UperNet:
    """UperNet + auxiliary FCN head on an L²ViT, as the official ADE20K recipe (drop-path 0.3 for T, S and B).

    ``**kwargs`` go to :class:`UperNet` (``channels``, ``pool_scales``, ``aux_index``, ``aux_weight``, ...).
    """
    if not isinstance(backbone, L2ViTBackbone):
        backbone = L2ViTBackbone(backbone, out_indices=(0, 1, 2, 3), pretrained=pretrained,
                                 drop_path_rate=drop_path_rate, window_size=window_size, frozen_stages=frozen_stages,
                                 **(backbone_kwargs or {}))
    return UperNet(backbone, num_classes, **kwargs)


@torch.no_grad()
def whole_inference(model: nn.Module, image: torch.Tensor, out_size: Sequence[int] | None = None) -> torch.Tensor:
    """Logits ``(B, K, h, w)`` of whole images, resized to ``out_size`` (default: the input size)."""
    logits = model(image)['out']
    return _upsample(logits, out_size) if out_size is not None and tuple(out_size) != logits.shape[-2:] else logits


@torch.no_grad()
def slide_inference(model: nn.Module, image: torch.Tensor, num_classes: int, crop_size: Sequence[int] = (512, 512),
                    stride: Sequence[int] = (341, 341), out_size: Sequence[int] | None = None) -> torch.Tensor:
    """Logits from overlapping ``crop_size`` windows every ``stride`` pixels, averaged where they overlap (mmseg).

    Windows reaching past the border are shifted back inside; an image smaller than a window is one window.
    """
    b, _, h, w = image.shape
    ch, cw = (min(int(crop_size[0]), h), min(int(crop_size[1]), w))
    sh, sw = int(stride[0]), int(stride[1])
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    logits = image.new_zeros((b, num_classes, h, w))
    count = image.new_zeros((1, 1, h, w))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits[:, :, y1:y2, x1:x2] += model(image[:, :, y1:y2, x1:x2])['out']
            count[:, :, y1:y2, x1:x2] += 1
    logits = logits / count
    return _upsample(logits, out_size) if out_size is not None and tuple(out_size) != (h, w) else logits
