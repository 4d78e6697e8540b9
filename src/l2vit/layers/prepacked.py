"""Linear layers whose weights oneDNN has reordered once, for float32 inference on the CPU.

``F.linear`` hands oneDNN a plain row-major weight on every call, and oneDNN reorders it into its blocked GEMM layout
each time. The inference fast paths call the same linear layer on many small chunks of tokens, so that reorder is
paid per chunk: on 2 cores it is 5-15% of a chunk's matrix multiply (more for the narrow stage-1 layers).
:func:`linear_inference` keeps the reordered weight (per layer and row block, rebuilt when the weight changes) and
runs the multiply and bias as one oneDNN call (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor's frozen
CPU graphs use).

An exact GELU after the multiply is either fused into that call as oneDNN's post-op or run as PyTorch's in-place
GELU right after it, whichever is faster on this CPU (:func:`gelu_fused`): the choice is made once per process by
timing both on one chunk-sized multiply, because it differs between CPUs. On an AVX2 EPYC (no AVX-512) the fused
post-op made a 1365 × 384 → 1536 multiply 45% slower (16.0 vs 11.1 ms) while the separate in-place GELU added 10%
(12.1 ms); both give the same values (bit-identical there). ``L2VIT_FUSED_GELU=1`` / ``0`` fixes the choice.

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
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ._fastpath import fast_paths_enabled

__all__ = ['linear_inference', 'clear_packed_weights', 'packing_available', 'packing_enabled', 'gelu_fused']

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

_FALSE_WORDS = ('0', 'false', 'off', 'no')
_TRUE_WORDS = ('1', 'true', 'on', 'yes')


def packing_enabled() -> bool:
    """False when ``L2VIT_PACKED_WEIGHTS`` is set to ``0`` (or ``false`` / ``off`` / ``no``): no reordered copies are
    made and every layer runs ``F.linear``."""
    return os.environ.get('L2VIT_PACKED_WEIGHTS', '1').strip().lower() not in _FALSE_WORDS


_gelu_fused: bool | None = None  # decided on first use (see gelu_fused)
_gelu_lock = threading.Lock()


def gelu_fused() -> bool:
    """Whether :func:`linear_inference` fuses an exact GELU into oneDNN's multiply (True) or runs PyTorch's in-place
    GELU on the multiply's output (False).

    ``L2VIT_FUSED_GELU`` (``1`` / ``0``, read on every call) fixes it. Otherwise it is measured once per process, on
    first use: both forms of a 512 × 256 → 1024 multiply, alternating, five rounds after a warm-up (a few
    milliseconds), and the faster median wins. The two forms compute the same values up to the GELU
    implementation's last-bit rounding, so the choice only changes speed.
    """
    env = os.environ.get('L2VIT_FUSED_GELU', '').strip().lower()
    if env in _TRUE_WORDS or env in _FALSE_WORDS:
        return env in _TRUE_WORDS
    if env:
        raise ValueError(f"L2VIT_FUSED_GELU must be 1 or 0 (or true/false, on/off, yes/no), got {env!r}")
    global _gelu_fused
    if _gelu_fused is None:
        with _gelu_lock:
            if _gelu_fused is None:
                _gelu_fused = _time_gelu_forms()
    return _gelu_fused


def _time_gelu_forms(rows: int = 512, k: int = 256, n: int = 1024, rounds: int = 5) -> bool:
    """True when the fused post-op form is at least as fast as the separate in-place GELU (medians of ``rounds``)."""
    gen = torch.Generator().manual_seed(0)  # the caller's random stream stays untouched
    with torch.no_grad():
        weight = torch.randn(n, k, generator=gen) * k ** -0.5
        bias = torch.zeros(n)
        x = torch.randn(rows, k, generator=gen)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT)
        forms = (lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, 'gelu', [], 'none'),
                 lambda: torch.ops.aten.gelu_(torch.ops.mkldnn._linear_pointwise(x, packed, bias, 'none', [], '')))
        times: tuple[list[float], list[float]] = ([], [])
        for form in forms:  # warm-up: oneDNN builds each kernel on its first call
            form()
        for _ in range(rounds):
            for form, spent in zip(forms, times):
                start = time.perf_counter()
                form()
                spent.append(time.perf_counter() - start)
    fused, separate = (sorted(t)[len(t) // 2] for t in times)
    return fused <= separate


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
    if gelu and gelu_fused():
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, 'gelu', [], 'none')
    y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, 'none', [], '')
    return torch.ops.aten.gelu_(y) if gelu else y


def clear_packed_weights(module: nn.Module | None = None) -> None:
    """Drop the reordered weights of ``module`` and its submodules (all of them if None)."""
    with _lock:
        if module is None:
            _packed.clear()
            return
        for m in module.modules():
            _packed.pop(m, None)
