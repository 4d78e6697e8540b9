"""The shipped ImageNet recipes build a complete training run (data, transforms, their real model, optimizer,
schedule, fine-tuning source) on a small ImageFolder made here; the slow variant trains two epochs with each."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from l2vit.engine import Trainer, load_config

from .synthetic import make_image_folder

CONFIGS = Path(__file__).resolve().parents[2] / 'configs' / 'train'
RECIPES = ('l2vit_tiny_in1k', 'l2vit_small_in1k', 'l2vit_base_in1k', 'l2vit_base_in22k', 'l2vit_base_in22k_ft_in1k',
           'l2vit_base_384_in22k_ft_in1k')


def _trainer(name: str, tmp_path: Path, **extra) -> tuple[Trainer, torch.nn.Module | None]:
    """The recipe on a 3-class folder at 64 px, batch 2 (``extra``: more overrides, e.g. ``model.name``)."""
    data = make_image_folder(tmp_path / 'data', num_classes=3, train_per_class=4, val_per_class=2, size=72)
    overrides = {'data.data_dir': str(data), 'output': str(tmp_path / 'run'), 'batch_size': 2,
                 'data.num_workers': 0, 'data.input_size': 64, 'device': 'cpu', 'threads': 1, **extra}
    donor = None
    if load_config(CONFIGS / f'{name}.yaml', overrides).finetune.checkpoint:
        # a stand-in for the 22K pre-training: 6 "22K" classes, of which the class map picks 3
        donor = timm.create_model(load_config(CONFIGS / f'{name}.yaml', extra).model.name, num_classes=6)
        save_file(donor.state_dict(), tmp_path / 'in22k.safetensors')
        (tmp_path / 'map22kto1k.txt').write_text('4\n1\n5\n')
        overrides.update({'finetune.checkpoint': str(tmp_path / 'in22k.safetensors'),
                          'finetune.head_class_map': str(tmp_path / 'map22kto1k.txt')})
    return Trainer(load_config(CONFIGS / f'{name}.yaml', overrides)), donor


def _check_built(name: str, tmp_path: Path, **extra) -> None:
    trainer, donor = _trainer(name, tmp_path, **extra)
    trainer.build()
    cfg = trainer.cfg
    assert trainer.model.num_classes == 3 and type(trainer.model).__name__ == 'L2ViT'
    assert trainer.model.pretrained_cfg['architecture'] == cfg.model.name
    assert trainer.model.stages[0].blocks[0].attn.window_size == (12 if cfg.model.name.endswith('384') else 7)
    tf = [type(t).__name__ for t in trainer.train_set.transform.transforms]
    assert 'RandAugment' in tf and tf[-1] == 'RandomErasing'
    assert trainer.updater.mixup is not None
    assert type(trainer.updater.criterion).__name__ == 'SoftTargetCrossEntropy'
    assert (trainer.ema is not None) == cfg.ema.enabled and trainer.scaler is None
    assert trainer.updates_per_epoch == 6 // cfg.optim.update_freq  # 12 images, batch 2
    assert trainer.optimizer.param_groups[0]['lr'] == pytest.approx(cfg.sched.warmup_lr)  # warm-up starts
    if donor is not None:
        assert 'classifier sliced' in trainer.finetune_note
        torch.testing.assert_close(trainer.model.head.fc.weight, donor.head.fc.weight[[4, 1, 5]])
        torch.testing.assert_close(trainer.model.stem.conv1.weight, donor.stem.conv1.weight)
    trainer.recorder.close()


@pytest.mark.parametrize('name', RECIPES)
def test_recipe_builds_on_a_small_image_folder(name, tmp_path):
    _check_built(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('name', RECIPES)
def test_recipe_trains(name, tmp_path):
    trainer, _ = _trainer(name, tmp_path, epochs=2, eval_interval=1,
                          **{'sched.warmup_epochs': 1, 'optim.update_freq': 1})
    result = trainer.fit()
    assert result.status == 'completed' and len(trainer.history) == 2
    assert all(torch.isfinite(torch.tensor(r['train_loss'])) for r in trainer.history)
