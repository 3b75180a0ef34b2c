"""The live runtime of the pinned policies: GPUs at the levels a plan gives them, batches per level.

The dispatcher, intake, admission and plan rules are ``promptserve.policy``'s, as in the
simulator; this feeds them the wall clock, runs the batches they hand out on its ``Workers``
(in-process threads or Ray Serve replicas) and re-plans on the policy's period. A worker lost
mid-batch puts the batch back in its queues and its GPU out of the plan until the worker
answers again: every accepted request gets exactly one final answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from promptserve.policy.contract import Arrival
from promptserve.policy.planning import apply_levels, switch_s, wants_plan
from promptserve.policy.types import Demand, Dispatch, Plan
from promptserve.server.runtime import Cancelled, Dropped, LiveRuntime, Pending
from promptserve.server.workers import StoreRefs, WorkerLost

log = logging.getLogger(__name__)

BATCH_TIMEOUT_FACTOR = 10.0  # a batch running this many times its predicted latency ...
BATCH_TIMEOUT_FLOOR_S = 60.0  # ... and at least this long is given up on (its requests fail)


class PinnedRuntime(LiveRuntime):
    def _build(self, demand: Demand) -> None:
        self.dispatcher = self.sched.dispatcher
        self._wake = asyncio.Event()
        self._levels_sent: tuple[int | None, ...] | None = None
        self._plan(demand)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(c) for c in (self._schedule(), self._replan_loop())]

    def _placed(self, arrival: Arrival) -> None:
        self._wake.set()

    # -- planning ---------------------------------------------------------------------------

    def _plan(self, demand: Demand, force: bool = False) -> None:
        """Plan for the GPUs whose workers are up, on this thread (start-up, a lost worker); a
        down GPU gets no level."""
        up = self._to_plan(demand, force)
        if up is not None:
            self._apply(up, self._solve(demand, up))

    async def _plan_off_loop(self, demand: Demand, force: bool = False) -> None:
        """The periodic re-plan: the solve (milliseconds, up to the solver's time limit) runs
        in a thread so the event loop keeps answering; a plan made for GPUs that changed
        meanwhile is dropped (the next period plans again)."""
        up = self._to_plan(demand, force)
        if up is None:
            return
        plan = await asyncio.to_thread(self._solve, demand, up)
        if up == self.dispatcher.up_gpus():
            self._apply(up, plan)

    def _to_plan(self, demand: Demand, force: bool) -> list[int] | None:
        """The GPUs to plan for, or None when there is nothing to plan."""
        if not wants_plan(self.policy, self.planned_for, demand, force):
            return None
        self.planned_for = demand
        return self.dispatcher.up_gpus() or None

    def _solve(self, demand: Demand, up: list[int]) -> Plan | None:
        gpus = self.dispatcher.gpus
        setting = replace(self.setting, profiles=tuple(gpus[i].profile for i in up))
        t0 = time.perf_counter()
        try:
            plan = self.policy.plan(demand, setting, [gpus[i].level for i in up])
        except Exception:  # a solver failure or time-out: the current plan stays
            if self.sched.plan is None:  # no plan to keep: the server cannot start
                raise
            log.exception("planning failed; keeping the current plan")
            self.counters.loop_errors += 1
            return None
        self.counters.planner_ms.append((time.perf_counter() - t0) * 1e3)
        return plan

    def _apply(self, up: list[int], plan: Plan | None) -> None:
        if plan is None:
            return
        self.sched.plan = plan
        levels: list[int | None] = [None] * len(self.dispatcher.gpus)
        for i, level in zip(up, plan.gpu_levels, strict=True):
            levels[i] = level
        now = self.clock()
        switching = switch_s(self.policy, self.setting.profiles[0])
        if apply_levels(self.dispatcher, now, levels, switching):
            self._wake.set()  # the scheduler looks again, and again when a switching GPU is ready

    async def _replan(self, demand: Demand, force: bool) -> None:
        await self._plan_off_loop(demand, force)
        self._wake.set()

    def _is_up(self, gpu: int) -> bool:
        return self.dispatcher.gpus[gpu].up

    async def _sync_workers(self) -> None:
        levels = tuple(g.level for g in self.dispatcher.gpus)
        if levels != self._levels_sent:
            try:
                await self.workers.set_levels(levels)
                self._levels_sent = levels
            except Exception:  # informational for the workers: the batches carry their level
                log.exception("could not tell the workers their levels")

    # -- batches ----------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._schedule_once()
            except Exception:  # one failed step must not end the loop
                log.exception("scheduler step failed")
                self.counters.loop_errors += 1
            # no polling: it is woken by an arrival, a finished batch, a plan or a returning
            # worker, and looks again by itself only when a switching GPU becomes ready
            now = self.clock()
            await self.pause(self.dispatcher.next_ready(now) - now, self._wake)

    def _schedule_once(self) -> None:
        dispatches, outcomes = self.dispatcher.step(self.clock())
        for outcome in outcomes:
            self._fail(outcome.job.id, Dropped("the deadline can no longer be met"))
            self.counters.by_outcome["dropped"] += 1
        for d in dispatches:
            task = asyncio.create_task(self._run(d))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _items(self, dispatch: Dispatch, pendings: list[Pending]) -> list[Pending]:
        """Each request's item and, on a shared store, its ref (on the cache thread)."""
        for p in pendings:
            p.item, p.ref = self._item_for(p, dispatch.level)
        return pendings

    async def _run(self, dispatch: Dispatch) -> None:
        try:
            pendings = [self.pending[j.id] for j in dispatch.jobs]
            await self._on_cache(self._items, dispatch, pendings)
        except Exception as exc:  # the batch cannot start: its requests fail, the GPU is free
            log.exception("could not prepare a batch")
            self._fail_batch(dispatch, exc)
            return
        items = [p.item for p in pendings]
        refs = [p.ref for p in pendings] if self.workers.shared_store else None
        started = self.clock()
        for p in pendings:
            p.started = started
        handles = [p.handle for p in pendings]
        loop = asyncio.get_running_loop()
        for h, item in zip(handles, items, strict=True):
            if h is not None:
                h.emit("level", {"level_k": item.k})

        heard = [h for h in handles if h is not None and not h.quiet]

        def on_step(step: int, previews: dict[int, bytes] | None = None) -> None:  # worker thread
            if all(h is not None and h.cancelled for h in handles):
                raise Cancelled("cancelled while denoising")
            if not heard:
                return
            for row, png in (previews or {}).items():
                if handles[row] is not None:
                    loop.call_soon_threadsafe(handles[row].emit, "preview", {"png": png})
            for h in heard:
                loop.call_soon_threadsafe(
                    h.emit, "step", {"step": step, "of": self.workers.total_steps}
                )

        timeout_s = max(
            BATCH_TIMEOUT_FACTOR * (dispatch.end_s - dispatch.start_s), BATCH_TIMEOUT_FLOOR_S
        )
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    results = await self.workers.run(dispatch.gpu, items, on_step, refs)
                finally:
                    await self._release(refs)
        except TimeoutError:  # its GPU is stuck: out until it answers again, as if lost
            self.counters.batch_timeouts += 1
            # its requests go back to the queues: those that can still finish elsewhere are
            # served there, only those whose deadlines it took are dropped (never the others)
            self._lose(dispatch.gpu, f"its batch ran over {timeout_s:.0f} s")
            return
        except WorkerLost as lost:  # the batch did not run: back to its queues, GPU out
            self._lose(dispatch.gpu, str(lost))
            return
        except Exception as exc:  # a worker failure: these requests fail explicitly, once
            self._fail_batch(dispatch, exc)
            return
        now = self.clock()
        outcomes = self.dispatcher.on_batch_done(now, dispatch)
        answered = []
        for outcome, p, result in zip(outcomes, pendings, results, strict=True):
            self.pending.pop(outcome.job.id, None)
            answered.append((p, p.item, result, p.ref if refs else None))
            self._serve(p, result, started, now)
        self._wake.set()
        self._on_cache_later(self._remember_all, answered, now)  # after the answers went out

    def _replan_now(self) -> None:
        self._plan(
            self.planned_for or self.estimator.estimate(self.clock(), self.started), force=True
        )
        self._wake.set()

    def _fail_batch(self, dispatch: Dispatch, exc: Exception) -> None:
        self.dispatcher.on_batch_done(self.clock(), dispatch)
        for job in dispatch.jobs:
            self._fail(job.id, exc)
        self._wake.set()


__all__ = ["PinnedRuntime", "StoreRefs"]
