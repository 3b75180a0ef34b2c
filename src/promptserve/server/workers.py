"""Where the runtime's work runs: engine workers behind one small interface.

The runtime (planner, router, batcher, step scheduler) owns the decisions; a ``Workers`` owns
the execution of one batch (``run``) or one step (``advance``) on one GPU. ``LocalWorkers``
runs each GPU's work on its own in-process engine and thread;
``promptserve.distributed.RayWorkers`` runs it on Ray Serve replicas. A worker that vanishes
mid-batch raises ``WorkerLost``: the runtime requeues the work instead of failing it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from promptserve.engine.base import Engine, GenerationItem, GenerationResult, Guidance
from promptserve.engine.threads import ComputeThread, torch_threads_for
from promptserve.profile import Profile
from promptserve.server.stepworkers import Joins, StepDone, advance

# called once per denoising step, with the previews of that step by row when any were asked
# for (``GenerationItem.previews``); raising stops the batch
OnStep = Callable[..., None]
Items = Sequence[GenerationItem]
Results = list[GenerationResult]


@dataclass(frozen=True)
class StoreRefs:
    """For workers that read and write the shared latent store themselves: the cached latent a
    run starts from (None: from noise), and the entry its captured latents are written to."""

    start_key: str | None
    tenant: str
    entry_id: int | None  # None: nothing to write (an exact repeat adds nothing to the cache)
    # the cache entry ``start_key`` belongs to, pinned against eviction until the run has read it
    pinned: int | None = None


Refs = Sequence[StoreRefs] | None  # one per item, for workers on the shared store


class WorkerLost(Exception):
    """The worker running a batch is gone (process died, node lost): the batch did not run."""

    def __init__(self, gpu: int, reason: str) -> None:
        super().__init__(f"worker {gpu} lost: {reason}")
        self.gpu = gpu


class Workers(Protocol):
    name: str
    total_steps: int
    levels: tuple[int, ...]
    profile: Profile
    count: int
    shared_store: bool  # True: runs take StoreRefs and move latents through the store
    speedup: float  # the engines run this many times faster than ``profile`` (modelled only)
    guidance: Guidance  # what a request's guidance scale means for the model, and its range
    native: tuple[int, int]  # the model's own (width, height): a look without a size
    sizes: tuple[tuple[int, int], ...]  # (width, height) served; the first is ``auto``'s
    adapters: tuple[str, ...]  # the LoRA adapters a request may name

    async def run(self, gpu: int, items: Items, on_step: OnStep, refs: Refs = None) -> Results: ...

    async def advance(
        self,
        gpu: int,
        joins: Joins,
        refs: Refs,
        cancels: set,
        steps: int = 1,
        interrupt: threading.Event | None = None,
        retimes: Mapping[Hashable, int] | None = None,
    ) -> StepDone:
        """Step-level serving: one boundary (cancels leave, joins join, ``retimes`` re-interval
        running members) and one step, or up to
        ``steps`` where the workers can stop at ``interrupt`` (``stepworkers.advance``); the
        answer's ``ran`` says how many ran."""
        ...

    def prepare_steps(self) -> None:
        """Build what ``advance`` runs, at start-up rather than in the first request."""
        ...

    async def set_levels(self, levels: Sequence[int | None]) -> None: ...

    async def alive(self) -> list[bool]: ...


class LocalWorkers:
    """Logical GPUs in this process, one engine each, each computing on its own long-lived
    thread (``engine.threads``: a batch that lands on any pool thread slows torch on the CPU).
    An engine holds its own scheduler state, so two batches never share one; a stateless engine
    (the modelled one) may stand for every worker."""

    shared_store = False

    def __init__(
        self,
        engines: Sequence[Engine],
        profile: Profile,
        threads: Sequence[ComputeThread] | None = None,
    ) -> None:
        if not engines:
            raise ValueError("LocalWorkers needs at least one engine")
        self.engines, self.profile, self.count = list(engines), profile, len(engines)
        self.threads = list(threads or compute_threads(self.count, torch_threads_for(self.count)))
        first = self.engines[0]
        self.name, self.total_steps, self.levels = first.name, first.total_steps, first.levels
        self.speedup, self.guidance = first.speedup, first.guidance_spec
        self.native, self.sizes, self.adapters = first.native, first.sizes, first.adapters
        self.runners: dict[int, object] = {}  # step runners (``prepare_steps``)

    async def run(self, gpu: int, items: Items, on_step: OnStep, refs: Refs = None) -> Results:
        return await self.threads[gpu].run(self.engines[gpu].generate, items, on_step)

    async def advance(
        self,
        gpu: int,
        joins: Joins,
        refs: Refs,
        cancels: set,
        steps: int = 1,
        interrupt: threading.Event | None = None,
        retimes: Mapping[Hashable, int] | None = None,
    ) -> StepDone:
        """Runner ``gpu`` steps on thread ``gpu``, the one that built its engine."""
        runner = self.runners[gpu]
        return await self.threads[gpu].run(
            advance, runner, joins, cancels, steps, interrupt, retimes
        )

    def prepare_steps(self) -> None:
        """Each engine's step runner, built on the thread that built the engine."""
        for g, (thread, engine) in enumerate(zip(self.threads, self.engines, strict=True)):
            if g not in self.runners:
                self.runners[g] = thread.call(engine.step_runner, self.profile)

    async def set_levels(self, levels: Sequence[int | None]) -> None:
        """One engine resumes at any level: nothing to tell it."""

    async def alive(self) -> list[bool]:
        """A worker answers once its thread is free (a batch that overran may still run)."""
        return [t.idle for t in self.threads]


def compute_threads(count: int, torch_threads: int) -> list[ComputeThread]:
    return [ComputeThread(f"promptserve-gpu{i}", torch_threads) for i in range(count)]
