"""An offline bound: the whole trace known in advance, solved as one LP over time windows.

Arrivals are counted per window w and K_opt class i. A request may be served at level l in
window w' from w to w + D (D = ceil(SLO / window): a relaxation of its deadline), at a cost of
c_l GPU-seconds: the cheapest per-image cost of any batch that fits the SLO. Each window has
G x window GPU-seconds. Every constraint is implied by the real ones (cost per image, GPU time
per window, no service before arrival nor after the deadline), so no real schedule beats it:

    effective quality bound = max sum q[i, l] x / N
    violation bound         = 1 - max sum x / N
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from promptserve.profile import Profile


def per_image_cost(profile: Profile, k: int, slo_s: float) -> float:
    """Fewest GPU-seconds per image at level K with a batch that fits the SLO (inf if none)."""
    costs = [
        profile.batch_latency(k, b) / b
        for b in range(1, profile.max_batch + 1)
        if profile.batch_latency(k, b) <= slo_s
    ]
    return min(costs) if costs else math.inf


def oracle_bounds(
    arrival_s: np.ndarray,
    k_opt: np.ndarray,
    profiles: Sequence[Profile],
    quality: np.ndarray,
    slo_s: float,
    window_s: float = 10.0,
) -> dict[str, float]:
    levels = profiles[0].levels
    m = len(levels)
    n = len(arrival_s)
    if n == 0:
        return {"effective_quality_upper_bound": 0.0, "slo_violation_ratio_lower_bound": 0.0}
    gpu_seconds = sum(1.0 for _ in profiles) * window_s  # GPUs x window
    cost = np.array([np.mean([per_image_cost(p, k, slo_s) for p in profiles]) for k in levels])
    usable = np.isfinite(cost)
    t0 = float(arrival_s.min())
    w_of = ((arrival_s - t0) // window_s).astype(int)
    windows = int(w_of.max()) + 1
    lag = int(math.ceil(slo_s / window_s))
    counts = np.zeros((windows, m))
    np.add.at(counts, (w_of, np.searchsorted(levels, k_opt)), 1)
    # variables x[w, i, l, d]: class i arrived in window w, served at level l in window w + d
    cells = [
        (w, i, lv, d)
        for w in range(windows)
        for i in range(m)
        if counts[w, i] > 0
        for lv in range(m)
        if usable[lv]
        for d in range(lag + 1)
    ]
    nv = len(cells)
    w_idx = np.array([c[0] for c in cells])
    i_idx = np.array([c[1] for c in cells])
    l_idx = np.array([c[2] for c in cells])
    d_idx = np.array([c[3] for c in cells])
    demand_row = w_idx * m + i_idx  # one row per (window, class)
    capacity_row = w_idx + d_idx  # one row per serving window
    rows = np.concatenate([demand_row, windows * m + capacity_row])
    vals = np.concatenate([np.ones(nv), cost[l_idx]])
    a = coo_matrix(
        (vals, (rows, np.concatenate([np.arange(nv)] * 2))), shape=(windows * m + windows + lag, nv)
    ).tocsr()
    b = np.concatenate([counts.ravel(), np.full(windows + lag, gpu_seconds)])
    q = quality[i_idx, l_idx]
    best_q = linprog(-q, A_ub=a, b_ub=b, bounds=(0, None), method="highs")
    best_n = linprog(-np.ones(nv), A_ub=a, b_ub=b, bounds=(0, None), method="highs")
    return {
        "effective_quality_upper_bound": round(float(-best_q.fun / n), 3),
        "slo_violation_ratio_lower_bound": round(max(float(1.0 + best_n.fun / n), 0.0), 4),
    }
