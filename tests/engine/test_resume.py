"""Crash safety: a training process killed with SIGKILL resumes with ``--resume auto`` and then computes exactly the
per-step losses of an uninterrupted run; SIGTERM saves a checkpoint and exits cleanly."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from l2vit.engine import Trainer, config_from_dict

from .synthetic import cli_env, make_image_folder, read_events, run_cli, tiny_recipe, write_recipe

# 24 train images / batch 4 = 6 steps per epoch, 4 epochs; a recovery checkpoint every 4 steps
_RECIPE = {'epochs': 4, 'checkpoint.recovery_interval': 4}


def _train_cmd(recipe: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, '-m', 'l2vit', 'train', '--config', str(recipe), '--data-dir', str(data),
            '--output', str(out), *extra]


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120.) -> int:
    """Poll the event log until global step ``step`` is done; returns the last step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f'training ended (rc {proc.returncode}) before step {step}: '
                                 f'{proc.stdout.read() if proc.stdout else ""}')
        if (run_dir / 'events.jsonl').exists():
            steps = [e['global_step'] for e in read_events(run_dir, 'step')]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.01)
    raise AssertionError(f'step {step} not reached in {timeout} s')


def _losses_after(events: list[dict], kind: str = 'step') -> dict[int, float]:
    return {e['global_step']: e['loss'] for e in events if e['event'] == kind}


def test_sigkill_then_resume_auto_matches_uninterrupted_run(tmp_path):
    data = make_image_folder(tmp_path / 'data')
    recipe = write_recipe(tmp_path / 'recipe.yaml', **_RECIPE)

    # reference: the same recipe, never interrupted (in this process; the same code path as the CLI)
    ref_dir = tmp_path / 'ref'
    cfg = config_from_dict(tiny_recipe(**_RECIPE, output=str(ref_dir), **{'data.data_dir': str(data)}))
    assert Trainer(cfg).fit().status == 'completed'
    reference = _losses_after(read_events(ref_dir))
    assert sorted(reference) == list(range(1, 25))

    run_dir = tmp_path / 'run'
    proc = subprocess.Popen(_train_cmd(recipe, data, run_dir), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        killed_at = _wait_for_step(run_dir, proc, 10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert killed_at < 24, 'the process must die mid-run'
    before_kill = _losses_after(read_events(run_dir))
    assert max(before_kill) < 24

    # the same command with --resume auto
    out = run_cli(_train_cmd(recipe, data, run_dir, '--resume', 'auto'))
    assert out.returncode == 0, out.stdout + out.stderr
    events = read_events(run_dir)
    resume = [i for i, e in enumerate(events) if e['event'] == 'resume']
    assert len(resume) == 1
    resumed_from = events[resume[0]]['num_updates']
    assert 8 <= resumed_from <= killed_at and resumed_from % 4 == 0  # the newest recovery checkpoint
    after = _losses_after(events[resume[0]:])
    assert sorted(after) == list(range(resumed_from + 1, 25))
    # bit-identical: same data order, augmentation, Mixup, drop-path, optimizer and EMA state
    assert {s: after[s] for s in after} == {s: reference[s] for s in after}
    assert {s: before_kill[s] for s in before_kill} == {s: reference[s] for s in before_kill}
    # the epoch summary holds each epoch once
    lines = (run_dir / 'summary.csv').read_text().splitlines()
    assert [line.split(',')[0] for line in lines] == ['epoch', '1', '2', '3', '4']
    assert 'resumed from' in out.stdout and 'final validation top-1' in out.stdout


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    data = make_image_folder(tmp_path / 'data')
    recipe = write_recipe(tmp_path / 'recipe.yaml', epochs=50)
    run_dir = tmp_path / 'run'
    proc = subprocess.Popen(_train_cmd(recipe, data, run_dir), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(run_dir, proc, 3)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert 'stopped by SIGTERM' in output and 'Traceback' not in output
    end = read_events(run_dir, 'end')[-1]
    assert end['status'] == 'interrupted'
    ckpt = Path(read_events(run_dir, 'checkpoint')[-1]['path'])
    assert ckpt.parent.name == 'recovery' and (ckpt / 'state.pt').is_file()
    steps = read_events(run_dir, 'step')
    assert read_events(run_dir, 'checkpoint')[-1]['num_updates'] == steps[-1]['global_step']
