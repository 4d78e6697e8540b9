"""``l2vit predict IMAGES|DIR ...``: the top-k classes of each image, as a table or ``--json``.

Class names come from the training data of our checkpoints (stored in their ``config.json``), or are ImageNet-1K
(or -22K) names for heads of that size, from timm's bundled class info. Example::

    l2vit predict photo.jpg more_photos/ --checkpoint runs/digits_demo --topk 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .eval import add_common_arguments, load_for_inference

__all__ = ['add_parser', 'run', 'collect_images']


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('predict', help='top-k classes of images (table or JSON)',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('images', nargs='+', help='image files or directories (searched recursively)')
    add_common_arguments(p)
    p.add_argument('--topk', '-k', type=int, default=5, help='classes per image (default: %(default)s)')
    p.set_defaults(run=run, batch_size=16, workers=0)


def collect_images(paths: list[str]) -> list[Path]:
    """Image files named directly, and those found under directories (sorted), by extension."""
    from ..data import IMG_EXTENSIONS

    out: list[Path] = []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            out += sorted(f for f in p.rglob('*') if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f'no such image or directory: {p}')
    if not out:
        raise FileNotFoundError(f'no images ({", ".join(IMG_EXTENSIONS)}) found in {", ".join(paths)}')
    return out


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from ..data import class_names_for

    files = collect_images(args.images)
    if args.topk < 1:
        raise ValueError('--topk must be >= 1')
    im, transform, device, amp, net = load_for_inference(args)
    names = class_names_for(im.model.num_classes, im.class_names)
    k = min(args.topk, im.model.num_classes)
    results = []
    for start in range(0, len(files), args.batch_size):
        batch, kept = [], []
        for f in files[start:start + args.batch_size]:
            try:
                with Image.open(f) as img:
                    batch.append(transform(img.convert('RGB')))
                kept.append(f)
            except Exception as e:  # unreadable file: report it, keep going
                print(f'warning: skipping unreadable image {f}: {type(e).__name__}: {e}', file=sys.stderr)
                results.append({'file': str(f), 'error': f'{type(e).__name__}: {e}'})
        if not batch:
            continue
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            probs = net(torch.stack(batch).to(device)).float().softmax(dim=-1)
        top = probs.topk(k, dim=-1)
        for f, p, i in zip(kept, top.values.tolist(), top.indices.tolist()):
            results.append({'file': str(f), 'topk': [{'index': c, 'label': names[c], 'prob': round(q, 6)}
                                                     for c, q in zip(i, p)]})
    if args.json:
        print(json.dumps({'checkpoint': str(im.source.path), 'model': im.model_name, 'weights': im.weights,
                          'predictions': results}, indent=2))
        return 0 if any('topk' in r for r in results) else 1
    width = min(60, max(len('file'), *(len(os.fspath(r['file'])) for r in results)))
    print(f'{"file":<{width}}  {"rank":>4}  {"prob":>7}  class')
    for r in results:
        if 'error' in r:
            print(f'{r["file"]:<{width}}  {"-":>4}  {"-":>7}  unreadable: {r["error"]}')
            continue
        for rank, c in enumerate(r['topk'], 1):
            name = r['file'] if rank == 1 else ''
            print(f'{name:<{width}}  {rank:>4}  {c["prob"]:>7.4f}  {c["label"]} ({c["index"]})')
    return 0 if any('topk' in r for r in results) else 1
