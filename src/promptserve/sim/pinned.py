"""The simulator's pinned GPUs: each at the level the plan gives it, batches per level.

Drives the policy core (planner, router, admission, dispatcher) on the event loop of
``events.py`` and models each worker by the profile's batch latency.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from promptserve.policy import Demand, Dispatcher, Outcome, Policy, Status
from promptserve.policy.intake import Routing
from promptserve.policy.planning import apply_levels, switch_s, wants_plan
from promptserve.policy.types import Dispatch
from promptserve.sim.events import DONE, WAKE, EventRun, SimInputs, initial_demand


class PinnedRun(EventRun):
    def __init__(
        self, policy: Policy, inputs: SimInputs, on_progress: Callable[[int], None] | None
    ) -> None:
        super().__init__(policy, inputs, on_progress)
        profiles = inputs.setting.profiles
        self.dispatcher = Dispatcher.create(profiles, policy.dispatch)
        self.routing = Routing(self.dispatcher, self.estimator, policy.admission, self.rng)
        self.planned_for: Demand | None = None
        self.switch_s = switch_s(policy, profiles[0])

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
        self.routing.plan = plan
        self.plans.append((now, plan))
        for ready_at in apply_levels(self.dispatcher, now, plan.gpu_levels, self.switch_s):
            self.push(ready_at, WAKE, None)

    def _arrive(self, now: float, i: int) -> None:
        k_opt, has_neighbour = self._classify(i)
        deadline = self.inputs.requests[i].deadline_s
        job, queued = self.routing.arrive(i, now, deadline, k_opt, has_neighbour)
        if not queued:
            self._end(Outcome(job, Status.REFUSED, now))

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

    def _pending(self) -> int:
        running = sum(1 for g in self.dispatcher.gpus if g.running is not None)
        return self.dispatcher.pending() + running

    def _next_finish(self) -> float:
        return min((g.busy_until for g in self.dispatcher.gpus if g.running), default=float("inf"))
