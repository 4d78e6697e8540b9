"""``l2vit zoo``: build every registered L²ViT model and show parameters, MACs and output shapes."""
from __future__ import annotations

import argparse
import time

import timm
import torch

from ..bench import count_macs

_DEFAULT_SIZES = ('224x224', '224x320')


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('zoo', help='show the model zoo: params, MACs and output shapes of each variant',
                       description=__doc__)
    p.add_argument('--models', nargs='+', default=None,
                   help='model names (default: every registered l2vit model)')
    p.add_argument('--sizes', nargs='+', default=list(_DEFAULT_SIZES), metavar='HxW',
                   help='input sizes to run (default: %(default)s); the first is used for MACs unless the model\'s '
                        'own input size is larger')
    p.set_defaults(run=run)


def _zoo_order(name: str) -> tuple[int, str]:
    order = ('l2vit_tiny', 'l2vit_small', 'l2vit_base', 'l2vit_base_384')
    return (order.index(name) if name in order else len(order), name)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise ValueError(f"size must look like 224x320 (height x width), got '{text}'") from None
    return h, w


def run(args: argparse.Namespace) -> int:
    import l2vit  # noqa: F401 (registers the models)
    names = args.models or sorted(timm.list_models('*l2vit*'), key=_zoo_order)
    sizes = [_parse_size(s) for s in args.sizes]
    torch.manual_seed(0)
    print(f'{"model":<16}{"params":>14}{"cfg input":>12}{"GMACs":>9}   outputs (logits; stage maps C×H×W)')
    for name in names:
        t0 = time.perf_counter()
        model = timm.create_model(name).eval()
        params = sum(p.numel() for p in model.parameters())
        cfg_size = model.pretrained_cfg['input_size']
        macs = count_macs(model, cfg_size).total
        print(f'{name:<16}{params:>14,}{f"{cfg_size[1]}x{cfg_size[2]}":>12}{macs / 1e9:>9.2f}')
        for h, w in sizes:
            with torch.no_grad():
                x = torch.randn(1, model.in_chans, h, w)
                logits = model(x)
                feats = model.forward_intermediates(x, intermediates_only=True)
            stages = ', '.join('x'.join(str(d) for d in f.shape[1:]) for f in feats)
            size_macs = count_macs(model, (model.in_chans, h, w)).total
            print(f'{"":<16}{"":>14}{f"{h}x{w}":>12}{size_macs / 1e9:>9.2f}   {tuple(logits.shape)}; {stages}')
        print(f'{"":<16}({time.perf_counter() - t0:.1f} s)')
    return 0
