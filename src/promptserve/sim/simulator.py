"""A discrete-event simulator: a heap of (time, order, seq, event) and a handful of handlers.

It drives the policy core (planner, router, admission, dispatcher) with a virtual clock and
models each worker by the profile's batch latency. K_opt comes from the real cache index and
real embeddings as the cache grows: a request looks up its tenant's nearest entry when it
arrives, and a served prompt is inserted when its batch finishes (an exact repeat only counts
a hit). A served entry keeps latents at every cache level (levels at or below the K it ran at
alias its neighbour's), so any request with a neighbour can run at any level.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from promptserve.cache.index import CacheIndex
from promptserve.cache.thresholds import Thresholds
from promptserve.policy import (
    Demand,
    Dispatcher,
    Outcome,
    Plan,
    Policy,
    Setting,
    Status,
    intake,
)
from promptserve.policy.planning import (
    apply_levels,
    first_demand,
    switch_s,
    wants_plan,
    worth_caching,
)
from promptserve.policy.types import Dispatch
from promptserve.quality import QualityModel
from promptserve.sim.records import Records
from promptserve.types import Request

ARRIVAL, DONE, REPLAN, WAKE = 1, 0, 2, 3  # at equal times: finish work, then arrivals, then plans


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


@dataclass
class SimResult:
    policy: str
    records: Records
    planner_ms: list[float]
    plans: list[tuple[float, Plan]]


def initial_demand(requests: Sequence[Request], levels: tuple[int, ...]) -> Demand:
    """Every policy starts planned for the first minute's arrival rate (mix: all misses): the
    operator's forecast, as ``expected_qpm`` is the server's."""
    first = [r for r in requests if r.arrival_s < requests[0].arrival_s + 60.0]
    return first_demand(float(len(first)), levels)


def simulate(
    policy: Policy, inputs: SimInputs, on_progress: Callable[[int], None] | None = None
) -> SimResult:
    if policy.step:  # step-level serving: no GPU has a level
        from promptserve.sim.stepsim import StepRun

        return StepRun(policy, inputs, on_progress).run()
    return _Run(policy, inputs, on_progress).run()


class _Run:
    def __init__(
        self, policy: Policy, inputs: SimInputs, on_progress: Callable[[int], None] | None
    ) -> None:
        self.policy, self.inputs, self.on_progress = policy, inputs, on_progress
        profiles = inputs.setting.profiles
        self.levels = profiles[0].levels
        self.dispatcher = Dispatcher.create(profiles, policy.dispatch)
        self.estimator = policy.estimator(self.levels, inputs.setting.slo_s)
        self.rng = np.random.default_rng(inputs.seed)
        self.index = CacheIndex(dim=inputs.embeddings.shape[1], total_steps=profiles[0].total_steps)
        self.cache_levels = tuple(k for k in self.levels if k > 0)
        reqs = inputs.requests
        self.records = Records.empty(
            np.array([r.arrival_s for r in reqs]), np.array([r.deadline_s for r in reqs])
        )
        self.match: dict[int, tuple[int, float]] = {}
        self.heap: list[tuple[float, int, int, object]] = []
        self.seq = 0
        self.planner_ms: list[float] = []
        self.plans: list[tuple[float, Plan]] = []
        self.plan: Plan | None = None
        self.planned_for: Demand | None = None
        self.prefetched: dict[
            int, tuple[int, float, int]
        ] = {}  # request -> (index version, similarity, entry)
        self.done = 0
        self.switch_s = switch_s(policy, profiles[0])

    def push(self, t: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, payload))

    def run(self) -> SimResult:
        reqs = self.inputs.requests
        self._warm()
        start = reqs[0].arrival_s if reqs else 0.0
        self._apply_plan(start, initial_demand(reqs, self.levels) if reqs else Demand(0.0, (1.0,)))
        for i, r in enumerate(reqs):
            self.push(r.arrival_s, ARRIVAL, i)
        if self.policy.replan_s:
            self.push(start + self.policy.replan_s + self.inputs.replan_phase_s, REPLAN, None)
        self.start = start
        while self.heap:
            now, kind, _, payload = heapq.heappop(self.heap)
            if kind == ARRIVAL:
                self._arrive(now, payload)  # type: ignore[arg-type]
            elif kind == DONE:
                self._finish(now, payload)  # type: ignore[arg-type]
            elif (
                kind == REPLAN
                and self.done < len(reqs)
                and (self.heap or self.dispatcher.pending())
            ):
                self._apply_plan(now, self.estimator.estimate(now, self.start))
                self.push(now + self.policy.replan_s, REPLAN, None)  # type: ignore[operator]
            self._step(now)
        self._check_conservation()
        return SimResult(self.policy.name, self.records, self.planner_ms, self.plans)

    def _check_conservation(self) -> None:
        """Every request ends exactly once: a job left queued or running when no event is left
        is a policy defect, reported here rather than counted as a silent ``lost``."""
        pending = self.dispatcher.pending()
        running = sum(1 for g in self.dispatcher.gpus if g.running is not None)
        unended = int((self.records.status < Status.SERVED).sum())
        if pending or running or unended:
            raise RuntimeError(
                f"policy {self.policy.name!r} left {unended} requests unended "
                f"({pending} queued, {running} batches running) when the run ran out of events"
            )

    def _warm(self) -> None:
        emb = self.inputs.warm_embeddings
        tenant = self.inputs.requests[0].tenant if self.inputs.requests else "default"
        for prompt, vec in zip(
            self.inputs.warm_prompts, emb if emb is not None else [], strict=False
        ):
            self.index.insert(tenant, prompt, vec, self.cache_levels, now_s=0.0)

    def _apply_plan(self, now: float, demand: Demand) -> None:
        if not wants_plan(self.policy, self.planned_for, demand, force=False):
            return  # the same demand gives the same plan
        self.planned_for = demand
        current = [g.level for g in self.dispatcher.gpus]
        t0 = time.perf_counter()
        plan = self.policy.plan(demand, self.inputs.setting, current)
        self.planner_ms.append((time.perf_counter() - t0) * 1e3)
        self.plan = plan
        self.plans.append((now, plan))
        for ready_at in apply_levels(self.dispatcher, now, plan.gpu_levels, self.switch_s):
            self.push(ready_at, WAKE, None)

    def _classify(self, i: int) -> tuple[int, bool]:
        """Request i's K_opt from its tenant's nearest cached entry, and whether it has one."""
        similarity, entry_id = self._lookup(i)
        k_opt = self.inputs.thresholds.k_opt(similarity if entry_id >= 0 else None)
        if entry_id >= 0:
            self.match[i] = (entry_id, similarity)
        self.records.k_opt[i] = k_opt
        return k_opt, entry_id >= 0

    def _arrive(self, now: float, i: int) -> None:
        k_opt, has_neighbour = self._classify(i)
        assert self.plan is not None
        job, queued = intake(
            i,
            now,
            self.inputs.requests[i].deadline_s,
            k_opt,
            has_neighbour,
            self.plan,
            self.dispatcher,
            self.estimator,
            self.policy.admission,
            float(self.rng.random()),
        )
        if not queued:
            self._end(Outcome(job, Status.REFUSED, now))

    def _lookup(self, i: int) -> tuple[float, int]:
        """Nearest cached entry of request i's tenant: (similarity, entry id or -1).

        The index only changes when a batch finishes, so the arrivals before the next finish
        are looked up together in one call; a finish in between (the index version moved)
        makes the next arrival look up again.
        """
        done = self.prefetched.pop(i, None)
        if done is not None and done[0] == self.index.version:
            return done[1], done[2]
        reqs = self.inputs.requests
        next_finish = min(
            (g.busy_until for g in self.dispatcher.gpus if g.running), default=float("inf")
        )
        ids = [i]
        j = i + 1
        while (
            j < len(reqs)
            and len(ids) < 256
            and reqs[j].arrival_s < next_finish
            and reqs[j].tenant == reqs[i].tenant
        ):
            ids.append(j)
            j += 1
        sims, entries = self.index.nearest_many(reqs[i].tenant, self.inputs.embeddings[ids])
        version = self.index.version
        for k, sim, entry in zip(ids[1:], sims[1:], entries[1:], strict=True):
            self.prefetched[k] = (version, float(sim), int(entry))
        return float(sims[0]), int(entries[0])

    def _finish(self, now: float, dispatch: Dispatch) -> None:
        for outcome in self.dispatcher.on_batch_done(now, dispatch):
            self._served(now, outcome)

    def _served(self, now: float, outcome: Outcome) -> None:
        """A request answered: its record, its neighbour's hit, its own cache entry."""
        self._end(outcome)
        i = outcome.job.id
        entry_id, sim = self.match.get(i, (-1, 0.0))
        if entry_id >= 0 and outcome.level > 0:
            self.index.record_hit(entry_id, outcome.level, now)
        if worth_caching(sim if entry_id >= 0 else None):
            req = self.inputs.requests[i]
            self.index.insert(
                req.tenant, req.prompt, self.inputs.embeddings[i], self.cache_levels, now
            )

    def _step(self, now: float) -> None:
        dispatches, outcomes = self.dispatcher.step(now)
        for d in dispatches:
            self.push(d.end_s, DONE, d)
        for o in outcomes:
            self._end(o)

    def _end(self, outcome: Outcome) -> None:
        i = outcome.job.id
        rec = self.records
        assert rec.status[i] == Status.QUEUED, f"request {i} ended twice"
        rec.status[i] = int(outcome.status)
        if outcome.status == Status.SERVED:
            rec.finish_s[i] = outcome.time_s
            rec.level[i] = outcome.level
            rec.quality[i] = self.inputs.quality.q(outcome.job.k_opt, outcome.level)
        self.done += 1
        if self.on_progress is not None:
            self.on_progress(1)
