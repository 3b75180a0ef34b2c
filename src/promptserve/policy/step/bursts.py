"""Bursts: the price follows a smoothed load estimate, seconds behind a burst; these follow
the arrivals and the running batches, so a burst moves joins to a faster level, and running
members to the longest feature-cache interval, from its first requests."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

from mypy_extensions import mypyc_attr

from promptserve.policy.step.cluster import Cluster
from promptserve.policy.step.config import StepSpec
from promptserve.policy.step.excess import ExcessWork
from promptserve.policy.step.gpu import Member, StepGpu
from promptserve.policy.step.queue import WaitQueue
from promptserve.steptime import EPS, kind

if TYPE_CHECKING:
    from promptserve.policy.step.price import Pricing


class Full(IntEnum):
    """How full the cluster is (``Bursts.fullness``), for the lever a burst takes."""

    NO = 0
    BY_PACE = 1  # only by a GPU's pace (members at short intervals): the interval is enough
    AT_TOP = 2  # even with every member at the longest interval: the level moves too


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class Bursts:
    def __init__(
        self, spec: StepSpec, cluster: Cluster, queue: WaitQueue, excess: ExcessWork
    ) -> None:
        self.spec, self.cluster, self.queue, self.excess = spec, cluster, queue, excess
        self.pricing: Pricing  # set once built (it reads the excess this drains)

    def saturated(self, now: float) -> bool:
        """Whether the cluster is full now: a burst is arriving (``ExcessWork``), requests
        wait, or even the least-loaded GPU holds more members than a full run could share a
        GPU with and finish in ``SLO_SHARE`` of the SLO, or, its members at several intervals
        (the count misjudges them), runs an iteration slower than such a run's. The price
        follows the load estimate (seconds behind a burst); this follows the arrivals and the
        running batches, so a burst moves joins to a faster level from its first requests."""
        return self.fullness(now) is not Full.NO

    def fullness(self, now: float) -> Full:
        """``saturated``, and whether the cluster is full even with every member counted at the
        longest interval (the load a burst brings, or the members a GPU holds) or only by the
        least-loaded GPU's pace."""
        if self.queue or self.excess.now(now) > self.pricing.excess_limit:
            return Full.AT_TOP
        gpu = self.cluster.least_loaded()
        if gpu is None or gpu.count > self.pricing.busy_at:
            return Full.AT_TOP
        if (
            len(self.spec.intervals) > 1
            and self.spec.profile.mix_s(gpu.shapes) > self.pricing.pace_s
        ):
            return Full.BY_PACE
        return Full.NO

    def retime(self, gpu: StepGpu, now: float) -> list[Member]:
        """While the cluster is saturated (a burst arrives, requests wait), the running members
        move to the longest interval, as the joins of that moment do: it only gets cheaper,
        and a member is moved only where the model says the GPU's step gets cheaper (a first
        cached call pays its fixed part). The members moved, for the driver to tell the
        engine; each keeps what it ran at before (``Member.earlier``) for its quality."""
        top = self.spec.intervals[-1]
        if top == 1 or not self.spec.config.retime or not gpu.by_id or not self.saturated(now):
            return []
        moved = []
        for member in gpu.by_id.values():
            if member.r >= top or member.job.exact or member.end_step - gpu.done <= 1:
                continue
            old, new = kind(member.job.shape, member.r), kind(member.job.shape, top)
            after = dict(gpu.shapes)
            after[old] -= 1
            after[new] = after.get(new, 0) + 1
            if self.spec.profile.mix_s(after) >= self.spec.profile.mix_s(gpu.shapes) - EPS:
                continue
            gpu.count_shape(old, -1)
            gpu.count_shape(new, 1)
            if gpu.done > member.since:  # a part of no steps keeps nothing to count
                member.earlier += ((member.r, gpu.done - member.since),)
            member.r, member.since = top, gpu.done
            moved.append(member)
        return moved
