"""One GPU's running batch under step-level serving: its members, its step count and the
timing of its current run of steps."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from mypy_extensions import mypyc_attr

from promptserve.policy.residency import ResidentSet
from promptserve.policy.types import Job
from promptserve.steptime import EPS, KIND


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class GpuBucket:
    """GPU indices with one member count; ``first`` is the lowest, in O(log n). Ties between
    equally loaded GPUs go by index, not by the order of past joins and leaves, so both clocks
    (one boundary per step live, one per event simulated) place a request on the same GPU."""

    def __init__(self) -> None:
        self.members: set[int] = set()
        self.heap: list[int] = []
        self.queued: set[int] = set()  # in ``heap``, maybe no longer a member

    def __bool__(self) -> bool:
        return bool(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self):  # noqa: ANN204
        return iter(self.members)

    def add(self, i: int) -> None:
        self.members.add(i)
        if i not in self.queued:
            self.queued.add(i)
            heapq.heappush(self.heap, i)

    def discard(self, i: int) -> None:
        self.members.discard(i)

    def first(self) -> int:
        while self.heap[0] not in self.members:
            self.queued.discard(heapq.heappop(self.heap))
        return self.heap[0]


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
@dataclass(slots=True)
class Member:
    job: Job
    k: int
    end_step: int  # the GPU's step count when it leaves
    r: int = 1  # its feature-cache interval: a full step every r (1: every step)
    since: int = 0  # the GPU's step count when it took ``r`` (it joined, or was re-intervalled)
    earlier: tuple[tuple[int, int], ...] = ()  # (interval, steps) it ran at before ``r``
    # a resumed background member: the step it was paused at, where it joins again (None: it
    # starts at its K, or an edit at its own start)
    from_step: int | None = None


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
@dataclass
class StepGpu:
    """One GPU's running batch; its step count and the timing of the current segment."""

    index: int
    up: bool = True
    done: int = 0  # steps done since it started
    # (end step, deadline, id), kept sorted: the next to leave first
    members: list[tuple[int, float, int]] = field(default_factory=list)
    by_id: dict[int, Member] = field(default_factory=dict)
    joining: list[Job] = field(default_factory=list)  # placed, joining at the next boundary
    seg_start: float = 0.0  # when the current run of equal iterations began
    seg_iter_s: float = 0.0  # its iteration time (0: idle)
    tallied: int = 0  # its step count when its members were last counted (``steps_left``)
    left_since: bool = False  # a member left since (the live runtime removes who finished)
    shapes: dict[int, int] = field(default_factory=dict)  # members per kind (size, interval)
    resident: ResidentSet = field(default_factory=ResidentSet)  # its device's LoRA adapters
    retimed: list[Member] = field(default_factory=list)  # re-intervalled at its last boundary
    loading: int = 0  # adapters the joins of this boundary load before its next step
    encoding: int = 0  # edits joining at this boundary: each a VAE encode before the step
    # background members (``step.background``): never beside an interactive one, and apart
    # from ``by_id`` so that placement, fits and admission never see them
    batch: dict[int, Member] = field(default_factory=dict)
    paused: tuple[int, ...] = ()  # background members it wrote down at its last boundary

    @property
    def count(self) -> int:
        return len(self.by_id) + len(self.joining)

    @property
    def running(self) -> bool:
        return bool(self.by_id or self.batch)

    def next_boundary(self, now: float) -> float:
        """When it can next take a member: now if idle, else the end of the running step."""
        if not self.running or self.seg_iter_s <= 0 or now <= self.seg_start:
            return max(now, self.seg_start)
        done = math.ceil((now - self.seg_start) / self.seg_iter_s - EPS)
        return self.seg_start + done * self.seg_iter_s

    def done_at(self, at: float) -> int:
        """Its step count at boundary ``at`` of the running segment (the boundaries in between
        are not held, so ``done`` counts only to the segment's start)."""
        if not self.running or self.seg_iter_s <= 0 or at <= self.seg_start:
            return self.done
        return self.done + round((at - self.seg_start) / self.seg_iter_s)

    def held_shapes(self) -> set[int]:
        """The sizes among its members and joiners."""
        return {s // KIND for s, n in self.shapes.items() if n} | {j.shape for j in self.joining}

    def count_shape(self, kind: int, sign: int) -> None:
        self.shapes[kind] = self.shapes.get(kind, 0) + sign

    def steps_to_next_leave(self) -> int:
        return self.members[0][0] - self.done if self.members else 0
