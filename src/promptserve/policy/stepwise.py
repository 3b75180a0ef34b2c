"""Step-level serving: one running batch per GPU, each request at its own level.

A diffusion step is the same computation at every level (only the timestep differs), so one
denoiser call advances members that sit at different steps. Each GPU keeps one running batch;
a request joins it between two steps, from its neighbour's cached latent at its own K, and
leaves after its last step. No GPU has a level: nothing to allocate, nothing to fragment.

The decisions, all per request, all here (pure code: the simulator and the live runtime pass
the time in and carry out what comes back):

* **placement** at arrival: the GPU with the fewest members (where a request finishes first,
  since every member's step costs the same); bucketed by member count, so the choice does
  not grow with the GPU count;
* **K at join**: the level that maximises ``q(K_opt, K) - price * (N - K)`` among those the
  request may run at, then the smallest larger K that keeps every member of that GPU within
  its deadline (``+shed``). ``price`` is one cluster-wide number, points of quality per
  step-slot, re-estimated from the load estimate so that the step work asked for fits the
  cluster's step capacity: with slack it is 0 and every request runs in full (K = 0 is 100%),
  under load requests move above their K_opt. The price follows a smoothed estimate, so while
  the cluster is saturated now (a burst is arriving: ``ExcessWork``; requests wait; or even the
  least-loaded GPU holds more members than a full run can share a GPU with inside the SLO) a
  request joins at its fastest level;
* **admission** (``+admit``): refuse at arrival when no K the request may run at can finish by
  its deadline on the least-loaded GPU, or, when it must wait, behind the waiting queue
  (``_after_queue``: the slot it gets is the one that frees after the queue has taken the
  free slots and those of the members that leave first); while requests wait, an arrival
  queues behind them, so what admission promised a waiting request is not taken by a later
  one;
* **shedding** (``+shed``): waiting requests are taken earliest deadline first, a join that
  would make a member late is not made, and a request that cannot finish even alone on an
  idle GPU is dropped. Without it (as published for step-wise batching): first come, first
  served up to a fixed in-flight cap, late work runs late, and a request whose deadline has
  passed before it joins is dropped.

Sizes: a GPU's batch may hold members of several sizes, one denoiser call per size a step
(``steptime``: a size counts by its pixels, each call pays its fixed part). Placement is then
shape-aware: besides the least-loaded GPU it weighs the least-loaded one already running the
request's size, and takes the one where the request adds less to its batch's finish times
(``_placement_cost``): an idle GPU while there is one, a GPU of its own size once all are busy.
The price is then per step-second: a size's steps are priced by what they cost the GPU
(``StepPricing._size_factors``).

The finish-time model: ``n`` members make an iteration of ``step_s(n)`` seconds; a member with
``r`` steps left, on a GPU where the members with fewer steps leave on the way, finishes after
the sum of those segments (``finishes``). Later joins are checked against every member's
deadline, so they cannot break the promise either.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

import numpy as np

from promptserve.policy.contract import Arrival, LoadSnapshot
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.intake import DELIVERY_MARGIN_S
from promptserve.policy.residency import ResidentSet
from promptserve.policy.stepgpu import GpuBucket, KRule, Member, StepConfig, StepGpu
from promptserve.policy.stepprice import (
    EXCESS_SHARE,
    PRICE_MAX,
    SLO_SHARE,
    UTILISATION,
    ExcessWork,
    StepPricing,
)
from promptserve.policy.steptime import (
    EPS,
    StepProfile,
    derived_step_profile,
    finishes,
    kind,
    step_profile,
)
from promptserve.policy.types import Job, Outcome, Status

PULL_LOOKAHEAD = 8  # waiting jobs a boundary looks at past ones that do not fit

__all__ = [
    "EPS",
    "PRICE_MAX",
    "SLO_SHARE",
    "UTILISATION",
    "KRule",
    "Member",
    "StepConfig",
    "StepGpu",
    "StepProfile",
    "StepScheduler",
    "derived_step_profile",
    "finishes",
    "step_profile",
]


class StepScheduler(StepPricing):
    """The step-level policy over ``n_gpus`` GPUs. Drivers call ``arrive``, ``boundary`` (after
    each run of steps) and ``reprice`` (on the re-plan period), and run what they return."""

    def __init__(
        self,
        profile: StepProfile,
        n_gpus: int,
        quality: np.ndarray,
        config: StepConfig,
        estimator: LoadEstimator | None = None,  # needed by ``intake`` only
        interval_q: Sequence[float] = (100.0,),  # q_r per feature-cache interval r (from 1)
    ) -> None:
        self.profile, self.config, self.estimator = profile, config, estimator
        self.quality = np.asarray(quality, dtype=float)  # q[K_opt index, K index]
        # the feature-cache intervals the price may pick (``price`` only; the rules run r = 1);
        # ``max_r``, the rival: the longest one only, for every rule
        self.intervals = profile.intervals if config.rule == "price" else (1,)
        if config.max_r:
            self.intervals = profile.intervals[-1:]
        self.interval_q = tuple(interval_q) + (100.0,) * (len(self.intervals) - len(interval_q))
        self.levels = profile.levels
        self.index_of = {k: i for i, k in enumerate(self.levels)}
        self.gpus = [
            StepGpu(i, resident=ResidentSet(profile.adapter_slots, profile.adapter_private))
            for i in range(n_gpus)
        ]
        self.cap = profile.max_inflight if config.shed else min(config.cap, profile.max_inflight)
        self.by_count = [GpuBucket() for _ in range(profile.max_inflight + 2)]
        for g in range(n_gpus):
            self.by_count[0].add(g)
        self.waiting: list[tuple[float, int, Job]] = []  # (deadline or arrival, id, job)
        self.waiting_steps = 0  # what the waiting jobs need at their fastest levels
        self.waiting_full = 0  # waiting jobs that must run every step (no neighbour)
        self.wait_epoch = 0  # times the queue went from empty to waiting (drivers' cuts)
        self._inflight_for: list[int] = []  # per run length in steps (``reprice``)
        self._inflight_slo: tuple | None = None  # the SLO and size mix it is built for
        self.up_count = n_gpus
        self.price = 0.0
        self._busy_at = self.cap  # members past which a GPU is full (set with the price)
        self._pace_s = float("inf")  # an iteration past which a GPU is full (with the price)
        self._choice = self._choice_lo = self._choices(0.0)
        self._at_top = [self._choices(0.0, self.intervals[-1])] * len(profile.shape_weights)
        self._by_shape: list[tuple[list, list]] = []  # per size (``StepPricing._size_factors``)
        self._split = 0.0  # share of the moving class that takes the cheaper level
        self.excess = ExcessWork()  # the burst signal (``saturated``), drained at the capacity
        self._excess_limit = float("inf")  # set with the price
        # running members per steps left, as of the last join or leave on their GPU (the
        # same on both clocks: one boundary per step live, one per event simulated)
        self.steps_left = [0] * (profile.total_steps + 1)
        self.holders: dict[int, set[int]] = {}  # per size: the GPUs holding a member of it
        self._arrived_by_shape = [0] * len(profile.shape_weights)  # the sizes (``member_s``)

    # -- decisions -------------------------------------------------------------------------

    def least_loaded(self) -> StepGpu | None:
        for bucket in self.by_count:
            if bucket:
                return self.gpus[bucket.first()]
        return None

    def _recount(self, gpu: StepGpu, before: int) -> None:
        if self.profile.sized:
            self._rehold(gpu)
        after = min(gpu.count, len(self.by_count) - 1)
        if before != after:
            self.by_count[min(before, len(self.by_count) - 1)].discard(gpu.index)
            if gpu.up:
                self.by_count[after].add(gpu.index)

    def _rehold(self, gpu: StepGpu) -> None:
        held = gpu.held_shapes() if gpu.up else set()
        for shape, gpus in self.holders.items():
            if shape not in held:
                gpus.discard(gpu.index)
        for shape in held:
            self.holders.setdefault(shape, set()).add(gpu.index)

    def _room(self, gpu: StepGpu, job: Job, ahead: Sequence[Job] = ()) -> bool:
        """Whether ``gpu``'s device has rows for the adapters of its members, ``ahead`` and
        ``job`` together, and room for their pixels (``max_weight``)."""
        if not self._pixels_fit(gpu, job, ahead):
            return False
        if not (self.profile.adapter_slots and job.adapters):
            return True
        return gpu.resident.room_for([a for j in (*ahead, job) for a in j.adapters])

    def _pixels_fit(self, gpu: StepGpu, job: Job, ahead: Sequence[Job]) -> bool:
        """Members' pixels (in native-size images) within the device's bound: the step's
        activations grow with them, a count of members does not see a batch of the largest
        size. A GPU with nobody on it takes anyone (a request alone always runs)."""
        bound, w = self.profile.max_weight, self.profile.shape_weights
        if not bound:
            return True
        others = {j.id: j for j in (*gpu.joining, *ahead) if j.id != job.id}
        held = sum(w[m.job.shape] for m in gpu.by_id.values()) + sum(
            w[j.shape] for j in others.values()
        )
        return held == 0 or held + w[job.shape] <= bound + 1e-9

    def _with_new(
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
        r_new = self.profile.total_steps - k
        done = gpu.done if done < 0 else done
        mixed = self.profile.mixed
        by_id = gpu.by_id

        def member_kind(jid: int) -> int:
            m = by_id[jid]
            return kind(m.job.shape, m.r)

        held = [(end - done, d, member_kind(jid) if mixed else 0) for end, d, jid in gpu.members]
        if self.profile.adapter_slots:  # the adapters it and those ahead load first
            named = [a for j in (*ahead, job) for a in j.adapters]
            at += gpu.resident.missing(named) * self.profile.adapter_load_s
        if ahead:
            total = self.profile.total_steps
            fast = [(j, *self.fastest(j)) for j in ahead]
            held = sorted(
                held + [(total - fk, j.deadline_s, kind(j.shape, fr)) for j, fk, fr in fast]
            )
        rem = [left for left, _, _ in held]
        deadlines = [d for _, d, _ in held]
        pos = bisect.bisect_right(rem, r_new)
        with_new = rem[:pos] + [r_new] + rem[pos:]
        shapes = [s for _, _, s in held] if mixed else None
        new_shapes = (
            shapes[:pos] + [kind(job.shape, r)] + shapes[pos:] if shapes is not None else None
        )
        after = finishes(self.profile, at, with_new, 1 + len(ahead), new_shapes)
        before = finishes(self.profile, at, rem, len(ahead), shapes) if rem else None
        return deadlines, after, before, pos

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
        if not self._room(gpu, job, ahead):
            return False
        deadlines, after, before, pos = self._with_new(gpu, job, k, at, ahead, done, r)
        if after[pos] > job.deadline_s + EPS:
            return False
        if before is None:
            return True
        for i, d in enumerate(deadlines):
            f = after[i if i < pos else i + 1]
            if f > d + EPS and f > before[i] + EPS:
                return False
        return True

    def fastest_k(self, job: Job) -> int:
        """The fastest level the rule lets ``job`` run at."""
        return 0 if self.config.rule == "zero" else job.k_max

    def fastest(self, job: Job) -> tuple[int, int]:
        """The fastest (K, interval) the rule lets ``job`` run at."""
        return self.fastest_k(job), 1 if job.exact else self.intervals[-1]

    def can_ever_finish(self, job: Job, now: float) -> bool:
        """Alone on an idle GPU from now, at the fastest level the rule allows it."""
        return now + self.alone_s(*self.fastest(job), job.shape) <= job.deadline_s + EPS

    def alone_s(self, k: int, r: int = 1, shape: int = 0) -> float:
        """Seconds from arrival to answer of one request alone on an idle GPU at (K, r)."""
        shapes = [kind(shape, r)] if self.profile.mixed else None
        return finishes(self.profile, 0.0, [self.profile.total_steps - k], 1, shapes)[0]

    def choose_k(
        self, gpu: StepGpu, job: Job, at: float, ahead: Sequence[Job] = (), done: int = -1
    ) -> tuple[int, int] | None:
        """The level and interval ``job`` joins ``gpu`` at, or None when none allowed keeps
        the deadlines (only under ``+shed``; without it the preferred one always joins, the
        device's adapter rows permitting): the preferred one, else the next cheaper in GPU
        time ((N - K) steps at the interval's mean step), as far as the fastest."""
        k, r = self.preferred(job, at)
        if not self.config.shed:  # no deadline check: only the device's adapter rows
            return (k, r) if self._room(gpu, job, ahead) else None
        allowed = [(k, r)] if self.config.rule != "price" else self._cheaper(job, k, r)
        for level, interval in allowed:
            if self.fits(gpu, job, level, at, ahead, done, interval):
                return level, interval
        return None

    def _cheaper(self, job: Job, k: int, r: int) -> list[tuple[int, int]]:
        """(K, r) from the preferred one to the fastest the job may run at, in falling GPU
        time: without intervals the levels from K up, as before."""
        if len(self.intervals) == 1 or job.exact:
            r = 1 if job.exact else self.intervals[0]
            return [(lv, r) for lv in self.levels if k <= lv <= job.k_max]
        n, w = self.profile.total_steps, self.profile.interval_weight
        cost = (n - k) * w(r)
        options = [
            ((n - lv) * w(ri), lv, ri) for lv in self.levels if lv <= job.k_max
            for ri in self.intervals if (n - lv) * w(ri) <= cost + EPS
        ]  # fmt: skip
        options.sort(key=lambda o: (-o[0], o[1], o[2]))
        return [(lv, ri) for _, lv, ri in options]

    # -- the contract (``policy.contract.Scheduler``) -----------------------------------------

    def intake(
        self,
        now: float,
        job_id: int,
        deadline_s: float,
        k_opt: int,
        has_neighbour: bool,
        shape: int = 0,
        adapters: tuple[int, ...] = (),
        exact: bool = False,
    ) -> Arrival:
        """Tell the estimator, then place the job (the GPU it joins at that GPU's next
        boundary, none while it waits) or end it (refused or, with no level that can finish,
        dropped). It starts at its K_opt; the K it runs at is chosen when it joins."""
        assert self.estimator is not None, "intake needs the scheduler's load estimator"
        self.estimator.observe(now, k_opt, self.profile.shape_weights[shape])
        k_max = self.levels[-1] if has_neighbour else 0
        job = Job(
            job_id, now, deadline_s - DELIVERY_MARGIN_S, k_opt, k_max, k_opt, shape, adapters,
            exact,
        )  # fmt: skip
        k, r = self.fastest(job)  # at its fastest interval's mean step
        steps = self.profile.total_steps - k
        self.excess.pour(now, steps * self.profile.interval_weight(r) if r > 1 else steps)
        if self.profile.sized:
            self._arrived_by_shape[shape] += 1
        gpu, outcome = self.arrive(now, job)
        return Arrival(job, outcome, gpu.index if gpu is not None else None)

    def snapshot(self) -> LoadSnapshot:
        mix = dict.fromkeys(self.levels, 0)
        for gpu in self.gpus:
            for member in gpu.by_id.values():
                mix[member.k] += 1
        waiting = {k: (len(self.waiting) if k == self.levels[0] else 0) for k in self.levels}
        inflight = tuple(len(g.by_id) for g in self.gpus)
        return LoadSnapshot(waiting, mix, inflight, len(self.gpus), sum(g.up for g in self.gpus))

    def backlog_s(self, now: float) -> float:
        """Until the first member of an up GPU leaves (its slot frees)."""
        return min(
            (g.steps_to_next_leave() * self._iteration_s(g) for g in self.gpus if g.up),
            default=1.0,
        )

    def _iteration_s(self, gpu: StepGpu) -> float:
        """One step of ``gpu``'s running members (0: none)."""
        if self.profile.mixed:
            return self.profile.mix_s(gpu.shapes) if gpu.by_id else 0.0
        return self.profile.iteration_s(len(gpu.by_id)) if gpu.by_id else 0.0

    @property
    def size_shares(self) -> tuple[float, ...]:
        """The arrivals' share of each size so far (all native before any arrives)."""
        total = sum(self._arrived_by_shape)
        if not total:
            return (1.0,) + (0.0,) * (len(self._arrived_by_shape) - 1)
        return tuple(c / total for c in self._arrived_by_shape)

    def member_s(self, n: int, shape: int | None = None, r: int = 1) -> float:
        """An iteration of ``n`` members of ``shape``, or (None) of ``n`` members drawn from
        the arrivals' size mix: what the price's capacity and the queue's estimates count on.
        A size is in the batch with probability ``1 - (1 - p) ** n`` and then holds ``n p``
        over that many members, each present size a call (exact where the step curve is
        affine, as the reference's is; conservative where placement groups sizes); ``r``:
        their feature-cache interval."""
        if not self.profile.mixed:
            return self.profile.iteration_s(n)
        if shape is not None:
            return self.profile.member_s(n, shape, r)
        if not self.profile.sized:
            return self.profile.member_s(n, 0, r)
        total, w = 0.0, self.profile.shape_weights
        for s, p in enumerate(self.size_shares):
            if p > 0:
                present = 1.0 - (1.0 - p) ** n
                if r == 1:
                    total += present * self.profile.call_s(n * p / present * w[s])
                else:  # its full and cached calls (``StepProfile.mix_s``)
                    total += present * self.profile.mix_s({kind(s, r): n * p / present})
        return total

    # -- decisions -------------------------------------------------------------------------

    def arrive(self, now: float, job: Job) -> tuple[StepGpu | None, Outcome | None]:
        """Place an arriving job: the GPU it will join at that GPU's next boundary (the driver
        runs that boundary), or None when it waits; an outcome when it is refused."""
        gpu = self.place(now, job)
        if self.config.admission and not self._admissible(gpu, job, now):
            return None, Outcome(job, Status.REFUSED, now)
        if self.config.shed and not self.can_ever_finish(job, now):
            return None, Outcome(job, Status.DROPPED, now)
        # while others wait it queues behind them (earliest deadline first), so that a fresh
        # arrival does not take the slot a waiting job was admitted on
        if gpu is not None and gpu.count < self.cap and not (self.config.shed and self.waiting):
            at = gpu.next_boundary(now)
            done = gpu.done_at(at)
            if self.choose_k(gpu, job, at, gpu.joining, done) is not None:
                before = gpu.count
                gpu.joining.append(job)
                self._recount(gpu, before)
                return gpu, None
        if self.config.admission and not self._after_queue(gpu, job, now):
            return None, Outcome(job, Status.REFUSED, now)
        self._wait(job)
        return None, None

    def place(self, now: float, job: Job) -> StepGpu | None:
        """The GPU an arriving job is offered: the least-loaded one, or, serving several sizes
        or bounded adapter residency (``shape_aware``), the least-loaded one already running
        its size, or holding its adapters, where the job adds less to the finish times there
        (``_placement_cost``: a load delays every member's next step)."""
        least = self.least_loaded()
        named = bool(self.profile.adapter_slots and job.adapters)
        if least is None or not ((self.profile.sized or named) and self.config.shape_aware):
            return least
        candidates = [least]
        if self.profile.sized:  # the least-loaded GPU running its size
            same = [
                self.gpus[i] for i in self.holders.get(job.shape, ())
                if self.gpus[i].count < self.cap
            ]  # fmt: skip
            if same:
                candidates.append(min(same, key=lambda g: (g.count, g.index)))
        if named:  # the least-loaded GPU holding its adapters (a scan: adapter traffic only)
            holding = [
                g for g in self.gpus
                if g.up and g.count < self.cap and not g.resident.missing(job.adapters)
            ]  # fmt: skip
            if holding:
                candidates.append(min(holding, key=lambda g: (g.count, g.index)))
        if len({g.index for g in candidates}) == 1:
            return least
        costs = [(self._placement_cost(g, job, now), i) for i, g in enumerate(candidates)]
        return candidates[min(costs)[1]]

    def _placement_cost(self, gpu: StepGpu, job: Job, now: float) -> float:
        """Seconds ``job`` adds to the sum of the finish times on ``gpu``: its own time to
        finish there and what it delays every member by (one more member in its size's call,
        or a call of its own for a size the batch does not hold)."""
        at = gpu.next_boundary(now)
        if not self._room(gpu, job, gpu.joining):
            return float("inf")
        k, r = self.preferred(job, at)
        _, after, before, pos = self._with_new(gpu, job, k, at, gpu.joining, gpu.done_at(at), r)
        delay = sum(after) - after[pos] - (sum(before) if before else 0.0)
        return after[pos] - now + delay

    def _key(self, job: Job) -> float:
        return job.deadline_s if self.config.shed else job.arrival_s

    def _wait(self, job: Job, requeue: bool = False) -> None:
        """``requeue``: put back by the boundary that took it out (the queue was never seen
        empty in between)."""
        if not self.waiting and not requeue:
            self.wait_epoch += 1
        heapq.heappush(self.waiting, (self._key(job), job.id, job))
        self._count_waiting(job, 1)

    def _count_waiting(self, job: Job, sign: int) -> None:
        k = self.fastest_k(job)
        self.waiting_steps += sign * (self.profile.total_steps - k)
        self.waiting_full += sign * (k == 0)

    def _unwait(self) -> tuple[float, int, Job]:
        entry = heapq.heappop(self.waiting)
        self._count_waiting(entry[2], -1)
        return entry

    def _admissible(self, gpu: StepGpu | None, job: Job, now: float) -> bool:
        """Whether ``job`` could finish by its deadline at its fastest level, joining the
        least-loaded GPU at its next boundary."""
        if gpu is None:
            return False
        at = gpu.next_boundary(now)
        done = gpu.done_at(at)
        if self.profile.mixed or (self.profile.adapter_slots and job.adapters):
            # its size's call, its interval and its adapters' loads counted
            k, r = self.fastest(job)
            _, after, _, pos = self._with_new(gpu, job, k, at, (), done, r)
            return after[pos] <= job.deadline_s + EPS
        r = self.profile.total_steps - self.fastest_k(job)
        rem = sorted([end - done for end, _, _ in gpu.members] + [r])
        mine = rem.index(r)
        return finishes(self.profile, at, rem, joined=1)[mine] <= job.deadline_s + EPS

    def _after_queue(self, gpu: StepGpu | None, job: Job, now: float) -> bool:
        """Whether ``job``, which cannot join now, finishes in time behind the jobs that wait
        (all of them: where every request has the same SLO its deadline is the latest, and
        while jobs wait no arrival overtakes them). It joins when a slot frees for it
        (``_slot_frees``), then runs its own steps at the step capacity's in-flight count for
        the longest run in the queue (a waiting full run caps every GPU it joins), or at the
        fullest GPU's count when that is more (it may get that GPU's slot), or at the
        least-loaded GPU's when fewer: the count at which a waiting job is still reachable
        (``_reachable``). A request accepted past this would wait and be dropped: a refusal
        now tells its client at once (429 with a retry), a drop only at its deadline."""
        if gpu is None:
            return False
        if not self._inflight_for:  # not priced yet: no capacity to count on
            return True
        r = self.profile.total_steps - self.fastest_k(job)
        n = self._inflight_for[self.profile.total_steps if self.waiting_full else r]
        slowest = max(n, self._fullest())
        start = self._slot_frees(now, n, slowest)
        # behind a queue that takes the free slots it joins a slot a leave frees, on a GPU at
        # its full count; with a slot free, the least-loaded GPU's count
        n = slowest if start > now else min(slowest, len(gpu.by_id) + 1)
        step = self.member_s(n, job.shape, self.intervals[-1])
        run = self.profile.join_s + r * step + self.profile.leave_s
        return start + run <= job.deadline_s + EPS

    def _fullest(self) -> int:
        """The member count of the fullest up GPU (O(the in-flight cap))."""
        return max((c for c, bucket in enumerate(self.by_count) if bucket), default=0)

    def _slot_frees(self, now: float, n: int, slowest: int) -> float:
        """When a slot frees for a job that cannot join now and queues behind every waiting
        one. The queue takes the free slots (GPUs below ``n`` members), then, in order, those
        of the running members as they leave, and the job gets the next: the k-th leave, read
        from ``steps_left`` (members per steps left, O(total steps), independent of the GPU
        count) at the iteration time of ``slowest`` members. Where the queue outnumbers the
        running members its own jobs must leave first: then the work-conserving bound, all
        the work ahead done at the step capacity of ``n`` in flight. (Counting no slot as free,
        on the grounds that the job would have joined one, dropped more at 10x, not fewer:
        ``docs/bursts.md``.)"""
        free = sum(len(bucket) * max(0, n - c) for c, bucket in enumerate(self.by_count))
        k = len(self.waiting) + 1 - free
        if k <= 0:
            return now
        seen = 0
        for left, count in enumerate(self.steps_left):
            seen += count
            if seen >= k:
                return now + left * self.member_s(slowest) + self.profile.leave_s
        running = sum(left * count for left, count in enumerate(self.steps_left))
        rate = self.up_count * (n / self.member_s(n))
        return now + (running + self.waiting_steps) / rate

    def _tally(
        self, gpu: StepGpu, sign: int, members: list[tuple[int, float, int]] | None = None
    ) -> None:
        """Count ``gpu``'s members (default: those it holds) in (1, as of now) or out of (-1,
        as last counted) ``steps_left``."""
        if sign > 0:
            gpu.tallied, gpu.left_since = gpu.done, False
        for end, _, _ in gpu.members if members is None else members:
            self.steps_left[end - gpu.tallied] += sign

    def boundary(
        self, gpu: StepGpu, now: float, steps: int
    ) -> tuple[list[Outcome], list[Member], list[Outcome]]:
        """``gpu`` has run ``steps`` more steps and stands at a boundary at ``now``: who leaves
        (served), who joins (with their K), who is dropped from the waiting queue; the running
        members it re-intervalled are in ``gpu.retimed``."""
        before = gpu.count
        counted = gpu.members[:]
        gpu.done += steps
        leaving: list[Member] = []
        while gpu.members and gpu.members[0][0] <= gpu.done:
            _, _, jid = gpu.members.pop(0)
            leaving.append(gpu.by_id.pop(jid))
            gpu.count_shape(kind(leaving[-1].job.shape, leaving[-1].r), -1)
            gpu.resident.release(leaving[-1].job.adapters)
        self._recount(gpu, before)  # as the live runtime's removals do, before anyone joins
        before = gpu.count
        # the leavers are decoded together before anyone hears, and before anyone joins (the
        # live runtime's step call returns after the decode): both happen after it
        now += len(leaving) * self.profile.leave_s
        left = [Outcome(m.job, Status.SERVED, now, m.k, gpu.index, m.r, m.earlier) for m in leaving]
        gpu.retimed = self._retime(gpu, now)  # before the joins: they see the cheaper steps
        joined: list[Member] = []
        dropped: list[Outcome] = []
        placed, gpu.joining = gpu.joining, []
        for job in placed:
            self._join(gpu, job, now, joined, dropped)
        if gpu.up:  # a lost GPU finishes what it reports, and takes no one new
            self._pull_waiting(gpu, now, joined, dropped)
        self._recount(gpu, before)
        self._start_segment(gpu, now, len(joined))
        if leaving or joined or gpu.left_since:
            self._tally(gpu, -1, counted)
            self._tally(gpu, 1)
        return left, joined, dropped

    def _retime(self, gpu: StepGpu, now: float) -> list[Member]:
        """While the cluster is saturated (a burst arrives, requests wait), the running members
        move to the longest interval, as the joins of that moment do: it only gets cheaper,
        and a member is moved only where the model says the GPU's step gets cheaper (a first
        cached call pays its fixed part). The members moved, for the driver to tell the
        engine; each keeps what it ran at before (``Member.earlier``) for its quality."""
        top = self.intervals[-1]
        if top == 1 or not self.config.retime or not gpu.by_id or not self.saturated(now):
            return []
        moved = []
        for member in gpu.by_id.values():
            if member.r >= top or member.job.exact or member.end_step - gpu.done <= 1:
                continue
            old, new = kind(member.job.shape, member.r), kind(member.job.shape, top)
            after = dict(gpu.shapes)
            after[old] -= 1
            after[new] = after.get(new, 0) + 1
            if self.profile.mix_s(after) >= self.profile.mix_s(gpu.shapes) - EPS:
                continue
            gpu.count_shape(old, -1)
            gpu.count_shape(new, 1)
            member.earlier += ((member.r, gpu.done - member.since),)
            member.r, member.since = top, gpu.done
            moved.append(member)
        return moved

    def _join(self, gpu, job, now, joined, dropped) -> bool:
        """Join ``job`` to ``gpu`` now if a level fits; a job that cannot finish even alone is
        dropped, one that does not fit here waits (False either way)."""
        chosen = self.choose_k(gpu, job, now)
        if chosen is None:
            if self.config.shed and not self.can_ever_finish(job, now):
                dropped.append(Outcome(job, Status.DROPPED, now))
            else:
                self._wait(job)
            return False
        self._admit_member(gpu, job, chosen[0], joined, chosen[1])
        return True

    def _admit_member(
        self, gpu: StepGpu, job: Job, k: int, joined: list[Member], r: int = 1
    ) -> None:
        member = Member(job, k, gpu.done + self.profile.total_steps - k, r, gpu.done)
        gpu.by_id[job.id] = member
        gpu.count_shape(kind(job.shape, r), 1)
        gpu.loading += gpu.resident.use(job.adapters)
        bisect.insort(gpu.members, (member.end_step, job.deadline_s, job.id))
        joined.append(member)

    def _pull_waiting(self, gpu, now, joined, dropped) -> None:
        """Take waiting jobs while they fit. Under shed: earliest deadline first, looking past
        a head that does not fit here (no head-of-line blocking), and dropping a job that could
        no longer finish even on the least-loaded GPU; else first come first served up to the
        cap, dropping a job whose deadline has passed."""
        if not self.config.shed:
            while self.waiting and len(gpu.by_id) < self.cap:
                if not self._room(gpu, self.waiting[0][2]):
                    break  # first come, first served: the head waits for its adapter's row
                _, _, job = self._unwait()
                if job.deadline_s <= now:
                    dropped.append(Outcome(job, Status.DROPPED, now))
                else:
                    self._join(gpu, job, now, joined, dropped)
            return
        skipped: list[tuple[float, int, Job]] = []
        while self.waiting and len(gpu.by_id) < self.cap and len(skipped) < PULL_LOOKAHEAD:
            entry = self._unwait()
            job = entry[2]
            if not self._reachable(job, now):
                dropped.append(Outcome(job, Status.DROPPED, now))
                continue
            if self._elsewhere(gpu, job, now):
                skipped.append(entry)
                continue
            chosen = self.choose_k(gpu, job, now)
            if chosen is None:
                skipped.append(entry)
                continue
            self._admit_member(gpu, job, chosen[0], joined, chosen[1])
        for entry in skipped:
            self._wait(entry[2], requeue=True)

    def _elsewhere(self, gpu: StepGpu, job: Job, now: float) -> bool:
        """Whether a waiting job of a size ``gpu`` does not run is better left to a GPU that
        runs it (shape-aware, several sizes): it joins there at that GPU's next boundary, a
        step away while jobs wait, instead of adding a call to every step here. Only while it
        would finish here with the waiting share of its SLO to spare (``EXCESS_SHARE``, what
        the policy leaves for waiting to join), so a job is not held back into lateness."""
        if not (self.profile.sized and self.config.shape_aware and gpu.by_id):
            return False
        if job.shape in gpu.held_shapes() or not any(
            i != gpu.index and self.gpus[i].up for i in self.holders.get(job.shape, ())
        ):
            return False
        k, r = self.fastest(job)
        _, after, _, pos = self._with_new(gpu, job, k, now, (), -1, r)
        return job.deadline_s - after[pos] > EXCESS_SHARE * (job.deadline_s - job.arrival_s)

    def _reachable(self, job: Job, now: float) -> bool:
        """Whether ``job`` could still finish joining the least-loaded GPU now at its fastest
        level (ignoring the others' deadlines), at its count or, when fewer, at the step
        capacity's in-flight count for its run (the count admission promised it): a waiting job
        past this is dropped."""
        least = self.least_loaded()
        n = 1 + (len(least.by_id) if least is not None else 0)
        r = self.profile.total_steps - self.fastest_k(job)
        if self._inflight_for:  # as admission counts it: see ``_after_queue``
            n = min(n, self._inflight_for[r])
        step = self.member_s(n, job.shape, self.intervals[-1])
        t = now + self.profile.join_s + r * step + self.profile.leave_s
        return t <= job.deadline_s + EPS

    def _start_segment(self, gpu: StepGpu, now: float, joined: int) -> None:
        gpu.seg_start = now + joined * self.profile.join_s
        if gpu.loading:  # the joiners' adapters copied in before the step
            gpu.seg_start += gpu.loading * self.profile.adapter_load_s
            gpu.loading = 0
        gpu.seg_iter_s = self._iteration_s(gpu)

    def next_steps(self, gpu: StepGpu) -> int:
        """How many steps the GPU runs before something must happen on it: the next leave, or
        one step when a join is waiting for it, or while requests wait under ``shed`` (a join
        that would make a member late may fit a few steps later, when the members have fewer
        steps left; the live runtime holds a boundary at every step) (0: idle)."""
        if not gpu.by_id:
            return 0
        if gpu.joining or (self.config.shed and self.waiting):
            return 1
        return gpu.steps_to_next_leave()

    def remove(self, job_id: int) -> Job | None:
        """A cancelled request: out of the waiting queue, the joining list or its batch."""
        for i, (_, jid, job) in enumerate(self.waiting):
            if jid == job_id:
                self.waiting.pop(i)
                heapq.heapify(self.waiting)
                self._count_waiting(job, -1)
                return job
        for gpu in self.gpus:
            before = gpu.count
            for job in gpu.joining:
                if job.id == job_id:
                    gpu.joining.remove(job)
                    self._recount(gpu, before)
                    return job
            member = gpu.by_id.pop(job_id, None)
            if member is not None:
                gpu.count_shape(kind(member.job.shape, member.r), -1)
                gpu.resident.release(member.job.adapters)
                self.steps_left[member.end_step - gpu.tallied] -= 1
                gpu.left_since = True
                gpu.members = [e for e in gpu.members if e[2] != job_id]
                self._recount(gpu, before)
                return member.job
        return None

    def set_up(self, gpu_index: int, up: bool, now: float = 0.0) -> list[Job]:
        """A GPU lost or back. Down, it takes no one, leaves the step capacity the price is set
        for (``steps_capacity``), and hands back the jobs it held, members and joiners, for the
        driver to place again (their progress went with it)."""
        gpu = self.gpus[gpu_index]
        if gpu.up == up:
            return []
        bucket = self.by_count[min(gpu.count, len(self.by_count) - 1)]
        gpu.up = up
        self.up_count += 1 if up else -1
        if up:
            bucket.add(gpu.index)
            self._rehold(gpu)
            return []
        bucket.discard(gpu.index)
        self._tally(gpu, -1)
        held = sorted((m.job for m in gpu.by_id.values()), key=lambda j: j.id) + gpu.joining
        gpu.by_id, gpu.members, gpu.joining, gpu.shapes = {}, [], [], {}
        gpu.resident = ResidentSet(
            self.profile.adapter_slots, self.profile.adapter_private
        )  # its device's rows went with it
        gpu.seg_iter_s = 0.0
        self._rehold(gpu)
        return held

    def drain(self, gpu_index: int) -> None:
        """Take a GPU out of placement while its members run to their end: it takes no one
        new and leaves the step capacity, but unlike a lost GPU hands nothing back (a GPU moving
        to another shard, ``policy.shards``; it is empty once its members have left)."""
        gpu = self.gpus[gpu_index]
        if not gpu.up:
            return
        self.by_count[min(gpu.count, len(self.by_count) - 1)].discard(gpu.index)
        gpu.up = False
        self.up_count -= 1
        self._rehold(gpu)

    def restart(self, gpu: StepGpu, job_id: int, k: int) -> None:
        """A member that could not start at its K (its cached latent was gone) runs from K."""
        member = gpu.by_id[job_id]
        self._tally(gpu, -1)
        gpu.members.remove((member.end_step, member.job.deadline_s, job_id))
        member.k, member.end_step = k, gpu.done + self.profile.total_steps - k
        member.since, member.earlier = gpu.done, ()
        bisect.insort(gpu.members, (member.end_step, member.job.deadline_s, job_id))
        self._tally(gpu, 1)

    def idle_while_waiting(self) -> list[StepGpu]:
        """GPUs with nothing to run while requests wait: the driver runs a boundary on each
        now (it pulls from the queue)."""
        if not self.waiting:
            return []
        return [self.gpus[i] for i in sorted(self.by_count[0])]

    def pending(self) -> int:
        return len(self.waiting) + sum(g.count for g in self.gpus)
