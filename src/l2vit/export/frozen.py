"""A compiled, inference-only model with its weights frozen into the graph: the fastest CPU path in half precision.

``torch.compile`` with inductor's *freezing* treats the parameters as constants: on CPU oneDNN then prepacks every
linear and convolution weight once (for AMX / AVX-512 bf16 tiles) and fuses the pointwise ops around the matrix
multiplies (bias, GELU, residual adds). Measured on the project's 2-core machines (``docs/performance.md``):
``l2vit_tiny`` at 224², batch 16, under bf16 autocast runs ~1.6× faster frozen than eagerly, ~2.85× the eager fp32
throughput, with the same top-1 answers; in fp32 the eager model, with its own inference fast paths, is faster than
the compiled one.

Freezing means what it says: the weights are taken as they are when the first call compiles the model. Changing
them afterwards (``load_state_dict``, an optimizer step) is not supported (prepacked copies keep the old values,
other constants may see the new ones); build a new frozen model instead.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ['FrozenInference', 'compile_for_inference']


class FrozenInference(nn.Module):
    """``model`` compiled for inference with frozen weights (see :func:`compile_for_inference`).

    Calls run under ``torch.inference_mode`` (and ``torch.autocast`` when ``autocast`` is given); floating-point inputs
    are cast to the model's dtype. The wrapped model stays reachable as ``.model`` (its ``state_dict`` is this
    module's, under ``model.``); ``train()`` is refused.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, dynamic: bool | None = None,
                 autocast: torch.dtype | None = None):
        super().__init__()
        for name, value in (('dtype', dtype), ('autocast', autocast)):
            if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise ValueError(f'{name} must be a floating-point torch dtype (e.g. torch.bfloat16), got {value}')
        if dtype is not None:
            model = model.to(dtype)
        self.model = model.eval()
        self.dtype = dtype if dtype is not None else _floating_dtype(model)
        self.autocast = autocast
        # not registered as a submodule: it is the same model, and would repeat it in state_dict()
        self.__dict__['_compiled'] = torch.compile(self.model, dynamic=dynamic)
        super().train(False)  # the wrapper itself reports eval mode too (code that saves and restores .training)

    def train(self, mode: bool = True) -> FrozenInference:
        if mode:
            raise RuntimeError('FrozenInference is for inference only; train the wrapped .model and compile it anew')
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and x.is_floating_point() and x.dtype != self.dtype:
            x = x.to(self.dtype)
        # freezing is read when a graph is compiled (the first call, or a recompile for a new input shape)
        # without an autocast of its own the caller's autocast state stands (an outer torch.autocast still applies)
        amp = (torch.autocast(x.device.type, dtype=self.autocast) if self.autocast is not None
               else contextlib.nullcontext())
        with torch._inductor.config.patch(freezing=True), torch.inference_mode(), amp:
            return self._compiled(x)


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def compile_for_inference(model: nn.Module, dtype: torch.dtype | None = None, dynamic: bool | None = None,
                          autocast: torch.dtype | None = None) -> FrozenInference:
    """``model`` (cast to ``dtype`` if given) in eval mode, compiled by inductor with its weights frozen.

    Example::

        fast = l2vit.export.compile_for_inference(model, autocast=torch.bfloat16)
        logits = fast(images)  # first call compiles (about half a minute for l2vit_tiny on 2 cores)

    Args:
        model: Any module; it is put in eval mode (and cast to ``dtype``) in place.
        dtype: Cast the weights (and every input) to this dtype, e.g. ``torch.bfloat16``; None keeps them.
        dynamic: Passed to ``torch.compile`` (None: recompile once for a second input shape, then symbolically).
        autocast: Run every call under ``torch.autocast`` in this dtype (fp32 weights, matrix multiplies in bf16,
            norms and the residual stream in fp32: as fast as a bf16 model here, and closer to fp32).
    """
    return FrozenInference(model, dtype=dtype, dynamic=dynamic, autocast=autocast)
