"""Checkpoints that survive any crash: one directory per checkpoint, written aside and renamed into place.

Layout of ``<run>/checkpoints/``::

    epoch-0007/               after 7 finished epochs (the last ``keep_last`` are kept)
    recovery/e0007-u000120/   mid-epoch: 120 optimizer steps into the 8th epoch (only the newest is kept)
    best/  best_ema/          hard links to the checkpoint with the best validation top-1 (raw / EMA weights)

Each checkpoint directory holds ``model.safetensors`` (raw weights), ``model_ema.safetensors`` (when EMA is on),
``config.json`` (timm format: ``timm.create_model('local-dir:<dir>', pretrained=True)`` loads the raw weights) and
``state.pt``: optimizer, scheduler, scaler, RNG states of every rank, progress, history and the config as a plain
dict, loadable with ``torch.load(weights_only=True)``. Files are fsynced inside a temporary directory that is
renamed into place, so a checkpoint directory either exists complete or not at all.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._io import atomic_write_text, fsync_dir
from ..models import CheckpointError, load_checkpoint_file

__all__ = ['CheckpointManager', 'LoadedCheckpoint', 'fsync_dir', 'atomic_write_text', 'read_checkpoint',
           'find_resume_checkpoint', 'resolve_resume', 'CHECKPOINT_VERSION']

_logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_EPOCH_RE = re.compile(r'^epoch-(\d+)$')
_RECOVERY_RE = re.compile(r'^e(\d+)-u(\d+)$')


def _fsync_file(path: Path) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def _plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


@dataclass
class LoadedCheckpoint:
    """What a checkpoint directory holds."""
    path: Path
    model: dict[str, torch.Tensor]
    model_ema: dict[str, torch.Tensor] | None
    state: dict[str, Any]

    @property
    def progress(self) -> tuple[int, int]:
        """``(epoch, updates_done_in_epoch)`` to continue from."""
        return int(self.state['epoch']), int(self.state['epoch_updates'])


def read_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read a checkpoint directory (or its ``state.pt``) written by :class:`CheckpointManager`.

    Raises:
        CheckpointError: when the directory or one of its files is missing, truncated or not ours.
    """
    path = Path(path)
    if path.is_file() and path.name == 'state.pt':
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f'checkpoint not found: {path} (expected a checkpoint directory with state.pt)')
    state_file = path / 'state.pt'
    if not state_file.is_file():
        raise CheckpointError(f'{path} is not a training checkpoint: it has no state.pt')
    state = dict(load_checkpoint_file(state_file))
    if state.get('version') != CHECKPOINT_VERSION:
        raise CheckpointError(f'{state_file}: unknown checkpoint version {state.get("version")!r} '
                              f'(this l2vit writes version {CHECKPOINT_VERSION})')
    model = dict(load_checkpoint_file(path / 'model.safetensors'))
    ema_file = path / 'model_ema.safetensors'
    ema = dict(load_checkpoint_file(ema_file)) if ema_file.is_file() else None
    return LoadedCheckpoint(path, model, ema, state)


def _candidates(root: Path) -> list[tuple[tuple[int, int], Path]]:
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if (m := _EPOCH_RE.match(d.name)) and (d / 'state.pt').is_file():
                found.append(((int(m.group(1)), 0), d))
    rec = root / 'recovery'
    if rec.is_dir():
        for d in rec.iterdir():
            if (m := _RECOVERY_RE.match(d.name)) and (d / 'state.pt').is_file():
                found.append(((int(m.group(1)), int(m.group(2))), d))
    return sorted(found, reverse=True)


