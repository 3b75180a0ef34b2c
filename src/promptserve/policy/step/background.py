"""Background work (``priority: batch``): jobs that run on the capacity interactive requests
leave, paused at a step boundary when those need it and resumed later from the step they
reached, on any GPU.

Interactive work decides as if the lane were not there: its fits, admission and the price
count no background member (they are kept apart from ``StepGpu.by_id``), and the estimator
never hears of one. The lane changes one thing, where an interactive request joins: while it
has work, a request packs onto a GPU already running interactive members if each keeps half
the SLO to spare (``Placement.packed``), instead of the least-loaded GPU, so fewer GPUs hold
interactive members. The lane takes what is left at each boundary: a GPU with no interactive
member runs up to ``width`` background members. Where an interactive request joins, the
background members are written down (``StepWork.pauses``) and go back to the lane, so an
interactive request waits at most the step it finds running.

Beside interactive members the lane runs only by choice (``beside_share`` > 0, off by
default): then also while no interactive request waits, the price is 0, and each interactive
member still finishes within that share of its slack (its deadline less its finish without the
lane). Measured (``bench_batch.py``, ``docs/batch.md``), half the slack gives the lane 2.2x the
images at 60 queries/minute and costs the interactive requests 0.59 points: a member kept
longer meets more joiners, whose fits then pick faster levels. Off, the cost is within 0.12.

A background job runs at its own K_opt (the level its neighbour's similarity keeps at full
quality; an edit from its own start), every step full: it has hours, so nothing is traded for
speed, and a member on a feature-cache interval would need its deep features written down to
resume exactly. The lane is earliest deadline first; a paused member goes back with its
deadline, so the oldest work resumes first.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from promptserve.policy.step.cluster import Cluster
from promptserve.policy.step.config import StepSpec
from promptserve.policy.step.gpu import Member, StepGpu
from promptserve.policy.step.price import Pricing
from promptserve.policy.types import Job, Outcome, Status
from promptserve.steptime import EPS, StepProfile, finishes, kind

NEAR_BEST = 0.95  # a GPU runs the fewest background members that give this share of its best rate
BESIDE_SHARE = 0.0  # of an interactive member's slack the lane may take beside it (0: none)


def width(profile: StepProfile) -> int:
    """Background members a GPU runs at once: the fewest whose step rate is within
    ``NEAR_BEST`` of the best, so the lane gets nearly all of a GPU's throughput while an
    interactive request that preempts it waits one short step, not the widest batch's."""
    rates = [profile.steps_per_s(n) for n in range(1, profile.max_inflight + 1)]
    best = max(rates)
    return next(n for n, rate in enumerate(rates, start=1) if rate >= NEAR_BEST * best)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
