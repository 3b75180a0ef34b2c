"""What one step-level call does: in this process a step runner per engine, on that engine's
own thread (``LocalWorkers.advance``); on Ray, a step runner inside each replica
(``RayWorkers.advance``). Either way one call is one boundary and the step after it: the
cancelled members leave, the joiners join, every member advances one step. A ``StepDone``
comes back."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from promptserve.engine.base import GenerationItem, GenerationResult, Paused

Joins = Sequence[tuple[Hashable, GenerationItem]]


@dataclass
class StepDone:
    finished: list[tuple[Hashable, GenerationResult]]  # decoded, in the order they finished
    steps_left: dict[Hashable, int]  # every member still running after the step
    started: dict[Hashable, int]  # each joiner's K as it started (0: its latent was missing)
    previews: dict[Hashable, bytes] = field(default_factory=dict)  # asked for at these steps
    ran: int = 1  # steps run in the call
    paused: dict[Hashable, Paused] = field(default_factory=dict)  # written down, then let go
    snapshots: dict[Hashable, Paused] = field(default_factory=dict)  # written down, running on


@dataclass
class StepCall:
    """One step-level call: who leaves, who joins, who moves interval, and how far to go."""

    joins: Joins  # (key, item): joining before the first step
    cancels: set = field(default_factory=set)  # keys dropped before anything runs
    steps: int = 1  # the most steps (more than one only where no boundary could matter; 0:
    # the joins only, their encodes and adapter loads, and a boundary before the first step)
    interrupt: threading.Event | None = None  # set: it stops after the step it is on
    retimes: Mapping[Hashable, int] = field(default_factory=dict)  # key -> new interval
    refs: Sequence | None = None  # per joiner, for workers on the shared store (``StoreRefs``)
    pauses: set = field(default_factory=set)  # keys written down and let go before anything
    # keys written down where they stand each time their step is a multiple of ``every``
    # (durable background jobs: ``jobroutes``)
    checkpoints: set = field(default_factory=set)
    every: int = 0


def advance(runner, call: StepCall) -> StepDone:  # noqa: ANN001 - any step runner
    """One boundary on one runner, in its engine's thread, and up to ``call.steps`` steps
    after it. It stops early after a step at which a member finished, or once the interrupt
    is set (an arrival or a cancel: the next boundary is wanted now)."""
    paused = {key: runner.pause(key) for key in call.pauses}
    paused = {key: state for key, state in paused.items() if state is not None}
    for key in call.cancels:
        runner.cancel(key)
    runner.join(call.joins)
    for key, interval in call.retimes.items():
        runner.reinterval(key, interval)
    # each joiner's K as it started, or a resumed one's step (``policy.contract.Report``)
    started = {key: item.k if item.resume is None else item.resume.step for key, item in call.joins}
    if call.steps == 0:
        return StepDone([], runner.steps_left(), started, {}, 0, paused)
    previews: dict[Hashable, bytes] = {}
    snapshots: dict[Hashable, Paused] = {}
    ran = 0
    while True:
        finished = runner.step()
        ran += 1
        previews.update(runner.previews)
        if call.every and call.checkpoints:
            left = runner.steps_left()
            for key in call.checkpoints:
                if key in left and (runner.total_steps - left[key]) % call.every == 0:
                    snapshots[key] = runner.snapshot(key)
        if finished or ran >= call.steps or not len(runner):
            break
        if call.interrupt is not None and call.interrupt.is_set():
            break
    return StepDone(finished, runner.steps_left(), started, previews, ran, paused, snapshots)