def find_resume_checkpoint(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run, newest progress first (epoch checkpoints and recovery checkpoints)."""
    return [p for _, p in _candidates(Path(run_dir) / 'checkpoints')]


def resolve_resume(
        resume: str | os.PathLike | None,
        run_dir: str | os.PathLike,
        logger: logging.Logger | None = None,
) -> LoadedCheckpoint | None:
    """The checkpoint a ``--resume`` value points at, read and checked.

    Args:
        resume: None (start fresh), ``'auto'`` (the newest readable checkpoint in ``run_dir``; unreadable newer ones
            are skipped with a warning), a run directory, or a checkpoint path.
        run_dir: The run directory ``'auto'`` searches.
        logger: Where skipped checkpoints are reported.

    Raises:
        CheckpointError: an explicit path holds no readable checkpoint, or every candidate is unreadable.
    """
    if resume is None:
        return None
    if resume == 'auto':
        candidates = find_resume_checkpoint(run_dir)
    else:
        p = Path(resume)
        candidates = find_resume_checkpoint(p) if (p / 'checkpoints').is_dir() else [p]
        if not candidates:
            raise CheckpointError(f'--resume {resume}: no checkpoint found there')
    for i, path in enumerate(candidates):
        try:
            return read_checkpoint(path)
        except CheckpointError as e:
            if resume != 'auto' or i == len(candidates) - 1:
                raise
            (logger or _logger).warning(f'skipping unreadable checkpoint {path}: {e}')
    return None


class CheckpointManager:
    """Writes, links and prunes the checkpoints of one run (call it on the main process only).

    Args:
        run_dir: The run directory; checkpoints go to ``run_dir/checkpoints``.
        keep_last: Epoch checkpoints to keep.
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 2):
        self.root = Path(run_dir) / 'checkpoints'
        self.keep_last = keep_last
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def epoch_name(epochs_done: int) -> str:
        return f'epoch-{epochs_done:04d}'

    @staticmethod
    def recovery_name(epoch: int, updates: int) -> str:
        return f'recovery/e{epoch:04d}-u{updates:06d}'

    def _swap_in(self, tmp: Path, final: Path) -> None:
        """Rename the finished ``tmp`` directory to ``final``, replacing an older ``final`` if there is one."""
        final.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if final.exists():
            old = final.with_name(f'.old-{final.name}-{os.getpid()}')
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _tmp_dir(self, name: str) -> Path:
        tmp = self.root / f'.tmp-{name.replace("/", "-")}-{os.getpid()}'
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def save(self, name: str, model: torch.nn.Module, ema: torch.nn.Module | None, state: Mapping[str, Any],
             config_json: Mapping[str, Any] | None = None) -> Path:
        """Write a complete checkpoint directory ``checkpoints/<name>`` atomically; returns its path."""
        tmp = self._tmp_dir(name)
        files = [tmp / 'model.safetensors', tmp / 'state.pt']
        save_file(_plain_state_dict(model), files[0], metadata={'format': 'pt'})
        if ema is not None:
            files.append(tmp / 'model_ema.safetensors')
            save_file(_plain_state_dict(ema), files[-1], metadata={'format': 'pt'})
        if config_json is not None:
            files.append(tmp / 'config.json')
            files[-1].write_text(json.dumps(config_json, indent=2))
        torch.save(dict(state, version=CHECKPOINT_VERSION), files[1])
        for f in files:
            _fsync_file(f)
        fsync_dir(tmp)
        final = self.root / name
        self._swap_in(tmp, final)
        return final

    def link(self, src: Path, name: str) -> Path:
        """Make ``checkpoints/<name>`` a copy of checkpoint ``src`` by hard links (copies where links fail)."""
        tmp = self._tmp_dir(name)
        for f in src.iterdir():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        fsync_dir(tmp)
        final = self.root / name
        self._swap_in(tmp, final)
        return final

    def prune(self, current: tuple[int, int]) -> None:
        """Keep the newest ``keep_last`` epoch checkpoints and only recovery checkpoints newer than ``current``."""
        epochs = sorted(d for d in self.root.iterdir() if _EPOCH_RE.match(d.name))
        for d in epochs[:-self.keep_last]:
            shutil.rmtree(d, ignore_errors=True)
        rec = self.root / 'recovery'
        if rec.is_dir():
            for d in rec.iterdir():
                m = _RECOVERY_RE.match(d.name)
                if m and (int(m.group(1)), int(m.group(2))) < current:
                    shutil.rmtree(d, ignore_errors=True)
        for d in self.root.iterdir():
            # leftovers of a process killed while writing
            if d.name.startswith(('.tmp-', '.old-')) and not d.name.endswith(f'-{os.getpid()}'):
                shutil.rmtree(d, ignore_errors=True)
