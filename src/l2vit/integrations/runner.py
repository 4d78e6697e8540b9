"""The training loop shared by ``l2vit det train`` and ``l2vit seg train``: iterations, checkpoints, resume, records.

Training is a sequence of iterations cut into *rounds*: an epoch for detection, ``eval_interval`` iterations for
segmentation. Each round ends with an evaluation when due, a checkpoint ``checkpoints/epoch-<round>`` and a row of
``summary.csv``; ``run.recovery_interval`` adds mid-round recovery checkpoints. Everything that decides what
happens next (data order, augmentation seeds, learning rate) is a function of the iteration count, so a run
resumed from any checkpoint continues exactly where it stopped.

Reused from the training engine: the atomic checkpoint directories (:class:`~l2vit.engine.CheckpointManager`,
``find_resume_checkpoint``, ``read_checkpoint``), the loss agreement across ranks (``StepSync``), the process-group
helpers, RNG capture, the console / file logger and the JSONL event log.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset

from ..data import EpochSampler, ShardSampler
from ..engine.checkpoint import (
    CheckpointManager,
    LoadedCheckpoint,
    atomic_write_text,
    read_checkpoint,
    resolve_resume,
)
from ..engine.config import config_diff
from ..engine.distributed import all_gather_objects, cleanup_distributed, init_distributed
from ..engine.logging import RunRecorder, format_duration, setup_logging
from ..engine.malloc import keep_freed_memory_for_run
from ..engine.rng import get_rng_state, seed_everything, set_rng_state
from ..engine.run import StopRequest, broadcast_buffers, prepare_run_dir, run_exit_code
from ..engine.train import NonFiniteLossError, StepSync
from ..models import CheckpointError
from .config import DetConfig, SegConfig, dense_config_from_dict, dense_config_to_dict
from .schedule import LrSchedule

__all__ = ['DenseTrainer', 'DenseResult', 'build_dense_optimizer', 'AMP_DTYPES', 'json_safe', 'load_trained']

AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
_RUN_FILES = ('checkpoints', 'summary.csv', 'events.jsonl', 'train.log', 'config.yaml', 'tensorboard', 'predictions',
              'metrics')


@dataclass
class DenseResult:
    """How a run ended: ``status`` is 'completed', 'interrupted' or 'nonfinite'."""
    status: str
    run_dir: Path
    iters_done: int
    final: dict[str, Any]
    message: str = ''
    signum: int | None = None

    @property
    def exit_code(self) -> int:
        """0 when completed, 128 + signal number when interrupted, 3 for NaN."""
        return run_exit_code(self.status, self.signum)


def build_dense_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """timm optimizer over the trainable parameters; weight decay on all of them (official) unless
    ``decay_norm_and_bias`` is False (then timm's no-decay rule for 1-D parameters and biases)."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError('the model has no trainable parameter (is everything frozen?)')
    if cfg.decay_norm_and_bias:
        groups: Any = [{'params': params, 'weight_decay': cfg.weight_decay}]
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay)
    return create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               betas=tuple(cfg.betas), eps=cfg.eps)


