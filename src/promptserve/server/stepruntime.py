"""The live runtime of step-level serving (``--policy promptserve-step``, ``continuous-*``).

Each GPU runs a loop: at every step boundary it asks the policy's ``StepScheduler`` who leaves
and who joins (with their K), reads the joiners' start latents on the cache thread (on Ray:
names them in the shared store), then has the GPU run one step (``Workers.advance``: a step
runner in the engine's thread or in a Ray replica). The scheduler is touched only on the
event loop, a runner only by its GPU, between boundaries. A lost worker's GPU leaves the
placement and the step capacity the price is set for at once, and its members start again
elsewhere; it comes back when its worker answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading

from promptserve.engine.base import GenerationItem, GenerationResult
from promptserve.policy.contract import Arrival
from promptserve.policy.stepwise import StepGpu
from promptserve.policy.types import Demand, Job
from promptserve.server.runtime import Dropped, LiveRuntime, Pending
from promptserve.server.stepworkers import StepDone
from promptserve.server.workers import StoreRefs, WorkerLost

log = logging.getLogger(__name__)


class StepRuntime(LiveRuntime):
    def _build(self, demand: Demand) -> None:
        self.planned_for = demand
        self.sched.reprice(demand, self.setting.slo_s)
        self.workers.prepare_steps()
        count = self.workers.count
        self._left: list[dict] = [{} for _ in range(count)]  # steps left per member
        self._gpu_wake = [asyncio.Event() for _ in range(count)]
        # set when a boundary is wanted now (an arrival, a cancel): a GPU running several
        # steps in one call stops after the step it is on
        self._interrupt = [threading.Event() for _ in range(count)]
        self._cancel: list[set[int]] = [set() for _ in range(count)]

    def start(self) -> None:
        loops = [self._gpu_loop(g) for g in range(self.workers.count)]
        self._tasks = [asyncio.create_task(c) for c in (*loops, self._replan_loop())]

    def _fastest_s(self, level: int, exact: bool = False) -> float:
        """At the scheduler's fastest interval too: a deadline only feature caching meets is
        still one this server can meet (not for a full generation asked for)."""
        return self.sched.alone_s(level, 1 if exact else self.sched.intervals[-1])

    def _placed(self, arrival: Arrival) -> None:
        for flag in self._interrupt:  # any GPU's next boundary may be the one that takes it
            flag.set()
        self._wake_gpus(self.sched.gpus[arrival.gpu] if arrival.gpu is not None else None)

    def _withdraw(self, job_id: int) -> bool:
        for g, gpu in enumerate(self.sched.gpus):
            if job_id in gpu.by_id:
                self._cancel[g].add(job_id)  # the runner drops it before its next step
                self._interrupt[g].set()
        return super()._withdraw(job_id)

    def _wake_gpus(self, gpu: StepGpu | None) -> None:
        if gpu is not None:
            self._gpu_wake[gpu.index].set()
        for idle in self.sched.idle_while_waiting():
            self._gpu_wake[idle.index].set()

    # -- the price and lost workers ---------------------------------------------------------

    async def _replan(self, demand: Demand, force: bool) -> None:
        """Step-level serving's re-plan is a new price on step-slots; returning GPUs are
        priced in at once, even for a policy priced once."""
        if self.policy.replan_s:
            self._reprice(demand)
        elif force:
            self._reprice(self.planned_for or demand)
        if force:
            self._wake_gpus(None)

    def _reprice(self, demand: Demand) -> None:
        self.planned_for = demand
        self.sched.reprice(demand, self.setting.slo_s)

    def _is_up(self, gpu: int) -> bool:
        return self.sched.gpus[gpu].up

    async def _take_back(self) -> list[int]:
        back = await super()._take_back()
        for g in back:
            self._cancel[g].clear()  # a replaced worker holds none of the old members
        return back

    def _replan_now(self) -> None:
        if self.planned_for is not None:
            self._reprice(self.planned_for)  # the price for the capacity that is left

    def _worker_lost(self, g: int, reason: str) -> None:
        """Its GPU leaves placement and capacity now; its members and joiners start again."""
        self._left[g] = {}
        self._rearrive(self._lose(g, reason))

    def _rejoin(self, g: int, reason: str, lost: set[int]) -> None:
        """Members a worker no longer holds (a Ray replica replaced between two steps) arrive
        again with their own deadlines. The worker is told to drop them too, in case it still
        holds any."""
        log.warning("GPU %d: %s; %d members start again", g, reason, len(lost))
        self._cancel[g] |= lost
        jobs = [j for j in map(self.sched.remove, sorted(lost)) if j is not None]
        self._retrying(jobs, reason)
        self._rearrive(jobs)

    def _rearrive(self, jobs: list[Job]) -> None:
        """Place again (one that cannot finish now is dropped, with its answer)."""
        now = self.clock()
        for job in jobs:
            if job.id not in self.pending:
                continue
            placed, outcome = self.sched.arrive(now, job)
            if outcome is not None:
                self.counters.by_outcome["dropped"] += 1
                self._fail(job.id, Dropped("the deadline can no longer be met"))
            self._wake_gpus(placed)

    # -- each GPU's loop --------------------------------------------------------------------

    async def _gpu_loop(self, g: int) -> None:
        gpu, steps = self.sched.gpus[g], 0
        while True:
            self._gpu_wake[g].clear()  # before the boundary: a wake-up during it is kept
            try:
                steps = await self._boundary(g, gpu, steps) if gpu.up else 0
            except asyncio.CancelledError:
                raise
            except WorkerLost as lost:  # its members' progress is gone with it: they rejoin
                self._worker_lost(g, str(lost))
                steps = 0
            except Exception:  # one failed step fails its members, not the loop
                log.exception("step loop of GPU %d failed", g)
                self.counters.loop_errors += 1
                for job_id in list(gpu.by_id):
                    self.sched.remove(job_id)
                    self._cancel[g].add(job_id)  # the worker drops it at its next step
                    self._fail(job_id, RuntimeError("the step failed"))
                self._left[g] = {}
                steps = 0
            if steps == 0:  # idle: no polling, an arrival or a finish elsewhere wakes it
                await self.pause(math.inf, self._gpu_wake[g])

    async def _boundary(self, g: int, gpu: StepGpu, steps: int) -> int:
        """One boundary and the step after it; the number of steps run (0: idle)."""
        step = await self._join(g, gpu, steps)
        if step is None:
            return 0
        ahead = self._ahead(g, gpu)
        self._interrupt[g].clear()
        try:
            joins, refs, cancels, retimes = step
            done = await self.workers.advance(
                g, joins, refs, cancels, ahead, self._interrupt[g], retimes
            )
        finally:  # the joiners' start latents are read (or never will be): evictable again
            await self._release(step[1])
        self._started(gpu, done)
        await self._finish(g, done)
        lost = set(gpu.by_id) - done.steps_left.keys()
        if lost:  # a Ray replica restarted between two steps: it never had these
            self._rejoin(g, "the worker restarted without its members", lost)
        return done.ran if done.steps_left or done.finished else 0

    def _ahead(self, g: int, gpu: StepGpu) -> int:
        """Steps the next call may run with no boundary between: where none is placed here or
        waits, none is cancelled and none hears its steps, a boundary before the first member
        finishes changes nothing, so the GPU runs to it (or to an interrupt) in one call. The
        same boundaries as one step a call, without a trip to the event loop for each."""
        if gpu.joining or self.sched.waiting or self._cancel[g] or not gpu.members:
            return 1
        for job_id in gpu.by_id:
            p = self.pending.get(job_id)
            if p is None or (p.handle is not None and not p.handle.quiet):
                return 1
        return max(1, gpu.members[0][0] - gpu.done)

    def _started(self, gpu: StepGpu, done: StepDone) -> None:
        """A worker that read start latents itself (Ray) says at which K each joiner began."""
        for job_id, k in done.started.items():
            p = self.pending.get(job_id)
            if p is not None and p.item is not None and k != p.item.k and job_id in gpu.by_id:
                self.sched.restart(gpu, job_id, k)  # before the next boundary counts the step

    async def _join(
        self, g: int, gpu: StepGpu, steps: int
    ) -> tuple[list, list | None, set, dict] | None:
        """The boundary's decisions at the clock's now (who leaves, who joins at which K, who
        runs on at a longer interval), the joiners' items read from the cache; what the next
        step runs (None: nothing to run)."""
        now = self.clock()
        _left, joined, dropped = self.sched.boundary(gpu, now, steps)
        retimes = {}
        for member in gpu.retimed:  # a burst: their answers' quality counts what they ran at
            p = self.pending.get(member.job.id)
            if p is not None and p.item is not None:
                p.item = dataclasses.replace(p.item, interval=member.r)
                p.earlier = member.earlier
                retimes[member.job.id] = member.r
        self.counters.reintervals += len(retimes)
        for outcome in dropped:
            self.counters.by_outcome["dropped"] += 1
            self._fail(outcome.job.id, Dropped("the deadline can no longer be met"))
        joiners = []
        for member in joined:
            p = self.pending.get(member.job.id)
            if p is None:  # cancelled meanwhile
                self.sched.remove(member.job.id)
                continue
            joiners.append((member, p))
        if joiners:
            await self._on_cache(self._join_items, joiners)
            # one cancelled while its latent was read has left the scheduler: it must not join
            gone = [(m, p) for m, p in joiners if m.job.id not in self.pending]
            if gone:
                await self._release([p.ref for _, p in gone])
                joiners = [(m, p) for m, p in joiners if m.job.id in self.pending]
        for member, p in joiners:
            p.started = now
            if p.item.k != member.k:  # its latent was missing: it runs in full
                self.sched.restart(gpu, member.job.id, p.item.k)
            if p.handle is not None:
                p.handle.emit("level", {"level_k": p.item.k})
        cancels, self._cancel[g] = self._cancel[g], set()
        if not joiners and not self._left[g] and not cancels:
            return None
        joins = [(m.job.id, p.item) for m, p in joiners]
        refs = [p.ref for _, p in joiners] if self.workers.shared_store else None
        return joins, refs, cancels, retimes

    def _join_items(self, joiners: list) -> None:  # noqa: ANN001 - on the cache thread
        for member, p in joiners:
            p.item, p.ref = self._item_for(p, member.k, member.r)

    async def _finish(self, g: int, done: StepDone) -> None:
        """After a step: who finished leaves the scheduler's count before anyone hears of it."""
        for job_id, _ in done.finished:
            self.sched.remove(job_id)
        self._left[g] = done.steps_left
        self._report_steps(done)
        await self._answer(done.finished)
        self._wake_gpus(None)

    def _report_steps(self, done: StepDone) -> None:
        """Each member's own step, after every step (those that finished are at the last)."""
        total = self.workers.total_steps
        for job_id, png in done.previews.items():
            p = self.pending.get(job_id)
            if p is not None and p.handle is not None:
                p.handle.emit("preview", {"png": png})
        left_by_id = done.steps_left | dict.fromkeys((job_id for job_id, _ in done.finished), 0)
        for job_id, left in left_by_id.items():
            p = self.pending.get(job_id)
            if p is not None and p.handle is not None and not p.handle.quiet:
                p.handle.emit("step", {"step": total - left, "of": total})

    async def _answer(self, finished: list[tuple[int, GenerationResult]]) -> None:
        now = self.clock()
        answered: list[tuple[Pending, GenerationItem, GenerationResult, StoreRefs | None]] = []
        for job_id, result in finished:
            p = self.pending.pop(job_id, None)
            if p is None:
                continue
            item = p.item or GenerationItem(p.prompt, result.k, None, seed=p.seed, look=p.look)
            answered.append((p, item, result, p.ref))
            self._serve(p, result, p.started if p.started is not None else p.arrival, now)
        if answered:
            self._on_cache_later(self._remember_all, answered, now)
