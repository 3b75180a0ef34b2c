"""Step-level serving decides the same way on both clocks: the same requests through the
simulator and through the live runtime (its own intake, boundaries, cache and answers, on a
fake clock, with fake step runners that take the profile's step time) give each request the
same GPU, the same K and the same outcome.

The driver below is the simulator's event order written for the runtime: arrivals, step ends
and re-pricings in time order; a GPU idle while requests wait holds a boundary at once. The
runtime does one boundary per step where the simulator skips ahead to the next join or leave,
so this also checks that skipping ahead changes nothing."""

import asyncio
import heapq
import itertools
import math

import numpy as np
import pytest

from factories import modeled_app
from promptserve.engine.base import GenerationResult
from promptserve.policy.types import Status
from promptserve.server.runtime import Dropped, Refused
from promptserve.server.stepworkers import StepDone
from promptserve.sim.simulator import SimInputs, initial_demand
from promptserve.sim.stepsim import StepRun
from promptserve.types import Request
from promptserve.workload import load_prompts

GPUS, SLO_S = 2, 21.0
TOLERANCE_S = 1e-6


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeRunner:
    """A step runner that runs nothing: members count their steps down; leavers carry small
    stand-in latents at every cache level, so the cache fills as with a real engine."""

    def __init__(self, total_steps: int, levels: tuple[int, ...]) -> None:
        self.total_steps, self.levels = total_steps, levels
        self.left: dict[int, int] = {}
        self.k: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.left)

    def steps_left(self) -> dict[int, int]:
        return dict(self.left)

    def join(self, members) -> None:
        for key, item in members:
            self.left[key], self.k[key] = self.total_steps - item.k, item.k

    def cancel(self, key) -> bool:
        return self.left.pop(key, None) is not None

    def step(self) -> list:
        done = []
        for key in list(self.left):
            self.left[key] -= 1
            if self.left[key] == 0:
                del self.left[key]
                latents = {lv: np.full((4, 8, 8), key, np.float32) for lv in self.levels if lv}
                done.append((key, GenerationResult(b"png", self.k.pop(key), latents)))
        return done


def workload(seed: int = 0, n: int = 150, rate_qpm: float = 75.0) -> list[Request]:
    """DiffusionDB prompts with repeats (so the cache hits at several levels), Poisson."""
    texts = load_prompts("data/diffusiondb_prompts_4k.txt")[:60]
    rng = np.random.default_rng(seed)
    prompts = [texts[i] for i in rng.integers(0, len(texts), n)]
    times = np.cumsum(rng.exponential(60.0 / rate_qpm, n))
    return [Request(i, float(t), p, "default", float(t) + SLO_S) for i, (t, p) in enumerate(zip(times, prompts))]  # fmt: skip


def simulated(runtime, requests):
    """Per request: (GPU, K, status, finish) from the simulator, and the run."""
    embeddings = runtime.embedder.embed([r.prompt for r in requests])
    inputs = SimInputs(
        requests, embeddings, runtime.setting, runtime.quality, runtime.cache.thresholds
    )
    run = StepRun(runtime.policy, inputs, None)
    joined = record_joins(run.sched)
    result = run.run()
    rec = result.records
    out = {}
    for r in requests:
        gpu, k = joined.get(r.id, (None, None))
        out[r.id] = (
            gpu,
            k,
            Status(int(rec.status[r.id])).name,
            round(float(rec.finish_s[r.id]), 6),
        )
    return out


def record_joins(sched) -> dict[int, tuple[int, int]]:
    joined: dict[int, tuple[int, int]] = {}
    real = sched.boundary

    def boundary(gpu, now, steps):
        left, members, dropped = real(gpu, now, steps)
        for m in members:
            joined[m.job.id] = (gpu.index, m.k)
        return left, members, dropped

    sched.boundary = boundary
    return joined


