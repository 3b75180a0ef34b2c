"""The one place that talks to HiGHS (through scipy.optimize.milp), MIP gap 0.

A solve is capped at ``TIME_LIMIT_S``: the best solution found by then is used (the planner's
problems solve in milliseconds; the cap keeps a pathological one from stalling re-planning),
and no solution at all is an error the caller handles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

TIME_LIMIT_S = 5.0


@dataclass(frozen=True)
class Solution:
    x: np.ndarray
    objective: float  # of the maximisation


def maximise(
    c: np.ndarray,
    a_ub: np.ndarray | None,
    b_ub: np.ndarray | None,
    a_eq: np.ndarray | None,
    b_eq: np.ndarray | None,
    integer: np.ndarray,
    upper: np.ndarray | None = None,
) -> Solution:
    """max c.x s.t. a_ub x <= b_ub, a_eq x = b_eq, x >= 0, x[integer] integral."""
    constraints = []
    if a_ub is not None and len(a_ub):
        constraints.append(LinearConstraint(a_ub, -np.inf, b_ub))
    if a_eq is not None and len(a_eq):
        constraints.append(LinearConstraint(a_eq, b_eq, b_eq))
    bounds = Bounds(np.zeros(len(c)), upper if upper is not None else np.full(len(c), np.inf))
    res = milp(
        -c,
        constraints=constraints,
        integrality=integer.astype(int),
        bounds=bounds,
        options={"mip_rel_gap": 0.0, "time_limit": TIME_LIMIT_S},
    )
    if res.x is None:
        raise RuntimeError(f"planner problem has no solution: {res.message}")
    return Solution(np.asarray(res.x), float(-res.fun))
