"""timm's MLP (``fc1 → act → fc2``) with an inference route that runs in place and over cache-sized chunks."""
from __future__ import annotations

import torch
from timm.layers import Mlp as _TimmMlp
from torch import nn

from ._fastpath import activation, chunk_rows, eager_inference, result_buffer
from .prepacked import linear_inference

__all__ = ['Mlp', 'mlp_residual_chunked']


class Mlp(_TimmMlp):
    """:class:`timm.layers.Mlp` (same arguments, submodules and state dict) whose activation overwrites the
    ``fc1`` output when nothing needs it (see :mod:`l2vit.layers._inplace`): one hidden-sized tensor less per block,
    which is the largest tensor of the block at high resolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._fused_inference(x):
            return linear_inference(self.fc2, linear_inference(self.fc1, x, gelu=True))
        x = self.fc1(x)
        x = self.act(x) if torch.jit.is_scripting() else self._act_in_place(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        return self.drop2(x)

    @torch.jit.unused
    def _fused_inference(self, x):  # unannotated: TorchScript takes Tensor -> bool
        """Whether ``fc2(GELU(fc1(x)))`` may run as two :func:`linear_inference` calls (exact GELU fused into the
        first): linear layers, exact GELU, nothing between them, in eager inference."""
        return (type(self.fc1) is nn.Linear and type(self.fc2) is nn.Linear and type(self.act) is nn.GELU
                and self.act.approximate == 'none' and isinstance(self.norm, nn.Identity)
                and eager_inference(x, self))

    @torch.jit.unused
    def _act_in_place(self, x):  # unannotated: TorchScript takes Tensor -> Tensor
        return activation(self.act, x, self.fc1)


def mlp_residual_chunked(x: torch.Tensor, norm: nn.Module, mlp: Mlp,
                         out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x + mlp(norm(x))`` for inference, computed over chunks of tokens; None when ``x`` is too small to split.

    The hidden activation (4× the width) then only ever exists one cache-sized chunk at a time: no page faults for a
    huge fresh tensor, no round trip of it through main memory, and a peak far below the plain form's. Each token is
    computed exactly as in the plain form (row-wise ops only), so the values are the same.

    ``out``: where to write the result (it may be ``x`` itself, whose rows are each read before they are written);
    used when it is a contiguous tensor of ``x``'s shape and dtype, else a new tensor is returned.
    """
    C = x.shape[-1]
    flat = x.reshape(-1, C)
    rows = chunk_rows(mlp.fc1.out_features, flat.shape[0], device=x.device)
    if not rows:
        return None
    out = result_buffer(out, x, x.dtype).view(flat.shape)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows]
        torch.add(chunk, mlp(norm(chunk)), out=out[start:start + rows])
    return out.view(x.shape)
