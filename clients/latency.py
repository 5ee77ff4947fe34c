"""Latency percentiles, one definition for every report (benign user, load generator, bench)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 by the nearest-rank method (a value that was measured, never an interpolation),
    the max and the mean; empty when there are no values."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": ordered[-1],
        "mean": math.fsum(ordered) / len(ordered),
    }
