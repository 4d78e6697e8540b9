"""Repeated wall-clock timing with warm-up, device synchronisation and robust statistics."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

__all__ = ['TimingStats', 'time_callable', 'time_interleaved', 'synchronize']


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (CUDA kernels run asynchronously; the CPU needs nothing)."""
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@dataclass
class TimingStats:
    """Seconds per call over ``reps`` timed calls.

    Attributes:
        median: Median (the figure reported).
        q25: 25th percentile.
        q75: 75th percentile (``q75 - q25`` is the spread reported).
        min: Fastest call.
        max: Slowest call.
        reps: Number of timed calls.
        warmup: Number of untimed calls before them.
    """
    median: float
    q25: float
    q75: float
    min: float
    max: float
    reps: int
    warmup: int

    @classmethod
    def from_samples(cls, samples: list[float], warmup: int) -> TimingStats:
        if not samples:
            raise ValueError('no timing samples')
        s = sorted(samples)
        if len(s) > 1:
            q25, _, q75 = statistics.quantiles(s, n=4, method='inclusive')
        else:
            q25 = q75 = s[0]
        return cls(statistics.median(s), q25, q75, s[0], s[-1], len(s), warmup)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def time_callable(fn: Callable[[], object], device: torch.device | str = 'cpu', **settings) -> TimingStats:
    """Time ``fn()`` after ``warmup`` untimed calls: :func:`time_interleaved` of one function (same ``settings``:
    ``warmup``, ``min_reps``, ``min_time``, ``max_reps``, ``max_time``).

    Timed calls continue until at least ``min_reps`` calls *and* ``min_time`` seconds are done (but no more than
    ``max_reps`` calls, and no new call starts after ``max_time`` seconds once ``min_reps`` are done, so a slow
    configuration costs a bounded time). Each call is timed separately, with the device synchronised before the
    clock starts and before it stops.
    """
    return time_interleaved([fn], device, **settings)[0]


def time_interleaved(
        fns: Sequence[Callable[[], object]],
        device: torch.device | str = 'cpu',
        warmup: int = 2,
        min_reps: int = 5,
        min_time: float = 2.0,
        max_reps: int = 200,
        max_time: float | None = None,
) -> list[TimingStats]:
    """Time several callables in one process, alternating call by call, so that slow drift of the machine (other
    load, frequency, memory state) falls on all of them alike and their ratios carry less of it than timings from
    separate runs.

    Each round calls every function once, timed separately with the device synchronised around each call; the
    order rotates from round to round (round ``r`` starts with function ``r mod n``), so none always runs right
    after the same neighbour. Warm-up rounds come first. Rounds continue until every function has ``min_reps``
    calls *and* at least ``min_time`` seconds of them (but no more than ``max_reps`` rounds, and no new round once
    ``min_reps`` are done and the rounds so far took ``max_time`` seconds per function).

    Args:
        fns: The work to time (results are discarded).
        device: Device to synchronise.
        warmup: Untimed rounds first (kernel selection, caches, lazy initialisation).
        min_reps: Fewest timed calls of each function.
        min_time: Fewest seconds of timed calls of each function.
        max_reps: Most rounds.
        max_time: Mean seconds per function after which no new round starts (once ``min_reps`` are done).

    Returns:
        One :class:`TimingStats` per function, in the order of ``fns``.
    """
    if min_reps < 1:
        raise ValueError(f'min_reps must be >= 1, got {min_reps}')
    if not fns:
        raise ValueError('time_interleaved needs at least one function')
    n = len(fns)
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize(device)
    samples: list[list[float]] = [[] for _ in fns]
    max_time = math.inf if max_time is None else max_time
    rounds = 0

    def more() -> bool:
        if rounds >= max_reps:
            return False
        if rounds < min_reps:
            return True
        totals = [sum(s) for s in samples]
        return min(totals) < min_time and sum(totals) < max_time * n

    while more():
        for i in range(n):
            j = (rounds + i) % n
            synchronize(device)
            start = time.perf_counter()
            fns[j]()
            synchronize(device)
            samples[j].append(time.perf_counter() - start)
        rounds += 1
    return [TimingStats.from_samples(s, warmup) for s in samples]
