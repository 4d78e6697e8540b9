"""Safe reading of weight files: official ``.pth`` releases, our safetensors, plain state dicts.

Nothing here unpickles arbitrary objects. PyTorch files are read with ``torch.load(weights_only=True)`` and an
allow-list holding only what official L²ViT checkpoints need (``argparse.Namespace`` for their ``args`` entry).
Every failure is a :class:`CheckpointError` (a ``ValueError``) that names the file and the problem.
"""
from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ['CheckpointError', 'ALLOWED_GLOBALS', 'check_checkpoint_file', 'load_checkpoint_file']

# Globals a checkpoint may ask the unpickler for, beyond torch's own weights-only set.
ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
_ALLOWED_NAMES = {f'{g.__module__}.{g.__qualname__}' for g in ALLOWED_GLOBALS}


class CheckpointError(ValueError):
    """A weight file cannot be used: missing, truncated, not a checkpoint, or asking for unsafe code."""


def _is_safetensors(path: str) -> bool:
    return str(path).endswith('.safetensors')


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Check, without loading tensors, that ``path`` is a complete, safe checkpoint file.

    Accepts safetensors files and PyTorch zip checkpoints (``torch.save`` since 1.6) whose pickled globals are
    limited to torch's weights-only set plus :data:`ALLOWED_GLOBALS`.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint file not found: {path}')
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f'checkpoint file is empty: {path}')
    if _is_safetensors(path):
        from safetensors import safe_open
        try:
            with safe_open(path, framework='pt') as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f'{path} is not a readable safetensors file (truncated or corrupt?): {e}') from e
        return
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f'{path} ({size} bytes) is not a complete PyTorch checkpoint: no zip central directory was found, so '
            'the file is truncated (an interrupted download or copy?) or is not a torch.save file')
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:
        raise CheckpointError(f'{path} is a zip file but not a readable PyTorch checkpoint: {e}') from e
    refused = sorted(set(unsafe) - _ALLOWED_NAMES)
    if refused:
        raise CheckpointError(
            f'refusing to load {path}: it asks the unpickler for {", ".join(refused)}, which could run arbitrary '
            f'code. Only {", ".join(sorted(_ALLOWED_NAMES))} are allowed beyond plain tensors and containers. '
            'Re-save the weights as a plain state dict or safetensors from a trusted environment.')


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = 'cpu') -> Mapping[str, Any]:
    """Load a checkpoint file safely and return its top-level dict (a state dict or a training checkpoint).

    Raises:
        CheckpointError: for anything :func:`check_checkpoint_file` rejects, or a file that fails while loading.
    """
    path = os.fspath(path)
    check_checkpoint_file(path)
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file
            return load_file(path, device=str(map_location))
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:
        raise CheckpointError(f'failed to load {path} (truncated or corrupt?): {e}') from e
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, expected a state dict or a checkpoint '
                              'dict with a "model" / "model_ema" entry')
    return checkpoint
