"""L2ViTBackbone: one model source, per-level norms, pruning, freezing, window size and strict weight loading."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import LayerNorm2d

from l2vit import CheckpointError
from l2vit.integrations import L2ViTBackbone, backbone_state_dict

from ..helpers import official_random_state_dict


def test_levels_strides_channels_on_odd_sizes():
    bb = L2ViTBackbone('test_l2vit', out_indices=(0, 1, 2, 3)).eval()
    assert bb.channels == [16, 32, 64, 128] and bb.strides == [4, 8, 16, 32]
    feats = bb(torch.randn(2, 3, 45, 77))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 12, 20), (2, 32, 6, 10), (2, 64, 3, 5), (2, 128, 2, 3)]
    # each output is LayerNorm-ed over channels: zero mean, unit variance per position at initialisation
    for f in feats:
        assert torch.allclose(f.mean(1), torch.zeros(()), atol=1e-5)
        assert torch.allclose(f.var(1, unbiased=False), torch.ones(()), atol=1e-2)


def test_features_come_from_the_timm_model_itself():
    """No copy of the model: without the output norms the maps are the model's forward_intermediates."""
    bb = L2ViTBackbone('test_l2vit', out_indices=(1, 2, 3), out_norm=False).eval()
    ref = timm.create_model('test_l2vit', num_classes=0).eval()
    ref.load_state_dict(bb.model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 96)
    expected = ref.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    for got, want in zip(bb(x), expected):
        torch.testing.assert_close(got, want)


def test_output_norms_are_named_as_the_official_backbone_and_unused_stages_pruned():
    bb = L2ViTBackbone('test_l2vit', out_indices=(0, 1))
    assert isinstance(bb.norm0, LayerNorm2d) and isinstance(bb.norm1, LayerNorm2d) and not hasattr(bb, 'norm2')
    assert len(bb.model.stages) == 2  # stages 3 and 4 are not computed
    keys = bb.state_dict().keys()
    assert {'norm0.weight', 'norm0.bias', 'norm1.weight'} <= set(keys)
    assert not any(k.startswith(('model.head', 'model.norm.')) for k in keys)
    assert L2ViTBackbone('test_l2vit', out_indices=(-1,)).out_indices == (3,)
    with pytest.raises(ValueError, match='out_indices'):
        L2ViTBackbone('test_l2vit', out_indices=(4,))


def test_imagenet_weights_load_strictly_except_the_new_norms():
    clf = timm.create_model('test_l2vit', num_classes=10).eval()
    bb = L2ViTBackbone('test_l2vit', out_indices=(0, 1, 2)).eval()
    fresh = bb.load_pretrained(clf.state_dict())
    assert fresh == ['norm0', 'norm1', 'norm2']
    x = torch.randn(1, 3, 64, 64)
    want = clf.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
    for i, (got, w) in enumerate(zip(bb(x), want)):
        torch.testing.assert_close(got, getattr(bb, f'norm{i}')(w))
    # a checkpoint of another variant is refused, naming what does not fit
    other = timm.create_model('test_l2vit', num_classes=0, dims=(16, 32, 48, 128)).state_dict()
    with pytest.raises(CheckpointError, match='shape mismatch'):
        bb.load_pretrained(other)


def test_detector_checkpoints_bring_their_output_norms_and_partial_norms_are_refused():
    src = L2ViTBackbone('test_l2vit', out_indices=(0, 1, 2, 3))
    with torch.no_grad():
        for i in range(4):
            getattr(src, f'norm{i}').weight.uniform_()
    whole = {f'backbone.body.{k}': v for k, v in src.state_dict().items()}  # a torchvision detector of ours
    whole['backbone.fpn.layer.weight'] = torch.zeros(1)
    dst = L2ViTBackbone('test_l2vit', out_indices=(0, 1, 2, 3))
    assert dst.load_pretrained(whole) == []
    torch.testing.assert_close(dst.norm3.weight, src.norm3.weight)
    partial = {k: v for k, v in src.state_dict().items() if not k.startswith('norm3.')}
    with pytest.raises(CheckpointError, match='norm3'):
        L2ViTBackbone('test_l2vit').load_pretrained(partial)
    # norms of levels this backbone does not output are skipped with a warning (Mask R-CNN -> RetinaNet)
    with pytest.warns(UserWarning, match='norm0'):
        assert L2ViTBackbone('test_l2vit', out_indices=(1, 2, 3)).load_pretrained(src.state_dict()) == []


def test_official_imagenet_and_mmdet_checkpoints_load():
    official = official_random_state_dict('tiny')  # official names; skips when the fixtures are absent
    bb = L2ViTBackbone('l2vit_tiny', out_indices=(1, 2, 3))
    assert bb.load_pretrained({'model': official, 'epoch': 3}) == ['norm1', 'norm2', 'norm3']
    clf = timm.create_model('l2vit_tiny', pretrained=False)
    from l2vit import checkpoint_filter_fn
    clf.load_state_dict(checkpoint_filter_fn(official, clf))
    torch.testing.assert_close(bb.model.stages[3].blocks[1].mlp.fc2.weight, clf.stages[3].blocks[1].mlp.fc2.weight)
    # an official mmdet checkpoint: 'state_dict' with backbone.* (official names, norm{i}) and neck / head keys
    mmdet = {f'backbone.{k}': v for k, v in official.items() if not k.startswith(('head.', 'norm.'))}
    for i, c in ((1, 192), (2, 384), (3, 768)):
        mmdet[f'backbone.norm{i}.weight'] = torch.full((c,), 2.0)
        mmdet[f'backbone.norm{i}.bias'] = torch.zeros(c)
    mmdet['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    assert bb.load_pretrained({'meta': {}, 'state_dict': mmdet}) == []
    assert bb.norm2.weight.eq(2).all()


def test_frozen_stages_stay_fixed_and_in_eval_mode():
    bb = L2ViTBackbone('test_l2vit', frozen_stages=1)
    bb.train()
    assert not bb.model.stem.training and not bb.model.stages[0].training and bb.model.stages[1].training
    assert all(not p.requires_grad for p in bb.model.stem.parameters())
    assert all(not p.requires_grad for p in bb.model.stages[0].parameters())
    assert all(p.requires_grad for p in bb.model.stages[1].parameters())
    sum(f.sum() for f in bb(torch.randn(2, 3, 64, 64))).backward()
    assert bb.model.stages[0].blocks[0].mlp.fc1.weight.grad is None
    assert bb.model.stages[1].blocks[0].mlp.fc1.weight.grad is not None
    bb = L2ViTBackbone('test_l2vit', norm_eval=True).train()
    assert not any(m.training for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_window_size_is_the_models_unless_given():
    def windows(bb: L2ViTBackbone) -> set[int]:
        return {m.window_size for m in bb.modules() if type(m).__name__ == 'LocalWindowAttention'}

    assert windows(L2ViTBackbone('test_l2vit')) == {7}
    assert windows(L2ViTBackbone('test_l2vit', window_size=4)) == {4}
    assert windows(L2ViTBackbone('test_l2vit', window_size=(7, 7, 5, 3))) == {7, 5, 3}


def test_backbone_state_dict_strips_container_prefixes():
    assert list(backbone_state_dict({'module.backbone.body.model.stem.x': 1, 'backbone.fpn.y': 2})) == ['stem.x']
    assert list(backbone_state_dict({'backbone.norm0.weight': 1, 'decode_head.z': 2})) == ['norm0.weight']
    assert list(backbone_state_dict({'stem.conv1.weight': 1})) == ['stem.conv1.weight']
