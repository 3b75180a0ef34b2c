"""The live runtime: the policy core driven by the wall clock, real queues and real workers.

Translation only: admission, routing, batching and planning are the objects of
``promptserve.policy`` that the simulator drives too; this module feeds them the time, runs the
batches they hand out on its ``Workers`` (in-process threads or Ray Serve replicas), and
answers each request's future. A worker lost mid-batch puts the batch back in its queues and
its GPU out of the plan until the worker answers again: every accepted request gets exactly one
final answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from promptserve.cache.approx import ApproxCache, CacheHit
from promptserve.cache.embed import Embedder
from promptserve.engine.base import GenerationItem, GenerationResult, preview_steps
from promptserve.engine.runner import engine_level, remember, resumed_from
from promptserve.engine.threads import ComputeThread
from promptserve.policy import Dispatcher, Policy, Setting, intake
from promptserve.policy.intake import DELIVERY_MARGIN_S, request_deadline
from promptserve.policy.planning import (
    apply_levels,
    first_demand,
    switch_s,
    until_replan,
    wants_plan,
    worth_caching,
)
from promptserve.policy.types import Demand, Dispatch, Plan
from promptserve.quality import QualityModel
from promptserve.server.workers import StoreRefs, WorkerLost, Workers

log = logging.getLogger(__name__)

BATCH_TIMEOUT_FACTOR = 10.0  # a batch running this many times its predicted latency ...
BATCH_TIMEOUT_FLOOR_S = 60.0  # ... and at least this long is given up on (its requests fail)


class Refused(Exception):
    """Admission refused the request: no level can meet its deadline now."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"overloaded: retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class Unmeetable(Exception):
    """The deadline is shorter than this server's fastest run of the request, even idle."""

    def __init__(self, deadline_s: float, least_s: float) -> None:
        super().__init__(
            f"deadline_ms: {deadline_s * 1e3:.0f} ms cannot be met even on an idle server; "
            f"the least this server can meet for this prompt is {least_s * 1e3:.0f} ms"
        )
        self.least_s = least_s


class Dropped(Exception):
    """Accepted, then given up: it could no longer meet its deadline."""


class Cancelled(Exception):
    """The caller cancelled the request."""


@dataclass
class JobHandle:
    """A caller's view of one request in flight: its events, its acceptance, its cancellation."""

    emit: Callable[[str, dict], None]
    accepted: asyncio.Future | None = None  # resolved with the job id once queued
    job_id: int | None = None
    cancelled: bool = False  # read by the worker thread between denoising steps
    partial_images: int = 0  # previews wanted, spread over the steps it will run


@dataclass(frozen=True)
class Served:
    result: GenerationResult
    level: int
    similarity: float | None
    quality: float
    queue_s: float
    compute_s: float
    k_opt: int = 0  # the level its neighbour's similarity tolerates (0: a miss)


@dataclass
class _Pending:
    prompt: str
    tenant: str
    embedding: np.ndarray
    hit: CacheHit | None
    future: asyncio.Future
    arrival: float
    seed: int
    handle: JobHandle | None = None


@dataclass
class Counters:
    by_outcome: dict[str, int] = field(
        default_factory=lambda: {"served": 0, "late": 0, "refused": 0, "dropped": 0}
    )
    cache_hits: int = 0
    lookups: int = 0
    retried: int = 0  # requests put back in a queue because their worker was lost
    cache_update_failures: int = 0  # served answers whose cache insert or commit failed
    loop_errors: int = 0  # scheduler or re-plan iterations that raised (logged, survived)
    batch_timeouts: int = 0  # batches given up on after BATCH_TIMEOUT_FACTOR x their prediction
    planner_ms: list[float] = field(default_factory=list)


