"""Deployment: ONNX with dynamic batch/height/width checked in ONNX Runtime at unseen sizes, and torch.export."""
from __future__ import annotations

import pytest
import timm
import torch

from l2vit.cli import main
from l2vit.export import check_onnx, export_onnx, export_program, load_program


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('test_l2vit', num_classes=10).eval()


def test_bad_export_arguments_are_explained(model, tmp_path):
    with pytest.raises(ValueError, match='opset must be at least 17'):
        export_onnx(model, tmp_path / 'm.onnx', opset=16)
    with pytest.raises(ValueError, match='at least 33 px per side'):
        export_program(model, example_size=(32, 64))
    assert main(['export', 'test_l2vit', str(tmp_path / 'm.onnx'), '--checkpoint', str(tmp_path / 'nope.pth')]) == 2


@pytest.mark.slow
def test_onnx_dynamic_batch_height_width(model, tmp_path):
    onnx = pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')
    path = export_onnx(model, tmp_path / 'test_l2vit.onnx', example_size=(320, 384), batch=2)
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')) >= 17
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    # sizes the export never saw: square, non-square, another batch, and down to one stride-32 cell
    shapes = [(1, 3, 224, 224), (3, 3, 97, 301), (2, 3, 512, 384), (1, 3, 32, 32)]
    for result in check_onnx(path, model, shapes):
        assert result.max_abs_error <= 1e-4, result


@pytest.mark.slow
def test_torch_export_program_round_trip(model, tmp_path):
    path = tmp_path / 'test_l2vit.pt2'
    export_program(model, example_size=(160, 224), path=path)  # dynamic batch
    program = load_program(path)
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 160, 224)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='dynamic must be one of'):
        export_program(model, dynamic='height')


@pytest.mark.slow
def test_cli_export_onnx_checks_unseen_sizes(tmp_path, capsys):
    out = tmp_path / 'm.onnx'
    assert main(['export', 'test_l2vit', str(out), '--check', '96', '64x160']) == 0
    text = capsys.readouterr().out
    assert out.is_file() and 'ONNX Runtime vs eager at 2x3x64x160' in text
