"""Intake: what becomes of a request when it arrives, one function for both clocks.

The simulator and the live runtime both call ``intake``: it tells the load estimator, routes
the request by the plan, applies admission when the policy has it, and queues what it admits.
Only how K_opt is found (a virtual cache index or the real one) stays with the drivers.
"""

from __future__ import annotations

from promptserve.policy.admission import admit
from promptserve.policy.dispatcher import Dispatcher
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.router import route
from promptserve.policy.types import Job, Plan

DELIVERY_MARGIN_S = 0.1
"""Every plan finishes this long before the request's deadline. A live answer leaves some time
after the planned finish (a step loop's jitter, the thread hops, the HTTP reply: up to 0.05 s
measured on a 2-core machine at 130 qpm), which a simulated answer does not; policies that pack
work up to the deadline (EDF batches, step-level joins) would land those answers just late.
The job carries the planning deadline; lateness is judged on the request's own."""


def request_deadline(job: Job) -> float:
    """The deadline the request was given (the job's plus the margin)."""
    return job.deadline_s + DELIVERY_MARGIN_S


def edit_class(levels: tuple[int, ...], start: int) -> int:
    """The level a pinned plan counts an edit at: the highest its start step reaches. A batch
    at that level or below runs at least the edit's own steps (the engine runs it from its
    start), so a plan's times hold for it; what the plan expects of its quality is a
    generation's at that class, a pinned plan's one approximation of an edit."""
    return max(k for k in levels if k <= start)


def intake(
    job_id: int,
    now: float,
    deadline_s: float,
    k_opt: int,
    has_neighbour: bool,
    plan: Plan,
    dispatcher: Dispatcher,
    estimator: LoadEstimator,
    admission: bool,
    u: float,
    shape: int = 0,
    adapters: tuple[int, ...] = (),
    start: int | None = None,
) -> tuple[Job, bool]:
    """The job as routed (and as moved by admission), and whether it was queued (False: refused).

    ``now`` and ``deadline_s`` (the request's) are seconds on the driver's clock; a request
    with a cached neighbour may run at any level (its neighbour keeps latents at every cache
    level), one without only at K = 0; ``u`` is the router's uniform draw in [0, 1). An edit
    (``start``) is planned and routed as the class its start reaches (``edit_class``).
    """
    k_max = dispatcher.levels[-1] if has_neighbour else 0
    if start is not None:
        k_opt = k_max = edit_class(dispatcher.levels, start)
    estimator.observe(now, k_opt, dispatcher.gpus[0].profile.shape_weights[shape])
    level = route(plan, k_opt, u)
    job = Job(
        job_id, now, deadline_s - DELIVERY_MARGIN_S, k_opt, k_max, level, shape, adapters,
        start=start,
    )  # fmt: skip
    if admission:
        admitted = admit(dispatcher, job, now)
        if admitted is None:
            return job, False
        job = admitted
    dispatcher.enqueue(job)
    return job, True
