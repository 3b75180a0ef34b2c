"""The pinned family's scheduler: GPUs at the levels a plan gives them, one queue per level.

Both clocks route by the same plan, queue in the same dispatcher and draw the router's numbers
from the same seeded generator (one draw per arrival), so a run draws the same on both. Its
work is a whole batch (``BatchWork``); a re-plan solves for the GPUs that are up. The solve is
pure and may run off the driver's thread (``propose``, ``solve``, ``adopt``); ``replan`` is the
three in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from promptserve.policy.contract import Arrival, Ask, LoadSnapshot, Replan, Report, Schedule
from promptserve.policy.dispatcher import Dispatcher
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.intake import DELIVERY_MARGIN_S, edit_class, intake
from promptserve.policy.types import Demand, Job, Outcome, Plan, Setting, Status
from promptserve.profile import Profile


class Planner(Protocol):
    """What the pinned scheduler asks of its policy (``policies.Policy``)."""

    admission: bool

    def wants_plan(self, planned_for: Demand | None, demand: Demand, force: bool) -> bool: ...

    def switch_s(self, profile: Profile) -> float: ...

    def plan(
        self, demand: Demand, setting: Setting, current: Sequence[int | None] | None = None
    ) -> Plan: ...


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Proposal:
    """A plan to solve: for these GPUs (the ones up), from their current levels."""

    demand: Demand
    up: tuple[int, ...]
    setting: Setting
    current: tuple[int | None, ...]
    slow: bool = True  # a solver: a live driver runs it off its loop


class PinnedScheduler:
    stepwise = False

    def __init__(
        self,
        policy: Planner,
        setting: Setting,
        dispatcher: Dispatcher,
        estimator: LoadEstimator,
        rng: np.random.Generator,
    ) -> None:
        self.policy, self.setting, self.dispatcher, self.estimator, self.rng = (
            policy, setting, dispatcher, estimator, rng,
        )  # fmt: skip
        self.plan: Plan | None = None  # the first ``replan``'s, before any arrival
        self.planned_for: Demand | None = None  # the demand of the last plan
        self.switch_s = policy.switch_s(setting.profiles[0])  # a level change's cost

    # -- the contract (``policy.contract.Scheduler``) -------------------------------------------

    def intake(self, now: float, ask: Ask) -> Arrival:
        """Route by the plan (pinned GPUs run every step full: ``exact`` changes nothing)."""
        assert self.plan is not None, "a request arrived before the first plan"
        least_s = self.fastest_s(ask) + DELIVERY_MARGIN_S
        if ask.deadline_s - now < least_s:  # even idle: refused for good, not for now
            k_max = self.dispatcher.levels[-1] if ask.has_neighbour else 0
            if ask.start is not None:
                k_max = edit_class(self.dispatcher.levels, ask.start)
            job = Job(
                ask.id, now, ask.deadline_s - DELIVERY_MARGIN_S, ask.k_opt, k_max, 0,
                start=ask.start,
            )  # fmt: skip
            return Arrival(job, Outcome(job, Status.REFUSED, now), unmeetable_s=least_s)
        u = float(self.rng.random())
        job, queued = intake(
            ask.id, now, ask.deadline_s, ask.k_opt, ask.has_neighbour, self.plan,
            self.dispatcher, self.estimator, self.policy.admission, u, ask.shape, ask.adapters,
            ask.start,
        )  # fmt: skip
        return Arrival(job, None if queued else Outcome(job, Status.REFUSED, now))

    def fastest_s(self, ask: Ask) -> float:
        """Its run alone at the fastest level it may run at, as the plans time it."""
        level = self.dispatcher.levels[-1] if ask.has_neighbour else 0
        if ask.start is not None:
            level = edit_class(self.dispatcher.levels, ask.start)
        return self.setting.profiles[0].batch_latency(level, 1)

    def schedule(self, now: float) -> Schedule:
        """A batch for every idle GPU with work, the jobs given up on, and when a switching GPU
        is ready (then look again)."""
        batches, ended = self.dispatcher.step(now)
        return Schedule(tuple(batches), tuple(ended), self.dispatcher.next_ready(now))

    def update(self, now: float, gpu: int, report: Report) -> list[Outcome]:
        """``gpu``'s batch ended: its jobs served (failed: none is, the driver fails them)."""
        running = self.dispatcher.gpus[gpu].running
        if running is None:
            return []
        served = self.dispatcher.on_batch_done(now, running)
        return [] if report.failed else served

    def replan(self, now: float, demand: Demand, force: bool = False) -> Replan:
        proposal = self.propose(demand, force)
        if proposal is None:
            return Replan()
        return self.adopt(now, proposal, self.solve(proposal))

    def remove(self, job_id: int) -> Job | None:
        """Out of its queue; a job in a running batch stays (the batch stops between steps
        once all its jobs are cancelled)."""
        return self.dispatcher.remove(job_id)

    def set_up(self, gpu: int, up: bool, now: float) -> list[Job]:
        if up:
            self.dispatcher.set_up(gpu, True)
            return []
        return self.dispatcher.fail_gpu(now, gpu)  # its batch back in the queues

    def pending(self) -> int:
        running = sum(len(g.running.jobs) for g in self.dispatcher.gpus if g.running)
        return self.dispatcher.pending() + running

    def snapshot(self) -> LoadSnapshot:
        d = self.dispatcher
        levels = d.levels
        return LoadSnapshot(
            {k: d.queue_len(k) for k in levels},
            {k: sum(1 for g in d.gpus if g.level == k) for k in levels},
            (),
            len(d.gpus),
            len(d.up_gpus()),
            tuple(g.up for g in d.gpus),
            tuple(g.level for g in d.gpus),
        )

    def backlog_s(self, now: float) -> float:
        d = self.dispatcher
        return min((d.predicted_finish(k, now) - now for k in d.serving_levels()), default=1.0)

    # -- planning in three parts ----------------------------------------------------------------

    def propose(self, demand: Demand, force: bool = False) -> Proposal | None:
        """What to solve for ``demand``, or None: nothing to plan (the same demand gives the
        same plan, a plan-once policy plans again only when its GPUs change, no GPU is up)."""
        if not self.policy.wants_plan(self.planned_for, demand, force):
            return None
        self.planned_for = demand
        gpus = self.dispatcher.gpus
        up = tuple(self.dispatcher.up_gpus())
        if not up:
            return None
        setting = replace(self.setting, profiles=tuple(gpus[i].profile for i in up))
        return Proposal(demand, up, setting, tuple(gpus[i].level for i in up))

    def solve(self, proposal: Proposal) -> Plan:
        """Pure: the policy's plan (may run on another thread)."""
        return self.policy.plan(proposal.demand, proposal.setting, list(proposal.current))

    def adopt(self, now: float, proposal: Proposal, plan: Plan) -> Replan:
        """Set the GPUs' levels to ``plan``; a plan made for GPUs that changed meanwhile is
        dropped (the next period plans again)."""
        if proposal.up != tuple(self.dispatcher.up_gpus()):
            return Replan()
        self.plan = plan
        levels: list[int | None] = [None] * len(self.dispatcher.gpus)
        for i, level in zip(proposal.up, plan.gpu_levels, strict=True):
            levels[i] = level
        self.dispatcher.set_levels(now, levels, self.switch_s)
        return Replan(plan=plan)
