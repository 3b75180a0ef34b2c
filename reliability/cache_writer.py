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
    """After a crash, first as the files lie (nothing repaired yet): rows naming a missing file
    (``dangling``: the write order, files before the row, promises none) and files no row names
    (``orphans``: a crash between the two leaves some). Then reopened: entries whose files all
    read back whole, torn entries served (a latent returned that is not what its entry wrote),
    committed rows the reopen lost, and whether index and files agree after the repair."""
    from promptserve.cache.approx import audit as on_disk

    before = on_disk(root)
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
    after = on_disk(root)
    return {
        "entries": whole,
        "torn_served": torn,
        "dangling_before_repair": before["dangling"],
        "orphans_before_repair": before["orphans"],
        "rows_lost_on_reopen": before["rows"] - before["dangling"] - whole,
        "index_matches_files": matches and after["orphans"] == 0 and after["dangling"] == 0,
    }


if __name__ == "__main__":
    main(sys.argv[1])
