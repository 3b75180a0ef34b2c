"""What one step-level call does: in this process a step runner per engine, on that engine's
own thread (``LocalWorkers.advance``); on Ray, a step runner inside each replica
(``RayWorkers.advance``). Either way one call is one boundary and the step after it: the
cancelled members leave, the joiners join, every member advances one step. A ``StepDone``
comes back."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from promptserve.engine.base import GenerationItem, GenerationResult

Joins = Sequence[tuple[Hashable, GenerationItem]]


@dataclass
class StepDone:
    finished: list[tuple[Hashable, GenerationResult]]  # decoded, in the order they finished
    steps_left: dict[Hashable, int]  # every member still running after the step
    started: dict[Hashable, int]  # each joiner's K as it started (0: its latent was missing)
    previews: dict[Hashable, bytes] = field(default_factory=dict)  # asked for at these steps
    ran: int = 1  # steps run in the call


def advance(
    runner,  # noqa: ANN001 - any step runner
    joins: Joins,
    cancels: set,
    steps: int = 1,
    interrupt: threading.Event | None = None,
    retimes: Mapping[Hashable, int] | None = None,
) -> StepDone:
    """One boundary on one runner, in its engine's thread, and up to ``steps`` steps after it:
    more than one only where the caller knows no boundary could change anything before (none
    joins, leaves, is cancelled or hears its steps). It stops early after a step at which a
    member finished, or once ``interrupt`` is set (an arrival or a cancel: the next boundary is
    wanted now). ``retimes``: running members' new feature-cache intervals."""
    for key in cancels:
        runner.cancel(key)
    runner.join(joins)
    for key, interval in (retimes or {}).items():
        runner.reinterval(key, interval)
    previews: dict[Hashable, bytes] = {}
    ran = 0
    while True:
        finished = runner.step()
        ran += 1
        previews.update(runner.previews)
        if finished or ran >= steps or not len(runner):
            break
        if interrupt is not None and interrupt.is_set():
            break
    started = {key: item.k for key, item in joins}
    return StepDone(finished, runner.steps_left(), started, previews, ran)
