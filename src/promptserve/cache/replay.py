"""Replay prompts through a cache in order: each prompt looks up its nearest earlier prompt,
then is inserted as if generated. This is how K_opt mixes of a prompt file are measured."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from promptserve.cache.index import CacheIndex
from promptserve.cache.thresholds import Thresholds


@dataclass(frozen=True)
class Replay:
    similarity: np.ndarray  # nearest earlier prompt's similarity; NaN for the first
    k_opt: np.ndarray  # the K each prompt tolerates (0 = miss)


def replay(
    prompts: Sequence[str],
    embeddings: np.ndarray,
    thresholds: Thresholds,
    index: CacheIndex,
    tenant: str = "default",
    on_step: Callable[[int], None] | None = None,
    tenants: Sequence[str] | None = None,
) -> Replay:
    """``tenants``: one per prompt (the workloads' tenant per pass), else all ``tenant``."""
    sims = np.full(len(prompts), np.nan, dtype=np.float32)
    cached_levels = tuple(sorted(thresholds.levels))
    for i, (prompt, vec) in enumerate(zip(prompts, embeddings, strict=True)):
        who = tenants[i] if tenants is not None else tenant
        match = index.nearest(who, vec)
        if match is not None:
            sims[i] = match.similarity
        index.insert(who, prompt, vec, cached_levels, now_s=float(i))
        if on_step is not None:
            on_step(i)
    return Replay(sims, thresholds.k_opt_many(sims))
