"""The simulator's pinned GPUs: each at the level the plan gives it, batches per level.

Drives the policy core (planner, router, admission, dispatcher) on the event loop of
``events.py`` and models each worker by the profile's batch latency.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from promptserve.policy import Demand, Policy
from promptserve.policy.planning import apply_levels, switch_s, wants_plan
from promptserve.policy.types import Dispatch
from promptserve.sim.events import DONE, WAKE, EventRun, SimInputs, initial_demand


class PinnedRun(EventRun):
    def __init__(
        self, policy: Policy, inputs: SimInputs, on_progress: Callable[[int], None] | None
    ) -> None:
        super().__init__(policy, inputs, on_progress)
        self.dispatcher = self.sched.dispatcher
        self.planned_for: Demand | None = None
        self.switch_s = switch_s(policy, inputs.setting.profiles[0])

    def _first_plan(self, start: float) -> None:
        reqs = self.inputs.requests
        self._replan(start, initial_demand(reqs, self.levels) if reqs else Demand(0.0, (1.0,)))

    def _replan(self, now: float, demand: Demand) -> None:
        if not wants_plan(self.policy, self.planned_for, demand, force=False):
            return  # the same demand gives the same plan
        self.planned_for = demand
        current = [g.level for g in self.dispatcher.gpus]
        t0 = time.perf_counter()
        plan = self.policy.plan(demand, self.inputs.setting, current)
        self.planner_ms.append((time.perf_counter() - t0) * 1e3)
        self.sched.plan = plan
        self.plans.append((now, plan))
        for ready_at in apply_levels(self.dispatcher, now, plan.gpu_levels, self.switch_s):
            self.push(ready_at, WAKE, None)

    def _done(self, now: float, payload: object) -> None:
        dispatch: Dispatch = payload  # type: ignore[assignment]
        for outcome in self.dispatcher.on_batch_done(now, dispatch):
            self._served(now, outcome)

    def _after_event(self, now: float) -> None:
        dispatches, outcomes = self.dispatcher.step(now)
        for d in dispatches:
            self.push(d.end_s, DONE, d)
        for o in outcomes:
            self._end(o)

    def _next_finish(self) -> float:
        return min((g.busy_until for g in self.dispatcher.gpus if g.running), default=float("inf"))
