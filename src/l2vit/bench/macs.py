"""Count multiply-accumulates (MACs) of any model, attention matmuls included, with a per-module breakdown.

Counting runs the model once under ``torch.utils.flop_counter.FlopCounterMode``, which records every matmul and
convolution the model really executes (so padded windows count as computed) and attributes it to the module that
ran it. That mode counts 2 FLOPs per MAC; we report MACs, the unit of the paper's and the official README's
"FLOPs" column. PyTorch's counter has no formula for the CPU kernel behind ``F.scaled_dot_product_attention``, so we
add it (two matmuls: q·kᵀ and attn·v). Element-wise work (norms, activations, softmax, additions, the linear
attention's clamp and division) is not counted, which is also the convention of the official counter for the
attention matmuls; it counts norms and activations as well, so its totals run ~0.5% above ours.

The model can live on the ``meta`` device: shapes are all the counter needs, so even the largest model is counted
in well under a second.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['MacReport', 'count_macs']


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # q: (B, h, Nq, d), k: (B, h, Nk, d), v: (B, h, Nk, dv): q·kᵀ and attn·v, 2 FLOPs per MAC
    b = math.prod(query_shape[:-2])
    nq, d = query_shape[-2:]
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * nq * nk * d + 2 * b * nq * nk * dv


_CUSTOM_FORMULAS = {}
if hasattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu'):
    _CUSTOM_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops


@dataclass
class MacReport:
    """MACs of one forward pass.

    Attributes:
        total: MACs of the whole forward pass.
        by_module: MACs per module name (``'stem'``, ``'stages.0'``, ``'stages.0.blocks.1.attn'``, ...), every
            level of the hierarchy up to the counting depth; children are included in their parents.
        input_shape: The input shape counted, batch included.
    """
    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()

    @property
    def per_stage(self) -> dict[str, int]:
        """MACs of the top-level children, with ``stages`` split into ``stages.0``, ``stages.1``, ..."""
        out = {}
        for name, macs in self.by_module.items():
            parts = name.split('.')
            if len(parts) == 1 and name != 'stages':
                out[name] = macs
            elif len(parts) == 2 and parts[0] == 'stages':
                out[name] = macs
        return out

    def format(self) -> str:
        """Human-readable per-stage table."""
        lines = [f'{"module":<12}{"GMACs":>10}{"share":>8}']
        for name, macs in self.per_stage.items():
            lines.append(f'{name:<12}{macs / 1e9:>10.3f}{100 * macs / max(self.total, 1):>7.1f}%')
        lines.append(f'{"total":<12}{self.total / 1e9:>10.3f}')
        return '\n'.join(lines)


@torch.no_grad()
def count_macs(
        model: nn.Module,
        input_size: tuple[int, int, int] = (3, 224, 224),
        batch_size: int = 1,
        depth: int = 6,
) -> MacReport:
    """Count the MACs of ``model`` on a ``(batch_size, *input_size)`` input.

    Args:
        model: Any module taking an image batch; put it on ``meta`` to count without computing.
        input_size: ``(C, H, W)``.
        batch_size: Batch size; MACs scale linearly with it.
        depth: How deep the per-module breakdown goes (module nesting levels).

    Returns:
        A :class:`MacReport`; ``report.total`` is the number of multiply-accumulates.
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((batch_size, *input_size), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, depth=depth, custom_mapping=_CUSTOM_FORMULAS) as counter:
            model(x)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    by_module = {}
    for name, ops in counts.items():
        if name.startswith(root + '.'):
            by_module[name[len(root) + 1:]] = sum(ops.values()) // 2
    return MacReport(total=counter.get_total_flops() // 2, by_module=by_module, input_shape=tuple(x.shape))
