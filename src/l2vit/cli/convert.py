"""``l2vit convert SRC OUT_DIR``: turn an official L²ViT ``.pth`` release into safetensors + config.json.

The output directory loads offline with ``timm.create_model('local-dir:OUT_DIR', pretrained=True)`` (after
``import l2vit``). EMA weights are taken when the checkpoint has them (the official ``*-best-ema`` files do).
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch

_OFFICIAL_MODEL_NAMES = {
    'L2ViT_Tiny': 'l2vit_tiny',
    'L2ViT_Small': 'l2vit_small',
    'L2ViT_Base': 'l2vit_base',
    'L2ViT_Base_384': 'l2vit_base_384',
}
# (stage-1 width, blocks in stage 3) -> model
_SHAPE_TO_MODEL = {(96, 6): 'l2vit_tiny', (96, 18): 'l2vit_small', (128, 18): 'l2vit_base'}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('convert', help='convert an official .pth checkpoint to safetensors + config.json',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', help='official checkpoint (.pth) or a state dict file')
    p.add_argument('out_dir', help='output directory (created; existing files of the same name are replaced)')
    p.add_argument('--model', default=None,
                   help='target model name (default: from the checkpoint\'s args, else inferred from its shapes)')
    p.add_argument('--no-ema', dest='use_ema', action='store_false',
                   help='take the "model" weights even when "model_ema" is present')
    p.set_defaults(run=run)


def _state_dict_of(checkpoint: Mapping[str, Any], use_ema: bool) -> Mapping[str, Any]:
    keys = ('model_ema', 'state_dict_ema', 'model', 'state_dict') if use_ema else ('model', 'state_dict')
    for key in keys:
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def infer_model_name(checkpoint: Mapping[str, Any], state_dict: Mapping[str, Any]) -> str:
    """Model name from the official ``args.model`` when present, else from the weight shapes."""
    args = checkpoint.get('args')
    official = getattr(args, 'model', None) if args is not None else None
    if isinstance(official, str) and official in _OFFICIAL_MODEL_NAMES:
        return _OFFICIAL_MODEL_NAMES[official]
    keys = [k.removeprefix('module.') for k in state_dict]
    stem = next((state_dict[k] for k in state_dict if k.endswith(('stem.norm.weight', 'downsample_layers.0.norm.weight'))),
                None)
    # official 'stages.2.J.*' or native 'stages.2.blocks.J.*'
    stage2 = {m.group(1) for k in keys if (m := re.match(r'stages\.2\.(?:blocks\.)?(\d+)\.', k))}
    if stem is None or not stage2:
        raise ValueError('cannot tell which L2ViT variant this checkpoint holds (no stem norm or stage-3 blocks '
                         'found); pass --model')
    key = (stem.shape[0], len(stage2))
    if key not in _SHAPE_TO_MODEL:
        raise ValueError(f'no registered L2ViT variant has stage-1 width {key[0]} and {key[1]} stage-3 blocks; '
                         'pass --model')
    return _SHAPE_TO_MODEL[key]


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, model_name: str | None = None,
            use_ema: bool = True) -> tuple[str, int, Path]:
    """Convert ``src`` into ``out_dir``; returns ``(model_name, num_classes, out_dir)``."""
    import l2vit  # noqa: F401 (registers the models)

    from ..models import checkpoint_filter_fn, load_checkpoint_file

    checkpoint = load_checkpoint_file(src)
    state_dict = _state_dict_of(checkpoint, use_ema)
    model_name = model_name or infer_model_name(checkpoint, state_dict)
    head = next((state_dict[k] for k in state_dict if k.removeprefix('module.') in ('head.weight', 'head.fc.weight')),
                None)
    num_classes = head.shape[0] if head is not None else 0
    with torch.no_grad():
        model = timm.create_model(model_name, num_classes=num_classes)
    model.load_state_dict(checkpoint_filter_fn(dict(state_dict), model), strict=True)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # write everything into a temporary sibling directory, then move each finished file into place
    with tempfile.TemporaryDirectory(dir=out_dir, prefix='.convert-') as tmp:
        timm.models.save_for_hf(model, tmp, safe_serialization=True)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), 'rb') as f:
                os.fsync(f.fileno())
            os.replace(os.path.join(tmp, name), out_dir / name)
    return model_name, num_classes, out_dir


def run(args: argparse.Namespace) -> int:
    name, num_classes, out_dir = convert(args.src, args.out_dir, args.model, args.use_ema)
    print(f'converted {args.src} -> {out_dir} ({name}, {num_classes} classes)')
    print(f"load it with: import l2vit, timm; timm.create_model('local-dir:{out_dir}', pretrained=True)")
    return 0
