"""Deployment: ONNX (dynamic batch, height and width) and ``torch.export`` programs of any model, with a check
against eager PyTorch at input sizes the export never saw; and an inference-only compiled model with frozen
weights (the fastest half-precision CPU path)."""
from .frozen import FrozenInference, compile_for_inference
from .onnx import OnnxCheck, check_onnx, export_onnx
from .program import export_program, load_program

__all__ = ['FrozenInference', 'OnnxCheck', 'check_onnx', 'compile_for_inference', 'export_onnx', 'export_program',
           'load_program']
