"""The contract every scheduler keeps with its driver, on either clock.

A driver (the simulator's event loop, the live runtime) finds a request's K_opt and hands it
in as an ``Ask``; then, after every event, it asks ``schedule(now)`` what to start, runs each
``Work`` (simulated: until the time it carries; live: on a GPU) and tells ``update(now, gpu,
Report)`` what came of it. A scheduler decides everything else: which GPU, which level, when a
batch or a boundary happens, who is dropped. ``replan`` is the re-plan period's call,
``remove`` a cancel, ``set_up`` a lost or returning GPU; ``snapshot``, ``backlog_s`` and
``pending`` are read for metrics, a refusal's Retry-After and conservation.

The two families differ only in the work they hand out: pinned GPUs run whole batches
(``BatchWork``), step-level GPUs run steps between boundaries (``StepWork``), where members
join and leave. A driver runs both the same way: the latest work handed out for a GPU
replaces any earlier one it has not reported (a step-level GPU's boundary moved earlier).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.types import BatchWork, Demand, Job, Outcome, Plan

if TYPE_CHECKING:
    from promptserve.policy.step.gpu import Member


@dataclass(frozen=True)
class Ask:
    """A request as its scheduler sees it."""

    id: int
    deadline_s: float  # the request's own, absolute (a plan's is this less the margin)
    k_opt: int  # the level its neighbour's similarity tolerates (0: none)
    has_neighbour: bool  # its neighbour holds latents at every level (else it runs at K = 0)
    shape: int = 0  # its size, an index into the profile's ``shape_weights`` (0: native)
    adapters: tuple[int, ...] = ()  # the LoRA adapters it names, as ids
    exact: bool = False  # a full generation asked for: no cached latent, every step full
    # an edit: the step it starts at from its own image (``promptserve.strength``); it costs
    # the steps from there, its quality is its interval's, and it has no neighbour
    start: int | None = None
    # background work (``priority: batch``): it runs on the capacity interactive requests
    # leave, is paused at a step boundary when they need its GPU and resumes where it stopped;
    # it pays no price and interactive admission never counts it (``step.background``)
    batch: bool = False
    # background work found written down by a restart: it resumes at this step (a join there)
    resume_at: int | None = None


@dataclass(frozen=True)
class Arrival:
    """What became of an arriving request."""

    job: Job  # as routed or placed (its deadline is the plan's: the request's less the margin)
    ended: Outcome | None = None  # refused or dropped at once; None: it is in
    gpu: int | None = None  # step-level: the GPU it joins at that GPU's next boundary
    # refused for good: even alone on an idle GPU its fastest run takes this long (seconds,
    # with the delivery margin), more than its deadline leaves; None: it was not
    unmeetable_s: float | None = None


@dataclass(frozen=True)
class StepWork:
    """Step-level: what ``gpu`` does from its boundary at ``start_s``: who joins (each at its
    (K, r), reading its start latent), who runs on at a longer interval, and how many steps
    follow before the next boundary it must stop at."""

    gpu: int
    joins: tuple[Member, ...]  # joining now, each at its K and interval
    retimed: tuple[Member, ...]  # running members moved to a longer interval (a burst)
    steps: int  # steps until the next boundary (0: a boundary now, nothing runs first)
    start_s: float  # the segment these steps belong to began here (after the joins' encodes
    # and adapter loads: a join placed on the GPU before then joins at ``start_s``, a step
    # sooner than one placed after it)
    until_s: float  # when they end, as the profile times them (the simulator's clock)
    at_s: float = 0.0  # the boundary it was handed out at
    # background members written down and let go at this boundary, before anyone joins (each
    # resumes later, on any GPU, as a join whose ``Member.from_step`` is the step it reached)
    pauses: tuple[int, ...] = ()


Work = BatchWork | StepWork


@dataclass(frozen=True)
class Report:
    """What a GPU did with its work, told back at its end (or where a live GPU stopped)."""

    steps: int = 0  # step-level: steps run since the last boundary
    # step-level: members that started at another K than they were given (their start
    # latent was gone: they run from there; a resumed background member: at another step
    # than it was paused at), and members the worker no longer holds (a replaced worker:
    # they are placed again)
    started: tuple[tuple[int, int], ...] = ()
    lost: tuple[int, ...] = ()
    # step-level, live: members the worker finished and decoded (the time is in ``now``);
    # without them the scheduler's model says who leaves and adds their decodes
    finished: tuple[int, ...] = ()
    failed: bool = False  # pinned: the batch failed (its jobs end with the driver's error)


@dataclass(frozen=True)
class Schedule:
    """What ``schedule`` hands out: work to start, and requests it gave up on meanwhile."""

    work: tuple[Work, ...] = ()
    ended: tuple[Outcome, ...] = ()
    wake_s: float = math.inf  # look again then without an event (a GPU switching level)


@dataclass(frozen=True)
class Replan:
    """What a re-plan did: the plan (pinned) or the price (step-level) it set."""

    plan: Plan | None = None  # pinned: the plan adopted (None: none made, the last stands)
    price: float | None = None  # step-level: points of quality per step-slot


@dataclass(frozen=True)
class LoadSnapshot:
    """The load a driver reports, whatever the family."""

    queued: dict[int, int]  # per level: pinned queues; step-level: every waiting one at level 0
    per_level: dict[int, int]  # pinned: GPUs at each level; step-level: members at each K
    inflight: tuple[int, ...]  # step-level: members per GPU (empty for pinned)
    gpus: int
    gpus_up: int
    up: tuple[bool, ...] = ()  # per GPU: taking work
    levels: tuple[int | None, ...] = ()  # pinned: each GPU's level (empty for step-level)
    edits: int = 0  # step-level: members that are edits (in no level of ``per_level``)
    batch_running: int = 0  # step-level: background members running
    batch_waiting: int = 0  # step-level: background jobs queued or paused


class Proposal(Protocol):
    """A re-plan to solve (``Scheduler.propose``); opaque to the driver but for ``slow``."""

    slow: bool  # its solve may take long (a solver): a live driver runs it off its loop


@runtime_checkable
class Scheduler(Protocol):
    estimator: LoadEstimator  # told of every arrival; the re-plan reads its estimate
    stepwise: bool  # hands out ``StepWork`` (workers build their step runners at start-up)

    def intake(self, now: float, ask: Ask) -> Arrival:
        """Route or place a request, or end it at once (refused, or dropped: no level can
        finish it)."""
        ...

    def schedule(self, now: float) -> Schedule:
        """The work to start now, and the requests given up on since the last call."""
        ...

    def update(self, now: float, gpu: int, report: Report) -> list[Outcome]:
        """``gpu``'s work ended (or reached a boundary): who is served, who is dropped."""
        ...

    def replan(self, now: float, demand: Demand, force: bool = False) -> Replan:
        """The re-plan period's plan or price for ``demand`` (``force``: GPUs changed): the
        three calls below in a row."""
        ...

    def propose(self, demand: Demand, force: bool = False) -> Proposal | None:
        """What to solve for ``demand`` (None: nothing to plan)."""
        ...

    def solve(self, proposal: Proposal) -> object:
        """Pure: the plan or price ``proposal`` asks for; may run on another thread."""
        ...

    def adopt(self, now: float, proposal: Proposal, solved: object) -> Replan:
        """Put ``solved`` in force (a plan made for GPUs that changed meanwhile is dropped)."""
        ...

    def remove(self, job_id: int) -> Job | None:
        """A cancelled request out of wherever it waits or runs (None: not here)."""
        ...

    def set_up(self, gpu: int, up: bool, now: float) -> list[Job]:
        """A GPU lost (the jobs it held, placed again; those that cannot finish come out of
        the next ``schedule``) or back."""
        ...

    def pending(self) -> int:
        """Requests queued, waiting or running."""
        ...

    def snapshot(self) -> LoadSnapshot: ...

    def backlog_s(self, now: float) -> float:
        """Seconds until the soonest capacity frees."""
        ...


