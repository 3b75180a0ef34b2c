"""A discrete-event simulator of one policy on one workload: the virtual clock's driver.

``events.py`` holds the loop and what both policy families share (the cache index, the
records, conservation); ``pinned.py`` and ``stepsim.py`` are the two families' GPUs.
"""

from __future__ import annotations

from collections.abc import Callable

from promptserve.policy import Policy
from promptserve.sim.events import SimInputs, SimResult, initial_demand
from promptserve.sim.pinned import PinnedRun
from promptserve.sim.stepsim import StepRun

__all__ = ["SimInputs", "SimResult", "initial_demand", "simulate"]


def simulate(
    policy: Policy, inputs: SimInputs, on_progress: Callable[[int], None] | None = None
) -> SimResult:
    run = StepRun if policy.step else PinnedRun  # step-level serving: no GPU has a level
    return run(policy, inputs, on_progress).run()
