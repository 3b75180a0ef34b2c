"""The live runtime for step-level serving (``--policy promptserve-step``, ``continuous-*``).

Intake (embedding, cache lookup, answers, cancellation, the cache thread) is ``Runtime``'s;
what differs is execution. Each GPU runs a loop: at every step boundary it asks the policy's
``StepScheduler`` who leaves and who joins (with their K), reads the joiners' start latents on
the cache thread (on Ray: names them in the shared store), then has the GPU run one step
(``stepworkers``: a ``StepRunner`` or the modelled one, in the engine's thread or in a Ray
replica). The scheduler is touched only on the event loop, a runner only by its GPU, between
boundaries. Every request gets one answer: served, dropped, cancelled or failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from promptserve.engine.base import GenerationItem, GenerationResult
from promptserve.engine.runner import engine_level
from promptserve.policy import Policy, Setting, Status
from promptserve.policy.intake import request_deadline, step_intake
from promptserve.policy.stepwise import StepGpu
from promptserve.server.runtime import (
    Cancelled,
    Dropped,
    JobHandle,
    Refused,
    Runtime,
    Served,
    _Pending,
)
from promptserve.server.stepworkers import LocalSteps, StepDone, step_runner_for
from promptserve.server.workers import StoreRefs, WorkerLost, Workers

log = logging.getLogger(__name__)


def step_runners(workers: Workers) -> list:
    """One step runner per in-process worker, built on that worker's thread."""
    engines = getattr(workers, "engines", [])
    if len(engines) != workers.count:
        raise ValueError("in-process step runners need one engine per worker")
    return [
        t.call(step_runner_for, e, workers.profile)
        for t, e in zip(workers.threads, engines, strict=True)  # type: ignore[attr-defined]
    ]


