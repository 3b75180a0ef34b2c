"""The simulator's clock: one heap of (time, order, seq, event), one loop, one conservation check.

The loop is the same for both policy families: the scheduler's contract (``policy.contract``)
says what work starts and when it ends, whether a batch on a GPU at a level or a run of steps
between two boundaries (a run with nobody joining or leaving is one event, not one per step). K_opt comes from the real cache index and real embeddings
as the cache grows: a request looks up its tenant's nearest entry when it arrives, and a served
prompt is inserted when it leaves (an exact repeat only counts a hit). A served entry keeps
latents at every cache level (levels at or below the K it ran at alias its neighbour's), so any
request with a neighbour can run at any level.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from promptserve.cache.index import CacheIndex
from promptserve.cache.thresholds import Thresholds
from promptserve.policy import Demand, Outcome, Plan, Policy, Setting, Status
from promptserve.policy.contract import Ask, Scheduler, Work, ran, served_by
from promptserve.policy.planning import first_demand, worth_caching
from promptserve.policy.selector import Choice, Selector, candidates, outcome_quality
from promptserve.policy.shards import ShardedSteps
from promptserve.policy.step import StepScheduler
from promptserve.quality import QualityModel
from promptserve.sim.lookups import Lookups
from promptserve.sim.records import Records
from promptserve.strength import start_step
from promptserve.types import Request

ARRIVAL, DONE, REPLAN, WAKE = 1, 0, 2, 3  # at equal times: finish work, then arrivals, then plans
# read once: compiled (``promptserve.native``), an enum member read per event goes through the
# enum class's ``__getattr__``
SERVED, QUEUED = Status.SERVED, Status.QUEUED


@dataclass(frozen=True)
class SimInputs:
    requests: Sequence[Request]
    embeddings: np.ndarray  # one row per request
    setting: Setting
    quality: QualityModel
    thresholds: Thresholds
    seed: int = 0
    warm_prompts: Sequence[str] = ()
    warm_embeddings: np.ndarray | None = None
    # the re-plan grid's offset from the first arrival's: a live server's grid is the same up
    # to its loops' timing (tens of ms), to which a periodic plan can be sensitive
    replan_phase_s: float = 0.0
    family: str = "unet"  # how an edit's strength turns into its start step (``strength``)


@dataclass
class SimResult:
    policy: str
    records: Records
    planner_ms: list[float]
    plans: list[tuple[float, Plan]]  # pinned: each plan made, with its time
    prices: list[tuple[float, float]] = field(default_factory=list)  # step-level: each price
    choices: list[Choice] = field(default_factory=list)  # ``+select``: each selection
    selector_cpu_s: float = 0.0  # ``+select``: the CPU its selections took (thread time)


def initial_demand(requests: Sequence[Request], levels: tuple[int, ...]) -> Demand:
    """Every policy starts planned for the first minute's arrival rate (mix: all misses): the
    operator's forecast, as ``expected_qpm`` is the server's."""
    first = [r for r in requests if r.arrival_s < requests[0].arrival_s + 60.0]
    return first_demand(float(len(first)), levels)


class EventRun:
    """One simulated run of one policy, over its scheduler (``policy.contract``): arrivals go
    in through ``intake``, every piece of work the scheduler hands out ends at the time it
    carries and is reported through ``update``, re-plans come on the policy's period. The
    latest work handed out for a GPU replaces an earlier one not yet ended (a boundary moved
    earlier), as the contract has it."""

    def __init__(
        self,
        policy: Policy,
        inputs: SimInputs,
        on_progress: Callable[[int], None] | None,
        scheduler: Scheduler | None = None,  # default: the policy's own over the setting
    ) -> None:
        self.policy, self.inputs, self.on_progress = policy, inputs, on_progress
        profiles = inputs.setting.profiles
        self.levels = profiles[0].levels
        self.sched = scheduler or policy.scheduler(inputs.setting, inputs.seed)
        self.estimator = self.sched.estimator
        self.index = CacheIndex(dim=inputs.embeddings.shape[1], total_steps=profiles[0].total_steps)
        self.cache_levels = tuple(k for k in self.levels if k > 0)
        self.profile_steps = profiles[0].total_steps
        reqs = inputs.requests
        self.records = Records.empty(
            np.array([r.arrival_s for r in reqs]), np.array([r.deadline_s for r in reqs])
        )
        self.records.batch = np.array([r.batch for r in reqs], dtype=bool)
        self.match: dict[int, tuple[int, float]] = {}
        self.heap: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.planner_ms: list[float] = []
        self.plans: list[tuple[float, Plan]] = []
        self.prices: list[tuple[float, float]] = []
        self.current: dict[int, Work] = {}  # per GPU: the work it runs now
        self.wakes: set[float] = set()  # the times a WAKE is pushed for
        self.lookups = Lookups(self.index, reqs, inputs.embeddings)
        self.done = 0
        self.start = 0.0
        self.selector: Selector | None = None
        self.selector_cpu_s = 0.0
        if policy.select:
            setting = inputs.setting
            config = cast(StepScheduler, self.sched).config  # ``+select``: step-level only
            self.selector = Selector(
                candidates(config, setting.profiles[0].feature_r_max > 1), self._value
            )
            if isinstance(self.sched, ShardedSteps):  # it replays one shard's traffic
                self.selector.copier = self.sched.copier

    def push(self, t: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, payload))

    def run(self) -> SimResult:
        reqs = self.inputs.requests
        self._warm()
        self.start = reqs[0].arrival_s if reqs else 0.0
        if reqs:  # planned for the first minute's rate, as an operator's forecast
            self._replan(self.start, initial_demand(reqs, self.levels))
        for i, r in enumerate(reqs):
            self.push(r.arrival_s, ARRIVAL, i)
        if self.policy.replan_s:
            self.push(self.start + self.policy.replan_s + self.inputs.replan_phase_s, REPLAN, None)
        while self.heap:
            now, kind, _, payload = heapq.heappop(self.heap)
            if kind == ARRIVAL:
                self._arrive(now, payload)  # type: ignore[arg-type]
            elif kind == DONE:
                self._done(now, payload)  # type: ignore[arg-type]
            elif kind == REPLAN and self.done < len(reqs) and (self.heap or self.sched.pending()):
                if self.selector is not None and self.selector.due(now):
                    period = self.policy.replan_s or 0.0  # set: the selector runs at re-plans
                    t0 = time.thread_time()
                    self._select(now, (now + period, period, self.start))
                    self.selector_cpu_s += time.thread_time() - t0
                self._replan(now, self.estimator.estimate(now, self.start))
                self.push(now + self.policy.replan_s, REPLAN, None)  # type: ignore[operator]
            self._start_work(now)
        self._check_conservation()
        choices = self.selector.history if self.selector is not None else []
        return SimResult(
            self.policy.name, self.records, self.planner_ms, self.plans, self.prices, choices,
            self.selector_cpu_s,
        )  # fmt: skip

    def _arrive(self, now: float, i: int) -> None:
        r = self.inputs.requests[i]
        start = None
        if r.strength is None:
            k_opt, has_neighbour = self._classify(i)
        else:  # an edit: from its own image, no neighbour looked up
            k_opt, has_neighbour = 0, False
            start = start_step(self.profile_steps, r.strength, self.inputs.family)
            self.records.edit[i] = True  # type: ignore[index]
        ask = Ask(
            i, r.deadline_s, k_opt, has_neighbour, r.shape, r.adapters, start=start,
            batch=r.batch,
        )  # fmt: skip
        if self.selector is not None and (
            not isinstance(self.sched, ShardedSteps) or self.sched.in_sample(ask)
        ):
            self.selector.observe(now, ask)
        arrival = self.sched.intake(now, ask)
        if arrival.ended is not None:
            self._end(arrival.ended)

    def _select(self, now: float, replans: tuple[float, float, float]) -> None:
        """``+select``: a selection at a re-plan tick; a sharded scheduler's replays one shard
        and switches them all (``ShardedSteps.sample``)."""
        assert self.selector is not None
        if isinstance(self.sched, ShardedSteps):
            shard, running = self.sched.sample(self.current)
            self.selector.decide(now, shard, running, replans, self.sched)
        else:  # ``+select``: step-level only
            self.selector.decide(now, cast(StepScheduler, self.sched), self.current, replans)

    def _done(self, now: float, work: Work) -> None:
        if self.current.get(work.gpu) is not work:
            return  # a later work replaced it (its GPU's boundary moved)
        del self.current[work.gpu]
        for outcome in self.sched.update(now, work.gpu, ran(work)):
            if outcome.status == SERVED:
                self._served(now, outcome)
            else:
                self._end(outcome)

    def _replan(self, now: float, demand: Demand) -> None:
        t0 = time.perf_counter()
        replan = self.sched.replan(now, demand)
        if replan.plan is None and replan.price is None:
            return  # the same demand gives the same plan
        self.planner_ms.append((time.perf_counter() - t0) * 1e3)
        if replan.plan is not None:
            self.plans.append((now, replan.plan))
        if replan.price is not None:
            self.prices.append((now, replan.price))

    def _start_work(self, now: float) -> None:
        """What the scheduler hands out once an event is handled: work ends at its time."""
        decided = self.sched.schedule(now)
        for outcome in decided.ended:
            self._end(outcome)
        for work in decided.work:
            self.current[work.gpu] = work
            self.push(work.until_s, DONE, work)
        if decided.wake_s < math.inf and decided.wake_s not in self.wakes:
            self.wakes.add(decided.wake_s)
            self.push(decided.wake_s, WAKE, None)

    # shared by both families
    def _check_conservation(self) -> None:
        """Every request ends exactly once: a job left queued or running when no event is left
        is a policy defect, reported here rather than counted as a silent ``lost``."""
        unended = int((self.records.status < Status.SERVED).sum())
        if unended or self.sched.pending():
            raise RuntimeError(
                f"policy {self.policy.name!r} left {unended} requests unended "
                f"({self.sched.pending()} queued, waiting or running) when the run ran out of events"
            )

    def _warm(self) -> None:
        emb = self.inputs.warm_embeddings
        tenant = self.inputs.requests[0].tenant if self.inputs.requests else "default"
        for prompt, vec in zip(
            self.inputs.warm_prompts, emb if emb is not None else [], strict=False
        ):
            self.lookups.insert(tenant, prompt, vec, self.cache_levels, 0.0)

    def _classify(self, i: int) -> tuple[int, bool]:
        """Request i's K_opt from its tenant's nearest cached entry, and whether it has one."""
        similarity, entry_id = self._lookup(i)
        k_opt = self.inputs.thresholds.k_opt(similarity if entry_id >= 0 else None)
        if entry_id >= 0:
            self.match[i] = (entry_id, similarity)
        self.records.k_opt[i] = k_opt
        return k_opt, entry_id >= 0

    def _lookup(self, i: int) -> tuple[float, int]:
        """Nearest cached entry of request i's tenant: (similarity, entry id or -1)."""
        return self.lookups.nearest(i, self._next_finish)

    def _next_finish(self) -> float:
        """When the cache index next changes: the earliest a running work serves anyone."""
        return min((served_by(w) for w in self.current.values()), default=math.inf)

    def _served(self, now: float, outcome: Outcome) -> None:
        """A request answered: its record, its neighbour's hit, its own cache entry."""
        self._end(outcome)
        if outcome.job.start is not None:
            return  # an edit: its image is its own, never a neighbour's or the cache's
        i = outcome.job.id
        entry_id, sim = self.match.get(i, (-1, 0.0))
        if entry_id >= 0 and outcome.level > 0:
            self.index.record_hit(entry_id, outcome.level, now)
        if worth_caching(sim if entry_id >= 0 else None):
            req = self.inputs.requests[i]
            self.lookups.insert(
                req.tenant, req.prompt, self.inputs.embeddings[i], self.cache_levels, now
            )

    def _value(self, outcome: Outcome) -> float:
        """A served outcome's quality, as the records count it."""
        setting = self.inputs.setting
        return outcome_quality(
            self.inputs.quality, setting.interval_q, setting.profiles[0].total_steps, outcome
        )

    def _end(self, outcome: Outcome) -> None:
        i = outcome.job.id
        rec = self.records
        assert rec.status[i] == QUEUED, f"request {i} ended twice"
        rec.status[i] = int(outcome.status)
        if outcome.status == SERVED:
            rec.finish_s[i] = outcome.time_s
            rec.level[i] = outcome.level
            rec.gpu[i] = outcome.gpu
            if rec.interval is not None:
                rec.interval[i] = outcome.interval
            rec.quality[i] = self._value(outcome)
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(1)
