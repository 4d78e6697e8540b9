"""Run records: console and file log, JSONL event log, per-epoch ``summary.csv``, learning-curve PNG, TensorBoard.

Only the main process writes. ``summary.csv`` and the plot are rewritten from the epoch history kept in the
checkpoints, so after a crash and resume they hold each epoch exactly once. ``events.jsonl`` is append-only: it
records what happened, including steps of an interrupted attempt and the ``resume`` event that followed.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_path, atomic_write_text

__all__ = ['setup_logging', 'RunRecorder', 'SUMMARY_FIELDS', 'format_duration']

SUMMARY_FIELDS = (
    'epoch', 'train_loss', 'val_loss', 'val_top1', 'val_top5', 'ema_val_loss', 'ema_val_top1', 'ema_val_top5',
    'lr', 'epoch_time_s', 'train_images_per_s', 'bad_images',
)


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` style duration."""
    if not math.isfinite(seconds):
        return '?'
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class _TqdmHandler(logging.StreamHandler):
    """Console lines through ``tqdm.write``: a progress bar is cleared, the line printed, the bar redrawn."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup_logging(run_dir: Path | None, is_main: bool, name: str = 'l2vit', console: bool = True,
                  progress_bar: bool = False) -> logging.Logger:
    """Logger ``name``: INFO to stdout (when ``console``) and ``run_dir/train.log`` on the main process; other
    ranks print warnings and errors only. ``progress_bar``: console lines make way for a tqdm bar."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if console:
        stream = (_TqdmHandler if progress_bar else logging.StreamHandler)(sys.stdout)
        stream.setFormatter(logging.Formatter('%(message)s'))
        logger.addHandler(stream)
    if run_dir is not None and is_main:
        file = logging.FileHandler(run_dir / 'train.log')
        file.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
        logger.addHandler(file)
    return logger


class RunRecorder:
    """Writes the run's event log, summary and plot (no-ops when ``enabled`` is False, i.e. on other ranks).

    Args:
        run_dir: The run directory.
        enabled: Write anything at all (main process only).
        tensorboard: Also log scalars to ``run_dir/tensorboard``.
        plot: Draw ``learning_curve.png``: on the final :meth:`write_summary` and, before, at most every
            ``plot_interval`` seconds (a plot costs about half a second, more than a demo epoch's evaluation).
        plot_interval: Minimum seconds between two plots before the final one.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False, plot: bool = True,
                 plot_interval: float = 30.):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.plot = plot
        self.plot_interval = plot_interval
        self._last_plot = float('-inf')
        self.events_path = self.run_dir / 'events.jsonl'
        self.summary_path = self.run_dir / 'summary.csv'
        self.plot_path = self.run_dir / 'learning_curve.png'
        self._events = open(self.events_path, 'a') if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.run_dir / 'tensorboard'))

    def event(self, kind: str, **fields: Any) -> None:
        """Append one JSON line ``{"event": kind, "time": ..., **fields}`` (flushed: a killed process loses none)."""
        if self._events is None:
            return
        self._events.write(json.dumps({'event': kind, 'time': round(time.time(), 3), **fields}) + '\n')
        self._events.flush()

    def scalars(self, step: int, **values: float) -> None:
        if self._tb is not None:
            for k, v in values.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)

    def write_summary(self, history: Sequence[dict[str, Any]], final: bool = False) -> None:
        """Rewrite ``summary.csv`` (one row per finished epoch, top-1 in percent) and, when due or ``final``, the
        learning-curve plot."""
        if not self.enabled:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction='ignore', lineterminator='\n')
        writer.writeheader()
        for row in history:
            writer.writerow({k: ('' if row.get(k) is None else row[k]) for k in SUMMARY_FIELDS})
        atomic_write_text(self.summary_path, buf.getvalue())
        if self.plot and history and (final or time.monotonic() - self._last_plot >= self.plot_interval):
            self._plot(history)
            self._last_plot = time.monotonic()

    def _plot(self, history: Sequence[dict[str, Any]]) -> None:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt

        def series(key: str) -> tuple[list, list]:
            pts = [(r['epoch'], r[key]) for r in history if r.get(key) is not None]
            return [p[0] for p in pts], [p[1] for p in pts]

        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        for key, label in (('train_loss', 'train'), ('val_loss', 'val'), ('ema_val_loss', 'val (EMA)')):
            x, y = series(key)
            if x:
                ax_loss.plot(x, y, marker='.', label=label)
        for key, label in (('val_top1', 'val top-1'), ('ema_val_top1', 'val top-1 (EMA)')):
            x, y = series(key)
            if x:
                ax_acc.plot(x, y, marker='.', label=label)
        ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
        ax_acc.set(xlabel='epoch', ylabel='top-1 (%)', title='validation accuracy')
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        with atomic_path(self.plot_path, suffix='.png') as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