class DenseTrainer(ABC):
    """Base of the detection and segmentation trainers (see the module docstring).

    Args:
        cfg: The resolved recipe.
        resume: ``'auto'`` (newest checkpoint of the run directory, or a fresh start), a checkpoint / run
            directory, or None.
        overwrite: Delete the files of an earlier run in the output directory first.
    """

    task: str = ''
    primary_metric: str = ''

    def __init__(self, cfg: DetConfig | SegConfig, resume: str | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.run_dir = Path(cfg.output)

    # ------------------------------------------------------------------------------------------ task hooks
    @abstractmethod
    def build_data(self) -> None:
        """Set ``train_set``, ``collate``, ``class_names`` and whatever evaluation needs."""

    @abstractmethod
    def build_model(self, load_pretrained: bool) -> nn.Module:
        """The model to train (on CPU); backbone weights only when ``load_pretrained``."""

    @abstractmethod
    def schedule_iters(self, iters_per_data_epoch: int) -> tuple[int, int, list[int]]:
        """``(iterations of the schedule, iterations per round, step milestones in iterations)``."""

    @abstractmethod
    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """The loss terms of one batch (summed to train)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, draw_dir: Path | None) -> dict[str, Any]:
        """Metrics on the validation split (identical on every rank), drawing the first images into ``draw_dir``."""

    def eval_due(self, round_idx: int, last: bool) -> bool:
        """Whether round ``round_idx`` (1-based) ends with an evaluation."""
        return True

    def round_label(self, round_idx: int, it: int) -> dict[str, Any]:
        """Columns naming a round in ``summary.csv``."""
        return {'round': round_idx, 'iter': it}

    # ------------------------------------------------------------------------------------------ building
    def _find_resume(self) -> LoadedCheckpoint | None:
        ckpt = resolve_resume(self.resume, self.run_dir, self.logger)
        if ckpt is not None and ckpt.state.get('task') != self.task:
            raise CheckpointError(f'{ckpt.path} is not a {self.task} checkpoint (task {ckpt.state.get("task")!r})')
        return ckpt

    def _build_loader(self) -> None:
        cfg = self.cfg
        w, r = self.dist.world_size, self.dist.rank
        self.sampler = EpochSampler(len(self.train_set), w, r, shuffle=True, seed=cfg.seed)
        self.iters_per_data_epoch = len(self.sampler) // cfg.batch_size
        if self.iters_per_data_epoch == 0:
            raise ValueError(f'the training data ({len(self.train_set)} images) is smaller than one batch of '
                             f'{cfg.batch_size * w} images (batch_size x processes)')
        workers = cfg.data.num_workers
        self.loader = DataLoader(
            self.train_set, batch_sampler=BatchSampler(self.sampler, cfg.batch_size, drop_last=True),
            collate_fn=self.collate, num_workers=workers, pin_memory=self.device.type == 'cuda',
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.seed))

    def eval_loader(self, dataset: Dataset, batch_size: int, collate: Any) -> DataLoader:
        """This rank's shard of ``dataset`` in order (no padding: every image counts once)."""
        return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), self.dist.world_size,
                                                                               self.dist.rank),
                          collate_fn=collate, num_workers=self.cfg.data.num_workers,
                          pin_memory=self.device.type == 'cuda',
                          generator=torch.Generator().manual_seed(0))  # evaluation leaves the global RNG alone

    def build(self) -> None:
        """Process group, run directory, data, model, optimizer and resume state."""
        cfg = self.cfg
        self.dist, self.device = init_distributed(cfg.device)
        prepare_run_dir(self.run_dir, _RUN_FILES, self.dist, self.overwrite, self.resume)
        self.logger = setup_logging(self.run_dir, self.dist.is_main)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.malloc_note = keep_freed_memory_for_run(cfg.run.keep_freed_memory, self.device)  # the whole process
        seed_everything(cfg.seed)
        self.resume_ckpt = self._find_resume()
        self.build_data()
        self._build_loader()
        self.schedule_total, self.round_iters, milestones = self.schedule_iters(self.iters_per_data_epoch)
        max_iters = getattr(cfg, 'max_iters', None)  # a short run: stop early, the schedule keeps its length
        self.total_iters = min(self.schedule_total, max_iters) if max_iters else self.schedule_total
        s = cfg.sched
        self.schedule = LrSchedule(self.schedule_total, s.policy, milestones, s.gamma, s.power, s.min_lr,
                                   s.warmup_iters, s.warmup_ratio)
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.model = self.build_model(load_pretrained=self.resume_ckpt is None).to(self.device)
        self.train_model: nn.Module = self.model
        if self.dist.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                find_unused_parameters=cfg.run.find_unused_parameters)
        self.optimizer = build_dense_optimizer(self.model, cfg.optim)
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.iter, self.history, self.best, self.round_accum = 0, [], {}, _empty_accum()
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        else:
            seed_everything(cfg.seed + self.dist.rank)
        self.ckpt = CheckpointManager(self.run_dir, cfg.run.keep_last) if self.dist.is_main else None
        self.recorder = RunRecorder(self.run_dir, self.dist.is_main, cfg.run.tensorboard, plot=False)
        if self.dist.is_main:
            atomic_write_text(self.run_dir / 'config.yaml',
                              yaml.safe_dump(dense_config_to_dict(cfg), sort_keys=False))

    # ------------------------------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        round_idx, into = divmod(self.iter, self.round_iters)
        return {
            'task': self.task, 'iter': self.iter, 'epoch': round_idx, 'epoch_updates': into,
            'total_iters': self.total_iters, 'optimizer': self.optimizer.state_dict(),
            'scaler': self.scaler.state_dict() if self.scaler is not None else None,
            'rng': all_gather_objects(get_rng_state()), 'world_size': self.dist.world_size,
            'config': dense_config_to_dict(self.cfg), 'history': self.history, 'best': self.best,
            'round_accum': self.round_accum,
            'class_names': list(self.class_names), 'num_classes': len(self.class_names),
        }

    def _restore(self, ckpt: LoadedCheckpoint) -> None:
        s = ckpt.state
        if s.get('num_classes') != len(self.class_names):
            raise CheckpointError(f'{ckpt.path} was trained on {s.get("num_classes")} classes, the data has '
                                  f'{len(self.class_names)}')
        changed = config_diff(s.get('config', {}), dense_config_to_dict(self.cfg))
        if changed:
            self.logger.warning('resuming with a changed config: ' + '; '.join(changed))
        self.model.load_state_dict(ckpt.model)
        self.optimizer.load_state_dict(s['optimizer'])
        if self.scaler is not None and s.get('scaler'):
            self.scaler.load_state_dict(s['scaler'])
        self.iter = int(s['iter'])
        self.history, self.best = list(s['history']), dict(s['best'])
        self.round_accum = dict(s.get('round_accum') or _empty_accum())
        if len(s['rng']) == self.dist.world_size:
            set_rng_state(s['rng'][self.dist.rank])
        else:
            self.logger.warning(f'the checkpoint was written by {len(s["rng"])} process(es), this run has '
                                f'{self.dist.world_size}: RNG streams are re-seeded')
            seed_everything(self.cfg.seed + self.dist.rank + self.iter)

    def _save(self, name: str) -> Path | None:
        state = self._state()  # collective under DDP
        if self.ckpt is None:
            return None
        path = self.ckpt.save(name, self.model, None, state)
        round_idx, into = divmod(self.iter, self.round_iters)
        self.ckpt.prune((round_idx, into))
        self.recorder.event('checkpoint', path=str(path), iter=self.iter)
        return path

    def _save_recovery(self) -> Path | None:
        round_idx, into = divmod(self.iter, self.round_iters)
        return self._save(CheckpointManager.recovery_name(round_idx, into))

    # ------------------------------------------------------------------------------------------ loop
    def _step(self, batch: Any, stop: bool) -> tuple[StepSync, dict[str, float]]:
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            losses = self.losses(self.train_model, batch)
        loss = sum(losses.values())
        sync = StepSync.gather(loss.detach().float(), stop, 0, self.dist.world_size)
        if sync.nonfinite:
            parts = ', '.join(f'{k} {v.item():.4g}' for k, v in losses.items())
            raise NonFiniteLossError(f'non-finite training loss at iteration {self.iter + 1} ({parts}); training '
                                     'stopped before this step changed the weights. Lower the learning rate or set '
                                     'optim.clip_grad, then resume from the last checkpoint with --resume auto')
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if cfg.optim.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if cfg.optim.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sync, {k: float(v.detach()) for k, v in losses.items()}

    def _batches(self):
        """Batches from the current iteration on, data epoch after data epoch (resumable mid-epoch)."""
        while True:
            epoch, offset = divmod(self.iter, self.iters_per_data_epoch)
            self.sampler.set_epoch(epoch, start=offset * self.cfg.batch_size)
            for batch in self.loader:
                yield batch
                if divmod(self.iter, self.iters_per_data_epoch)[0] != epoch:
                    break

    def fit(self) -> DenseResult:
        """Build (unless done), train to the end of the schedule and return how it ended."""
        try:
            if not hasattr(self, 'recorder'):
                self.build()
            return self._fit()
        finally:
            if hasattr(self, 'recorder'):
                self.recorder.close()
            cleanup_distributed()

    def _announce(self) -> None:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.logger.info(f'l2vit {self.task} train: {self.describe_model()} ({n_params / 1e6:.2f}M params, '
                         f'{n_train / 1e6:.2f}M trainable, {len(self.class_names)} classes); '
                         f'{len(self.train_set)} training images')
        self.logger.info(f'{self.total_iters} iterations ({self.iters_per_data_epoch} per data epoch), global batch '
                         f'{cfg.batch_size * self.dist.world_size} ({self.dist.world_size} process(es) x '
                         f'{cfg.batch_size}), device {self.device}, amp {cfg.amp}; run dir {self.run_dir}')
        if self.malloc_note:
            self.logger.info(self.malloc_note)
        if self.resume_ckpt is not None:
            self.logger.info(f'resumed from {self.resume_ckpt.path} at iteration {self.iter}')
            self.recorder.event('resume', path=str(self.resume_ckpt.path), iter=self.iter)
        else:
            self.recorder.event('start', config=dense_config_to_dict(cfg), world_size=self.dist.world_size)

    def describe_model(self) -> str:
        return type(self.model).__name__

    def _fit(self) -> DenseResult:
        cfg = self.cfg
        self._announce()
        status, message = 'completed', ''
        t_round, t_log = time.perf_counter() - self.round_accum['time'], time.perf_counter()
        start_iter = self.iter
        with StopRequest() as stop:
            try:
                self.train_model.train()
                batches = self._batches() if self.iter < self.total_iters else iter(())
                for batch in batches:
                    lr = self.schedule.apply(self.optimizer, self.iter)
                    sync, parts = self._step(batch, stop.signum is not None)
                    self.iter += 1
                    acc = self.round_accum
                    acc['count'] += 1
                    acc['time'] = time.perf_counter() - t_round
                    for k, v in {'loss': sync.loss, **parts}.items():
                        acc['sums'][k] = acc['sums'].get(k, 0.) + v
                    if self.iter % cfg.run.log_interval == 0 or self.iter == self.total_iters:
                        elapsed = time.perf_counter() - t_log
                        eta = elapsed / max(self.iter - start_iter, 1) * (self.total_iters - self.iter)
                        self.logger.info(f'iter {self.iter}/{self.total_iters} loss {sync.loss:.4f} ('
                                         + ', '.join(f'{k} {v:.4f}' for k, v in parts.items())
                                         + f') lr {lr:.3e} eta {format_duration(eta)}')
                        self.recorder.event('log', iter=self.iter, loss=sync.loss, lr=lr, **parts)
                        self.recorder.scalars(self.iter, train_loss=sync.loss, lr=lr)
                    if self.iter % self.round_iters == 0 or self.iter == self.total_iters:
                        row = {f'train_{k}': v / max(acc['count'], 1) for k, v in acc['sums'].items()}
                        row.update(lr=lr, time_s=round(acc['time'], 3))
                        if self._on_boundary():  # a max_iters stop inside a round keeps the round's sums
                            self.round_accum = _empty_accum()
                        self._end_round(row)
                        t_round = time.perf_counter() - self.round_accum['time']
                        self.train_model.train()
                    elif cfg.run.recovery_interval and self.iter % cfg.run.recovery_interval == 0:
                        self._save_recovery()
                    if sync.stop:
                        status = 'interrupted'
                        self._save_recovery()
                        name = signal.Signals(stop.signum).name if stop.signum else 'a signal'
                        message = (f'stopped by {name} at iteration {self.iter}; checkpoint saved; continue with '
                                   'the same command and --resume auto')
                        break
                    if self.iter >= self.total_iters:
                        break
            except NonFiniteLossError as e:
                status, message = 'nonfinite', str(e)
        final = self.history[-1] if self.history else {}
        self.recorder.event('end', status=status, message=message, final=final, best=self.best)
        if status == 'completed':
            self.logger.info(f'l2vit {self.task} train: done after {self.iter} iterations; run dir {self.run_dir} '
                             f'(summary.csv, config.yaml, checkpoints/, predictions/)')
        else:
            self.logger.warning(f'l2vit {self.task} train: {message}')
        return DenseResult(status, self.run_dir, self.iter, final, message, stop.signum)

    def _on_boundary(self) -> bool:
        """Whether the current iteration ends a round (else a max_iters stop inside one)."""
        return self.iter % self.round_iters == 0 or self.iter == self.schedule_total

    def _end_round(self, row: dict[str, Any]) -> None:
        round_idx = math.ceil(self.iter / self.round_iters)
        last = self.iter == self.total_iters
        row = {**self.round_label(round_idx, self.iter), **row}
        if self._on_boundary():
            name = CheckpointManager.epoch_name(round_idx)
        else:  # stopped by max_iters inside a round: a recovery checkpoint, so a resume finishes the round
            name = CheckpointManager.recovery_name(*divmod(self.iter, self.round_iters))
        label = name.replace('/', '-')
        if self.eval_due(round_idx, last):
            broadcast_buffers([self.model])  # every rank evaluates with rank 0's BatchNorm statistics
            draw_dir = self.run_dir / 'predictions' / label if self.cfg.run.draw > 0 and self.dist.is_main else None
            metrics = self.evaluate(self.model, draw_dir)
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            row.update(scalars)
            if self.dist.is_main:
                (self.run_dir / 'metrics').mkdir(exist_ok=True)
                atomic_write_text(self.run_dir / 'metrics' / f'{label}.json', json.dumps(json_safe(metrics), indent=2))
            self.logger.info(f'{label} (iteration {self.iter}): ' + self.format_metrics(metrics))
            self.recorder.scalars(self.iter, **{f'val/{k}': v for k, v in scalars.items()})
        self.history.append(json_safe(row))
        value = row.get(self.primary_metric)
        improved = value is not None and not math.isnan(value) and value > self.best.get('value', -math.inf)
        if improved:
            self.best = {'metric': self.primary_metric, 'value': value, 'iter': self.iter, 'round': round_idx}
        path = self._save(name)
        if improved and self.ckpt is not None and path is not None:
            self.ckpt.link(path, 'best')
        self.recorder.event('round', **self.history[-1])
        if self.dist.is_main:
            self._write_summary()

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return ', '.join(f'{k} {v:.4f}' for k, v in metrics.items() if isinstance(v, float))

    def _write_summary(self) -> None:
        fields: list[str] = []
        for row in self.history:
            fields += [k for k in row if k not in fields]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator='\n')
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: ('' if row.get(k) is None else row[k]) for k in fields})
        atomic_write_text(self.run_dir / 'summary.csv', buf.getvalue())


def load_trained(path: str | os.PathLike, task: str) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor], Path]:
    """``(config, state, weights, checkpoint dir)`` of a run directory (its best checkpoint, else the newest) or a
    checkpoint directory written by ``l2vit det|seg train``."""
    from ..engine.weights import resolve_weight_source

    src = resolve_weight_source(path, use_ema=False)
    if src.kind != 'ours':
        raise CheckpointError(f'{path} is not a run or checkpoint directory of l2vit {task} train')
    ckpt = read_checkpoint(src.path)
    if ckpt.state.get('task') != task:
        raise CheckpointError(f'{src.path} is not a {task} checkpoint (task {ckpt.state.get("task")!r})')
    cfg = dense_config_from_dict(task, ckpt.state['config'])
    return cfg, ckpt.state, ckpt.model, src.path


def _empty_accum() -> dict[str, Any]:
    """Running sums of the current round's loss terms (kept in checkpoints: a resumed round averages all of it)."""
    return {'sums': {}, 'count': 0, 'time': 0.}


def json_safe(value: Any) -> Any:
    """Plain JSON values (NaN → None) for checkpoints, metrics files and event lines."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

