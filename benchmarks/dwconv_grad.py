"""Weight gradient of the LCM's depth-wise convolutions on the CPU: oneDNN (``torch.nn.grad.conv2d_weight``)
against l2vit's kernel (``l2vit.layers.depthwise_weight_grad``), the two alternating in one process, with the
error of each against a float64 reference. Prints the table of docs/performance.md ("Training on CPU").

    .venv/bin/python benchmarks/dwconv_grad.py [--batch 16] [--threads 2] [--kernel-size 7] [--reps 9]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from l2vit.bench.timing import time_interleaved
from l2vit.layers import depthwise_weight_grad

# the LCM's stages in l2vit_tiny at 224²: (channels, side)
SHAPES = ((96, 56), (192, 28), (384, 14), (768, 7))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--kernel-size', type=int, default=7)
    parser.add_argument('--reps', type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = args.kernel_size
    print(f'torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {k}x{k}, channels-last, '
          f'medians of {args.reps}')
    print(f'| {k}×{k} | oneDNN weight grad | l2vit weight grad | speed-up | oneDNN fwd+bwd | l2vit fwd+bwd | '
          f'max error vs float64 (rel. to max): oneDNN / l2vit |')
    print('|---|---|---|---|---|---|---|')
    torch.manual_seed(0)
    for c, side in SHAPES:
        x = torch.randn(args.batch, c, side, side).contiguous(memory_format=torch.channels_last)
        gy = torch.randn_like(x)
        conv = torch.nn.Conv2d(c, c, k, padding=k // 2, groups=c).to(memory_format=torch.channels_last)
        shape = tuple(conv.weight.shape)

        def onednn():
            return torch.nn.grad.conv2d_weight(x, shape, gy, padding=k // 2, groups=c)

        def ours():
            return depthwise_weight_grad(x, gy, k)

        xr = x.detach().clone().requires_grad_()

        def step(fast: bool):
            # one LCM-like convolution's forward + backward (input and weight gradient), as in training
            from l2vit.layers import depthwise_conv2d, fast_paths
            conv.zero_grad(set_to_none=True)
            xr.grad = None
            with fast_paths(fast):
                y = depthwise_conv2d(conv, xr)
            y.backward(gy)

        ours()  # builds / loads the kernels before timing
        s_dnn, s_ours, s_step_dnn, s_step_ours = time_interleaved(
            [onednn, ours, lambda: step(False), lambda: step(True)], warmup=2, min_reps=args.reps, min_time=0.0,
            max_reps=args.reps)
        ref = F.conv2d  # float64 reference through autograd of the plain convolution
        x64 = x.double()
        w64 = conv.weight.detach().double().requires_grad_()
        ref(x64, w64, None, padding=k // 2, groups=c).backward(gy.double())
        scale = w64.grad.abs().max()
        err = [((g.double() - w64.grad).abs().max() / scale).item() for g in (onednn(), ours())]
        print(f'| {c} ch, {side}² | {s_dnn.median * 1e3:.1f} ms | {s_ours.median * 1e3:.1f} ms | '
              f'{s_dnn.median / s_ours.median:.1f}× | {s_step_dnn.median * 1e3:.1f} ms | '
              f'{s_step_ours.median * 1e3:.1f} ms | {err[0]:.1e} / {err[1]:.1e} |', flush=True)


if __name__ == '__main__':
    main()
