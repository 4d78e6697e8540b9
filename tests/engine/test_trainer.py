"""The training run end to end (in process): records, checkpoints, bad images, non-finite loss, setup errors,
fine-tuning and resume choices."""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil

import pytest
import timm
import torch
import yaml
from PIL import Image

from l2vit.data import DataError
from l2vit.engine import RunDirError, Trainer, config_from_dict, config_to_dict, read_checkpoint
from l2vit.engine.weights import load_finetune_weights
from l2vit.models import CheckpointError

from .synthetic import make_image_folder, read_events, tiny_recipe, to_official_name


def _cfg(tmp_path, data, **overrides):
    return config_from_dict(tiny_recipe(output=str(tmp_path / 'run'), **{'data.data_dir': str(data)}, **overrides))


def test_run_writes_summary_events_plot_config_and_checkpoints(tiny_run):
    run_dir, _ = tiny_run
    rows = list(csv.DictReader((run_dir / 'summary.csv').open()))
    assert [r['epoch'] for r in rows] == ['1', '2']
    for key in ('train_loss', 'val_loss', 'val_top1', 'lr', 'ema_val_top1'):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    assert all(0 <= float(r['val_top1']) <= 100 for r in rows)  # percent
    # every val_top1 is a whole number of the 12 readable validation images (the corrupt one is not counted)
    assert all(abs(float(r['val_top1']) * 12 / 100 - round(float(r['val_top1']) * 12 / 100)) < 1e-6 for r in rows)

    events = read_events(run_dir)
    kinds = {e['event'] for e in events}
    assert {'start', 'step', 'log', 'epoch', 'checkpoint', 'end', 'bad_image'} <= kinds
    bad = read_events(run_dir, 'bad_image')
    assert any(e['file'].endswith('train/class_1/corrupt.png') for e in bad)
    assert any(e['file'].endswith('val/class_2/corrupt.png') and e['split'] == 'val' for e in bad)
    assert sum(int(r['bad_images']) for r in rows) == sum(1 for e in bad if 'split' not in e) > 0
    assert read_events(run_dir, 'end')[0]['status'] == 'completed'
    assert [e['global_step'] for e in read_events(run_dir, 'step')] == list(range(1, 13))

    with Image.open(run_dir / 'learning_curve.png') as img:
        assert img.size[0] > 200
    resolved = yaml.safe_load((run_dir / 'config.yaml').read_text())
    assert resolved['model']['name'] == 'test_l2vit' and resolved['epochs'] == 2
    assert config_from_dict(resolved) == config_from_dict(resolved)  # the resolved config is a valid recipe
    log = (run_dir / 'train.log').read_text()
    assert 'epoch 2/2' in log
    assert 'keep_freed_memory: ' in log  # a CPU run reports what it did to glibc's allocator (on, or why not)

    names = sorted(p.name for p in (run_dir / 'checkpoints').iterdir())
    assert names[:2] == ['best', 'best_ema'] and 'epoch-0002' in names and 'recovery' in names
    assert not list((run_dir / 'checkpoints' / 'recovery').iterdir())  # superseded by the epoch checkpoints
    last = run_dir / 'checkpoints' / 'epoch-0002'
    assert {p.name for p in last.iterdir()} == {'model.safetensors', 'model_ema.safetensors', 'config.json',
                                                'state.pt'}


