"""The simulator's step-level GPUs: the event loop of ``events.py`` driving ``StepScheduler``.

A GPU runs steps in segments of equal step time; it stops only where something happens on it
(a member leaves, a placed request joins), so a run of steps with nobody joining or leaving
is one event, not one per step. An arrival placed on a GPU cuts that GPU's segment at its
next step boundary. K_opt and the cache index evolve exactly as for pinned GPUs
(``events.py``): lookups at arrival, inserts when a request leaves.
"""

from __future__ import annotations

import math
import time

from promptserve.policy.contract import Arrival
from promptserve.policy.stepwise import EPS, StepGpu, StepScheduler
from promptserve.sim.events import DONE, EventRun, initial_demand


class StepRun(EventRun):
    def __init__(self, policy, inputs, on_progress) -> None:  # noqa: ANN001 - as EventRun
        super().__init__(policy, inputs, on_progress)
        setting = inputs.setting
        self.version = [0] * len(setting.profiles)
        self.next_at = [math.inf] * len(setting.profiles)
        self.last_at = [-math.inf] * len(setting.profiles)  # its last boundary
        self.prices: list[tuple[float, float]] = []
        self.cut_epoch: dict[int, int] = {}  # per queue: its wait epoch at the last full cut

    def _first_plan(self, start: float) -> None:
        if self.inputs.requests:
            self._replan(start, initial_demand(self.inputs.requests, self.levels))

    def _done(self, now: float, payload: object) -> None:
        g, version, steps = payload  # type: ignore[misc]
        if version == self.version[g]:  # else a cut moved this GPU's boundary
            self._boundary(now, self.sched.gpus[g], steps)

    def _after_event(self, now: float) -> None:
        for gpu in self.sched.idle_while_waiting():  # once per GPU and instant
            if self.next_at[gpu.index] > now and self.last_at[gpu.index] < now:
                self._schedule(gpu, now, 0)

    def _replan(self, now: float, demand) -> None:  # noqa: ANN001 - a Demand
        """Step-level serving's re-plan is a new price on step-slots."""
        t0 = time.perf_counter()
        price = self.sched.reprice(demand, self.inputs.setting.slo_s)
        self.planner_ms.append((time.perf_counter() - t0) * 1e3)
        self.prices.append((now, price))

    def _placed(self, now: float, arrival: Arrival) -> None:
        if arrival.gpu is not None:
            self._cut(self.sched.gpus[arrival.gpu], now)
        elif self.sched.config.shed:
            # it waits: every running GPU it may join holds a boundary at its next step, where
            # the job may fit (``next_steps``), as the live runtime holds one at every step.
            # Once they do, they go on doing so for as long as the queue is not empty: only the
            # first to wait since it last emptied needs to cut them (the same boundaries, with
            # a cost per waiting arrival that does not grow with the GPU count)
            key, sched, gpus = self._joinable(arrival.job.id)
            if self.cut_epoch.get(key) != sched.wait_epoch:
                self.cut_epoch[key] = sched.wait_epoch
                for running in gpus:
                    if running.by_id:
                        self._cut(running, now)

    def _joinable(self, job_id: int) -> tuple[int, StepScheduler, list[StepGpu]]:
        """The queue a waiting job is in (a key and its scheduler) and the GPUs it may join:
        all of them (a shard's own, ``sim/sharded.py``)."""
        return 0, self.sched, self.sched.gpus

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
