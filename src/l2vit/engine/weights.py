"""Reading weights from wherever they are: our checkpoints and runs, converted directories, official releases.

Sources, by what the path is:

* a run directory (has ``checkpoints/``): its ``best_ema`` / ``best`` checkpoint, else the newest one;
* a checkpoint directory of ours (has ``state.pt``) or a converted / timm ``local-dir`` directory (``config.json`` +
  ``model.safetensors``);
* a ``.safetensors`` file holding a state dict;
* any other file: a PyTorch checkpoint read safely by :func:`l2vit.load_checkpoint_file` (an official release
  ``.pth`` with ``model`` / ``model_ema``, or a plain state dict).

Official key names are mapped by :func:`l2vit.checkpoint_filter_fn`, which also re-initialises a classifier of another
size (with a warning) and names missing, unexpected or mis-shaped keys.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from ..models import CheckpointError, L2ViT, checkpoint_filter_fn, load_checkpoint_file
from .checkpoint import find_resume_checkpoint

__all__ = ['WeightSource', 'resolve_weight_source', 'read_state_dict', 'read_class_map', 'slice_classifier',
           'load_weights_into', 'load_finetune_weights', 'build_inference_model', 'InferenceModel']

_logger = logging.getLogger(__name__)

_HEAD_KEYS = (('head.fc.weight', 'head.fc.bias'), ('head.weight', 'head.bias'))


@dataclass
class WeightSource:
    """A resolved weight location: ``kind`` is 'ours', 'dir' (converted / local-dir), 'safetensors' or 'torch'."""
    path: Path
    kind: str
    config: dict[str, Any] = field(default_factory=dict)  # config.json of a directory source


def resolve_weight_source(path: str | os.PathLike, use_ema: bool = True) -> WeightSource:
    """Find out what ``path`` is (see the module docstring).

    Raises:
        CheckpointError: when the path does not exist or is a directory with no weights.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f'weights not found: {p}')
    if p.is_file():
        return WeightSource(p, 'safetensors' if p.suffix == '.safetensors' else 'torch')
    if (p / 'checkpoints').is_dir() and not (p / 'state.pt').exists():
        names = ('best_ema', 'best') if use_ema else ('best',)
        chosen = next((p / 'checkpoints' / n for n in names if (p / 'checkpoints' / n / 'state.pt').is_file()), None)
        if chosen is None:
            newest = find_resume_checkpoint(p)
            if not newest:
                raise CheckpointError(f'run directory {p} has no checkpoint yet')
            chosen = newest[0]
        p = chosen
    config = json.loads((p / 'config.json').read_text()) if (p / 'config.json').is_file() else {}
    if (p / 'state.pt').is_file():
        return WeightSource(p, 'ours', config)
    if (p / 'model.safetensors').is_file():
        return WeightSource(p, 'dir', config)
    raise CheckpointError(f'{p} holds no weights: expected a run or checkpoint directory of l2vit train, a converted '
                          'directory (config.json + model.safetensors) or a weight file')


