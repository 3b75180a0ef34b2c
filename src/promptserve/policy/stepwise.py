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
  the cluster is saturated now (requests wait, or even the least-loaded GPU holds more members
  than a full run can share a GPU with inside the SLO) a request joins at its fastest level;
* **admission** (``+admit``): refuse at arrival when no K the request may run at can finish by
  its deadline on the least-loaded GPU;
* **shedding** (``+shed``): waiting requests are taken earliest deadline first, a join that
  would make a member late is not made, and a request that cannot finish even alone on an
  idle GPU is dropped. Without it (as published for step-wise batching): first come, first
  served up to a fixed in-flight cap, late work runs late, and a request whose deadline has
  passed before it joins is dropped.

The finish-time model: ``n`` members make an iteration of ``step_s(n)`` seconds; a member with
``r`` steps left, on a GPU where the members with fewer steps leave on the way, finishes after
the sum of those segments (``finishes``). Later joins are checked against every member's
deadline, so they cannot break the promise either.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from promptserve.policy.types import Demand, Job, Outcome, Status
from promptserve.profile import Profile

KRule = Literal["price", "zero", "max"]
# the share of the estimated step capacity the price plans to fill: above 1, because the
# estimate is a full run's in-flight limit and a burst it misjudges is caught by ``saturated``
# (Poisson 2 GPUs, mild, 3 seeds: 1.0 / 1.1 / 1.25 gave 94.8 / 95.2 / 95.5 at 60 qpm and
# 87.2 / 87.1 / 85.4 at 100)
UTILISATION = 1.1
SLO_SHARE = 0.9  # of the SLO, what running may take (the rest: waiting to join)
PRICE_MAX = 50.0  # points per step: above any quality difference, every request at its fastest
EPS = 1e-9
PULL_LOOKAHEAD = 8  # waiting jobs a boundary looks at past ones that do not fit


@dataclass(frozen=True)
class StepProfile:
    """Per-step latency against in-flight count, and the fixed costs of a request."""

    total_steps: int
    levels: tuple[int, ...]
    step_s: tuple[float, ...]  # [n - 1]: seconds of one denoiser step with n members
    join_s: float = 0.0  # per request joining (text encoding), added to its first step
    leave_s: float = 0.0  # per request leaving (VAE decode), added after its last step

    @property
    def max_inflight(self) -> int:
        return len(self.step_s)

    def iteration_s(self, n: int) -> float:
        return self.step_s[min(max(n, 1), len(self.step_s)) - 1]

    def steps_per_s(self, n: int) -> float:
        return n / self.iteration_s(n)


def step_profile(profile: Profile) -> StepProfile:
    """What ``promptserve profile`` measured (step latency per in-flight count, linear between
    the counts measured; encode at join, decode at leave), or, for a profile of batch latencies
    only, the equivalent derived from them (``derived_step_profile``)."""
    if not profile.step_latency_s:
        return derived_step_profile(profile)
    counts, measured = profile.step_inflight, profile.step_latency_s
    steps = []
    for n in range(1, counts[-1] + 1):
        j = bisect.bisect_left(counts, n)
        if counts[j] == n:
            steps.append(measured[j])
        else:
            n0, n1 = counts[j - 1], counts[j]
            steps.append(measured[j - 1] + (measured[j] - measured[j - 1]) * (n - n0) / (n1 - n0))
    return StepProfile(
        profile.total_steps, profile.levels, tuple(steps), profile.encode_s, profile.decode_s
    )


def derived_step_profile(profile: Profile) -> StepProfile:
    """The step-level equivalent of a batch profile: a batch of b at level K runs N - K steps of
    b members, so ``step(b) = (L(0, b) - L(K_max, b)) / K_max`` and what is left of L(0, b)
    after N steps is the batch's fixed cost, shared by its b requests (half at join for the
    text encoders, half at leave for the VAE). For the SDXL reference this gives 84 ms x
    (1 + 0.55 (b - 1)) per step and no fixed cost: its throughputs are 60 / (0.084 (50 - K))
    and its batch curve is affine (``profile.py``)."""
    k_max, n = profile.levels[-1], profile.total_steps
    steps, fixed = [], []
    for b in range(1, profile.max_batch + 1):
        full, fastest = profile.batch_latency(0, b), profile.batch_latency(k_max, b)
        step = (full - fastest) / k_max if k_max > 0 else full / n
        steps.append(step)
        fixed.append(max(full - n * step, 0.0) / b)
    per_request = fixed[0]
    return StepProfile(n, profile.levels, tuple(steps), per_request / 2, per_request / 2)


