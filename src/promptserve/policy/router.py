"""Route a request: sample its K_opt row of the plan, among levels that have GPUs."""

from __future__ import annotations

from promptserve.policy.types import Plan


def route(plan: Plan, k_opt: int, u: float) -> int:
    """The level for a request of class ``k_opt``; ``u`` is a uniform draw in [0, 1)."""
    row = plan.route[plan.levels.index(k_opt)]
    total = sum(row)
    acc = 0.0
    for k, p in zip(plan.levels, row, strict=True):
        acc += p / total
        if u < acc:
            return k
    return max((k for k, p in zip(plan.levels, row, strict=True) if p > 0), default=k_opt)
