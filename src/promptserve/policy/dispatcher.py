"""The dispatcher: one queue per level, batches per level, earliest deadline first.

A step machine driven by whoever owns the clock: ``enqueue(job)``, ``step(now)`` hands batches
to idle GPUs, ``on_batch_done(now, dispatch)`` turns a finished batch into outcomes. The
simulator and the server call the same methods.

Batching: the head of a level's queue has the earliest deadline; the batch is the largest
(up to ``max_batch``) whose predicted latency still meets that deadline. A job that can no
longer meet its deadline at its level is moved to a faster level that can still make it
(``late="escalate"``) or dropped when none can. The published baselines have no deadline
logic: with ``late="expire"`` they run a job unless its deadline has already passed (its client
has given up: running it would only delay the others), with ``late="serve"`` they run
everything. A job whose neighbour holds no latent (``k_max`` below its
level) runs at ``k_max`` in a batch of its own kind. A batch holds one size (the head's): a
denoiser call runs one latent shape, timed by ``Profile.sized_latency``. With bounded LoRA
residency (``policy.residency``) a batch names at most the device's rows of adapters, and the
ones its GPU does not hold add their load time.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from promptserve.policy.residency import ResidentSet
from promptserve.policy.types import BatchWork, Job, Outcome, Status
from promptserve.profile import Profile


@dataclass(frozen=True)
class DispatchConfig:
    max_batch: int = 8
    late: Literal["serve", "expire", "escalate"] = "escalate"
    pinned: bool = True  # False: any idle GPU takes the most urgent work of any level


@dataclass
class GpuState:
    profile: Profile
    level: int | None  # pinned level; None takes any
    busy_until: float = 0.0
    ready_at: float = 0.0  # a GPU loading a model variant is not ready before this
    running: BatchWork | None = None
    up: bool = True  # False: its worker is gone; it takes no work and counts for no level
    resident: ResidentSet = field(default_factory=ResidentSet)  # its device's LoRA adapters


@dataclass
class Dispatcher:
    gpus: list[GpuState]
    config: DispatchConfig
    queues: dict[int, list[tuple[float, int, Job]]] = field(default_factory=dict)

    @classmethod
    def create(cls, profiles: Sequence[Profile], config: DispatchConfig) -> Dispatcher:
        return cls(
            [
                GpuState(p, None, resident=ResidentSet(p.adapter_slots, p.adapter_private))
                for p in profiles
            ],
            config,
        )

    @property
    def levels(self) -> tuple[int, ...]:
        return self.gpus[0].profile.levels

    def set_levels(
        self, now: float, gpu_levels: Sequence[int | None], switch_s: float = 0.0
    ) -> None:
        """Apply a plan; a GPU whose level changes is unavailable for ``switch_s`` seconds."""
        for gpu, level in zip(self.gpus, gpu_levels, strict=True):
            if gpu.level != level and switch_s > 0:
                gpu.ready_at = max(now, gpu.busy_until) + switch_s
            gpu.level = level
        serving = self.serving_levels()
        for level in [k for k, q in self.queues.items() if q and k not in serving]:
            stranded, self.queues[level] = self.queues[level], []
            for _, _, job in stranded:
                self.enqueue(job)

    def enqueue(self, job: Job) -> None:
        """Queue a job; a job routed to a level no GPU serves goes to the nearest served level."""
        serving = self.serving_levels()
        if job.level not in serving and serving:
            job = replace(job, level=min(serving, key=lambda k: (abs(k - job.level), k)))
        heapq.heappush(self.queues.setdefault(job.level, []), (job.deadline_s, job.id, job))

    def remove(self, job_id: int) -> Job | None:
        """Take a queued job out (a cancelled request); None when it is not queued."""
        for queue in self.queues.values():
            for i, (_, jid, job) in enumerate(queue):
                if jid == job_id:
                    queue.pop(i)
                    heapq.heapify(queue)
                    return job
        return None

    def queue_len(self, level: int) -> int:
        return len(self.queues.get(level, ()))

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def serving_levels(self) -> set[int]:
        if not self.config.pinned:
            return set(self.levels)
        return {g.level for g in self.gpus if g.level is not None and g.up}

    def predicted_finish(
        self, level: int, now: float, k_max: int | None = None, shape: int = 0
    ) -> float:
        """When a job joining ``level``'s queue now would finish (seconds), by the profile.

        The job runs at ``min(level, k_max)``: a neighbour without latents at ``level`` (or no
        neighbour) makes it run at a slower level than its queue's."""
        gpus = [g for g in self.gpus if g.up and (not self.config.pinned or g.level == level)]
        if not gpus:
            return float("inf")
        run_level = level if k_max is None else min(level, k_max)
        free = sorted(max(g.busy_until, g.ready_at, now) for g in gpus)
        profile = gpus[0].profile
        batch = min(self.config.max_batch, profile.max_batch)
        ahead = self.queue_len(level) if self.config.pinned else self.pending()
        rounds, slot = divmod(ahead, batch * len(gpus))
        waves = slot // batch
        start = free[min(waves, len(free) - 1)] + rounds * profile.batch_latency(level, batch)
        return start + profile.sized_latency(run_level, min(slot % batch + 1, batch), shape)

    def step(self, now: float) -> tuple[list[BatchWork], list[Outcome]]:
        """Hand a batch to every idle GPU that has work; report jobs given up on.

        Work-conserving: when it returns, no up, ready, idle GPU has a non-empty queue it may
        serve. Shedding can empty the level an idle GPU chose, or move jobs onto a level whose
        GPU was already passed over, so it repeats until a pass changes nothing.
        """
        dispatches: list[BatchWork] = []
        outcomes: list[Outcome] = []
        changed = True
        while changed:
            changed = False
            for index, gpu in enumerate(self.gpus):
                if gpu.running is not None or gpu.ready_at > now or not gpu.up:
                    continue
                before = self._queue_lengths()
                shed, dispatch = self._serve(index, gpu, now)
                outcomes.extend(shed)
                changed = changed or dispatch is not None or self._queue_lengths() != before
                if dispatch is not None:
                    gpu.running, gpu.busy_until = dispatch, dispatch.until_s
                    dispatches.append(dispatch)
        return dispatches, outcomes

    def _serve(
        self, index: int, gpu: GpuState, now: float
    ) -> tuple[list[Outcome], BatchWork | None]:
        """One idle GPU: its level's batch (pinned), or the most urgent level's batch that still
        has work once its late jobs are shed (unpinned)."""
        shed: list[Outcome] = []
        tried: set[int] = set()
        while True:
            level = gpu.level if self.config.pinned else self._most_urgent_level(tried)
            if level is None or level in tried:
                return shed, None
            tried.add(level)
            shed.extend(self._shed_late(level, gpu.profile, now))
            dispatch = self._form_batch(index, gpu, level, now)
            if dispatch is not None or self.config.pinned:
                return shed, dispatch

    def on_batch_done(self, now: float, dispatch: BatchWork) -> list[Outcome]:
        gpu = self.gpus[dispatch.gpu]
        gpu.running = None
        gpu.busy_until = now
        served = Status.SERVED
        return [Outcome(job, served, now, dispatch.level, dispatch.gpu) for job in dispatch.jobs]

    def fail_gpu(self, now: float, gpu_index: int) -> list[Job]:
        """A worker died: it is marked down and its running jobs go back to their queues (none
        is lost); ``set_up`` brings it back when its worker answers again."""
        gpu = self.gpus[gpu_index]
        jobs = list(gpu.running.jobs) if gpu.running else []
        gpu.running, gpu.busy_until, gpu.up = None, now, False
        for job in jobs:
            self.enqueue(job)
        return jobs

    def next_ready(self, now: float) -> float:
        """When the next switching GPU is ready to take work (inf: none is switching): the
        one time a driver must look again without being told of an event."""
        return min((g.ready_at for g in self.gpus if g.up and g.ready_at > now), default=math.inf)

    def set_up(self, gpu_index: int, up: bool) -> None:
        self.gpus[gpu_index].up = up

    def up_gpus(self) -> list[int]:
        return [i for i, g in enumerate(self.gpus) if g.up]

    def _queue_lengths(self) -> dict[int, int]:
        return {level: len(q) for level, q in self.queues.items() if q}

    def _most_urgent_level(self, skip: set[int]) -> int | None:
        heads = [(q[0][0], level) for level, q in self.queues.items() if q and level not in skip]
        return min(heads)[1] if heads else None

    def _shed_late(self, level: int, profile: Profile, now: float) -> list[Outcome]:
        if self.config.late == "serve":
            return []
        queue = self.queues.get(level, [])
        out: list[Outcome] = []
        while queue and self.config.late == "expire" and queue[0][0] < now:
            out.append(Outcome(heapq.heappop(queue)[2], Status.DROPPED, now))
        while queue and self.config.late == "escalate":
            deadline, _, job = queue[0]
            run_level = min(level, job.k_max)
            if now + profile.sized_latency(run_level, 1, job.shape) <= deadline:
                break
            heapq.heappop(queue)
            faster = self._faster_level(job, level, profile, now)
            if faster is None:
                out.append(Outcome(job, Status.DROPPED, now))
            else:
                self.enqueue(replace(job, level=faster))
        return out

    def _faster_level(self, job: Job, level: int, profile: Profile, now: float) -> int | None:
        for k in sorted(self.serving_levels()):
            if not level < k <= job.k_max:
                continue
            if self.predicted_finish(k, now, None, job.shape) <= job.deadline_s:
                return k
        return None

    def _form_batch(self, index: int, gpu: GpuState, level: int, now: float) -> BatchWork | None:
        queue = self.queues.get(level)
        if not queue:
            return None
        head = queue[0][2]
        run_level = min(level, head.k_max)
        limit = min(self.config.max_batch, gpu.profile.max_batch, len(queue))
        size = 1
        for b in range(limit, 0, -1):
            if now + gpu.profile.sized_latency(run_level, b, head.shape) <= head.deadline_s:
                size = b
                break
        else:
            size = 1 if self.config.late == "escalate" else limit
        jobs, skipped, named = [], [], set()
        slots = gpu.profile.adapter_slots
        while queue and len(jobs) < size:
            item = heapq.heappop(queue)
            alike = min(level, item[2].k_max) == run_level and item[2].shape == head.shape
            if alike and slots and len(named | set(item[2].adapters)) > slots:
                alike = False  # its adapters would not fit beside the batch's on the device
            if alike:
                named |= set(item[2].adapters)
            (jobs if alike else skipped).append(item)
        for item in skipped:
            heapq.heappush(queue, item)
        batch = tuple(j for _, _, j in jobs)
        latency = gpu.profile.sized_latency(run_level, len(batch), head.shape)
        if slots and named:
            latency += gpu.resident.missing(named) * gpu.profile.adapter_load_s
            gpu.resident.use(named)
            gpu.resident.release(named)  # held until pushed out; a batch runs whole
        return BatchWork(index, run_level, batch, now, now + latency)
