"""Step-level serving: one running batch per GPU, each request at its own level.

A diffusion step is the same computation at every level, so one denoiser call advances
members at different steps. Each GPU keeps one running batch; a request joins it between two
steps, from its neighbour's cached latent at its own K, and leaves after its last step. No GPU
has a level: nothing to allocate, nothing to fragment.

Every decision is per request and pure code, in the part that owns it: where it joins
(``placement``), at which K and interval (``levels``, by the price of ``price`` and the
deadline check of ``fit``; at its fastest during a burst, ``bursts``), whether it is admitted
(``admission``), how it waits (``queue``: EDF under ``+shed``, else first come first served
up to a cap), and what happens at each boundary (``lifecycle``). This class is the contract
(``policy.contract``) over them; ``boundaries`` keeps what the driver was handed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from mypy_extensions import mypyc_attr

from promptserve.policy.contract import Arrival, Ask, LoadSnapshot, Replan, Report, Schedule
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.intake import DELIVERY_MARGIN_S
from promptserve.policy.step.admission import Admission
from promptserve.policy.step.background import Background
from promptserve.policy.step.boundaries import Boundaries
from promptserve.policy.step.bursts import Bursts
from promptserve.policy.step.cluster import Cluster
from promptserve.policy.step.config import StepConfig, StepSpec
from promptserve.policy.step.excess import ExcessWork
from promptserve.policy.step.fit import Fit
from promptserve.policy.step.gpu import StepGpu
from promptserve.policy.step.levels import Levels
from promptserve.policy.step.lifecycle import Lifecycle
from promptserve.policy.step.placement import Placement
from promptserve.policy.step.price import Pricing
from promptserve.policy.step.queue import WaitQueue
from promptserve.policy.step.sizemix import SizeMix
from promptserve.policy.types import Demand, Job, Outcome, Status
from promptserve.steptime import StepProfile


@dataclass(frozen=True)
class Repricing:
    """A step-level re-plan: a new price for ``demand`` (quick: it runs on the driver's loop)."""

    demand: Demand
    slow: bool = False


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class StepScheduler:
    """The step-level policy over ``n_gpus`` GPUs, behind the contract of ``policy.contract``.
    Its parts are public for reading (tests, benchmarks); a driver uses the contract only."""

    stepwise = True

    def __init__(
        self,
        profile: StepProfile,
        n_gpus: int,
        quality: np.ndarray,
        config: StepConfig,
        estimator: LoadEstimator | None = None,  # needed by ``intake`` only
        interval_q: Sequence[float] = (100.0,),  # q_r per feature-cache interval r (from 1)
        slo_s: float | None = None,  # what ``replan`` prices for (``reprice`` takes its own)
        levels: Callable[
            ..., Levels
        ] = Levels,  # how a join's level is chosen (in hindsight: a plan's)
    ) -> None:
        self.spec = spec = StepSpec.of(profile, config, quality, interval_q)
        self.profile, self.config, self.estimator, self.slo_s = profile, config, estimator, slo_s
        self.cluster = Cluster(spec, n_gpus)
        self.queue = WaitQueue(spec)
        self.sizes = SizeMix(profile)
        self.excess = ExcessWork()  # the burst signal, drained at the capacity
        self.bursts = Bursts(spec, self.cluster, self.queue, self.excess)
        self.pricing = Pricing(spec, self.cluster, self.sizes, self.excess)
        self.bursts.pricing = self.pricing
        self.fit = Fit(spec)
        self.levels = levels(spec, self.pricing, self.bursts, self.fit)
        self.admission = Admission(
            spec, self.cluster, self.queue, self.pricing, self.sizes, self.fit
        )
        self.placement = Placement(
            spec, self.cluster, self.fit, self.levels, self.queue, self.admission
        )
        self.background = Background(spec, self.cluster, self.pricing)
        self.placement.lane = self.background
        self.life = Lifecycle(
            spec, self.cluster, self.queue, self.fit, self.levels, self.bursts,
            self.admission, self.placement, self.background,
        )  # fmt: skip
        self.boundaries = Boundaries(n_gpus)  # what the driver was handed (shards share one)
        self.queue_key = 0  # its waiting queue among the shards that share ``boundaries``

    def use(self, config: StepConfig) -> None:
        """Serve the joins from now on by ``config`` (``policy.selector``): running members
        keep the (K, r) they joined at; every part reads the new spec from its next call."""
        if config == self.config:
            return
        spec = StepSpec.of(self.profile, config, self.spec.quality, self.spec.interval_q)
        parts = (self.cluster, self.queue, self.bursts, self.pricing, self.fit, self.levels)
        for part in (*parts, self.admission, self.placement, self.life, self.background):
            part.spec = spec
        self.spec, self.config = spec, config
        if self.pricing.last is not None:  # its tables index the new rule's options
            self.pricing.reprice(*self.pricing.last)

    @property
    def gpus(self) -> list[StepGpu]:
        return self.cluster.gpus

    @property
    def price(self) -> float:
        return self.pricing.price

    # -- the contract (``policy.contract.Scheduler``) -----------------------------------------

    def intake(self, now: float, ask: Ask) -> Arrival:
        """Place the job (it joins its GPU at that GPU's next step boundary; its K is chosen
        then) or end it; a job that waits under ``shed`` has every running GPU hold a boundary
        at its next step, where it may fit (``Lifecycle.next_steps``)."""
        assert self.estimator is not None, "intake needs the scheduler's load estimator"
        k_max = self.spec.levels[-1] if ask.has_neighbour and ask.start is None else 0
        level = ask.k_opt if ask.start is None else ask.start
        job = Job(
            ask.id, now, ask.deadline_s - DELIVERY_MARGIN_S, ask.k_opt, k_max, level,
            ask.shape, ask.adapters, ask.exact, ask.start, ask.batch,
        )  # fmt: skip
        if ask.batch:  # the lane: no price, no load estimate, no interactive admission
            return self.intake_background(now, job, ask.resume_at)
        least_s = self.fit.alone_s(*self.spec.fastest(job), ask.shape) + DELIVERY_MARGIN_S
        if ask.deadline_s - now < least_s:  # even idle: refused for good, not for now
            return Arrival(job, Outcome(job, Status.REFUSED, now), unmeetable_s=least_s)
        edit_steps = None if ask.start is None else self.profile.total_steps - ask.start
        self.estimator.observe(now, ask.k_opt, self.profile.shape_weights[ask.shape], edit_steps)
        k, r = self.spec.fastest(job)  # at its fastest interval's mean step
        steps = self.profile.total_steps - k
        self.excess.pour(now, steps * self.profile.interval_weight(r) if r > 1 else steps)
        self.sizes.note(ask.shape)
        gpu, outcome = self.placement.arrive(now, job)
        if gpu is not None:
            self.boundaries.cut(gpu, now)
        elif outcome is None and self.config.shed:
            # once the running GPUs hold a boundary at every step they go on doing so for as
            # long as the queue is not empty: only the first to wait since it last emptied
            # cuts them (a cost per waiting arrival that does not grow with the GPU count)
            epochs = self.boundaries.cut_epoch
            if epochs.get(self.queue_key) != self.queue.epoch:
                epochs[self.queue_key] = self.queue.epoch
                for running in self.gpus:
                    if running.running:
                        self.boundaries.cut(running, now)
        return Arrival(job, outcome, gpu.index if gpu is not None else None)

    def intake_background(self, now: float, job: Job, step: int | None = None) -> Arrival:
        """A background job into its lane (``background``; ``step``: it resumes there),
        refused only if even alone on an idle GPU it would miss its deadline; an idle GPU
        takes it at a boundary now."""
        k = self.background.level(job)
        least_s = self.fit.alone_s(k if step is None else step, 1, job.shape) + DELIVERY_MARGIN_S
        if job.deadline_s + DELIVERY_MARGIN_S - now < least_s:
            return Arrival(job, Outcome(job, Status.REFUSED, now), unmeetable_s=least_s)
        self.background.arrive(job, step)
        return Arrival(job)

    def schedule(self, now: float) -> Schedule:
        """The boundaries due: each GPU's after its last, those moved earlier by an arrival,
        and one now for each idle GPU while requests wait (it pulls from the queue)."""
        for gpu in self.idle_while_waiting():
            self.boundaries.idle(gpu, now)
        return self.boundaries.hand_out()

    def update(self, now: float, gpu: int, report: Report) -> list[Outcome]:
        """``gpu`` stands at a boundary: members that started elsewhere than planned move,
        those its worker lost are placed again, those it finished leave; then the boundary
        (``Lifecycle.boundary``), and the GPU's next run of steps is due."""
        g = self.gpus[gpu]
        self.background.ledger.add(g, report.steps, now)  # before anyone leaves
        for job_id, k in report.started:
            member = g.by_id.get(job_id)
            if member is not None and member.k != k:
                self.life.restart(g, job_id, k)
            lane = g.batch.get(job_id)
            if lane is not None and (lane.k if lane.from_step is None else lane.from_step) != k:
                self.background.restart(g, lane, k)
        ended: list[Outcome] = []
        for job_id in report.lost:
            job = self.remove(job_id)
            if job is not None:
                ended.extend(self.readmit(now, [job]))
        for job_id in report.finished:
            member = g.by_id.get(job_id) or g.batch.get(job_id)
            if member is not None:
                self.remove(job_id)
                ended.append(
                    Outcome(member.job, Status.SERVED, now, member.k, gpu, member.r, member.earlier)
                )
        self.boundaries.reached(g, now)
        left, joined, dropped = self.life.boundary(g, now, report.steps)
        m = self.life.next_steps(g)
        if m > 0:
            at = g.seg_start + m * g.seg_iter_s
            self.boundaries.due(g, at, m, joined, g.retimed, now, g.paused)
        return ended + left + dropped

    def replan(self, now: float, demand: Demand, force: bool = False) -> Replan:
        """A new price on step-slots."""
        return self.adopt(now, self.propose(demand, force), demand)

    def propose(self, demand: Demand, force: bool = False) -> Repricing:
        return Repricing(demand)

    def solve(self, proposal: Repricing) -> Demand:  # the price is set in ``adopt``
        return proposal.demand

    def adopt(self, now: float, proposal: Repricing, solved: object) -> Replan:
        assert self.slo_s is not None, "replan needs the scheduler's SLO"
        return Replan(price=self.reprice(proposal.demand, self.slo_s))

    def reprice(self, demand: Demand, slo_s: float) -> float:
        """The price for ``demand`` at ``slo_s`` (``Pricing.reprice``)."""
        return self.pricing.reprice(demand, slo_s)

    def readmit(self, now: float, jobs: Sequence[Job]) -> list[Outcome]:
        """Place again jobs a GPU lost (their progress went with it); those that cannot
        finish now are dropped. Their GPUs stop at their next boundary to take them."""
        out = []
        for job in jobs:
            if job.batch:  # back in the lane, from its start
                self.background.arrive(job)
                continue
            gpu, outcome = self.placement.arrive(now, job)
            if outcome is not None:
                out.append(outcome)
            elif gpu is not None:
                self.boundaries.cut(gpu, now)
        return out

    def remove(self, job_id: int) -> Job | None:
        """A cancelled request: out of the waiting queue, the joining list or its batch."""
        return (
            self.queue.remove(job_id) or self.life.leave(job_id)
            or self.background.remove(job_id)
        )  # fmt: skip

    def set_up(self, gpu_index: int, up: bool, now: float = 0.0) -> list[Job]:
        """A GPU lost or back. Down, it takes no one, leaves the step capacity the price is set
        for (``steps_capacity``), and places again the jobs it held, members and joiners
        (their progress went with it): it returns them; those that can no longer finish come
        out of the next ``schedule`` as dropped."""
        gpu = self.gpus[gpu_index]
        if gpu.up == up:
            return []
        if up:
            self.cluster.put_back(gpu)
            return []
        held = self.life.lose(gpu)
        self.boundaries.reached(gpu, now)  # nothing of it runs any more
        self.boundaries.ended.extend(self.readmit(now, held))
        return held

    def drain(self, gpu_index: int) -> None:
        """Take a GPU out of placement while its members run to their end: it takes no one
        new and leaves the step capacity, but unlike a lost GPU hands nothing back (a GPU moving
        to another shard, ``policy.shards``; it is empty once its members have left)."""
        self.cluster.take_out(self.gpus[gpu_index])

    def pending(self) -> int:
        return len(self.queue) + sum(g.count for g in self.gpus) + self.background.pending()

    def snapshot(self) -> LoadSnapshot:
        mix, edits = dict.fromkeys(self.spec.levels, 0), 0
        for gpu in self.gpus:
            for member in gpu.by_id.values():
                if member.job.start is None:
                    mix[member.k] += 1
                else:  # an edit runs from its own start, at no level
                    edits += 1
        first = self.spec.levels[0]
        waiting = {k: (len(self.queue) if k == first else 0) for k in self.spec.levels}
        inflight = tuple(len(g.by_id) for g in self.gpus)
        up = tuple(g.up for g in self.gpus)
        return LoadSnapshot(
            waiting, mix, inflight, len(self.gpus), sum(up), up, edits=edits,
            batch_running=self.background.running(), batch_waiting=len(self.background),
        )  # fmt: skip

    def backlog_s(self, now: float) -> float:
        """Until the first member of an up GPU leaves (its slot frees)."""
        return min(
            (g.steps_to_next_leave() * self.cluster.iteration_s(g) for g in self.gpus if g.up),
            default=1.0,
        )

    def idle_while_waiting(self) -> list[StepGpu]:
        """GPUs with nothing to run while requests wait, interactive or background: each
        stands at a boundary now (it pulls from the queue, else from the lane)."""
        if not (self.queue or self.background):
            return []
        return [g for g in self.cluster.idle() if not g.batch]
