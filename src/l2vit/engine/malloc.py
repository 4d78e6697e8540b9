"""Keep freed memory in the process (glibc ``mallopt``) for long CPU runs.

glibc serves every allocation above its mmap threshold (at most 32 MiB by default) with fresh pages from the kernel
and hands them back on free. A CPU training step of a vision backbone allocates dozens of such tensors (the stage-1
MLP hidden map, q/k/v, their gradients), so each step faults all of them in again: ~131k page faults per step for
``l2vit_tiny`` at 224², batch 16. Raising the mmap and trim thresholds serves them from the reused heap instead.
This is what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment do, set from inside the
process. The cost is resident memory: the heap keeps its high-water mark (about 110 MiB more for that step).

The setting belongs to the process and cannot be undone (glibc's adaptive threshold is switched off by any explicit
value), so the library never makes it on import; the trainers make it for CPU runs unless told not to.
"""
from __future__ import annotations

import ctypes
import os
import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ['MALLOC_ENV_VARS', 'keep_freed_memory', 'keep_freed_memory_for_run']

# mallopt() parameter numbers (glibc <malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest value mallopt() takes (an int): allocations up to 2 GiB come from the heap, and the heap is trimmed
# only when more than 2 GiB at its top are free.
_THRESHOLD = 2**31 - 1

MALLOC_ENV_VARS = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_')

_applied = False


def keep_freed_memory() -> tuple[bool, str]:
    """Raise glibc's mmap and trim thresholds for this process; returns ``(applied, why)``.

    Does nothing (and says why) outside glibc, or when the environment already configures glibc's allocator
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or ``glibc.malloc.*`` in
    ``GLIBC_TUNABLES``): the user's own settings win. Calling it again is harmless.
    """
    global _applied
    if _applied:
        return True, 'already set in this process'
    libc_name, _ = platform.libc_ver()
    if platform.system() != 'Linux' or libc_name != 'glibc':
        return False, f'not glibc ({platform.system()} {libc_name or "unknown libc"})'
    own = [name for name in MALLOC_ENV_VARS if name in os.environ]
    if 'glibc.malloc.' in os.environ.get('GLIBC_TUNABLES', ''):
        own.append('GLIBC_TUNABLES')
    if own:
        return False, f'left to the environment ({", ".join(own)})'
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - a glibc without mallopt
        return False, 'mallopt() not found'
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) != 1:
        return False, 'mallopt() refused the thresholds'
    _applied = True
    return True, 'mmap and trim thresholds raised to 2 GiB'


def keep_freed_memory_for_run(enabled: bool, device: torch.device) -> str | None:
    """What a trainer does with its ``keep_freed_memory`` switch: apply it on CPU runs; returns the line to log
    (``None`` when there is nothing to say: switched off, or a GPU run, whose large tensors live on the device)."""
    if not enabled or device.type != 'cpu':
        return None
    applied, why = keep_freed_memory()
    return f"keep_freed_memory: {'on' if applied else 'off'}, {why}"
