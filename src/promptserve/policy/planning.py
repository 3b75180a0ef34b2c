"""What both clocks decide the same way around a plan: what the first plan is for, when to
re-plan, what a level change costs, and which served prompts the cache keeps.

The simulator and the live runtime each call these (when to plan and what a level change
costs are the policy's own: ``Policy.wants_plan``, ``Policy.switch_s``); only where the numbers come from differs
(the simulator's operator forecast is the trace's first minute, the server's is its
``expected_qpm`` setting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from promptserve.policy.types import Demand

EXACT_REPEAT = 0.9999  # a prompt this close to its neighbour adds nothing to the cache
HEALTH_PERIOD_S = 5.0  # how often a plan-once policy still looks at its workers


def first_demand(expected_qpm: float, levels: Sequence[int]) -> Demand:
    """The first plan's demand, before any arrival is seen: the expected rate, all misses."""
    return Demand(float(expected_qpm), tuple(float(i == 0) for i in range(len(levels))))


def until_replan(now: float, first_arrival: float | None, period: float) -> float:
    """Seconds from ``now`` to the next re-plan: on the grid of ``period`` from the first
    request's arrival, where the simulator's grid starts (``period`` while nothing has
    arrived). The grid's phase against the arrivals matters: on the live benchmark's workload
    (conversation trace, 130 qpm, 4 GPUs) moving it by 0.5 s moved pinned promptserve's
    simulated effective quality between 90.9 and 95.8, and a server's grid otherwise starts at
    its start-up, seconds before a client's first request."""
    if first_arrival is None:
        return period
    ticks = math.floor((now - first_arrival) / period + 1e-9) + 1
    return min(max(first_arrival + ticks * period - now, 0.0), period)


def worth_caching(similarity: float | None) -> bool:
    """A served prompt enters the cache unless it is an exact repeat of its neighbour."""
    return similarity is None or similarity < EXACT_REPEAT
