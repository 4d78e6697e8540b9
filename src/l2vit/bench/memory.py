"""Peak memory of one call: CUDA's allocator statistics, or the peak resident set size of this process on CPU.

On CPU, allocations go through the C library, so the only sound measure is the operating system's: the process's
resident set size (RSS). Linux keeps its high-water mark (``VmHWM``) and lets a process reset it to the current RSS
(``/proc/self/clear_refs``), so the peak of one call is ``VmHWM`` after it minus ``VmRSS`` before it. Run it in a
fresh process per configuration (the benchmark does): memory an earlier configuration left with the allocator would
otherwise hide part of the next one's peak.
"""
from __future__ import annotations

import gc
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ['PeakMemory', 'measure_peak_memory', 'rss_peak_supported']

_KIB = 1024


def _status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        match = re.search(rf'^{field}:\s+(\d+) kB', f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f'/proc/self/status has no {field}')
    return int(match.group(1))


def _reset_rss_peak() -> None:
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current RSS (Linux >= 4.0)


def rss_peak_supported() -> bool:
    """Whether this system can measure the RSS peak of a call (Linux with a writable ``/proc/self/clear_refs``)."""
    try:
        _reset_rss_peak()
        _status_kib('VmHWM')
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Memory of one call, in bytes.

    Attributes:
        peak: Peak during the call above the baseline (what the call needed).
        baseline: What was in use before it (model, input, libraries).
        method: ``'cuda_max_allocated'`` or ``'rss_hwm'``.
    """
    peak: int
    baseline: int
    method: str


def measure_peak_memory(fn: Callable[[], object], device: torch.device | str = 'cpu') -> PeakMemory:
    """Run ``fn()`` once and return its peak memory above what was in use before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, exact). CPU: peak RSS of this process (everything the
    call touched: tensors, allocator slack, library workspaces) via ``VmHWM``; raises ``OSError`` where the peak
    cannot be reset (not Linux).
    """
    device = torch.device(device)
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return PeakMemory(torch.cuda.max_memory_allocated(device) - base, base, 'cuda_max_allocated')
    _reset_rss_peak()
    base = _status_kib('VmRSS')
    fn()
    peak = _status_kib('VmHWM')
    return PeakMemory(max(0, peak - base) * _KIB, base * _KIB, 'rss_hwm')
