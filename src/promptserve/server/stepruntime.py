"""The live runtime for step-level serving (``--policy promptserve-step``, ``continuous-*``).

Intake (embedding, cache lookup, answers, cancellation, the cache thread) is ``Runtime``'s;
what differs is execution. Each GPU runs a loop: at every step boundary it asks the policy's
``StepScheduler`` who leaves and who joins (with their K), reads the joiners' start latents on
the cache thread, then runs one step of its ``StepRunner`` (or the modelled one) in a thread.
The scheduler is touched only on the event loop, the runner only in its GPU's thread, between
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
from promptserve.policy.intake import step_intake
from promptserve.policy.stepwise import StepGpu, StepScheduler, step_profile
from promptserve.server.runtime import (
    Cancelled,
    Dropped,
    JobHandle,
    Refused,
    Runtime,
    Served,
    _Pending,
)
from promptserve.server.workers import Workers
from promptserve.sim.stepsim import step_config

log = logging.getLogger(__name__)


def step_runners(workers: Workers) -> list:
    """One step runner per worker: on the engine's components, or modelled (no compute)."""
    from promptserve.engine.modeled import ModeledStepRunner
    from promptserve.engine.steprunner import StepRunner

    runners = []
    for engine in getattr(workers, "engines", []):
        comps = getattr(engine, "c", None)
        if comps is not None:
            runners.append(
                StepRunner(
                    comps,
                    engine.total_steps,
                    engine.levels,
                    getattr(engine, "guidance", 7.5),
                    getattr(engine, "placeholder", False),
                )
            )
        else:
            speedup = getattr(engine, "_speedup", 1.0)
            runners.append(ModeledStepRunner(step_profile(workers.profile), speedup))
    if len(runners) != workers.count:
        raise ValueError("step-level serving needs in-process workers (one engine each)")
    return runners


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
        runners: list | None = None,
    ) -> None:
        super().__init__(
            workers, cache, embedder, policy, setting, quality, clock, seed, expected_qpm
        )
        self.sched = StepScheduler(
            step_profile(setting.profiles[0]), workers.count, setting.quality, step_config(policy)
        )
        self.sched.reprice(self.planned_for, setting.slo_s)
        self.runners = runners if runners is not None else step_runners(workers)
        self._gpu_wake = [asyncio.Event() for _ in self.runners]
        self._joined_at: dict[int, float] = {}
        self._deadline: dict[int, float] = {}
        self._item: dict[int, GenerationItem] = {}  # what each member joined with
        self._cancel: list[set[int]] = [set() for _ in self.runners]

    def start(self) -> None:
        loops = [self._gpu_loop(g) for g in range(len(self.runners))]
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

    async def _intake(self, prompt: str, tenant: str, slo_s: float, handle: JobHandle | None):  # noqa: ANN202
        now = self.clock()
        vec = await self._embed(prompt)
        hit = await self._on_cache(self.cache.lookup, tenant, vec)
        self.counters.lookups += 1
        k_opt = engine_level(hit.k_opt, self.workers) if hit else 0
        self._check_meetable(slo_s, hit is not None)
        job_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[job_id] = _Pending(prompt, tenant, vec, hit, future, now, job_id, handle)
        job, gpu, outcome = step_intake(
            job_id, now, now + slo_s, k_opt, hit is not None, self.sched, self.estimator
        )
        self._deadline[job_id] = job.deadline_s
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

    def _wake_gpus(self, gpu: StepGpu | None) -> None:
        if gpu is not None:
            self._gpu_wake[gpu.index].set()
        for idle in self.sched.idle_while_waiting():
            self._gpu_wake[idle.index].set()

    async def _reprice_loop(self) -> None:
        period = self.policy.replan_s or 5.0
        while True:
            await asyncio.sleep(period)
            try:
                if self.policy.replan_s:
                    demand = self.estimator.estimate(self.clock(), self.started)
                    self.sched.reprice(demand, self.setting.slo_s)
            except Exception:
                log.exception("re-pricing failed")
                self.counters.loop_errors += 1

    async def _gpu_loop(self, g: int) -> None:
        gpu, runner, steps = self.sched.gpus[g], self.runners[g], 0
        while True:
            try:
                steps = await self._boundary(g, gpu, runner, steps)
            except asyncio.CancelledError:
                raise
            except Exception:  # one failed step fails its members, not the loop
                log.exception("step loop of GPU %d failed", g)
                self.counters.loop_errors += 1
                for job_id in list(gpu.by_id):
                    self.sched.remove(job_id)
                    runner.cancel(job_id)
                    self._fail(job_id, RuntimeError("the step failed"))
                steps = 0
            if steps == 0:
                self._gpu_wake[g].clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self._gpu_wake[g].wait()

    async def _boundary(self, g: int, gpu: StepGpu, runner, steps: int) -> int:  # noqa: ANN001
        """One boundary and the step after it; the number of steps run (0: idle)."""
        step = await self._join(g, gpu, steps)
        if step is None:
            return 0
        joins, cancels = step
        finished = await self._compute(g, self._advance, runner, joins, cancels)
        await self._finish(g, finished)
        return 1 if len(runner) or finished else 0

    async def _join(self, g: int, gpu: StepGpu, steps: int) -> tuple[list, set] | None:
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
        for member, item in members:
            self._joined_at[member.job.id] = now
            self._item[member.job.id] = item
            if item.k != member.k:  # its latent was missing: it runs in full
                self.sched.restart(gpu, member.job.id, item.k)
            p = self.pending[member.job.id]
            if p.handle is not None:
                p.handle.emit("level", {"level_k": item.k})
        cancels, self._cancel[g] = self._cancel[g], set()
        if not members and not len(self.runners[g]) and not cancels:
            return None
        return [(m.job.id, item) for m, item in members], cancels

    async def _finish(self, g: int, finished: list) -> None:
        """After a step: who finished leaves the scheduler's count before anyone hears of it."""
        for job_id, _ in finished:
            self.sched.remove(job_id)
        self._report_steps(self.runners[g], [job_id for job_id, _ in finished])
        await self._answer(finished)
        self._wake_gpus(None)

    def _join_items(self, items: list) -> list[tuple]:  # noqa: ANN001 - on the cache thread
        out = []
        for member, p in items:
            latent = None
            if member.k > 0 and p.hit is not None:
                latent = self.cache.latent(p.hit.entry, member.k)
            k = member.k if latent is not None else 0
            out.append((member, GenerationItem(p.prompt, k, latent, seed=p.seed)))
        return out

    async def _compute(self, g: int, fn: Callable, *args: object):  # noqa: ANN202
        """On GPU ``g``'s own thread (engine.threads): step-level serving is in-process only."""
        return await self.workers.threads[g].run(fn, *args)  # type: ignore[attr-defined]

    @staticmethod
    def _advance(runner, joins: list, cancels: set) -> list:  # noqa: ANN001 - in the GPU's thread
        for key in cancels:
            runner.cancel(key)
        runner.join(joins)
        return runner.step()

    def _report_steps(self, runner, finished: list[int]) -> None:  # noqa: ANN001
        """Each member's own step, after every step (those that finished are at the last)."""
        total = self.workers.total_steps
        left_by_id = runner.steps_left() | dict.fromkeys(finished, 0)
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
            answered.append((p, item, result, None))
            if p.future.done():
                continue
            if p.handle is not None and p.handle.cancelled:
                p.future.set_exception(Cancelled("cancelled while denoising"))
            else:
                p.future.set_result(served)
        if answered:
            await self._on_cache(self._remember_all, answered, now)
