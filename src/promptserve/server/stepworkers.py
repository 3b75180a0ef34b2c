"""What one step-level call does: in this process a step runner per engine, on that engine's
own thread (``LocalWorkers.advance``); on Ray, a step runner inside each replica
(``RayWorkers.advance``). Either way one call is one boundary and the step after it: the
cancelled members leave, the joiners join, every member advances one step. A ``StepDone``
comes back."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from promptserve.engine.base import GenerationItem, GenerationResult

Joins = Sequence[tuple[Hashable, GenerationItem]]


@dataclass
class StepDone:
    finished: list[tuple[Hashable, GenerationResult]]  # decoded, in the order they finished
    steps_left: dict[Hashable, int]  # every member still running after the step
    started: dict[Hashable, int]  # each joiner's K as it started (0: its latent was missing)
    previews: dict[Hashable, bytes] = field(default_factory=dict)  # asked for at this step


def advance(runner, joins: Joins, cancels: set) -> StepDone:  # noqa: ANN001 - any step runner
    """One boundary on one runner, in its engine's thread."""
    for key in cancels:
        runner.cancel(key)
    runner.join(joins)
    finished = runner.step()
    started = {key: item.k for key, item in joins}
    return StepDone(finished, runner.steps_left(), started, dict(runner.previews))