@dataclass
class Ledger:
    """What ran, for ``bench_batch`` and ``/metrics``: GPU-seconds and member-steps by kind
    (as the profile times each run of steps), counted up to ``until_s`` (a run of steps that
    crosses it, by the share before it)."""

    interactive_s: float = 0.0  # GPU-seconds of interactive members (a shared step by count)
    interactive_steps: float = 0.0  # member-steps of interactive work
    background_s: float = 0.0  # GPU-seconds of background members
    background_steps: float = 0.0  # member-steps of background work
    pauses: int = 0
    resumes: int = 0
    until_s: float = math.inf

    def add(self, gpu: StepGpu, steps: int, now: float) -> None:
        """``gpu`` ran ``steps`` steps of its segment, ending ``now``: whose they were."""
        busy = steps * gpu.seg_iter_s
        if busy <= 0:
            return
        share = min(max((self.until_s - (now - busy)) / busy, 0.0), 1.0)
        n, lane = len(gpu.by_id), len(gpu.batch)
        if not n + lane:
            return
        self.interactive_s += share * busy * n / (n + lane)  # a shared step, by its members
        self.interactive_steps += share * steps * n
        self.background_s += share * busy * lane / (n + lane)
        self.background_steps += share * steps * lane


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class Background:
    def __init__(self, spec: StepSpec, cluster: Cluster, pricing: Pricing) -> None:
        self.spec, self.cluster, self.pricing = spec, cluster, pricing
        self.beside_share = BESIDE_SHARE  # 0: a GPU runs the lane only with no interactive one
        self.width = width(spec.profile)
        # (deadline, id, job, its K, the step it resumes at: None, from its start)
        self.waiting: list[tuple[float, int, Job, int, int | None]] = []
        self.ledger = Ledger()
        self.held = 0  # members on the GPUs

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def busy(self) -> bool:
        """Whether the lane has work, waiting or on a GPU (interactive joins pack then)."""
        return self.held > 0 or bool(self.waiting)

    def __len__(self) -> int:
        return len(self.waiting)

    def running(self) -> int:
        return self.held

    def pending(self) -> int:
        """Background jobs waiting, paused or running."""
        return len(self.waiting) + self.running()

    def level(self, job: Job) -> int:
        """Its K: an edit's own start, else its K_opt where its neighbour holds latents."""
        if job.start is not None:
            return job.start
        return job.k_opt if job.k_max > 0 and job.k_opt in self.spec.index_of else 0

    def arrive(self, job: Job, step: int | None = None) -> None:
        """Into the lane, from its start or (``step``) where it was written down."""
        heapq.heappush(self.waiting, (job.deadline_s, job.id, job, self.level(job), step))

    def leaving(self, gpu: StepGpu) -> list[Member]:
        """The members done by ``gpu``'s step count, out of it."""
        done = [m for m in gpu.batch.values() if m.end_step <= gpu.done]
        for member in done:
            del gpu.batch[member.job.id]
            self.held -= 1
            gpu.resident.release(member.job.adapters)
        return done

    def pause(self, gpu: StepGpu, members: list[Member]) -> None:
        """``members`` of ``gpu``'s lane written down at the step each reached, back in the
        lane."""
        total = self.spec.profile.total_steps
        for member in members:
            del gpu.batch[member.job.id]
            self.held -= 1
            gpu.resident.release(member.job.adapters)
            step = total - (member.end_step - gpu.done)
            heapq.heappush(
                self.waiting, (member.job.deadline_s, member.job.id, member.job, member.k, step)
            )
        self.ledger.pauses += len(members)

    def settle(
        self, gpu: StepGpu, now: float, waiting: bool, joined: list[Member], dropped: list[Outcome]
    ) -> tuple[int, ...]:
        """The lane's members on ``gpu`` at this boundary (its interactive joins made, before
        its next step): those that no longer leave its interactive members their slack are
        paused (returned), then waiting or paused jobs fill what is left."""
        paused: list[Member] = []
        # the GPUs are short, or the lane runs apart: none beside an interactive member
        waiting = waiting or self.pricing.price > 0 or self.beside_share <= 0
        if gpu.by_id and gpu.batch:
            kept = sorted(gpu.batch.values(), key=lambda m: (m.job.deadline_s, m.job.id))
            while kept and (waiting or not self.leaves_slack(gpu, now, kept, joined)):
                paused.append(kept.pop())
        self.pause(gpu, paused)
        if gpu.up and not (gpu.by_id and waiting):
            self.fill(gpu, now, joined, dropped)
        return tuple(m.job.id for m in paused)

    def leaves_slack(
        self, gpu: StepGpu, now: float, lane: list[Member], joined: list[Member]
    ) -> bool:
        """Whether ``gpu``'s interactive members, with ``lane`` beside them, each finish within
        ``BESIDE_SHARE`` of their slack (by the step-time model from this boundary)."""
        profile, done = self.spec.profile, gpu.done
        mine = [
            (end - done, dl, kind(gpu.by_id[j].job.shape, gpu.by_id[j].r), 0)
            for end, dl, j in gpu.members
        ]
        theirs = [(m.end_step - done, math.inf, kind(m.job.shape), 1) for m in lane]
        both = sorted(mine + theirs)
        start, mixed = now + len(joined) * profile.join_s, profile.mixed
        alone = finishes(
            profile, start, [r for r, *_ in mine], 0, [s for _, _, s, _ in mine] if mixed else None
        )
        beside = finishes(
            profile, start, [r for r, *_ in both], 0, [s for _, _, s, _ in both] if mixed else None
        )
        beside = [f for f, entry in zip(beside, both, strict=True) if not entry[3]]
        return all(
            b <= a + self.beside_share * max(dl - a, 0.0) + EPS
            for a, b, (_, dl, _, _) in zip(alone, beside, mine, strict=True)
        )

    def fill(self, gpu: StepGpu, now: float, joined: list[Member], dropped: list[Outcome]) -> None:
        """Join waiting or paused background jobs to ``gpu`` up to the lane's width (beside
        interactive members, while they keep their slack); one that can no longer finish by
        its deadline, even alone from here, ends dropped (expired)."""
        total = self.spec.profile.total_steps
        while self.waiting and len(gpu.batch) < self.width:
            _, _, job, k, step = self.waiting[0]
            at = k if step is None else step
            shapes = [kind(job.shape)] if self.spec.profile.mixed else None
            alone = finishes(self.spec.profile, now, [total - at], 1, shapes)[0]
            if alone > job.deadline_s + EPS:
                heapq.heappop(self.waiting)
                dropped.append(Outcome(job, Status.DROPPED, now))
                continue
            member = Member(job, k, gpu.done + total - at, 1, gpu.done, (), step)
            if gpu.by_id and not self.leaves_slack(
                gpu, now, [*gpu.batch.values(), member], [*joined, member]
            ):
                return
            heapq.heappop(self.waiting)
            gpu.batch[job.id] = member
            self.held += 1
            gpu.loading += gpu.resident.use(job.adapters)
            gpu.encoding += job.start is not None and step is None  # an edit's image, once
            self.ledger.resumes += step is not None
            joined.append(member)

    def restart(self, gpu: StepGpu, member: Member, step: int) -> None:
        """A member that started at another step than planned (its written-down state was
        gone, or its start latent: it runs from ``step``)."""
        total = self.spec.profile.total_steps
        member.end_step = gpu.done + total - step
        member.from_step = None if step <= member.k else step
        if step < member.k:
            member.k = step

    def remove(self, job_id: int) -> Job | None:
        """A cancelled background job out of the lane or its GPU (None: not here)."""
        for i, entry in enumerate(self.waiting):
            if entry[1] == job_id:
                self.waiting.pop(i)
                heapq.heapify(self.waiting)
                return entry[2]
        for gpu in self.cluster.gpus:
            member = gpu.batch.pop(job_id, None)
            if member is not None:
                self.held -= 1
                gpu.resident.release(member.job.adapters)
                return member.job
        return None

    def lose(self, gpu: StepGpu) -> None:
        """A lost GPU's background members back in the lane from where they were last written
        down (their progress since went with the GPU)."""
        for member in gpu.batch.values():
            heapq.heappush(
                self.waiting,
                (member.job.deadline_s, member.job.id, member.job, member.k, member.from_step),
            )
        self.held -= len(gpu.batch)
        gpu.batch = {}

    def iteration_s(self, gpu: StepGpu) -> float:
        """One step of ``gpu``'s members, interactive and background (every step full)."""
        profile = self.spec.profile
        if profile.mixed:
            counts = dict(gpu.shapes)
            for member in gpu.batch.values():
                counts[kind(member.job.shape)] = counts.get(kind(member.job.shape), 0) + 1
            return profile.mix_s(counts)
        return profile.iteration_s(len(gpu.by_id) + len(gpu.batch))
