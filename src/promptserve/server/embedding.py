"""The runtime's embedder: a burst of prompts goes in one forward pass (``Burst``), on one
thread of its own with one intra-op thread (``engine.threads``), off the event loop."""

from __future__ import annotations

import numpy as np

from promptserve.cache.embed import Embedder
from promptserve.engine.threads import ComputeThread
from promptserve.server.burst import Burst


class BurstEmbedder:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.thread = ComputeThread("promptserve-embed", 1)
        self._burst: Burst[tuple[str, str], np.ndarray] = Burst(self._embed_many)

    async def embed(self, prompt: str, tenant: str) -> np.ndarray:
        """The prompt's embedding, kept in the tenant's namespace."""
        return await self._burst((prompt, tenant))

    async def _embed_many(self, batch: list[tuple[str, str]]) -> np.ndarray:
        prompts, tenants = [p for p, _ in batch], [t for _, t in batch]
        return await self.thread.run(self.embedder.embed, prompts, tenants)
