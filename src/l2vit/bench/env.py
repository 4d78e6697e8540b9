"""The environment a benchmark ran in: the header of every results file."""
from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch

__all__ = ['environment', 'cpu_name', 'device_name']


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
        from ..layers import prepacked
        env['mkldnn'] = torch.backends.mkldnn.is_available()
        env['cpu_capability'] = torch.backends.cpu.get_cpu_capability()  # AVX2 / AVX512: kernels differ
        if prepacked.packing_available():
            env['fused_gelu'] = prepacked.gelu_fused()  # this process's choice (each configuration makes its own)
    return env