def ran(work: Work) -> Report:
    """What a GPU reports that ran ``work`` to its end as the profile times it (the
    simulator's GPUs): a batch's end, or the steps up to a boundary."""
    return Report(steps=work.steps) if isinstance(work, StepWork) else Report()


@dataclass(frozen=True)
class Start:
    """A job that starts running in a work, at its level and feature-cache interval."""

    job: Job
    k: int
    r: int = 1
    from_step: int | None = None  # background work resumed: the step it was paused at


def starts(work: Work) -> tuple[Start, ...]:
    """The jobs that start in ``work``: a batch's, or a boundary's joiners."""
    if isinstance(work, StepWork):
        return tuple(Start(m.job, m.k, m.r, m.from_step) for m in work.joins)
    return tuple(Start(job, work.level) for job in work.jobs)


def moved(work: Work) -> tuple[Start, ...]:
    """Running members ``work`` moves to another interval (a burst), each with its new one."""
    if isinstance(work, StepWork):
        return tuple(Start(m.job, m.k, m.r) for m in work.retimed)
    return ()


def served_by(work: Work) -> float:
    """The earliest a driver knows ``work`` answers anyone: a batch's end; a step-level work
    may or may not end a member (unknown: never, for the simulator's lookahead)."""
    return work.until_s if isinstance(work, BatchWork) else math.inf
