"""Finish-time fit: whether a join keeps every member of a GPU within its deadline, by the
step-time model (``steptime.finishes``), and whether the device has room for it (adapter rows,
pixels in flight)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from mypy_extensions import mypyc_attr

from promptserve.policy.step.config import StepSpec
from promptserve.policy.step.gpu import StepGpu
from promptserve.policy.types import Job
from promptserve.steptime import EPS, StepProfile, finishes, kind


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class Fit:
    def __init__(self, spec: StepSpec) -> None:
        self.spec = spec
        # ``alone_s`` per (K, r, size) of one profile: asked at every arrival and drop check
        self._alone: dict[tuple[int, int, int], float] = {}
        self._alone_of: StepProfile | None = None

    def room(self, gpu: StepGpu, job: Job, ahead: Sequence[Job] = ()) -> bool:
        """Whether ``gpu``'s device has rows for the adapters of its members, ``ahead`` and
        ``job`` together, and room for their pixels (``max_weight``)."""
        if not self.pixels_fit(gpu, job, ahead):
            return False
        if not (self.spec.profile.adapter_slots and job.adapters):
            return True
        return gpu.resident.room_for([a for j in (*ahead, job) for a in j.adapters])

    def pixels_fit(self, gpu: StepGpu, job: Job, ahead: Sequence[Job]) -> bool:
        """Members' pixels (in native-size images) within the device's bound: the step's
        activations grow with them, a count of members does not see a batch of the largest
        size. A GPU with nobody on it takes anyone (a request alone always runs)."""
        bound, w = self.spec.profile.max_weight, self.spec.profile.shape_weights
        if not bound:
            return True
        others = {j.id: j for j in (*gpu.joining, *ahead) if j.id != job.id}
        # float starts: compiled (``promptserve.native``), a sum's start fixes its type
        held = sum((w[m.job.shape] for m in gpu.by_id.values()), 0.0) + sum(
            (w[j.shape] for j in others.values()), 0.0
        )
        return held == 0 or held + w[job.shape] <= bound + 1e-9

    def with_new(
        self,
        gpu: StepGpu,
        job: Job,
        k: int,
        at: float,
        ahead: Sequence[Job],
        done: int,
        r: int = 1,
    ) -> tuple[list[float], list[float], list[float] | None, int]:
        """The deadlines of ``gpu``'s members (and ``ahead``, the jobs joining at the same
        boundary before ``job``, at their fastest level), their finish times after ``job``
        joins at level K and interval ``r`` (``job``'s at ``pos``), and before (None without
        members)."""
        held = self.held(gpu, job, at, ahead, done)
        deadlines, after, pos = self.after(held, job, k, r)
        return deadlines, after, self.before(held), pos

    def held(
        self, gpu: StepGpu, job: Job, at: float, ahead: Sequence[Job], done: int
    ) -> tuple[float, list[int], list[float], list[int] | None, int]:
        """What a join to ``gpu`` at ``at`` meets: the time its steps start (after the adapter
        loads of ``job`` and ``ahead``), the steps left, deadlines and kinds of the members
        and of ``ahead`` (at their fastest), ascending by steps left, and how many join."""
        done = gpu.done if done < 0 else done
        mixed = self.spec.profile.mixed
        by_id = gpu.by_id
        if self.spec.profile.adapter_slots:  # the adapters it and those ahead load first
            named = [a for j in (*ahead, job) for a in j.adapters]
            at += gpu.resident.missing(named) * self.spec.profile.adapter_load_s
        if not ahead:  # the members alone, already in order: the common case, built directly
            own = gpu.members
            kinds = [kind(by_id[j].job.shape, by_id[j].r) for _, _, j in own] if mixed else None
            return at, [end - done for end, _, _ in own], [d for _, d, _ in own], kinds, 0
        members = [
            (end - done, d, kind(by_id[jid].job.shape, by_id[jid].r) if mixed else 0)
            for end, d, jid in gpu.members
        ]
        total = self.spec.profile.total_steps
        fast = [(j, *self.spec.fastest(j)) for j in ahead]
        members = sorted(
            members + [(total - fk, j.deadline_s, kind(j.shape, fr)) for j, fk, fr in fast]
        )
        rem = [left for left, _, _ in members]
        deadlines = [d for _, d, _ in members]
        shapes = [s for _, _, s in members] if mixed else None
        return at, rem, deadlines, shapes, len(ahead)

    def after(self, held: tuple, job: Job, k: int, r: int) -> tuple[list[float], list[float], int]:
        """The members' deadlines, every finish time once ``job`` joins at (K, r) (its own at
        the position returned)."""
        at, rem, deadlines, shapes, ahead = held
        r_new = self.spec.profile.total_steps - k
        pos = bisect.bisect_right(rem, r_new)
        with_new = rem[:pos] + [r_new] + rem[pos:]
        new_shapes = (
            shapes[:pos] + [kind(job.shape, r)] + shapes[pos:] if shapes is not None else None
        )
        return deadlines, finishes(self.spec.profile, at, with_new, 1 + ahead, new_shapes), pos

    def before(self, held: tuple) -> list[float] | None:
        """The members' finish times without the join (None without members)."""
        at, rem, _, shapes, ahead = held
        return finishes(self.spec.profile, at, rem, ahead, shapes) if rem else None

    def fits(
        self,
        gpu: StepGpu,
        job: Job,
        k: int,
        at: float,
        ahead: Sequence[Job] = (),
        done: int = -1,
        r: int = 1,
    ) -> bool:
        """Whether ``job`` joining ``gpu`` at ``at`` with level K keeps every member of it
        (itself included) within its deadline, or no later than it would be anyway. ``ahead``:
        the jobs that join at the same boundary before it, counted as members at their fastest
        level (their K is chosen when they join). ``done``: the GPU's step count at ``at``
        (default: now, at a boundary); ``r``: its feature-cache interval."""
        if not self.room(gpu, job, ahead):
            return False
        held = self.held(gpu, job, at, ahead, done)
        deadlines, after, pos = self.after(held, job, k, r)
        if after[pos] > job.deadline_s + EPS:
            return False
        before: list[float] | None = None  # only where a member would be late
        for i, d in enumerate(deadlines):
            f = after[i if i < pos else i + 1]
            if f > d + EPS:
                if before is None:
                    before = self.before(held)
                if f > before[i] + EPS:  # type: ignore[index]
                    return False
        return True

    def can_ever_finish(self, job: Job, now: float) -> bool:
        """Alone on an idle GPU from now, at the fastest level the rule allows it."""
        return now + self.alone_s(*self.spec.fastest(job), job.shape) <= job.deadline_s + EPS

    def alone_s(self, k: int, r: int = 1, shape: int = 0) -> float:
        """Seconds from arrival to answer of one request alone on an idle GPU at (K, r)."""
        profile = self.spec.profile
        if profile is not self._alone_of:  # a new spec (``StepScheduler.use``) may bring one
            self._alone, self._alone_of = {}, profile
        key = (k, r, shape)
        seconds = self._alone.get(key)
        if seconds is None:
            shapes = [kind(shape, r)] if profile.mixed else None
            seconds = finishes(profile, 0.0, [profile.total_steps - k], 1, shapes)[0]
            self._alone[key] = seconds
        return seconds
