"""The simulator's sharded control plane: ``policy.shards.ShardedSteps`` driven by the one
event loop (``events.py``), its global controller on the re-plan grid.

Everything else is the one-scheduler run's: the same arrivals, the same cache index (tenants
never share entries, so one index answers as per-shard indexes would), the same records, so
a sharded run and a global one on the same inputs differ only by the control plane.
"""

from __future__ import annotations

from collections.abc import Callable

from promptserve.policy import Policy
from promptserve.policy.shards import ShardedSteps
from promptserve.sim.events import EventRun, SimInputs, SimResult

# the global controller's period: two of the shards' 5 s re-plans. Measured (bench_shards,
# conversation trace scaled up, 2 minutes): 30 s left the ring's uneven first split in place
# too long (4,096 GPUs in 64 shards 1.62 points under one global scheduler, 1,024 in 16: 1.73),
# 10 s 0.65 and 0.57, 5 s 0.58 and 0.43 (docs/ingress.md)
CONTROLLER_S = 10.0


def sharded_scheduler(
    policy: Policy, inputs: SimInputs, shards: int, controller_s: float = CONTROLLER_S
) -> ShardedSteps:
    """``shards`` of ``policy``'s step scheduler over the setting's GPUs, the controller every
    ``controller_s`` seconds (a whole number of re-plans)."""
    if policy.step is None:
        raise ValueError(f"{policy.name} is not a step-level policy")
    requests = inputs.requests
    return ShardedSteps(
        lambda: policy.step_scheduler(inputs.setting),
        len(inputs.setting.profiles),
        shards,
        lambda i: requests[i].tenant,
        every=max(1, round(controller_s / (policy.replan_s or 5.0))),
    )


def simulate_sharded(
    policy: Policy,
    inputs: SimInputs,
    shards: int,
    controller_s: float = CONTROLLER_S,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[SimResult, int]:
    """One sharded run: its result and the GPUs the controller moved."""
    sched = sharded_scheduler(policy, inputs, shards, controller_s)
    result = EventRun(policy, inputs, on_progress, sched).run()
    return result, sched.moved


__all__ = ["CONTROLLER_S", "sharded_scheduler", "simulate_sharded"]
