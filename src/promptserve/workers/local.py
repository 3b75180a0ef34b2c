"""Logical GPUs in this process: one engine each, each on its own compute thread."""

from __future__ import annotations

from collections.abc import Sequence

from promptserve.engine.base import Engine
from promptserve.engine.threads import ComputeThread, torch_threads_for
from promptserve.profile import Profile
from promptserve.workers.base import Items, OnStep, Refs, Results
from promptserve.workers.steps import StepCall, StepDone, advance


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
        self.edit_family = first.edit_family
        self.native, self.sizes, self.adapters = first.native, first.sizes, first.adapters
        self.runners: dict[int, object] = {}  # step runners (``prepare_steps``)

    async def run(self, gpu: int, items: Items, on_step: OnStep, refs: Refs = None) -> Results:
        return await self.threads[gpu].run(self.engines[gpu].generate, items, on_step)

    async def advance(self, gpu: int, call: StepCall) -> StepDone:
        """Runner ``gpu`` steps on thread ``gpu``, the one that built its engine."""
        return await self.threads[gpu].run(advance, self.runners[gpu], call)

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
