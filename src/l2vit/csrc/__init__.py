"""l2vit's hand-written CPU kernels, built on first use with PyTorch's C++ extension loader (``g++`` and ``ninja``).

The build takes about half a minute, once per machine and PyTorch version (torch caches it under
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``); later processes load the built library in about
a second. Where no compiler is found or the build fails, :func:`cpu_kernels` warns once and returns ``None``, and
every caller falls back to PyTorch's own ops, so nothing but speed is lost. ``L2VIT_CPU_KERNELS=0`` turns them off.

The code is compiled for the instruction set PyTorch itself dispatches to on this CPU (AVX-512, AVX2 or the
baseline), not ``-march=native``, and that name is part of the library's name, so a cache shared between machines
with different CPUs never hands one of them code it cannot run.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

__all__ = ['cpu_kernels', 'cpu_kernels_enabled']

_logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name('depthwise_cpu.cpp')]

_ISA_FLAGS = {
    'AVX512': ['-mavx512f', '-mavx512vl', '-mavx512bw', '-mavx512dq', '-mavx2', '-mfma'],
    'AVX2': ['-mavx2', '-mfma'],
}

_lock = threading.Lock()
_module = None
_failed = False


def cpu_kernels_enabled() -> bool:
    """False when ``L2VIT_CPU_KERNELS`` is set to ``0`` (or ``false`` / ``off`` / ``no``)."""
    return os.environ.get('L2VIT_CPU_KERNELS', '1').strip().lower() not in ('0', 'false', 'off', 'no')


def _isa() -> str:
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an unknown build: the portable baseline
        return 'DEFAULT'
    return capability if capability in _ISA_FLAGS else 'DEFAULT'


def cpu_kernels():
    """The built extension module, or ``None`` where the kernels are off or cannot be built (warned once)."""
    global _module, _failed
    if not cpu_kernels_enabled():
        return None
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is not None or _failed:
            return _module
        isa = _isa()
        name = f'l2vit_cpu_{isa.lower()}'
        path = os.environ.get('PATH')
        try:
            from torch.utils import cpp_extension
            _put_ninja_on_path()
            _logger.info('loading l2vit CPU kernels %s (built once per machine and torch version, ~30 s)', name)
            _module = cpp_extension.load(
                name=name,
                sources=[str(s) for s in _SOURCES],
                # -fopenmp: ATen's parallel_for is inlined here and runs on one thread without it; the library links
                # libgomp.so.1, which resolves to the runtime torch already loaded
                extra_cflags=['-O3', '-fopenmp', *_ISA_FLAGS.get(isa, [])],
                extra_ldflags=['-fopenmp'],
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - any build failure falls back to PyTorch's ops
            _failed = True
            warnings.warn(
                f'l2vit: could not build its CPU kernels ({type(e).__name__}: {str(e).strip()[:300]}); using '
                "PyTorch's own ops instead (slower depth-wise convolution backward). Set L2VIT_CPU_KERNELS=0 to "
                'skip the attempt.', RuntimeWarning, stacklevel=2)
        finally:
            if path is None:
                os.environ.pop('PATH', None)
            else:
                os.environ['PATH'] = path
    return _module


def _put_ninja_on_path() -> None:
    """torch's loader runs ``ninja`` from ``PATH``; a virtual environment used without activating it has the pip
    package's binary but not on ``PATH``."""
    if shutil.which('ninja'):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ['PATH'] = os.pathsep.join([ninja.BIN_DIR, os.environ.get('PATH', '')])
