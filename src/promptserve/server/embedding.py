"""The runtime's embedder: prompts that arrive while a call is running wait for the next one and
go in it together (one forward pass for a burst, not one per request), on one thread of its
own with one intra-op thread (``engine.threads``), off the event loop."""

from __future__ import annotations

import asyncio

import numpy as np

from promptserve.cache.embed import Embedder
from promptserve.engine.threads import ComputeThread


class BurstEmbedder:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.thread = ComputeThread("promptserve-embed", 1)
        self._queued: list[tuple[str, str, asyncio.Future]] = []  # prompt, tenant, answer
        self._task: asyncio.Task | None = None  # the task embedding queued prompts

    async def embed(self, prompt: str, tenant: str) -> np.ndarray:
        """The prompt's embedding, kept in the tenant's namespace."""
        future = asyncio.get_running_loop().create_future()
        self._queued.append((prompt, tenant, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._embed_queued())
        return await future

    async def _embed_queued(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            prompts, tenants = [p for p, _, _ in batch], [t for _, t, _ in batch]
            try:
                vecs = await self.thread.run(self.embedder.embed, prompts, tenants)
            except Exception as exc:  # every waiting request hears it
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), vec in zip(batch, vecs, strict=True):
                if not future.done():
                    future.set_result(vec)
