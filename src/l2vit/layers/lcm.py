"""Local Concentration Module (LCM), L²ViT's fix for the dispersed attention of linear attention (spec §2.8)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._fastpath import activation, can_overwrite, frozen_bn_affine, result_buffer, unobserved
from .dwconv import depthwise_conv2d, is_same_depthwise

__all__ = ['LocalConcentration']

# Target size of one band of the map in the banded inference route (rows of an image, or whole images): the band's
# normed input, hidden map and output are each about this big, so they stay in the outer caches and are reused
# by the C library's heap from band to band.
BAND_BYTES = 2 ** 23


class LocalConcentration(nn.Module):
    """DWConv k×k → GELU → BatchNorm2d → DWConv k×k on ``(B, H, W, C)`` tokens (no residual; the block adds it).

    The order is the official one: activation *before* the BatchNorm, nothing after the second convolution.
    Parameter names (``conv1``, ``bn``, ``conv2``) follow the official ``local_mp`` module.

    Args:
        dim: Channels.
        kernel_size: Depth-wise kernel size (7 in every released model).
        act_layer: Activation (exact-erf GELU in the official code).
    """

    def __init__(
            self,
            dim: int,
            kernel_size: int = 7,
            act_layer: type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim, bias=True, **dd)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim, **dd)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim, bias=True, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # B, C, H, W as a channels_last view: no copy either way
        if torch.jit.is_scripting():
            x = self.conv2(self.bn(self.act(self.conv1(x))))
        else:
            x = depthwise_conv2d(self.conv2, self._act_bn(depthwise_conv2d(self.conv1, x)))
        return x.permute(0, 2, 3, 1)

    @torch.jit.unused
    def _act_bn(self, x):  # unannotated: TorchScript reads Tensor -> Tensor (and never calls it)
        x = activation(self.act, x, self.conv1)
        if not (can_overwrite(x, self.act) and unobserved(self.bn)):  # False while FX traces: no buffer is read
            return self.bn(x)
        bn = frozen_bn_affine(self.bn)
        if bn is None:
            return self.bn(x)
        # inference: the frozen BatchNorm as one in-place multiply-add (it cannot fold into conv2: the zero padding
        # of conv2 applies after the norm)
        scale, shift = (t.to(x.dtype).view(-1, 1, 1) for t in bn)
        return torch.addcmul(shift, x, scale, out=x)

    @torch.jit.unused
    def chunked_residual(self, x, norm, into=None):  # unannotated: TorchScript reads Tensors (never calls it)
        """Inference route for ``x + self(norm(x))`` on ``(B, H, W, C)`` tokens, over bands of rows (or groups of
        images); None when the map is too small to be worth splitting or the convolutions are not the standard
        stride-1, zero-padded "same" ones. The caller checks that nothing observes or differentiates it.

        Each band of output rows needs the normed input ``2p`` rows beyond it on each side (``p = k // 2``, two
        convolutions) and the hidden map ``p`` rows beyond it; each convolution computes exactly the rows needed,
        with zero rows added only at the image's own top and bottom edges. A band's result is written once the next
        band has normed its rows (the few rows they share are normed by both), so the result may overwrite ``x``.
        The normed map, the hidden map and the LCM's output never exist at full size: the peak is the input and the
        result plus a few bands, and every output pixel is computed from the same inputs as in the plain form.

        ``into``: where to write the result, e.g. ``x`` itself; used when it is contiguous, of ``x``'s shape and the
        result's dtype, else a new tensor is returned.
        """
        convs = (self.conv1, self.conv2)
        if x.device.type != 'cpu' or x.dim() != 4 or not all(is_same_depthwise(c, x.shape[-1]) for c in convs):
            return None
        B, H, W, C = x.shape
        image_bytes = H * W * C * x.element_size()
        if B * image_bytes <= BAND_BYTES:
            return None
        p = self.conv1.kernel_size[0] // 2
        q = self.conv2.kernel_size[0] // 2
        if image_bytes > BAND_BYTES:  # bands of rows of one image at a time
            images = 1
            rows = max(p + q, BAND_BYTES // (W * C * x.element_size()))  # >= p + q: see the pending write
        else:  # groups of whole images
            images = max(1, BAND_BYTES // image_bytes)
            rows = H
        out = None
        pending = None  # write() arguments of the band not written yet: (first image, first row, end row, x rows, y)

        def write(b0, r0, r1, src, y):
            nonlocal out
            if out is None:  # the dtype the plain form would give (autocast: the residual's promotion)
                out = result_buffer(into, x, torch.result_type(src, y))
            torch.add(src, y, out=out[b0:b0 + images, r0:r1])

        for b0 in range(0, B, images):
            xb = x[b0:b0 + images]
            for r0 in range(0, H, rows):
                r1 = min(H, r0 + rows)
                t_lo, t_hi = max(0, r0 - q), min(H, r1 + q)  # hidden rows this band needs
                n_lo, n_hi = max(0, t_lo - p), min(H, t_hi + p)  # normed rows they need
                normed = norm(xb[:, n_lo:n_hi])
                if pending is not None:  # the previous band's rows are no longer read
                    write(*pending)
                t = _conv_rows(self.conv1, normed, pad_top=n_lo - (t_lo - p), pad_bottom=t_hi + p - n_hi)
                t = self._act_bn(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
                y = _conv_rows(self.conv2, t, pad_top=t_lo - (r0 - q), pad_bottom=r1 + q - t_hi)
                pending = (b0, r0, r1, xb[:, r0:r1], y)
        write(*pending)
        return out


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor, pad_top: int, pad_bottom: int) -> torch.Tensor:
    """``conv`` over the rows of an NHWC band ``x`` (``(B, h, W, C)``) as if ``pad_top`` / ``pad_bottom`` zero rows
    were added (the image's own edges) and there were no other vertical padding: ``h + pad_top + pad_bottom - (k -
    1)`` rows. The convolution pads both sides by the larger of the two and the extra rows are cut off (a view), so
    no padded copy of the band is made."""
    pad = max(pad_top, pad_bottom)
    y = F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=(pad, conv.padding[1]), groups=conv.groups)
    rows = x.shape[1] + pad_top + pad_bottom - (conv.kernel_size[0] - 1)
    return y.permute(0, 2, 3, 1)[:, pad - pad_top:pad - pad_top + rows]
