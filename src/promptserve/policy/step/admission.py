"""Admission and reachability: whether a request can still finish by its deadline, joining the
least-loaded GPU now or behind the queue, by the step-time model and the running members'
steps left (``steps_left``: members per steps left, as of the last join or leave on their
GPU, the same on both clocks)."""

from __future__ import annotations

from mypy_extensions import mypyc_attr

from promptserve.policy.step.cluster import Cluster
from promptserve.policy.step.config import StepSpec
from promptserve.policy.step.fit import Fit
from promptserve.policy.step.gpu import StepGpu
from promptserve.policy.step.price import Pricing
from promptserve.policy.step.queue import WaitQueue
from promptserve.policy.step.sizemix import SizeMix
from promptserve.policy.types import Job
from promptserve.steptime import EPS, finishes


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class Admission:
    def __init__(
        self,
        spec: StepSpec,
        cluster: Cluster,
        queue: WaitQueue,
        pricing: Pricing,
        sizes: SizeMix,
        fit: Fit,
    ) -> None:
        self.spec, self.cluster, self.queue = spec, cluster, queue
        self.pricing, self.sizes, self.fit = pricing, sizes, fit
        self.steps_left = [0] * (spec.profile.total_steps + 1)

    def admissible(self, gpu: StepGpu | None, job: Job, now: float) -> bool:
        """Whether ``job`` could finish by its deadline at its fastest level, joining the
        least-loaded GPU at its next boundary."""
        if gpu is None:
            return False
        at = gpu.next_boundary(now)
        done = gpu.done_at(at)
        if self.spec.profile.mixed or (self.spec.profile.adapter_slots and job.adapters):
            # its size's call, its interval and its adapters' loads counted
            k, r = self.spec.fastest(job)
            _, after, _, pos = self.fit.with_new(gpu, job, k, at, (), done, r)
            return after[pos] <= job.deadline_s + EPS
        r = self.spec.profile.total_steps - self.spec.fastest_k(job)
        rem = sorted([end - done for end, _, _ in gpu.members] + [r])
        mine = rem.index(r)
        return finishes(self.spec.profile, at, rem, joined=1)[mine] <= job.deadline_s + EPS

    def after_queue(self, gpu: StepGpu | None, job: Job, now: float) -> bool:
        """Whether ``job``, which cannot join now, finishes in time behind the jobs that wait
        (all of them: where every request has the same SLO its deadline is the latest, and
        while jobs wait no arrival overtakes them). It joins when a slot frees for it
        (``slot_frees``), then runs its own steps at the step capacity's in-flight count for
        the longest run in the queue (a waiting full run caps every GPU it joins), or at the
        fullest GPU's count when that is more (it may get that GPU's slot), or at the
        least-loaded GPU's when fewer: the count at which a waiting job is still reachable
        (``reachable``). A request accepted past this would wait and be dropped: a refusal
        now tells its client at once (429 with a retry), a drop only at its deadline."""
        if gpu is None:
            return False
        if not self.pricing.inflight_for:  # not priced yet: no capacity to count on
            return True
        r = self.spec.profile.total_steps - self.spec.fastest_k(job)
        n = self.pricing.inflight_for[self.spec.profile.total_steps if self.queue.full else r]
        slowest = max(n, self.cluster.fullest())
        start = self.slot_frees(now, n, slowest)
        # behind a queue that takes the free slots it joins a slot a leave frees, on a GPU at
        # its full count; with a slot free, the least-loaded GPU's count
        n = slowest if start > now else min(slowest, len(gpu.by_id) + 1)
        step = self.sizes.member_s(n, job.shape, self.spec.intervals[-1])
        run = self.spec.profile.join_s + r * step + self.spec.profile.leave_s
        return start + run <= job.deadline_s + EPS

    def slot_frees(self, now: float, n: int, slowest: int) -> float:
        """When a slot frees for a job that cannot join now and queues behind every waiting
        one. The queue takes the free slots (GPUs below ``n`` members), then, in order, those
        of the running members as they leave, and the job gets the next: the k-th leave, read
        from ``steps_left`` (members per steps left, O(total steps), independent of the GPU
        count) at the iteration time of ``slowest`` members. Where the queue outnumbers the
        running members its own jobs must leave first: then the work-conserving bound, all
        the work ahead done at the step capacity of ``n`` in flight. (Counting no slot as free,
        on the grounds that the job would have joined one, dropped more at 10x, not fewer:
        ``docs/bursts.md``.)"""
        free = self.cluster.free_slots(n)
        k = len(self.queue) + 1 - free
        if k <= 0:
            return now
        seen = 0
        for left, count in enumerate(self.steps_left):
            seen += count
            if seen >= k:
                return now + left * self.sizes.member_s(slowest) + self.spec.profile.leave_s
        running = sum(left * count for left, count in enumerate(self.steps_left))
        rate = self.cluster.up_count * (n / self.sizes.member_s(n))
        return now + (running + self.queue.steps) / rate

    def tally(
        self, gpu: StepGpu, sign: int, members: list[tuple[int, float, int]] | None = None
    ) -> None:
        """Count ``gpu``'s members (default: those it holds) in (1, as of now) or out of (-1,
        as last counted) ``steps_left``."""
        if sign > 0:
            gpu.tallied, gpu.left_since = gpu.done, False
        for end, _, _ in gpu.members if members is None else members:
            self.steps_left[end - gpu.tallied] += sign

    def reachable(self, job: Job, now: float) -> bool:
        """Whether ``job`` could still finish joining the least-loaded GPU now at its fastest
        level (ignoring the others' deadlines), at its count or, when fewer, at the step
        capacity's in-flight count for its run (the count admission promised it): a waiting job
        past this is dropped."""
        least = self.cluster.least_loaded()
        n = 1 + (len(least.by_id) if least is not None else 0)
        r = self.spec.profile.total_steps - self.spec.fastest_k(job)
        if self.pricing.inflight_for:  # as admission counts it: see ``after_queue``
            n = min(n, self.pricing.inflight_for[r])
        step = self.sizes.member_s(n, job.shape, self.spec.intervals[-1])
        t = now + self.spec.profile.join_s + r * step + self.spec.profile.leave_s
        return t <= job.deadline_s + EPS
