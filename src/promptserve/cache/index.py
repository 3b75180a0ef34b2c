"""The approximate-cache index: which earlier prompts are cached, per tenant, and which to evict.

An entry is one generated prompt and the levels K whose intermediate latents it holds; the
latent bytes live elsewhere (the latent store), under the keys the entry names. Every tenant
has its own vector index, so a lookup can only ever return the asking tenant's entries.

Eviction (capacity counted in entries, across tenants):

* ``lcbfu``, the published policy: score = hits x K / N, lowest out. An entry holds several
  levels, so its score adds K / N for every hit at level K (the sum of the published score
  over its levels); ties go to the least recently used.
* ``lru``: least recently used out.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from promptserve.cache.vectors import AutoVectors, ExactVectors, Vectors

EvictionPolicy = Literal["lcbfu", "lru"]


@dataclass
class CacheEntry:
    id: int
    tenant: str
    prompt: str
    levels: tuple[int, ...]  # K values whose latents this entry holds
    latent_keys: dict[int, str]  # K -> key in the latent store
    inserted_s: float
    last_used_s: float
    hits: int = 0
    score: float = 0.0  # LCBFU score: the sum over hits of K / total_steps


@dataclass(frozen=True, slots=True)
class Match:
    entry: CacheEntry
    similarity: float  # cosine similarity of the query to the entry's prompt


@dataclass
class InsertResult:
    entry: CacheEntry
    evicted: list[CacheEntry] = field(default_factory=list)


@functools.lru_cache(maxsize=65536)
def tenant_namespace(tenant: str) -> str:
    """A fixed-length hex name for a tenant: no user string reaches a file path."""
    return hashlib.sha256(tenant.encode("utf-8")).hexdigest()[:16]


def latent_key(tenant: str, entry_id: int, k: int) -> str:
    return f"{latent_prefix(tenant, entry_id)}{k:02d}"


def latent_prefix(tenant: str, entry_id: int) -> str:
    """An entry's keys up to the level's digits: formatted once for all its levels."""
    return f"{tenant_namespace(tenant)}/{entry_id:012d}-k"


class CacheIndex:
    def __init__(
        self,
        dim: int,
        capacity: int = 1_500_000,
        total_steps: int = 50,
        eviction: EvictionPolicy = "lcbfu",
        vectors: Callable[[int], Vectors] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 entry, got {capacity}")
        if eviction not in ("lcbfu", "lru"):
            raise ValueError(f"eviction {eviction!r} is not 'lcbfu' or 'lru'")
        self.dim = dim
        self.capacity = capacity
        self.total_steps = total_steps
        self.eviction = eviction
        self._make_vectors = vectors or (lambda d: AutoVectors(d))
        self._tenants: dict[str, Vectors] = {}
        self._counts: dict[str, int] = {}  # entries per namespace
        self._entries: dict[int, CacheEntry] = {}
        self._heap: list[tuple[float, float, int]] = []
        self._next_id = 0
        self._pins: dict[int, int] = {}  # entry id -> runs reading its latents now
        self.version = 0  # bumped by every insert and removal: a lookup made at one version holds until the next

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[CacheEntry]:
        return iter(self._entries.values())

    def get(self, entry_id: int) -> CacheEntry | None:
        return self._entries.get(entry_id)

    def reserve_id(self) -> int:
        """A fresh id for an entry whose latent keys are written before it is inserted: each
        call gets its own (an id reserved and never inserted is skipped; its files, if any, are
        orphans the cache removes when it opens)."""
        reserved = self._next_id
        self._next_id += 1
        return reserved

    def evict(self, count: int = 1) -> list[CacheEntry]:
        """Evict ``count`` entries by the policy (for a byte quota kept outside the index)."""
        return self._evict(count)

    def insert(
        self,
        tenant: str,
        prompt: str,
        embedding: np.ndarray,
        levels: Sequence[int],
        now_s: float,
        entry_id: int | None = None,
        hits: int = 0,
        score: float = 0.0,
    ) -> InsertResult:
        """Add a generated prompt; evicts first when the cache is full.

        ``entry_id``, ``hits`` and ``score`` restore an entry read back from disk.
        """
        evicted = self._evict(len(self._entries) + 1 - self.capacity)
        entry_id = self._next_id if entry_id is None else entry_id
        self._next_id = max(self._next_id, entry_id + 1)
        prefix = latent_prefix(tenant, entry_id)
        entry = CacheEntry(
            id=entry_id,
            tenant=tenant,
            prompt=prompt,
            levels=tuple(levels),
            latent_keys={k: f"{prefix}{k:02d}" for k in levels},
            inserted_s=now_s,
            last_used_s=now_s,
            hits=hits,
            score=score,
        )
        self._entries[entry_id] = entry
        self.version += 1
        vecs = self._tenants.get(tenant)
        if vecs is None:
            vecs = self._tenants[tenant] = self._make_vectors(self.dim)
        self._counts[tenant] = self._counts.get(tenant, 0) + 1
        vecs.add(np.array([entry_id], dtype=np.int64), np.asarray(embedding, np.float32)[None, :])
        self._push(entry)
        return InsertResult(entry, evicted)

    def nearest(self, tenant: str, embedding: np.ndarray) -> Match | None:
        """The tenant's most similar entry, or None when the tenant has none."""
        sims, ids = self.nearest_many(tenant, np.asarray(embedding, np.float32)[None, :])
        return None if ids[0] < 0 else Match(self._entries[int(ids[0])], float(sims[0]))

    def nearest_many(self, tenant: str, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Similarity and entry id of each row's nearest entry (NaN and -1 when none)."""
        vecs = self._tenants.get(tenant)
        if vecs is None:
            vecs = ExactVectors(self.dim)
        return vecs.search(np.asarray(embeddings, np.float32))

    def exact(self, tenant: str) -> bool:
        """Whether the tenant's lookups scan every entry (no approximate index yet)."""
        return not getattr(self._tenants.get(tenant), "approximate", False)

    def pin(self, entry_id: int) -> None:
        """A run is about to read this entry's latents (a worker, from the shared store):
        eviction passes it over until every pin is released."""
        self._pins[entry_id] = self._pins.get(entry_id, 0) + 1

    def unpin(self, entry_id: int) -> None:
        left = self._pins.get(entry_id, 0) - 1
        if left > 0:
            self._pins[entry_id] = left
        else:
            self._pins.pop(entry_id, None)

    def pinned(self, entry_id: int) -> bool:
        return entry_id in self._pins

    def record_hit(self, entry_id: int, k: int, now_s: float) -> None:
        """A request was served from this entry's level-K latent."""
        entry = self._entries.get(entry_id)
        if entry is None:
            return
        entry.hits += 1
        entry.score += k / self.total_steps
        entry.last_used_s = now_s
        self._push(entry)

    def remove(self, entry_id: int) -> CacheEntry | None:
        """The entry, gone; a namespace whose last entry this was is dropped whole (its
        vectors' memory with it: a namespace per look would otherwise never be given back)."""
        entry = self._entries.pop(entry_id, None)
        if entry is not None:
            self.version += 1
            self._tenants[entry.tenant].remove(np.array([entry_id], dtype=np.int64))
            left = self._counts[entry.tenant] - 1
            if left:
                self._counts[entry.tenant] = left
            else:
                del self._counts[entry.tenant], self._tenants[entry.tenant]
        return entry

    def entries_in(self, tenant: str) -> int:
        """Entries in a namespace now (0: it holds nothing, and has no vectors)."""
        return self._counts.get(tenant, 0)

    @property
    def namespaces(self) -> int:
        return len(self._counts)

    def _key(self, entry: CacheEntry) -> tuple[float, float, int]:
        if self.eviction == "lru":
            return (entry.last_used_s, 0.0, entry.id)
        return (entry.score, entry.last_used_s, entry.id)

    def _push(self, entry: CacheEntry) -> None:
        heapq.heappush(self._heap, self._key(entry))
        if len(self._heap) > 4 * len(self._entries) + 64:
            self._heap = [self._key(e) for e in self._entries.values()]
            heapq.heapify(self._heap)

    def _evict(self, count: int) -> list[CacheEntry]:
        """The policy's next ``count`` victims, passing over pinned entries (which keep their
        place in the order)."""
        evicted: list[CacheEntry] = []
        passed: list[tuple[float, float, int]] = []
        while len(evicted) < count and self._heap:
            key = heapq.heappop(self._heap)
            entry = self._entries.get(key[2])
            if entry is None or self._key(entry) != key:
                continue  # stale heap item: the entry changed or left since it was pushed
            if entry.id in self._pins:
                passed.append(key)
                continue
            self.remove(entry.id)
            evicted.append(entry)
        for key in passed:
            heapq.heappush(self._heap, key)
        return evicted
