"""Measurement tools: MAC counting (and, later, timing and memory)."""
from .macs import MacReport, count_macs

__all__ = ['MacReport', 'count_macs']
