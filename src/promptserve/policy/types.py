"""What the policy core takes and gives: frozen data, no clocks, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from promptserve.profile import Profile


class Status(IntEnum):
    """Ordered: everything from SERVED on is final."""

    QUEUED = 0
    RUNNING = 1
    SERVED = 2  # answered (in time or late: compare finish time with the deadline)
    REFUSED = 3  # turned away at admission (HTTP 429)
    DROPPED = 4  # accepted, then given up because no level could meet its deadline


@dataclass(frozen=True, slots=True)
class Demand:
    """Offered load to plan for."""

    rate_qpm: float  # queries per minute, all classes together
    mix: tuple[
        float, ...
    ]  # share of requests per K_opt class, over the profile's levels (sums to 1)
    backlog: tuple[int, ...] = ()  # requests waiting per level now (optional)
    size_weight: float = 1.0  # the requests' mean pixels against the native size's
    # the share of requests that are edits (``mix`` is over the generations), and the mean
    # steps an edit runs from its own start: a step-level price counts them at that cost
    edits: float = 0.0
    edit_steps: float = 0.0

    def per_class_qpm(self) -> np.ndarray:
        return self.rate_qpm * np.asarray(self.mix, dtype=float)


@dataclass(frozen=True)
class Plan:
    """A level per GPU and how each K_opt class is spread over the levels."""

    levels: tuple[int, ...]  # the profile's K values, ascending
    gpu_levels: tuple[int | None, ...]  # K per GPU; None: the GPU takes work of any level
    route: tuple[tuple[float, ...], ...]  # P[k_opt index][level index]; each row sums to 1
    refuse: tuple[float, ...]  # per K_opt class: share to refuse at admission
    capacity_qpm: tuple[float, ...]  # planned capacity per level (queries/minute)
    expected_quality: float  # planned mean effective quality, percent (refused count 0)
    batch: tuple[int, ...] = field(default=())  # planned batch size per level (0: no GPUs)

    def gpus_at(self, k: int) -> int:
        return sum(1 for g in self.gpu_levels if g == k)


@dataclass(frozen=True, slots=True)
class Job:
    """A request inside the dispatcher."""

    id: int
    arrival_s: float
    deadline_s: float
    k_opt: int  # the level its similarity tolerates
    k_max: int  # the highest level it can be served at (its neighbour's cached levels; 0: none)
    level: int  # the level it was routed to
    shape: int = 0  # its size, as an index into the profile's ``shape_weights`` (0: native)
    adapters: tuple[int, ...] = ()  # the LoRA adapters it names, as ids (``policy.residency``)
    exact: bool = False  # every step full whatever the load (``quality: high``): r = 1 only
    start: int | None = None  # an edit's own start step (``contract.Ask``); None: a generation
    batch: bool = False  # background work: runs on what interactive work leaves (``background``)


@dataclass(frozen=True, slots=True)
class BatchWork:
    """Pinned: one batch, run whole on ``gpu`` at ``level`` (``policy.contract``)."""

    gpu: int
    level: int
    jobs: tuple[Job, ...]
    start_s: float
    until_s: float  # its end as the profile predicts it


@dataclass(frozen=True, slots=True)
class Outcome:
    job: Job
    status: Status
    time_s: float  # when it ended
    level: int = -1  # the level it was served at; -1 when not served
    gpu: int = -1  # the GPU that served it; -1 when not served
    interval: int = 1  # the feature-cache interval it was served at (1: every step full)
    # (interval, steps) it ran at before a boundary raised its interval (a burst): ``interval``
    # is the one it finished at
    earlier: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Setting:
    """What every policy plans against."""

    profiles: tuple[Profile, ...]  # one per GPU
    quality: np.ndarray  # q[K_opt index, K index], percent
    slo_s: float
    # q_r per feature-cache interval r = 1, 2, ... (percent; ``quality.IntervalQuality``):
    # what an interval keeps of a level's quality, for profiles with a feature cache
    interval_q: tuple[float, ...] = (100.0,)
