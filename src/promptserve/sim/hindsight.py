"""A hindsight reference: the level of every request chosen knowing the whole trace, run
through the same step simulator as the online policies.

The oracle (``oracle.py``) bounds a point from above; this brackets it from below with a
schedule that is achievable: the simulator runs it, with promptserve-step's queue, admission
and deadline-checked joins, only the K each request joins at is fixed in advance
(``PlannedLevels``). The plan is found by local search on the trace (``search``): start from
the best of the online run's own levels and a few one-price plans, then move whole blocks of
requests, by arrival time, one level faster or slower, coarse blocks first, keeping a move
when the effective quality rises. Nothing online could see these moves coming; a policy
within a few tenths of this reference has little left to find at that point.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from promptserve.policy import Policy, Setting
from promptserve.policy.step import Levels, StepScheduler
from promptserve.policy.types import Job
from promptserve.sim.events import SimInputs
from promptserve.sim.simulator import simulate

BLOCKS_S = (120.0, 30.0, 10.0)  # the block lengths the search moves, coarse to fine
PRICES = (0.0, 0.05, 0.1, 0.2, 0.4, 1.0)  # one-price starts: q(K_opt, K) - price (N - K)
STARTS = 1 + len(PRICES)  # simulations before the first move: the online levels, each price


class PlannedLevels(Levels):
    """promptserve-step's levels with the K a request prefers fixed by a plan (a level index
    per request id); it still joins at a faster level where its preferred one would break a
    deadline (``choose_k``), and one without a neighbour runs at K = 0."""

    def __init__(self, *parts: object, plan: np.ndarray) -> None:
        super().__init__(*parts)  # type: ignore[arg-type]
        self.planned = plan  # a level index per request id

    def preferred_k(self, job: Job, at: float) -> int:
        return min(self.spec.levels[int(self.planned[job.id])], job.k_max)


@dataclass(frozen=True)
class PlannedPolicy(Policy):
    """A step-level policy whose scheduler follows ``plan`` (``PlannedLevels``)."""

    plan: np.ndarray = field(default_factory=lambda: np.zeros(0, int), compare=False)

    def step_scheduler(
        self, setting: Setting, levels: Callable[..., Levels] = Levels
    ) -> StepScheduler:
        return super().step_scheduler(setting, functools.partial(PlannedLevels, plan=self.plan))


@dataclass(frozen=True)
class Hindsight:
    effective_quality: float
    slo_violation_ratio: float
    plan: np.ndarray  # level index per request id
    simulations: int


def planned(base: Policy, plan: np.ndarray) -> PlannedPolicy:
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    return PlannedPolicy(**{**values, "name": f"hindsight({base.name})", "plan": plan})


def price_plan(
    k_opt_index: np.ndarray, quality: np.ndarray, levels: Sequence[int], n: int, price: float
) -> np.ndarray:
    """Every request at the level that maximises ``q(K_opt, K) - price (N - K)``."""
    value = quality - price * (n - np.asarray(levels, float))[None, :]
    return np.argmax(value, axis=1)[k_opt_index]


def search(
    base: Policy,
    inputs: SimInputs,
    budget: int = 150,
    on_progress: Callable[[int, float], None] | None = None,
) -> Hindsight:
    """The best plan found in ``budget`` simulations of the trace (module docstring). The
    online run of ``base`` itself is the first start, so the reference is never below it."""
    levels = inputs.setting.profiles[0].levels
    n_steps = inputs.setting.profiles[0].total_steps
    quality = np.asarray(inputs.setting.quality, float)
    online = simulate(base, inputs).records
    k_opt_index = np.searchsorted(levels, online.k_opt)
    served_at = np.searchsorted(levels, np.maximum(online.level, 0))
    runs = 0

    def score(plan: np.ndarray) -> tuple[float, float]:
        nonlocal runs
        runs += 1
        summary = simulate(planned(base, plan), inputs).records.summary([])
        if on_progress is not None:
            on_progress(runs, summary["effective_quality"])
        return summary["effective_quality"], summary["slo_violation_ratio"]

    # unserved requests start at the fastest level: they lacked the time, not the quality
    starts = [np.where(online.level >= 0, served_at, len(levels) - 1)]
    starts += [price_plan(k_opt_index, quality, levels, n_steps, p) for p in PRICES]
    scored = [(score(p), p) for p in starts]
    (best, viol), plan = max(scored, key=lambda s: s[0][0])
    arrival = online.arrival_s
    top = len(levels) - 1
    for block_s in BLOCKS_S:
        block = ((arrival - arrival.min()) // block_s).astype(int)
        for b in range(int(block.max()) + 1):
            if runs >= budget:
                break
            members = block == b
            for step in (1, -1):
                moved = plan.copy()
                moved[members] = np.clip(moved[members] + step, 0, top)
                if np.array_equal(moved, plan) or runs >= budget:
                    continue
                eq, v = score(moved)
                if eq > best + 1e-9:
                    best, viol, plan = eq, v, moved
                    break
    return Hindsight(best, viol, plan, runs)
