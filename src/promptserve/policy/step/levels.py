"""The level and interval each joining request runs at: the one its rule or the price
prefers, else (under ``shed``) the next cheaper that keeps every member of the GPU within its
deadline, as far as its fastest."""

from __future__ import annotations

from collections.abc import Sequence

from mypy_extensions import mypyc_attr

from promptserve.policy.step.bursts import Bursts, Full
from promptserve.policy.step.config import StepSpec
from promptserve.policy.step.fit import Fit
from promptserve.policy.step.gpu import StepGpu
from promptserve.policy.step.price import Pricing
from promptserve.policy.types import Job
from promptserve.steptime import EPS, draw


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class Levels:
    def __init__(self, spec: StepSpec, pricing: Pricing, bursts: Bursts, fit: Fit) -> None:
        self.spec, self.pricing, self.bursts, self.fit = spec, pricing, bursts, fit

    def preferred_k(self, job: Job, at: float) -> int:
        return self._preferred(job, at)[0]

    def preferred(self, job: Job, at: float) -> tuple[int, int]:
        """The (K, interval) the rule or the price prefers for ``job`` joining at ``at``
        (without feature caching, ``preferred_k``'s level at r = 1)."""
        if len(self.spec.intervals) == 1:
            return self.preferred_k(job, at), 1 if job.exact else self.spec.intervals[0]
        if job.exact:  # a full generation asked for: K = 0 (no neighbour), every step full
            return self.preferred_k(job, at), 1
        return self._preferred(job, at)

    def _preferred(self, job: Job, at: float) -> tuple[int, int]:
        if job.start is not None:  # an edit: its own start, the price picks its interval
            top = self.spec.intervals[-1]
            if self.bursts.fullness(at):
                return job.start, top
            return job.start, self.pricing.edit_interval(job, self.pricing.price)
        if self.spec.config.rule == "zero":
            return 0, 1
        if self.spec.config.rule == "max":
            return job.k_max, 1
        i, m = self.spec.index_of[job.k_opt], self.spec.index_of[job.k_max]
        hi, lo = (
            self.pricing.by_shape[job.shape]
            if self.pricing.by_shape
            else (self.pricing.choice, self.pricing.choice_lo)
        )
        full = self.bursts.fullness(at)
        if full:  # the price lags a burst: the cheapest lever that takes it
            top = self.spec.intervals[-1]
            if full is Full.AT_TOP:
                return job.k_max, top
            # full by its pace only (members at short intervals): the longest interval at the
            # level the price picks there, as the running members move to it (``Bursts.retime``); a
            # K below the price's costs points that a cached step does not
            j, _ = self.pricing.options[self.pricing.at_top[job.shape][i][m]]
            return self.spec.levels[j], top
        o = hi[i][m]
        if lo[i][m] != o and draw(job.id) >= self.pricing.split:
            o = lo[i][m]
        j, r = self.pricing.options[o]
        return self.spec.levels[j], r

    def choose_k(
        self, gpu: StepGpu, job: Job, at: float, ahead: Sequence[Job] = (), done: int = -1
    ) -> tuple[int, int] | None:
        """The level and interval ``job`` joins ``gpu`` at, or None when none allowed keeps
        the deadlines (only under ``+shed``; without it the preferred one always joins, the
        device's adapter rows permitting): the preferred one, else the next cheaper in GPU
        time ((N - K) steps at the interval's mean step), as far as the fastest."""
        k, r = self.preferred(job, at)
        if not self.spec.config.shed:  # no deadline check: only the device's adapter rows
            return (k, r) if self.fit.room(gpu, job, ahead) else None
        allowed = [(k, r)] if self.spec.config.rule != "price" else self.cheaper(job, k, r)
        for level, interval in allowed:
            if self.fit.fits(gpu, job, level, at, ahead, done, interval):
                return level, interval
        return None

    def cheaper(self, job: Job, k: int, r: int) -> list[tuple[int, int]]:
        """(K, r) from the preferred one to the fastest the job may run at, in falling GPU
        time: without intervals the levels from K up, as before."""
        # an edit runs from its own start only: its choice is the interval alone
        levels = (job.start,) if job.start is not None else self.spec.levels
        fastest = job.start if job.start is not None else job.k_max
        if len(self.spec.intervals) == 1 or job.exact:
            r = 1 if job.exact else self.spec.intervals[0]
            return [(lv, r) for lv in levels if k <= lv <= fastest]
        n, w = self.spec.profile.total_steps, self.spec.profile.interval_weight
        cost = (n - k) * w(r)
        options = [
            ((n - lv) * w(ri), lv, ri) for lv in levels if lv <= fastest
            for ri in self.spec.intervals if (n - lv) * w(ri) <= cost + EPS
        ]  # fmt: skip
        options.sort(key=lambda o: (-o[0], o[1], o[2]))
        return [(lv, ri) for _, lv, ri in options]