def read_state_dict(src: WeightSource, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict, 'ema' | 'raw')`` of ``src``: EMA weights when ``use_ema`` and the source has them.

    Official training checkpoints hold ``model`` (raw) and ``model_ema``; the official fine-tuning reads ``model``.
    """
    if src.kind in ('ours', 'dir'):
        ema_file = src.path / 'model_ema.safetensors'
        if use_ema and ema_file.is_file():
            return dict(load_checkpoint_file(ema_file)), 'ema'
        return dict(load_checkpoint_file(src.path / 'model.safetensors')), 'raw'
    checkpoint = load_checkpoint_file(src.path)
    keys = ('model_ema', 'state_dict_ema', 'model', 'state_dict') if use_ema else ('model', 'state_dict')
    for key in keys:
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key]), 'ema' if key.endswith('ema') else 'raw'
    if any(k in checkpoint for k in ('model', 'model_ema', 'state_dict')):
        raise CheckpointError(f'{src.path}: no usable weights under {", ".join(keys)}')
    return dict(checkpoint), 'raw'


def read_class_map(path: str | os.PathLike) -> list[int]:
    """Class indices, one integer per line (blank lines and ``#`` comments ignored), e.g. ``map22kto1k.txt``."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f'class map file not found: {p}')
    indices = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        text = line.split('#', 1)[0].strip()
        if not text:
            continue
        try:
            indices.append(int(text))
        except ValueError:
            raise CheckpointError(f'{p}:{n}: expected one integer class index per line, got {line!r}') from None
    if not indices:
        raise CheckpointError(f'class map file {p} lists no class index')
    return indices


def slice_classifier(state_dict: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
    """Keep the classifier rows ``indices`` (in that order), e.g. 21841 -> 1000 classes (spec §5.3)."""
    for w_key, b_key in _HEAD_KEYS:
        for prefix in ('', 'module.'):
            if prefix + w_key in state_dict:
                w_key, b_key = prefix + w_key, prefix + b_key
                rows = state_dict[w_key].shape[0]
                bad = [i for i in indices if not 0 <= i < rows]
                if bad:
                    raise CheckpointError(f'class map indices {bad[:5]} are outside the checkpoint classifier '
                                          f'({rows} classes)')
                out = dict(state_dict)
                idx = torch.tensor(indices, dtype=torch.long)
                out[w_key] = state_dict[w_key][idx].clone()
                if b_key in state_dict:
                    out[b_key] = state_dict[b_key][idx].clone()
                return out
    raise CheckpointError('cannot slice the classifier: the checkpoint has no head.weight / head.fc.weight')


def load_weights_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load official or native weights into ``model``; only a re-initialised classifier may stay unloaded."""
    if isinstance(model, L2ViT):
        state_dict = checkpoint_filter_fn(state_dict, model)
    else:
        state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
        classifier = model.pretrained_cfg.get('classifier', 'head') if hasattr(model, 'pretrained_cfg') else 'head'
        target = model.state_dict()
        for k in [k for k in state_dict if k.startswith(classifier) and k in target]:
            if state_dict[k].shape != target[k].shape:
                warnings.warn(f'checkpoint {k} has shape {tuple(state_dict[k].shape)} but the model has '
                              f'{tuple(target[k].shape)}: the classifier is re-initialised', stacklevel=2)
                del state_dict[k]
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    classifier = model.pretrained_cfg.get('classifier', 'head.fc') if hasattr(model, 'pretrained_cfg') else 'head'
    missing = [k for k in missing if not k.startswith(classifier)]
    if missing or unexpected:
        raise CheckpointError(f'weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}')


def load_finetune_weights(model: torch.nn.Module, checkpoint: str, use_ema: bool = False,
                          head_class_map: str | None = None) -> str:
    """Initialise ``model`` for fine-tuning (spec §5.3); returns a one-line description for the log.

    ``head_class_map`` slices the source classifier to the listed classes (e.g. ImageNet-22K -> 1K); without it,
    a classifier of another size is re-initialised with a warning.
    """
    src = resolve_weight_source(checkpoint, use_ema)
    state_dict, which = read_state_dict(src, use_ema)
    if head_class_map is not None:
        indices = read_class_map(head_class_map)
        if len(indices) != getattr(model, 'num_classes', len(indices)):
            raise CheckpointError(f'{head_class_map} lists {len(indices)} classes but the model has '
                                  f'{model.num_classes}; the class map must list one index per model class')
        state_dict = slice_classifier(state_dict, indices)
    load_weights_into(model, state_dict)
    ema = 'EMA' if which == 'ema' else 'raw'
    sliced = f', classifier sliced with {head_class_map}' if head_class_map else ''
    return f'fine-tuning from {src.path} ({src.kind}, {ema} weights{sliced})'


@dataclass
class InferenceModel:
    """A model ready for eval/predict, with its preprocessing and class names."""
    model: torch.nn.Module
    model_name: str
    data_config: dict[str, Any]
    class_names: list[str] | None
    source: WeightSource
    weights: str  # 'ema' or 'raw'


def _num_classes_of(state_dict: Mapping[str, torch.Tensor]) -> int:
    for w_key, _ in _HEAD_KEYS:
        for k in (w_key, 'module.' + w_key):
            if k in state_dict:
                return int(state_dict[k].shape[0])
    return 0


def build_inference_model(path: str | os.PathLike, model_name: str | None = None, use_ema: bool = True,
                          **model_kwargs: Any) -> InferenceModel:
    """Build the model a weight source describes and load its weights (EMA when ``use_ema`` and present).

    Directory sources describe their architecture in ``config.json``; for bare files ``model_name`` is needed,
    else it is inferred from an official checkpoint's ``args`` or its weight shapes.
    """
    from timm.data import resolve_data_config

    src = resolve_weight_source(path, use_ema)
    state_dict, which = read_state_dict(src, use_ema)
    class_names = None
    if src.kind in ('ours', 'dir'):
        if not src.config.get('architecture'):
            raise CheckpointError(f'{src.path}/config.json names no architecture')
        name = model_name or src.config['architecture']
        num_classes = src.config.get('num_classes', _num_classes_of(state_dict))
        if model_name is None:
            # timm reads config.json: architecture, model_args and the preprocessing (pretrained_cfg)
            model = timm.create_model(f'local-dir:{src.path}', pretrained=False, num_classes=num_classes,
                                      **model_kwargs)
        else:
            model = timm.create_model(name, num_classes=num_classes, **model_kwargs)
        labels = src.config.get('label_names')
        class_names = list(labels) if isinstance(labels, list) else None
    else:
        if model_name is None:
            from ..cli.convert import infer_model_name
            model_name = infer_model_name(load_checkpoint_file(src.path) if src.kind == 'torch' else {}, state_dict)
        name = model_name
        if not timm.is_model(name):
            raise CheckpointError(f"unknown model '{name}'; l2vit models: {', '.join(timm.list_models('*l2vit*'))}")
        model = timm.create_model(name, num_classes=_num_classes_of(state_dict), **model_kwargs)
    load_weights_into(model, state_dict)
    model.eval()
    return InferenceModel(model, name, resolve_data_config(model=model), class_names, src, which)
