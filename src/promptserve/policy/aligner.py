"""Argus's micro level: the distribution aligner.

Given capacity f[K] per level (from the allocation) and demand h[K] per K_opt class, walk K
from high to low. Demand waiting at K (its own class plus what was pushed down from above)
takes K's capacity first; what is left over moves down one level (more steps: no quality
loss). Capacity still spare at K is filled from the classes below, nearest first (those
prompts are served above their K_opt and lose quality). The flows give P(K_opt -> K').
Whatever no level can take (overload) is spread over the levels in proportion to capacity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def align(capacity: Sequence[float], demand: Sequence[float]) -> np.ndarray:
    """Row-stochastic P[k_opt index][level index] (levels ascending in K)."""
    m = len(capacity)
    flow = np.zeros((m, m))
    own = np.asarray(demand, dtype=float).copy()
    pushed = np.zeros(m)  # demand pushed down into a level, by source class
    for k in range(m - 1, -1, -1):
        cap = float(capacity[k])
        waiting = pushed.copy()
        waiting[k] += own[k]
        own[k] = 0.0
        total = waiting.sum()
        served = min(cap, total)
        if total > 0:
            flow[:, k] += waiting * (served / total)
        leftover = waiting * (1.0 - served / total) if total > 0 else np.zeros(m)
        cap -= served
        for j in range(k - 1, -1, -1):  # spare capacity: take from the nearest classes below
            if cap <= 0:
                break
            take = min(cap, own[j])
            flow[j, k] += take
            own[j] -= take
            cap -= take
        pushed = leftover if k > 0 else pushed
        if k == 0 and leftover.sum() > 0:  # overload: queue it where the capacity is
            share = np.asarray(capacity, dtype=float)
            share = share / share.sum() if share.sum() > 0 else np.full(m, 1.0 / m)
            flow += np.outer(leftover, share)
    rows = np.asarray(demand, dtype=float)
    out = np.zeros((m, m))
    for i in range(m):
        out[i] = flow[i] / rows[i] if rows[i] > 0 else np.eye(m)[i]
    return out
