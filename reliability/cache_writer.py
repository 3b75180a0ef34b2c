"""A process that writes cache entries as fast as it can until it is killed.

Entry ``i``'s latents are filled with the value ``i`` (its manifest id), so a reader can tell a
whole entry from a torn one."""

from __future__ import annotations

import sys

import numpy as np

from promptserve.cache.approx import ApproxCache
from promptserve.cache.thresholds import shipped_thresholds

SHAPE = (4, 32, 32)
DIM = 16


def open_cache(root: str) -> ApproxCache:
    return ApproxCache(root, DIM, shipped_thresholds("minilm"), total_steps=20)


def main(root: str) -> None:
    cache = open_cache(root)
    rng = np.random.default_rng()
    n = len(cache.index)
    while True:
        n += 1
        vec = rng.standard_normal(DIM).astype(np.float32)
        latents = {k: np.full(SHAPE, float(n), np.float32) for k in (2, 4, 6)}
        cache.insert("tenant", f"entry {n}", vec / np.linalg.norm(vec), latents, 0.0)


def audit(root: str) -> dict:
    """Reopen after a crash: entries whose files all read back whole, torn entries served
    (a latent returned that is not what its entry wrote), and whether index and files agree."""
    cache = open_cache(root)
    torn = whole = 0
    for entry in list(cache.index):
        value = float(entry.prompt.split()[-1])
        got = [cache.latent(entry, k) for k in entry.latent_keys]
        if any(g is not None and not np.all(g == value) for g in got):
            torn += 1
        elif all(g is not None for g in got):
            whole += 1
    indexed = {key for e in cache.index for key in e.latent_keys.values()}
    matches = indexed == cache.store.keys()
    cache.close()
    return {"entries": whole, "torn_served": torn, "index_matches_files": matches}


if __name__ == "__main__":
    main(sys.argv[1])
