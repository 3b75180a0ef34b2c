"""The pinned family's scheduler: GPUs at the levels a plan gives them, one queue per level.

Both clocks route by the same plan, queue in the same dispatcher and draw the router's numbers
from the same seeded generator (one draw per arrival), so a run draws the same on both.
"""

from __future__ import annotations

import numpy as np

from promptserve.policy.contract import Arrival, LoadSnapshot
from promptserve.policy.dispatcher import Dispatcher
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.intake import intake
from promptserve.policy.types import Job, Outcome, Plan, Status


class PinnedScheduler:
    def __init__(
        self,
        dispatcher: Dispatcher,
        estimator: LoadEstimator,
        admission: bool,
        rng: np.random.Generator,
    ) -> None:
        self.dispatcher, self.estimator, self.admission, self.rng = (
            dispatcher, estimator, admission, rng,
        )  # fmt: skip
        self.plan: Plan | None = None  # set by the driver's planning, before any arrival

    def intake(
        self,
        now: float,
        job_id: int,
        deadline_s: float,
        k_opt: int,
        has_neighbour: bool,
        shape: int = 0,
        adapters: tuple[int, ...] = (),
        exact: bool = False,  # pinned GPUs run every step full: nothing to pin
    ) -> Arrival:
        assert self.plan is not None, "a request arrived before the first plan"
        u = float(self.rng.random())
        job, queued = intake(
            job_id, now, deadline_s, k_opt, has_neighbour, self.plan, self.dispatcher,
            self.estimator, self.admission, u, shape, adapters,
        )  # fmt: skip
        return Arrival(job, None if queued else Outcome(job, Status.REFUSED, now))

    def remove(self, job_id: int) -> Job | None:
        """Out of its queue; a job in a running batch stays (the batch stops between steps
        once all its jobs are cancelled)."""
        return self.dispatcher.remove(job_id)

    def set_up(self, gpu: int, up: bool, now: float) -> list[Job]:
        if up:
            self.dispatcher.set_up(gpu, True)
            return []
        return self.dispatcher.fail_gpu(now, gpu)  # its batch back in the queues

    def pending(self) -> int:
        running = sum(len(g.running.jobs) for g in self.dispatcher.gpus if g.running)
        return self.dispatcher.pending() + running

    def snapshot(self) -> LoadSnapshot:
        d = self.dispatcher
        levels = d.levels
        return LoadSnapshot(
            {k: d.queue_len(k) for k in levels},
            {k: sum(1 for g in d.gpus if g.level == k) for k in levels},
            (),
            len(d.gpus),
            len(d.up_gpus()),
        )

    def backlog_s(self, now: float) -> float:
        d = self.dispatcher
        return min((d.predicted_finish(k, now) - now for k in d.serving_levels()), default=1.0)
