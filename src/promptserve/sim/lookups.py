"""Each arrival's nearest cached entry of its tenant, as the cache index stands when it
arrives, found in few scans of the index.

A scan of every entry is the simulator's largest cost at scale (the Argus shape at 10x: 17 of
its 33 seconds, one 4-30 MB matrix read per lookup). The index only changes when a request
leaves, and between removals only by inserts, which an exact index appends after every row
it holds. So arrivals are looked up ahead in one scan (up to ``AHEAD`` of a tenant's, in
order), and a lookup made at an older version is brought up to date from the entries
inserted since: the best of those wins only when strictly more similar, as a full scan's
argmax (the first row of the best) would have it. A removal since, or an approximate index,
sends the arrival back to a full scan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from promptserve.cache.index import CacheIndex, InsertResult
from promptserve.types import Request

AHEAD = 256  # arrivals per scan: one matrix read serves them


class Lookups:
    def __init__(
        self, index: CacheIndex, requests: Sequence[Request], embeddings: np.ndarray
    ) -> None:
        self.index, self.requests, self.embeddings = index, requests, embeddings
        # request -> (index version, similarity, entry, its tenant's inserts seen): a lookup
        # made ahead
        self.ahead: dict[int, tuple[int, float, int, int]] = {}
        self.inserts: dict[str, _Journal] = {}  # per tenant, every entry inserted, in order
        self.removed_at = 0  # the index's version at its last removal

    def insert(self, tenant: str, prompt: str, vec: np.ndarray, levels, now: float) -> None:  # noqa: ANN001
        """Insert into the index, journalled for the lookups made ahead."""
        result: InsertResult = self.index.insert(tenant, prompt, vec, levels, now)
        if result.evicted:
            self.removed_at = self.index.version
        self.inserts.setdefault(tenant, _Journal(self.index.dim)).add(result.entry.id, vec)

    def nearest(self, i: int, until_s: Callable[[], float] | None = None) -> tuple[float, int]:
        """Request ``i``'s nearest entry of its tenant: (similarity, entry id or -1).
        ``until_s``: when the index next changes, if known (an approximate index looks up
        ahead only the arrivals before it: its answers cannot be brought up to date)."""
        tenant = self.requests[i].tenant
        done = self.ahead.pop(i, None)
        if done is not None:
            version, sim, entry, seen = done
            if version == self.index.version:
                return sim, entry
            if version >= self.removed_at and self.index.exact(tenant):
                return self._since(i, tenant, sim, entry, seen)
        return self._scan(i, tenant, until_s)

    def _since(self, i: int, tenant: str, sim: float, entry: int, seen: int) -> tuple[float, int]:
        journal = self.inserts.get(tenant)
        if journal is None or journal.n == seen:
            return sim, entry
        sims = journal.vecs[seen : journal.n] @ self.embeddings[i]
        best = int(sims.argmax())  # the method: no dispatch wrapper per lookup
        if entry < 0 or float(sims[best]) > sim:
            return float(sims[best]), journal.ids[seen + best]
        return sim, entry

    def _scan(self, i: int, tenant: str, until_s: Callable[[], float] | None) -> tuple[float, int]:
        reqs = self.requests
        ids = [i]
        j = i + 1
        limit = until_s() if until_s is not None and not self.index.exact(tenant) else np.inf
        while j < len(reqs) and len(ids) < AHEAD and reqs[j].tenant == tenant:
            if reqs[j].arrival_s >= limit:
                break
            ids.append(j)
            j += 1
        sims, entries = self.index.nearest_many(tenant, self.embeddings[ids])
        journal = self.inserts.get(tenant)
        version, seen = self.index.version, journal.n if journal is not None else 0
        for k, sim, entry in zip(ids[1:], sims[1:], entries[1:], strict=True):
            self.ahead[k] = (version, float(sim), int(entry), seen)
        return float(sims[0]), int(entries[0])


class _Journal:
    """A tenant's inserted entries: ids and vectors in insert order, in a doubling matrix."""

    def __init__(self, dim: int) -> None:
        self.ids: list[int] = []
        self.vecs: np.ndarray = np.zeros((64, dim), dtype=np.float32)
        self.n = 0

    def add(self, entry: int, vec: np.ndarray) -> None:
        if self.n == len(self.vecs):
            self.vecs = np.concatenate([self.vecs, np.zeros_like(self.vecs)])
        self.vecs[self.n] = vec
        self.ids.append(entry)
        self.n += 1
