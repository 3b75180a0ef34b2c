"""The burst signal: the step work that arrived beyond the step capacity."""

from __future__ import annotations

from dataclasses import dataclass

from mypy_extensions import mypyc_attr


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
@dataclass
class ExcessWork:
    """The step work that arrived beyond the step capacity, as a leaky bucket: each arrival
    pours in the steps it needs at its fastest level, the bucket drains at the capacity. It
    reads a burst at its first requests, where the price (a smoothed rate, re-set every
    period) and the queue (which fills only once the GPUs are full) read it late."""

    capacity_per_s: float = 0.0  # steps per second at the fastest levels (``reprice``)
    level: float = 0.0  # steps, at ``at``
    at: float = 0.0

    def now(self, now: float) -> float:
        return max(0.0, self.level - self.capacity_per_s * (now - self.at))

    def pour(self, now: float, steps: float) -> None:
        self.level, self.at = self.now(now) + steps, now
