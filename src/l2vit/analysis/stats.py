"""Summaries of repeated runs: mean and Student-t confidence interval over seeds."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ['MeanCI', 'mean_ci']


@dataclass(frozen=True)
class MeanCI:
    """Mean of ``n`` values with the half-width of its confidence interval (``nan`` when ``n < 2``)."""
    mean: float
    half_width: float
    n: int
    std: float

    def format(self, digits: int = 2) -> str:
        if math.isnan(self.mean):
            return 'n/a'
        if self.n < 2:
            return f'{self.mean:.{digits}f}'
        return f'{self.mean:.{digits}f} ± {self.half_width:.{digits}f}'


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Mean and the half-width of its two-sided Student-t interval: ``t_{(1+c)/2, n-1} · s / √n``.

    Non-finite values (a run that diverged) are kept: the mean becomes ``nan``, so a failure is never averaged away.
    With fewer than two values the half-width is ``nan``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f'confidence must be in (0, 1), got {confidence}')
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError('mean_ci needs at least one value')
    mean = sum(values) / n
    if n < 2:
        return MeanCI(mean, math.nan, n, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    from scipy.stats import t  # the analysis extra; only needed with two or more values
    return MeanCI(mean, float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n), n, std)
