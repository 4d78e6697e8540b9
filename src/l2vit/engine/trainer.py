"""The training run: builds everything from a :class:`TrainConfig`, trains, evaluates, checkpoints and resumes.

``Trainer(cfg).fit()`` is what ``l2vit train`` runs. Everything that can be wrong with the setup (model name, data
folder, class counts, checkpoint to resume) is checked while building, before the first step.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from ..data import (
    EpochSampler,
    TransformedDataset,
    build_eval_loader,
    build_eval_transform,
    build_sources,
    build_train_loader,
    build_train_transform,
    eval_crop,
)
from ..models import CheckpointError
from .checkpoint import (
    CheckpointManager,
    LoadedCheckpoint,
    atomic_write_text,
    resolve_resume,
)
from .config import TrainConfig, config_diff, config_to_dict
from .distributed import all_gather_objects, cleanup_distributed, init_distributed
from .evaluate import evaluate
from .logging import RunRecorder, format_duration, setup_logging
from .malloc import keep_freed_memory_for_run
from .optim import build_optimizer, build_scheduler
from .rng import get_rng_state, seed_everything, set_rng_state
from .run import StopRequest, broadcast_buffers, prepare_run_dir, run_exit_code
from .train import NonFiniteLossError, Updater
from .weights import load_finetune_weights

__all__ = ['Trainer', 'TrainResult']

# files a run writes in its directory; --overwrite removes exactly these
_RUN_FILES = ('checkpoints', 'summary.csv', 'events.jsonl', 'learning_curve.png', 'train.log', 'config.yaml',
              'tensorboard')
_AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


@dataclass
class TrainResult:
    """How a run ended: ``status`` is 'completed', 'interrupted' (by ``signum``) or 'nonfinite'."""
    status: str
    run_dir: Path
    epochs_done: int
    final: dict[str, Any]
    checkpoint: Path | None = None
    message: str = ''
    signum: int | None = None

    @property
    def exit_code(self) -> int:
        """0 when completed, 128 + signal number when interrupted (130 for SIGINT, 143 for SIGTERM), 3 for NaN."""
        return run_exit_code(self.status, self.signum)


@dataclass
class _Progress:
    """Where training stands and the running sums of the current epoch (identical on every rank)."""
    epoch: int = 0  # current epoch, 0-based
    epoch_updates: int = 0  # optimizer updates done in the current epoch
    num_updates: int = 0  # optimizer updates done in total
    loss_sum: float = 0.
    loss_count: int = 0
    bad_images: int = 0
    epoch_time: float = 0.  # seconds spent in the current epoch (before a resume, too)


class Trainer:
    """Train a timm classifier (an L²ViT by default) with the paper's recipe.

    Args:
        cfg: The resolved configuration.
        resume: ``'auto'`` (the newest checkpoint of the run directory, or a fresh start when there is none), a
            checkpoint / run directory, or None.
        overwrite: Delete the files of an earlier run in the output directory first.
    """

    def __init__(self, cfg: TrainConfig, resume: str | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.run_dir = Path(cfg.output)

    # ----------------------------------------------------------------------------------------------- building
    def _build_data(self) -> None:
        cfg, d = self.cfg, self.cfg.data
        self.train_source, self.val_source = build_sources(d.data_dir, d.train_split, d.val_split, d.val_fraction)
        self.classes = list(self.train_source.classes)
        a = cfg.aug
        train_tf = build_train_transform(
            d.input_size, scale=a.scale, ratio=a.ratio, hflip=a.hflip, vflip=a.vflip, color_jitter=a.color_jitter,
            auto_augment=a.auto_augment, interpolation=a.interpolation, mean=d.mean, std=d.std, reprob=a.reprob,
            remode=a.remode, recount=a.recount)
        eval_tf = build_eval_transform(d.input_size, d.crop_pct, d.interpolation, d.mean, d.std)
        self.train_set = TransformedDataset(self.train_source, train_tf, seed=cfg.seed, on_error='substitute')
        self.val_set = TransformedDataset(self.val_source, eval_tf, on_error='drop', seeded=False)
        w, r = self.dist.world_size, self.dist.rank
        self.sampler = EpochSampler(len(self.train_set), w, r, shuffle=True, seed=cfg.seed)
        micro_batches = len(self.sampler) // cfg.batch_size
        self.updates_per_epoch = micro_batches // cfg.optim.update_freq
        if self.updates_per_epoch == 0:
            raise ValueError(
                f'the training data ({len(self.train_set)} images) is too small for one optimizer step of '
                f'{cfg.batch_size * w * cfg.optim.update_freq} images (batch_size x processes x update_freq)')
        pin = d.pin_memory and self.device.type == 'cuda'
        self.train_loader = build_train_loader(self.train_set, self.sampler, cfg.batch_size, d.num_workers, pin,
                                               seed=cfg.seed)
        val_batch = d.val_batch_size or max(1, int(1.5 * cfg.batch_size))
        self.val_loader = build_eval_loader(self.val_set, val_batch, w, r, d.num_workers, pin)

    def _build_model(self) -> None:
        cfg, m = self.cfg, self.cfg.model
        if m.num_classes is not None and m.num_classes != len(self.classes):
            raise ValueError(f'model.num_classes is {m.num_classes} but the training data has {len(self.classes)} '
                             'classes; leave model.num_classes unset to take it from the data')
        kwargs = dict(m.kwargs, num_classes=len(self.classes), drop_path_rate=m.drop_path_rate, drop_rate=m.drop_rate)
        self.model = timm.create_model(m.name, **kwargs)
        if m.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.finetune_note = None
        if cfg.finetune.checkpoint and self.resume_ckpt is None:
            self.finetune_note = load_finetune_weights(self.model, cfg.finetune.checkpoint, cfg.finetune.use_ema,
                                                       cfg.finetune.head_class_map)
        self.model.to(self.device)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.enabled else None
        self.train_model: torch.nn.Module = self.model
        if self.dist.distributed:
            if m.sync_bn and self.device.type == 'cuda':
                self.train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.train_model, device_ids=[self.device.index] if self.device.type == 'cuda' else None)

    def _build_optim(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.sched, cfg.epochs, self.updates_per_epoch)
        amp_dtype = _AMP_DTYPES[cfg.amp]
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(self.device.type) if amp_dtype == torch.float16 else None
        a = cfg.aug
        mixup_on = a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None
        mixup = None
        if mixup_on:
            mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, cutmix_minmax=a.cutmix_minmax,
                          prob=a.mixup_prob, switch_prob=a.mixup_switch_prob, mode=a.mixup_mode,
                          label_smoothing=a.smoothing, num_classes=len(self.classes))
            criterion: Any = SoftTargetCrossEntropy()
        elif a.smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(a.smoothing)
        else:
            criterion = torch.nn.CrossEntropyLoss()
        self.updater = Updater(self.train_model, self.optimizer, criterion, mixup, self.scaler, amp_dtype, self.ema,
                               cfg.optim.clip_grad, cfg.optim.clip_mode, cfg.optim.update_freq, self.dist.world_size)

    def _find_resume(self) -> LoadedCheckpoint | None:
        return resolve_resume(self.resume, self.run_dir, self.logger)

    def _check_resume(self, ckpt: LoadedCheckpoint) -> None:
        state = ckpt.state
        if state.get('num_classes') != len(self.classes):
            raise CheckpointError(f'{ckpt.path} has a {state.get("num_classes")}-class classifier but the training '
                                  f'data has {len(self.classes)} classes')
        if state.get('model_name') != self.cfg.model.name:
            raise CheckpointError(f'{ckpt.path} is a checkpoint of {state.get("model_name")}, not '
                                  f'{self.cfg.model.name}')
        changed = config_diff(state.get('config', {}), config_to_dict(self.cfg))
        if changed:
            self.logger.warning('resuming with a changed config: ' + '; '.join(changed))

    def _restore(self, ckpt: LoadedCheckpoint) -> None:
        self.model.load_state_dict(ckpt.model)
        if self.ema is not None:
            if ckpt.model_ema is not None:
                self.ema.module.load_state_dict(ckpt.model_ema)
            else:
                self.logger.warning(f'{ckpt.path} has no EMA weights; the EMA restarts from the current weights')
                self.ema.module.load_state_dict(ckpt.model)
        s = ckpt.state
        self.optimizer.load_state_dict(s['optimizer'])
        self.scheduler.load_state_dict(s['scheduler'])
        if self.scaler is not None and s.get('scaler'):
            self.scaler.load_state_dict(s['scaler'])
        acc = s['epoch_accum']
        p = _Progress(epoch=int(s['epoch']), epoch_updates=int(s['epoch_updates']),
                      num_updates=int(s['num_updates']), loss_sum=acc['loss_sum'], loss_count=acc['loss_count'],
                      bad_images=acc['bad_images'], epoch_time=acc['time'])
        if s['updates_per_epoch'] != self.updates_per_epoch and p.epoch_updates:
            scaled = round(p.epoch_updates * self.updates_per_epoch / s['updates_per_epoch'])
            self.logger.warning(f'updates per epoch changed ({s["updates_per_epoch"]} -> {self.updates_per_epoch}: '
                                f'batch size or process count differ); continuing the epoch at update {scaled}')
            p.epoch_updates = scaled
        self.progress = p
        self.history = list(s['history'])
        self.best = dict(s['best'])
        rng = s['rng']
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank])
        else:
            self.logger.warning(f'the checkpoint was written by {len(rng)} process(es), this run has '
                                f'{self.dist.world_size}: RNG streams are re-seeded (results stay valid but are not '
                                'bit-identical to an uninterrupted run)')
            seed_everything(self.cfg.seed + self.dist.rank + p.num_updates)

    def _timm_config(self) -> dict[str, Any]:
        """config.json contents (timm format) so checkpoint directories load with ``local-dir:``."""
        from timm.models._hub import save_config_for_hf
        d = self.cfg.data
        crop_pct, crop_mode = eval_crop(d.input_size, d.crop_pct)
        data_cfg = dict(input_size=(3, d.input_size, d.input_size), crop_pct=crop_pct, crop_mode=crop_mode,
                        interpolation=d.interpolation, mean=tuple(d.mean), std=tuple(d.std))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                save_config_for_hf(self.model, os.path.join(tmp, 'config.json'),
                                   model_config={'label_names': self.classes}, data_config=data_cfg)
                return json.loads(Path(tmp, 'config.json').read_text())
        except Exception as e:  # never lose a run over an informational file
            self.logger.warning(f'could not describe the model for timm ({e}); config.json is minimal')
            return {'architecture': self.cfg.model.name, 'num_classes': len(self.classes),
                    'model_args': dict(self.cfg.model.kwargs), 'label_names': self.classes}

    def build(self) -> None:
        """Set up the process group, run directory, data, model, optimizer and resume state."""
        cfg = self.cfg
        self.dist, self.device = init_distributed(cfg.device)
        self._threads = torch.get_num_threads()
        if not timm.is_model(cfg.model.name):
            raise ValueError(f"unknown model '{cfg.model.name}'; l2vit models: "
                             f"{', '.join(timm.list_models('*l2vit*'))} (any timm model name works too)")
        self._build_data()  # a bad data folder fails here, before an earlier run is touched by --overwrite
        prepare_run_dir(self.run_dir, _RUN_FILES, self.dist, self.overwrite, self.resume)
        progress_mode = cfg.log.progress
        if progress_mode == 'auto':
            progress_mode = 'bar' if sys.stderr.isatty() else 'log'
        self.progress_mode = progress_mode
        self.logger = setup_logging(self.run_dir, self.dist.is_main, progress_bar=progress_mode == 'bar')
        self.file_logger = setup_logging(self.run_dir, self.dist.is_main, 'l2vit.file', console=False)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.malloc_note = keep_freed_memory_for_run(cfg.keep_freed_memory, self.device)  # the whole process
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.resume_ckpt = self._find_resume()
        if self.resume_ckpt is not None:
            self._check_resume(self.resume_ckpt)
        self._build_model()
        self._build_optim()
        self.progress, self.history, self.best = _Progress(), [], {}
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
        else:
            seed_everything(cfg.seed + self.dist.rank)
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last) if self.dist.is_main else None
        self.recorder = RunRecorder(self.run_dir, self.dist.is_main, cfg.log.tensorboard, cfg.log.plot)
        self.config_json = self._timm_config() if self.dist.is_main else None
        if self.dist.is_main:
            atomic_write_text(self.run_dir / 'config.yaml', yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    # ----------------------------------------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        """Training state for ``state.pt`` (collective under DDP: every rank contributes its RNG state)."""
        p = self.progress
        rng = all_gather_objects(get_rng_state())
        return {
            'epoch': p.epoch, 'epoch_updates': p.epoch_updates, 'num_updates': p.num_updates,
            'updates_per_epoch': self.updates_per_epoch,
            'epoch_accum': {'loss_sum': p.loss_sum, 'loss_count': p.loss_count, 'bad_images': p.bad_images,
                            'time': p.epoch_time},
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict() if self.scaler is not None else None,
            'rng': rng, 'world_size': self.dist.world_size,
            'config': config_to_dict(self.cfg), 'history': self.history, 'best': self.best,
            'class_names': self.classes, 'model_name': self.cfg.model.name, 'num_classes': len(self.classes),
        }

    def _save(self, name: str) -> Path | None:
        state = self._state()
        if self.ckpt is None:
            return None
        path = self.ckpt.save(name, self.model, self.ema.module if self.ema is not None else None, state,
                              self.config_json)
        self.ckpt.prune((self.progress.epoch, self.progress.epoch_updates))
        self.recorder.event('checkpoint', path=str(path), epoch=self.progress.epoch,
                            epoch_updates=self.progress.epoch_updates, num_updates=self.progress.num_updates)
        return path

    def _save_recovery(self) -> Path | None:
        return self._save(CheckpointManager.recovery_name(self.progress.epoch, self.progress.epoch_updates))

    # ----------------------------------------------------------------------------------------------- loop
    def _log_step(self, text: str) -> None:
        # with a progress bar on the terminal, step lines go to train.log only
        (self.logger if self.progress_mode == 'log' else self.file_logger).info(text)

    def _run_epoch(self, bar: Any, stop: StopRequest, t_start: float, updates_at_start: int) -> str | None:
        """Train the rest of the current epoch; returns 'interrupted' when stopped by a signal."""
        cfg, p = self.cfg, self.progress
        uf = cfg.optim.update_freq
        self.sampler.set_epoch(p.epoch, start=p.epoch_updates * uf * cfg.batch_size)
        self.train_model.train()
        t_epoch = time.perf_counter() - p.epoch_time
        t_log, updates_log = time.perf_counter(), 0
        data_time = update_loss = 0.
        micro = 0
        it = None
        while p.epoch_updates < self.updates_per_epoch:
            if micro == 0:
                self.scheduler.step_update(num_updates=p.num_updates)
            t0 = time.perf_counter()
            if it is None:
                it = iter(self.train_loader)
            x, y, bad = next(it)
            data_time += time.perf_counter() - t0
            for path, reason in bad:
                self.logger.warning(f'skipped unreadable image {reason}')
                self.recorder.event('bad_image', file=path, reason=reason)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            where = (f'epoch {p.epoch + 1}, step {p.epoch_updates + 1}/{self.updates_per_epoch} (global step '
                     f'{p.num_updates + 1}{f", micro-batch {micro + 1}/{uf}" if uf > 1 else ""})')
            sync = self.updater.micro_step(x, y, last=micro == uf - 1, stop=lambda: stop.signum is not None,
                                           bad_images=len(bad), where=where)
            p.loss_sum += sync.loss
            p.loss_count += 1
            p.bad_images += sync.bad_images
            update_loss += sync.loss / uf
            micro += 1
            if micro < uf:
                continue
            micro = 0
            self.updater.apply_update(p.num_updates + 1)
            p.num_updates += 1
            p.epoch_updates += 1
            updates_log += 1
            p.epoch_time = time.perf_counter() - t_epoch
            lr = self.optimizer.param_groups[-1]['lr']
            loss, update_loss = update_loss, 0.
            if cfg.log.step_events:
                self.recorder.event('step', epoch=p.epoch + 1, step=p.epoch_updates, global_step=p.num_updates,
                                    loss=loss, lr=lr)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=f'{p.epoch + 1}/{cfg.epochs}', loss=f'{loss:.4f}', lr=f'{lr:.2e}',
                                refresh=False)
            if p.epoch_updates % cfg.log.interval == 0 or p.epoch_updates == self.updates_per_epoch:
                step_s = (time.perf_counter() - t_log) / updates_log
                self._log_interval(loss, lr, step_s, data_time, t_start, updates_at_start)
                t_log, updates_log, data_time = time.perf_counter(), 0, 0.
            if sync.stop:
                return 'interrupted'
            if cfg.checkpoint.recovery_interval and p.num_updates % cfg.checkpoint.recovery_interval == 0 \
                    and p.epoch_updates < self.updates_per_epoch:
                self._save_recovery()
        return None

    def _log_interval(self, loss: float, lr: float, step_s: float, data_time: float, t_start: float,
                      updates_at_start: int) -> None:
        cfg, p = self.cfg, self.progress
        done = p.num_updates - updates_at_start
        elapsed = time.perf_counter() - t_start
        remaining = cfg.epochs * self.updates_per_epoch - p.num_updates
        eta = elapsed / done * remaining if done else float('nan')
        images = cfg.batch_size * self.dist.world_size * cfg.optim.update_freq
        avg = p.loss_sum / max(1, p.loss_count)
        self._log_step(f'epoch {p.epoch + 1}/{cfg.epochs} [{p.epoch_updates}/{self.updates_per_epoch}] '
                       f'loss {loss:.4f} (avg {avg:.4f}) lr {lr:.3e} {images / max(step_s, 1e-9):.1f} img/s '
                       f'data {data_time:.3f}s eta {format_duration(eta)}')
        self.recorder.event('log', epoch=p.epoch + 1, step=p.epoch_updates, global_step=p.num_updates, loss=loss,
                            avg_loss=avg, lr=lr, images_per_s=images / max(step_s, 1e-9), data_time_s=data_time)
        self.recorder.scalars(p.num_updates, train_loss=loss, lr=lr)

    def _evaluate_epoch(self) -> dict[str, Any]:
        def on_bad(items: list[tuple[str, str]]) -> None:
            for path, reason in items:
                self.logger.warning(f'skipped unreadable validation image {reason}')
                self.recorder.event('bad_image', file=path, reason=reason, split='val')

        # every rank evaluates with rank 0's BatchNorm statistics (also the EMA's)
        broadcast_buffers([self.model] + ([self.ema.module] if self.ema is not None else []))
        out: dict[str, Any] = {}
        res = evaluate(self.model, self.val_loader, self.device, self.amp_dtype, on_bad)
        out.update(val_loss=res['loss'], val_top1=res['top1'], val_top5=res['top5'])
        if self.ema is not None and self.cfg.ema.eval:
            res = evaluate(self.ema.module, self.val_loader, self.device, self.amp_dtype)
            out.update(ema_val_loss=res['loss'], ema_val_top1=res['top1'], ema_val_top5=res['top5'])
        return out

    def _end_epoch(self) -> None:
        cfg, p = self.cfg, self.progress
        epochs_done = p.epoch + 1
        last = epochs_done == cfg.epochs
        row: dict[str, Any] = {
            'epoch': epochs_done, 'train_loss': p.loss_sum / max(1, p.loss_count),
            'lr': self.optimizer.param_groups[-1]['lr'], 'epoch_time_s': round(p.epoch_time, 3),
            'train_images_per_s': round(self.updates_per_epoch * cfg.optim.update_freq * cfg.batch_size
                                        * self.dist.world_size / max(p.epoch_time, 1e-9), 1),
            'bad_images': p.bad_images,
        }
        if epochs_done % cfg.eval_interval == 0 or last:
            row.update(self._evaluate_epoch())
        self.history.append(row)
        improved = [k for k, metric in (('best', 'val_top1'), ('best_ema', 'ema_val_top1'))
                    if row.get(metric) is not None and row[metric] > self.best.get(k, {}).get('top1', -1.)]
        for k in improved:
            self.best[k] = {'top1': row['ema_val_top1' if k == 'best_ema' else 'val_top1'], 'epoch': epochs_done}
        p.epoch, p.epoch_updates = epochs_done, 0
        p.loss_sum, p.loss_count, p.bad_images, p.epoch_time = 0., 0, 0, 0.
        self._log_epoch(row)
        save = epochs_done % cfg.checkpoint.save_interval == 0 or last
        path = self._save(CheckpointManager.epoch_name(epochs_done)) if save else None
        for k in improved:
            if not save:
                self._save(k)  # collective: every rank contributes its RNG state
            elif self.ckpt is not None and path is not None:
                self.ckpt.link(path, k)
        self.recorder.write_summary(self.history, final=last)

    def _log_epoch(self, row: dict[str, Any]) -> None:
        parts = [f'epoch {row["epoch"]}/{self.cfg.epochs}: train loss {row["train_loss"]:.4f}']
        if 'val_loss' in row:
            parts.append(f'val loss {row["val_loss"]:.4f} top-1 {row["val_top1"]:.2f}% top-5 {row["val_top5"]:.2f}%')
        if 'ema_val_loss' in row:
            parts.append(f'EMA val loss {row["ema_val_loss"]:.4f} top-1 {row["ema_val_top1"]:.2f}%')
        parts.append(f'lr {row["lr"]:.3e}, {format_duration(row["epoch_time_s"])}, '
                     f'{row["train_images_per_s"]:.0f} img/s')
        if row['bad_images']:
            parts.append(f'{row["bad_images"]} unreadable image(s) skipped')
        self.logger.info(' | '.join(parts))
        self.recorder.event('epoch', **row)
        self.recorder.scalars(row['epoch'], **{k: v for k, v in row.items() if k.startswith(('val_', 'ema_val_'))})

    def _announce(self) -> None:
        cfg, p = self.cfg, self.progress
        n_params = sum(t.numel() for t in self.model.parameters())
        global_batch = cfg.batch_size * self.dist.world_size * cfg.optim.update_freq
        data = cfg.data.data_dir or 'built-in digits (scikit-learn)'
        self.logger.info(f'l2vit train: {cfg.model.name} ({n_params / 1e6:.2f}M params, {len(self.classes)} classes) '
                         f'on {data}: {len(self.train_set)} train / {len(self.val_set)} val images, '
                         f'{cfg.data.input_size}px')
        self.logger.info(f'{cfg.epochs} epochs x {self.updates_per_epoch} steps, global batch {global_batch} '
                         f'({self.dist.world_size} process(es) x {cfg.batch_size} x update_freq '
                         f'{cfg.optim.update_freq}), device {self.device}, amp {cfg.amp}; run dir {self.run_dir}')
        if self.finetune_note:
            self.logger.info(self.finetune_note)
        if self.malloc_note:
            self.logger.info(self.malloc_note)
        if self.resume_ckpt is not None:
            self.logger.info(f'resumed from {self.resume_ckpt.path}: epoch {p.epoch + 1}, step {p.epoch_updates}, '
                             f'global step {p.num_updates}')
            self.recorder.event('resume', path=str(self.resume_ckpt.path), epoch=p.epoch + 1,
                                epoch_updates=p.epoch_updates, num_updates=p.num_updates)
        else:
            self.recorder.event('start', config=config_to_dict(cfg), world_size=self.dist.world_size,
                                classes=len(self.classes))

    def fit(self) -> TrainResult:
        """Build (unless done), train to ``cfg.epochs`` and return how it ended."""
        try:
            if not hasattr(self, 'recorder'):
                self.build()
            return self._fit()
        finally:
            if hasattr(self, 'recorder'):
                self.recorder.close()
            for name in ('logger', 'file_logger'):
                for h in [h for h in getattr(getattr(self, name, None), 'handlers', []) if hasattr(h, 'baseFilename')]:
                    h.close()
                    getattr(self, name).removeHandler(h)
            if hasattr(self, '_threads'):
                torch.set_num_threads(self._threads)  # cfg.threads applies to the run only
            cleanup_distributed()

    def _fit(self) -> TrainResult:
        cfg, p = self.cfg, self.progress
        self._announce()
        bar = None
        if self.progress_mode == 'bar' and self.dist.is_main:
            from tqdm import tqdm
            # shutil's width falls back to $COLUMNS / 80 where a terminal reports 0 columns (tqdm would draw nothing)
            bar = tqdm(total=cfg.epochs * self.updates_per_epoch, initial=p.num_updates, unit='step',
                       ncols=shutil.get_terminal_size().columns, desc='train')
        t_start, updates_at_start = time.perf_counter(), p.num_updates
        status, message, checkpoint = 'completed', '', None
        with StopRequest() as stop:
            try:
                while p.epoch < cfg.epochs:
                    if self._run_epoch(bar, stop, t_start, updates_at_start) == 'interrupted':
                        status = 'interrupted'
                        checkpoint = self._save_recovery()
                        name = signal.Signals(stop.signum).name if stop.signum else 'a signal'
                        message = (f'stopped by {name} at epoch {p.epoch + 1}, step {p.epoch_updates}; checkpoint '
                                   f'saved; continue with the same command and --resume auto')
                        break
                    self._end_epoch()
            except NonFiniteLossError as e:
                status, message = 'nonfinite', str(e)
            finally:
                if bar is not None:
                    bar.close()
        final = self.history[-1] if self.history else {}
        self.recorder.event('end', status=status, message=message, final=final, best=self.best)
        if status == 'nonfinite':
            self.logger.error(f'l2vit train: {message}')
        elif status == 'interrupted':
            self.logger.warning(f'l2vit train: {message}')
        else:
            self._report(final)
        return TrainResult(status, self.run_dir, p.epoch, final, checkpoint, message, stop.signum)

    def _report(self, final: dict[str, Any]) -> None:
        if 'val_top1' in final:
            ema = f' (EMA {final["ema_val_top1"]:.2f}%)' if final.get('ema_val_top1') is not None else ''
            self.logger.info(f'final validation top-1: {final["val_top1"]:.2f}%{ema} after {final["epoch"]} epochs')
        r = self.run_dir
        ckpts = sorted(str(d) for d in (r / 'checkpoints').iterdir() if not d.name.startswith('.')) \
            if (r / 'checkpoints').is_dir() else []
        self.logger.info(f'run dir {r}: summary {r / "summary.csv"}, events {r / "events.jsonl"}, '
                         f'learning curve {r / "learning_curve.png"}, config {r / "config.yaml"}, log {r / "train.log"}')
        self.logger.info('checkpoints: ' + ', '.join(ckpts))

