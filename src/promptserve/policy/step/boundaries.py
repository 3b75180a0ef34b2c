"""What a step-level scheduler has handed its driver: each GPU's next boundary, and the work
and drops not handed out yet (``policy.contract``: the latest work for a GPU replaces one not
yet ended)."""

from __future__ import annotations

import math

from mypy_extensions import mypyc_attr

from promptserve.policy.contract import Schedule, StepWork
from promptserve.policy.step.gpu import StepGpu
from promptserve.policy.types import Outcome
from promptserve.steptime import EPS


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class Boundaries:
    """Each GPU's next boundary as last handed to its driver, and what is not handed out yet.
    Apart from a scheduler so that the shards of one pool share it: a GPU moves between them
    with its timing."""

    def __init__(self, n_gpus: int) -> None:
        self.next_at = [math.inf] * n_gpus  # when its running steps end (inf: none handed out)
        self.last_at = [-math.inf] * n_gpus  # its last boundary
        self.owed: list[StepWork] = []  # handed out by the next ``schedule``
        self.ended: list[Outcome] = []  # given up on outside an update (a lost GPU's members)
        self.cut_epoch: dict[int, int] = {}  # per queue: its wait epoch at the last full cut

    def due(  # noqa: ANN001 - the boundary's members
        self,
        gpu: StepGpu,
        at: float,
        steps: int,
        joins=(),
        retimed=(),
        now: float = 0.0,
        pauses: tuple[int, ...] = (),
    ) -> None:
        """``gpu``'s next ``steps`` steps end at ``at`` (``now``: the boundary it stands at)."""
        self.next_at[gpu.index] = at
        self.owed.append(
            StepWork(gpu.index, tuple(joins), tuple(retimed), steps, gpu.seg_start, at, now, pauses)
        )

    def cut(self, gpu: StepGpu, now: float) -> None:
        """Stop ``gpu`` at its next step boundary (a request waits to join it there)."""
        at = gpu.next_boundary(now)
        if self.next_at[gpu.index] <= at + EPS:
            return  # it stops there or sooner anyway
        steps = 0
        if gpu.running and gpu.seg_iter_s > 0:
            steps = max(round((at - gpu.seg_start) / gpu.seg_iter_s), 0)
        self.due(gpu, at, steps)

    def reached(self, gpu: StepGpu, now: float) -> None:
        """``gpu`` stands at a boundary at ``now``: nothing of it is handed out any more."""
        self.next_at[gpu.index] = math.inf
        self.last_at[gpu.index] = now

    def idle(self, gpu: StepGpu, now: float) -> None:
        """A boundary now for an idle GPU while requests wait (once per GPU and instant)."""
        if self.next_at[gpu.index] > now and self.last_at[gpu.index] < now:
            self.due(gpu, now, 0)

    def hand_out(self) -> Schedule:
        work, self.owed = self.owed, []
        ended, self.ended = self.ended, []
        return Schedule(tuple(work), tuple(ended))
