"""Admission: refuse at arrival (HTTP 429) only what no level can finish by its deadline."""

from __future__ import annotations

from dataclasses import replace

from promptserve.policy.dispatcher import Dispatcher
from promptserve.policy.types import Job


def admit(dispatcher: Dispatcher, job: Job, now: float) -> Job | None:
    """The job as it should be queued (possibly on a faster level), or None to refuse.

    Tries the routed level, then faster levels the job can run at (up to ``k_max``); a job
    runs at ``min(level, k_max)``, so that is the latency it is admitted on.
    """
    candidates = [job.level] + sorted(
        k for k in dispatcher.serving_levels() if job.level < k <= job.k_max
    )
    for k in candidates:
        if dispatcher.predicted_finish(k, now, job.k_max, job.shape) <= job.deadline_s:
            return job if k == job.level else replace(job, level=k)
    return None