def test_training_state_is_plain_and_weights_load_in_timm(tiny_run):
    run_dir, _ = tiny_run
    last = run_dir / 'checkpoints' / 'epoch-0002'
    state = torch.load(last / 'state.pt', weights_only=True)  # no pickled objects
    assert state['epoch'] == 2 and state['epoch_updates'] == 0 and state['num_updates'] == 12
    assert set(state['optimizer']) == {'state', 'param_groups'} and state['scheduler']
    assert isinstance(state['config'], dict) and state['config']['model']['name'] == 'test_l2vit'
    assert len(state['rng']) == 1 and {'python', 'numpy', 'torch'} <= set(state['rng'][0])
    assert state['class_names'] == ['class_0', 'class_1', 'class_2'] and len(state['history']) == 2
    assert state['best']['best']['epoch'] in (1, 2)

    # a checkpoint directory is a timm local-dir: architecture, classes and preprocessing included
    model = timm.create_model(f'local-dir:{last}', pretrained=True).eval()
    assert model.num_classes == 3 and model.pretrained_cfg['input_size'] == (3, 32, 32)
    ckpt = read_checkpoint(last)
    reference = timm.create_model('test_l2vit', num_classes=3).eval()
    reference.load_state_dict(ckpt.model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert json.loads((last / 'config.json').read_text())['label_names'] == ['class_0', 'class_1', 'class_2']


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    data = make_image_folder(tmp_path / 'data')
    trainer = Trainer(_cfg(tmp_path, data, **{'checkpoint.recovery_interval': 2}))
    trainer.build()
    criterion, calls = trainer.updater.criterion, []

    def poisoned(logits, target):
        calls.append(1)
        loss = criterion(logits, target)
        return loss * float('nan') if len(calls) == 5 else loss

    trainer.updater.criterion = poisoned
    result = trainer.fit()
    assert result.status == 'nonfinite' and result.exit_code == 3
    assert 'non-finite training loss (nan) at epoch 1, step 5/6 (global step 5)' in result.message
    checkpoints = read_events(trainer.run_dir, 'checkpoint')
    assert [c['num_updates'] for c in checkpoints] == [2, 4]
    ckpt = read_checkpoint(checkpoints[-1]['path'])
    assert all(torch.isfinite(v).all() for v in ckpt.model.values() if v.is_floating_point())
    assert read_events(trainer.run_dir, 'end')[0]['status'] == 'nonfinite'


@pytest.mark.parametrize('case', ['missing_dir', 'no_val', 'empty_class', 'class_mismatch', 'no_classes'])
def test_bad_data_folders_fail_before_training(tmp_path, case):
    data = make_image_folder(tmp_path / 'data', train_per_class=2, val_per_class=1)
    if case == 'missing_dir':
        data = tmp_path / 'nowhere'
    elif case == 'no_val':
        shutil.rmtree(data / 'val')
    elif case == 'empty_class':
        (data / 'train' / 'class_9').mkdir()
    elif case == 'class_mismatch':
        shutil.move(data / 'val' / 'class_2', data / 'val' / 'class_7')
    elif case == 'no_classes':
        for d in (data / 'train').iterdir():
            shutil.rmtree(d)
    expected = {'missing_dir': 'data dir not found', 'no_val': 'must contain train/ and val/',
                'empty_class': 'Found no valid file for the classes class_9', 'no_classes': 'has no class sub-folders',
                'class_mismatch': "missing ['class_2'], unexpected ['class_7']"}[case]
    with pytest.raises(DataError, match=expected.replace('[', r'\[').replace(']', r'\]')):
        Trainer(_cfg(tmp_path, data)).build()
    assert not (tmp_path / 'run').exists()  # nothing was created or touched


def test_unknown_model_and_class_count_errors(tmp_path, tiny_run):
    run_dir, _ = tiny_run
    data = make_image_folder(tmp_path / 'data', num_classes=2, train_per_class=2, val_per_class=1)
    with pytest.raises(ValueError, match="unknown model 'l2vit_huge'.*l2vit_tiny"):
        Trainer(_cfg(tmp_path, data, **{'model.name': 'l2vit_huge'})).build()
    with pytest.raises(ValueError, match='model.num_classes is 5 but the training data has 2 classes'):
        Trainer(_cfg(tmp_path, data, **{'model.num_classes': 5})).build()
    with pytest.raises(CheckpointError, match='has a 3-class classifier but the training data has 2 classes'):
        Trainer(_cfg(tmp_path, data), resume=str(run_dir)).build()


def test_existing_run_needs_resume_or_overwrite(tmp_path, tiny_run):
    run_dir, data = tiny_run
    copy = tmp_path / 'run'
    shutil.copytree(run_dir, copy)
    with pytest.raises(RunDirError, match='--resume auto'):
        Trainer(_cfg(tmp_path, data)).build()
    # --resume auto on a finished run: nothing left to train, the records stay
    result = Trainer(_cfg(tmp_path, data), resume='auto').fit()
    assert result.status == 'completed' and result.epochs_done == 2
    assert len(read_events(copy, 'step')) == 12
    with pytest.raises(DataError):  # a typo in the data path does not cost the earlier run
        Trainer(_cfg(tmp_path, tmp_path / 'typo'), overwrite=True).build()
    assert (copy / 'checkpoints' / 'epoch-0002').is_dir()
    trainer = Trainer(_cfg(tmp_path, data, epochs=1, **{'sched.warmup_epochs': 0}), overwrite=True)
    trainer.build()
    assert not (copy / 'checkpoints' / 'epoch-0002').exists() and not read_events(copy, 'step')
    trainer.fit()


def test_auto_resume_skips_a_damaged_newest_checkpoint(tmp_path, tiny_run):
    run_dir, data = tiny_run
    copy = tmp_path / 'run'
    shutil.copytree(run_dir, copy)
    (copy / 'checkpoints' / 'epoch-0002' / 'state.pt').write_bytes(b'truncated')
    (copy / 'checkpoints' / '.tmp-epoch-0003-999').mkdir()  # what a kill during a save leaves behind
    trainer = Trainer(_cfg(tmp_path, data), resume='auto')
    trainer.build()
    assert trainer.resume_ckpt.path.name == 'epoch-0001' and trainer.progress.epoch == 1


def test_finetune_from_our_run_reinitialises_a_head_of_another_size(tmp_path, tiny_run):
    run_dir, _ = tiny_run
    data = make_image_folder(tmp_path / 'data', num_classes=2, train_per_class=4, val_per_class=2)
    with pytest.warns(UserWarning, match='classifier .* re-initialised'):
        trainer = Trainer(_cfg(tmp_path, data, **{'finetune.checkpoint': str(run_dir), 'epochs': 1,
                                                  'sched.warmup_epochs': 0}))
        trainer.build()
    source = read_checkpoint(run_dir / 'checkpoints' / 'best')
    for k, v in trainer.model.state_dict().items():
        if not k.startswith('head.fc'):
            torch.testing.assert_close(v, source.model[k], rtol=0, atol=0, msg=k)  # raw weights (official default)
    assert trainer.model.head.fc.weight.shape == (2, 128)
    assert trainer.finetune_note.startswith('fine-tuning from') and 'raw weights' in trainer.finetune_note


def test_finetune_from_an_official_style_pth_with_class_map_slicing(tmp_path):
    donor = timm.create_model('test_l2vit', num_classes=6)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in donor.state_dict().items()}
    official = {to_official_name(k): v for k, v in donor.state_dict().items()}
    assert 'downsample_layers.0.proj.proj.0.weight' in official and 'stages.1.0.attn.qkv.weight' in official
    path = tmp_path / 'official.pth'
    torch.save({'model': official, 'model_ema': ema, 'epoch': 9, 'args': argparse.Namespace(model='L2ViT_Tiny')},
               path)
    class_map = tmp_path / 'map.txt'
    class_map.write_text('# three of the six classes, reordered\n5\n0\n\n3\n')
    model = timm.create_model('test_l2vit', num_classes=3)
    note = load_finetune_weights(model, str(path), use_ema=False, head_class_map=str(class_map))
    assert 'classifier sliced' in note
    torch.testing.assert_close(model.head.fc.weight, donor.head.fc.weight[[5, 0, 3]])
    torch.testing.assert_close(model.head.fc.bias, donor.head.fc.bias[[5, 0, 3]])
    torch.testing.assert_close(model.stem.conv1.weight, donor.stem.conv1.weight)  # 'model', not 'model_ema'
    load_finetune_weights(model, str(path), use_ema=True, head_class_map=str(class_map))
    torch.testing.assert_close(model.stem.conv1.weight, ema['stem.conv1.weight'])
    class_map.write_text('1\n2\n')
    with pytest.raises(CheckpointError, match='lists 2 classes but the model has 3'):
        load_finetune_weights(model, str(path), head_class_map=str(class_map))
    class_map.write_text('1\n2\n60\n')
    with pytest.raises(CheckpointError, match=r'\[60\] are outside the checkpoint classifier \(6 classes\)'):
        load_finetune_weights(model, str(path), head_class_map=str(class_map))
    with pytest.raises(ValueError, match='missing key'), pytest.warns(UserWarning, match='re-initialised'):
        load_finetune_weights(timm.create_model('test_l2vit', depths=(2, 2, 4, 2), num_classes=3), str(path))


