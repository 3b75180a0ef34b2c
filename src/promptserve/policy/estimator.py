"""Short-horizon load estimate for re-planning.

The rate is the larger of the rate over a short window and over a long one: a burst shows in
the short window within seconds and is planned for at once, while a lull has to last the long
window before capacity is taken away. The K_opt mix and the mean size weight (what a pinned
plan scales the rate by) come from the long window, as do the edits' share and mean steps (an
edit has no K_opt: it counts in the rate, not in the mix).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from mypy_extensions import mypyc_attr

from promptserve.policy.types import Demand

EDIT = -1  # an edit's place in the window (it has no K_opt class)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
@dataclass
class LoadEstimator:
    levels: tuple[int, ...]
    short_s: float = 10.0
    long_s: float = 60.0
    _seen: deque[tuple[float, int]] = field(default_factory=deque)
    _weights: deque[float] = field(default_factory=deque)  # beside ``_seen``, when sized
    _weight_sum: float = 0.0
    _edits: deque[tuple[float, int]] = field(default_factory=deque)  # (time, steps) per edit

    def observe(
        self, now: float, k_opt: int, weight: float = 1.0, edit_steps: int | None = None
    ) -> None:
        """``weight``: the request's pixels against the native size's (1: native);
        ``edit_steps``: an edit's, the steps it runs from its own start."""
        if edit_steps is not None:
            self._edits.append((now, edit_steps))
            k_opt = EDIT
        if weight != 1.0 and not self._weights:
            self._weights.extend([1.0] * len(self._seen))
            self._weight_sum = float(len(self._seen))
        self._seen.append((now, k_opt))
        if self._weights or weight != 1.0:
            self._weights.append(weight)
            self._weight_sum += weight
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._seen and self._seen[0][0] < now - self.long_s:
            self._seen.popleft()
            if self._weights:
                self._weight_sum -= self._weights.popleft()
        while self._edits and self._edits[0][0] < now - self.long_s:
            self._edits.popleft()

    @property
    def seen(self) -> int:
        """Arrivals in the long window as of the last call (how noisy its rate is)."""
        return len(self._seen)

    def estimate(self, now: float, start_s: float = 0.0) -> Demand:
        """Demand in queries/minute; ``start_s`` is when observation began (short early windows)."""
        self._trim(now)
        long_span = max(min(self.long_s, now - start_s), 1.0)
        short_span = max(min(self.short_s, now - start_s), 1.0)
        n_long = len(self._seen)
        n_short = sum(1 for t, _ in self._seen if t >= now - self.short_s)
        rate = 60.0 * max(n_long / long_span, n_short / short_span)
        counts = np.zeros(len(self.levels))
        for _, k in self._seen:
            if k != EDIT:
                counts[self.levels.index(k)] += 1
        mix = counts / counts.sum() if counts.sum() else np.eye(len(self.levels))[0]
        weight = self._weight_sum / len(self._weights) if self._weights else 1.0
        if not self._edits:
            return Demand(rate, tuple(float(x) for x in mix), size_weight=weight)
        edits = len(self._edits) / max(n_long, 1)
        steps = sum(s for _, s in self._edits) / len(self._edits)
        return Demand(rate, tuple(float(x) for x in mix), (), weight, edits, steps)


def demand_changed(
    old: Demand | None, new: Demand, rate_tol: float = 0.1, mix_tol: float = 0.1
) -> bool:
    """Whether a re-plan is worth solving: the rate moved by more than ``rate_tol`` (relative,
    or 1 query/minute) or the mix by more than ``mix_tol`` (L1). Plans are deterministic in the
    demand, so an unchanged demand would give the same plan. The 10% tolerances sit inside the
    planner's utilisation headroom (15%) and above the noise of a 10 s rate estimate."""
    if old is None:
        return True
    if (old.rate_qpm <= 0) != (new.rate_qpm <= 0):
        return True  # the server went idle, or woke: re-plan (an idle one runs at K = 0)
    if abs(new.rate_qpm - old.rate_qpm) > max(rate_tol * old.rate_qpm, 1.0):
        return True
    if abs(new.edits - old.edits) > mix_tol:
        return True
    return float(np.abs(np.asarray(new.mix) - np.asarray(old.mix)).sum()) > mix_tol
