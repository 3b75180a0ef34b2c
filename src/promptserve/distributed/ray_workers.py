"""The runtime's ``Workers`` over Ray Serve replicas: one deployment of one replica per GPU.

Routing choice, by measurement (``benchmarks/bench_ray.py`` on the 2-core machine): the ingress
routes over per-replica handles rather than through a custom
``ray.serve.request_router.RequestRouter`` (``level_router.LevelRouter``). Per call the router
was no slower (p50 5.4 ms against 9.4 ms for a handle, both noise next to a denoising batch),
but in the two stats periods after a re-plan swapped two replicas' levels it sent 120 of 314
requests (38%) to a replica at the wrong level: replicas report their level through routing
stats that Serve polls on a period. The dispatcher also needs exact busy/idle state per GPU for
its EDF batching, which a router that sees one request at a time does not give. Per-replica
handles keep one decision point, exact at every re-plan.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

from ray.exceptions import RayActorError

from promptserve.engine.base import Guidance
from promptserve.errors import Cancelled
from promptserve.profile import Profile
from promptserve.workers.base import Items, OnStep, Refs, Results, WorkerLost
from promptserve.workers.steps import StepCall, StepDone

PING_TIMEOUT_S = 2.0


class RayWorkers:
    shared_store = True  # latents go through the shared store, not through the ingress

    def __init__(self, handles: Sequence, info: dict) -> None:
        self.handles = list(handles)
        self.count = len(self.handles)
        self.name: str = info["name"]
        self.total_steps: int = info["total_steps"]
        self.levels: tuple[int, ...] = tuple(info["levels"])
        self.profile: Profile = info["profile"]
        self.speedup: float = info.get("speedup", 1.0)
        self.guidance: Guidance = info["guidance"]
        self.edit_family: str = info.get("edit_family", "unet")
        self.native: tuple[int, int] = info["native"]
        self.sizes: tuple[tuple[int, int], ...] = tuple(info["sizes"])
        self.adapters: tuple[str, ...] = tuple(info["adapters"])

    async def run(self, gpu: int, items: Items, on_step: OnStep, refs: Refs = None) -> Results:
        stream = self.handles[gpu].options(stream=True).generate.remote(list(items), refs)
        try:
            async for kind, payload in stream:
                if kind == "done":
                    return payload
                try:
                    on_step(*payload) if isinstance(payload, tuple) else on_step(payload)
                except Cancelled:
                    stream.cancel()
                    raise
        except RayActorError as exc:  # the replica died or its node went away
            raise WorkerLost(gpu, type(exc).__name__) from exc
        raise WorkerLost(gpu, "the stream ended without a result")

    async def advance(self, gpu: int, call: StepCall) -> StepDone:
        """Step-level serving: one boundary and one step on the replica's step runner (one
        only: an interrupt cannot reach a replica between its steps, so ``steps`` is not
        taken, nor the interrupt sent)."""
        remote = replace(call, joins=list(call.joins), steps=min(call.steps, 1), interrupt=None)
        try:
            return await self.handles[gpu].step.remote(remote)
        except RayActorError as exc:
            raise WorkerLost(gpu, type(exc).__name__) from exc

    def prepare_steps(self) -> None:
        """Each replica builds its step runner at its first step, on its own GPU."""

    async def set_levels(self, levels: Sequence[int | None]) -> None:
        await asyncio.gather(
            *(h.set_level.remote(level) for h, level in zip(self.handles, levels, strict=True))
        )

    async def alive(self) -> list[bool]:
        return list(await asyncio.gather(*(self._ping(h) for h in self.handles)))

    async def pings(self) -> list[dict | None]:
        """Each replica's index, pid, level and batches run (None: it did not answer)."""
        return list(await asyncio.gather(*(self._ping(h, info=True) for h in self.handles)))

    @staticmethod
    async def _ping(handle, info: bool = False):
        try:
            answer = await asyncio.wait_for(handle.ping.remote(), PING_TIMEOUT_S)
        except Exception:  # dead, restarting or unreachable: all mean "not now"
            return None if info else False
        return answer if info else True