def test_resolved_config_round_trips(tmp_path):
    cfg = _cfg(tmp_path, tmp_path)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_accumulation_clipping_and_bf16_autocast(tmp_path, monkeypatch):
    import l2vit.engine.train as train_mod
    data = make_image_folder(tmp_path / 'data')
    cfg = _cfg(tmp_path, data, epochs=1, amp='bf16', **{'sched.warmup_epochs': 0, 'optim.update_freq': 2,
                                                         'optim.clip_grad': 0.5, 'log.tensorboard': True})
    clips, dtypes = [], []
    real_clip = train_mod.dispatch_clip_grad
    monkeypatch.setattr(train_mod, 'dispatch_clip_grad', lambda *a, **k: (clips.append(k), real_clip(*a, **k)))
    trainer = Trainer(cfg)
    trainer.build()
    criterion = trainer.updater.criterion
    trainer.updater.criterion = lambda logits, y: (dtypes.append(logits.dtype), criterion(logits, y))[1]
    assert trainer.fit().status == 'completed'
    assert trainer.updates_per_epoch == 3 and len(dtypes) == 6  # 6 micro-batches of 4, 3 optimizer steps
    assert set(dtypes) == {torch.bfloat16} and len(clips) == 3
    steps = read_events(trainer.run_dir, 'step')
    assert [s['global_step'] for s in steps] == [1, 2, 3] and all(math.isfinite(s['loss']) for s in steps)
    assert list((trainer.run_dir / 'tensorboard').glob('events.out.tfevents.*'))