async def live(runtime, requests, clock: Clock):
    """Per request: (GPU, K, status, finish) from the runtime, driven in the simulator's order."""
    joined = record_joins(runtime.sched)
    runners = [FakeRunner(runtime.workers.total_steps, runtime.levels) for _ in range(GPUS)]
    runtime.started = requests[0].arrival_s
    clock.t = requests[0].arrival_s
    runtime.sched.reprice(initial_demand(requests, runtime.levels), SLO_S)
    ends: dict[int, tuple[str, float]] = {}
    heap: list = []
    seq = itertools.count()
    busy = [False] * GPUS
    steps_of = runtime.sched.profile
    last = [-math.inf] * GPUS
    for r in requests:
        heapq.heappush(heap, (r.arrival_s, 1, next(seq), ("arrive", r)))
    period = runtime.policy.replan_s
    if period:
        heapq.heappush(heap, (requests[0].arrival_s + period, 2, next(seq), ("reprice", None)))

    async def boundary(g: int, steps: int) -> None:
        last[g] = clock.t
        step = await runtime._join(g, runtime.sched.gpus[g], steps)
        busy[g] = step is not None
        if step is not None:
            joins, _, cancels = step
            for key in cancels:
                runners[g].cancel(key)
            runners[g].join(joins)  # the step itself runs at its end, below
            # a real step also decodes who finishes in it (seg_start already has the encodes)
            gpu, runner = runtime.sched.gpus[g], runners[g]
            decode_s = sum(v == 1 for v in runner.left.values()) * steps_of.leave_s
            end = gpu.seg_start + gpu.seg_iter_s + decode_s
            heapq.heappush(heap, (end, 0, next(seq), ("end", g)))

    def watch(r: Request, future) -> None:
        def done(f) -> None:
            if f.exception() is not None:
                ends[r.id] = ("DROPPED", math.nan)
            else:
                ends[r.id] = ("SERVED", round(clock.t, 6))

        future.add_done_callback(done)

    while heap:
        now, kind, _, (what, payload) = heapq.heappop(heap)
        clock.t = now
        if what == "arrive":
            r = payload
            try:
                future = await runtime._intake(r.prompt, r.tenant, SLO_S, None)
                watch(r, future)
            except Refused:
                ends[r.id] = ("REFUSED", math.nan)
            except Dropped:
                ends[r.id] = ("DROPPED", math.nan)
            for g, gpu in enumerate(runtime.sched.gpus):
                if not busy[g] and gpu.joining:
                    await boundary(g, 0)
        elif what == "end":
            g = payload
            finished = runners[g].step()
            await runtime._finish(g, StepDone(finished, runners[g].steps_left(), {}))
            await boundary(g, 1)
        elif what == "reprice" and any(k != 2 for _, k, _, _ in heap):
            runtime.sched.reprice(runtime.estimator.estimate(now, runtime.started), SLO_S)
            heapq.heappush(heap, (now + period, 2, next(seq), ("reprice", None)))
        await asyncio.sleep(0)  # the futures' callbacks run
        for gpu in runtime.sched.idle_while_waiting():
            if not busy[gpu.index] and last[gpu.index] < now:
                await boundary(gpu.index, 0)
    await asyncio.sleep(0)
    out = {}
    for r in requests:
        gpu, k = joined.get(r.id, (None, None))
        out[r.id] = (gpu, k, *ends.get(r.id, ("LOST", math.nan)))
    return out


@pytest.mark.parametrize(
    ("policy", "rate_qpm"),
    # moderate load, and 3x capacity (240 qpm: requests wait, are dropped, and join between
    # steps of a running segment)
    [
        ("promptserve-step", 75.0),
        ("promptserve-step", 240.0),
        ("continuous-ht+shed+admit", 75.0),
        ("continuous-ha+shed+admit", 240.0),
        ("continuous-ht", 240.0),
    ],
)
def test_the_same_requests_get_the_same_gpu_k_and_outcome_on_both_clocks(
    tmp_path, policy, rate_qpm
):
    requests = workload(rate_qpm=rate_qpm)
    clock = Clock()
    first = len([r for r in requests if r.arrival_s < requests[0].arrival_s + 60.0])
    app = modeled_app(tmp_path, policy=policy, workers=GPUS, slo_s=SLO_S, expected_qpm=first)
    runtime = app.state.runtime
    runtime.clock = clock
    sim = simulated(runtime, requests)
    got = asyncio.run(live(runtime, requests, clock))
    # served late counts as served here: both clocks stamp the finish, compared below
    sim = {i: (g, k, "SERVED" if s == "SERVED" else s, f) for i, (g, k, s, f) in sim.items()}
    differ = [(i, sim[i], got[i]) for i in sim if not same(sim[i], got[i])]
    assert not differ, f"{len(differ)} of {len(sim)} differ, first: {differ[:5]}"
    ks = {k for _, k, s, _ in sim.values() if s == "SERVED"}
    statuses = {s for _, _, s, _ in sim.values()}
    # it decided something: levels (K = 0 only under continuous-ha), GPUs, and under overload
    # whom to turn away
    assert len(ks) >= (1 if "continuous-ha" in policy else 2)
    assert {0, 1} <= {g for g, *_ in sim.values()}
    assert "SERVED" in statuses, statuses
    if rate_qpm > 100:
        assert statuses & {"DROPPED", "REFUSED"}, statuses


def same(a, b) -> bool:
    (ga, ka, sa, fa), (gb, kb, sb, fb) = a, b
    if (ga, ka, sa) != (gb, kb, sb):
        return False
    return (math.isnan(fa) and math.isnan(fb)) or abs(fa - fb) < TOLERANCE_S
