"""One optimizer update at a time: Mixup, autocast forward, loss checks agreed by all ranks, accumulation, clipping,
scaler, optimizer and EMA.

The checks happen before ``backward``: a non-finite loss stops every rank at the same micro-step, before it can
touch the weights, so the last checkpoint is a good one.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from timm.utils import dispatch_clip_grad

__all__ = ['NonFiniteLossError', 'StepSync', 'Updater']


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class StepSync:
    """What the ranks agree on after each micro-step's forward: mean loss, non-finite loss, stop request, bad images.

    In a single process it is the local values; under DDP one small all-reduce per micro-step.
    """

    def __init__(self, loss: float, nonfinite: bool, stop: bool, bad_images: int):
        self.loss = loss
        self.nonfinite = nonfinite
        self.stop = stop
        self.bad_images = bad_images

    @classmethod
    def gather(cls, loss: torch.Tensor, stop: bool, bad_images: int, world_size: int) -> StepSync:
        local_finite = bool(torch.isfinite(loss).item())
        if world_size == 1:
            return cls(float(loss.item()), not local_finite, stop, bad_images)
        t = torch.tensor([loss.item() if local_finite else 0., 0. if local_finite else 1., float(stop),
                          float(bad_images)], dtype=torch.float64, device=loss.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return cls(t[0].item() / world_size, t[1].item() > 0, t[2].item() > 0, int(t[3].item()))


class Updater:
    """Runs micro-batches and applies an optimizer update every ``update_freq`` of them.

    Args:
        model: The model being trained (DDP-wrapped under torchrun).
        optimizer: Its optimizer.
        criterion: Loss on (logits, targets).
        mixup: timm Mixup/CutMix applied to each micro-batch, or None.
        scaler: GradScaler for fp16 autocast, or None.
        amp_dtype: Autocast dtype, or None for fp32.
        ema: timm ModelEmaV3 updated after every optimizer update, or None.
        clip_grad: Gradient clipping threshold, or None.
        clip_mode: timm clipping mode (norm, value, agc).
        update_freq: Micro-batches per update (gradient accumulation).
        world_size: Processes taking part.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable,
                 mixup: Callable | None = None, scaler: torch.amp.GradScaler | None = None,
                 amp_dtype: torch.dtype | None = None, ema: torch.nn.Module | None = None,
                 clip_grad: float | None = None, clip_mode: str = 'norm', update_freq: int = 1,
                 world_size: int = 1):
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.mixup = mixup
        self.scaler = scaler
        self.amp_dtype = amp_dtype
        self.ema = ema
        self.clip_grad = clip_grad
        self.clip_mode = clip_mode
        self.update_freq = update_freq
        self.world_size = world_size

    def _unwrapped(self) -> torch.nn.Module:
        return getattr(self.model, 'module', self.model)

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, last: bool, stop: Callable[[], bool] | None = None,
                   bad_images: int = 0, where: str = '') -> StepSync:
        """Forward and backward one micro-batch; ``last`` ends the accumulation (the update is applied).

        ``stop`` is asked after the forward whether a stop was requested (a signal during this step stops after it).

        Raises:
            NonFiniteLossError: on any rank's non-finite loss, before ``backward``; the message names ``where``.
        """
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self.criterion(self.model(x), y)
        sync = StepSync.gather(loss.detach().float(), bool(stop and stop()), bad_images, self.world_size)
        if sync.nonfinite:
            value = loss.item()
            raise NonFiniteLossError(
                f'non-finite training loss ({value if not math.isfinite(value) else "on another rank"}) at {where}; '
                'training stopped before this step changed the weights. Lower the learning rate, enable gradient '
                'clipping (optim.clip_grad) or use fp32; resume from the last checkpoint with --resume auto')
        no_sync = getattr(self.model, 'no_sync', None)
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            scaled = loss / self.update_freq
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return sync

    def apply_update(self, num_updates: int) -> None:
        """Clip, step the optimizer (through the scaler), clear gradients and update the EMA."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler is not None:
            if self.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                dispatch_clip_grad(params, self.clip_grad, mode=self.clip_mode)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.clip_grad is not None:
                dispatch_clip_grad(params, self.clip_grad, mode=self.clip_mode)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self._unwrapped(), step=num_updates)
