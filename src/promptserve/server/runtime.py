"""The live runtime's core: a request's way in and out, the same for both policy families.

Translation only: admission, routing, batching, planning and step scheduling are the objects
of ``promptserve.policy`` that the simulator drives too. This core embeds and looks up each
request, hands it to its family's scheduler (``pinned.py``: GPUs at levels, batches;
``stepruntime.py``: one running batch per GPU, joins between steps), and answers it once:
served, late, refused, dropped, cancelled or failed. Lookups run on a thread of their own;
the cache's reads of start latents and its writes run in order on one cache thread, the writes
queued by answered runs going in one group per trip (``_on_cache_later``). Both are off the
event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from promptserve.cache.approx import ApproxCache, CacheHit
from promptserve.cache.embed import Embedder
from promptserve.engine.base import PLAIN, GenerationItem, GenerationResult, Look, cache_space
from promptserve.engine.runner import engine_level
from promptserve.engine.sizes import label, shape_index, shape_table
from promptserve.policy import Policy, Setting, Status
from promptserve.policy.contract import Arrival, LoadSnapshot, Scheduler
from promptserve.policy.intake import DELIVERY_MARGIN_S, request_deadline
from promptserve.policy.planning import first_demand, until_replan
from promptserve.policy.types import Demand, Job
from promptserve.profile import for_sizes
from promptserve.quality import QualityModel, kept_by_intervals
from promptserve.server.burst import Burst
from promptserve.server.cachework import item_for, pinned_by, remember_run
from promptserve.server.clock import Pause, wall_pause
from promptserve.server.embedding import BurstEmbedder
from promptserve.server.requests import (
    Cancelled,
    Counters,
    Dropped,
    JobHandle,
    Pending,
    Refused,
    Served,
    Unmeetable,
)
from promptserve.server.workers import StoreRefs, Workers

log = logging.getLogger(__name__)

DOWN_POLL_S = 1.0  # how often a lost worker is asked whether it is back

__all__ = [
    "Cancelled",
    "Counters",
    "Dropped",
    "JobHandle",
    "LiveRuntime",
    "LoadSnapshot",
    "Pending",
    "Refused",
    "Served",
    "Unmeetable",
]


def random_seed() -> int:
    """A default seed: random, so that a seed tells a tenant nothing of how many images the
    server made for others (a counter did); the answer carries it, so the image reproduces."""
    return secrets.randbelow(2**32)


class LiveRuntime:
    """The shared core, over the policy's scheduler. A family implements ``_build``, ``start``
    and ``_placed``, runs the work, and answers it through ``_serve``."""

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
        pause: Pause = wall_pause,
        seeds: Callable[[], int] = random_seed,
    ) -> None:
        """``clock`` and ``pause`` are every reading of time and every wait of the loops: a
        test drives the runtime on a clock of its own by passing both. ``seeds`` gives an
        image's seed where its request names none."""
        self.workers, self.cache = workers, cache
        self.guidance = workers.guidance  # read once: workers without it fail here, not mid-run
        # the sizes as the policy times them: a request's ``shape`` is its size's index here
        self.shapes = shape_table(workers.native, workers.sizes)
        # the adapters as the policy counts them (``policy.residency``): ids from 1
        self.adapter_ids = {name: i + 1 for i, name in enumerate(workers.adapters)}
        if len(setting.profiles[0].shape_weights) != len(self.shapes):
            profiles = tuple(for_sizes(p, self.shapes) for p in setting.profiles)
            setting = dataclasses.replace(setting, profiles=profiles)
        self.pause, self.seeds = pause, seeds
        self.policy, self.setting, self.quality = policy, setting, quality
        self.clock = clock
        self.levels = setting.profiles[0].levels
        self.sched = policy.scheduler(setting, seed)  # the contract of ``policy.contract``
        if not isinstance(self.sched, Scheduler):
            raise TypeError(f"{policy.name}'s scheduler does not keep the scheduler contract")
        self.estimator = self.sched.estimator
        self.pending: dict[int, Pending] = {}
        self.ids = itertools.count()
        self.counters = Counters()
        self.started = clock()  # then the first request's arrival, as the simulator's start
        self.first_arrival: float | None = None
        self._arrived = asyncio.Event()
        self.planned_for: Demand | None = None  # the demand of the last plan or price
        self._tasks: list[asyncio.Task] = []
        self._batches: set[asyncio.Task] = set()  # running work, kept so none is collected
        # every cache call but lookups (latent files, SQLite commits) runs on this one thread,
        # in order, off the event loop; lookups on their own, after the writes queued before them
        self._cache_thread = ThreadPoolExecutor(1, thread_name_prefix="promptserve-cache")
        self._lookup_thread = ThreadPoolExecutor(1, thread_name_prefix="promptserve-lookup")
        self._writes: set[asyncio.Future] = set()  # queued by ``_on_cache_later``
        self._later: list[tuple[Callable, tuple]] = []  # writes the next trip takes together
        self._later_lock = threading.Lock()
        self._trip_queued = False
        self._embed = BurstEmbedder(embedder)
        self._lookups: Burst[tuple[str, np.ndarray], CacheHit | None] = Burst(self._lookup_many)
        self._build(first_demand(expected_qpm, self.levels))

    # -- what a family does --------------------------------------------------------------

    def _build(self, demand: Demand) -> None:
        """The family's scheduler, planned (or priced) for the operator's forecast, before any
        request is seen."""
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def _placed(self, arrival: Arrival) -> None:
        """Wake what runs a request the scheduler took in."""
        raise NotImplementedError

    def _place(
        self,
        job_id: int,
        now: float,
        deadline_s: float,
        k_opt: int,
        has_neighbour: bool,
        shape: int = 0,
        adapters: tuple[int, ...] = (),
        exact: bool = False,
    ) -> tuple[Job, Exception | None]:
        """Hand the request to the scheduler: the job as placed, or why it ends at once."""
        arrival = self.sched.intake(
            now, job_id, deadline_s, k_opt, has_neighbour, shape, adapters, exact
        )
        if arrival.ended is None:
            self._placed(arrival)
            return arrival.job, None
        if arrival.ended.status == Status.REFUSED:
            return arrival.job, self._refused(now)
        self.counters.by_outcome["dropped"] += 1
        return arrival.job, Dropped("the deadline cannot be met at any level")

    def _withdraw(self, job_id: int) -> bool:
        """Take a cancelled job out of the scheduler; True when it is out for good (it never
        ran, or its worker was told to drop it), so it can be answered now."""
        return self.sched.remove(job_id) is not None

    @property
    def embedder(self) -> Embedder:
        return self._embed.embedder

    @embedder.setter
    def embedder(self, embedder: Embedder) -> None:  # a test's instrumented embedder
        self._embed.embedder = embedder

    def load(self) -> LoadSnapshot:
        return self.sched.snapshot()

    # -- the request's way in -------------------------------------------------------------

    @property
    def tasks(self) -> tuple[asyncio.Task, ...]:
        """The scheduling loops."""
        return tuple(self._tasks)

    def loops_alive(self) -> bool:
        """Every loop running: ``/readyz`` answers unready otherwise."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    async def stop(self) -> None:
        for task in [*self._tasks, *self._batches]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._batches, return_exceptions=True)
        await asyncio.gather(*self._writes, return_exceptions=True)  # the queued writes land
        await self._on_cache(self.cache.sync)  # and the durability window closes
        self._cache_thread.shutdown(wait=True)
        self._lookup_thread.shutdown(wait=True)

    async def _on_cache(self, fn: Callable, *args: object):  # noqa: ANN202 - fn's own result
        return await asyncio.get_running_loop().run_in_executor(self._cache_thread, fn, *args)

    def _on_cache_later(self, fn: Callable, *args: object) -> None:
        """Queue cache work nobody waits for (a served run's writes): the GPU takes its next
        work at once. What is queued before the cache thread gets to it goes in one trip and
        one group (one manifest transaction, folder fsyncs once a window: ``ApproxCache.group``), so
        the more answers come at once, the fewer commits each costs. A trip is queued on the
        cache thread when its first write is, so cache work queued after a write still runs
        after it; ``stop`` lets the queued trips finish."""
        with self._later_lock:
            self._later.append((fn, args))
            if self._trip_queued:
                return
            self._trip_queued = True
        future = asyncio.get_running_loop().run_in_executor(self._cache_thread, self._write_later)
        self._writes.add(future)
        future.add_done_callback(self._writes.discard)

    def _write_later(self) -> None:
        """One trip of queued writes, on the cache thread, as one group."""
        with self._later_lock:
            batch, self._later, self._trip_queued = self._later, [], False
        self.counters.write_trips += 1
        try:
            with self.cache.group():  # writes nested in it commit here, once
                for fn, args in batch:
                    fn(*args)
        except Exception:  # nobody awaits this trip: log and count it, never lose it silently
            log.exception("cache commit failed for a trip of %d writes", len(batch))
            self.counters.cache_update_failures += len(batch)

    async def submit(
        self,
        prompt: str,
        tenant: str,
        slo_s: float,
        handle: JobHandle | None = None,
        exact: bool = False,
        seed: int | None = None,
        look: Look = PLAIN,
    ) -> Served:
        """One image, due ``slo_s`` from now; ``exact``: a full generation, never started from
        a cached latent (the API's ``quality: high``); it still leaves its latents to the
        cache. ``look``: its negative prompt, guidance, size and adapters; it resumes only
        from neighbours made with the same look."""
        try:
            future = await self._intake(prompt, tenant, slo_s, handle, exact, seed, look)
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
        seed: int | None = None,
        look: Look = PLAIN,
    ) -> asyncio.Future:
        """Embed, look up, admit and place; the future the answer will come on."""
        now = self.clock()
        self._note_arrival(now)
        vec = await self._embed.embed(prompt, tenant)
        embedded = self.clock()
        self.counters.stage("embed", embedded - now)
        space = cache_space(tenant, look)  # where it looks up, and where its entry goes
        hit = await self._lookup(space, vec, exact)
        looked_up = self.clock()
        self.counters.stage("lookup", looked_up - embedded)
        k_opt = engine_level(hit.k_opt, self.workers) if hit else 0
        has_neighbour = self._has_neighbour(hit)
        self._check_meetable(slo_s, has_neighbour, exact)
        if handle is not None and handle.cancelled:  # while it was embedded or looked up
            raise Cancelled("cancelled before it was queued")
        job_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        seed = self.seeds() if seed is None else seed
        p = Pending(prompt, space, vec, hit, future, now, seed, handle, k_opt, look)
        self.pending[job_id] = p
        shape = shape_index(self.shapes, look.size)
        adapters = tuple(sorted({self.adapter_ids[name] for name, _ in look.lora}))
        job, ended = self._place(
            job_id, now, now + slo_s, k_opt, has_neighbour, shape, adapters, exact
        )
        p.deadline_s = request_deadline(job)
        p.queued_at = self.clock()
        self.counters.stage("intake", p.queued_at - looked_up)
        if ended is not None:
            del self.pending[job_id]
            raise ended
        self._accepted(handle, job_id, job.level, hit)
        return future

    def running_by_size(self) -> dict[str, int]:
        """Requests running now per size (every listed size, 0 where none runs)."""
        counts = {label(s): 0 for s in self.workers.sizes}
        for p in list(self.pending.values()):
            if p.started is not None:
                size = label(p.look.size or self.workers.native)
                counts[size] = counts.get(size, 0) + 1
        return counts

    def _scale_of(self, look: Look) -> float | None:
        """The guidance scale a run used (None: the model has no guidance input)."""
        spec = self.guidance
        if spec.kind == "none":
            return None
        return spec.default if look.guidance is None else look.guidance

    def _refused(self, now: float) -> Refused:
        self.counters.by_outcome["refused"] += 1
        return Refused(retry_after_s=max(1.0, self.sched.backlog_s(now)))

    async def _lookup(self, tenant: str, vec: np.ndarray, exact: bool) -> CacheHit | None:
        """Its cached neighbour (None for an exact request: it runs as a miss does)."""
        if exact:
            return None
        hit = await self._lookups((tenant, vec))
        self.counters.lookups += 1
        return hit

    async def _lookup_many(self, batch: list[tuple[str, np.ndarray]]) -> list[CacheHit | None]:
        """A burst of lookups in one trip to the lookup thread (``Burst``), once the write trips
        queued before it have landed: a request sees every run answered before it arrived, as
        the simulator's requests do."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

        def lookups() -> list[CacheHit | None]:
            return [self.cache.lookup(t, v) for t, v in batch]

        return await asyncio.get_running_loop().run_in_executor(self._lookup_thread, lookups)

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

    def _check_meetable(self, slo_s: float, has_neighbour: bool, exact: bool = False) -> None:
        """Refuse for good (not 429: retrying cannot help) a deadline below the fastest run."""
        level = self.levels[-1] if has_neighbour else 0
        fastest = self._fastest_s(level, exact) + DELIVERY_MARGIN_S
        if slo_s < fastest:
            self.counters.by_outcome["refused"] += 1
            raise Unmeetable(slo_s, fastest)

    def _fastest_s(self, level: int, exact: bool = False) -> float:
        """One request's run alone at ``level``, as the policy plans it."""
        return self.setting.profiles[0].batch_latency(level, 1)

    def cancel(self, handle: JobHandle) -> bool:
        """Cancel a request: out of its queue at once, or between two denoising steps."""
        handle.cancelled = True
        if handle.job_id is None or handle.job_id not in self.pending:
            return False
        if self._withdraw(handle.job_id):
            self._fail(handle.job_id, Cancelled("cancelled"))
        return True

    def _note_arrival(self, now: float) -> None:
        """The first request starts the estimator's span and the re-plan grid (``until_replan``),
        as the simulator's first arrival does; idle time before it counts for neither."""
        if self.first_arrival is None:
            self.first_arrival = self.started = now
            self._arrived.set()

    async def _replan_loop(self) -> None:
        """Every period (every second while a worker is down): take back the workers that
        answer again, then re-plan (pinned) or re-price (step-level) from the estimate."""
        period = self.policy.replan_s or 5.0
        while True:
            await self._sync_workers()  # first, so a new server's workers hear the first plan
            down = self.sched.snapshot().gpus_up < self.workers.count
            if down:
                await self.pause(min(period, DOWN_POLL_S), None)
            elif not await self._until_replan(period):
                continue
            try:
                back = await self._take_back() if down else []
                await self._replan(self.estimator.estimate(self.clock(), self.started), bool(back))
            except Exception:  # one failed iteration must not end the loop
                log.exception("re-plan iteration failed")
                self.counters.loop_errors += 1

    async def _take_back(self) -> list[int]:
        """The lost GPUs whose workers answer again, back in the scheduler."""
        alive = await self.workers.alive()
        back = [g for g, ok in enumerate(alive) if ok and not self._is_up(g)]
        for g in back:
            log.warning("worker %d is back; it takes work again", g)
            self.sched.set_up(g, True, self.clock())
        return back

    def _lose(self, g: int, reason: str) -> list[Job]:
        """A lost worker's GPU leaves the scheduler now (pinned: its batch back in the queues;
        step-level: its members handed back), its callers hear they are retried, and the GPUs
        left are planned or priced for at once."""
        jobs = self.sched.set_up(g, False, self.clock())
        log.warning("GPU %d: %s; %d requests start again", g, reason, len(jobs))
        self._retrying(jobs, reason)
        self._replan_now()
        return jobs

    def _retrying(self, jobs: list[Job], reason: str) -> None:
        for job in jobs:
            p = self.pending.get(job.id)
            if p is None:
                continue
            p.started, p.item, p.ref = None, None, None
            self.counters.retried += 1
            if p.handle is not None:
                p.handle.emit("retry", {"reason": reason})

    def _replan_now(self) -> None:
        """Plan or price for the demand last planned for, on this thread (a lost worker)."""
        raise NotImplementedError

    async def _sync_workers(self) -> None:
        """Tell the workers what they need to know of the plan (pinned: their levels)."""

    async def _replan(self, demand: Demand, force: bool) -> None:
        """The family's plan or price for ``demand`` (``force``: GPUs came back)."""
        raise NotImplementedError

    def _is_up(self, gpu: int) -> bool:
        raise NotImplementedError

    async def _until_replan(self, period: float) -> bool:
        """Sleep to the next re-plan on the grid (True); before any request, until the first
        arrival or a period (False: nothing to plan for, the forecast's plan stands)."""
        if self.first_arrival is None:
            await self.pause(period, self._arrived)
            return False
        await self.pause(until_replan(self.clock(), self.first_arrival, period), None)
        return True

    # -- the request's way out ------------------------------------------------------------

    def _item_for(
        self, p: Pending, level: int, interval: int = 1
    ) -> tuple[GenerationItem, StoreRefs | None]:
        """One request's item at ``level`` and feature-cache ``interval`` (on the cache
        thread)."""
        return item_for(self.cache, self.workers, p, level, interval)

    def _serve(self, p: Pending, result: GenerationResult, started: float, now: float) -> None:
        """Answer a request its run finished: on time or late, and cancelled if its caller
        asked meanwhile (the result is discarded; its latents still go to the cache)."""
        late = now > p.deadline_s
        self.counters.by_outcome["late" if late else "served"] += 1
        self.counters.stage("queue", max(0.0, started - p.queued_at))
        self.counters.stage("run", now - started)
        self.counters.cache_hits += int(p.hit is not None and result.k > 0)
        interval = p.item.interval if p.item is not None else 1
        quality = self.quality.q(p.k_opt, result.k)
        if interval > 1:  # what its intervals keep of the level's quality
            run = self.workers.total_steps - result.k
            quality *= kept_by_intervals(self.setting.interval_q, interval, p.earlier, run)
        served = Served(
            result,
            result.k,
            p.hit.similarity if p.hit else None,
            quality,
            started - p.arrival,
            now - started,
            p.k_opt,
            p.seed,
            self._scale_of(p.look),
            p.look.lora,
            interval,
            p.earlier,
        )
        if p.future.done():
            return
        if p.handle is not None and p.handle.cancelled:
            p.future.set_exception(Cancelled("cancelled while denoising"))
        else:
            p.future.set_result(served)

    async def _release(self, refs) -> None:  # noqa: ANN001 - StoreRefs of a run, or None
        """Unpin the cache entries a finished (or failed) run read its start latents from."""
        ids = pinned_by(refs)
        if ids:
            await self._on_cache(lambda: [self.cache.unpin(i) for i in ids])

    def _remember_all(
        self,
        answered: list[tuple[Pending, GenerationItem, GenerationResult, StoreRefs | None]],
        now: float,
    ) -> None:
        """The cache updates of finished runs, on the cache thread, committed as one group."""
        t0 = time.perf_counter()  # the cache thread's own time, whatever the runtime's clock
        try:
            with self.cache.group():
                for p, item, result, ref in answered:
                    try:
                        remember_run(self.cache, p, item, result, ref, now)
                    except Exception:  # the cache is an optimisation: the answer went out
                        log.exception("cache update failed for a served request")
                        self.counters.cache_update_failures += 1
        except Exception:  # the group's commit
            log.exception("cache commit failed for %d served requests", len(answered))
            self.counters.cache_update_failures += len(answered)
        self.counters.stage("cache_write", time.perf_counter() - t0, len(answered))

    def _fail(self, job_id: int, exc: Exception) -> None:
        p = self.pending.pop(job_id, None)
        if p is not None and not p.future.done():
            p.future.set_exception(exc)
