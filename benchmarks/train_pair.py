"""Training-step throughput of l2vit_tiny (with and without l2vit's CPU kernels) and Swin-T, alternating in one
process, so drift between processes does not enter the ratios. 224², batch 16, forward + backward + AdamW, the
same workload as `l2vit bench --mode train`.

    .venv/bin/python benchmarks/train_pair.py [--rounds 6] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from l2vit.bench.runner import BenchConfig, _step_fn, _workload
from l2vit.layers import fast_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=6)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--batch', type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = {}
    for name in ('l2vit_tiny', 'swin_tiny_patch4_window7_224'):
        cfg = BenchConfig(model=name, height=224, width=224, batch=args.batch, mode='train')
        steps[name] = _step_fn(cfg, *_workload(cfg, torch.device('cpu')))

    def without_kernels():
        with fast_paths(False):  # the depth-wise route stands aside with the other fast paths
            return steps['l2vit_tiny']()

    runs = {'l2vit_tiny': steps['l2vit_tiny'], 'l2vit_tiny (no l2vit kernels)': without_kernels,
            'swin_tiny_patch4_window7_224': steps['swin_tiny_patch4_window7_224']}
    for step in runs.values():  # warm-up (and the kernel build on first use)
        step()
        step()
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, step in runs.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    swin = statistics.median(times['swin_tiny_patch4_window7_224'])
    print(f'torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.rounds} rounds')
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f'{name:32s} {args.batch / med:6.2f} images/s  {swin / med:5.3f}x Swin-T  '
              f'(steps {", ".join(f"{t:.2f}" for t in ts)} s)')


if __name__ == '__main__':
    main()
