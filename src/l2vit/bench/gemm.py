"""The device's matrix-multiply rate: the yardstick for how well a model uses the hardware."""
from __future__ import annotations

import torch

from .timing import time_callable

__all__ = ['gemm_gflops']


def gemm_gflops(dtype: torch.dtype = torch.float32, device: str = 'cpu', n: int = 2048, min_time: float = 1.0) -> float:
    """Median GFLOP/s of an ``n × n`` by ``n × n`` matrix multiply (``2 n³`` FLOPs) in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    stats = time_callable(lambda: torch.mm(a, b, out=out), device, warmup=2, min_reps=5, min_time=min_time)
    return 2 * n ** 3 / stats.median / 1e9
