"""L²ViT's enhanced linear global attention: a ReLU-kernel linear attention over all tokens (spec §2.7).

Per head, with φ = ReLU on queries and keys (not values), learnable temperature τ and clamp value c (100):

    out_n = φ(q_n) · (τ · Σ_m φ(k_m) v_mᵀ) / max(φ(q_n) · Σ_m φ(k_m), c)

The module computes this "kv-first", in O(N·d²) time and O(d²) state per head; no N×N matrix is formed.
``linear_attention_naive`` is the equivalent "qk-first" form, which forms the attention matrix
``A_nm = φ(q_n)·φ(k_m) / max(Σ_m' φ(q_n)·φ(k_m'), c)`` explicitly (the form used to visualise it).

Where τ goes is an option (``temperature=``), for the ablation the official code's comments describe: on the output
(the released models), on the keys (``φ(k) → τ·φ(k)``: it cancels between numerator and denominator except where
the clamp is active), or a fixed, unlearned ``d^-1/2`` on the output.
"""
from __future__ import annotations

import contextlib

import torch
from timm.layers import register_notrace_function
from torch import nn

from .._fastpath import chunk_rows, eager_inference, grad_free, result_buffer, unobserved
from .._registry import register_mixer
from ..prepacked import linear_inference
from ..qkv import qkv_gradient, split_qkv, split_qkv_naive
from ._common import query_index

__all__ = ['LinearGlobalAttention', 'linear_attention', 'linear_attention_naive', 'split_heads',
           'TEMPERATURE_PLACEMENTS']

# Where the per-head temperature τ acts (see the module docstring); 'output' is the official model.
TEMPERATURE_PLACEMENTS = ('output', 'key', 'fixed')

def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the attention core: fp32 for half-precision inputs (Σ over N of kᵀv overflows fp16), else as is."""
    if dtype == torch.float16 or dtype == torch.bfloat16:
        return torch.float32
    return dtype


def _heads_major(t: torch.Tensor, dtype: torch.dtype, relu: bool) -> torch.Tensor:
    """A ``(B, heads, N, d)`` view → contiguous ``(B, heads, N, d)`` in ``dtype`` (ReLU-mapped if ``relu``).

    The qkv projection yields heads interleaved along channels; the batched matmuls of the core want each head's
    tokens contiguous, so the feature map and this layout change share one pass where autograd allows it.
    """
    if not torch.jit.is_scripting() and grad_free([t]):
        return _heads_major_into(t, torch.empty(t.shape, dtype=dtype, device=t.device), relu)
    t = t.to(dtype, memory_format=torch.contiguous_format, copy=True)
    return t.relu_() if relu else t


def _heads_major_into(t: torch.Tensor, out: torch.Tensor, relu: bool) -> torch.Tensor:
    """Write ``relu(t)`` (or ``t``) into ``out`` in one pass, converting layout and dtype (not for autograd)."""
    if relu:  # a 0-dim fp32 zero leaves the op in t's dtype; the result is cast exactly while it is written
        return torch.maximum(t, torch.zeros((), dtype=torch.float32, device=t.device), out=out)
    return out.copy_(t)


@register_notrace_function  # reason: layout and precision depend on the dtype and on autograd
def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, N, 3C)`` qkv projection → ``φ(q), φ(k), v``, each ``(B, heads, N, d)`` with heads-major memory.

    Half-precision projections give fp32 results (the precision of the attention core). In eager training on
    float32 / float64 projections one autograd function does the split (see :class:`_SplitHeads`).
    """
    if torch.jit.is_scripting():
        return _split_heads_plain(qkv, num_heads)
    return _split_heads_eager(qkv, num_heads)


