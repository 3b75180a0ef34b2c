"""The simulator's step-level workers: the same heap of events, driving ``StepScheduler``.

A GPU runs steps in segments of equal step time; it stops only where something happens on it
(a member leaves, a placed request joins), so a run of steps with nobody joining or leaving
is one event, not one per step. An arrival placed on a GPU cuts that GPU's segment at its
next step boundary. K_opt and the cache index evolve exactly as for pinned GPUs
(``simulator.py``): lookups at arrival, inserts when a request leaves.
"""

from __future__ import annotations

import heapq
import math
import time

from promptserve.policy import Status
from promptserve.policy.intake import step_intake
from promptserve.policy.stepwise import EPS, StepConfig, StepGpu, StepScheduler, step_profile
from promptserve.sim.simulator import ARRIVAL, DONE, REPLAN, SimResult, _Run, initial_demand


def step_config(policy) -> StepConfig:  # noqa: ANN001 - a Policy with ``step`` set
    return StepConfig(
        rule=policy.step,
        shed=policy.dispatch.late == "escalate",
        admission=policy.admission,
        cap=policy.dispatch.max_batch,
    )


class StepRun(_Run):
    def __init__(self, policy, inputs, on_progress) -> None:  # noqa: ANN001 - as _Run
        super().__init__(policy, inputs, on_progress)
        setting = inputs.setting
        self.sched = StepScheduler(
            step_profile(setting.profiles[0]),
            len(setting.profiles),
            setting.quality,
            step_config(policy),
        )
        self.version = [0] * len(setting.profiles)
        self.next_at = [math.inf] * len(setting.profiles)
        self.last_at = [-math.inf] * len(setting.profiles)  # its last boundary
        self.prices: list[tuple[float, float]] = []

    def run(self) -> SimResult:
        reqs = self.inputs.requests
        self._warm()
        start = reqs[0].arrival_s if reqs else 0.0
        self.start = start
        if reqs:
            self._reprice(start, initial_demand(reqs, self.levels))
        for i, r in enumerate(reqs):
            self.push(r.arrival_s, ARRIVAL, i)
        if self.policy.replan_s:
            self.push(start + self.policy.replan_s + self.inputs.replan_phase_s, REPLAN, None)
        while self.heap:
            now, kind, _, payload = heapq.heappop(self.heap)
            if kind == ARRIVAL:
                self._arrive_step(now, payload)
            elif kind == DONE:
                g, version, steps = payload
                if version == self.version[g]:
                    self._boundary(now, self.sched.gpus[g], steps)
            elif kind == REPLAN and self.done < len(reqs):
                self._reprice(now, self.estimator.estimate(now, self.start))
                self.push(now + self.policy.replan_s, REPLAN, None)
            for gpu in self.sched.idle_while_waiting():  # once per GPU and instant
                if self.next_at[gpu.index] > now and self.last_at[gpu.index] < now:
                    self._schedule(gpu, now, 0)
        self._check_step_conservation()
        return SimResult(self.policy.name, self.records, self.planner_ms, self.plans)

    def _reprice(self, now: float, demand) -> None:  # noqa: ANN001
        t0 = time.perf_counter()
        price = self.sched.reprice(demand, self.inputs.setting.slo_s)
        self.planner_ms.append((time.perf_counter() - t0) * 1e3)
        self.prices.append((now, price))

    def _arrive_step(self, now: float, i: int) -> None:
        k_opt, has_neighbour = self._classify(i)
        deadline = self.inputs.requests[i].deadline_s
        _, gpu, outcome = step_intake(
            i, now, deadline, k_opt, has_neighbour, self.sched, self.estimator
        )
        if outcome is not None:
            self._end(outcome)
        elif gpu is not None:
            self._cut(gpu, now)
        elif self.sched.config.shed:
            # it waits: every running GPU holds a boundary at its next step, where the job may
            # fit (``next_steps``), as the live runtime holds one at every step
            for running in self.sched.gpus:
                if running.by_id:
                    self._cut(running, now)

    def _cut(self, gpu: StepGpu, now: float) -> None:
        """Stop ``gpu`` at its next step boundary (a request waits to join it there)."""
        at = gpu.next_boundary(now)
        if self.next_at[gpu.index] <= at + EPS:
            return  # it stops there or sooner anyway
        steps = 0
        if gpu.by_id and gpu.seg_iter_s > 0:
            steps = max(round((at - gpu.seg_start) / gpu.seg_iter_s), 0)
        self._schedule(gpu, at, steps)

    def _schedule(self, gpu: StepGpu, at: float, steps: int) -> None:
        self.version[gpu.index] += 1
        self.next_at[gpu.index] = at
        self.push(at, DONE, (gpu.index, self.version[gpu.index], steps))

    def _boundary(self, now: float, gpu: StepGpu, steps: int) -> None:
        self.next_at[gpu.index] = math.inf
        self.last_at[gpu.index] = now
        left, _joined, dropped = self.sched.boundary(gpu, now, steps)
        for outcome in left:
            self._served(now, outcome)
        for outcome in dropped:
            self._end(outcome)
        m = self.sched.next_steps(gpu)
        if m > 0:
            self._schedule(gpu, gpu.seg_start + m * gpu.seg_iter_s, m)

    def _check_step_conservation(self) -> None:
        unended = int((self.records.status < Status.SERVED).sum())
        if unended or self.sched.pending():
            raise RuntimeError(
                f"policy {self.policy.name!r} left {unended} requests unended "
                f"({self.sched.pending()} waiting or in flight) when the run ran out of events"
            )
