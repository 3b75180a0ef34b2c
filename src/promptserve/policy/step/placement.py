"""Where a request joins: the least-loaded GPU, or, serving several sizes or bounded adapter
residency, the GPU where it adds least to the finish times (an idle GPU while there is one, a
GPU of its own size or holding its adapters once all are busy); while background work waits
or runs, a GPU already busy with interactive members where it fits with time to spare."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mypy_extensions import mypyc_attr

from promptserve.policy.step.admission import Admission
from promptserve.policy.step.cluster import Cluster
from promptserve.policy.step.config import StepSpec
from promptserve.policy.step.fit import Fit
from promptserve.policy.step.gpu import StepGpu
from promptserve.policy.step.levels import Levels
from promptserve.policy.step.price import EXCESS_SHARE
from promptserve.policy.step.queue import WaitQueue
from promptserve.policy.types import Job, Outcome, Status

if TYPE_CHECKING:
    from promptserve.policy.step.background import Background

# of its SLO, what a request packed onto a busy GPU keeps to spare: a burst that doubles that
# GPU's members (about doubling its step) still meets every deadline there
PACK_SPARE = 0.5
PACK_TRIES = 8  # the fullest GPUs a packed join is tried on: a placement's cost stays bounded


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class Placement:
    def __init__(
        self,
        spec: StepSpec,
        cluster: Cluster,
        fit: Fit,
        levels: Levels,
        queue: WaitQueue,
        admission: Admission,
    ) -> None:
        self.spec, self.cluster, self.fit, self.levels = spec, cluster, fit, levels
        self.queue, self.admission = queue, admission
        self.lane: Background | None = None  # while it has work, joins pack (``packed``)

    def arrive(self, now: float, job: Job) -> tuple[StepGpu | None, Outcome | None]:
        """Place an arriving job: the GPU it will join at that GPU's next boundary, or None
        when it waits; an outcome when it is refused or dropped."""
        gpu = self.place(now, job)
        config = self.spec.config
        if (
            config.value_shed
            and not self.levels.pricing.worth(job)
            and self.levels.bursts.saturated(now)
        ):
            return None, Outcome(job, Status.REFUSED, now)
        if config.admission and not self.admission.admissible(gpu, job, now):
            return None, Outcome(job, Status.REFUSED, now)
        if config.shed and not self.fit.can_ever_finish(job, now):
            return None, Outcome(job, Status.DROPPED, now)
        # while others wait it queues behind them (earliest deadline first), so that a fresh
        # arrival does not take the slot a waiting job was admitted on
        if gpu is not None and gpu.count < self.spec.cap and not (config.shed and self.queue):
            at = gpu.next_boundary(now)
            done = gpu.done_at(at)
            if self.levels.choose_k(gpu, job, at, gpu.joining, done) is not None:
                before = gpu.count
                gpu.joining.append(job)
                self.cluster.recount(gpu, before)
                return gpu, None
        if config.admission and not self.admission.after_queue(gpu, job, now):
            return None, Outcome(job, Status.REFUSED, now)
        self.queue.push(job)
        return None, None

    def place(self, now: float, job: Job) -> StepGpu | None:
        """The GPU an arriving job is offered: the least-loaded one, or, serving several sizes
        or bounded adapter residency (``shape_aware``), the least-loaded one already running
        its size, or holding its adapters, where the job adds less to the finish times there
        (``cost``: a load delays every member's next step)."""
        least = self.cluster.least_loaded()
        if least is not None and self.lane is not None and self.lane.busy():
            packed = self.packed(now, job)
            if packed is not None:
                return packed
        named = bool(self.spec.profile.adapter_slots and job.adapters)
        if least is None or not (
            (self.spec.profile.sized or named) and self.spec.config.shape_aware
        ):
            return least
        candidates = [least]
        if self.spec.profile.sized:  # the least-loaded GPU running its size
            same = [
                self.cluster.gpus[i] for i in self.cluster.holders.get(job.shape, ())
                if self.cluster.gpus[i].count < self.spec.cap
            ]  # fmt: skip
            if same:
                candidates.append(min(same, key=lambda g: (g.count, g.index)))
        if named:  # the least-loaded GPU holding its adapters (a scan: adapter traffic only)
            holding = [
                g for g in self.cluster.gpus
                if g.up and g.count < self.spec.cap and not g.resident.missing(job.adapters)
            ]  # fmt: skip
            if holding:
                candidates.append(min(holding, key=lambda g: (g.count, g.index)))
        if len({g.index for g in candidates}) == 1:
            return least
        costs = [(self.cost(g, job, now), i) for i, g in enumerate(candidates)]
        return candidates[min(costs)[1]]

    def packed(self, now: float, job: Job) -> StepGpu | None:
        """With background work to run, the fullest GPU running interactive members that takes
        ``job`` at the level it prefers with every member still ``PACK_SPARE`` of the SLO
        within its deadline: packed onto fewer GPUs, interactive members leave the others whole
        to the lane, whose rate at its width is 1.7 times a lone member's (SDXL reference). One packed join
        per GPU and boundary (joins at one boundary are fitted one by one, each seeing those
        before it at their own level, not the fastest). None: no GPU takes it so."""
        fit, tried = self.fit, 0
        spare = PACK_SPARE * (job.deadline_s - job.arrival_s)
        for count in range(min(self.spec.cap, len(self.cluster.by_count)) - 1, 0, -1):
            for i in sorted(self.cluster.by_count[count]):
                gpu = self.cluster.gpus[i]
                if not gpu.by_id or gpu.joining or not fit.room(gpu, job):
                    continue
                if tried == PACK_TRIES:
                    return None
                tried += 1
                at = gpu.next_boundary(now)
                k, r = self.levels.preferred(job, at)
                dls, after, _, pos = fit.with_new(gpu, job, k, at, (), gpu.done_at(at), r)
                dls = [*dls[:pos], job.deadline_s, *dls[pos:]]
                if all(f + spare <= d for f, d in zip(after, dls, strict=True)):
                    return gpu
        return None

    def cost(self, gpu: StepGpu, job: Job, now: float) -> float:
        """Seconds ``job`` adds to the sum of the finish times on ``gpu``: its own time to
        finish there and what it delays every member by (one more member in its size's call,
        or a call of its own for a size the batch does not hold)."""
        at = gpu.next_boundary(now)
        if not self.fit.room(gpu, job, gpu.joining):
            return float("inf")
        k, r = self.levels.preferred(job, at)
        _, after, before, pos = self.fit.with_new(gpu, job, k, at, gpu.joining, gpu.done_at(at), r)
        delay = sum(after) - after[pos] - (sum(before) if before else 0.0)
        return after[pos] - now + delay

    def elsewhere(self, gpu: StepGpu, job: Job, now: float) -> bool:
        """Whether a waiting job of a size ``gpu`` does not run is better left to a GPU that
        runs it (shape-aware, several sizes): it joins there at that GPU's next boundary, a
        step away while jobs wait, instead of adding a call to every step here. Only while it
        would finish here with the waiting share of its SLO to spare (``EXCESS_SHARE``, what
        the policy leaves for waiting to join), so a job is not held back into lateness."""
        if not (self.spec.profile.sized and self.spec.config.shape_aware and gpu.by_id):
            return False
        if job.shape in gpu.held_shapes() or not any(
            i != gpu.index and self.cluster.gpus[i].up
            for i in self.cluster.holders.get(job.shape, ())
        ):
            return False
        k, r = self.spec.fastest(job)
        _, after, _, pos = self.fit.with_new(gpu, job, k, now, (), -1, r)
        return job.deadline_s - after[pos] > EXCESS_SHARE * (job.deadline_s - job.arrival_s)
