"""``torch.export`` of an image model: dynamic batch, or dynamic batch, height and width.

With ``dynamic='batch'`` (the default) the program takes any batch size at the example's height and width and is
exact for all of them. With ``dynamic='all'`` height and width are symbolic too, but L²ViT's sizes come from
ceilings (stem and window padding, stride-2 merges) whose relations PyTorch's symbolic-shape engine cannot prove for
every size, and its view and slice kernels special-case sizes of one; the export then records what it assumed as
runtime assertions (``prefer_deferred_runtime_asserts_over_guards``) and the program serves exactly the inputs in
the example's *regime* (the same windows-per-side and padding situation at every stage), failing the others with an
assertion message. The ONNX graph built from that same program has no such limit: ONNX has no assertions and its
ops are shape-generic, and :mod:`l2vit.export.onnx` verifies it down to 32 × 32 and at non-square sizes.
"""
from __future__ import annotations

import os

import torch
from torch.export import Dim, ExportedProgram

from .._io import atomic_path

__all__ = ['export_program', 'load_program', 'DEFAULT_EXAMPLE', 'MAX_SIDE', 'DYNAMIC']

DEFAULT_EXAMPLE = (320, 384)
MAX_SIDE = 8192
DYNAMIC = ('batch', 'all', 'none')


def export_program(
        model: torch.nn.Module,
        example_size: tuple[int, int] = DEFAULT_EXAMPLE,
        batch: int = 2,
        dynamic: str = 'batch',
        path: str | os.PathLike | None = None,
) -> ExportedProgram:
    """Export ``model`` (put in eval mode) with ``torch.export``; save it to ``path`` (``.pt2``) when given.

    Args:
        model: The model; its forward takes one ``(B, C, H, W)`` image batch.
        example_size: ``(H, W)`` of the example input that is traced.
        batch: Batch of the example input (2, so that the batch dimension is not specialised to 1).
        dynamic: ``'batch'``, ``'all'`` (batch, height and width; see the module notes) or ``'none'``.
        path: Where to save the program (written to a temporary file and renamed).
    """
    if dynamic not in DYNAMIC:
        raise ValueError(f"dynamic must be one of {DYNAMIC}, got '{dynamic}'")
    if min(example_size) < 33 or batch < 2:
        raise ValueError(f'example input must be at least 33 px per side with a batch of at least 2 (smaller sizes '
                         f'would be specialised), got {example_size} and batch {batch}')
    model = model.eval()
    in_chans = getattr(model, 'in_chans', 3)
    x = torch.randn(batch, in_chans, *example_size, device=_device(model))
    dims = {}
    if dynamic != 'none':
        dims[0] = Dim('batch', min=1, max=4096)
    if dynamic == 'all':
        dims.update({2: Dim('height', min=33, max=MAX_SIDE), 3: Dim('width', min=33, max=MAX_SIDE)})
    dynamic_shapes = (dims,) if dims else None
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes,
                                      prefer_deferred_runtime_asserts_over_guards=True)
    if path is not None:
        with atomic_path(path) as tmp:
            torch.export.save(program, tmp)
    return program


def load_program(path: str | os.PathLike) -> ExportedProgram:
    """Load a program saved by :func:`export_program`."""
    return torch.export.load(path)


def _device(model: torch.nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device('cpu')
