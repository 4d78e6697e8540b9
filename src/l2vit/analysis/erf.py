"""Effective receptive fields (ERF): how strongly each input position drives one central output unit.

Following Luo et al. (NeurIPS 2016), the ERF of an output unit is the gradient of that unit with respect to the
input. Here the unit is the central spatial position of the output with all its channels (a gradient of 1 is sent
back from each channel of the centre, none from elsewhere); the ERF map is ``|∂ out_centre / ∂ input|`` summed over
input channels and averaged over images. Area statistics follow RepLKNet (CVPR 2022): the smallest centred square
that holds a given fraction of the total.

The L²ViT question is what the Local Concentration Module does to the receptive field of an LGA block: compare
``block_erf(..., with_lcm=True)`` with ``with_lcm=False`` (the same weights with the LCM branch removed) or with a
model trained without LCMs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .capture import capture_module_inputs, eval_mode

__all__ = [
    'effective_receptive_field', 'block_erf', 'image_erf', 'erf_statistics', 'lcm_disabled', 'DEFAULT_ERF_FRACTIONS',
]

DEFAULT_ERF_FRACTIONS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)


def effective_receptive_field(
        fn: Callable[[torch.Tensor], torch.Tensor],
        inputs: torch.Tensor,
        channels_last: bool = False,
        exclude_identity: bool = False,
        center: tuple[int, int] | None = None,
) -> torch.Tensor:
    """ERF map ``(H_in, W_in)`` of ``fn`` at one output position, averaged over the batch.

    Images must be independent under ``fn`` (eval-mode BatchNorm, no batch statistics), so that the gradient of the
    batch-summed unit gives each image its own gradient.

    Args:
        fn: Maps ``inputs`` to a spatial output of the same layout (``(B, C, H, W)``, or ``(B, H, W, C)`` with
            ``channels_last``).
        inputs: Input batch; not modified.
        channels_last: Layout of ``inputs`` and of the output.
        exclude_identity: Measure ``fn(x) - x`` (residual branches only; the output must have the input's shape).
            A residual block's identity path otherwise puts a spike of 1 per channel at the centre.
        center: Output position ``(row, col)`` (default: ``(H_out // 2, W_out // 2)``).
    """
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        if exclude_identity:
            if y.shape != x.shape:
                raise ValueError(f'exclude_identity needs an output of the input\'s shape {tuple(x.shape)}, got '
                                 f'{tuple(y.shape)}')
            y = y - x
        h_dim, w_dim = (1, 2) if channels_last else (2, 3)
        r, c = center if center is not None else (y.shape[h_dim] // 2, y.shape[w_dim] // 2)
        unit = y[:, r, c, :] if channels_last else y[:, :, r, c]
        (grad,) = torch.autograd.grad(unit.sum(), x)
    return grad.abs().sum(dim=-1 if channels_last else 1).mean(0)


@contextmanager
def lcm_disabled(block: nn.Module) -> Iterator[nn.Module]:
    """Within the context, ``block``'s Local Concentration Module branch contributes nothing.

    The block adds ``local_mp(norm3(x))`` to its residual stream; its ``local_mp`` is replaced by a module that
    returns zeros, which is exactly the block without the LCM, with every other weight unchanged.
    """
    lcm = getattr(block, 'local_mp', None)
    if lcm is None:
        raise ValueError(f'{type(block).__name__} has no Local Concentration Module (local_mp) to disable')
    block.local_mp = _ZeroBranch()
    try:
        yield block
    finally:
        block.local_mp = lcm


class _ZeroBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def block_erf(
        model: nn.Module,
        images: torch.Tensor,
        block: str,
        with_lcm: bool = True,
        exclude_identity: bool = True,
        block_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """ERF ``(H, W)`` of one block on its own token grid, for the tokens it receives from ``images``.

    Args:
        model: The model (run in eval mode).
        images: Image batch ``(B, C, H, W)``, normalised as the model expects.
        block: Block name, e.g. ``'stages.1.blocks.1'``.
        with_lcm: False removes the block's LCM branch (see :func:`lcm_disabled`); the block must have one.
        exclude_identity: Measure the block's residual branches only (``block(x) - x``).
        block_input: The block's input for ``images`` when already captured (e.g.
            :attr:`AttentionInput.block_input`), which saves a forward pass.
    """
    module = model.get_submodule(block)
    tokens = block_input if block_input is not None else capture_module_inputs(model, images, [block])[block]
    with eval_mode(model), (nullcontext() if with_lcm else lcm_disabled(module)):
        return effective_receptive_field(module, tokens, channels_last=True, exclude_identity=exclude_identity)


def image_erf(model: nn.Module, images: torch.Tensor, stage: int = -1) -> torch.Tensor:
    """ERF ``(H, W)`` in input pixels of the central unit of a stage's output (``forward_intermediates``)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        return model.forward_intermediates(x, indices=[stage], intermediates_only=True, stop_early=True)[0]

    with eval_mode(model):
        return effective_receptive_field(fn, images)


def erf_statistics(
        erf: torch.Tensor,
        fractions: Sequence[float] = DEFAULT_ERF_FRACTIONS,
        center: tuple[float, float] | None = None,
        cell_size: float = 1.,
) -> dict:
    """Summary numbers of an ERF map.

    Args:
        erf: Non-negative map ``(H, W)``.
        fractions: For each ``t``, the smallest square centred on ``center`` holding ``t`` of the total.
        center: Centre ``(row, col)`` in map cells (default: ``(H // 2, W // 2)``, the unit of
            :func:`effective_receptive_field` when input and output grids coincide).
        cell_size: Input pixels per map cell (the stride of a token grid), for distances in pixels.

    Returns:
        ``{'side': {t: side in cells}, 'area_ratio': {t: square area / map area}, 'mean_distance_px': ...,
        'center_fraction': ...}``. The square is clipped to the map; ``area_ratio`` uses the clipped area.
    """
    if erf.dim() != 2:
        raise ValueError(f'expected an ERF map (H, W), got shape {tuple(erf.shape)}')
    erf = erf.detach().double()
    H, W = erf.shape
    total = float(erf.sum())
    cy, cx = center if center is not None else (H // 2, W // 2)
    ys = torch.arange(H, dtype=torch.float64, device=erf.device)[:, None]
    xs = torch.arange(W, dtype=torch.float64, device=erf.device)[None, :]
    # Chebyshev ring index: square of half-side r holds the cells with ring <= r
    ring = torch.maximum((ys - cy).abs(), (xs - cx).abs()).round().long()
    mass = torch.bincount(ring.flatten(), weights=erf.flatten()).cumsum(0)
    area = torch.bincount(ring.flatten()).cumsum(0).double()
    out = {'side': {}, 'area_ratio': {}}
    for t in fractions:
        if not 0. < t <= 1.:
            raise ValueError(f'fractions must lie in (0, 1], got {t}')
        # first ring whose cumulative mass reaches t of the total (a hair under it, against rounding)
        target = torch.tensor([t * total * (1 - 1e-9)], dtype=torch.float64, device=erf.device)
        r = min(int(torch.searchsorted(mass, target)[0]), mass.numel() - 1) if total > 0 else 0
        out['side'][float(t)] = 2 * r + 1
        out['area_ratio'][float(t)] = float(area[r] / (H * W))
    dist = ((ys - cy).square() + (xs - cx).square()).sqrt() * cell_size
    out['mean_distance_px'] = float((erf * dist).sum() / total) if total > 0 else 0.
    out['center_fraction'] = float(erf[int(round(cy)), int(round(cx))] / total) if total > 0 else 0.
    return out
