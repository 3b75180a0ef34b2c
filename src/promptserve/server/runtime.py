"""The live runtime: a request's way in and out, and the loops that run its work.

Translation only: admission, routing, batching, planning and step scheduling are the
scheduler's (``policy.contract``), the one the simulator drives too. This embeds and looks up
each request, hands it to the scheduler as an ``Ask``, hands out what ``schedule`` says to
each GPU's loop (``gpuloops.py``: the same loop for a batch and a run of steps), and answers
each request once: served, late, refused, dropped, cancelled or failed. Lookups and the
cache's reads and writes run on the cache's own threads (``cachethreads.py``), off the event
loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable

import numpy as np

from promptserve.cache.approx import ApproxCache, CacheHit
from promptserve.cache.embed import Embedder
from promptserve.cache.spaces import cache_space
from promptserve.engine.base import PLAIN, EditInput, GenerationItem, Look
from promptserve.engine.runner import engine_level
from promptserve.engine.sizes import shape_index, shape_table
from promptserve.errors import Cancelled
from promptserve.policy import Policy, Setting, Status
from promptserve.policy.contract import Ask, LoadSnapshot, Scheduler
from promptserve.policy.intake import request_deadline
from promptserve.policy.planning import first_demand
from promptserve.policy.types import Demand, Outcome
from promptserve.profile import for_sizes
from promptserve.quality import QualityModel
from promptserve.server.answers import deliver, served
from promptserve.server.burst import Burst
from promptserve.server.cachethreads import CacheThreads
from promptserve.server.cachework import NO_VECTOR, edit_start, item_for, remember_all
from promptserve.server.clock import Pause, wall_pause
from promptserve.server.embedding import BurstEmbedder
from promptserve.server.gpuloops import GpuLoops
from promptserve.server.replans import Replans
from promptserve.server.requests import (
    Counters,
    Dropped,
    JobHandle,
    Pending,
    Refused,
    Served,
    Unmeetable,
    ended_at_once,
    random_seed,
)
from promptserve.server.selection import DEFAULT_CPU_SHARE, LiveSelection
from promptserve.workers.base import StoreRefs, Workers
from promptserve.workers.execute import Executed

log = logging.getLogger(__name__)

RETRY_S = 1.0  # after a scheduling failure, when it is asked again

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


class LiveRuntime:
    """The live driver of the policy's scheduler, whatever its family."""

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
        select_cpu: float = DEFAULT_CPU_SHARE,
        latent_cache: bool = True,
    ) -> None:
        """``clock`` and ``pause`` are every reading of time and every wait of the loops: a
        test drives the runtime on a clock of its own by passing both. ``seeds`` gives an
        image's seed where its request names none; ``latent_cache`` off, none is cached."""
        self.workers, self.latent_cache = workers, latent_cache
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
        self.cache = cache
        self.io = CacheThreads(cache, self.counters)  # the cache's threads
        self.started = clock()  # then the first request's arrival, as the simulator's start
        self.first_arrival: float | None = None
        self.arrived = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.gpus = GpuLoops(self)
        self.replans = Replans(self)
        self._wake_s = math.inf  # look again then without an event (a GPU switching level)
        self._rearm = asyncio.Event()
        self._embed = BurstEmbedder(embedder)
        self._lookups: Burst[tuple[str, np.ndarray], CacheHit | None] = Burst(self._lookup_many)
        if self.sched.stepwise:
            self.workers.prepare_steps()  # at start-up rather than in the first request
        # planned (or priced) for the operator's forecast, before any request is seen: a plan
        # that cannot be made here stops the server from starting
        self.planned_for: Demand | None = first_demand(expected_qpm, self.levels)
        self.sched.replan(clock(), self.planned_for)
        self.selection = LiveSelection.of(  # ``+select``: the rule chosen online
            policy, self.sched, setting, quality, workers.total_steps, select_cpu, self.started
        )

    def start(self) -> None:
        loops = [self.gpus.loop(g) for g in range(self.workers.count)]
        self._tasks = [
            asyncio.create_task(c) for c in (*loops, self.replans.loop(), self._wake_loop())
        ]

    @property
    def embedder(self) -> Embedder:
        return self._embed.embedder

    @embedder.setter
    def embedder(self, embedder: Embedder) -> None:  # a test's instrumented embedder
        self._embed.embedder = embedder

    def load(self) -> LoadSnapshot:
        return self.sched.snapshot()

    @property
    def tasks(self) -> tuple[asyncio.Task, ...]:
        """The scheduling loops."""
        return tuple(self._tasks)

    def loops_alive(self) -> bool:
        """Every loop running: ``/readyz`` answers unready otherwise."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.io.stop()

    # -- handing out work -----------------------------------------------------------------

    def hand_out(self) -> None:
        """What the scheduler decided since it was last asked: work to each GPU's loop, and
        an answer to each request it gave up on. Called after every change of its state."""
        try:
            decided = self.sched.schedule(self.clock())
        except Exception:  # nothing is lost: what it would hand out is asked for again soon
            log.exception("scheduling failed")
            self.counters.loop_errors += 1
            self._wake_s = self.clock() + RETRY_S
            self._rearm.set()
            return
        for outcome in decided.ended:
            self.counters.by_outcome["dropped"] += 1
            self.fail(outcome.job.id, Dropped("the deadline can no longer be met"))
        for work in decided.work:
            self.gpus.hand(work)
        if decided.wake_s != self._wake_s:
            self._wake_s = decided.wake_s
            self._rearm.set()

    async def _wake_loop(self) -> None:
        """Ask the scheduler again when it said to (a GPU switching level is ready), as no
        event would."""
        while True:
            self._rearm.clear()
            await self.pause(max(self._wake_s - self.clock(), 0.0), self._rearm)
            if self.clock() >= self._wake_s:
                self.hand_out()

    # -- the request's way in -------------------------------------------------------------

    async def submit(
        self,
        prompt: str,
        tenant: str,
        slo_s: float,
        handle: JobHandle | None = None,
        exact: bool = False,
        seed: int | None = None,
        look: Look = PLAIN,
        edit: EditInput | None = None,
        batch: bool = False,
    ) -> Served:
        """One image, due ``slo_s`` from now; ``exact``: a full generation, never started from
        a cached latent (the API's ``quality: high``); it still leaves its latents to the
        cache. ``look``: its negative prompt, guidance, size and adapters; it resumes only
        from neighbours made with the same look. ``edit``: an edit of its own image, which
        neither reads nor writes the cache. ``batch``: background work (``priority``)."""
        try:
            args = (exact, seed, look, edit, batch)
            future = await self._intake(prompt, tenant, slo_s, handle, *args)
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
        edit: EditInput | None = None,
        batch: bool = False,
    ) -> asyncio.Future:
        """Embed, look up, admit and place; the future the answer will come on."""
        now = self.clock()
        self.note_arrival(now)
        # an edit starts from its own image: no neighbour to look up, no entry to embed
        cached = edit is None and self.latent_cache
        vec = await self._embed.embed(prompt, tenant) if cached else NO_VECTOR
        embedded = self.clock()
        self.counters.stage("embed", embedded - now)
        space = cache_space(tenant, look)  # where it looks up, and where its entry goes
        hit = await self._lookup(space, vec, exact or not cached)
        looked_up = self.clock()
        self.counters.stage("lookup", looked_up - embedded)
        k_opt = engine_level(hit.k_opt, self.workers) if hit else 0
        if handle is not None and handle.cancelled:  # while it was embedded or looked up
            raise Cancelled("cancelled before it was queued")
        job_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        seed = self.seeds() if seed is None else seed
        p = Pending(prompt, space, vec, hit, future, now, seed, handle, k_opt, look, edit=edit)
        self.pending[job_id] = p
        shape = shape_index(self.shapes, look.size)
        adapters = tuple(sorted({self.adapter_ids[name] for name, _ in look.lora}))
        has = self._has_neighbour(hit)
        start = edit_start(p, self.workers)
        p.paused = handle.resume if handle is not None else None  # a restart found it written
        at = None if p.paused is None else p.paused.step
        ask = Ask(job_id, now + slo_s, k_opt, has, shape, adapters, exact, start, batch, at)
        if self.selection is not None:
            self.selection.observe(now, ask)
        arrival = self.sched.intake(now, ask)
        p.deadline_s = request_deadline(arrival.job)
        p.queued_at = self.clock()
        self.counters.stage("intake", p.queued_at - looked_up)
        if arrival.ended is not None:
            del self.pending[job_id]
            raise ended_at_once(arrival, slo_s, self.counters, lambda: self.sched.backlog_s(now))
        self.hand_out()
        if handle is not None:  # a job's caller hears it is queued, and where it was routed
            handle.accept(job_id, arrival.job.level, hit.similarity if hit else None)
        return future

    async def _lookup(self, tenant: str, vec: np.ndarray, exact: bool) -> CacheHit | None:
        """Its cached neighbour (None for an exact request: it runs as a miss does)."""
        if exact:
            return None
        hit = await self._lookups((tenant, vec))
        self.counters.lookups += 1
        return hit

    async def _lookup_many(self, burst: list[tuple[str, np.ndarray]]) -> list[CacheHit | None]:
        """A burst of lookups in one trip to the lookup thread (``Burst``)."""
        return await self.io.lookup(lambda: [self.cache.lookup(t, v) for t, v in burst])

    def _has_neighbour(self, hit: CacheHit | None) -> bool:
        """Whether it may start from its neighbour at any level, as the policy assumes; one
        that lacks a level (an older entry, or its neighbour evicted meanwhile) counts as none."""
        return hit is not None and self.cache.holds_every(hit.entry, self.workers.levels)

    def cancel(self, handle: JobHandle) -> bool:
        """Cancel a request: out of its queue at once, or between two denoising steps."""
        handle.cancelled = True
        job_id = handle.job_id
        if job_id is None or job_id not in self.pending:
            return False
        self.gpus.cancel(job_id)  # a member: its worker drops it before its next step
        if self.sched.remove(job_id) is not None:  # out for good: answer it now
            self.fail(job_id, Cancelled("cancelled"))
            self.hand_out()
        return True

    def note_arrival(self, now: float) -> None:
        """The first request starts the estimator's span and the re-plan grid (``until_replan``),
        as the simulator's first arrival does; idle time before it counts for neither."""
        if self.first_arrival is None:
            self.first_arrival = self.started = now
            self.arrived.set()

    # -- lost workers (re-plans: ``replans.py``) ------------------------------------------

    def lose(self, g: int, reason: str) -> None:
        """A lost worker's GPU leaves the scheduler now (its jobs placed again: pinned, back in
        their queues; step-level, joining elsewhere), their callers hear they are retried,
        and the GPUs left are planned or priced for at once."""
        self.gpus.forget(g)
        jobs = self.sched.set_up(g, False, self.clock())
        log.warning("GPU %d: %s; %d requests start again", g, reason, len(jobs))
        self.retrying([job.id for job in jobs], reason)
        self.replans.now_for_lost()
        self.hand_out()

    def retrying(self, job_ids: Iterable[int], reason: str) -> None:
        for job_id in job_ids:
            p = self.pending.get(job_id)
            if p is None:
                continue
            p.started, p.item, p.ref = None, None, None
            self.counters.retried += 1
            if p.handle is not None:
                p.handle.emit("retry", {"reason": reason})

    # -- the request's way out ------------------------------------------------------------

    def item_for(
        self, p: Pending, level: int, interval: int = 1
    ) -> tuple[GenerationItem, StoreRefs | None]:
        """One request's item at ``level`` and feature-cache ``interval`` (on the cache
        thread)."""
        return item_for(self.cache, self.workers, p, level, interval)

    def answer(self, outcomes: list[Outcome], executed: Executed | None, now: float) -> None:
        """Answer what a report ended: each served one with its result (its cache updates
        queued after the answers went out), each dropped one with why."""
        answered = []
        for outcome in outcomes:
            job_id = outcome.job.id
            self.gpus.done_with(job_id)
            if outcome.status != Status.SERVED:
                self.counters.by_outcome["dropped"] += 1
                self.fail(job_id, Dropped("the deadline can no longer be met"))
                continue
            result = executed.results.get(job_id) if executed is not None else None
            p = self.pending.pop(job_id, None)
            if p is None:
                continue
            if result is None:  # the policy's model and the worker disagree: never silent
                log.error("request %d left its GPU without a result", job_id)
                self.pending[job_id] = p
                self.fail(job_id, RuntimeError("the run ended without a result"))
                continue
            item = p.item or GenerationItem(p.prompt, result.k, None, seed=p.seed, look=p.look)
            if p.embedding.size:  # an edit's latents are its own image's: never cached
                answered.append((p, item, result, p.ref))
            started = p.started if p.started is not None else p.arrival
            deliver(p, served(p, result, started, now, outcome, self.counters, self))
        if answered:
            self.io.later(remember_all, self.cache, self.counters, answered, now)

    def fail(self, job_id: int, exc: Exception) -> None:
        self.gpus.done_with(job_id)
        p = self.pending.pop(job_id, None)
        if p is not None and not p.future.done():
            p.future.set_exception(exc)