def test_loader_workers_do_not_change_the_run(tmp_path):
    data = make_image_folder(tmp_path / 'data')
    losses = []
    for workers in (0, 2):
        cfg = _cfg(tmp_path / str(workers), data, epochs=1, **{'sched.warmup_epochs': 0,
                                                                'data.num_workers': workers})
        Trainer(cfg).fit()
        losses.append([e['loss'] for e in read_events(tmp_path / str(workers) / 'run', 'step')])
    # per-image seeds: augmentation does not depend on which process loads the image
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def test_sigint_finishes_the_step_saves_and_stops(tmp_path):
    import os
    import signal
    data = make_image_folder(tmp_path / 'data')
    trainer = Trainer(_cfg(tmp_path, data))
    trainer.build()
    criterion, calls = trainer.updater.criterion, []

    def interrupting(logits, target):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 3
        return criterion(logits, target)

    trainer.updater.criterion = interrupting
    previous = signal.getsignal(signal.SIGINT)
    result = trainer.fit()
    assert signal.getsignal(signal.SIGINT) is previous  # handlers are put back
    assert result.status == 'interrupted' and result.exit_code == 130 and 'stopped by SIGINT' in result.message
    assert result.checkpoint.name == 'e0000-u000003' and read_checkpoint(result.checkpoint).progress == (0, 3)
    assert [e['global_step'] for e in read_events(trainer.run_dir, 'step')] == [1, 2, 3]