class _Bucket:
    """GPU indices with one member count; ``first`` is the lowest, in O(log n). Ties between
    equally loaded GPUs go by index, not by the order of past joins and leaves, so both clocks
    (one boundary per step live, one per event simulated) place a request on the same GPU."""

    def __init__(self) -> None:
        self.members: set[int] = set()
        self.heap: list[int] = []
        self.queued: set[int] = set()  # in ``heap``, maybe no longer a member

    def __bool__(self) -> bool:
        return bool(self.members)

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


@dataclass(frozen=True)
class StepConfig:
    rule: KRule  # price: promptserve-step; zero: continuous-ha; max: continuous-ht
    shed: bool  # EDF, deadline-checked joins, drop what cannot finish
    admission: bool  # refuse at arrival what cannot finish
    cap: int = 8  # in-flight cap without shed (with shed, the deadlines set it)


@dataclass(slots=True)
class Member:
    job: Job
    k: int
    end_step: int  # the GPU's step count when it leaves


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

    @property
    def count(self) -> int:
        return len(self.by_id) + len(self.joining)

    def next_boundary(self, now: float) -> float:
        """When it can next take a member: now if idle, else the end of the running step."""
        if not self.by_id or self.seg_iter_s <= 0 or now <= self.seg_start:
            return max(now, self.seg_start)
        done = math.ceil((now - self.seg_start) / self.seg_iter_s - EPS)
        return self.seg_start + done * self.seg_iter_s

    def done_at(self, at: float) -> int:
        """Its step count at boundary ``at`` of the running segment (the boundaries in between
        are not held, so ``done`` counts only to the segment's start)."""
        if not self.by_id or self.seg_iter_s <= 0 or at <= self.seg_start:
            return self.done
        return self.done + round((at - self.seg_start) / self.seg_iter_s)

    def steps_to_next_leave(self) -> int:
        return self.members[0][0] - self.done if self.members else 0


def _draw(job_id: int) -> float:
    """A uniform number in [0, 1) fixed by the job id (Knuth's multiplicative hash): the same
    request draws the same on both clocks."""
    return ((job_id * 2654435761) % 2**32) / 2**32


def finishes(
    profile: StepProfile, start: float, remaining: Sequence[int], joined: int = 0
) -> list[float]:
    """Finish times (answers) of members with ``remaining`` steps (ascending) from ``start``,
    if nobody else joins: each segment runs at the step time of the members still in, and the
    members that finish at one step are decoded together before the next step starts."""
    n, t, prev, out = len(remaining), start + joined * profile.join_s, 0, []
    i = 0
    while i < n:
        r, j = remaining[i], i
        while j < n and remaining[j] == r:
            j += 1
        t += (r - prev) * profile.iteration_s(n - i) + (j - i) * profile.leave_s
        out.extend([t] * (j - i))
        prev, i = r, j
    return out


