"""When an inference pass may take a faster route to the same numbers.

Two CPU costs dominate L²ViT at high resolution or large batch, beyond the matrix multiplies: every large allocation
is fresh memory the kernel must fault in page by page, and token-sized intermediates stream through main memory
between ops. Inference therefore (a) runs activations in place on the output of the layer before them and (b) runs
the token-wise parts of a block (MLP, window attention, linear attention) over chunks of tokens, so the wide
intermediates stay in cache and are never allocated at full size.

Both are done only when they cannot change a result anyone can see: no gradient will flow through the tensors, no
forward hook of the modules involved would be handed a partial or overwritten tensor, and the code is running eagerly
(``torch.compile`` / ``torch.export`` / FX tracing / TorchScript see the plain code, which their compilers fuse
themselves). TorchScript cannot compile these helpers (they take modules); modules call them from methods marked
``@torch.jit.unused`` behind ``torch.jit.is_scripting()``.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules import module as _module

__all__ = ['fast_paths', 'fast_paths_enabled', 'unobserved', 'grad_free', 'can_overwrite', 'result_buffer',
           'activation', 'eager_inference', 'chunk_rows', 'frozen_bn_affine']

# Target size of one chunk's widest intermediate (MLP hidden, window qkv): small enough to be reused from the C
# library's heap, large enough that each chunk's matrix multiplies run near full speed (measured on 2 cores with
# reordered weights: 2, 4, 8, 16 MiB gave 1001, ~981, 934, 926 ms at 1024² and 746, 720, 697, 704 ms at 224²
# batch 16).
CHUNK_BYTES = 2 ** 23
# Intermediates below this size are not split (see chunk_rows): small ones are served from the C library's heap,
# already faulted in; larger ones may be mapped afresh on every call (glibc's mmap threshold adapts up to 32 MiB).
SPLIT_BYTES = 2 ** 24
# Fewer rows than this make the matrix multiplies of a chunk inefficient.
MIN_CHUNK_ROWS = 256


_enabled = True


class fast_paths(contextlib.ContextDecorator):
    """Turn the inference fast paths off (``with fast_paths(False): ...``) or back on, e.g. to time or debug the
    plain forward; they are on by default. Usable as a context manager or decorator; the setting is process-wide."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def __enter__(self):
        global _enabled
        self._previous, _enabled = _enabled, self.enabled
        return self

    def __exit__(self, *exc):
        global _enabled
        _enabled = self._previous
        return False


def fast_paths_enabled() -> bool:
    """Whether the inference fast paths may run (see :class:`fast_paths`)."""
    return _enabled


def _tracing() -> bool:
    return is_fx_symbolic_tracing() or torch.compiler.is_compiling() or torch.jit.is_tracing()


def unobserved(*producers: nn.Module) -> bool:
    """True when no forward hook or pre-hook (global, or on any of ``producers`` and their submodules) can see the
    tensors they produce, and nothing is tracing the model (a traced graph keeps the general, out-of-place form)."""
    if not _enabled or _tracing() or _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    for producer in producers:
        for m in producer.modules():
            if m._forward_hooks or m._forward_pre_hooks:
                return False
    return True


@torch.jit.unused
def grad_free(tensors: list[torch.Tensor]) -> bool:
    """True when no gradient will flow through any of ``tensors``, and the code runs eagerly (under FX, dynamo or
    TorchScript tracing: False, so the traced graph keeps the general, out-of-place form)."""
    if _tracing():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def can_overwrite(x: torch.Tensor, producer: nn.Module) -> bool:
    """Whether ``x``, just returned by ``producer``, may be modified in place without changing anything observable.

    Use it for ops whose backward needs their own input (activations); an op that may run in place even under
    autograd (adding to the output of a layer that does not save it) only needs :func:`unobserved`.
    """
    return unobserved(producer) and grad_free([x])


def result_buffer(out: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out`` when it can hold a result shaped like ``like`` in ``dtype`` (same shape, dtype and device,
    contiguous), else a fresh contiguous tensor: the chunked residual routes write into a buffer their caller owns
    (often the residual input itself) and fall back to a new one when it does not fit."""
    if (out is not None and out.shape == like.shape and out.dtype == dtype and out.device == like.device
            and out.is_contiguous()):
        return out
    return torch.empty(like.shape, dtype=dtype, device=like.device)


# Layers whose backward does not read their own output: a ReLU right after one may overwrite that output even under
# autograd, since ReLU's backward reads its result, not its input (as torchvision's ResNets do after BatchNorm).
_OUTPUT_NOT_SAVED = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv2d, nn.Linear)


def activation(act: nn.Module, x: torch.Tensor, producer: nn.Module) -> torch.Tensor:
    """``act(x)`` for ``x`` just returned by ``producer``, computed in place for exact GELU / ReLU when
    :func:`can_overwrite` allows it, and for ReLU also while training when ``producer`` does not save its output
    for backward (same values and gradients)."""
    if type(act) is nn.GELU and act.approximate == 'none' and can_overwrite(x, producer):
        return torch.ops.aten.gelu_(x)
    if type(act) is nn.ReLU and (can_overwrite(x, producer)
                                 or (type(producer) in _OUTPUT_NOT_SAVED and unobserved(producer, act))):
        return F.relu(x, inplace=True)
    return act(x)


def eager_inference(x: torch.Tensor, *modules: nn.Module) -> bool:
    """True when ``modules`` run eagerly on ``x`` in inference (no grad through ``x`` or their parameters, eval-mode
    dropout and drop-path) and unobserved, so a chunked or fused route may replace their plain forward."""
    if not unobserved(*modules):
        return False
    if any(m.training for m in modules):
        return False
    if torch.is_grad_enabled():
        if x.requires_grad or any(p.requires_grad for m in modules for p in m.parameters()):
            return False
    return True


def chunk_rows(width: int, total: int, min_chunks: int = 2, device: torch.device | None = None) -> int:
    """Rows per chunk so that a ``rows × width`` fp32 intermediate stays near :data:`CHUNK_BYTES`.

    Returns 0 (do not split) on devices other than the CPU (a GPU wants few large kernels, and its caching allocator
    has no page-fault cost), when ``total`` rows make fewer than ``min_chunks`` chunks, or when the whole
    ``total × width`` intermediate is below :data:`SPLIT_BYTES`: the allocator then reuses its memory from call to
    call, and chunking would only add small, less efficient matrix multiplies.
    """
    if device is not None and torch.device(device).type != 'cpu':
        return 0
    rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * width))
    if total < min_chunks * rows or 4 * width * total < SPLIT_BYTES:
        return 0
    return rows


def frozen_bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An eval-mode ``BatchNorm2d`` as ``(scale, shift)`` with ``bn(x) == x * scale + shift`` per channel, or None
    when it normalises with batch statistics (training mode, or no running statistics)."""
    if not isinstance(bn, nn.BatchNorm2d) or bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift
