"""Linear layers whose weights oneDNN has reordered once, for float32 inference on the CPU.

``F.linear`` hands oneDNN a plain row-major weight on every call, and oneDNN reorders it into its blocked GEMM layout
each time. The inference fast paths call the same linear layer on many small chunks of tokens, so that reorder is
paid per chunk: on 2 cores it is 5-15% of a chunk's matrix multiply (more for the narrow stage-1 layers), and an
exact GELU after it is another pass over the hidden activation. :func:`linear_inference` keeps the reordered weight
(per layer and row block, rebuilt when the weight changes) and runs the multiply, bias and GELU as one oneDNN call
(``torch.ops.mkldnn._linear_pointwise``, the kernel inductor's frozen CPU graphs use).

It is taken only where it can change nothing but speed and rounding: float32 input and weight on the CPU, no
gradient, no autocast, the fast paths on (:func:`l2vit.layers.fast_paths`), a PyTorch built with oneDNN, and a weight
that is not an inference tensor (a model built under ``torch.inference_mode``: such tensors have no version counter,
so a cached copy could not notice in-place writes to them). Everything
else gets ``F.linear`` (then GELU), which is also its naive twin in the tests. The products are the same sums as
``F.linear``'s up to their order (bit-identical for most shapes measured; within 2e-4 of it in the worst case of
K=1536 random rows, where both are ~1e-4 from float64).

The reordered copies cost one extra copy of the weights they cover while the model lives (they are held in a
weak-keyed table, not in the module: ``state_dict``, pickling and ``deepcopy`` never see them);
:func:`clear_packed_weights` drops them, and ``L2ViT.train()`` does so when training starts. Where that memory
matters more than ~5% of CPU inference time, ``L2VIT_PACKED_WEIGHTS=0`` in the environment turns them off (read on
every call, so it also works when set after import).
"""
from __future__ import annotations

import os
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ._fastpath import fast_paths_enabled

__all__ = ['linear_inference', 'clear_packed_weights', 'packing_available', 'packing_enabled']

# Row count the reorder is tuned for (about one chunk of the fast paths); any row count works.
_ROWS_HINT = 1024

# module -> {(first_row, end_row): (data_ptr, version, weight it was made from, packed)}
_packed: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def packing_available() -> bool:
    """Whether this PyTorch has the oneDNN ops :func:`linear_inference` needs."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')
            and hasattr(torch.ops.mkldnn, '_reorder_linear_weight'))


_AVAILABLE = packing_available()


def packing_enabled() -> bool:
    """False when ``L2VIT_PACKED_WEIGHTS`` is set to ``0`` (or ``false`` / ``off`` / ``no``): no reordered copies are
    made and every layer runs ``F.linear``."""
    return os.environ.get('L2VIT_PACKED_WEIGHTS', '1').strip().lower() not in ('0', 'false', 'off', 'no')


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_AVAILABLE and fast_paths_enabled() and packing_enabled()
            and x.device.type == 'cpu' and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled('cpu') and not weight.is_inference()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _packed_weight(linear: nn.Linear, weight: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
    key = (weight.data_ptr(), weight._version)
    with _lock:
        entry = _packed.setdefault(linear, {}).get(rows)
    if entry is not None and entry[:2] == key:
        return entry[3]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _ROWS_HINT)
    with _lock:
        # the entry holds the weight it was made from, so its memory cannot be freed and reused by another weight
        # at the same address (which would match the key after ``.data`` swaps)
        _packed.setdefault(linear, {})[rows] = (*key, weight.detach(), packed)
    return packed


def linear_inference(linear: nn.Linear, x: torch.Tensor, gelu: bool = False,
                     rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``F.linear(x, W, b)`` for inference, then exact GELU if ``gelu``, with ``W, b`` the rows ``rows``
    (``(first, end)``, default all) of ``linear``'s weight and bias: one oneDNN call on a reordered weight where
    that is allowed (see the module docstring), else ``F.linear`` (and an in-place GELU on its fresh output).

    Only for results nobody differentiates: the caller has checked that the layer runs in inference.
    """
    weight, bias = linear.weight, linear.bias
    if rows is not None:
        weight = weight[rows[0]:rows[1]]
        bias = None if bias is None else bias[rows[0]:rows[1]]
    if not _usable(x, weight):
        y = F.linear(x, weight, bias)
        if not gelu:
            return y
        return F.gelu(y) if y.requires_grad else torch.ops.aten.gelu_(y)  # in place only where autograd is not
    packed = _packed_weight(linear, weight, rows or (0, weight.shape[0]))
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, 'gelu', [], 'none')
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, 'none', [], '')


def clear_packed_weights(module: nn.Module | None = None) -> None:
    """Drop the reordered weights of ``module`` and its submodules (all of them if None)."""
    with _lock:
        if module is None:
            _packed.clear()
            return
        for m in module.modules():
            _packed.pop(m, None)
