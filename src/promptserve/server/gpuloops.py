"""Each GPU's loop: take the work the scheduler handed it, ready its items, execute it on the
workers, report. The same loop for every policy (``policy.contract``): a batch and a run of
steps are both a ``Work``; what differs is in ``workers.execute``.

The scheduler is touched only on the event loop, a worker only by its GPU. A work handed to a
GPU that is already running one moves its next boundary earlier (an arrival joins there): the
loop sets the GPU's interrupt, its worker stops after the step it is on, and the report's
boundary takes the joiner. A cancelled member leaves its worker before the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Iterable
from functools import partial
from typing import Protocol

from promptserve.engine.base import GenerationItem, Paused
from promptserve.errors import Cancelled
from promptserve.policy.contract import Outcome, Report, Scheduler, StepWork, Work, moved, starts
from promptserve.server.answers import report_steps
from promptserve.server.cachethreads import CacheThreads
from promptserve.server.clock import Pause
from promptserve.server.requests import Counters, JobHandle, Pending
from promptserve.workers.base import StoreRefs, WorkerLost, Workers
from promptserve.workers.execute import Executed, Prepared, execute, timeout_s

log = logging.getLogger(__name__)


class Host(Protocol):
    """What the loops ask of the runtime they run in (``runtime.LiveRuntime``)."""

    workers: Workers
    sched: Scheduler
    pending: dict[int, Pending]
    counters: Counters
    io: CacheThreads
    clock: Callable[[], float]
    pause: Pause

    def item_for(
        self, p: Pending, level: int, interval: int = 1
    ) -> tuple[GenerationItem, StoreRefs | None]: ...

    def answer(self, outcomes: list[Outcome], executed: Executed | None, now: float) -> None: ...

    def hand_out(self) -> None: ...

    def fail(self, job_id: int, exc: Exception) -> None: ...

    def lose(self, g: int, reason: str) -> None: ...

    def retrying(self, job_ids: Iterable[int], reason: str) -> None: ...


class GpuLoops:
    def __init__(self, runtime: Host) -> None:
        count = runtime.workers.count
        self.rt = runtime
        self.next: list[Work | None] = [None] * count  # handed out, not yet taken
        self.running = [False] * count  # took a work, has not reported it
        self.taken: dict[int, Work] = {}  # per GPU: the work it took and has not reported
        self.wake = [asyncio.Event() for _ in range(count)]
        # set when a boundary is wanted now: a GPU running several steps in one call stops
        # after the step it is on
        self.interrupt = [threading.Event() for _ in range(count)]
        self.cancels: list[set[int]] = [set() for _ in range(count)]  # told to its worker next
        self.holds: list[set[int]] = [set() for _ in range(count)]  # its worker's jobs
        self.where: dict[int, int] = {}  # job -> the GPU whose worker holds it

    def hand(self, work: Work) -> None:
        g = work.gpu
        if self.running[g]:  # its boundary moves earlier: stop after this step
            self.interrupt[g].set()
            return
        self.next[g] = work
        self.wake[g].set()

    def unreported(self) -> dict[int, Work]:
        """Per GPU, the work it was handed and has not reported (taken or waiting to be), as
        the simulator's ``current``: the state a replay starts from (``+select``)."""
        out = dict(self.taken)
        for g, work in enumerate(self.next):
            if work is not None and g not in out:
                out[g] = work
        return out

    def cancel(self, job_id: int) -> None:
        """A cancelled member: its worker drops it before its next step."""
        g = self.where.get(job_id)
        if g is not None:
            self.cancels[g].add(job_id)
            self.interrupt[g].set()

    def forget(self, g: int) -> None:
        """A lost or replaced worker holds nothing of what it held."""
        for job_id in self.holds[g]:
            self.where.pop(job_id, None)
        self.holds[g], self.cancels[g] = set(), set()

    def done_with(self, job_id: int) -> None:
        g = self.where.pop(job_id, None)
        if g is not None:
            self.holds[g].discard(job_id)

    async def loop(self, g: int) -> None:
        while True:
            self.wake[g].clear()  # before taking the work: a hand-out meanwhile is kept
            work, self.next[g] = self.next[g], None
            if work is None and self.cancels[g] and self.rt.sched.stepwise:
                # its worker holds members the scheduler let go: tell it between two steps
                now = self.rt.clock()
                work = StepWork(g, (), (), 0, now, now)
            if work is None:  # idle: no polling, a hand-out wakes it
                await self.rt.pause(math.inf, self.wake[g])
                continue
            self.running[g] = True
            self.taken[g] = work
            self.interrupt[g].clear()
            try:
                await self._run(g, work)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # its jobs fail, once; the loop goes on
                log.exception("loop of GPU %d failed", g)
                self.rt.counters.loop_errors += 1
                try:
                    self._failed(g, work, exc)
                except Exception:
                    log.exception("GPU %d could not fail its jobs", g)
            finally:
                self.running[g] = False
                self.taken.pop(g, None)

    async def _run(self, g: int, work: Work) -> None:
        rt = self.rt
        try:
            prepared = await self._prepare(g, work)
        except Exception as exc:  # it cannot start: its jobs fail, the GPU is free
            log.exception("could not prepare work for GPU %d", g)
            self._failed(g, work, exc)
            return
        executed = None
        try:
            if prepared is not None:
                executed = await self._execute(g, work, prepared)
        finally:  # whoever waits to resume a member paused here may read it now (or never)
            self._written(work, executed.paused if executed is not None else {})
        if executed is None and prepared is not None:
            return  # lost, stuck or failed: dealt with
        if executed is not None:
            self._kept(executed.snapshots)
        report = self._report(g, executed) if executed is not None else Report()
        self.running[g] = False
        now = rt.clock()
        outcomes = rt.sched.update(now, g, report)
        if report.lost:
            rt.retrying(report.lost, "the worker restarted without its members")
        rt.answer(outcomes, executed, now)
        rt.hand_out()

    async def _execute(self, g: int, work: Work, prepared: Prepared) -> Executed | None:
        """The work on its worker; None where it could not end (its GPU lost or stuck, its
        jobs failed: each dealt with here)."""
        rt = self.rt
        limit = timeout_s(work)
        try:
            async with asyncio.timeout(limit):
                try:
                    return await execute(rt.workers, g, work, prepared)
                finally:  # the start latents are read (or never will be): evictable again
                    await rt.io.unpin(list((prepared.refs or {}).values()))
        except TimeoutError:  # its GPU is stuck: out until it answers again, as if lost
            rt.counters.batch_timeouts += 1
            rt.lose(g, f"its batch ran over {limit:.0f} s")
        except WorkerLost as lost:  # its jobs' progress is gone with it: they start again
            rt.lose(g, str(lost))
        except Exception as exc:  # a worker failure: these requests fail explicitly, once
            self._failed(g, work, exc)
        return None

    def _written(self, work: Work, states: dict[int, Paused]) -> None:
        """The members ``work`` paused, each with its state as its worker wrote it (none where
        the work did not get that far: a resume then starts it again, ``Report.started`` says
        where); once per work, as soon as they are written or the work ended."""
        fresh = {}
        for job_id in work.pauses if isinstance(work, StepWork) else ():
            p = self.rt.pending.get(job_id)
            if p is not None and p.writing is not None and not p.writing.is_set():
                p.paused = fresh[job_id] = states.get(job_id)
                p.writing.set()
        for job_id, state in fresh.items():
            if state is None:
                continue
            self.rt.counters.pauses += 1
            p = self.rt.pending.get(job_id)
            if p is not None and p.handle is not None:
                p.handle.emit("paused", {"step": state.step})
        self._kept(fresh)

    def _kept(self, states: dict[int, Paused | None]) -> None:
        """Members written down, to their jobs' store (durable background jobs)."""
        for job_id, state in states.items():
            p = self.rt.pending.get(job_id)
            if state is not None and p is not None and p.handle is not None and p.handle.keep:
                p.handle.keep(state)

    def _report(self, g: int, executed: Executed) -> Report:
        """The worker's report, with the members it no longer holds though the GPU gave
        them to it (a Ray replica restarted between two steps: they are placed again)."""
        report_steps(self.rt.pending, executed, self.rt.workers.total_steps)
        self.holds[g] -= executed.results.keys()
        lost = self.holds[g] - executed.steps_left.keys()
        if not lost:
            return executed.report
        log.warning("GPU %d: its worker lost %d members; they start again", g, len(lost))
        self.cancels[g] |= lost  # in case it still holds any
        for job_id in lost:
            self.done_with(job_id)
        return dataclasses.replace(executed.report, lost=tuple(sorted(lost)))

    async def _prepare(self, g: int, work: Work) -> Prepared | None:
        """The items of the jobs that start (their start latents read on the cache thread),
        the members' new intervals, the cancels to tell; None: nothing to run (a boundary)."""
        rt = self.rt
        joining: list[tuple[int, int, int, Pending]] = []
        resuming: set[int] = set()
        for start in starts(work):
            p = rt.pending.get(start.job.id)
            if p is None:  # cancelled meanwhile
                rt.sched.remove(start.job.id)
                continue
            if start.from_step is None:
                p.paused = None  # it starts afresh (a lost GPU's, or a first join)
            else:
                resuming.add(start.job.id)
                if p.writing is not None:
                    await p.writing.wait()  # paused on a GPU whose call is still running
            joining.append((start.job.id, start.k, start.r, p))
        pauses = set(work.pauses) if isinstance(work, StepWork) else set()
        for job_id in pauses:  # written down by this call, read by the resume that waits
            p = rt.pending.get(job_id)
            if p is not None:
                p.paused, p.writing = None, asyncio.Event()
            self.done_with(job_id)
        if joining:
            await rt.io.call(self._read_items, joining, resuming)
            gone = [p for job_id, _, _, p in joining if job_id not in rt.pending]
            if gone:  # cancelled while its latent was read: it has left the scheduler
                await rt.io.unpin([p.ref for p in gone])
                joining = [j for j in joining if j[0] in rt.pending]
        for m in moved(work):  # a burst: its answer's quality counts what it ran at
            p = rt.pending.get(m.job.id)
            if p is not None and p.item is not None:
                p.item = dataclasses.replace(p.item, interval=m.r)
                rt.counters.reintervals += 1
        cancels, self.cancels[g] = self.cancels[g], set()
        self.holds[g] -= cancels
        if not joining and not self.holds[g] and not cancels and not pauses:
            return None
        now = rt.clock()
        handles = []
        for job_id, _, _, p in joining:
            p.started = now
            self.holds[g].add(job_id)
            self.where[job_id] = g
            handles.append(p.handle)
            if p.handle is not None:
                p.handle.emit("level", {"level_k": p.item.k})  # type: ignore[union-attr]
        heard = any(
            p is not None and p.handle is not None and not p.handle.quiet
            for p in map(rt.pending.get, self.holds[g])
        )
        return Prepared(
            {job_id: p.item for job_id, _, _, p in joining},  # type: ignore[misc]
            {job_id: p.ref for job_id, _, _, p in joining} if rt.workers.shared_store else None,  # type: ignore[misc]
            cancels,
            1 if heard or self.cancels[g] else None,  # a cancel since: stop after a step
            self.interrupt[g],
            self._on_step(handles),
            partial(self._written, work),
            {j for j in self.holds[g] if (h := self._handle(j)) is not None and h.keep},
        )

    def _read_items(self, joining: list, resuming: set[int]) -> None:  # on the cache thread
        for job_id, k, r, p in joining:
            if job_id not in resuming or p.paused is None:
                p.item, p.ref = self.rt.item_for(p, k, r)
                continue
            self.rt.counters.resumes += 1  # it goes on from where it was written down
            if p.item is None:  # a restart's: its item as at K = 0 (nothing read), at its K
                p.item, p.ref = self.rt.item_for(p, 0, r)
                p.item = dataclasses.replace(p.item, k=k)
            p.item = dataclasses.replace(p.item, resume=p.paused)
            if p.ref is not None:  # nothing to read or to pin: the entry to write stays
                p.ref = dataclasses.replace(p.ref, start_key=None, pinned=None)

    def _handle(self, job_id: int) -> JobHandle | None:
        p = self.rt.pending.get(job_id)
        return p.handle if p is not None else None

    def _on_step(self, handles: list) -> object:
        """A batch's per-step callback, on its worker's thread: stop once every caller has
        cancelled, and pass the steps and previews on to those who listen."""
        loop = asyncio.get_running_loop()
        heard = [h for h in handles if h is not None and not h.quiet]
        total = self.rt.workers.total_steps

        def on_step(step: int, previews: dict[int, bytes] | None = None) -> None:
            if all(h is not None and h.cancelled for h in handles):
                raise Cancelled("cancelled while denoising")
            if not heard:
                return
            for row, png in (previews or {}).items():
                if handles[row] is not None:
                    loop.call_soon_threadsafe(handles[row].emit, "preview", {"png": png})
            for h in heard:
                loop.call_soon_threadsafe(h.emit, "step", {"step": step, "of": total})

        return on_step

    def _failed(self, g: int, work: Work, exc: Exception) -> None:
        """Its jobs fail with ``exc`` (each once), its worker drops them, and its GPU reports
        at once: free for the next work."""
        rt = self.rt
        jobs = self.holds[g] | {s.job.id for s in starts(work)}
        for job_id in sorted(jobs):
            rt.sched.remove(job_id)
            rt.fail(job_id, exc)
        self.forget(g)
        self.cancels[g] = jobs  # its worker drops them before its next step
        self.running[g] = False
        rt.sched.update(rt.clock(), g, Report(failed=True))
        rt.hand_out()
