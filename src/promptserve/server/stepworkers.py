"""Where step-level serving's steps run: in this process, a step runner per engine on that
engine's own thread (``LocalSteps``); on Ray, a step runner inside each replica
(``RayWorkers.advance``). Either way one call is one boundary and the step after it: the
cancelled members leave, the joiners join, every member advances one step. A ``StepDone``
comes back."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from promptserve.engine.base import GenerationItem, GenerationResult
from promptserve.engine.threads import ComputeThread
from promptserve.profile import Profile
from promptserve.server.workers import StoreRefs

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


def step_runner_for(engine, profile: Profile):  # noqa: ANN001, ANN201 - an engine; a runner
    """A step runner on the engine's components, or the modelled one (no compute)."""
    from promptserve.engine.modeled import ModeledStepRunner
    from promptserve.engine.steprunner import StepRunner
    from promptserve.policy.stepwise import step_profile

    comps = getattr(engine, "c", None)
    if comps is None:
        return ModeledStepRunner(step_profile(profile), getattr(engine, "_speedup", 1.0))
    return StepRunner(
        comps,
        engine.total_steps,
        engine.levels,
        getattr(engine, "guidance", 7.5),
        getattr(engine, "placeholder", False),
    )


class LocalSteps:
    """In-process GPUs: runner ``g`` computes on thread ``g`` (the one that built its engine)."""

    def __init__(self, runners: Sequence, threads: Sequence[ComputeThread]) -> None:
        self.runners, self.threads = list(runners), list(threads)

    async def advance(
        self, g: int, joins: Joins, refs: Sequence[StoreRefs] | None, cancels: set
    ) -> StepDone:
        return await self.threads[g].run(advance, self.runners[g], joins, cancels)
