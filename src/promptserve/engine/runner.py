"""Approximate caching end to end on one engine: look up, resume, capture, insert.

The thresholds speak of the reference's levels (K of 50 steps); an engine with other step
counts resumes at its level that skips the same or a smaller fraction of its steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from promptserve.cache.approx import ApproxCache, CacheHit
from promptserve.cache.embed import Embedder
from promptserve.cache.index import CacheEntry
from promptserve.cache.thresholds import engine_level as level_on
from promptserve.engine.base import Engine, GenerationItem, GenerationResult


def engine_level(k_reference: int, engine: Engine) -> int:
    """The engine's largest level that skips no larger a fraction than ``k_reference`` of 50."""
    return level_on(k_reference, engine.levels, engine.total_steps)


@dataclass(frozen=True)
class CacheRun:
    prompt: str
    k: int  # the engine level it ran from
    similarity: float | None  # to the cached neighbour it started from (None: no neighbour)
    result: GenerationResult


def remember(
    cache: ApproxCache,
    tenant: str,
    embedding: np.ndarray,
    hit: CacheHit | None,
    item: GenerationItem,
    result: GenerationResult,
    now_s: float,
    insert: bool = True,
) -> None:
    """After a run: count the hit it was served from, and cache the prompt with its latents
    (unless ``insert`` is False: an exact repeat adds nothing)."""
    if hit is not None and item.k > 0:
        cache.record_hit(hit.entry.id, item.k, now_s)
    if insert:
        keep = latents_to_keep(item, result)
        cache.insert(tenant, item.prompt, embedding, keep, now_s, resumed_from(hit, result))


def resumed_from(hit: CacheHit | None, result: GenerationResult) -> CacheEntry | None:
    """The entry a run started from (None when it ran from noise): its levels below the run's
    start stand for the new entry there too."""
    return hit.entry if hit is not None and result.k > 0 else None


def latents_to_keep(item: GenerationItem, result: GenerationResult) -> dict[int, np.ndarray]:
    """What a run leaves to the cache: the latents it passed through, plus the one it started
    from (which stands for the new prompt at that level too)."""
    keep = dict(result.latents)
    if item.k > 0 and item.start_latent is not None:
        keep[item.k] = item.start_latent
    return keep


def generate_with_cache(
    engine: Engine,
    cache: ApproxCache,
    embedder: Embedder,
    tenant: str,
    prompts: Sequence[str],
    now_s: float,
    choose: Callable[[CacheHit | None], int] | None = None,
    seed: int = 0,
) -> list[CacheRun]:
    """Serve ``prompts`` as one batch. ``choose`` maps a cache hit to a reference level K (the
    router's decision); by default each prompt runs at its own K_opt."""
    vecs = embedder.embed(list(prompts))
    items, hits = [], []
    for i, (prompt, vec) in enumerate(zip(prompts, vecs, strict=True)):
        hit = cache.lookup(tenant, vec)
        k_ref = choose(hit) if choose else (hit.k_opt if hit else 0)
        k = engine_level(k_ref, engine) if hit else 0
        latent = cache.latent(hit.entry, k) if hit and k > 0 else None
        if latent is None:
            k = 0
        items.append(GenerationItem(prompt, k, latent, seed=seed + i))
        hits.append(hit)
    results = engine.generate(items)
    served = []
    for item, hit, vec, res in zip(items, hits, vecs, results, strict=True):
        remember(cache, tenant, vec, hit, item, res, now_s)
        served.append(CacheRun(item.prompt, item.k, hit.similarity if hit else None, res))
    return served
