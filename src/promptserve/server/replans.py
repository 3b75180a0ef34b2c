"""The live runtime's re-plans and lost workers: every period, take back the workers that
answer again, tell the workers their levels, and re-plan (pinned) or re-price (step-level) from
the load estimate, on the grid of the first arrival, as the simulator does."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from promptserve.policy.contract import Scheduler, Work
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.planning import until_replan
from promptserve.policy.policies import Policy
from promptserve.policy.types import Demand
from promptserve.server.clock import Pause
from promptserve.server.requests import Counters
from promptserve.server.selection import LiveSelection
from promptserve.workers.base import Workers

log = logging.getLogger(__name__)


class GpuWork(Protocol):
    def unreported(self) -> dict[int, Work]: ...
    def forget(self, g: int) -> None: ...


class Host(Protocol):
    """What re-planning asks of the runtime it runs in (``runtime.LiveRuntime``)."""

    policy: Policy
    sched: Scheduler
    workers: Workers
    estimator: LoadEstimator
    counters: Counters
    clock: Callable[[], float]
    pause: Pause
    started: float  # the first request's arrival (the estimate's start)
    first_arrival: float | None
    arrived: asyncio.Event
    planned_for: Demand | None  # the demand of the last plan or price
    gpus: GpuWork
    selection: LiveSelection | None

    def hand_out(self) -> None: ...


DOWN_POLL_S = 1.0  # how often a lost worker is asked whether it is back


class Replans:
    def __init__(self, runtime: Host) -> None:
        self.rt = runtime
        self.levels_sent: tuple[int | None, ...] | None = None

    async def loop(self) -> None:
        """Every period (every second while a worker is down)."""
        rt = self.rt
        period = rt.policy.replan_s or 5.0
        while True:
            try:  # one failed iteration must not end the loop, the snapshot's included
                await self.sync_workers()  # first, so a new server's workers hear the first plan
                down = rt.sched.snapshot().gpus_up < rt.workers.count
            except Exception:
                log.exception("re-plan iteration failed")
                rt.counters.loop_errors += 1
                await rt.pause(period, None)
                continue
            if down:
                await rt.pause(min(period, DOWN_POLL_S), None)
            elif not await self.wait(period):
                continue
            try:
                back = await self.take_back() if down else []
                await self.select(period)
                await self.replan(rt.estimator.estimate(rt.clock(), rt.started), bool(back))
            except Exception:  # one failed iteration must not end the loop
                log.exception("re-plan iteration failed")
                rt.counters.loop_errors += 1

    async def select(self, period: float) -> None:
        """``+select``: a selection when due, before the re-price as in the simulator; its
        replays run on a thread (``selection.py``)."""
        rt, now = self.rt, self.rt.clock()
        if rt.selection is None or not rt.selection.due(now):
            return
        replans = (now + period, period, rt.started)
        try:  # a failed selection keeps the rule serving; the re-price still comes
            await rt.selection.tick(now, rt.sched, rt.gpus.unreported, replans, rt.clock)  # type: ignore[arg-type]
        except Exception:
            log.exception("selection failed; the rule serving stays")
            rt.counters.loop_errors += 1

    async def replan(self, demand: Demand, force: bool = False) -> None:
        """The policy's plan or price for ``demand`` (``force``: GPUs came back, even for a
        policy that plans once). A solver runs off the event loop; a plan that fails keeps
        the current one."""
        rt = self.rt
        if not (rt.policy.replan_s or force):
            return
        proposal = rt.sched.propose(demand, force)
        if proposal is None:
            return
        rt.planned_for = demand
        if proposal.slow:
            t0 = time.perf_counter()
            try:
                solved = await asyncio.to_thread(rt.sched.solve, proposal)
            except Exception:  # a solver failure or time-out: the current plan stays
                log.exception("planning failed; keeping the current plan")
                rt.counters.loop_errors += 1
                return
            rt.counters.planner_ms.append((time.perf_counter() - t0) * 1e3)
        else:
            solved = rt.sched.solve(proposal)
        rt.sched.adopt(rt.clock(), proposal, solved)
        rt.hand_out()

    def now_for_lost(self) -> None:
        """Plan or price for the demand last planned for, on this thread (a lost worker)."""
        rt = self.rt
        demand = rt.planned_for or rt.estimator.estimate(rt.clock(), rt.started)
        proposal = rt.sched.propose(demand, force=True)
        if proposal is None:
            return
        try:
            rt.sched.adopt(rt.clock(), proposal, rt.sched.solve(proposal))
        except Exception:
            log.exception("planning failed; keeping the current plan")
            rt.counters.loop_errors += 1

    async def sync_workers(self) -> None:
        """Tell the workers their levels (pinned), informational: the work carries its level."""
        levels = self.rt.sched.snapshot().levels
        if levels and levels != self.levels_sent:
            try:
                await self.rt.workers.set_levels(levels)
                self.levels_sent = levels
            except Exception:
                log.exception("could not tell the workers their levels")

    async def wait(self, period: float) -> bool:
        """Sleep to the next re-plan on the grid (True); before any request, until the first
        arrival or a period (False: nothing to plan for, the forecast's plan stands)."""
        rt = self.rt
        if rt.first_arrival is None:
            await rt.pause(period, rt.arrived)
            return False
        await rt.pause(until_replan(rt.clock(), rt.first_arrival, period), None)
        return True

    async def take_back(self) -> list[int]:
        """The lost GPUs whose workers answer again, back in the scheduler."""
        rt = self.rt
        alive = await rt.workers.alive()
        up = rt.sched.snapshot().up
        back = [g for g, ok in enumerate(alive) if ok and not up[g]]
        for g in back:
            log.warning("worker %d is back; it takes work again", g)
            rt.gpus.forget(g)  # a replaced worker holds none of the old members
            rt.sched.set_up(g, True, rt.clock())
        return back
