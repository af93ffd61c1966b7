"""Percentile summaries of measured values."""
from __future__ import annotations

import numpy as np

PERCENTILES = (50, 90, 99)


def summary(values: list[float], digits: int = 3, percentiles: tuple[int, ...] = PERCENTILES) -> dict:
    """{"n", "mean", "min", "max", "p50", "p90", "p99"} of `values` (the p-keys are `percentiles`);
    the statistics are None when there are no values (a level where every request failed)."""
    keys = ("mean", "min", "max", *(f"p{p}" for p in percentiles))
    if not values:
        return {"n": 0, **dict.fromkeys(keys)}
    data = np.asarray(values, dtype=np.float64)
    stats = [data.mean(), data.min(), data.max(), *np.percentile(data, percentiles)]
    return {"n": len(values), **{key: round(float(value), digits) for key, value in zip(keys, stats)}}
