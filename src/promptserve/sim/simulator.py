"""A discrete-event simulator of one policy on one workload: the virtual clock's driver.

``events.py`` holds the loop, the cache index, the records and conservation; the scheduler is
the policy's own (``policy.contract``), whichever family it is.
"""

from __future__ import annotations

from collections.abc import Callable

from promptserve.policy import Policy
from promptserve.sim.events import EventRun, SimInputs, SimResult, initial_demand

__all__ = ["SimInputs", "SimResult", "initial_demand", "simulate"]


def simulate(
    policy: Policy, inputs: SimInputs, on_progress: Callable[[int], None] | None = None
) -> SimResult:
    return EventRun(policy, inputs, on_progress).run()
