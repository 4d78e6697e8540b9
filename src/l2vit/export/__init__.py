"""Deployment: ONNX (dynamic batch, height and width) and ``torch.export`` programs of any model, with a check
against eager PyTorch at input sizes the export never saw."""
from .onnx import OnnxCheck, check_onnx, export_onnx
from .program import export_program, load_program

__all__ = ['OnnxCheck', 'check_onnx', 'export_onnx', 'export_program', 'load_program']