class StepRuntime(Runtime):
    def __init__(
        self,
        workers: Workers,
        cache,  # noqa: ANN001 - as Runtime
        embedder,  # noqa: ANN001
        policy: Policy,
        setting: Setting,
        quality,  # noqa: ANN001
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        expected_qpm: float = 1.0,
        steps=None,  # noqa: ANN001 - LocalSteps or RayWorkers; default: in-process runners
    ) -> None:
        super().__init__(
            workers, cache, embedder, policy, setting, quality, clock, seed, expected_qpm
        )
        self.sched = policy.step_scheduler(setting)
        self.sched.reprice(self.planned_for, setting.slo_s)
        if steps is None:
            steps = (
                workers
                if hasattr(workers, "advance")
                else LocalSteps(
                    step_runners(workers),
                    workers.threads,  # type: ignore[attr-defined]
                )
            )
        self.steps = steps
        self._left: list[dict] = [{} for _ in range(workers.count)]  # steps left per member
        self._gpu_wake = [asyncio.Event() for _ in range(workers.count)]
        self._joined_at: dict[int, float] = {}
        self._deadline: dict[int, float] = {}
        self._item: dict[int, GenerationItem] = {}  # what each member joined with
        self._ref: dict[int, StoreRefs] = {}  # on a shared store: its start key and entry
        self._cancel: list[set[int]] = [set() for _ in range(workers.count)]

    def start(self) -> None:
        loops = [self._gpu_loop(g) for g in range(self.workers.count)]
        self._tasks = [asyncio.create_task(c) for c in (*loops, self._reprice_loop())]

    def queue_lengths(self) -> dict[int, int]:
        """Requests waiting to join, under level 0 (no queue is per level here)."""
        return {k: (len(self.sched.waiting) if k == self.levels[0] else 0) for k in self.levels}

    def gpus_per_level(self) -> dict[int, int]:
        """Here: members in flight per level (the K mix), not GPUs: no GPU has a level."""
        mix = dict.fromkeys(self.levels, 0)
        for gpu in self.sched.gpus:
            for member in gpu.by_id.values():
                mix[member.k] += 1
        return mix

    def inflight(self) -> list[int]:
        return [len(g.by_id) for g in self.sched.gpus]

    async def _intake(  # noqa: ANN202
        self,
        prompt: str,
        tenant: str,
        slo_s: float,
        handle: JobHandle | None,
        exact: bool = False,
    ):
        now = self.clock()
        self._note_arrival(now)
        vec = await self._embed(prompt, tenant)
        hit = await self._lookup(tenant, vec, exact)
        k_opt = engine_level(hit.k_opt, self.workers) if hit else 0
        has_neighbour = self._has_neighbour(hit)
        self._check_meetable(slo_s, has_neighbour)
        job_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[job_id] = _Pending(prompt, tenant, vec, hit, future, now, job_id, handle)
        job, gpu, outcome = step_intake(
            job_id, now, now + slo_s, k_opt, has_neighbour, self.sched, self.estimator
        )
        self._deadline[job_id] = request_deadline(job)
        if outcome is not None:
            del self.pending[job_id]
            self._deadline.pop(job_id, None)
            if outcome.status == Status.REFUSED:
                self.counters.by_outcome["refused"] += 1
                raise Refused(retry_after_s=max(1.0, slo_s / 2))
            self.counters.by_outcome["dropped"] += 1
            raise Dropped("the deadline cannot be met at any level")
        self._accepted(handle, job_id, job.level, hit)
        self._wake_gpus(gpu)
        return future

    def cancel(self, handle: JobHandle) -> bool:
        handle.cancelled = True
        job_id = handle.job_id
        if job_id is None or job_id not in self.pending:
            return False
        for g, gpu in enumerate(self.sched.gpus):
            if job_id in gpu.by_id:
                self._cancel[g].add(job_id)  # the runner drops it before its next step
        if self.sched.remove(job_id) is not None:
            self._fail(job_id, Cancelled("cancelled"))
        return True

    def _rejoin(self, g: int, reason: str, lost: set[int]) -> None:
        """Members a worker lost arrive again with their own deadlines (a replaced Ray replica
        takes them; one that cannot finish now is dropped, with its answer). The worker is told
        to drop them too, in case it still holds any."""
        log.warning("GPU %d: %s; %d members start again", g, reason, len(lost))
        now = self.clock()
        self._cancel[g] |= lost
        for job_id in sorted(lost):
            job = self.sched.remove(job_id)
            for per_job in (self._item, self._ref, self._joined_at):
                per_job.pop(job_id, None)
            p = self.pending.get(job_id)
            if job is None or p is None:
                continue
            self.counters.retried += 1
            if p.handle is not None:
                p.handle.emit("retry", {"reason": reason})
            placed, outcome = self.sched.arrive(now, job)
            if outcome is not None:
                self.counters.by_outcome["dropped"] += 1
                self._fail(job_id, Dropped("the deadline can no longer be met"))
            self._wake_gpus(placed)

    def _fail(self, job_id: int, exc: Exception) -> None:
        for per_job in (self._item, self._ref, self._joined_at, self._deadline):
            per_job.pop(job_id, None)
        super()._fail(job_id, exc)

    def _wake_gpus(self, gpu: StepGpu | None) -> None:
        if gpu is not None:
            self._gpu_wake[gpu.index].set()
        for idle in self.sched.idle_while_waiting():
            self._gpu_wake[idle.index].set()

    async def _reprice_loop(self) -> None:
        period = self.policy.replan_s or 5.0
        while True:
            if not await self._until_replan(period):
                continue
            try:
                if self.policy.replan_s:
                    demand = self.estimator.estimate(self.clock(), self.started)
                    self.sched.reprice(demand, self.setting.slo_s)
            except Exception:
                log.exception("re-pricing failed")
                self.counters.loop_errors += 1

    async def _gpu_loop(self, g: int) -> None:
        gpu, steps = self.sched.gpus[g], 0
        while True:
            try:
                steps = await self._boundary(g, gpu, steps)
            except asyncio.CancelledError:
                raise
            except WorkerLost as lost:  # its members' progress is gone with it: they rejoin
                self._rejoin(g, str(lost), set(gpu.by_id))
                self._left[g], steps = {}, 0
            except Exception:  # one failed step fails its members, not the loop
                log.exception("step loop of GPU %d failed", g)
                self.counters.loop_errors += 1
                for job_id in list(gpu.by_id):
                    self.sched.remove(job_id)
                    self._cancel[g].add(job_id)  # the worker drops it at its next step
                    self._fail(job_id, RuntimeError("the step failed"))
                self._left[g] = {}
                steps = 0
            if steps == 0:
                self._gpu_wake[g].clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self._gpu_wake[g].wait()

    async def _boundary(self, g: int, gpu: StepGpu, steps: int) -> int:
        """One boundary and the step after it; the number of steps run (0: idle)."""
        step = await self._join(g, gpu, steps)
        if step is None:
            return 0
        try:
            done = await self.steps.advance(g, *step)
        finally:  # the joiners' start latents are read (or never will be): evictable again
            await self._release(step[1])
        self._started(gpu, done)
        await self._finish(g, done)
        lost = set(gpu.by_id) - done.steps_left.keys()
        if lost:  # a Ray replica restarted between two steps: it never had these
            self._rejoin(g, "the worker restarted without its members", lost)
        return 1 if done.steps_left or done.finished else 0

    def _started(self, gpu: StepGpu, done: StepDone) -> None:
        """A worker that read start latents itself (Ray) says at which K each joiner began."""
        for job_id, k in done.started.items():
            item = self._item.get(job_id)
            if item is not None and k != item.k and job_id in gpu.by_id:
                self.sched.restart(gpu, job_id, k)  # before the next boundary counts the step

    async def _join(self, g: int, gpu: StepGpu, steps: int) -> tuple[list, list | None, set] | None:
        """The boundary's decisions at the clock's now (who leaves, who joins at which K), the
        joiners' items read from the cache; what the next step runs (None: nothing to run)."""
        now = self.clock()
        _left, joined, dropped = self.sched.boundary(gpu, now, steps)
        for outcome in dropped:
            self.counters.by_outcome["dropped"] += 1
            self._fail(outcome.job.id, Dropped("the deadline can no longer be met"))
        items = []
        for member in joined:
            p = self.pending.get(member.job.id)
            if p is None:  # cancelled meanwhile
                self.sched.remove(member.job.id)
                continue
            items.append((member, p))
        members = await self._on_cache(self._join_items, items) if items else []
        for member, item, ref in members:
            self._joined_at[member.job.id] = now
            self._item[member.job.id] = item
            if ref is not None:
                self._ref[member.job.id] = ref
            if item.k != member.k:  # its latent was missing: it runs in full
                self.sched.restart(gpu, member.job.id, item.k)
            p = self.pending[member.job.id]
            if p.handle is not None:
                p.handle.emit("level", {"level_k": item.k})
        cancels, self._cancel[g] = self._cancel[g], set()
        if not members and not self._left[g] and not cancels:
            return None
        joins = [(m.job.id, item) for m, item, _ in members]
        refs = [ref for _, _, ref in members] if self.workers.shared_store else None
        return joins, refs, cancels

    async def _finish(self, g: int, done: StepDone) -> None:
        """After a step: who finished leaves the scheduler's count before anyone hears of it."""
        for job_id, _ in done.finished:
            self.sched.remove(job_id)
        self._left[g] = done.steps_left
        self._report_steps(done)
        await self._answer(done.finished)
        self._wake_gpus(None)

    def _join_items(self, items: list) -> list[tuple]:  # noqa: ANN001 - on the cache thread
        return [(member, *self._item_for(p, member.k)) for member, p in items]

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
            if p is not None and p.handle is not None:
                p.handle.emit("step", {"step": total - left, "of": total})

    async def _answer(self, finished: list[tuple[int, GenerationResult]]) -> None:
        now = self.clock()
        answered = []
        for job_id, result in finished:
            p = self.pending.pop(job_id, None)
            if p is None:
                continue
            joined = self._joined_at.pop(job_id, p.arrival)
            late = now > self._deadline.pop(job_id, p.arrival + self.setting.slo_s)
            self.counters.by_outcome["late" if late else "served"] += 1
            self.counters.cache_hits += int(p.hit is not None and result.k > 0)
            k_opt = engine_level(p.hit.k_opt, self.workers) if p.hit else 0
            served = Served(
                result,
                result.k,
                p.hit.similarity if p.hit else None,
                self.quality.q(k_opt, result.k),
                joined - p.arrival,
                now - joined,
                k_opt,
            )
            item = self._item.pop(job_id, GenerationItem(p.prompt, result.k, None, seed=p.seed))
            answered.append((p, item, result, self._ref.pop(job_id, None)))
            if p.future.done():
                continue
            if p.handle is not None and p.handle.cancelled:
                p.future.set_exception(Cancelled("cancelled while denoising"))
            else:
                p.future.set_result(served)
        if answered:
            await self._on_cache(self._remember_all, answered, now)
