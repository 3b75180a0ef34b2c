"""Argus's macro level: choose a level per GPU and a load per GPU.

maximise  sum_g y_g * Q[x_g]
s.t.      sum_g y_g = min(L, capacity),  0 <= y_g <= T[x_g]

Identical GPUs make only the count per level matter: a MILP in n_l (integer GPUs at level l)
and y_l (load at l), solved to a zero gap. Argus solved a relaxation and rounded; this is the
exact optimum (the tests check it against enumeration of every level multiset).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from promptserve.policy.solver import maximise


def spare_to_fastest_level(
    counts: np.ndarray, loads: np.ndarray, throughput: np.ndarray
) -> np.ndarray:
    """Move GPUs that carry no planned load to the fastest level.

    Quality is decided by the loads alone, so this keeps the optimum and, among the
    allocations with that quality, leaves the most capacity for a burst (the planned load
    keeps the fewest GPUs it needs: ``ceil(load / throughput)`` per level).
    """
    need = np.where(throughput > 0, np.ceil(loads / np.maximum(throughput, 1e-12) - 1e-9), 0)
    need = np.minimum(np.maximum(need, 0), counts).astype(int)
    out = need.copy()
    out[int(np.argmax(throughput))] += int(counts.sum() - need.sum())
    return out


@dataclass(frozen=True)
class Allocation:
    counts: tuple[int, ...]  # GPUs per level
    load_qpm: tuple[float, ...]  # planned load per level
    objective: float  # sum of load x quality


def allocate(
    gpus: int, throughput: Sequence[float], quality: Sequence[float], load_qpm: float
) -> Allocation:
    """Exact optimum of the Argus allocation for ``gpus`` identical GPUs.

    ``throughput``: queries/minute per GPU at each level; ``quality``: each level's quality.
    """
    m = len(throughput)
    t = np.asarray(throughput, dtype=float)
    target = min(load_qpm, gpus * float(t.max()))
    # variables: n_0..n_{m-1}, y_0..y_{m-1}
    c = np.concatenate([np.zeros(m), np.asarray(quality, dtype=float)])
    a_ub = np.hstack([-np.diag(t), np.eye(m)])  # y_l - T_l n_l <= 0
    a_eq = np.vstack(
        [np.concatenate([np.ones(m), np.zeros(m)]), np.concatenate([np.zeros(m), np.ones(m)])]
    )
    sol = maximise(
        c, a_ub, np.zeros(m), a_eq, np.array([gpus, target]), np.r_[np.ones(m), np.zeros(m)]
    )
    loads = sol.x[m:]
    counts = spare_to_fastest_level(np.rint(sol.x[:m]).astype(int), loads, t)
    return Allocation(
        tuple(int(c) for c in counts), tuple(float(v) for v in loads), float(np.dot(loads, quality))
    )
