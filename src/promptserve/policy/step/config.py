"""What a step-level scheduler is set up with: its rule and layers, its profile, the quality
table, and the (K, interval) a job may run at fastest. Read by every part, changed by none."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from promptserve.policy.types import Job
from promptserve.steptime import StepProfile

KRule = Literal["price", "zero", "max"]


@dataclass(frozen=True)
class StepConfig:
    rule: KRule  # price: promptserve-step; zero: continuous-ha; max: continuous-ht
    shed: bool  # EDF, deadline-checked joins, drop what cannot finish
    admission: bool  # refuse at arrival what cannot finish
    cap: int = 8  # in-flight cap without shed (with shed, the deadlines set it)
    shape_aware: bool = True  # place by what a size costs where it joins (else: fewest members)
    retime: bool = True  # at a burst, raise running members' feature-cache interval
    max_r: bool = False  # every member at the longest interval whatever the load (a rival)
    # overloaded even at the fastest levels: refuse the requests worth least quality per
    # GPU-second first (``price.ValueFloor``), not whichever arrive when the queue is full
    value_shed: bool = False


@dataclass(frozen=True, eq=False)
class StepSpec:
    """A scheduler's fixed inputs, and what follows from them alone."""

    profile: StepProfile
    config: StepConfig
    quality: np.ndarray  # q[K_opt index, K index]
    interval_q: tuple[float, ...]  # q_r per feature-cache interval r (from 1)
    intervals: tuple[int, ...] = field(init=False)  # the intervals the price may pick
    cap: int = field(init=False)  # members past which no GPU takes another
    index_of: dict[int, int] = field(init=False)  # a level's index

    def __post_init__(self) -> None:
        profile, config = self.profile, self.config
        # the feature-cache intervals the price may pick (``price`` only; the rules run r = 1);
        # ``max_r``, the rival: the longest one only, for every rule
        intervals = profile.intervals if config.rule == "price" else (1,)
        if config.max_r:
            intervals = profile.intervals[-1:]
        padded = tuple(self.interval_q) + (100.0,) * (len(intervals) - len(self.interval_q))
        cap = profile.max_inflight if config.shed else min(config.cap, profile.max_inflight)
        object.__setattr__(self, "intervals", intervals)
        object.__setattr__(self, "interval_q", padded)
        object.__setattr__(self, "cap", cap)
        object.__setattr__(self, "index_of", {k: i for i, k in enumerate(profile.levels)})

    @classmethod
    def of(
        cls,
        profile: StepProfile,
        config: StepConfig,
        quality: np.ndarray,
        interval_q: Sequence[float] = (100.0,),
    ) -> StepSpec:
        return cls(profile, config, np.asarray(quality, dtype=float), tuple(interval_q))

    @property
    def levels(self) -> tuple[int, ...]:
        return self.profile.levels

    def fastest_k(self, job: Job) -> int:
        """The fastest level the rule lets ``job`` run at (an edit: its own start, whatever
        the rule: that is not an approximation, the request asks for it)."""
        if job.start is not None:
            return job.start
        return 0 if self.config.rule == "zero" else job.k_max

    def fastest(self, job: Job) -> tuple[int, int]:
        """The fastest (K, interval) the rule lets ``job`` run at."""
        return self.fastest_k(job), 1 if job.exact else self.intervals[-1]
