"""The ``l2vit`` command line: one entry point, one module per subcommand (``add_parser`` + ``run``)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import analyze, bench, convert, det, eval, export, predict, seg, train, zoo

__all__ = ['main', 'build_parser']

_COMMANDS = (zoo, convert, analyze, train, eval, predict, det, seg, bench, export)


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__
    parser = argparse.ArgumentParser(prog='l2vit', description='L²ViT models, timm-native.')
    parser.add_argument('--version', action='version', version=f'l2vit {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``l2vit`` command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f'l2vit {args.command}: error: {e}', file=sys.stderr)
        return 2
