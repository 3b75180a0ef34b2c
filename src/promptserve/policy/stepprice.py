"""The price on step-slots: one cluster-wide number, points of quality per step, set from the
load estimate so that the step work asked for fits the cluster's step capacity (0 with slack:
every request in full). ``StepScheduler`` takes it in; kept apart because it is the one
place where load turns into levels."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property

import numpy as np

from promptserve.policy.steptime import draw
from promptserve.policy.types import Demand, Job

# the share of the estimated step capacity the price plans to fill: above 1, because the
# estimate is a full run's in-flight limit and a burst it misjudges is caught by ``saturated``
# (Poisson 2 GPUs, mild, 3 seeds: 1.0 / 1.1 / 1.25 gave 94.8 / 95.2 / 95.5 at 60 qpm and
# 87.2 / 87.1 / 85.4 at 100)
UTILISATION = 1.1
SLO_SHARE = 0.9  # of the SLO, what running may take (the rest: waiting to join)
EXCESS_SHARE = 1.0 - SLO_SHARE  # of the SLO, the excess work a burst may pour in (see ExcessWork)
PRICE_MAX = 50.0  # points per step: above any quality difference, every request at its fastest


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


class Full(IntEnum):
    """How full the cluster is (``StepPricing._fullness``), for the lever a burst takes."""

    NO = 0
    BY_PACE = 1  # only by a GPU's pace (members at short intervals): the interval is enough
    AT_TOP = 2  # even with every member at the longest interval: the level moves too


class StepPricing:
    """The pricing half of ``StepScheduler``: it reads the scheduler's profile, levels, quality,
    GPUs, cap, config, waiting queue and ``member_s`` (a step's time for n members drawn
    from the arrivals' sizes), sets ``price``, the levels it picks and the split
    between them, and gives each joining request the K the price (or the rule) prefers."""

    @cached_property
    def options(self) -> list[tuple[int, int]]:
        """The (level index, interval) pairs a request may be served at, by level then
        interval: without feature caching, each level at r = 1."""
        return [(j, r) for j in range(len(self.levels)) for r in self.intervals]

    def _choices(self, price: float, only_r: int | None = None) -> list[list[int]]:
        """Per K_opt index and per k_max index: the option (``options``) the price picks,
        ``q(K_opt, K) x q_r(r) / 100 - price x (N - K) x w(r)`` at its best, ``w(r)`` the
        interval's mean step over a full one (``only_r``: among the options at that interval)."""
        n, w = self.profile.total_steps, self.profile.interval_weight
        options = self.options
        steps = np.array(
            [(n - self.levels[j]) * (w(r) if r > 1 else 1) for j, r in options], dtype=float
        )
        q_r = np.array([self.interval_q[r - 1] / 100.0 for _, r in options])
        cols = [j for j, _ in options]
        upto = [sum(1 for j, _ in options if j <= m) for m in range(len(self.levels))]
        cached = len(self.intervals) > 1
        out = []
        for i in range(len(self.levels)):
            q = self.quality[i][cols] * q_r if cached else self.quality[i][cols]
            score = q - price * steps
            if only_r is not None:
                score = np.where([r == only_r for _, r in options], score, -np.inf)
            out.append([int(np.argmax(score[:c])) for c in upto])
        return out

    def _option_work(self, o: int) -> float:
        """Steps of GPU time option ``o`` asks for, in full steps."""
        j, r = self.options[o]
        steps = self.profile.total_steps - self.levels[j]
        return steps * self.profile.interval_weight(r) if r > 1 else steps

    def reprice(self, demand: Demand, slo_s: float) -> float:
        """The price at which the step work asked for fits the step capacity; 0 with slack.

        The work asked for falls with the price in steps (a whole K_opt class moves at once),
        so at the price found the class that moves is split: a share ``split`` of its
        requests (drawn per request, deterministically) takes the cheaper level, so that the
        work matches the capacity instead of undershooting it."""
        fastest = self.profile.total_steps - self.levels[-1]
        self.excess.capacity_per_s = self.steps_capacity(slo_s, fastest)
        key = (slo_s, tuple(round(p, 2) for p in self.size_shares))
        if self._inflight_slo != key:  # a table of the profile, the SLO and the sizes
            steps = range(self.profile.total_steps + 1)
            self._inflight_for = [self.inflight_within(max(r, 1), slo_s) for r in steps]
            self._inflight_slo = key
        if self.config.rule != "price":
            return self.price
        per_s = demand.rate_qpm / 60.0
        # a GPU is full past the members a full run could share it with, at the longest
        # interval where feature caching offers one (a run may take it at a burst)
        self._busy_at = self.inflight_within(self.profile.total_steps, slo_s, self.intervals[-1])
        self._pace_s = SLO_SHARE * slo_s / self.profile.total_steps  # a full run's step
        # what the waiting share of the SLO absorbs: past it, a join below its fastest level
        # takes steps a request of the burst needs to make its deadline
        self._excess_limit = self.excess.capacity_per_s * EXCESS_SHARE * slo_s
        last = len(self.levels) - 1

        def work(choice: list[list[int]]) -> tuple[float, float]:
            steps = 0.0
            for i, share in enumerate(demand.mix):
                o = choice[i][last if i > 0 else 0]  # a miss (K_opt 0) may have no neighbour
                steps += share * self._option_work(o)
            return per_s * steps, self.steps_capacity(slo_s, steps)

        def over(price: float, share: float = UTILISATION) -> bool:
            asked, capacity = work(self._choices(price))
            return asked > share * capacity

        self._split = 0.0
        if not over(0.0):
            lo = hi = 0.0
        elif over(PRICE_MAX, 1.0):  # more than the cluster can do even at the fastest levels
            lo = hi = PRICE_MAX
        else:
            lo, hi = 0.0, PRICE_MAX
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if over(mid) else (lo, mid)
            (w_lo, cap), (w_hi, _) = work(self._choices(lo)), work(self._choices(hi))
            if w_lo > w_hi:
                self._split = min(max((w_lo - UTILISATION * cap) / (w_lo - w_hi), 0.0), 1.0)
        self.price = hi
        self._choice, self._choice_lo = self._choices(hi), self._choices(lo)
        sized = self.profile.sized
        factors = self._size_factors() if sized else [1.0]
        at_max = (self._choice, self._choice_lo)  # at ``PRICE_MAX`` every size at its fastest
        self._by_shape = [
            at_max if hi >= PRICE_MAX else (self._choices(hi * f), self._choices(lo * f))
            for f in factors
            if sized
        ]
        if len(self.intervals) > 1:  # at a burst (``_preferred``): per size
            self._at_top = [self._choices(hi * f, self.intervals[-1]) for f in factors]
        return hi

    def _size_factors(self) -> list[float]:
        """Per size, its price over the mean price: the levels are chosen at the price per
        step-second, and a step of a size costs the GPU ``member_s(n, size)`` against a native
        one's (at the in-flight count a full run shares a GPU with), normalised over the
        arrivals' mix so that the mean price is the one found. At ``PRICE_MAX`` every size
        runs at its fastest level, as without sizes."""
        n = max(self._busy_at, 1)
        cost = [self.member_s(n, s) for s in range(len(self.profile.shape_weights))]
        mean = sum(p * c for p, c in zip(self.size_shares, cost, strict=True)) or cost[0]
        return [c / mean for c in cost]

    def steps_capacity(self, slo_s: float, mean_steps: float | None = None) -> float:
        """Steps per second the up GPUs give at the largest in-flight count at which a request
        of ``mean_steps`` (default: a full one) finishes within ``SLO_SHARE`` of the SLO (the
        rest is left for waiting to join)."""
        n = self.inflight_within(mean_steps or self.profile.total_steps, slo_s)
        return self.up_count * (n / self.member_s(n))

    def inflight_within(self, steps: float, slo_s: float, r: int = 1) -> int:
        """The largest in-flight count at which ``steps`` steps (of members at feature-cache
        interval ``r``) take at most ``SLO_SHARE`` of the SLO (at least 1)."""
        n = 1
        for b in range(1, self.cap + 1):
            if steps * self.member_s(b, None, r) <= SLO_SHARE * slo_s:
                n = b
        return n

    def preferred_k(self, job: Job, at: float) -> int:
        return self._preferred(job, at)[0]

    def preferred(self, job: Job, at: float) -> tuple[int, int]:
        """The (K, interval) the rule or the price prefers for ``job`` joining at ``at``
        (without feature caching, ``preferred_k``'s level at r = 1)."""
        if len(self.intervals) == 1:
            return self.preferred_k(job, at), 1 if job.exact else self.intervals[0]
        if job.exact:  # a full generation asked for: K = 0 (no neighbour), every step full
            return self.preferred_k(job, at), 1
        return self._preferred(job, at)

    def _preferred(self, job: Job, at: float) -> tuple[int, int]:
        if self.config.rule == "zero":
            return 0, 1
        if self.config.rule == "max":
            return job.k_max, 1
        i, m = self.index_of[job.k_opt], self.index_of[job.k_max]
        hi, lo = self._by_shape[job.shape] if self._by_shape else (self._choice, self._choice_lo)
        full = self._fullness(at)
        if full:  # the price lags a burst: the cheapest lever that takes it
            top = self.intervals[-1]
            if full is Full.AT_TOP:
                return job.k_max, top
            # full by its pace only (members at short intervals): the longest interval at the
            # level the price picks there, as the running members move to it (``_retime``); a
            # K below the price's costs points that a cached step does not
            j, _ = self.options[self._at_top[job.shape][i][m]]
            return self.levels[j], top
        o = hi[i][m]
        if lo[i][m] != o and draw(job.id) >= self._split:
            o = lo[i][m]
        j, r = self.options[o]
        return self.levels[j], r

    def saturated(self, now: float) -> bool:
        """Whether the cluster is full now: a burst is arriving (``ExcessWork``), requests
        wait, or even the least-loaded GPU holds more members than a full run could share a
        GPU with and finish in ``SLO_SHARE`` of the SLO, or, its members at several intervals
        (the count misjudges them), runs an iteration slower than such a run's. The price
        follows the load estimate (seconds behind a burst); this follows the arrivals and the
        running batches, so a burst moves joins to a faster level from its first requests."""
        return self._fullness(now) is not Full.NO

    def _fullness(self, now: float) -> Full:
        """``saturated``, and whether the cluster is full even with every member counted at the
        longest interval (the load a burst brings, or the members a GPU holds) or only by the
        least-loaded GPU's pace."""
        if self.waiting or self.excess.now(now) > self._excess_limit:
            return Full.AT_TOP
        gpu = self.least_loaded()
        if gpu is None or gpu.count > self._busy_at:
            return Full.AT_TOP
        if len(self.intervals) > 1 and self.profile.mix_s(gpu.shapes) > self._pace_s:
            return Full.BY_PACE
        return Full.NO
