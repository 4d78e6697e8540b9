"""What every training loop of the project shares around its steps: the run directory, stop requests, exit codes.

Used by the classification :class:`~l2vit.engine.Trainer` and the dense-prediction trainers
(:mod:`l2vit.integrations.runner`).
"""
from __future__ import annotations

import shutil
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import find_resume_checkpoint
from .distributed import DistInfo, broadcast_object

__all__ = ['RunDirError', 'StopRequest', 'broadcast_buffers', 'prepare_run_dir', 'run_exit_code']


class RunDirError(ValueError):
    """The output directory already holds a run and neither resume nor overwrite was asked for."""


def run_exit_code(status: str, signum: int | None) -> int:
    """Process exit code of a run that ended with ``status``: 0 'completed', 3 'nonfinite', and 128 + the signal
    number for 'interrupted' (130 for SIGINT, 143 for SIGTERM)."""
    if status == 'interrupted':
        return 128 + (signum or signal.SIGINT)
    return {'completed': 0, 'nonfinite': 3}[status]


class StopRequest:
    """SIGINT / SIGTERM set ``signum``, which a training loop honours at its next safe boundary (after saving a
    checkpoint); a second Ctrl-C raises ``KeyboardInterrupt`` at once. Outside the main thread it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the checkpoint
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def prepare_run_dir(run_dir: Path, run_files: Iterable[str], dist_info: DistInfo, overwrite: bool,
                    resume: str | None) -> None:
    """Create ``run_dir``; with ``overwrite`` first delete the ``run_files`` an earlier run left there.

    Raises :class:`RunDirError` on every rank when the directory holds a checkpoint and neither ``resume`` nor
    ``overwrite`` was given (a lone rank-0 error would leave the other ranks waiting).
    """
    error = None
    if dist_info.is_main:
        existing = [n for n in run_files if (run_dir / n).exists()]
        if existing and overwrite:
            for n in existing:
                p = run_dir / n
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif resume is None and find_resume_checkpoint(run_dir):
            error = (f'{run_dir} already holds a training run; pass --resume auto to continue it, '
                     '--overwrite to start it again, or another --output')
        if error is None:
            run_dir.mkdir(parents=True, exist_ok=True)
    error = broadcast_object(error)
    if error is not None:
        raise RunDirError(error)


def broadcast_buffers(modules: Iterable[nn.Module]) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics) of ``modules``; a no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for m in modules:
            for b in m.buffers():
                dist.broadcast(b, src=0)
