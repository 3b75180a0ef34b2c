"""What crosses between the routes and the runtime: a request's outcomes (served, or the
exception that says why not), the caller's handle on it, the runtime's record of it while it
is pending, and the counts and load the metrics read."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from promptserve.cache.approx import CacheHit
from promptserve.engine.base import PLAIN, EditInput, GenerationItem, GenerationResult, Look, Paused
from promptserve.policy.contract import Arrival
from promptserve.policy.types import Status
from promptserve.workers.base import StoreRefs


class Refused(Exception):
    """Admission refused the request: no level can meet its deadline now."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"overloaded: retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class Unmeetable(Exception):
    """The deadline is shorter than this server's fastest run of the request, even idle."""

    def __init__(self, deadline_s: float, least_s: float) -> None:
        super().__init__(
            f"deadline_ms: {deadline_s * 1e3:.0f} ms cannot be met even on an idle server; "
            f"the least this server can meet for this prompt is {least_s * 1e3:.0f} ms"
        )
        self.least_s = least_s


class Dropped(Exception):
    """Accepted, then given up: it could no longer meet its deadline."""


@dataclass
class JobHandle:
    """A caller's view of one request in flight: its events, its acceptance, its cancellation."""

    emit: Callable[[str, dict], None]
    accepted: asyncio.Future | None = None  # resolved with the job id once queued
    job_id: int | None = None
    cancelled: bool = False  # read by the worker thread between denoising steps
    partial_images: int = 0  # previews wanted, spread over the steps it will run
    # nobody hears its step and preview events (a whole answer, not a stream or a job): the
    # worker sends none, rather than one wake-up of the event loop per member and step
    quiet: bool = False
    # a durable background job's image: where its member is written down to (the job store),
    # and where a restart found it written (it resumes from there)
    keep: Callable[[Paused], None] | None = None
    resume: Paused | None = None

    def accept(self, job_id: int, level: int, similarity: float | None) -> None:
        """Queued: its id, and the level it was routed to."""
        self.job_id = job_id
        if self.accepted is not None:
            self.accepted.set_result(job_id)
        self.emit("queued", {"level_k": level, "similarity": similarity})


@dataclass(frozen=True)
class Served:
    result: GenerationResult
    level: int
    similarity: float | None
    quality: float
    queue_s: float
    compute_s: float
    k_opt: int = 0  # the level its neighbour's similarity tolerates (0: a miss)
    seed: int = 0  # the seed of its start noise
    guidance: float | None = None  # the guidance scale it ran at (None: the model has none)
    lora: tuple[tuple[str, float], ...] = ()  # the adapters it ran with
    interval: int = 1  # its feature-cache interval: a full step every this many
    earlier: tuple[tuple[int, int], ...] = ()  # (interval, steps) before ``interval`` (a burst)
    edit: EditInput | None = None  # an edit's input: ``level`` is its own start step


@dataclass
class Pending:
    """One accepted request, from intake to its answer."""

    prompt: str
    tenant: str  # its cache namespace: the tenant's, split by look (``cache_space``)
    embedding: np.ndarray
    hit: CacheHit | None
    future: asyncio.Future
    arrival: float
    seed: int
    handle: JobHandle | None = None
    k_opt: int = 0  # the engine level its neighbour tolerates (0: a miss or an exact request)
    look: Look = PLAIN  # its negative prompt, guidance scale, size and adapters
    deadline_s: float = float("inf")  # the request's own, on the runtime's clock
    # as it runs (step-level serving keeps them between boundaries)
    started: float | None = None  # when its batch started or it joined a running one
    queued_at: float = 0.0  # when intake placed it (then it waits: the ``queue`` stage)
    item: GenerationItem | None = None  # what it runs with
    earlier: tuple[tuple[int, int], ...] = ()  # (interval, steps) it ran at before ``item``'s
    ref: StoreRefs | None = None  # on a shared store: its start key and entry
    edit: EditInput | None = None  # an edit: its own image (and mask) and strength
    # background work: where it was last written down (``StepRunner.pause``), and set once the
    # call that pauses it has ended (a resume on another GPU waits for it)
    paused: Paused | None = None
    writing: asyncio.Event | None = None


@dataclass
class Counters:
    by_outcome: dict[str, int] = field(
        default_factory=lambda: {"served": 0, "late": 0, "refused": 0, "dropped": 0}
    )
    cache_hits: int = 0
    lookups: int = 0
    retried: int = 0  # requests put back in a queue because their worker was lost
    cache_update_failures: int = 0  # served answers whose cache insert or commit failed
    loop_errors: int = 0  # scheduler or re-plan iterations that raised (logged, survived)
    batch_timeouts: int = 0  # batches given up on after a multiple of their prediction
    reintervals: int = 0  # running members moved to a longer feature-cache interval (a burst)
    pauses: int = 0  # background members written down at a boundary
    resumes: int = 0  # background members that went on from where they were written down
    write_trips: int = 0  # cache-thread trips that wrote answered runs (one group each)
    # per stage of the request path: [seconds, requests] summed (``stage``)
    stages: dict[str, list[float]] = field(default_factory=dict)
    planner_ms: list[float] = field(default_factory=list)

    def stage(self, name: str, seconds: float, requests: int = 1) -> None:
        """Time spent in one stage of the request path, for ``requests`` requests."""
        total = self.stages.setdefault(name, [0.0, 0])
        total[0] += seconds
        total[1] += requests


def ended_at_once(
    arrival: Arrival, slo_s: float, counters: Counters, backlog_s: Callable[[], float]
) -> Exception:
    """Why a request ends at intake: a deadline no run can meet (for good), a refusal (retry
    after the backlog, at least a second) or a drop."""
    if arrival.unmeetable_s is not None:
        counters.by_outcome["refused"] += 1
        return Unmeetable(slo_s, arrival.unmeetable_s)
    if arrival.ended is not None and arrival.ended.status == Status.REFUSED:
        counters.by_outcome["refused"] += 1
        return Refused(retry_after_s=max(1.0, backlog_s()))
    counters.by_outcome["dropped"] += 1
    return Dropped("the deadline cannot be met at any level")


def random_seed() -> int:
    """A default seed: random, so that a seed tells a tenant nothing of how many images the
    server made for others (a counter did); the answer carries it, so the image reproduces."""
    return secrets.randbelow(2**32)
