"""``l2vit export MODEL OUT``: an ONNX file or a ``torch.export`` program, with dynamic batch, height and width.

ONNX (opset >= 17, default 18) is checked with ONNX Runtime against eager PyTorch at input sizes the export never
saw (--check; default three sizes, one non-square) and the command fails if any differs by more than --tolerance.

Examples:
  l2vit export l2vit_tiny l2vit_tiny.onnx
  l2vit export l2vit_tiny l2vit_tiny.onnx --checkpoint L2ViT-Tiny-checkpoint-best-ema.pth
  l2vit export local-dir:weights/l2vit_tiny model.pt2 --format torch-export
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .bench import parse_size

DEFAULT_CHECK = ('224', '288x416', '512')


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('export', help='export a model to ONNX (dynamic batch/height/width) or torch.export',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('model', help='timm model name, or local-dir:PATH of a converted model')
    p.add_argument('out', help='output file (.onnx or .pt2)')
    p.add_argument('--format', choices=('onnx', 'torch-export'), default=None,
                   help='output format (default: from the file suffix; .onnx -> onnx, else torch-export)')
    p.add_argument('--checkpoint', default=None, help='weights file to load (official .pth or a state dict)')
    p.add_argument('--num-classes', type=int, default=None, help='classifier size (0: export the pooled features)')
    p.add_argument('--opset', type=int, default=18, help='ONNX opset, at least 17 (default: %(default)s)')
    p.add_argument('--example-size', default='320x384', metavar='HxW',
                   help='size of the traced example input (default: %(default)s)')
    p.add_argument('--static', action='store_true', help='fix the example\'s shape instead of dynamic dimensions')
    p.add_argument('--dynamic', choices=('batch', 'all'), default='batch',
                   help='torch-export: dynamic batch only (exact for every batch), or batch, height and width (exact '
                        'for inputs in the example\'s padding regime, asserted; see l2vit.export.program) '
                        '(default: %(default)s). ONNX is always dynamic in all three unless --static')
    p.add_argument('--check', nargs='*', default=list(DEFAULT_CHECK), metavar='S|HxW',
                   help='ONNX: sizes to compare with eager PyTorch in ONNX Runtime (default: %(default)s; none to skip)')
    p.add_argument('--check-batch', type=int, default=2, help='batch of the check inputs (default: %(default)s)')
    p.add_argument('--tolerance', type=float, default=1e-4,
                   help='largest accepted |ONNX - eager| of the outputs (default: %(default)s)')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import timm
    import torch

    import l2vit  # noqa: F401 (registers the models)

    from ..export import check_onnx, export_onnx, export_program
    fmt = args.format or ('onnx' if Path(args.out).suffix.lower() == '.onnx' else 'torch-export')
    example = parse_size(args.example_size)
    kwargs = {}
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=args.checkpoint))
    elif args.model.startswith(('local-dir:', 'hf-hub:', 'hf_hub:')):
        kwargs['pretrained'] = True
    torch.manual_seed(0)
    model = timm.create_model(args.model, **kwargs).eval()
    if fmt == 'torch-export':
        dynamic = 'none' if args.static else args.dynamic
        export_program(model, example, dynamic=dynamic, path=args.out)
        print(f'wrote {args.out} (torch.export program, dynamic: {dynamic}; load with torch.export.load)')
        return 0
    path = export_onnx(model, args.out, example, opset=args.opset, dynamic=not args.static)
    print(f'wrote {path} (ONNX opset {args.opset}, input "image" (batch, {model.in_chans}, height, width))')
    if not args.check:
        return 0
    shapes = [(args.check_batch, model.in_chans, *parse_size(s)) for s in args.check]
    if args.static:
        shapes = [(2, model.in_chans, *example)]
    worst = 0.0
    for result in check_onnx(path, model, shapes):
        worst = max(worst, result.max_abs_error)
        print(f'  ONNX Runtime vs eager at {"x".join(map(str, result.shape))}: max |diff| '
              f'{result.max_abs_error:.2e} (outputs up to {result.max_abs_value:.2f})')
    if worst > args.tolerance:
        print(f'l2vit export: ONNX output differs from eager by {worst:.2e} > tolerance {args.tolerance:g}')
        return 1
    return 0
