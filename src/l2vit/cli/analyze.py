"""``l2vit analyze``: attention concentration and effective receptive fields of a model on images.

Writes into OUTPUT: attention overlays for chosen query points (one column per model), entropy / attention distance
/ top-k mass per layer, ERF heat maps of the global blocks with and without their LCM, ``analysis.json`` with every
number and ``analysis_tensors.safetensors`` with every map.

By default an L²ViT model is compared with two counterparts that share its weights: global softmax attention on
the same q/k/v, and the linear attention without LCMs. These are inference-time ablations; to compare models
*trained* that way, pass them with --compare (same-weight counterparts are then left out unless --variants).

Examples:
  l2vit analyze --checkpoint L2ViT-Tiny-checkpoint-best-ema.pth --images photos/ --output out/tiny
  l2vit analyze --checkpoint weights/l2vit_tiny --images a.jpg b.jpg --output out/tiny --queries 0.5,0.5 0.2,0.8
  l2vit analyze --model test_l2vit --images photos/ --output out/random      # random weights, runs anywhere
  l2vit analyze --checkpoint run/l2vit.safetensors --model l2vit_tiny --model-kwargs num_classes=10 \\
      --compare softmax=run/softmax.safetensors,global_mixer=softmax "no LCM=run/nolcm.safetensors,use_lcm=false" \\
      --images digits/ --output out/cmp
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
import yaml

_SUMMARY_COLUMNS = (
    ('global/entropy', 'H/logN'), ('global/distance_px', 'dist px'), ('global/top9_mass', 'top-9'),
    ('window/entropy', 'LWA H/logN'), ('erf/with_lcm/area_ratio@0.5', 'ERF50 +LCM'),
    ('erf/without_lcm/area_ratio@0.5', 'ERF50 -LCM'),
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('analyze', help='attention concentration, ERFs and figures of a model on images',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group('model')
    src.add_argument('--checkpoint', default=None,
                     help='weights: a folder from `l2vit convert` (or local-dir:DIR), an official .pth, or a '
                          'safetensors / PyTorch state dict file')
    src.add_argument('--model', default=None,
                     help='timm model name: the architecture of a state-dict checkpoint, or, without --checkpoint, '
                          'a randomly initialised model')
    src.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                     help='extra timm.create_model arguments, values in YAML (e.g. num_classes=10 use_lcm=false)')
    src.add_argument('--label', default=None, help='name of the model in figures (default: from its mixers)')
    src.add_argument('--compare', nargs='*', default=[], metavar='LABEL=SPEC[,KEY=VALUE...]',
                     help='more models to analyse side by side; SPEC is a checkpoint (as --checkpoint; state dicts '
                          'use --model as architecture) or a model name, optionally followed by model arguments, '
                          'e.g. "softmax=test_l2vit,global_mixer=softmax"')
    src.add_argument('--variants', action=argparse.BooleanOptionalAction, default=None,
                     help='add the same-weight softmax / no-LCM counterparts (default: on unless --compare)')
    src.add_argument('--device', default='cpu', help='device (default: %(default)s)')
    src.add_argument('--seed', type=int, default=0, help='seed for randomly initialised models')

    data = p.add_argument_group('images and output')
    data.add_argument('--images', nargs='+', required=True, help='image files and/or folders of images')
    data.add_argument('--img-size', default=None, metavar='N|HxW',
                      help="input size (default: the model's pretrained_cfg input size)")
    data.add_argument('--output', required=True, help='output folder (created; files of the same name replaced)')

    opts = p.add_argument_group('analysis')
    opts.add_argument('--queries', nargs='+', default=None, metavar='Y,X',
                      help='query points as image fractions (default: 0.5,0.5 0.25,0.25 0.75,0.7)')
    opts.add_argument('--topk', nargs='+', type=int, default=None, help='k values of the top-k mass (default: 1 9 49)')
    opts.add_argument('--blocks', nargs='+', default=None, help='only these blocks (e.g. stages.2.blocks.1)')
    opts.add_argument('--max-queries', type=int, default=None,
                      help='subsample global-attention queries to at most N per image (default: all)')
    opts.add_argument('--chunk-size', type=int, default=256, help='queries per chunk (default: %(default)s)')
    opts.add_argument('--no-erf', dest='erf', action='store_false', help='skip effective receptive fields')
    opts.add_argument('--figure-images', type=int, default=2,
                      help='overlay figures for the first N images (default: %(default)s)')
    opts.add_argument('--figure-blocks', choices=('global', 'all', 'none'), default='global',
                      help='blocks that get overlay figures (default: %(default)s)')
    p.set_defaults(run=run)


def _parse_kwargs(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ValueError(f'model arguments must look like KEY=VALUE, got {item!r}')
        out[key] = yaml.safe_load(value)
    return out


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        parts = [int(v) for v in text.lower().split('x')]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"--img-size must look like 224 or 224x320 (height x width), got '{text}'")
    return parts[0], parts[1]


def _parse_queries(items: list[str] | None) -> list[tuple[float, float]] | None:
    if items is None:
        return None
    out = []
    for item in items:
        try:
            y, x = (float(v) for v in item.split(','))
        except ValueError:
            raise ValueError(f"query points must look like 0.5,0.25 (y,x image fractions), got '{item}'") from None
        out.append((y, x))
    return out


def _is_checkpoint(spec: str) -> bool:
    # model names have neither path separators nor file extensions; anything else is meant as a file or folder
    return (spec.startswith('local-dir:') or os.path.exists(spec) or os.sep in spec
            or spec.endswith(('.pth', '.pt', '.bin', '.safetensors')))


def _load(spec: str, args: argparse.Namespace, kwargs: dict[str, Any], checkpoint: bool) -> torch.nn.Module:
    from ..analysis import load_model
    torch.manual_seed(args.seed)
    if checkpoint:
        return load_model(spec, args.model, kwargs, device=args.device)
    return load_model(None, spec, kwargs, device=args.device)


def run(args: argparse.Namespace) -> int:
    from ..analysis import (
        DEFAULT_QUERY_POINTS,
        DEFAULT_TOPK,
        analyze,
        default_variants,
        describe_model,
        load_images,
        write_report,
    )

    if args.checkpoint is None and args.model is None:
        raise ValueError('give --checkpoint (trained weights) or --model NAME (random weights), or both')
    kwargs = _parse_kwargs(args.model_kwargs)
    size = _parse_size(args.img_size)
    queries = _parse_queries(args.queries) or list(DEFAULT_QUERY_POINTS)
    compare = []
    for item in args.compare:
        label, sep, spec = item.partition('=')
        if not sep or not label or not spec:
            raise ValueError(f'--compare entries must look like LABEL=SPEC, got {item!r}')
        spec, *extra = spec.split(',')
        compare.append((label, spec, _parse_kwargs(extra)))

    t0 = time.perf_counter()
    main_model = _load(args.checkpoint or args.model, args, kwargs, checkpoint=args.checkpoint is not None)
    label = args.label or describe_model(main_model)
    models: dict[str, torch.nn.Module] = {}
    if args.variants if args.variants is not None else not compare:
        models.update(default_variants(main_model))
    for other_label, spec, other_kwargs in compare:
        models[other_label] = _load(spec, args, other_kwargs, checkpoint=_is_checkpoint(spec))
    if label in models:
        raise ValueError(f'two models are labelled {label!r}; give --label')
    models[label] = main_model

    images = load_images(args.images, main_model, size)
    print(f'analysing {len(models)} model(s) on {len(images.names)} image(s) of {images.size[0]}x{images.size[1]}: '
          + ', '.join(models))
    result = analyze(models, images, query_points=queries, topk=tuple(args.topk or DEFAULT_TOPK),
                     chunk_size=args.chunk_size, max_queries=args.max_queries, erf=args.erf, blocks=args.blocks)
    files = write_report(result, args.output, images, figure_images=args.figure_images,
                         figure_blocks=args.figure_blocks)

    width = max(len(s.label) for s in result.sources) + 2
    print(f'{"model":<{width}}' + ''.join(f'{title:>12}' for _, title in _SUMMARY_COLUMNS))
    for source in result.sources:
        summary = source.summary()
        cells = ''.join(f'{summary[key]:>12.3f}' if key in summary else f'{"-":>12}' for key, _ in _SUMMARY_COLUMNS)
        print(f'{source.label:<{width}}{cells}')
    print(f'wrote {len(files)} files to {args.output} ({time.perf_counter() - t0:.1f} s); numbers in '
          f'{files["json"].name}')
    return 0
