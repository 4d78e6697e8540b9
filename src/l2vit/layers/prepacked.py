"""Linear layers whose weights oneDNN has reordered once, for float32 inference on the CPU.

The inference fast paths call the same linear layer on many small chunks of tokens. ``F.linear`` (MKL's GEMM on x86)
packs the weight again on every call. :func:`linear_inference` can instead keep a copy of the weight reordered once
into oneDNN's blocked layout (per layer and row block, rebuilt when the weight changes) and run the multiply and bias
as one oneDNN call (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor's frozen CPU graphs use); an exact
GELU after it is either fused into that call as oneDNN's post-op or run as PyTorch's in-place GELU right after it.

Which is faster depends on the CPU, so it is measured once per process, on first use (:func:`route_choice`: a few
chunk-sized multiplies of each form, alternating, about 0.2 s on 2 cores). Measured 2026-12-08 on 2 threads of an
AVX2-only AMD EPYC: MKL's ``F.linear`` ran the model's chunk shapes 2-20% faster than the reordered oneDNN
weights, and oneDNN's GELU post-op made a 1365 × 384 → 1536 multiply 45% slower (16.0 vs 11.1 ms) where PyTorch's
in-place GELU after it added 10% (12.1 ms); on the AVX-512 Intel hosts of earlier runs the reordered weights were
5-15% faster per chunk (docs/performance.md). ``L2VIT_PACKED_WEIGHTS=1`` / ``0`` and ``L2VIT_FUSED_GELU=1`` / ``0`` fix the choices (read
on every call, so they also work when set after import).

The reordered route is taken only where it can change nothing but speed and rounding: float32 input and weight on
the CPU, no gradient, no autocast, the fast paths on (:func:`l2vit.layers.fast_paths`), a PyTorch built with oneDNN,
and a weight that is not an inference tensor (a model built under ``torch.inference_mode``: such tensors have no
version counter, so a cached copy could not notice in-place writes to them). Everything else gets ``F.linear`` (then
GELU), which is also its naive twin in the tests. The products are the same sums as ``F.linear``'s up to their order
(bit-identical for most shapes measured; within 2e-4 of it in the worst case of K=1536 random rows, where both are
~1e-4 from float64), and both GELUs are the exact-erf one (bit-identical on the shapes measured).

The reordered copies cost one extra copy of the weights they cover while the model lives (they are held in a
weak-keyed table, not in the module: ``state_dict``, pickling and ``deepcopy`` never see them);
:func:`clear_packed_weights` drops them, and ``L2ViT.train()`` does so when training starts. Where that memory
matters more than a few percent of CPU inference time, ``L2VIT_PACKED_WEIGHTS=0`` turns them off.
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

__all__ = ['linear_inference', 'clear_packed_weights', 'packing_available', 'packing_enabled', 'gelu_fused',
           'route_choice', 'routes_taken']

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


def _switch(name: str) -> bool | None:
    """The boolean the environment variable ``name`` sets (``1``/``0``, ``true``/``false``, ``on``/``off``,
    ``yes``/``no``), or None when it is unset or empty."""
    value = os.environ.get(name, '').strip().lower()
    if not value:
        return None
    if value in _TRUE_WORDS or value in _FALSE_WORDS:
        return value in _TRUE_WORDS
    raise ValueError(f'{name} must be 1 or 0 (or true/false, on/off, yes/no), got {value!r}')


def packing_enabled() -> bool:
    """Whether :func:`linear_inference` runs on reordered oneDNN weights (True) or on ``F.linear`` (False):
    ``L2VIT_PACKED_WEIGHTS`` fixes it, else the faster on this CPU (:func:`route_choice`)."""
    switch = _switch('L2VIT_PACKED_WEIGHTS')
    return _measured()['packed'] if switch is None else switch


def gelu_fused() -> bool:
    """Whether :func:`linear_inference` on reordered weights fuses an exact GELU into oneDNN's multiply (True) or runs
    PyTorch's in-place GELU on its output (False): ``L2VIT_FUSED_GELU`` fixes it, else the faster on this CPU
    (:func:`route_choice`)."""
    switch = _switch('L2VIT_FUSED_GELU')
    return _measured()['fused_gelu'] if switch is None else switch


_choice: dict[str, bool] | None = None  # measured on first use (see route_choice)
_choice_lock = threading.Lock()


def route_choice() -> dict[str, bool]:
    """The routes this process measured faster: ``{'packed': ..., 'fused_gelu': ...}`` (see the module docstring).

    Measured once, on first use, with the process's thread count: the two linear layers of an MLP chunk (512 rows,
    384 → 1536 and 1536 → 384) on reordered weights and by ``F.linear``, and the first with the GELU fused or after
    it; five alternating rounds after a warm-up, medians compared. The forms compute the same values up to rounding,
    so the choice changes speed (and the memory of the reordered copies) only. Without oneDNN: nothing to choose.
    """
    return dict(_measured())


def _measured() -> dict[str, bool]:
    """The cached choice, measured on the first call (no copy: :func:`linear_inference` reads it per call)."""
    global _choice
    if _choice is None:
        with _choice_lock:
            if _choice is None:
                _choice = _time_routes() if _AVAILABLE else {'packed': False, 'fused_gelu': False}
    return _choice


def routes_taken() -> str | None:
    """The route :func:`linear_inference` takes in this process, for benchmark records: ``'F.linear'``,
    ``'oneDNN'`` or ``'oneDNN + fused GELU'``; None while nothing has measured or fixed it (the process never ran
    the reordered route's checks, e.g. a model without l2vit's fast paths)."""
    if _choice is None and _switch('L2VIT_PACKED_WEIGHTS') is None:
        return None
    if not (_AVAILABLE and packing_enabled()):
        return 'F.linear'
    return 'oneDNN + fused GELU' if gelu_fused() else 'oneDNN'


def _time_routes(rows: int = 512, dim: int = 384, hidden: int = 1536, rounds: int = 5) -> dict[str, bool]:
    gen = torch.Generator().manual_seed(0)  # the caller's random stream stays untouched
    with torch.no_grad():
        w1 = torch.randn(hidden, dim, generator=gen) * dim ** -0.5
        w2 = torch.randn(dim, hidden, generator=gen) * hidden ** -0.5
        b1, b2 = torch.zeros(hidden), torch.zeros(dim)
        x1 = torch.randn(rows, dim, generator=gen)
        x2 = torch.randn(rows, hidden, generator=gen)
        p1, p2 = (torch.ops.mkldnn._reorder_linear_weight(w, _ROWS_HINT) for w in (w1, w2))
        forms = {
            'packed': lambda: (_onednn_linear(x1, p1, b1), _onednn_linear(x2, p2, b2)),
            'plain': lambda: (F.linear(x1, w1, b1), F.linear(x2, w2, b2)),
            'fused_gelu': lambda: _onednn_linear(x1, p1, b1, fused_gelu=True),
            'separate_gelu': lambda: torch.ops.aten.gelu_(_onednn_linear(x1, p1, b1)),
        }
        times: dict[str, list[float]] = {name: [] for name in forms}
        for form in forms.values():  # warm-up: oneDNN builds each kernel on its first call
            form()
        for _ in range(rounds):
            for name, form in forms.items():
                start = time.perf_counter()
                form()
                times[name].append(time.perf_counter() - start)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return {'packed': median['packed'] <= median['plain'],
            'fused_gelu': median['fused_gelu'] <= median['separate_gelu']}


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_AVAILABLE and fast_paths_enabled()
            and x.device.type == 'cpu' and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled('cpu') and not weight.is_inference()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and packing_enabled())  # last: the first call may measure the routes


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
    fused = gelu and gelu_fused()
    y = _onednn_linear(x, packed, bias, fused_gelu=fused)
    return torch.ops.aten.gelu_(y) if gelu and not fused else y


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                   fused_gelu: bool = False) -> torch.Tensor:
    """oneDNN's multiply of ``x`` by a reordered weight, with the bias and, if ``fused_gelu``, an exact GELU as its
    post-op."""
    if fused_gelu:
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
