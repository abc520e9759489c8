"""Pareto fronts of a sweep: quality against cost, every objective at once (no weighting)."""
from __future__ import annotations

import numpy as np


def pareto_mask(costs: np.ndarray, quality: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Which points are Pareto-optimal: no other point has every cost (``[N, C]``, lower is better)
    at most as large and a quality at least as good, with one of them strictly better. Equal points
    are all kept."""
    costs = np.asarray(costs, dtype=float).reshape(len(quality), -1)
    q = np.asarray(quality, dtype=float) * (1.0 if higher_is_better else -1.0)
    no_worse = (costs[None, :, :] <= costs[:, None, :]).all(-1) & (q[None, :] >= q[:, None])
    better = (costs[None, :, :] < costs[:, None, :]).any(-1) | (q[None, :] > q[:, None])
    dominated = (no_worse & better).any(axis=1)  # [i, j]: j dominates i
    return ~dominated
