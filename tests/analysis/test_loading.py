"""Models and images for the analysis: every checkpoint kind, same-weight variants, the eval transform."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from l2vit.analysis import (
    build_variant,
    default_variants,
    describe_model,
    find_images,
    images_from_tensor,
    load_images,
    load_model,
)
from l2vit.models import L2ViT


@pytest.fixture(scope='module')
def trained():
    """A test model with non-default weights (as if trained) and 10 classes."""
    torch.manual_seed(1)
    model = timm.create_model('test_l2vit', num_classes=10, use_lcm=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _same(a, b):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_random_model_needs_a_name():
    assert isinstance(load_model(None, 'test_l2vit'), L2ViT)
    with pytest.raises(ValueError, match='give a checkpoint or a model name'):
        load_model()
    with pytest.raises(ValueError, match="unknown model 'nope'; l2vit models: .*test_l2vit"):
        load_model(None, 'nope')


def test_safetensors_state_dict_with_and_without_metadata(trained, tmp_path):
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    plain = tmp_path / 'plain.safetensors'
    save_file(state, plain)
    _same(load_model(plain, 'test_l2vit'), trained)  # num_classes comes from the head
    with pytest.raises(ValueError, match='pass --model'):
        load_model(plain)  # test_l2vit's shapes match no released variant
    described = tmp_path / 'described.safetensors'
    save_file(state, described, metadata={'architecture': 'test_l2vit', 'model_args': json.dumps({'use_lcm': True})})
    _same(load_model(described), trained)
    with pytest.raises(ValueError, match='missing key'):
        load_model(plain, 'test_l2vit', {'use_lcm': True, 'depths': (2, 2, 3, 2)})


def test_pth_and_local_dir(trained, tmp_path):
    torch.save({'model': trained.state_dict(), 'epoch': 3}, tmp_path / 'ckpt.pth')
    _same(load_model(tmp_path / 'ckpt.pth', 'test_l2vit'), trained)
    timm.models.save_for_hf(trained, tmp_path / 'hf', safe_serialization=True)
    _same(load_model(tmp_path / 'hf'), trained)
    _same(load_model(f'local-dir:{tmp_path / "hf"}'), trained)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='has no config.json'):
        load_model(tmp_path / 'empty')


def test_variants_share_weights(trained):
    assert describe_model(trained) == 'L²ViT (linear + LCM)'
    variants = default_variants(trained)
    assert list(variants) == ['softmax (same weights)', 'linear, no LCM (same weights)']
    soft, plain = variants.values()
    assert describe_model(soft) == 'softmax + LCM' and describe_model(plain) == 'linear, no LCM'
    blk = 'stages.1.blocks.1'
    for v in (soft, plain):
        torch.testing.assert_close(v.get_submodule(blk).attn.qkv.weight, trained.get_submodule(blk).attn.qkv.weight)
        torch.testing.assert_close(v.head.fc.weight, trained.head.fc.weight)
    assert soft.get_submodule(blk).attn.mixer_name == 'softmax' and plain.get_submodule(blk).local_mp is None
    # linear from softmax: temperatures are the only weights the softmax model cannot provide
    back = build_variant(soft, global_mixer='linear')
    assert back.get_submodule(blk).attn.temperature.flatten().tolist() == pytest.approx([16 ** -0.5] * 2)
    with pytest.raises(ValueError, match='weights the model cannot provide'):
        build_variant(trained, dims=(16, 32, 64, 256))
    with pytest.raises(ValueError, match='create it with timm.create_model'):
        build_variant(L2ViT(depths=(1, 1), dims=(16, 32)), use_lcm=False)
    assert describe_model(timm.create_model('test_l2vit', block_pattern=('window',))) == 'window only'
    assert default_variants(soft) == {}


def test_images_follow_the_model_transform(tmp_path):
    rng = np.random.default_rng(0)
    for i, size in enumerate([(90, 120), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
    (tmp_path / 'notes.txt').write_text('not an image')
    model = timm.create_model('test_l2vit')
    batch = load_images([tmp_path], model, img_size=80)
    assert batch.names == ['0.png', '1.png'] and batch.size == (80, 80)
    assert batch.display.shape == (2, 80, 80, 3) and 0 <= batch.display.min() and batch.display.max() <= 1
    cfg = resolve_data_config({'input_size': (3, 80, 80)}, model=model)
    with Image.open(tmp_path / '0.png') as img:
        expected = create_transform(**cfg)(img.convert('RGB'))
    torch.testing.assert_close(batch.tensor[0], expected, atol=1e-5, rtol=0)
    back = images_from_tensor(batch.tensor, model)
    torch.testing.assert_close(back.display, batch.display, atol=1e-5, rtol=0)
    assert load_images([tmp_path / '1.png'], model).size == (160, 160)  # the model's pretrained_cfg input size
    with pytest.raises(ValueError, match='cannot read .*notes.txt as an image'):
        load_images([tmp_path / 'notes.txt'], model)
    with pytest.raises(FileNotFoundError, match='image not found'):
        find_images([tmp_path / 'missing.png'])
    with pytest.raises(ValueError, match='no image files'):
        find_images([_empty_dir(tmp_path)])
    with pytest.raises(ValueError, match='expected a normalised floating-point image batch'):
        images_from_tensor(torch.zeros(3, 8, 8), model)


def _empty_dir(root):
    d = root / 'empty'
    d.mkdir()
    return d