class StepScheduler:
    """The step-level policy over ``n_gpus`` GPUs. Drivers call ``arrive``, ``boundary`` (after
    each run of steps) and ``reprice`` (on the re-plan period), and run what they return."""

    def __init__(
        self,
        profile: StepProfile,
        n_gpus: int,
        quality: np.ndarray,
        config: StepConfig,
    ) -> None:
        self.profile, self.config = profile, config
        self.quality = np.asarray(quality, dtype=float)  # q[K_opt index, K index]
        self.levels = profile.levels
        self.index_of = {k: i for i, k in enumerate(self.levels)}
        self.gpus = [StepGpu(i) for i in range(n_gpus)]
        self.cap = profile.max_inflight if config.shed else min(config.cap, profile.max_inflight)
        self.by_count = [_Bucket() for _ in range(profile.max_inflight + 2)]
        for g in range(n_gpus):
            self.by_count[0].add(g)
        self.waiting: list[tuple[float, int, Job]] = []  # (deadline or arrival, id, job)
        self.price = 0.0
        self._busy_at = self.cap  # members past which a GPU is full (set with the price)
        self._choice = self._choice_lo = self._choices(0.0)
        self._split = 0.0  # share of the moving class that takes the cheaper level

    # -- pricing ---------------------------------------------------------------------------

    def _choices(self, price: float) -> list[list[int]]:
        """Per K_opt index and per k_max index: the level the price picks."""
        steps = np.array([self.profile.total_steps - k for k in self.levels], dtype=float)
        out = []
        for i in range(len(self.levels)):
            score = self.quality[i] - price * steps
            out.append([int(np.argmax(score[: j + 1])) for j in range(len(self.levels))])
        return out

    def reprice(self, demand: Demand, slo_s: float) -> float:
        """The price at which the step work asked for fits the step capacity; 0 with slack.

        The work asked for falls with the price in steps (a whole K_opt class moves at once),
        so at the price found the class that moves is split: a share ``split`` of its
        requests (drawn per request, deterministically) takes the cheaper level, so that the
        work matches the capacity instead of undershooting it."""
        if self.config.rule != "price":
            return self.price
        per_s = demand.rate_qpm / 60.0
        self._busy_at = self.inflight_within(self.profile.total_steps, slo_s)
        last = len(self.levels) - 1

        def work(choice: list[list[int]]) -> tuple[float, float]:
            steps = 0.0
            for i, share in enumerate(demand.mix):
                j = choice[i][last if i > 0 else 0]  # a miss (K_opt 0) may have no neighbour
                steps += share * (self.profile.total_steps - self.levels[j])
            return per_s * steps, self.steps_capacity(slo_s, steps)

        def over(price: float, share: float = UTILISATION) -> bool:
            asked, capacity = work(self._choices(price))
            return asked > share * capacity

        self._split = 0.0
        if not over(0.0):
            lo = hi = 0.0
        elif over(PRICE_MAX, 1.0):  # more than the cluster can do even at the fastest levels
            lo = hi = PRICE_MAX
        else:
            lo, hi = 0.0, PRICE_MAX
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if over(mid) else (lo, mid)
            (w_lo, cap), (w_hi, _) = work(self._choices(lo)), work(self._choices(hi))
            if w_lo > w_hi:
                self._split = min(max((w_lo - UTILISATION * cap) / (w_lo - w_hi), 0.0), 1.0)
        self.price = hi
        self._choice, self._choice_lo = self._choices(hi), self._choices(lo)
        return hi

    def steps_capacity(self, slo_s: float, mean_steps: float | None = None) -> float:
        """Steps per second the up GPUs give at the largest in-flight count at which a request
        of ``mean_steps`` (default: a full one) finishes within ``SLO_SHARE`` of the SLO (the
        rest is left for waiting to join)."""
        n = self.inflight_within(mean_steps or self.profile.total_steps, slo_s)
        up = sum(1 for g in self.gpus if g.up)
        return up * self.profile.steps_per_s(n)

    def inflight_within(self, steps: float, slo_s: float) -> int:
        """The largest in-flight count at which ``steps`` steps take at most ``SLO_SHARE`` of
        the SLO (at least 1)."""
        n = 1
        for b in range(1, self.cap + 1):
            if steps * self.profile.iteration_s(b) <= SLO_SHARE * slo_s:
                n = b
        return n

    # -- decisions -------------------------------------------------------------------------

    def preferred_k(self, job: Job) -> int:
        if self.config.rule == "zero":
            return 0
        if self.config.rule == "max":
            return job.k_max
        i, m = self.index_of[job.k_opt], self.index_of[job.k_max]
        if self.saturated():  # the price lags a burst: run at the fastest level meanwhile
            return job.k_max
        j = self._choice[i][m]
        if self._choice_lo[i][m] != j and _draw(job.id) >= self._split:
            j = self._choice_lo[i][m]
        return self.levels[j]

    def saturated(self) -> bool:
        """Whether the cluster is full now: requests wait, or even the least-loaded GPU holds
        more members than a full run could share a GPU with and finish in ``SLO_SHARE`` of the
        SLO. The price follows the load estimate (seconds behind a burst); this follows the
        running batches, so a burst moves joins to their fastest level within one step."""
        if self.waiting:
            return True
        gpu = self.least_loaded()
        return gpu is None or gpu.count > self._busy_at

    def least_loaded(self) -> StepGpu | None:
        for bucket in self.by_count:
            if bucket:
                return self.gpus[bucket.first()]
        return None

    def _recount(self, gpu: StepGpu, before: int) -> None:
        after = min(gpu.count, len(self.by_count) - 1)
        if before != after:
            self.by_count[min(before, len(self.by_count) - 1)].discard(gpu.index)
            if gpu.up:
                self.by_count[after].add(gpu.index)

    def fits(
        self, gpu: StepGpu, job: Job, k: int, at: float, extra_joins: int = 0, done: int = -1
    ) -> bool:
        """Whether ``job`` joining ``gpu`` at ``at`` with level K keeps every member of it
        (itself included) within its deadline, or no later than it would be anyway. ``done``:
        the GPU's step count at ``at`` (default: now, at a boundary)."""
        r_new = self.profile.total_steps - k
        done = gpu.done if done < 0 else done
        rem = [end - done for end, _, _ in gpu.members]
        deadlines = [d for _, d, _ in gpu.members]
        pos = bisect.bisect_right(rem, r_new)
        with_new = rem[:pos] + [r_new] + rem[pos:]
        after = finishes(self.profile, at, with_new, joined=1 + extra_joins)
        if after[pos] > job.deadline_s + EPS:
            return False
        if not rem:
            return True
        before = finishes(self.profile, at, rem, joined=extra_joins)
        for i, d in enumerate(deadlines):
            f = after[i if i < pos else i + 1]
            if f > d + EPS and f > before[i] + EPS:
                return False
        return True

    def fastest_k(self, job: Job) -> int:
        """The fastest level the rule lets ``job`` run at."""
        return 0 if self.config.rule == "zero" else job.k_max

    def can_ever_finish(self, job: Job, now: float) -> bool:
        """Alone on an idle GPU from now, at the fastest level the rule allows it."""
        r = self.profile.total_steps - self.fastest_k(job)
        return finishes(self.profile, now, [r], joined=1)[0] <= job.deadline_s + EPS

    def choose_k(
        self, gpu: StepGpu, job: Job, at: float, extra_joins: int = 0, done: int = -1
    ) -> int | None:
        """The level ``job`` joins ``gpu`` at, or None when no allowed level keeps the
        deadlines (only under ``+shed``; without it the preferred level always joins)."""
        k = self.preferred_k(job)
        if not self.config.shed:
            return k
        allowed = [lv for lv in self.levels if k <= lv <= job.k_max]
        if self.config.rule != "price":
            allowed = allowed[:1]
        for level in allowed:
            if self.fits(gpu, job, level, at, extra_joins, done):
                return level
        return None

    def arrive(self, now: float, job: Job) -> tuple[StepGpu | None, Outcome | None]:
        """Place an arriving job: the GPU it will join at that GPU's next boundary (the driver
        runs that boundary), or None when it waits; an outcome when it is refused."""
        gpu = self.least_loaded()
        if self.config.admission and not self._admissible(gpu, job, now):
            return None, Outcome(job, Status.REFUSED, now)
        if self.config.shed and not self.can_ever_finish(job, now):
            return None, Outcome(job, Status.DROPPED, now)
        if gpu is not None and gpu.count < self.cap:
            at = gpu.next_boundary(now)
            done = gpu.done_at(at)
            if self.choose_k(gpu, job, at, len(gpu.joining), done) is not None:
                before = gpu.count
                gpu.joining.append(job)
                self._recount(gpu, before)
                return gpu, None
        heapq.heappush(self.waiting, (self._key(job), job.id, job))
        return None, None

    def _key(self, job: Job) -> float:
        return job.deadline_s if self.config.shed else job.arrival_s

    def _admissible(self, gpu: StepGpu | None, job: Job, now: float) -> bool:
        if gpu is None:
            return False
        at = gpu.next_boundary(now)
        done = gpu.done_at(at)
        r = self.profile.total_steps - self.fastest_k(job)
        rem = sorted([end - done for end, _, _ in gpu.members] + [r])
        mine = rem.index(r)
        return finishes(self.profile, at, rem, joined=1)[mine] <= job.deadline_s + EPS

    def boundary(
        self, gpu: StepGpu, now: float, steps: int
    ) -> tuple[list[Outcome], list[Member], list[Outcome]]:
        """``gpu`` has run ``steps`` more steps and stands at a boundary at ``now``: who leaves
        (served), who joins (with their K), who is dropped from the waiting queue."""
        before = gpu.count
        gpu.done += steps
        leaving: list[Member] = []
        while gpu.members and gpu.members[0][0] <= gpu.done:
            _, _, jid = gpu.members.pop(0)
            leaving.append(gpu.by_id.pop(jid))
        self._recount(gpu, before)  # as the live runtime's removals do, before anyone joins
        before = gpu.count
        # the leavers are decoded together before anyone hears, and before anyone joins (the
        # live runtime's step call returns after the decode): both happen after it
        now += len(leaving) * self.profile.leave_s
        left = [Outcome(m.job, Status.SERVED, now, m.k) for m in leaving]
        joined: list[Member] = []
        dropped: list[Outcome] = []
        placed, gpu.joining = gpu.joining, []
        for job in placed:
            self._join(gpu, job, now, joined, dropped)
        if gpu.up:  # a lost GPU finishes what it reports, and takes no one new
            self._pull_waiting(gpu, now, joined, dropped)
        self._recount(gpu, before)
        self._start_segment(gpu, now, len(joined))
        return left, joined, dropped

    def _join(self, gpu, job, now, joined, dropped) -> bool:
        """Join ``job`` to ``gpu`` now if a level fits; a job that cannot finish even alone is
        dropped, one that does not fit here waits (False either way)."""
        k = self.choose_k(gpu, job, now)
        if k is None:
            if self.config.shed and not self.can_ever_finish(job, now):
                dropped.append(Outcome(job, Status.DROPPED, now))
            else:
                heapq.heappush(self.waiting, (self._key(job), job.id, job))
            return False
        self._admit_member(gpu, job, k, joined)
        return True

    def _admit_member(self, gpu: StepGpu, job: Job, k: int, joined: list[Member]) -> None:
        member = Member(job, k, gpu.done + self.profile.total_steps - k)
        gpu.by_id[job.id] = member
        bisect.insort(gpu.members, (member.end_step, job.deadline_s, job.id))
        joined.append(member)

    def _pull_waiting(self, gpu, now, joined, dropped) -> None:
        """Take waiting jobs while they fit. Under shed: earliest deadline first, looking past
        a head that does not fit here (no head-of-line blocking), and dropping a job that could
        no longer finish even on the least-loaded GPU; else first come first served up to the
        cap, dropping a job whose deadline has passed."""
        if not self.config.shed:
            while self.waiting and len(gpu.by_id) < self.cap:
                _, _, job = heapq.heappop(self.waiting)
                if job.deadline_s <= now:
                    dropped.append(Outcome(job, Status.DROPPED, now))
                else:
                    self._join(gpu, job, now, joined, dropped)
            return
        skipped: list[tuple[float, int, Job]] = []
        while self.waiting and len(gpu.by_id) < self.cap and len(skipped) < PULL_LOOKAHEAD:
            entry = heapq.heappop(self.waiting)
            job = entry[2]
            if not self._reachable(job, now):
                dropped.append(Outcome(job, Status.DROPPED, now))
                continue
            k = self.choose_k(gpu, job, now)
            if k is None:
                skipped.append(entry)
                continue
            self._admit_member(gpu, job, k, joined)
        for entry in skipped:
            heapq.heappush(self.waiting, entry)

    def _reachable(self, job: Job, now: float) -> bool:
        """Whether ``job`` could still finish joining the least-loaded GPU now at its fastest
        level (ignoring the others' deadlines): a waiting job past this is dropped."""
        least = self.least_loaded()
        n = 1 + (len(least.by_id) if least is not None else 0)
        r = self.profile.total_steps - self.fastest_k(job)
        t = now + self.profile.join_s + r * self.profile.iteration_s(n) + self.profile.leave_s
        return t <= job.deadline_s + EPS

    def _start_segment(self, gpu: StepGpu, now: float, joined: int) -> None:
        n = len(gpu.by_id)
        gpu.seg_start = now + joined * self.profile.join_s
        gpu.seg_iter_s = self.profile.iteration_s(n) if n else 0.0

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
                gpu.members = [e for e in gpu.members if e[2] != job_id]
                self._recount(gpu, before)
                return member.job
        return None

    def set_up(self, gpu_index: int, up: bool) -> list[Job]:
        """A GPU lost or back. Down, it takes no one, leaves the step capacity the price is set
        for (``steps_capacity``), and hands back the jobs it held, members and joiners, for the
        driver to place again (their progress went with it)."""
        gpu = self.gpus[gpu_index]
        if gpu.up == up:
            return []
        bucket = self.by_count[min(gpu.count, len(self.by_count) - 1)]
        gpu.up = up
        if up:
            bucket.add(gpu.index)
            return []
        bucket.discard(gpu.index)
        held = sorted((m.job for m in gpu.by_id.values()), key=lambda j: j.id) + gpu.joining
        gpu.by_id, gpu.members, gpu.joining = {}, [], []
        gpu.seg_iter_s = 0.0
        return held

    def restart(self, gpu: StepGpu, job_id: int, k: int) -> None:
        """A member that could not start at its K (its cached latent was gone) runs from K."""
        member = gpu.by_id[job_id]
        gpu.members.remove((member.end_step, member.job.deadline_s, job_id))
        member.k, member.end_step = k, gpu.done + self.profile.total_steps - k
        bisect.insort(gpu.members, (member.end_step, member.job.deadline_s, job_id))

    def idle_while_waiting(self) -> list[StepGpu]:
        """GPUs with nothing to run while requests wait: the driver runs a boundary on each
        now (it pulls from the queue)."""
        if not self.waiting:
            return []
        return [self.gpus[i] for i in sorted(self.by_count[0])]

    def pending(self) -> int:
        return len(self.waiting) + sum(g.count for g in self.gpus)