class Runtime:
    def __init__(
        self,
        workers: Workers,
        cache: ApproxCache,
        embedder: Embedder,
        policy: Policy,
        setting: Setting,
        quality: QualityModel,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        expected_qpm: float = 1.0,
    ) -> None:
        self.workers, self.cache, self.embedder = workers, cache, embedder
        self.policy, self.setting, self.quality = policy, setting, quality
        self.clock = clock
        self.levels = setting.profiles[0].levels
        self.dispatcher = Dispatcher.create(setting.profiles, policy.dispatch)
        self.estimator = policy.estimator(self.levels, setting.slo_s)
        self.rng = np.random.default_rng(seed)
        self.pending: dict[int, _Pending] = {}
        self.ids = itertools.count()
        self.counters = Counters()
        self.started = clock()  # then the first request's arrival, as the simulator's start
        self.first_arrival: float | None = None
        self._arrived = asyncio.Event()
        self.planned_for: Demand | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._batches: set[asyncio.Task] = set()  # running batches, kept so none is collected
        self._levels_sent: tuple[int | None, ...] | None = None
        # every cache call (index, latent files with fsync, SQLite commits) runs on this one
        # thread, in order: off the event loop, and never two at once on the index
        self._cache_thread = ThreadPoolExecutor(1, thread_name_prefix="promptserve-cache")
        # the embedder's torch work on one thread of its own, one intra-op thread (engine.threads)
        self._embed_thread = ComputeThread("promptserve-embed", 1)
        self._to_embed: list[tuple[str, str, asyncio.Future]] = []  # prompt, tenant, answer
        self._embedding: asyncio.Task | None = None  # the task embedding queued prompts
        self.plan: Plan | None = None
        self._plan(first_demand(expected_qpm, self.levels))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._schedule()), asyncio.create_task(self._replan())]

    @property
    def tasks(self) -> tuple[asyncio.Task, ...]:
        """The scheduler and re-plan loops."""
        return tuple(self._tasks)

    def loops_alive(self) -> bool:
        """Both loops running: ``/readyz`` answers unready otherwise."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    async def stop(self) -> None:
        for task in [*self._tasks, *self._batches]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._batches, return_exceptions=True)
        self._cache_thread.shutdown(wait=True)  # the writes already begun finish

    async def _on_cache(self, fn: Callable, *args: object):  # noqa: ANN202 - fn's own result
        return await asyncio.get_running_loop().run_in_executor(self._cache_thread, fn, *args)

    async def _embed(self, prompt: str, tenant: str) -> np.ndarray:
        """The prompt's embedding, kept in the tenant's namespace. Prompts that arrive while a
        call is running wait for the next one, and go in it together: one forward pass for a
        burst, not one per request."""
        future = asyncio.get_running_loop().create_future()
        self._to_embed.append((prompt, tenant, future))
        if self._embedding is None or self._embedding.done():
            self._embedding = asyncio.create_task(self._embed_queued())
        return await future

    async def _embed_queued(self) -> None:
        while self._to_embed:
            batch, self._to_embed = self._to_embed, []
            prompts, tenants = [p for p, _, _ in batch], [t for _, t, _ in batch]
            try:
                vecs = await self._embed_thread.run(self.embedder.embed, prompts, tenants)
            except Exception as exc:  # every waiting request hears it
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), vec in zip(batch, vecs, strict=True):
                if not future.done():
                    future.set_result(vec)

    async def submit(
        self,
        prompt: str,
        tenant: str,
        slo_s: float,
        handle: JobHandle | None = None,
        exact: bool = False,
    ) -> Served:
        """One image; ``exact``: a full generation, never started from a cached latent (the
        API's ``quality: high``); it still leaves its latents to the cache."""
        try:
            future = await self._intake(prompt, tenant, slo_s, handle, exact)
        except Exception as exc:  # refused, or failed before queueing: a job hears it too
            if handle is not None and handle.accepted is not None and not handle.accepted.done():
                handle.accepted.set_exception(exc)
            raise
        return await future

    async def _intake(
        self,
        prompt: str,
        tenant: str,
        slo_s: float,
        handle: JobHandle | None,
        exact: bool = False,
    ) -> asyncio.Future:
        """Embed, look up, route, admit and queue; the future the answer will come on."""
        now = self.clock()
        self._note_arrival(now)
        vec = await self._embed(prompt, tenant)
        hit = await self._lookup(tenant, vec, exact)
        k_opt = engine_level(hit.k_opt, self.workers) if hit else 0
        has_neighbour = self._has_neighbour(hit)
        self._check_meetable(slo_s, has_neighbour)
        job_id = next(self.ids)
        assert self.plan is not None
        future = asyncio.get_running_loop().create_future()
        self.pending[job_id] = _Pending(prompt, tenant, vec, hit, future, now, job_id, handle)
        job, queued = intake(
            job_id,
            now,
            now + slo_s,
            k_opt,
            has_neighbour,
            self.plan,
            self.dispatcher,
            self.estimator,
            self.policy.admission,
            float(self.rng.random()),
        )
        if not queued:
            del self.pending[job_id]
            self.counters.by_outcome["refused"] += 1
            raise Refused(retry_after_s=max(1.0, self._backlog_s(now)))
        self._accepted(handle, job_id, job.level, hit)
        self._wake.set()
        return future

    async def _lookup(self, tenant: str, vec: np.ndarray, exact: bool) -> CacheHit | None:
        """Its cached neighbour (None for an exact request: it runs as a miss does)."""
        if exact:
            return None
        hit = await self._on_cache(self.cache.lookup, tenant, vec)
        self.counters.lookups += 1
        return hit

    def _has_neighbour(self, hit: CacheHit | None) -> bool:
        """Whether the request may start from its neighbour at any level, as the policy assumes
        of a neighbour; one that lacks a level (written before entries took their neighbour's
        lower levels, or whose neighbour was evicted meanwhile) counts as none."""
        return hit is not None and self.cache.holds_every(hit.entry, self.workers.levels)

    @staticmethod
    def _accepted(handle: JobHandle | None, job_id: int, level: int, hit: CacheHit | None) -> None:
        """Tell a job's caller it is queued: its id, the level it was routed to."""
        if handle is None:
            return
        handle.job_id = job_id
        if handle.accepted is not None:
            handle.accepted.set_result(job_id)
        handle.emit("queued", {"level_k": level, "similarity": hit.similarity if hit else None})

    def _check_meetable(self, slo_s: float, has_neighbour: bool) -> None:
        """Refuse for good (not 429: retrying cannot help) a deadline below the fastest run."""
        profile = self.setting.profiles[0]
        level = self.levels[-1] if has_neighbour else 0
        fastest = profile.batch_latency(level, 1) + DELIVERY_MARGIN_S
        if slo_s < fastest:
            self.counters.by_outcome["refused"] += 1
            raise Unmeetable(slo_s, fastest)

    def cancel(self, handle: JobHandle) -> bool:
        """Cancel a request: out of its queue at once, or between two denoising steps."""
        handle.cancelled = True
        if handle.job_id is None or handle.job_id not in self.pending:
            return False
        if self.dispatcher.remove(handle.job_id) is not None:
            self._fail(handle.job_id, Cancelled("cancelled while queued"))
        return True

    def queue_lengths(self) -> dict[int, int]:
        return {k: self.dispatcher.queue_len(k) for k in self.levels}

    def gpus_per_level(self) -> dict[int, int]:
        return {k: sum(1 for g in self.dispatcher.gpus if g.level == k) for k in self.levels}

    def _backlog_s(self, now: float) -> float:
        return min(
            (
                self.dispatcher.predicted_finish(k, now) - now
                for k in self.dispatcher.serving_levels()
            ),
            default=1.0,
        )

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
            if self.plan is None:  # no plan to keep: the server cannot start
                raise
            log.exception("planning failed; keeping the current plan")
            self.counters.loop_errors += 1
            return None
        self.counters.planner_ms.append((time.perf_counter() - t0) * 1e3)
        return plan

    def _apply(self, up: list[int], plan: Plan | None) -> None:
        if plan is None:
            return
        self.plan = plan
        levels: list[int | None] = [None] * len(self.dispatcher.gpus)
        for i, level in zip(up, plan.gpu_levels, strict=True):
            levels[i] = level
        now = self.clock()
        switching = switch_s(self.policy, self.setting.profiles[0])
        if apply_levels(self.dispatcher, now, levels, switching):
            self._wake.set()  # the scheduler polls; a switching GPU is dispatched once ready

    def _note_arrival(self, now: float) -> None:
        """The first request starts the estimator's span and the re-plan grid (``until_replan``),
        as the simulator's first arrival does; idle time before it counts for neither."""
        if self.first_arrival is None:
            self.first_arrival = self.started = now
            self._arrived.set()

    async def _until_replan(self, period: float) -> bool:
        """Sleep to the next re-plan on the grid (True); before any request, until the first
        arrival or a period (False: nothing to plan for, the forecast's plan stands)."""
        if self.first_arrival is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await self._arrived.wait()
            return False
        await asyncio.sleep(until_replan(self.clock(), self.first_arrival, period))
        return True

    async def _replan(self) -> None:
        """Every period: re-plan from the estimate, take back workers that answer again, and
        tell the workers their levels (a runtime setting: nothing reloads)."""
        period = self.policy.replan_s or 5.0
        while True:
            await self._push_levels()  # first, so a new server's workers hear the first plan
            if self._any_down():
                await asyncio.sleep(min(period, 1.0))
            elif not await self._until_replan(period):
                continue
            try:
                await self._replan_once()
            except Exception:  # one failed iteration must not end the loop
                log.exception("re-plan iteration failed")
                self.counters.loop_errors += 1

    async def _replan_once(self) -> None:
        alive = await self.workers.alive() if self._any_down() else []  # ping only then
        back = [i for i, ok in enumerate(alive) if ok and not self.dispatcher.gpus[i].up]
        for i in back:
            self.dispatcher.set_up(i, True)
            log.warning("worker %d is back; re-planning with it", i)
        await self._plan_off_loop(
            self.estimator.estimate(self.clock(), self.started), force=bool(back)
        )
        self._wake.set()

    def _any_down(self) -> bool:
        return len(self.dispatcher.up_gpus()) < len(self.dispatcher.gpus)

    async def _push_levels(self) -> None:
        levels = tuple(g.level for g in self.dispatcher.gpus)
        if levels != self._levels_sent:
            try:
                await self.workers.set_levels(levels)
                self._levels_sent = levels
            except Exception:  # informational for the workers: the batches carry their level
                log.exception("could not tell the workers their levels")

    async def _schedule(self) -> None:
        while True:
            try:
                self._schedule_once()
            except Exception:  # one failed step must not end the loop
                log.exception("scheduler step failed")
                self.counters.loop_errors += 1
            self._wake.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # lands as the wake-up fires, and stop() would then wait on this loop for ever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await self._wake.wait()

    def _schedule_once(self) -> None:
        dispatches, outcomes = self.dispatcher.step(self.clock())
        for outcome in outcomes:
            self._fail(outcome.job.id, Dropped("the deadline can no longer be met"))
            self.counters.by_outcome["dropped"] += 1
        for d in dispatches:
            task = asyncio.create_task(self._run(d))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _items(
        self, dispatch: Dispatch, pendings: list[_Pending]
    ) -> tuple[list[GenerationItem], list[StoreRefs] | None]:
        """The batch's items and, on a shared store, their refs (on the cache thread)."""
        pairs = [self._item_for(p, dispatch.level) for p in pendings]
        refs = [ref for _, ref in pairs] if self.workers.shared_store else None
        return [item for item, _ in pairs], refs  # type: ignore[return-value]

    def _item_for(self, p: _Pending, level: int) -> tuple[GenerationItem, StoreRefs | None]:
        """One request's item at ``level`` (on the cache thread). In-process, its start latent
        is read here; workers on a shared store get the key to read and the entry to write,
        and the arrays never pass through here. A missing latent: from noise (K = 0)."""
        at_level = p.hit is not None and level > 0
        ref = None
        if self.workers.shared_store:
            key = p.hit.entry.latent_keys.get(level) if at_level else None
            keep = worth_caching(p.hit.similarity if p.hit else None)
            pinned = p.hit.entry.id if key else None
            if pinned is not None:  # the worker reads it later: eviction must wait for it
                self.cache.pin(pinned)
            ref = StoreRefs(key, p.tenant, self.cache.reserve() if keep else None, pinned)
            k, latent = (level if key else 0), None
        else:
            latent = self.cache.latent(p.hit.entry, level) if at_level else None
            k = level if latent is not None else 0
        wanted = p.handle.partial_images if p.handle is not None else 0
        previews = preview_steps(k, self.workers.total_steps, wanted)
        return GenerationItem(p.prompt, k, latent, seed=p.seed, previews=previews), ref

    async def _run(self, dispatch: Dispatch) -> None:
        try:
            pendings = [self.pending[j.id] for j in dispatch.jobs]
            items, refs = await self._on_cache(self._items, dispatch, pendings)
        except Exception as exc:  # the batch cannot start: its requests fail, the GPU is free
            log.exception("could not prepare a batch")
            self._fail_batch(dispatch, exc)
            return
        started = self.clock()
        handles = [p.handle for p in pendings]
        loop = asyncio.get_running_loop()
        for h, item in zip(handles, items, strict=True):
            if h is not None:
                h.emit("level", {"level_k": item.k})

        def on_step(step: int, previews: dict[int, bytes] | None = None) -> None:  # worker thread
            if all(h is not None and h.cancelled for h in handles):
                raise Cancelled("cancelled while denoising")
            for row, png in (previews or {}).items():
                if handles[row] is not None:
                    loop.call_soon_threadsafe(handles[row].emit, "preview", {"png": png})
            for h in handles:
                if h is not None:
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
        except TimeoutError:
            self.counters.batch_timeouts += 1
            self._fail_batch(dispatch, TimeoutError(f"the batch ran over {timeout_s:.0f} s"))
            return
        except WorkerLost as lost:  # the batch did not run: back to its queues, GPU out
            log.warning("%s; %d requests go back to their queues", lost, len(dispatch.jobs))
            self.dispatcher.fail_gpu(self.clock(), dispatch.gpu)
            self.counters.retried += len(dispatch.jobs)
            for h in handles:
                if h is not None:
                    h.emit("retry", {"reason": str(lost)})
            self._plan(
                self.planned_for or self.estimator.estimate(self.clock(), self.started), force=True
            )
            self._wake.set()
            return
        except Exception as exc:  # a worker failure: these requests fail explicitly, once
            self._fail_batch(dispatch, exc)
            return
        now = self.clock()
        outcomes = self.dispatcher.on_batch_done(now, dispatch)
        answered = []
        for i, (outcome, item, result) in enumerate(zip(outcomes, items, results, strict=True)):
            self.pending.pop(outcome.job.id, None)
            p = pendings[i]
            answered.append((p, item, result, refs[i] if refs else None))
            late = now > request_deadline(outcome.job)
            self.counters.by_outcome["late" if late else "served"] += 1
            self.counters.cache_hits += int(p.hit is not None and result.k > 0)
            quality = self.quality.q(outcome.job.k_opt, result.k)
            served = Served(
                result,
                result.k,
                p.hit.similarity if p.hit else None,
                quality,
                started - p.arrival,
                now - started,
                outcome.job.k_opt,
            )
            if p.future.done():
                continue
            if p.handle is not None and p.handle.cancelled:
                p.future.set_exception(Cancelled("cancelled while denoising"))
            else:
                p.future.set_result(served)
        self._wake.set()
        await self._on_cache(self._remember_all, answered, now)  # after the answers went out

    async def _release(self, refs) -> None:  # noqa: ANN001 - StoreRefs of a run, or None
        """Unpin the cache entries a finished (or failed) run read its start latents from."""
        ids = [r.pinned for r in refs or () if r.pinned is not None]
        if ids:
            await self._on_cache(lambda: [self.cache.unpin(i) for i in ids])

    def _remember_all(
        self,
        answered: list[tuple[_Pending, GenerationItem, GenerationResult, StoreRefs | None]],
        now: float,
    ) -> None:
        """The cache updates of a finished batch, on the cache thread."""
        for p, item, result, ref in answered:
            try:
                self._remember(p, item, result, ref, now)
            except Exception:  # the cache is an optimisation: the answer already went out
                log.exception("cache update failed for a served request")
                self.counters.cache_update_failures += 1

    def _remember(
        self,
        p: _Pending,
        item: GenerationItem,
        result: GenerationResult,
        ref: StoreRefs | None,
        now: float,
    ) -> None:
        keep = worth_caching(p.hit.similarity if p.hit else None)
        if ref is None:
            remember(self.cache, p.tenant, p.embedding, p.hit, item, result, now, insert=keep)
            return
        if p.hit is not None and item.k > 0 and result.k == 0:
            self.cache.drop(p.hit.entry.id)  # the worker found its latent missing or corrupt
        elif p.hit is not None and result.k > 0:
            self.cache.record_hit(p.hit.entry.id, result.k, now)
        if result.store_error is not None:
            self.cache.skip_write(result.store_error)
        elif result.stored and keep:
            source = resumed_from(p.hit, result)
            self.cache.commit(
                p.tenant, p.prompt, p.embedding, ref.entry_id, result.stored, now, source
            )

    def _fail_batch(self, dispatch: Dispatch, exc: Exception) -> None:
        self.dispatcher.on_batch_done(self.clock(), dispatch)
        for job in dispatch.jobs:
            self._fail(job.id, exc)
        self._wake.set()

    def _fail(self, job_id: int, exc: Exception) -> None:
        p = self.pending.pop(job_id, None)
        if p is not None and not p.future.done():
            p.future.set_exception(exc)
