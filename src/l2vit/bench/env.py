"""The environment a benchmark ran in: the header of every results file."""
from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch

__all__ = ['environment', 'cpu_name', 'device_name', 'cpu_bf16', 'missing_half_kernels']


def cpu_name() -> str:
    """The CPU model string (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16() -> str:
    """How this CPU multiplies bf16 matrices in oneDNN: ``'amx'`` (tile units), ``'avx512'`` (AVX-512 instructions,
    native bf16 dot products where the CPU has AVX512_BF16) or ``'none'`` (oneDNN has no bf16 kernels for it: bf16
    work is converted and computed in fp32, so bf16 runs slower than fp32)."""
    if not _onednn_supports('bf16'):
        return 'none'
    return 'amx' if torch.cpu._is_amx_tile_supported() else 'avx512'


def _onednn_supports(dtype: str) -> bool:
    """Whether this PyTorch's oneDNN has CPU kernels for ``'bf16'`` / ``'fp16'`` on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    check = {'bf16': torch.ops.mkldnn._is_mkldnn_bf16_supported, 'fp16': torch.ops.mkldnn._is_mkldnn_fp16_supported}
    return bool(check[dtype]())


def missing_half_kernels(dtype: str, device: str = 'cpu') -> str | None:
    """Why ``dtype`` (``'bf16'`` / ``'fp16'``) would crawl on ``device``, or None: on a CPU for which oneDNN has no
    kernels of that precision, PyTorch falls back to generic loops (bf16 matrix multiplies at ~1 GFLOP/s on an AVX2
    EPYC against 174 in fp32), so one batch-16 forward takes minutes and says nothing about the model."""
    if torch.device(device).type != 'cpu' or dtype not in ('bf16', 'fp16') or _onednn_supports(dtype):
        return None
    return (f'no {dtype} kernels for this CPU ({torch.backends.cpu.get_cpu_capability()}) in oneDNN: {dtype} runs as '
            f'a slow generic fallback (--slow-half-precision times it anyway)')


def device_name(device: str) -> str:
    """Human-readable name of ``device`` (``'cpu'``, ``'cuda'``, ``'cuda:1'``)."""
    dev = torch.device(device)
    if dev.type == 'cuda':
        props = torch.cuda.get_device_properties(dev)
        return f'{props.name} ({props.total_memory / 2 ** 30:.0f} GiB)'
    return f'{cpu_name()} ({os.cpu_count()} logical CPUs)'


def environment(device: str = 'cpu', threads: int | None = None) -> dict[str, Any]:
    """Device, software versions, thread count and UTC date: enough to tell whether two runs are comparable."""
    import timm

    from ..version import __version__
    env = {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'device': device,
        'device_name': device_name(device),
        'threads': threads if threads is not None else torch.get_num_threads(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'l2vit': __version__,
        'python': platform.python_version(),
        'platform': platform.platform(),
    }
    if torch.device(device).type == 'cuda':
        env['cuda'] = torch.version.cuda
        env['cudnn'] = torch.backends.cudnn.version()
    else:
        env['mkldnn'] = torch.backends.mkldnn.is_available()
        env['cpu_capability'] = torch.backends.cpu.get_cpu_capability()  # AVX2 / AVX512: kernels differ
        env['cpu_bf16'] = cpu_bf16()
    return env
