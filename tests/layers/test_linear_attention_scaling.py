"""Linear attention at scale: no N×N tensor ever exists, and half precision stays finite and close to float64.

The audit records the shape of every tensor that any ATen op produces inside a whole LGA block (CPE, attention,
LCM, MLP), forward and backward, at N = 65,536 tokens; an N×N float32 matrix would be 16 GiB.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from l2vit.layers import LinearGlobalAttention, linear_attention
from l2vit.models.l2vit import L2ViTBlock

SIDE = 256  # 256 × 256 = 65,536 tokens


class ShapeAudit(TorchDispatchMode):
    """Records the shape of every tensor returned by an ATen op run under it."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _token_sized(shape: tuple[int, ...], threshold: int) -> int:
    return sum(1 for s in shape if s >= threshold)


@pytest.mark.parametrize('route', ['autograd', 'inference'])
def test_lga_block_never_forms_a_token_by_token_tensor(route):
    # 32 channels, so every channel-like dimension (C, 3C, 4C, d + 1) stays below the "token-sized" threshold of
    # 2 × side = 512, while the number of tokens, and any chunk of them, is above it
    block = L2ViTBlock(32, 1, mixer='linear').eval()
    x = torch.randn(1, SIDE, SIDE, 32, requires_grad=route == 'autograd')
    audit = ShapeAudit()
    with audit:
        if route == 'autograd':
            block(x).square().mean().backward()
        else:
            with torch.inference_mode():
                block(x)
    threshold = 2 * SIDE
    n_tokens = SIDE * SIDE
    assert len(audit.shapes) > 20
    assert max(max(shape, default=0) for _, shape in audit.shapes) >= n_tokens or route == 'inference'
    offenders = [(op, s) for op, s in audit.shapes if _token_sized(s, threshold) >= 2]
    assert not offenders, f'tensors with two token-sized dimensions: {offenders[:5]}'
    biggest = max(torch.Size(s).numel() for _, s in audit.shapes)
    assert biggest <= 4 * 32 * n_tokens  # nothing bigger than the MLP's hidden activation


def test_audit_catches_a_quadratic_form():
    """The audit would see the qk-first form, so its silence above means something."""
    q = torch.rand(1, 1, 1024, 8)
    audit = ShapeAudit()
    with audit:
        LinearGlobalAttention.reference(q, q, q, torch.tensor(1.0))
    assert any(_token_sized(s, 512) >= 2 for _, s in audit.shapes)


def _float64_reference(mixer: LinearGlobalAttention, x: torch.Tensor) -> tuple[torch.Tensor, LinearGlobalAttention]:
    """The same computation in float64 with a float64 copy of ``mixer`` (kv-first, written out)."""
    ref = LinearGlobalAttention(x.shape[-1], mixer.num_heads).double()
    ref.load_state_dict(mixer.state_dict())
    B, H, W, C = x.shape
    qkv = ref.qkv(x.double().reshape(B, H * W, C)).view(B, H * W, 3, mixer.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0].relu(), qkv[1].relu(), qkv[2]
    kv = k.transpose(-2, -1) @ v * ref.temperature
    den = (q @ k.sum(-2, keepdim=True).transpose(-2, -1)).clamp_min(ref.clamp_min)
    out = (q @ kv / den).transpose(1, 2).reshape(B, H, W, C)
    return ref.proj(out), ref


# stated error bounds (outputs: max-abs error relative to max |reference|; gradients: relative Frobenius error of
# the worst parameter). Measured (inputs ×1 / ×100): bf16 4.8e-3 / 7.2e-3 (outputs), 2.7e-2 / 2.8e-2 (gradients);
# fp16 6.6e-4 / 6.5e-4 and 9.0e-3 / 8.6e-3. The error is that of rounding the projections' inputs and outputs to 8
# (bf16) or 11 (fp16) significant bits; the attention core itself runs in fp32.
BOUNDS = {torch.bfloat16: (1.5e-2, 5e-2), torch.float16: (2e-3, 2e-2)}


@pytest.mark.parametrize('scale', [1.0, 100.0], ids=['x1', 'x100'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_half_precision_lga_at_65536_tokens(dtype, scale):
    torch.manual_seed(0)
    mixer = LinearGlobalAttention(64, 2)
    with torch.no_grad():
        mixer.temperature.uniform_(0.1, 0.5)
    x = torch.randn(1, SIDE, SIDE, 64) * scale
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ref, ref_mixer = _float64_reference(mixer, x)
    (ref * grad_out.double()).sum().backward()
    with torch.autocast('cpu', dtype=dtype):
        out = mixer(x)
    assert out.dtype == dtype
    (out.float() * grad_out).sum().backward()
    assert torch.isfinite(out).all()
    out_bound, grad_bound = BOUNDS[dtype]
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err <= out_bound, f'{dtype} output error {err:.2e} > {out_bound:.0e}'
    for (name, p), p64 in zip(mixer.named_parameters(), ref_mixer.parameters()):
        assert torch.isfinite(p.grad).all(), name
        gerr = (p.grad.double() - p64.grad).norm() / p64.grad.norm()
        assert gerr <= grad_bound, f'{dtype} gradient of {name}: error {gerr:.2e} > {grad_bound:.0e}'
    with torch.inference_mode(), torch.autocast('cpu', dtype=dtype):  # the chunked inference route
        fast = mixer(x)
    assert (fast.double() - ref.detach()).abs().max() / ref.abs().max() <= out_bound


def test_half_inputs_use_an_fp32_core():
    """fp16/bf16 q, k, v give exactly the fp32 core's result on the same values, rounded once at the end: the key
    sum and kᵀv are accumulated and kept in fp32, and the clamp bounds the fp32 denominator at 100."""
    torch.manual_seed(0)
    q, k, v = (torch.rand(1, 2, 4096, 16) * 40 for _ in range(3))
    t = torch.tensor([0.2, 0.3]).view(2, 1, 1)
    assert not torch.isfinite(k.half().sum(dim=-2)).all()  # a half-precision key sum would overflow here
    for dtype in (torch.float16, torch.bfloat16):
        qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
        out = linear_attention(qh, kh, vh, t)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out, linear_attention(qh.float(), kh.float(), vh.float(), t).to(dtype),
                                   rtol=0, atol=0)
        with torch.autocast('cpu', dtype=dtype):  # autocast does not push the core back into half precision
            torch.testing.assert_close(linear_attention(qh, kh, vh, t), out, rtol=0, atol=0)
    small = torch.full((1, 1, 8, 4), 0.1)  # φ(q)·Σφ(k) = 0.32 < 100: clamped
    torch.testing.assert_close(linear_attention(small.bfloat16(), small.bfloat16(), small.bfloat16(),
                                                torch.tensor(1.0)).float(), small * 0.32 / 100, rtol=1e-2, atol=0)
