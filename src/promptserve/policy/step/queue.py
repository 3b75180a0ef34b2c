"""The step-level waiting queue: earliest deadline first under ``shed``, else first come first
served; with the step work it holds, counted for admission."""

from __future__ import annotations

import heapq

from mypy_extensions import mypyc_attr

from promptserve.policy.step.config import StepSpec
from promptserve.policy.types import Job


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class WaitQueue:
    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        self.entries: list[tuple[float, int, Job]] = []  # (deadline or arrival, id, job)
        self.steps = 0  # what the waiting jobs need at their fastest levels
        self.full = 0  # waiting jobs that must run every step (no neighbour)
        self.epoch = 0  # times the queue went from empty to waiting (drivers' cuts)

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def head(self) -> Job:
        return self.entries[0][2]

    def key(self, job: Job) -> float:
        return job.deadline_s if self.spec.config.shed else job.arrival_s

    def push(self, job: Job, requeue: bool = False) -> None:
        """``requeue``: put back by the boundary that took it out (the queue was never seen
        empty in between)."""
        if not self.entries and not requeue:
            self.epoch += 1
        heapq.heappush(self.entries, (self.key(job), job.id, job))
        self._count(job, 1)

    def pop(self) -> Job:
        job = heapq.heappop(self.entries)[2]
        self._count(job, -1)
        return job

    def remove(self, job_id: int) -> Job | None:
        for i, (_, jid, job) in enumerate(self.entries):
            if jid == job_id:
                self.entries.pop(i)
                heapq.heapify(self.entries)
                self._count(job, -1)
                return job
        return None

    def _count(self, job: Job, sign: int) -> None:
        k = self.spec.fastest_k(job)
        self.steps += sign * (self.spec.profile.total_steps - k)
        self.full += sign * (k == 0)