def _split_heads_plain(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B = qkv.shape[0]
    q, k, v = split_qkv(qkv, num_heads)  # views, heads interleaved
    acc = _accum_dtype(qkv.dtype)
    q = _heads_major(q, acc, relu=True)
    k = _heads_major(k, acc, relu=True)
    if v.dtype != acc or B > 1:  # with B == 1 the matmul folds (1, heads) into one batch dim without a copy
        v = _heads_major(v, acc, relu=False)
    return q, k, v


class _SplitHeads(torch.autograd.Function):
    """``split_heads`` for training: the forward maps and re-lays out q and k in one pass each (as inference does);
    the backward writes the gradients of q and k, masked by ``φ > 0`` (ReLU's gradient), and that of v straight
    into one ``(B, N, 3, heads, d)`` tensor: no separate ReLU-backward pass and no fresh tensor per gradient."""

    @staticmethod
    def forward(ctx, qkv, num_heads):
        B = qkv.shape[0]
        q, k, v = split_qkv_naive(qkv, num_heads)
        q = _heads_major_into(q, torch.empty(q.shape, dtype=qkv.dtype, device=qkv.device), relu=True)
        k = _heads_major_into(k, torch.empty(k.shape, dtype=qkv.dtype, device=qkv.device), relu=True)
        if B > 1:  # as _split_heads_plain: with B == 1 the matmul folds (1, heads) without a copy
            v = _heads_major_into(v, torch.empty(v.shape, dtype=qkv.dtype, device=qkv.device), relu=False)
        ctx.save_for_backward(q, k)
        ctx.shape = qkv.shape
        ctx.num_heads = num_heads
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        q, k = ctx.saved_tensors
        grads, relu_outputs = (grad_q, grad_k, grad_v), (q, k, None)
        if torch.is_grad_enabled():  # create_graph (double backward): ReLU's gradient by a differentiable op first
            grads = tuple(g if g is None or r is None else torch.where(r > 0, g, 0.) for g, r in zip(grads, relu_outputs))
            relu_outputs = (None, None, None)
        return qkv_gradient(ctx.shape, ctx.num_heads, grads, relu_outputs), None


@torch.jit.unused
def _split_heads_eager(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # unobserved() first: False while FX / dynamo trace (qkv may be a proxy) and with the fast paths off
    if (unobserved() and torch.is_grad_enabled() and qkv.requires_grad and qkv.dim() == 3
            and _accum_dtype(qkv.dtype) == qkv.dtype):
        q, k, v = _SplitHeads.apply(qkv, num_heads)
        return q, k, v
    return _split_heads_plain(qkv, num_heads)


def _linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        temperature: torch.Tensor,
        clamp_min: float,
) -> torch.Tensor:
    out_dtype = q.dtype
    acc = _accum_dtype(out_dtype)
    B, heads, N = q.shape[0], q.shape[1], q.shape[2]
    dv = v.shape[-1]
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    kv = torch.matmul(k.transpose(-2, -1), v) * temperature.to(acc)  # B, heads, d, dv
    state = torch.cat([kv, k.sum(dim=-2).unsqueeze(-1)], dim=-1)  # B, heads, d, dv + 1
    num_den = torch.matmul(q, state)  # B, heads, N, dv + 1
    num, den = num_den[..., :dv], num_den[..., dv:].clamp_min(clamp_min)
    if torch.jit.is_scripting() or not grad_free([num, den]):
        out = (num / den).transpose(1, 2).contiguous().transpose(1, 2)
    else:
        # write the quotient straight into the heads-last layout that the output projection reads
        out = torch.empty((B, N, heads, dv), dtype=acc, device=q.device).transpose(1, 2)
        torch.div(num, den, out=out)
    return out.to(out_dtype)


def _autocast_disabled(device_type: str):
    """Leave autocast while the core runs: it would run the core's matmuls in half precision."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@torch.jit.unused
def _linear_attention_eager(q, k, v, temperature, clamp_min: float):  # unannotated tensors: TorchScript's defaults
    with _autocast_disabled(q.device.type):
        return _linear_attention(q, k, v, temperature, clamp_min)


@register_notrace_function  # reason: precision and output layout depend on the dtype and on autograd
def linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        temperature: torch.Tensor,
        clamp_min: float = 100.,
) -> torch.Tensor:
    """kv-first ReLU linear attention on feature-mapped ``(B, heads, N, d)`` queries/keys.

    The state ``τ·kᵀv`` and the key sum ``Σk`` are stacked into one ``d × (dv + 1)`` matrix per head, so one batched
    matmul yields numerator and denominator. Half-precision inputs (fp16/bf16, under autocast or not) are computed in
    fp32 — ``Σ kᵀv`` over many tokens overflows fp16 — and the result is returned in their dtype; the clamp keeps
    its exact meaning, a lower bound of ``clamp_min`` on the fp32 denominator ``φ(q)·Σφ(k)``. The result is laid
    out heads-last in memory (``out.transpose(1, 2)`` is contiguous), as the output projection reads it.

    Args:
        q: ReLU-mapped queries.
        k: ReLU-mapped keys.
        v: Values.
        temperature: Per-head scale broadcastable to ``(B, heads, d, d)``; it multiplies the numerator only.
        clamp_min: Lower bound on the denominator ``φ(q)·Σφ(k)``.
    """
    if torch.jit.is_scripting():
        return _linear_attention(q, k, v, temperature, clamp_min)
    return _linear_attention_eager(q, k, v, temperature, clamp_min)


def linear_attention_naive(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        temperature: torch.Tensor,
        clamp_min: float = 100.,
) -> torch.Tensor:
    """qk-first reference of :func:`linear_attention`: forms ``A`` (N×N per head) explicitly."""
    scores = q @ k.transpose(-2, -1)  # B, heads, N, N
    attn = scores / scores.sum(dim=-1, keepdim=True).clamp(min=clamp_min)
    return temperature * (attn @ v)


@register_mixer('linear', local=False)
class LinearGlobalAttention(nn.Module):
    """Global ReLU-kernel linear attention with a learnable per-head temperature and a clamped denominator.

    Input and output are ``(B, H, W, C)``. The feature-mapped queries and keys pass through ``q_probe`` /
    ``k_probe`` (identities), so analysis code can hook them by name.

    Args:
        dim: Channels.
        num_heads: Heads; ``dim`` must be divisible by it.
        qkv_bias: Bias on the qkv projection (True in every official block).
        attn_drop: Accepted for the shared mixer signature; linear attention forms no attention weights to drop.
        proj_drop: Dropout after the output projection.
        clamp_min: Lower bound on the denominator (100 in the official code).
        temperature: Where τ acts: ``'output'`` (learnable, multiplies the numerator: the official model),
            ``'key'`` (learnable, multiplies φ(k), so it also scales the denominator and matters only through the
            clamp) or ``'fixed'`` (``d^-1/2`` on the numerator, a buffer that is not learned). All start at
            ``d^-1/2`` and keep the state_dict key ``temperature``.
        window_size: Accepted for the shared mixer signature and ignored (the attention is global).
    """
    reference = staticmethod(linear_attention_naive)

    def __init__(
            self,
            dim: int,
            num_heads: int,
            *,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            clamp_min: float = 100.,
            temperature: str = 'output',
            window_size: int | None = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        if not clamp_min > 0:
            raise ValueError(f'clamp_min must be > 0 (the denominator is clamped from below), got {clamp_min}')
        if temperature not in TEMPERATURE_PLACEMENTS:
            raise ValueError(f'temperature must be one of {TEMPERATURE_PLACEMENTS}, got {temperature!r}')
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.clamp_min = float(clamp_min)
        self.temperature_placement = temperature

        # registration order follows the official state_dict: temperature, qkv, proj
        init = torch.full((num_heads, 1, 1), self.head_dim ** -0.5, **dd)
        if temperature == 'fixed':
            self.register_buffer('temperature', init)
        else:
            self.temperature = nn.Parameter(init)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_probe = nn.Identity()
        self.k_probe = nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        extra = '' if self.temperature_placement == 'output' else f', temperature={self.temperature_placement}'
        return f'num_heads={self.num_heads}, clamp_min={self.clamp_min:g}{extra}'

    def reset_parameters(self) -> None:
        """Reset the temperature to its initial value ``head_dim ** -0.5``."""
        nn.init.constant_(self.temperature, self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x):  # unannotated: TorchScript reads Tensor -> Tensor (and never calls it)
        if eager_inference(x, self):
            out = self.chunked_residual(x, None)
            if out is not None:
                return out
            return self._forward(x, packed=True)
        return self._forward(x)

    @torch.jit.unused
    def _packed_qkv(self, x):  # unannotated: TorchScript reads Tensor -> Tensor (and never calls it)
        return linear_inference(self.qkv, x)

    @torch.jit.unused
    def _packed_proj(self, x):  # unannotated: TorchScript reads Tensor -> Tensor (and never calls it)
        return linear_inference(self.proj, x)

    def _forward(self, x: torch.Tensor, packed: bool = False) -> torch.Tensor:
        # packed: the projections through linear_inference (eager inference only)
        packed = packed and not torch.jit.is_scripting()
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        qkv = self._packed_qkv(tokens) if packed else self.qkv(tokens)
        q, k, v = split_heads(qkv, self.num_heads)
        temperature = self.temperature
        if self.temperature_placement == 'key':
            k = k * temperature.to(k.dtype)
            temperature = torch.ones_like(temperature)
        q = self.q_probe(q)
        k = self.k_probe(k)
        out = linear_attention(q, k, v, temperature, self.clamp_min)  # B, heads, N, d; heads-last memory
        out = out.transpose(1, 2).reshape(B, H, W, C).to(qkv.dtype)  # a view, and the projection's precision
        return self.proj_drop(self._packed_proj(out) if packed else self.proj(out))

    @torch.jit.unused
    def chunked_residual(self, x, norm, into=None):  # unannotated: TorchScript reads Tensors (never calls it)
        """Inference route for ``x + self(norm(x))`` (``norm`` a module), or ``self(x)`` when ``norm`` is None.

        Two passes over chunks of tokens. Pass 1 norms a chunk, projects its keys and values and adds them into the
        ``d × (d + 1)`` state; pass 2 norms each chunk again, projects its queries, turns φ(q) into output tokens,
        projects them and adds the residual. The normed map, the full qkv, φ(q), keys and values never exist: the
        working set is the output plus one cache-sized chunk (keeping φ(q) between the passes would cost a fresh
        map-sized tensor per call, whose page faults outweigh normalising every token twice). The projections are
        the rows of ``qkv`` for keys and values in pass 1 and for queries in pass 2: the same matrix multiplies as
        one ``qkv``, split. Values match the plain form up to the order of the fp32 sums over chunks. Returns None
        when the map is too small to be worth splitting.

        ``into``: where to write the result, e.g. ``x`` itself (each chunk reads the tokens it writes and no others,
        and pass 1 reads before pass 2 writes); used when it is contiguous, of ``x``'s shape and the result's
        dtype, else a new tensor is returned.
        """
        B, H, W, C = x.shape
        N = H * W
        n = chunk_rows(3 * C, B * N, device=x.device) // B  # tokens of each image per chunk
        if n == 0 or self.temperature_placement == 'key':
            return None
        heads, d = self.num_heads, self.head_dim
        tokens = x.reshape(B, N, C)
        dev = x.device

        def normed(start):
            chunk = tokens[:, start:start + n]
            return norm(chunk) if norm is not None else chunk.contiguous()

        kv = z = None
        for start in range(0, N, n):
            kv_proj = linear_inference(self.qkv, normed(start), rows=(C, 3 * C))  # B, n, 2C
            acc = _accum_dtype(kv_proj.dtype)
            if kv is None:
                kv = torch.zeros((B, heads, d, d), dtype=acc, device=dev)
                z = torch.zeros((B, heads, d), dtype=acc, device=dev)
            k, v = kv_proj.view(B, -1, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
            k = _heads_major(k, acc, relu=True)
            v = _heads_major(v, acc, relu=False)
            with _autocast_disabled(dev.type):
                kv.add_(torch.matmul(k.transpose(-2, -1), v))
                z.add_(k.sum(dim=-2))
        with _autocast_disabled(dev.type):
            state = torch.cat([kv * self.temperature.to(kv.dtype), z.unsqueeze(-1)], dim=-1)  # B, heads, d, d + 1
        out = None
        for start in range(0, N, n):
            src = tokens[:, start:start + n]
            q_proj = linear_inference(self.qkv, normed(start), rows=(0, C))  # B, n, C
            q = _heads_major(q_proj.view(B, -1, heads, d).transpose(1, 2), acc, relu=True)
            with _autocast_disabled(dev.type):
                num_den = torch.matmul(q, state)
                a = torch.empty((B, num_den.shape[2], heads, d), dtype=num_den.dtype, device=dev)
                torch.div(num_den[..., :d], num_den[..., d:].clamp_min(self.clamp_min), out=a.transpose(1, 2))
            y = self.proj_drop(linear_inference(self.proj, a.view(B, -1, C).to(q_proj.dtype)))
            if out is None:  # the dtype the plain form would give (autocast: the residual's promotion)
                dtype = torch.result_type(src, y) if norm is not None else y.dtype
                out = result_buffer(into, x, dtype).view(B, N, C)
            if norm is not None:
                torch.add(src, y, out=out[:, start:start + n])
            else:
                out[:, start:start + n] = y
        return out.view(B, H, W, C)

    def attention_weights(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """The mixing rows ``(B, heads, Q, N)`` of the given flat query tokens (None: all N), query-key first.

        ``τ · φ(q_n)·φ(k_m) / max(Σ_m' φ(q_n)·φ(k_m'), clamp_min)`` with τ on the output (``'output'``, ``'fixed'``);
        with ``temperature='key'`` the keys are ``τ·φ(k)`` (as the mixer scales them before ``k_probe``) and no
        factor multiplies the rows. ``rows @ v`` per head, through ``proj``, is the mixer's output. Rows are
        non-negative; they sum to τ (or 1), less where the clamp is active.

        Args:
            x: The mixer's input ``(B, H, W, C)``.
            queries: 1-D integer tensor of row-major token indices, or None for every token.
        """
        B, H, W, C = x.shape
        N = H * W
        idx = query_index(queries, N, x.device)
        q, k, _ = split_heads(self.qkv(x.reshape(B, N, C)), self.num_heads)
        temperature = self.temperature.to(q.dtype)
        if self.temperature_placement == 'key':
            k = k * temperature
            temperature = torch.ones_like(temperature)
        scores = q[:, :, idx] @ k.transpose(-2, -1)  # B, heads, Q, N
        return temperature * scores / scores.sum(dim=-1, keepdim=True).clamp(min=self.clamp_min)
