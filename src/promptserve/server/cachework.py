"""What the cache thread does for one request: read its start latent (or, for workers on the
shared store, name it and reserve its entry) before it runs, and record its hit and its own
entry after it is answered. Plain functions of the cache; the runtime calls them in order on
its one cache thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from promptserve.cache.approx import ApproxCache
from promptserve.engine.base import GenerationItem, GenerationResult, preview_steps
from promptserve.engine.runner import remember, resumed_from
from promptserve.policy.planning import worth_caching
from promptserve.server.requests import Counters, Pending
from promptserve.strength import start_step
from promptserve.workers.base import StoreRefs, Workers

log = logging.getLogger(__name__)


def item_for(
    cache: ApproxCache, workers: Workers, p: Pending, level: int, interval: int = 1
) -> tuple[GenerationItem, StoreRefs | None]:
    """In-process, the start latent is read here; workers on a shared store get the key to
    read and the entry to write, and the arrays never pass through here. A missing latent:
    from noise (K = 0). An edit reads and writes nothing: it starts from its own image."""
    if p.edit is not None:
        start = edit_start(p, workers)
        assert start is not None
        ref = StoreRefs(None, p.tenant, None) if workers.shared_store else None
        wanted = p.handle.partial_images if p.handle is not None else 0
        previews = preview_steps(start, workers.total_steps, wanted)
        item = GenerationItem(
            p.prompt, start, None, seed=p.seed, previews=previews, look=p.look,
            interval=interval, edit=p.edit,
        )  # fmt: skip
        return item, ref
    at_level = p.hit is not None and level > 0
    ref = None
    if workers.shared_store:
        key = p.hit.entry.latent_keys.get(level) if at_level else None
        # nothing is written for a request that was not embedded (the latent cache off)
        keep = p.embedding.size > 0 and worth_caching(p.hit.similarity if p.hit else None)
        pinned = p.hit.entry.id if key else None
        if pinned is not None:  # the worker reads it later: eviction must wait for it
            cache.pin(pinned)
        ref = StoreRefs(key, p.tenant, cache.reserve() if keep else None, pinned)
        k, latent = (level if key else 0), None
    else:
        latent = cache.latent(p.hit.entry, level) if at_level else None
        k = level if latent is not None else 0
    wanted = p.handle.partial_images if p.handle is not None else 0
    previews = preview_steps(k, workers.total_steps, wanted)
    item = GenerationItem(
        p.prompt, k, latent, seed=p.seed, previews=previews, look=p.look, interval=interval
    )
    return item, ref


NO_VECTOR = np.zeros(0, dtype=np.float32)  # an edit's embedding: it looks up and inserts nothing


def edit_start(p: Pending, workers: Workers) -> int | None:
    """The step an edit starts at, as its engine's family counts its strength (None: not an
    edit); the policy prices it and the engine runs it from there."""
    if p.edit is None:
        return None
    return start_step(workers.total_steps, p.edit.strength, workers.edit_family)


def pinned_by(refs: Sequence[StoreRefs | None] | None) -> list[int]:
    """The cache entries a run read its start latents from (unpinned once it has)."""
    return [r.pinned for r in refs or () if r is not None and r.pinned is not None]


def remember_run(
    cache: ApproxCache,
    p: Pending,
    item: GenerationItem,
    result: GenerationResult,
    ref: StoreRefs | None,
    now: float,
) -> None:
    """A served run's hit on its neighbour and its own entry (unless an exact repeat)."""
    keep = worth_caching(p.hit.similarity if p.hit else None)
    if ref is None:
        remember(cache, p.tenant, p.embedding, p.hit, item, result, now, insert=keep)
        return
    if p.hit is not None and item.k > 0 and result.k == 0:
        cache.drop(p.hit.entry.id)  # the worker found its latent missing or corrupt
    elif p.hit is not None and result.k > 0:
        cache.record_hit(p.hit.entry.id, result.k, now)
    if result.store_error is not None:
        cache.skip_write(result.store_error)
    elif result.stored and keep:
        source = resumed_from(p.hit, result)
        cache.commit(p.tenant, p.prompt, p.embedding, ref.entry_id, result.stored, now, source)


def remember_all(
    cache: ApproxCache,
    counters: Counters,
    answered: list[tuple[Pending, GenerationItem, GenerationResult, StoreRefs | None]],
    now: float,
) -> None:
    """The cache updates of answered runs, on the cache thread, committed as one group: a
    failure is logged and counted (the cache is an optimisation: the answers went out)."""
    t0 = time.perf_counter()  # the cache thread's own time, whatever the runtime's clock
    try:
        with cache.group():
            for p, item, result, ref in answered:
                try:
                    remember_run(cache, p, item, result, ref, now)
                except Exception:
                    log.exception("cache update failed for a served request")
                    counters.cache_update_failures += 1
    except Exception:  # the group's commit
        log.exception("cache commit failed for %d served requests", len(answered))
        counters.cache_update_failures += len(answered)
    counters.stage("cache_write", time.perf_counter() - t0, len(answered))
