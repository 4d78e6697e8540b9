"""ONNX export (opset ≥ 17) with dynamic batch, height and width, and its check with ONNX Runtime.

The graph comes from the ``torch.export`` program of :mod:`l2vit.export.program` through PyTorch's dynamo-based
ONNX exporter. Input ``image`` is ``(batch, C, height, width)``; the output is ``logits`` (or ``features`` for a
model without classifier). Requires the ``export`` extra (``onnx``, ``onnxscript``; ``onnxruntime`` for the check).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import atomic_path
from .program import DEFAULT_EXAMPLE, export_program

__all__ = ['export_onnx', 'check_onnx', 'OnnxCheck', 'MIN_OPSET']

MIN_OPSET = 17


def export_onnx(
        model: torch.nn.Module,
        path: str | os.PathLike,
        example_size: tuple[int, int] = DEFAULT_EXAMPLE,
        batch: int = 2,
        opset: int = 18,
        dynamic: bool = True,
) -> Path:
    """Export ``model`` to an ONNX file at ``path`` (written to a temporary file, then renamed); returns the path.

    Args:
        model: The model (put in eval mode); its forward takes one image batch.
        path: Output ``.onnx`` file; the weights are stored inside it.
        example_size: ``(H, W)`` of the traced example input.
        batch: Batch of the example input.
        opset: ONNX opset (at least 17: LayerNormalization).
        dynamic: Dynamic batch, height and width (False: the example's shape only).
    """
    if opset < MIN_OPSET:
        raise ValueError(f'opset must be at least {MIN_OPSET} (LayerNormalization), got {opset}')
    program = export_program(model, example_size, batch, 'all' if dynamic else 'none')
    x = torch.randn(batch, getattr(model, 'in_chans', 3), *example_size)
    output = 'logits' if getattr(model, 'num_classes', 1) else 'features'
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix='.onnx') as tmp:
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, opset_version=opset, input_names=['image'],
                                         output_names=[output], external_data=False, verbose=False)
        onnx_program.save(str(tmp))
    return path


@dataclass
class OnnxCheck:
    """ONNX Runtime against eager PyTorch at one input shape: the largest absolute difference of the outputs."""
    shape: tuple[int, ...]
    max_abs_error: float
    max_abs_value: float


def check_onnx(path: str | os.PathLike, model: torch.nn.Module, shapes: Sequence[tuple[int, ...]],
               seed: int = 0) -> list[OnnxCheck]:
    """Run the ONNX file with ONNX Runtime (CPU) and ``model`` eagerly on random inputs of ``shapes``."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    model = model.eval()
    results = []
    for shape in shapes:
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            ref = model(x).float()
        out = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        if out.shape != ref.shape:
            raise ValueError(f'ONNX output shape {tuple(out.shape)} != eager {tuple(ref.shape)} for input {shape}')
        results.append(OnnxCheck(tuple(shape), (out - ref).abs().max().item(), ref.abs().max().item()))
    return results
