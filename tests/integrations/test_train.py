"""``DetTrainer`` / ``SegTrainer``: end-to-end runs on generated data, run records, exact resume."""
from __future__ import annotations

import json
import warnings

import pytest

from l2vit.engine import RunDirError
from l2vit.integrations import load_dense_config
from l2vit.integrations.det_task import DetTrainer
from l2vit.integrations.runner import load_trained
from l2vit.integrations.seg_task import SegTrainer

from .conftest import det_overrides, seg_overrides


def _losses(run_dir) -> dict[int, float]:
    events = [json.loads(line) for line in (run_dir / 'events.jsonl').read_text().splitlines()]
    return {e['iter']: e['loss'] for e in events if e['event'] == 'log'}


def _summary_column(run_dir, column: str) -> list[float]:
    import csv
    with open(run_dir / 'summary.csv') as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def _fit(trainer_cls, task, overrides, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return trainer_cls(load_dense_config(task, None, overrides), **kw).fit()


def test_detection_run_records_and_exact_resume(coco_root, tmp_path):
    ref = _fit(DetTrainer, 'det', det_overrides(coco_root, tmp_path / 'ref'))
    assert ref.status == 'completed' and ref.iters_done == 6
    run = tmp_path / 'ref'
    assert {'bbox_mAP', 'segm_mAP', 'train_loss_mask'} <= set(ref.final)
    rows = (run / 'summary.csv').read_text().splitlines()
    assert rows[0].startswith('epoch,iter,train_loss') and len(rows) == 4
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['best', 'epoch-0002', 'epoch-0003']
    assert len(list((run / 'predictions' / 'epoch-0003').glob('*.png'))) == 2
    assert json.loads((run / 'metrics' / 'epoch-0003.json').read_text())['bbox_mAP'] == ref.final['bbox_mAP']
    cfg, state, weights, path = load_trained(run, 'det')
    assert state['class_names'] == ['square', 'disc', 'triangle'] and cfg.model.backbone == 'test_l2vit'

    # stop after 3 iterations (mid-epoch: a recovery checkpoint), then resume: the same losses as uninterrupted
    cut = tmp_path / 'cut'
    first = _fit(DetTrainer, 'det', det_overrides(coco_root, cut, max_iters=3, **{'run.recovery_interval': 3}))
    assert first.iters_done == 3
    with pytest.raises(RunDirError, match='--resume auto'):
        DetTrainer(load_dense_config('det', None, det_overrides(coco_root, cut))).fit()
    resumed = _fit(DetTrainer, 'det', det_overrides(coco_root, cut), resume='auto')
    assert resumed.iters_done == 6
    ref_losses, cut_losses = _losses(run), _losses(cut)
    assert sorted(cut_losses) == list(range(1, 7))
    for it in range(1, 7):
        assert cut_losses[it] == pytest.approx(ref_losses[it], rel=1e-6, abs=1e-7), it
    assert resumed.final['bbox_mAP'] == pytest.approx(ref.final['bbox_mAP'])
    # the max_iters stop added an evaluation row at iteration 3; epoch rows match the uninterrupted run
    cut_rows = _summary_column(cut, 'train_loss')
    assert len(cut_rows) == 4 and [cut_rows[0], *cut_rows[2:]] == pytest.approx(
        _summary_column(run, 'train_loss'), rel=1e-6)


def test_retinanet_run(coco_root, tmp_path):
    res = _fit(DetTrainer, 'det', det_overrides(coco_root, tmp_path / 'r', epochs=1, **{
        'model.detector': 'retinanet', 'model.kwargs': {}, 'sched.milestones': [1]}))
    assert res.status == 'completed' and 'bbox_mAP' in res.final and 'segm_mAP' not in res.final


def test_segmentation_run_and_resume(ade_root, tmp_path):
    ref = _fit(SegTrainer, 'seg', seg_overrides(ade_root, tmp_path / 'ref'))
    assert ref.status == 'completed' and ref.iters_done == 6
    assert 0 <= ref.final['mIoU'] <= 1 and {'train_loss_seg', 'train_loss_aux', 'aAcc'} <= set(ref.final)
    per_class = json.loads((tmp_path / 'ref' / 'metrics' / 'epoch-0002.json').read_text())['IoU']
    assert list(per_class) == ['class 0', 'class 1', 'class 2']
    assert len(list((tmp_path / 'ref' / 'predictions' / 'epoch-0002').glob('*.png'))) == 2
    cut = tmp_path / 'cut'
    ov = seg_overrides(ade_root, cut)
    _fit(SegTrainer, 'seg', {**ov, 'max_iters': 3})  # ends at the first evaluation
    resumed = _fit(SegTrainer, 'seg', ov, resume='auto')
    assert resumed.iters_done == 6
    ref_losses, cut_losses = _losses(tmp_path / 'ref'), _losses(cut)
    for it in range(1, 7):
        assert cut_losses[it] == pytest.approx(ref_losses[it], rel=1e-6, abs=1e-7), it


def test_a_non_finite_loss_stops_cleanly(ade_root, tmp_path):
    res = _fit(SegTrainer, 'seg', seg_overrides(ade_root, tmp_path / 'nan', **{'optim.lr': float('inf')}))
    assert res.status == 'nonfinite' and res.exit_code == 3 and 'non-finite' in res.message
    assert res.iters_done < 6  # an infinite lr makes the weights infinite after one update; the next loss stops it


def test_sigterm_saves_a_checkpoint_and_resume_continues_exactly(ade_root, tmp_path, monkeypatch):
    import signal

    ref = _fit(SegTrainer, 'seg', seg_overrides(ade_root, tmp_path / 'ref'))
    original = SegTrainer.losses

    def losses_then_signal(self, model, batch):
        if self.iter == 0:  # seen at the next step: the run stops after iteration 2
            signal.raise_signal(signal.SIGTERM)
        return original(self, model, batch)

    monkeypatch.setattr(SegTrainer, 'losses', losses_then_signal)
    ov = seg_overrides(ade_root, tmp_path / 'cut')
    stopped = _fit(SegTrainer, 'seg', ov)
    assert (stopped.status, stopped.iters_done, stopped.exit_code) == ('interrupted', 2, 128 + signal.SIGTERM)
    assert (tmp_path / 'cut' / 'checkpoints' / 'recovery' / 'e0000-u000002' / 'state.pt').is_file()
    monkeypatch.setattr(SegTrainer, 'losses', original)
    resumed = _fit(SegTrainer, 'seg', ov, resume='auto')
    assert resumed.status == 'completed' and resumed.final['mIoU'] == pytest.approx(ref.final['mIoU'])
    assert _losses(tmp_path / 'cut') == pytest.approx(_losses(tmp_path / 'ref'), rel=1e-6)
    # the interrupted round's mean loss covers its iterations from before and after the resume
    assert _summary_column(tmp_path / 'cut', 'train_loss') == pytest.approx(
        _summary_column(tmp_path / 'ref', 'train_loss'), rel=1e-6)
