"""The simulator's sharded control plane: ``policy.shards.ShardedSteps`` on the step GPUs'
event loop (``stepsim.py``), with the global controller on the re-plan grid.

Everything else is the one-scheduler run's: the same arrivals, the same cache index (tenants
never share entries, so one index answers as per-shard indexes would), the same records, so
a sharded run and a global one on the same inputs differ only by the control plane.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from promptserve.policy import Policy
from promptserve.policy.shards import ShardedSteps
from promptserve.policy.stepwise import StepGpu, StepScheduler
from promptserve.sim.events import SimInputs, SimResult
from promptserve.sim.stepsim import StepRun

# the global controller's period: two of the shards' 5 s re-plans. Measured (bench_shards,
# conversation trace scaled up, 2 minutes): 30 s left the ring's uneven first split in place
# too long (4,096 GPUs in 64 shards 1.62 points under one global scheduler, 1,024 in 16: 1.73),
# 10 s 0.65 and 0.57, 5 s 0.58 and 0.43 (docs/ingress.md)
CONTROLLER_S = 10.0


class ShardedRun(StepRun):
    def __init__(
        self,
        policy: Policy,
        inputs: SimInputs,
        shards: int,
        controller_s: float = CONTROLLER_S,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        assert policy.step is not None, f"{policy.name} is not a step-level policy"
        super().__init__(policy, inputs, on_progress)
        replan = policy.replan_s or 5.0
        self.every = max(1, round(controller_s / replan))  # controller ticks per re-plan
        self.ticks = 0
        requests = inputs.requests
        self.sched = ShardedSteps(  # type: ignore[assignment]
            lambda: policy.step_scheduler(inputs.setting),
            len(inputs.setting.profiles),
            shards,
            lambda i: requests[i].tenant,
        )
        self.estimator = self.sched.estimator

    def _joinable(self, job_id: int) -> tuple[int, StepScheduler, list[StepGpu]]:
        sched: ShardedSteps = self.sched  # type: ignore[assignment]
        s = sched.shard_of_job[job_id]
        return s, sched.shards[s], sched.gpus_of(job_id)

    def _replan(self, now: float, demand) -> None:  # noqa: ANN001 - a Demand
        """Each shard's price from its own estimate (the first plan: the forecast
        ``demand``, split); every ``every``-th re-plan, the global controller's moves too."""
        sched: ShardedSteps = self.sched  # type: ignore[assignment]
        t0 = time.perf_counter()
        forecast = demand if self.ticks == 0 else None
        price = sched.reprice(now, self.start, self.inputs.setting.slo_s, forecast)
        if self.ticks % self.every == 0 and self.ticks > 0:
            sched.control(now, self.start)  # its handovers are logged in ``sched.handovers``
        self.ticks += 1
        self.planner_ms.append((time.perf_counter() - t0) * 1e3)
        self.prices.append((now, price))


def simulate_sharded(
    policy: Policy,
    inputs: SimInputs,
    shards: int,
    controller_s: float = CONTROLLER_S,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[SimResult, int]:
    """One sharded run: its result and the GPUs the controller moved."""
    run = ShardedRun(policy, inputs, shards, controller_s, on_progress)
    result = run.run()
    return result, run.sched.moved  # type: ignore[attr-defined]


__all__ = ["CONTROLLER_S", "ShardedRun", "simulate_sharded"]
