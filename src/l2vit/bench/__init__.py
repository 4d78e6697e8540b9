"""Measurement tools: MAC counting, timing, peak memory, benchmark sweeps (models, or token mixers alone and in the
backbone), results files and plots, precision checks.

The command line is ``l2vit bench`` (:mod:`l2vit.cli.bench`); the pieces are usable on their own.
"""
from .env import environment
from .macs import MacReport, count_macs
from .memory import PeakMemory, measure_peak_memory
from .mixers import ScalingGuard, mixer_slopes, mixer_sweep, mixers_markdown, plot_mixers, resolve_mixers
from .precision import PrecisionReport, precision_check, sample_photos
from .report import fit_slope, markdown_tables, plot_scaling, read_results, write_results
from .runner import BenchConfig, run_config, run_sweep
from .targets import evaluate_targets, format_targets
from .timing import TimingStats, time_callable

__all__ = [
    'MacReport', 'count_macs', 'environment', 'PeakMemory', 'measure_peak_memory', 'PrecisionReport',
    'precision_check', 'sample_photos', 'fit_slope', 'markdown_tables', 'plot_scaling', 'read_results',
    'write_results', 'BenchConfig', 'run_config', 'run_sweep', 'evaluate_targets', 'format_targets', 'TimingStats',
    'time_callable', 'ScalingGuard', 'mixer_slopes', 'mixer_sweep', 'mixers_markdown', 'plot_mixers', 'resolve_mixers',
]
