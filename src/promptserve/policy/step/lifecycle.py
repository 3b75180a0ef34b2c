"""A step-level GPU's life between steps: at each boundary who leaves (served), who joins
(placed here, or pulled from the waiting queue, each at the level ``levels`` chooses), who is
dropped, and the timing of the next run of steps."""

from __future__ import annotations

import bisect

from mypy_extensions import mypyc_attr

from promptserve.policy.residency import ResidentSet
from promptserve.policy.step.admission import Admission
from promptserve.policy.step.background import Background
from promptserve.policy.step.bursts import Bursts
from promptserve.policy.step.cluster import Cluster
from promptserve.policy.step.config import StepSpec
from promptserve.policy.step.fit import Fit
from promptserve.policy.step.gpu import Member, StepGpu
from promptserve.policy.step.levels import Levels
from promptserve.policy.step.placement import Placement
from promptserve.policy.step.queue import WaitQueue
from promptserve.policy.types import Job, Outcome, Status
from promptserve.steptime import kind

PULL_LOOKAHEAD = 8  # waiting jobs a boundary looks at past ones that do not fit


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class Lifecycle:
    def __init__(
        self,
        spec: StepSpec,
        cluster: Cluster,
        queue: WaitQueue,
        fit: Fit,
        levels: Levels,
        bursts: Bursts,
        admission: Admission,
        placement: Placement,
        background: Background,
    ) -> None:
        self.spec, self.cluster, self.queue, self.fit = spec, cluster, queue, fit
        self.levels, self.bursts, self.admission, self.placement = (
            levels, bursts, admission, placement,
        )  # fmt: skip
        self.background = background

    def boundary(
        self, gpu: StepGpu, now: float, steps: int
    ) -> tuple[list[Outcome], list[Member], list[Outcome]]:
        """``gpu`` has run ``steps`` more steps and stands at a boundary at ``now``: who leaves
        (served), who joins (with their K), who is dropped from the waiting queue; the running
        members it re-intervalled are in ``gpu.retimed``, the background members it paused in
        ``gpu.paused``. Background members run on it only while no interactive one does
        (``background``): they are paused when one joins, and fill it when none is left."""
        before = gpu.count
        counted = gpu.members[:]
        gpu.done += steps
        leaving: list[Member] = []
        while gpu.members and gpu.members[0][0] <= gpu.done:
            _, _, jid = gpu.members.pop(0)
            leaving.append(gpu.by_id.pop(jid))
            gpu.count_shape(kind(leaving[-1].job.shape, leaving[-1].r), -1)
            gpu.resident.release(leaving[-1].job.adapters)
        leaving += self.background.leaving(gpu)
        self.cluster.recount(gpu, before)  # as the live runtime's removals do, before anyone joins
        before = gpu.count
        # the leavers are decoded together before anyone hears, and before anyone joins (the
        # live runtime's step call returns after the decode): both happen after it
        now += len(leaving) * self.spec.profile.leave_s
        left = [Outcome(m.job, Status.SERVED, now, m.k, gpu.index, m.r, m.earlier) for m in leaving]
        gpu.retimed = self.bursts.retime(gpu, now)  # before the joins: they see the cheaper steps
        joined: list[Member] = []
        dropped: list[Outcome] = []
        placed, gpu.joining = gpu.joining, []
        for job in placed:
            self.join(gpu, job, now, joined, dropped)
        if gpu.up:  # a lost GPU finishes what it reports, and takes no one new
            self.pull_waiting(gpu, now, joined, dropped)
        waiting = bool(self.queue) and self.spec.config.shed
        gpu.paused = self.background.settle(gpu, now, waiting, joined, dropped)
        self.cluster.recount(gpu, before)
        self.start_segment(gpu, now, len(joined))
        if leaving or joined or gpu.left_since:
            self.admission.tally(gpu, -1, counted)
            self.admission.tally(gpu, 1)
        return left, joined, dropped

    def join(self, gpu, job, now, joined, dropped) -> bool:
        """Join ``job`` to ``gpu`` now if a level fits; a job that cannot finish even alone is
        dropped, one that does not fit here waits (False either way)."""
        chosen = self.levels.choose_k(gpu, job, now)
        if chosen is None:
            if self.spec.config.shed and not self.fit.can_ever_finish(job, now):
                dropped.append(Outcome(job, Status.DROPPED, now))
            else:
                self.queue.push(job)
            return False
        self.admit_member(gpu, job, chosen[0], joined, chosen[1])
        return True

    def admit_member(
        self, gpu: StepGpu, job: Job, k: int, joined: list[Member], r: int = 1
    ) -> None:
        member = Member(job, k, gpu.done + self.spec.profile.total_steps - k, r, gpu.done)
        gpu.by_id[job.id] = member
        gpu.count_shape(kind(job.shape, r), 1)
        gpu.loading += gpu.resident.use(job.adapters)
        gpu.encoding += job.start is not None
        bisect.insort(gpu.members, (member.end_step, job.deadline_s, job.id))
        joined.append(member)

    def pull_waiting(self, gpu, now, joined, dropped) -> None:
        """Take waiting jobs while they fit. Under shed: earliest deadline first, looking past
        a head that does not fit here (no head-of-line blocking), and dropping a job that could
        no longer finish even on the least-loaded GPU; else first come first served up to the
        cap, dropping a job whose deadline has passed."""
        if not self.spec.config.shed:
            while self.queue and len(gpu.by_id) < self.spec.cap:
                if not self.fit.room(gpu, self.queue.head()):
                    break  # first come, first served: the head waits for its adapter's row
                job = self.queue.pop()
                if job.deadline_s <= now:
                    dropped.append(Outcome(job, Status.DROPPED, now))
                else:
                    self.join(gpu, job, now, joined, dropped)
            return
        skipped: list[Job] = []
        while self.queue and len(gpu.by_id) < self.spec.cap and len(skipped) < PULL_LOOKAHEAD:
            job = self.queue.pop()
            if not self.admission.reachable(job, now):
                dropped.append(Outcome(job, Status.DROPPED, now))
                continue
            if self.placement.elsewhere(gpu, job, now):
                skipped.append(job)
                continue
            chosen = self.levels.choose_k(gpu, job, now)
            if chosen is None:
                skipped.append(job)
                continue
            self.admit_member(gpu, job, chosen[0], joined, chosen[1])
        for job in skipped:
            self.queue.push(job, requeue=True)

    def start_segment(self, gpu: StepGpu, now: float, joined: int) -> None:
        gpu.seg_start = now + joined * self.spec.profile.join_s
        if gpu.loading:  # the joiners' adapters copied in before the step
            gpu.seg_start += gpu.loading * self.spec.profile.adapter_load_s
            gpu.loading = 0
        if gpu.encoding:  # the joining edits' images through the VAE: timed as its decode
            gpu.seg_start += gpu.encoding * self.spec.profile.leave_s
            gpu.encoding = 0
        gpu.seg_iter_s = (
            self.background.iteration_s(gpu) if gpu.batch else self.cluster.iteration_s(gpu)
        )

    def next_steps(self, gpu: StepGpu) -> int:
        """How many steps the GPU runs before something must happen on it: the next leave, or
        one step when a join is waiting for it, or while requests wait under ``shed`` (a join
        that would make a member late may fit a few steps later, when the members have fewer
        steps left; the live runtime holds a boundary at every step) (0: idle)."""
        if not gpu.running:
            return 0
        if gpu.joining or (self.spec.config.shed and self.queue):
            return 1
        ahead = [m.end_step - gpu.done for m in gpu.batch.values()]
        if gpu.by_id:
            ahead.append(gpu.steps_to_next_leave())
        return min(ahead)  # the next to leave, interactive or background

    def restart(self, gpu: StepGpu, job_id: int, k: int) -> None:
        """A member that could not start at its K (its cached latent was gone) runs from K."""
        member = gpu.by_id[job_id]
        self.admission.tally(gpu, -1)
        gpu.members.remove((member.end_step, member.job.deadline_s, job_id))
        member.k, member.end_step = k, gpu.done + self.spec.profile.total_steps - k
        member.since, member.earlier = gpu.done, ()
        bisect.insort(gpu.members, (member.end_step, member.job.deadline_s, job_id))
        self.admission.tally(gpu, 1)

    def leave(self, job_id: int) -> Job | None:
        """A cancelled member or joiner out of its GPU (None: none holds it)."""
        for gpu in self.cluster.gpus:
            before = gpu.count
            for job in gpu.joining:
                if job.id == job_id:
                    gpu.joining.remove(job)
                    self.cluster.recount(gpu, before)
                    return job
            member = gpu.by_id.pop(job_id, None)
            if member is not None:
                gpu.count_shape(kind(member.job.shape, member.r), -1)
                gpu.resident.release(member.job.adapters)
                self.admission.steps_left[member.end_step - gpu.tallied] -= 1
                gpu.left_since = True
                gpu.members = [e for e in gpu.members if e[2] != job_id]
                self.cluster.recount(gpu, before)
                return member.job
        return None

    def lose(self, gpu: StepGpu) -> list[Job]:
        """A lost GPU: out of placement and the step capacity, its members and joiners handed
        back (their progress went with it), its device's adapter rows gone."""
        self.cluster.take_out(gpu)
        self.admission.tally(gpu, -1)
        held = sorted((m.job for m in gpu.by_id.values()), key=lambda j: j.id) + gpu.joining
        self.background.lose(gpu)
        gpu.by_id, gpu.members, gpu.joining, gpu.shapes = {}, [], [], {}
        gpu.resident = ResidentSet(
            self.spec.profile.adapter_slots, self.spec.profile.adapter_private
        )  # its device's rows went with it
        gpu.seg_iter_s = 0.0
        self.cluster.rehold(gpu)
        return held
