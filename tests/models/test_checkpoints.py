"""Official checkpoints: the filter, loading a release-format file through timm, conversion, safe loading."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import timm
import torch

from l2vit import CheckpointError, checkpoint_filter_fn, load_checkpoint_file
from l2vit.cli import main as cli_main
from tests.helpers import OFFICIAL_VARIANTS, official_random_state_dict

OFFICIAL_NAMES = {'l2vit_tiny': 'L2ViT_Tiny', 'l2vit_small': 'L2ViT_Small', 'l2vit_base': 'L2ViT_Base',
                  'l2vit_base_384': 'L2ViT_Base_384'}


def write_official_checkpoint(path, variant: str, model_name: str):
    """A file in the format of the official releases (ConvNeXt-style ``save_model``), with random weights."""
    raw = official_random_state_dict(variant, seed=1)
    ema = official_random_state_dict(variant, seed=2)
    checkpoint = {
        'model': raw,
        'optimizer': {'state': {}, 'param_groups': [{'lr': 4e-3, 'weight_decay': 0.05, 'params': [0, 1]}]},
        'epoch': 299,
        'scaler': {'scale': 65536.0, 'growth_factor': 2.0},
        'args': argparse.Namespace(model=model_name, batch_size=128, lr=4e-3, drop_path=0.1, model_ema=True,
                                   data_path='/datasets/imagenet', update_freq=4, input_size=224),
        'model_ema': ema,
    }
    torch.save(checkpoint, path)
    return raw, ema


@pytest.fixture(scope='module')
def tiny_release(tmp_path_factory):
    path = tmp_path_factory.mktemp('release') / 'L2ViT-Tiny-checkpoint-best-ema.pth'
    raw, ema = write_official_checkpoint(path, 'tiny', 'L2ViT_Tiny')
    return path, raw, ema


def _assert_loaded(model, official_sd, skip=()):
    expected = checkpoint_filter_fn(official_sd, timm.create_model('l2vit_tiny', device='meta'))
    for k, v in model.state_dict().items():
        if k not in skip:
            assert torch.equal(v, expected[k]), k


def test_filter_maps_official_names():
    model = timm.create_model('l2vit_tiny', device='meta')
    sd = official_random_state_dict('tiny')
    out = checkpoint_filter_fn(sd, model)
    expected = {
        'downsample_layers.0.proj.proj.0.weight': 'stem.conv1.weight',
        'downsample_layers.0.proj.proj.1.running_var': 'stem.bn1.running_var',
        'downsample_layers.0.proj.proj.3.bias': 'stem.conv2.bias',
        'downsample_layers.0.proj.proj.4.num_batches_tracked': 'stem.bn2.num_batches_tracked',
        'downsample_layers.0.norm.weight': 'stem.norm.weight',
        'downsample_layers.2.proj.weight': 'stages.2.downsample.proj.weight',
        'downsample_layers.3.norm.bias': 'stages.3.downsample.norm.bias',
        'stages.0.0.cpe.1.proj.weight': 'stages.0.blocks.0.cpe.1.proj.weight',
        'stages.2.5.attn.temperature': 'stages.2.blocks.5.attn.temperature',
        'stages.2.3.local_mp.bn.running_mean': 'stages.2.blocks.3.local_mp.bn.running_mean',
        'stages.3.1.norm3.weight': 'stages.3.blocks.1.norm3.weight',
        'norm.weight': 'norm.weight',
        'head.weight': 'head.fc.weight',
        'head.bias': 'head.fc.bias',
    }
    for official, native in expected.items():
        assert out[native] is sd[official], official
    assert len(out) == len(sd)


def test_filter_takes_ema_strips_prefixes_and_passes_native_through():
    model = timm.create_model('l2vit_tiny', device='meta')
    raw, ema = official_random_state_dict('tiny', 1), official_random_state_dict('tiny', 2)
    out = checkpoint_filter_fn({'model': raw, 'model_ema': ema, 'epoch': 3}, model)
    assert out['head.fc.weight'] is ema['head.weight']
    assert checkpoint_filter_fn({'model': raw}, model)['head.fc.weight'] is raw['head.weight']
    ddp = {'module.' + k: v for k, v in raw.items()}
    assert checkpoint_filter_fn(ddp, model).keys() == out.keys()
    native = timm.create_model('test_l2vit').state_dict()
    compiled = {'_orig_mod.' + k: v for k, v in native.items()}
    assert checkpoint_filter_fn(compiled, timm.create_model('test_l2vit')).keys() == native.keys()


def test_base_weights_fit_base_384():
    base = official_random_state_dict('base')
    out = checkpoint_filter_fn(base, timm.create_model('l2vit_base_384', device='meta'))
    assert out.keys() == timm.create_model('l2vit_base_384', device='meta').state_dict().keys()


def test_timm_loads_official_release_file_strictly(tiny_release):
    path, raw, ema = tiny_release
    model = timm.create_model('l2vit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    _assert_loaded(model, ema)  # the EMA weights, every key
    assert not torch.equal(model.stem.conv1.weight, checkpoint_filter_fn(raw, model)['stem.conv1.weight'])


def test_release_file_with_other_heads_and_channels(tiny_release):
    path, _, ema = tiny_release
    overlay = dict(file=str(path))
    with pytest.warns(UserWarning, match='1000 classes but the model has 10.*re-initialised'):
        model = timm.create_model('l2vit_tiny', pretrained=True, pretrained_cfg_overlay=overlay, num_classes=10)
    _assert_loaded(model, ema, skip={'head.fc.weight', 'head.fc.bias'})
    assert model.head.fc.weight.shape == (10, 768) and not model.head.fc.bias.any()

    headless = timm.create_model('l2vit_tiny', pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0)
    _assert_loaded(headless, ema)

    features = timm.create_model('l2vit_tiny', pretrained=True, pretrained_cfg_overlay=overlay, features_only=True)
    expected = checkpoint_filter_fn(ema, timm.create_model('l2vit_tiny', device='meta'))
    assert torch.equal(features.model.stages[3].blocks[1].attn.qkv.weight, expected['stages.3.blocks.1.attn.qkv.weight'])

    gray = timm.create_model('l2vit_tiny', pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1)
    torch.testing.assert_close(gray.stem.conv1.weight, expected['stem.conv1.weight'].sum(dim=1, keepdim=True))


def test_wrong_variant_or_architecture_names_the_problem(tiny_release, tmp_path):
    path, _, ema = tiny_release
    with pytest.raises(ValueError, match=r'missing key\(s\): stages\.2\.blocks\.10\.'):
        timm.create_model('l2vit_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(ValueError, match=r'shape mismatch.*stem\.conv1\.weight: checkpoint \(48, 3, 3, 3\) vs '
                                         r'model \(64, 3, 3, 3\)'):
        checkpoint_filter_fn(ema, timm.create_model('l2vit_base', device='meta'))
    resnet = timm.create_model('resnet18').state_dict()
    with pytest.raises(ValueError, match='another architecture.*'):
        checkpoint_filter_fn({'model': resnet}, timm.create_model('l2vit_tiny', device='meta'))
    broken = dict(ema)
    broken['stages.2.1.attn.temperature'] = torch.ones(12)
    with pytest.raises(ValueError, match=r'stages\.2\.blocks\.1\.attn\.temperature: checkpoint \(12,\) vs model '
                                         r'\(12, 1, 1\)'):
        checkpoint_filter_fn(broken, timm.create_model('l2vit_tiny', device='meta'))


def test_truncated_file_is_refused(tiny_release, tmp_path):
    path, _, _ = tiny_release
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError, match='truncated'):
        load_checkpoint_file(cut)
    with pytest.raises(CheckpointError, match='truncated'):
        timm.create_model('l2vit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(cut)))
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty'):
        load_checkpoint_file(empty)
    with pytest.raises(CheckpointError, match='not found'):
        load_checkpoint_file(tmp_path / 'nope.pth')
    bad_st = tmp_path / 'bad.safetensors'
    bad_st.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    with pytest.raises(CheckpointError, match='safetensors'):
        load_checkpoint_file(bad_st)


class _RunsCode:
    """Unpickling this calls os.system: exactly what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class _CustomObject:
    pass


