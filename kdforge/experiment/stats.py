"""Paired deltas, their 95% t-interval and the verdict on a paper's claimed direction."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["paired_summary", "t_interval", "verdict"]


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean (None for fewer than two values)."""
    n = len(values)
    if n < 2:
        return None
    from scipy import stats

    mean = statistics.fmean(values)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def verdict(ci: tuple[float, float] | None, claimed_direction: str) -> str:
    """`holds` when the interval lies on the claimed side of 0, `reversed` on the other, else `inconclusive`."""
    if ci is None:
        return "inconclusive"
    low, high = ci
    if claimed_direction == "lower":
        low, high = -high, -low
    if low > 0:
        return "holds"
    if high < 0:
        return "reversed"
    return "inconclusive"


def paired_summary(seeds: Sequence[int], baseline: dict[int, float], method: dict[int, float],
                   claimed_direction: str) -> dict[str, Any]:
    """Per-seed values of both arms (seeds where both finished), paired deltas, mean, CI95, verdict."""
    paired = [s for s in seeds if s in baseline and s in method]
    deltas = [method[s] - baseline[s] for s in paired]
    ci = t_interval(deltas)
    return {
        "seeds": list(paired),
        "baseline_values": [baseline[s] for s in paired],
        "method_values": [method[s] for s in paired],
        "paired_deltas": deltas,
        "mean_delta": statistics.fmean(deltas) if deltas else None,
        "ci95": list(ci) if ci is not None else None,
        "verdict": verdict(ci, claimed_direction),
    }
