"""L²ViT as a dense-prediction backbone: multi-scale NCHW maps with a fresh LayerNorm per output level.

One model source: the backbone is ``timm.create_model(name, num_classes=0)`` with the stages past the last requested
one, the classification norm and the head pruned through timm's ``prune_intermediate_layers``; features come from
``forward_intermediates``. Like the official detection/segmentation backbone (spec §6.1), each requested stage ``i``
gets its own new ``LayerNorm(C_i)`` named ``norm{i}``, so official detection/segmentation checkpoints
(``backbone.norm{i}.*``) load by name.

Window size: the official detection and segmentation code never forwards the window size to the blocks, so it is
always 7 there. Here the model's own window size is kept by default (7 for T/S/B, 12 for ``l2vit_base_384``);
``window_size=7`` reproduces the official dense-prediction behaviour for any variant.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn

from ..models import CheckpointError, checkpoint_filter_fn

__all__ = ['L2ViTBackbone', 'read_weights', 'backbone_state_dict']

_logger = logging.getLogger(__name__)

# prefixes under which a backbone sits in whole-model checkpoints: ours (torchvision detectors, UperNet) and the
# official mmdet / mmseg ones; the first that matches is stripped
_CONTAINER_PREFIXES = ('backbone.body.', 'backbone.')
_STAGE_KEY = re.compile(r'^(?:stages|downsample_layers)\.(\d+)\.')
_OUT_NORM_KEY = re.compile(r'^norm(\d+)\.')


def read_weights(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from anything the training engine understands.

    A run or checkpoint directory of ours, a converted / ``local-dir:`` directory, a ``.safetensors`` file, an official
    ImageNet release ``.pth`` (``model`` / ``model_ema``) or an official mmdet / mmseg checkpoint (``state_dict``).

    Args:
        path: Where the weights are (a ``local-dir:`` prefix is accepted).
        use_ema: Prefer EMA weights when the source has both. The official dense-prediction recipes initialise from
            the raw ``model`` weights of the ImageNet checkpoints, hence the default.

    Returns:
        The state dict, with tensors only.
    """
    from ..engine.weights import read_state_dict, resolve_weight_source

    src = resolve_weight_source(str(path).removeprefix('local-dir:'), use_ema=use_ema)
    state_dict, _ = read_state_dict(src, use_ema=use_ema)
    return state_dict


