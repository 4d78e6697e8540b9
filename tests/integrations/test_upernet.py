"""UperNet: structure of the official head, any input size, loss with ignored pixels, inference modes."""
from __future__ import annotations

import torch

from l2vit.integrations import FCNHead, UPerHead, build_upernet, slide_inference, whole_inference


def _small(**kw):
    return build_upernet(3, backbone='test_l2vit', channels=32, aux_channels=16, **kw)


def test_structure_follows_the_official_head():
    model = build_upernet(150, backbone='test_l2vit')
    head = model.decode_head
    assert isinstance(head, UPerHead) and len(head.psp_modules.stages) == 4
    assert [s[0].output_size for s in head.psp_modules.stages] == [1, 2, 3, 6]
    assert head.bottleneck[0].in_channels == 128 + 4 * 512 and head.fpn_bottleneck[0].in_channels == 4 * 512
    assert head.cls.conv_seg.out_channels == 150 and head.cls.dropout.p == 0.1
    aux = model.auxiliary_head
    assert isinstance(aux, FCNHead) and aux.convs[0][0].in_channels == 64  # stage 3 of test_l2vit
    assert aux.convs[0][0].out_channels == 256 and model.aux_weight == 0.4
    assert isinstance(aux.convs[0][1], torch.nn.BatchNorm2d)  # norm_cfg BN, not SyncBN
    assert build_upernet(3, backbone='test_l2vit', aux_index=None).auxiliary_head is None


def test_any_input_size_gives_logits_at_that_size():
    model = _small().eval()
    for h, w in ((50, 67), (33, 129), (64, 64)):
        out = model(torch.randn(1, 3, h, w))
        assert set(out) == {'out'} and out['out'].shape == (1, 3, h, w)
    out = model.train()(torch.randn(2, 3, 45, 70))
    assert out['out'].shape == out['aux'].shape == (2, 3, 45, 70)


def test_loss_ignores_pixels_and_survives_ignore_only_batches():
    torch.manual_seed(0)
    model = _small().train()
    x = torch.randn(2, 3, 48, 48)
    target = torch.randint(0, 3, (2, 48, 48))
    target[:, :10] = 255
    losses = model.loss(model(x), target)
    assert set(losses) == {'loss_seg', 'loss_aux'}
    # mmseg's mean counts ignored pixels in the denominator (avg_non_ignore=False)
    out = model(x)
    ce = torch.nn.functional.cross_entropy(out['out'], target, ignore_index=255, reduction='sum') / target.numel()
    torch.testing.assert_close(model.loss(out, target)['loss_seg'], ce)
    empty = model.loss(model(x), torch.full((2, 48, 48), 255))
    assert all(v.item() == 0.0 for v in empty.values())
    sum(empty.values()).backward()  # no NaN gradients
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = _small().train()
    x = torch.randn(2, 3, 48, 64)
    target = torch.zeros(2, 48, 64, dtype=torch.long)
    target[:, 10:30, 20:50] = 1
    target[:, 35:, :20] = 2
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = sum(model.loss(model(x), target).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_slide_and_whole_inference():
    model = _small().eval()
    x = torch.randn(1, 3, 70, 90)
    whole = whole_inference(model, x)
    # one window covering the image is whole-image inference
    torch.testing.assert_close(slide_inference(model, x, 3, crop_size=(80, 100), stride=(60, 60)), whole)
    slid = slide_inference(model, x, 3, crop_size=(48, 48), stride=(32, 32), out_size=(35, 45))
    assert slid.shape == (1, 3, 35, 45) and torch.isfinite(slid).all()
    assert whole_inference(model, x, out_size=(140, 180)).shape == (1, 3, 140, 180)
