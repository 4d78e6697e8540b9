"""torchrun / DDP helpers: process-group setup from the environment, rank queries, reductions."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ['DistInfo', 'resolve_device', 'init_distributed', 'cleanup_distributed', 'all_reduce_sum', 'all_gather_objects',
           'broadcast_object', 'barrier']


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``'auto'`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``'cuda'`` gets the local rank."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device}' requested but CUDA is not available; use --device cpu")
        if device == 'cuda':
            device = f'cuda:{local_rank}'
    return torch.device(device)


def init_distributed(device: str = 'auto') -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else run as a single process.

    The backend is nccl for CUDA devices and gloo on CPU.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo',
                                device_id=dev if dev.type == 'cuda' else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank), dev


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Sum over all processes (a float64 tensor; a no-op copy in a single process)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if _active():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable; used only in memory, never for files), in rank order."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every process."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _active():
        dist.barrier()
