"""The price on step-slots: one cluster-wide number, points of quality per step, set from the
load estimate so that the step work asked for fits the cluster's step capacity (0 with slack:
every request in full). The one place where load turns into levels: the choice tables it
builds are what ``levels.Levels`` reads for each join."""

from __future__ import annotations

import math

import numpy as np
from mypy_extensions import mypyc_attr

from promptserve.policy.step.cluster import Cluster
from promptserve.policy.step.config import StepSpec
from promptserve.policy.step.excess import ExcessWork
from promptserve.policy.step.sizemix import SizeMix
from promptserve.policy.types import Demand, Job
from promptserve.steptime import draw

# the share of the estimated step capacity the price plans to fill: above 1, because the
# estimate is a full run's in-flight limit and a burst it misjudges is caught by ``saturated``
# (Poisson 2 GPUs, mild, 3 seeds: 1.0 / 1.1 / 1.25 gave 94.8 / 95.2 / 95.5 at 60 qpm and
# 87.2 / 87.1 / 85.4 at 100)
UTILISATION = 1.1
SLO_SHARE = 0.9  # of the SLO, what running may take (the rest: waiting to join)
EXCESS_SHARE = 1.0 - SLO_SHARE  # of the SLO, the excess work a burst may pour in (see ExcessWork)
PRICE_MAX = 50.0  # points per step: above any quality difference, every request at its fastest


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class Pricing:
    """Sets ``price``, the options it picks per K_opt and neighbour (``choice``, and
    ``choice_lo`` for the share ``split`` of the class that moves), per size (``by_shape``)
    and at a burst (``at_top``), and what a full GPU is (``busy_at``, ``pace_s``)."""

    def __init__(
        self, spec: StepSpec, cluster: Cluster, sizes: SizeMix, excess: ExcessWork
    ) -> None:
        self.spec, self.cluster, self.sizes, self.excess = spec, cluster, sizes, excess
        self._built_for: StepSpec | None = None  # the spec ``_tables`` were built for
        self._member_table: dict[int, tuple[tuple, list[float]]] = {}  # per interval
        self.last: tuple[Demand, float] | None = None  # what it last priced for
        self.price = 0.0
        self.busy_at = spec.cap  # members past which a GPU is full (set with the price)
        self.pace_s = math.inf  # an iteration past which a GPU is full (with the price)
        self.choice = self.choice_lo = self.choices(0.0)
        self.at_top = [self.choices(0.0, spec.intervals[-1])] * len(spec.profile.shape_weights)
        self.by_shape: list[tuple[list, list]] = []  # per size (``size_factors``)
        self.split = 0.0  # share of the moving class that takes the cheaper level
        self.excess_limit = math.inf  # set with the price
        self.inflight_for: list[int] = []  # per run length in steps (``reprice``)
        self.inflight_slo: tuple | None = None  # the SLO and size mix it is built for
        # ``value_shed``: overloaded at the fastest levels, the quality per full step below
        # which an arrival is refused while the cluster is full, and the share of the class
        # at the floor that is still admitted (0: no floor)
        self.floor, self.floor_split = 0.0, 1.0
        self.factors = [1.0]  # per size, its price over the mean (``size_factors``)

    @property
    def options(self) -> list[tuple[int, int]]:
        """The (level index, interval) pairs a request may be served at, by level then
        interval: without feature caching, each level at r = 1."""
        return self._tables()[0]

    def _tables(self) -> tuple:
        """``options``, and each one's steps, q_r and level column, and the options up to
        each level: fixed by the spec, built again when the rule changes (``use``)."""
        if self._built_for is not self.spec:
            n, w = self.spec.profile.total_steps, self.spec.profile.interval_weight
            levels = self.spec.levels
            options = [(j, r) for j in range(len(levels)) for r in self.spec.intervals]
            steps = np.array([(n - levels[j]) * (w(r) if r > 1 else 1) for j, r in options])
            q_r = np.array([self.spec.interval_q[r - 1] / 100.0 for _, r in options])
            cols = [j for j, _ in options]
            upto = [sum(1 for j, _ in options if j <= m) for m in range(len(levels))]
            self._table = (options, steps.astype(float), q_r, cols, upto)
            self._built_for = self.spec
        return self._table

    def choices(self, price: float, only_r: int | None = None) -> list[list[int]]:
        """Per K_opt index and per k_max index: the option (``options``) the price picks,
        ``q(K_opt, K) x q_r(r) / 100 - price x (N - K) x w(r)`` at its best, ``w(r)`` the
        interval's mean step over a full one (``only_r``: among the options at that interval)."""
        options, steps, q_r, cols, upto = self._tables()
        cached = len(self.spec.intervals) > 1
        q = self.spec.quality[:, cols] * q_r if cached else self.spec.quality[:, cols]
        score = q - price * steps
        if only_r is not None:
            score = np.where([r == only_r for _, r in options], score, -np.inf)
        # per k_max index: each K_opt row's best among the options up to that level, as
        # ``argmax`` over each prefix would pick it (the first of equal scores), for all the
        # prefixes in one pass: the column of the running best, moved only by a strictly higher
        # score
        n = score.shape[1]
        above = np.empty_like(score, dtype=bool)
        above[:, 0] = True
        above[:, 1:] = score[:, 1:] > np.maximum.accumulate(score, axis=1)[:, :-1]
        first = np.maximum.accumulate(np.where(above, np.arange(n), 0), axis=1)
        return first[:, [c - 1 for c in upto]].tolist()

    def option_work(self, o: int) -> float:
        """Steps of GPU time option ``o`` asks for, in full steps."""
        j, r = self.options[o]
        steps = self.spec.profile.total_steps - self.spec.levels[j]
        return steps * self.spec.profile.interval_weight(r) if r > 1 else steps

    def reprice(self, demand: Demand, slo_s: float) -> float:
        """The price at which the step work asked for fits the step capacity; 0 with slack.

        The work asked for falls with the price in steps (a whole K_opt class moves at once),
        so at the price found the class that moves is split: a share ``split`` of its
        requests (drawn per request, deterministically) takes the cheaper level, so that the
        work matches the capacity instead of undershooting it."""
        self.last = (demand, slo_s)
        fastest = self.spec.profile.total_steps - self.spec.levels[-1]
        self.excess.capacity_per_s = self.steps_capacity(slo_s, fastest)
        key = (slo_s, tuple(round(p, 2) for p in self.sizes.shares))
        if self.inflight_slo != key:  # a table of the profile, the SLO and the sizes
            steps = range(self.spec.profile.total_steps + 1)
            self.inflight_for = [self.inflight_within(max(r, 1), slo_s) for r in steps]
            self.inflight_slo = key
        if self.spec.config.rule != "price":
            return self.price
        per_s = demand.rate_qpm / 60.0
        # a GPU is full past the members a full run could share it with, at the longest
        # interval where feature caching offers one (a run may take it at a burst)
        self.busy_at = self.inflight_within(
            self.spec.profile.total_steps, slo_s, self.spec.intervals[-1]
        )
        self.pace_s = SLO_SHARE * slo_s / self.spec.profile.total_steps  # a full run's step
        # what the waiting share of the SLO absorbs: past it, a join below its fastest level
        # takes steps a request of the burst needs to make its deadline
        self.excess_limit = self.excess.capacity_per_s * EXCESS_SHARE * slo_s
        last = len(self.spec.levels) - 1

        def work(price: float) -> tuple[float, float]:
            choice, steps = self.choices(price), 0.0
            for i, share in enumerate(demand.mix):
                o = choice[i][last if i > 0 else 0]  # a miss (K_opt 0) may have no neighbour
                steps += share * self.option_work(o)
            if demand.edits:  # the mix is the generations'; an edit runs from its own start
                r = self.edit_interval_for(demand.edit_steps, price)
                edit = demand.edit_steps * self.spec.profile.interval_weight(r)
                steps = (1.0 - demand.edits) * steps + demand.edits * edit
            return per_s * steps, self.steps_capacity(slo_s, steps)

        def over(price: float, share: float = UTILISATION) -> bool:
            asked, capacity = work(price)
            return asked > share * capacity

        self.split = 0.0
        if not over(0.0):
            lo = hi = 0.0
        elif over(PRICE_MAX, 1.0):  # more than the cluster can do even at the fastest levels
            lo = hi = PRICE_MAX
        else:
            lo, hi = 0.0, PRICE_MAX
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if over(mid) else (lo, mid)
            (w_lo, cap), (w_hi, _) = work(lo), work(hi)
            if w_lo > w_hi:
                self.split = min(max((w_lo - UTILISATION * cap) / (w_lo - w_hi), 0.0), 1.0)
        self.price = hi
        self.choice, self.choice_lo = self.choices(hi), self.choices(lo)
        self.floor, self.floor_split = 0.0, 1.0
        if hi >= PRICE_MAX and self.spec.config.value_shed:
            self.value_floor(per_s * np.asarray(demand.mix), slo_s)
        sized = self.spec.profile.sized
        factors = self.size_factors() if sized else [1.0]
        self.factors = factors
        at_max = (self.choice, self.choice_lo)  # at ``PRICE_MAX`` every size at its fastest
        self.by_shape = [
            at_max if hi >= PRICE_MAX else (self.choices(hi * f), self.choices(lo * f))
            for f in factors
            if sized
        ]
        if len(self.spec.intervals) > 1:  # at a burst (``_preferred``): per size
            self.at_top = [self.choices(hi * f, self.spec.intervals[-1]) for f in factors]
        return hi

    def density(self, i: int, m: int) -> float:
        """Quality points per full step of GPU time of a K_opt class (index ``i``, fastest
        level index ``m``) at the option the price picks for it."""
        o = self.choice[i][m]
        j, r = self.options[o]
        q = self.spec.quality[i][j] * self.spec.interval_q[r - 1] / 100.0
        return q / max(self.option_work(o), 1e-9)

    def value_floor(self, per_s: np.ndarray, slo_s: float) -> None:
        """More is asked than the GPUs do even at the fastest levels, so some requests will
        not be served in time; the most quality in time comes from serving the classes worth
        most per step first (a fractional knapsack over the K_opt classes, by the load
        estimate's mix): the floor is the density of the class at which the capacity runs
        out, and ``floor_split`` the share of that class that still fits."""
        last = len(self.spec.levels) - 1
        # per density, its classes' (requests per second, steps each): classes of one density
        # share the floor's split; a miss (K_opt 0) may have no neighbour, as ``work`` counts
        groups: dict[float, list[tuple[float, float]]] = {}
        for i, rate_i in enumerate(per_s):
            m = last if i > 0 else 0
            work = self.option_work(self.choice[i][m])
            groups.setdefault(round(self.density(i, m), 9), []).append((rate_i, work))
        asked = rate = 0.0  # steps per second and requests per second of the classes above
        for dens in sorted(groups, reverse=True):
            more = sum(r * w for r, w in groups[dens])
            if more <= 0:
                continue
            n = sum(r for r, _ in groups[dens])
            # the capacity at the admitted classes' mean run (a shorter run shares a GPU more)
            capacity = UTILISATION * self.steps_capacity(slo_s, (asked + more) / (rate + n))
            if asked + more > capacity:
                self.floor = dens
                self.floor_split = max(capacity - asked, 0.0) / more
                return
            asked, rate = asked + more, rate + n

    def edit_interval(self, job: Job, price: float) -> int:
        """The interval an edit (``job.start``) runs at under ``price``, its size's share of it."""
        assert job.start is not None
        factor = self.factors[job.shape] if len(self.factors) > job.shape else 1.0
        return self.edit_interval_for(self.spec.profile.total_steps - job.start, price * factor)

    def edit_interval_for(self, steps: float, price: float) -> int:
        """The interval at which an edit of ``steps`` steps is worth most under ``price``: its
        quality is its interval's alone (K does not apply: it starts from its own image), so
        ``q_r x 100 / 100 - price x steps x w(r)``, the shortest interval at a tie."""
        w = self.spec.profile.interval_weight
        return max(
            self.spec.intervals,
            key=lambda r: self.spec.interval_q[r - 1] - price * steps * (w(r) if r > 1 else 1),
        )

    def worth(self, job: Job) -> bool:
        """Whether ``job`` is worth its steps under the floor (``value_floor``)."""
        if self.floor <= 0.0:
            return True
        if job.start is not None:  # an edit: its interval's quality over its own steps
            r = self.edit_interval(job, self.price)
            steps = (self.spec.profile.total_steps - job.start) * (
                self.spec.profile.interval_weight(r) if r > 1 else 1
            )
            return self.spec.interval_q[r - 1] / max(steps, 1e-9) > self.floor
        i, m = self.spec.index_of[job.k_opt], self.spec.index_of[job.k_max]
        dens = round(self.density(i, m), 9)
        if dens != self.floor:
            return dens > self.floor
        return draw(job.id) < self.floor_split

    def size_factors(self) -> list[float]:
        """Per size, its price over the mean price: the levels are chosen at the price per
        step-second, and a step of a size costs the GPU ``member_s(n, size)`` against a native
        one's (at the in-flight count a full run shares a GPU with), normalised over the
        arrivals' mix so that the mean price is the one found. At ``PRICE_MAX`` every size
        runs at its fastest level, as without sizes."""
        n = max(self.busy_at, 1)
        cost = [self.sizes.member_s(n, s) for s in range(len(self.spec.profile.shape_weights))]
        mean = sum(p * c for p, c in zip(self.sizes.shares, cost, strict=True)) or cost[0]
        return [c / mean for c in cost]

    def steps_capacity(self, slo_s: float, mean_steps: float | None = None) -> float:
        """Steps per second the up GPUs give at the largest in-flight count at which a request
        of ``mean_steps`` (default: a full one) finishes within ``SLO_SHARE`` of the SLO (the
        rest is left for waiting to join)."""
        n = self.inflight_within(mean_steps or self.spec.profile.total_steps, slo_s)
        return self.cluster.up_count * (n / self.sizes.member_s(n))

    def inflight_within(self, steps: float, slo_s: float, r: int = 1) -> int:
        """The largest in-flight count at which ``steps`` steps (of members at feature-cache
        interval ``r``) take at most ``SLO_SHARE`` of the SLO (at least 1)."""
        n = 1
        for b, member_s in enumerate(self._member_s(r), start=1):
            if steps * member_s <= SLO_SHARE * slo_s:
                n = b
        return n

    def _member_s(self, r: int) -> list[float]:
        """``sizes.member_s(b, None, r)`` for b = 1 .. cap, kept while the size mix and the
        spec stay (a re-price asks for it at every step of its search)."""
        key = (self.spec, self.sizes.shares)
        held = self._member_table.get(r)
        if held is None or held[0] != key:
            times = [self.sizes.member_s(b, None, r) for b in range(1, self.spec.cap + 1)]
            held = self._member_table[r] = (key, times)
        return held[1]