def test_checkpoints_asking_for_code_are_refused(tmp_path):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'payload': _RunsCode(marker)}, evil)
    for load in (lambda: load_checkpoint_file(evil),
                 lambda: timm.create_model('l2vit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))):
        with pytest.raises(CheckpointError, match=r'refusing to load .*asks the unpickler for posix\.system'):
            load()
    assert not marker.exists()
    odd = tmp_path / 'odd.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'obj': _CustomObject()}, odd)
    with pytest.raises(CheckpointError, match='_CustomObject'):
        load_checkpoint_file(odd)
    plain = tmp_path / 'plain.pth'
    torch.save([torch.zeros(1)], plain)
    with pytest.raises(CheckpointError, match='expected a state dict'):
        load_checkpoint_file(plain)


def test_convert_then_load_offline(tiny_release, tmp_path, capsys):
    path, raw, ema = tiny_release
    out = tmp_path / 'converted'
    assert cli_main(['convert', str(path), str(out)]) == 0
    assert 'l2vit_tiny, 1000 classes' in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'l2vit_tiny' and config['num_classes'] == 1000
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    _assert_loaded(model, ema)
    assert model.pretrained_cfg['interpolation'] == 'bicubic'

    assert cli_main(['convert', str(path), str(out), '--no-ema']) == 0
    _assert_loaded(timm.create_model(f'local-dir:{out}', pretrained=True), raw)


def test_convert_infers_variant_without_args(tmp_path):
    sd = official_random_state_dict('tiny')
    src = tmp_path / 'weights.pth'
    torch.save(sd, src)
    assert cli_main(['convert', str(src), str(tmp_path / 'out')]) == 0
    assert json.loads((tmp_path / 'out' / 'config.json').read_text())['architecture'] == 'l2vit_tiny'
    assert cli_main(['convert', str(src), str(tmp_path / 'out2'), '--model', 'l2vit_small']) == 2


@pytest.mark.slow
@pytest.mark.parametrize('name', [n for n in OFFICIAL_VARIANTS if n != 'l2vit_tiny'])
def test_timm_loads_every_official_variant(name, tmp_path):
    path = tmp_path / 'release.pth'
    _, ema = write_official_checkpoint(path, OFFICIAL_VARIANTS[name], OFFICIAL_NAMES[name])
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    expected = checkpoint_filter_fn(ema, timm.create_model(name, device='meta'))
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    out = tmp_path / 'converted'
    assert cli_main(['convert', str(path), str(out)]) == 0
    assert json.loads((out / 'config.json').read_text())['architecture'] == name
