"""Per-GPU capacity of a level under a latency SLO, from the profile.

A request waits for a GPU of its level to finish the batch it is running, then runs in the
next batch: about two batch latencies in the worst steady case. So a level runs batches of
the largest size b whose 2 x latency(K, b) fits the SLO, and its capacity is that batch's
throughput times a utilisation cap (headroom for Poisson variance; queueing delay grows as
1 / (1 - utilisation)). A level whose batch of 1 cannot fit is not usable under the SLO.
"""

from __future__ import annotations

from functools import lru_cache

from promptserve.profile import Profile

UTILISATION_CAP = 0.85


@lru_cache(maxsize=4096)
def slo_batch(profile: Profile, k: int, slo_s: float, max_batch: int) -> int:
    """Largest batch whose two latencies fit the SLO; 0 when even a batch of 1 does not."""
    best = 0
    for b in range(1, min(max_batch, profile.max_batch) + 1):
        if 2.0 * profile.batch_latency(k, b) <= slo_s:
            best = b
    return best


@lru_cache(maxsize=4096)
def slo_capacity_qpm(
    profile: Profile, k: int, slo_s: float, max_batch: int, cap: float = UTILISATION_CAP
) -> float:
    """Queries/minute one GPU can take at level K while meeting the SLO (0 if it cannot)."""
    b = slo_batch(profile, k, slo_s, max_batch)
    return 0.0 if b == 0 else cap * profile.throughput_qpm(k, b)
