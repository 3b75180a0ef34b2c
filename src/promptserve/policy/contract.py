"""The contract both policy families offer their drivers, on either clock.

A driver (the simulator's event loop, the live runtime) finds a request's K_opt, then hands it
to ``intake``; it takes a cancelled request back with ``remove``, a lost or returning GPU with
``set_up``, and reads ``snapshot`` for metrics, ``backlog_s`` for a refusal's Retry-After and
``pending`` for conservation. What differs is how work runs, and stays with each family:
pinned GPUs take whole batches (``Dispatcher.step`` / ``on_batch_done``), step-level GPUs run
boundaries between steps (``StepScheduler.boundary``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.types import Job, Outcome


@dataclass(frozen=True)
class Arrival:
    """What became of an arriving request."""

    job: Job  # as routed or placed (its deadline is the plan's: the request's less the margin)
    ended: Outcome | None = None  # refused or dropped at once; None: it is in
    gpu: int | None = None  # step-level: the GPU it joins at that GPU's next boundary


@dataclass(frozen=True)
class LoadSnapshot:
    """The load a driver reports, whatever the family."""

    queued: dict[int, int]  # per level: pinned queues; step-level: every waiting one at level 0
    per_level: dict[int, int]  # pinned: GPUs at each level; step-level: members at each K
    inflight: tuple[int, ...]  # step-level: members per GPU (empty for pinned)
    gpus: int
    gpus_up: int


@runtime_checkable
class Scheduler(Protocol):
    estimator: LoadEstimator  # told of every arrival; the re-plan reads its estimate

    def intake(
        self,
        now: float,
        job_id: int,
        deadline_s: float,
        k_opt: int,
        has_neighbour: bool,
        shape: int = 0,
        adapters: tuple[int, ...] = (),
        exact: bool = False,
    ) -> Arrival:
        """``deadline_s``: the request's own, absolute; a request with a cached neighbour may
        run at any level, one without only at K = 0; ``shape``: its size, an index into the
        profile's ``shape_weights``; ``adapters``: the LoRA adapters it names, as ids;
        ``exact``: it asked for a full generation (no cached latent, every step full)."""
        ...

    def remove(self, job_id: int) -> Job | None:
        """A cancelled request out of wherever it waits or runs (None: not here)."""
        ...

    def set_up(self, gpu: int, up: bool, now: float) -> list[Job]:
        """A GPU lost (the jobs it held, now queued again or handed back) or back."""
        ...

    def pending(self) -> int:
        """Requests queued, waiting or running."""
        ...

    def snapshot(self) -> LoadSnapshot: ...

    def backlog_s(self, now: float) -> float:
        """Seconds until the soonest capacity frees."""
        ...
