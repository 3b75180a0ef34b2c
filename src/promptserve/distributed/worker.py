"""One engine worker as a Ray Serve replica: one GPU, one model, any level.

The level the planner gives a replica is a runtime setting (``set_level``): every batch carries
its own levels and the engine resumes at any of them, so a change reloads nothing. Progress
streams back step by step; a caller that cancels the stream stops the batch between steps.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Sequence

from promptserve.engine import make_engine
from promptserve.engine.base import GenerationItem
from promptserve.engine.profiling import quick_profile
from promptserve.server import engine_size
from promptserve.server.runtime import Cancelled


class EngineWorker:
    def __init__(
        self,
        index: int,
        model: str,
        backend: str | None,
        device: str,
        dtype: str = "float32",
        speedup: float = 1.0,
    ) -> None:
        self.index = index
        self.engine = make_engine(model, backend, device, dtype, speedup=speedup)
        self.profile = quick_profile(self.engine)
        self.level: int | None = None
        self.batches = 0
        self.running = 0  # items in the batch now running

    def describe(self) -> dict:
        """What the ingress plans with: the engine's levels, steps and measured profile."""
        e = self.engine
        return {
            "name": e.name,
            "total_steps": e.total_steps,
            "levels": tuple(e.levels),
            "profile": self.profile,
            "image_px": engine_size(e),
        }

    def set_level(self, level: int | None) -> None:
        self.level = level

    def ping(self) -> dict:
        return {
            "index": self.index,
            "pid": os.getpid(),
            "level": self.level,
            "batches": self.batches,
            "running": self.running,
        }

    async def generate(self, items: Sequence[GenerationItem]) -> AsyncIterator[tuple[str, object]]:
        """Yields ``("step", n)`` per denoising step, then ``("done", results)``."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def on_step(step: int) -> None:  # the engine's thread
            if stop.is_set():
                raise Cancelled("cancelled while denoising")
            loop.call_soon_threadsafe(steps.put_nowait, step)

        self.running = len(items)
        run = asyncio.ensure_future(asyncio.to_thread(self.engine.generate, list(items), on_step))
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
            yield ("done", run.result())
        finally:
            stop.set()  # the caller went away: the engine stops at its next step
            self.running = 0
