"""Models for the analysis: from a timm name, a ``local-dir:`` folder, an official ``.pth`` or a safetensors file,
and counterparts of a model that share its weights but differ in one architectural switch.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..models import checkpoint_filter_fn, load_checkpoint_file
from .capture import attention_blocks

__all__ = ['load_model', 'build_variant', 'default_variants', 'describe_model']


def _state_dict_in(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    # the same preference as checkpoint_filter_fn: EMA weights first (they are the ones that were evaluated)
    for key in ('model_ema', 'state_dict_ema', 'model', 'state_dict'):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def _num_classes_in(state_dict: Mapping[str, Any]) -> int:
    for key, value in state_dict.items():
        if key.removeprefix('module.').removeprefix('_orig_mod.') in ('head.weight', 'head.fc.weight'):
            return int(value.shape[0])
    return 0


def _safetensors_metadata(path: str) -> dict[str, Any]:
    """``architecture`` and ``model_args`` (a JSON object) from a safetensors file's metadata, when present."""
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        meta = f.metadata() or {}
    out: dict[str, Any] = {}
    if meta.get('architecture'):
        out['architecture'] = meta['architecture']
    if meta.get('model_args'):
        try:
            out['model_args'] = dict(json.loads(meta['model_args']))
        except (ValueError, TypeError) as e:
            raise ValueError(f'{path}: metadata "model_args" is not a JSON object: {e}') from e
    return out


def load_model(
        checkpoint: str | os.PathLike | None = None,
        model_name: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        device: str | torch.device = 'cpu',
) -> nn.Module:
    """Build a model for analysis, in eval mode.

    Args:
        checkpoint: Weights. One of: a directory (or ``local-dir:DIR``) written by ``l2vit convert`` or
            ``timm.models.save_for_hf``; an official ``.pth`` release or any PyTorch state-dict file; a plain
            safetensors state dict (its metadata may name ``architecture`` and ``model_args``, JSON). None: the
            model is randomly initialised (seed it first).
        model_name: timm model name. Required without a checkpoint; for a state-dict file it defaults to the
            metadata's ``architecture``, else the official variant inferred from the weight shapes.
        model_kwargs: Extra ``timm.create_model`` keyword arguments (e.g. ``use_lcm=False``).
        device: Where to put the model.

    Raises:
        ValueError: (``CheckpointError`` included) for unreadable files, unknown names or weights that do not fit.
    """
    kwargs = dict(model_kwargs or {})
    if checkpoint is None:
        if not model_name:
            raise ValueError('give a checkpoint or a model name (a model name alone builds a randomly initialised '
                             'model)')
        return _create(model_name, kwargs).to(device).eval()

    text = os.fspath(checkpoint)
    local_dir = text.removeprefix('local-dir:')
    if text.startswith('local-dir:') or os.path.isdir(local_dir):
        if not (Path(local_dir) / 'config.json').is_file():
            raise ValueError(f'{local_dir} has no config.json; expected a folder written by `l2vit convert` or '
                             'timm.models.save_for_hf')
        return timm.create_model(f'local-dir:{local_dir}', pretrained=True, **kwargs).to(device).eval()

    ckpt = load_checkpoint_file(text)
    state_dict = _state_dict_in(ckpt)
    meta = _safetensors_metadata(text) if text.endswith('.safetensors') else {}
    name = model_name or meta.get('architecture')
    if not name:
        from ..cli.convert import infer_model_name
        name = infer_model_name(ckpt, state_dict)
    args = {**meta.get('model_args', {}), **kwargs}
    args.setdefault('num_classes', _num_classes_in(state_dict))
    model = _create(name, args)
    model.load_state_dict(checkpoint_filter_fn(ckpt, model), strict=True)
    return model.to(device).eval()


def _create(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise ValueError(f"unknown model '{name}'; l2vit models: {', '.join(timm.list_models('*l2vit*'))}") from e
        raise


def build_variant(model: nn.Module, **overrides: Any) -> nn.Module:
    """The same architecture with some constructor arguments changed, sharing every weight the two have in common.

    For example ``build_variant(l2vit, global_mixer='softmax')`` puts softmax attention on the LGA blocks' own
    q/k/v/proj weights, and ``build_variant(l2vit, use_lcm=False)`` drops the Local Concentration Modules. Weights the
    variant has and the model lacks must be attention temperatures (left at their initial value); anything else
    raises a ``ValueError``.

    Args:
        model: A model created through ``timm.create_model`` (its architecture and arguments are recorded).
        **overrides: Constructor arguments to change.
    """
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    if not arch:
        raise ValueError(f'cannot rebuild this {type(model).__name__}: create it with timm.create_model so its '
                         'architecture and arguments are recorded')
    args = timm.models.get_model_args(model)
    args.update(overrides)
    param = next(model.parameters())
    variant = timm.create_model(arch, **args).to(device=param.device, dtype=param.dtype)
    source, target = model.state_dict(), variant.state_dict()
    fresh = [k for k in target if k not in source or source[k].shape != target[k].shape]
    bad = [k for k in fresh if not k.endswith('.temperature')]
    if bad:
        raise ValueError(f'variant {overrides} of {arch} has weights the model cannot provide: {bad[:8]}')
    variant.load_state_dict({k: source[k] for k in target if k not in fresh}, strict=False)
    return variant.eval()


def describe_model(model: nn.Module) -> str:
    """A label for the kind of attention a model uses, e.g. ``'L²ViT (linear + LCM)'``."""
    kinds = {b.attn.mixer_name for _, b in attention_blocks(model)}
    lcm = any(getattr(b, 'local_mp', None) is not None for _, b in attention_blocks(model))
    global_kinds = sorted(kinds - {'window'})
    if not global_kinds:
        return 'window only'
    if global_kinds == ['linear']:
        return 'L²ViT (linear + LCM)' if lcm else 'linear, no LCM'
    return ' + '.join(global_kinds) + (' + LCM' if lcm else '')


def default_variants(model: nn.Module) -> dict[str, nn.Module]:
    """Same-weight counterparts for the softmax-vs-linear-vs-enhanced comparison of an L²ViT model.

    Returns ``{'softmax (same weights)': ..., 'linear, no LCM (same weights)': ...}`` for a model with linear
    global attention and LCMs (fewer entries when it lacks either). These are ablations at inference of one trained
    model, not models trained that way; compare trained counterparts by analysing them as sources of their own.
    """
    blocks = attention_blocks(model)
    out: dict[str, nn.Module] = {}
    if any(b.attn.mixer_name == 'linear' for _, b in blocks):
        out['softmax (same weights)'] = build_variant(model, global_mixer='softmax')
        if any(getattr(b, 'local_mp', None) is not None for _, b in blocks):
            out['linear, no LCM (same weights)'] = build_variant(model, use_lcm=False)
    return out
