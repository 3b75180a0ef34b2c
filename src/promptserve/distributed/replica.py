"""One engine worker as a Ray Serve replica: one GPU, one model, any level.

The level the planner gives a replica is a runtime setting (``set_level``): every batch carries
its own levels and the engine resumes at any of them, so a change reloads nothing. Progress
streams back step by step; a caller that cancels the stream stops the batch between steps.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from promptserve.cache.approx import write_latents
from promptserve.cache.latents import LatentStore
from promptserve.engine import make_engine
from promptserve.engine.base import GenerationItem, GenerationResult
from promptserve.engine.options import EngineOptions
from promptserve.engine.profiling import quick_profile
from promptserve.engine.runner import latents_to_keep
from promptserve.engine.threads import ComputeThread, torch_threads_for
from promptserve.errors import Cancelled
from promptserve.workers.base import StoreRefs
from promptserve.workers.steps import StepCall, StepDone, advance


class EngineWorker:
    def __init__(
        self,
        index: int,
        model: str,
        backend: str | None,
        device: str,
        dtype: str = "auto",
        speedup: float = 1.0,
        options: EngineOptions | None = None,
        sizes: tuple[tuple[int, int], ...] | None = None,
        lora_dir: str | None = None,
        lora_resident: int = 8,
        lora_resident_bytes: int | None = None,
        lora_private: bool = False,
        steps: int | None = None,
        store_root: str | None = None,
    ) -> None:
        self.index = index
        # built, profiled and run on one thread of its own (engine.threads)
        self._compute = ComputeThread("promptserve-engine", torch_threads_for(1))
        self.engine = self._compute.call(
            make_engine, model, backend, device, dtype, speedup, options, sizes, lora_dir,
            lora_resident, lora_resident_bytes, lora_private, steps,
        )  # fmt: skip
        # the latent store every node reaches (a shared folder); the ingress owns its manifest
        self.store = LatentStore(store_root, clean_temporaries=False) if store_root else None
        self.profile = self._compute.call(quick_profile, self.engine)
        self.level: int | None = None
        self.batches = 0
        # per call: the replica takes up to 16 concurrent calls (pings, cancellations, a retried
        # batch arriving while a cancelled one winds down), but runs one batch at a time on its
        # engine: a scheduler is never shared by two threads
        self._engine_lock = asyncio.Lock()
        self._calls = itertools.count()
        self.running: dict[int, int] = {}  # call -> items, for the batch holding the engine
        self.waiting: dict[int, int] = {}  # call -> items, for batches waiting for it
        self.bytes_written = 0  # latent bytes this worker wrote to the shared store
        # step-level serving: a step runner on the engine, built at the first step
        self._runner = None
        self._members: dict = {}  # key -> (item, ref) of each member in the runner
        self.steps = 0

    def describe(self) -> dict:
        """What the ingress plans with: the engine's levels, steps and measured profile."""
        e = self.engine
        return {
            "name": e.name,
            "total_steps": e.total_steps,
            "levels": tuple(e.levels),
            "profile": self.profile,
            "native": e.native,
            "sizes": tuple(e.sizes),
            "adapters": tuple(e.adapters),
            "speedup": e.speedup,
            "guidance": e.guidance_spec,
            "edit_family": e.edit_family,
        }

    def set_level(self, level: int | None) -> None:
        self.level = level

    def ping(self) -> dict:
        return {
            "index": self.index,
            "pid": os.getpid(),
            "level": self.level,
            "batches": self.batches,
            "running": sum(self.running.values()) + len(self._members),
            "waiting": sum(self.waiting.values()),
            "bytes_written": self.bytes_written,
            "steps": self.steps,
            "inflight": len(self._members),
        }

    async def step(self, call: StepCall) -> StepDone:
        """Step-level serving: drop the cancelled, join the joiners (their start latents read
        from the shared store), re-interval the members ``retimes`` names, run one step; the
        finished members' captures go to the store."""
        joins, refs = call.joins, call.refs
        async with self._engine_lock:
            if self._runner is None:
                self._runner = await self._compute.run(self.engine.step_runner, self.profile)
            if joins and refs is not None:
                items = await asyncio.to_thread(
                    self._read_starts, [item for _, item in joins], refs
                )
                joins = [(key, item) for (key, _), item in zip(joins, items, strict=True)]
            for key in (*call.cancels, *call.pauses):  # first: a rejoining member joins anew
                self._members.pop(key, None)
            for (key, item), ref in zip(joins, refs or [None] * len(joins), strict=True):
                self._members[key] = (item, ref)
            one = replace(call, joins=joins, steps=min(call.steps, 1), interrupt=None)
            done = await self._compute.run(advance, self._runner, one)
            self.steps += 1
            if done.finished and refs is not None:
                members = [self._members[key] for key, _ in done.finished]
                await asyncio.to_thread(
                    self._write_captures,
                    [item for item, _ in members],
                    [ref for _, ref in members],
                    [result for _, result in done.finished],
                )
            for key, _ in done.finished:
                self._members.pop(key, None)
            return done

    async def generate(
        self, items: Sequence[GenerationItem], refs: Sequence[StoreRefs] | None = None
    ) -> AsyncIterator[tuple[str, object]]:
        """Yields ``("step", n)`` per denoising step, then ``("done", results)``. With ``refs``
        the worker reads each start latent from the shared store and writes what the run
        captures there, returning only how many bytes it wrote."""
        if refs is not None:
            items = await asyncio.to_thread(self._read_starts, items, refs)
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def on_step(step: int, previews: dict[int, bytes] | None = None) -> None:  # engine thread
            if stop.is_set():
                raise Cancelled("cancelled while denoising")
            loop.call_soon_threadsafe(steps.put_nowait, (step, previews) if previews else step)

        call = next(self._calls)
        self.waiting[call] = len(items)
        try:
            async with self._engine_lock:
                del self.waiting[call]
                self.running[call] = len(items)
                async for event in self._run(items, refs, on_step, steps, stop):
                    yield event
        finally:
            stop.set()  # the caller went away: the engine stops at its next step
            self.waiting.pop(call, None)
            self.running.pop(call, None)

    async def _run(self, items, refs, on_step, steps: asyncio.Queue, stop: threading.Event):
        run = asyncio.ensure_future(self._compute.run(self.engine.generate, list(items), on_step))
        try:
            while not run.done():
                get = asyncio.ensure_future(steps.get())
                await asyncio.wait({get, run}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield ("step", get.result())
                else:
                    get.cancel()
            while not steps.empty():
                yield ("step", steps.get_nowait())
            self.batches += 1
            results = run.result()
            if refs is not None:
                await asyncio.to_thread(self._write_captures, items, refs, results)
            yield ("done", results)
        finally:
            if not run.done():  # cancelled: hold the engine until its thread has stopped
                stop.set()
                await asyncio.wait({run})

    def _read_starts(
        self, items: Sequence[GenerationItem], refs: Sequence[StoreRefs]
    ) -> list[GenerationItem]:
        """Start latents from the store; a missing or corrupt one runs from noise (K = 0)."""
        out = []
        for item, ref in zip(items, refs, strict=True):
            if item.resume is not None:  # it goes on from its pause, not from a cached latent
                out.append(item)
                continue
            latent = self._store().get(ref.start_key) if ref.start_key and item.k > 0 else None
            out.append(replace(item, start_latent=latent, k=item.k if latent is not None else 0))
        return out

    def _write_captures(
        self,
        items: Sequence[GenerationItem],
        refs: Sequence[StoreRefs],
        results: list[GenerationResult],
    ) -> None:
        for item, ref, result in zip(items, refs, results, strict=True):
            if ref.entry_id is None:
                result.latents = {}
                continue
            keep = latents_to_keep(item, result)
            try:
                result.stored = write_latents(self._store(), ref.tenant, ref.entry_id, keep)
                self.bytes_written += sum(result.stored.values())
            except OSError as exc:  # a full disk: the answer goes out, the entry is skipped
                result.store_error = str(exc)
            result.latents = {}  # they are in the store: keep them off the wire

    def _store(self) -> LatentStore:
        if self.store is None:
            raise RuntimeError("this worker was started without a latent store")
        return self.store
