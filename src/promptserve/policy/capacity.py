"""Capacity of a level under a latency SLO, from the profile: queries/minute that n GPUs pinned
at level K keep (nearly) all in time.

A request waits for a GPU of its level to finish the batch it is running, then runs in the
next batch: about two batch latencies in the worst steady case. So a level runs batches of
the largest size b whose 2 x latency(K, b) fits the SLO, and its capacity is that batch's
throughput times a utilisation that leaves headroom for Poisson bursts. The headroom depends
on how many GPUs share the level's queue: two or more pool their bursts (the earliest-deadline
queue hands the next batch to whichever frees first, and batches grow with the backlog), one
alone absorbs every burst itself. ``benchmarks/bench_capacity.py`` measures the dispatcher's
real capacity (97% in time) per level and GPU count against this model: with one utilisation
for every count (0.85, the first model) the planner over-rated lone GPUs and under-rated pooled
ones, so it split two GPUs over two levels where keeping them together served more.
A level whose batch of 1 cannot fit is not usable under the SLO.
"""

from __future__ import annotations

from functools import lru_cache

from promptserve.profile import Profile

POOLED_UTILISATION = 1.0  # two or more GPUs on one level's queue
SINGLE_UTILISATION = 0.9  # a GPU alone on its level


@lru_cache(maxsize=4096)
def slo_batch(profile: Profile, k: int, slo_s: float, max_batch: int) -> int:
    """Largest batch whose two latencies fit the SLO; 0 when even a batch of 1 does not."""
    best = 0
    for b in range(1, min(max_batch, profile.max_batch) + 1):
        if 2.0 * profile.batch_latency(k, b) <= slo_s:
            best = b
    return best


@lru_cache(maxsize=4096)
def slo_throughput_qpm(profile: Profile, k: int, slo_s: float, max_batch: int) -> float:
    """Queries/minute one GPU runs at level K in SLO-sized batches, before headroom (0 if the
    level cannot meet the SLO)."""
    b = slo_batch(profile, k, slo_s, max_batch)
    return 0.0 if b == 0 else profile.throughput_qpm(k, b)


def level_capacity_qpm(profile: Profile, k: int, slo_s: float, max_batch: int, gpus: int) -> float:
    """Queries/minute ``gpus`` GPUs pinned at level K keep in time."""
    if gpus <= 0:
        return 0.0
    util = SINGLE_UTILISATION if gpus == 1 else POOLED_UTILISATION
    return util * gpus * slo_throughput_qpm(profile, k, slo_s, max_batch)
