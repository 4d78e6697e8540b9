"""Training-step throughput of l2vit_tiny (with and without l2vit's CPU kernels and training routes: the depth-wise
weight gradient, the one-pass q/k/v gradient, the in-place CPE and stem ReLU) and Swin-T, alternating in one
process, so drift between processes does not enter the ratios. 224², batch 16, forward + backward + AdamW, the
same workload as `l2vit bench --mode train`.

    .venv/bin/python benchmarks/train_pair.py [--rounds 6] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

from l2vit.bench.runner import BenchConfig, _step_fn, _workload
from l2vit.bench.timing import time_interleaved
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
        with fast_paths(False):  # the depth-wise kernel and the training routes stand aside with the fast paths
            return steps['l2vit_tiny']()

    runs = {'l2vit_tiny': steps['l2vit_tiny'], 'l2vit_tiny (fast paths off)': without_kernels,
            'swin_tiny_patch4_window7_224': steps['swin_tiny_patch4_window7_224']}
    # two warm-up rounds (the first builds l2vit's kernels on first use), then rounds in rotating order
    stats = dict(zip(runs, time_interleaved(list(runs.values()), warmup=2, min_reps=args.rounds, min_time=0.0,
                                            max_reps=args.rounds)))
    swin = stats['swin_tiny_patch4_window7_224'].median
    print(f'torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.rounds} rounds')
    for name, st in stats.items():
        print(f'{name:32s} {args.batch / st.median:6.2f} images/s  {swin / st.median:5.3f}x Swin-T  '
              f'(IQR {st.q25:.2f}-{st.q75:.2f} s per step)')


if __name__ == '__main__':
    main()