def backbone_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone part of ``state_dict``, prefixes stripped.

    ``module.`` is removed; then, if any key sits under ``backbone.body.`` (our torchvision detectors) or
    ``backbone.`` (UperNet, official mmdet / mmseg checkpoints), only those keys are kept, without the prefix; a
    leading ``model.`` (our :class:`L2ViTBackbone` naming) is removed last. Classifier checkpoints pass through.
    """
    sd = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    for prefix in _CONTAINER_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return {k.removeprefix('model.'): v for k, v in sd.items()}


class L2ViTBackbone(nn.Module):
    """Multi-scale feature extractor over an L²ViT (or any timm model with ``forward_intermediates``).

    Args:
        model_name: timm model name (``l2vit_tiny``, ``l2vit_small``, ``l2vit_base``, ``test_l2vit``, ...).
        out_indices: Stages to return (0-based; stage ``i`` has stride ``4 * 2**i``).
        frozen_stages: mmdet convention: -1 trains everything, 0 freezes the stem, ``k >= 1`` freezes the stem and
            stages ``0 .. k-1`` (weights fixed, norms in eval mode).
        norm_eval: Keep every BatchNorm of the backbone in eval mode while training (the official recipes do not).
        window_size: LWA window side; None keeps the model's (see the module docstring for the official value 7).
        drop_path_rate: Maximum stochastic depth of the backbone.
        out_norm: Apply a fresh ``LayerNorm(C_i)`` (``norm{i}``) to each returned map, as the official backbone.
        pretrained: Weights to load (see :func:`read_weights` and :meth:`load_pretrained`), or None.
        pretrained_ema: Prefer EMA weights of ``pretrained`` when it has both.
        **model_kwargs: Further ``timm.create_model`` arguments (``global_mixer``, ``use_lcm``, ``dims``, ...).
    """

    def __init__(
            self,
            model_name: str = 'l2vit_tiny',
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = False,
            window_size: int | Sequence[int] | None = None,
            drop_path_rate: float = 0.,
            out_norm: bool = True,
            pretrained: str | os.PathLike | None = None,
            pretrained_ema: bool = False,
            **model_kwargs: Any,
    ):
        super().__init__()
        if not timm.is_model(model_name):
            raise ValueError(f"unknown backbone '{model_name}'; L2ViT models: {', '.join(timm.list_models('*l2vit*'))}")
        kwargs = dict(model_kwargs, num_classes=0, drop_path_rate=drop_path_rate)
        if window_size is not None:
            kwargs['window_size'] = window_size
        model = timm.create_model(model_name, **kwargs)
        if not hasattr(model, 'forward_intermediates') or not hasattr(model, 'prune_intermediate_layers'):
            raise ValueError(f'{model_name} has no forward_intermediates / prune_intermediate_layers; it cannot be '
                             'used as a dense-prediction backbone')
        num_stages = len(model.feature_info)
        indices = sorted({i % num_stages if -num_stages <= i < num_stages else i for i in out_indices})
        if not indices or any(not 0 <= i < num_stages for i in indices):
            raise ValueError(f'out_indices must name stages in 0..{num_stages - 1} (negative counts from the end), '
                             f'got {tuple(out_indices)}')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be in -1..{num_stages}, got {frozen_stages}')
        info = [dict(model.feature_info[i]) for i in indices]
        model.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        self.model = model
        self.model_name = model_name
        self.out_indices = tuple(indices)
        self.num_stages = num_stages
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.feature_info = info
        self.channels = [f['num_chs'] for f in info]
        self.strides = [f['reduction'] for f in info]
        for i, c in zip(indices, self.channels):
            # eps 1e-5: PyTorch's LayerNorm default, as in the official backbone
            self.add_module(f'norm{i}', LayerNorm2d(c, eps=1e-5) if out_norm else nn.Identity())
        self._freeze()
        if pretrained is not None:
            self.load_pretrained(read_weights(pretrained, use_ema=pretrained_ema))

    # ------------------------------------------------------------------------------------------------ weights
    def load_pretrained(self, state_dict: Mapping[str, Any]) -> list[str]:
        """Load backbone weights strictly, except the per-level norms when the source has none.

        Accepts an ImageNet state dict (ours or official names, whole training checkpoints too), or a whole
        detector / segmenter state dict (ours, or official mmdet / mmseg with ``backbone.`` keys). The classification
        norm and head and the stages this backbone pruned are skipped; any other missing, unexpected or mis-shaped key
        raises a :class:`~l2vit.CheckpointError` naming it.

        Returns:
            The names of the per-level norms left freshly initialised (empty when the source had them).
        """
        sd = backbone_state_dict(_select(state_dict))
        last = self.out_indices[-1]
        out_norms: dict[str, Any] = {}
        body: dict[str, Any] = {}
        for k, v in sd.items():
            stage = _STAGE_KEY.match(k)
            if _OUT_NORM_KEY.match(k):
                out_norms[k] = v
            elif k.startswith(('norm.', 'head.')):
                continue  # classification norm and head: not part of a dense backbone
            elif stage is not None and int(stage.group(1)) > last:
                continue  # stages after the last output were pruned (downsample_layers.0 is the stem)
            else:
                body[k] = v
        try:
            body = checkpoint_filter_fn(body, self.model)
        except ValueError as e:
            raise CheckpointError(f'backbone weights do not fit {self.model_name}: {e}') from e
        self.model.load_state_dict(body, strict=True)
        fresh = self._load_out_norms(out_norms)
        self._freeze()
        return fresh

    def _load_out_norms(self, out_norms: dict[str, Any]) -> list[str]:
        wanted = {f'norm{i}.{p}' for i in self.out_indices for p in ('weight', 'bias')}
        if not isinstance(getattr(self, f'norm{self.out_indices[0]}'), LayerNorm2d):
            wanted = set()
        extra = sorted(set(out_norms) - wanted)
        if extra:
            warnings.warn(f'the checkpoint has output norms this backbone does not use (out_indices '
                          f'{self.out_indices}): {", ".join(extra)}; they are skipped', stacklevel=3)
        present = {k: v for k, v in out_norms.items() if k in wanted}
        if not present:
            fresh = sorted({k.split('.')[0] for k in wanted})
            if fresh:
                _logger.info(f'output norms {", ".join(fresh)} are freshly initialised (not in the checkpoint)')
            return fresh
        missing = sorted(wanted - set(present))
        if missing:
            raise CheckpointError(f'the checkpoint has only some of the output norms: missing {", ".join(missing)}')
        for k, v in present.items():
            name, param = k.split('.')
            target = getattr(getattr(self, name), param)
            if target.shape != v.shape:
                raise CheckpointError(f'{k}: checkpoint {tuple(v.shape)} vs backbone {tuple(target.shape)}')
            with torch.no_grad():
                target.copy_(v)
        return []

    # ------------------------------------------------------------------------------------------------ freezing
    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules: list[nn.Module] = [self.model.stem]
        modules += [self.model.stages[i] for i in range(min(self.frozen_stages, len(self.model.stages)))]
        return modules

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> L2ViTBackbone:
        """Set train mode, keeping frozen stages (and with ``norm_eval`` every BatchNorm) in eval mode."""
        super().train(mode)
        if mode:
            for m in self._frozen_modules():
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Image batch ``(B, 3, H, W)`` → one normed NCHW map per output index, at strides ``self.strides``.

        Map ``i`` has ``ceil(H / stride_i) × ceil(W / stride_i)`` cells; pad the input to a multiple of the largest
        stride (32) when the levels must line up exactly, as detectors and UperNet do.
        """
        feats = self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True,
                                                 stop_early=True)
        return [getattr(self, f'norm{i}')(f) for i, f in zip(self.out_indices, feats)]


def _select(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """A checkpoint dict's weights (raw ``model`` / ``state_dict`` first, as the official dense recipes load)."""
    for key in ('state_dict', 'model', 'model_ema', 'state_dict_ema'):
        if isinstance(state_dict.get(key), Mapping):
            return state_dict[key]
    return state_dict
