"""Every policy decides the same way on both clocks.

The same requests go through the simulator and through the live runtime, the runtime driven
only through its public calls (``runtime_for``, ``start``, ``submit``, ``stop``) on a virtual
clock (``virtual_time.py``) with an executor timed by the profile: every request must get the
same GPU, the same level and the same outcome, and finish at the same time to 1e-6 s. The
runtime's own loops run unchanged (its batches, boundaries, re-plans, cache and embedder
threads); the virtual clock only makes the machine infinitely fast between two waits.
"""

import asyncio
import math
from dataclasses import replace

import numpy as np
import pytest

from promptserve.cache.spaces import cache_space
from promptserve.cachedstep import REFERENCE_CACHED_STEP_SHARE
from promptserve.engine.base import (
    PLAIN,
    UNET_GUIDANCE,
    EditInput,
    GenerationResult,
    Look,
    Paused,
)
from promptserve.engine.sizes import shape_index, shape_table
from promptserve.policy import POLICIES, get_policy
from promptserve.policy.residency import ResidentSet
from promptserve.policy.types import Status
from promptserve.profile import for_adapters, for_sizes, reference_profile
from promptserve.server import ServerConfig, runtime_for
from promptserve.server.runtime import Dropped, Refused
from promptserve.sim.simulator import SimInputs, simulate
from promptserve.steptime import KIND, kind, step_profile
from promptserve.strength import start_step
from promptserve.types import Request
from promptserve.workers.steps import StepCall, StepDone
from promptserve.workload import load_prompts
from promptserve.workload.batch import BatchMix, with_batch
from promptserve.workload.edits import EditMix, with_edits
from virtual_time import VirtualLoop

GPUS, SLO_S, TOLERANCE_S = 2, 21.0, 1e-6
MODERATE_QPM, OVERLOADED_QPM = 75.0, 240.0  # the setting serves ~100 qpm at its fastest level


class TimedWorkers:
    """The executor interface on the loop's clock: a batch takes the profile's batch latency at
    its slowest member's K, a step the profile's step time (the joiners' encodes and adapter
    loads first, the finishers' decodes after; members of several sizes or feature-cache
    intervals as the profile's mixed step). Results name the GPU that ran them and carry
    small stand-in latents at every cache level, so the cache fills as with a real engine."""

    name, shared_store, speedup = "timed", False, 1.0
    guidance, edit_family = UNET_GUIDANCE, "unet"
    native = (1024, 1024)

    def __init__(self, count: int, profile=None, sizes=None, adapters=()) -> None:  # noqa: ANN001
        self.profile, self.count = profile or reference_profile(), count
        self.sizes = sizes or (self.native,)  # one size: its steps are the profile's
        self.adapters = tuple(adapters)
        self.total_steps, self.levels = self.profile.total_steps, self.profile.levels
        self.shapes = shape_table(self.native, self.sizes)
        self.steps = step_profile(for_sizes(self.profile, self.shapes))
        self.members: list[dict] = [{} for _ in range(count)]  # key -> [steps left, K, kind, ids]
        self.resident = [
            ResidentSet(self.profile.adapter_slots, self.profile.adapter_private)
            for _ in range(count)
        ]

    def _result(self, gpu: int, key: int, k: int) -> GenerationResult:
        latents = {lv: np.full((4, 8, 8), key, np.float32) for lv in self.levels if lv}
        return GenerationResult(str(gpu).encode(), k, latents)

    async def run(self, gpu, items, on_step, refs=None):  # noqa: ANN001, ANN201
        await asyncio.sleep(self.profile.batch_latency(min(i.k for i in items), len(items)))
        return [self._result(gpu, item.seed, item.k) for item in items]

    async def advance(self, gpu: int, call: StepCall) -> StepDone:
        """As ``workers.steps.advance``: up to ``call.steps``, one by one."""
        members, resident, s = self.members[gpu], self.resident[gpu], self.steps
        joins, cancels, steps, interrupt = call.joins, call.cancels, call.steps, call.interrupt
        paused = {}
        for key in call.pauses:  # written down: the step it reached
            gone = members.pop(key, None)
            if gone is not None:
                resident.release(gone[3])
                paused[key] = Paused(self.total_steps - gone[0], np.zeros(0, np.float32), "timed")
        for key in cancels:
            gone = members.pop(key, None)
            if gone is not None:
                resident.release(gone[3])
        first = 0.0
        for key, item in joins:
            ids = tuple(sorted({self.adapters.index(n) + 1 for n, _ in item.look.lora}))
            first += s.join_s + resident.use(ids) * s.adapter_load_s
            first += s.leave_s if item.edit is not None else 0.0  # its image through the VAE
            shape = shape_index(self.shapes, item.look.size)
            at = item.k if item.resume is None else item.resume.step
            members[key] = [self.total_steps - at, item.k, kind(shape, item.interval), ids]
        for key, r in call.retimes.items():
            members[key][2] = kind(members[key][2] // KIND, r)
        started = {key: item.k if item.resume is None else item.resume.step for key, item in joins}
        if steps == 0:  # the joins only: their encodes and loads
            await asyncio.sleep(first)
            left = {key: m[0] for key, m in members.items()}
            return StepDone([], left, started, ran=0, paused=paused)
        finished, ran = [], 0
        while True:
            counts: dict[int, int] = {}
            for m in members.values():
                counts[m[2]] = counts.get(m[2], 0) + 1
            step_s = s.mix_s(counts) if s.mixed else s.iteration_s(len(members))
            finishing = [key for key, m in members.items() if m[0] == 1]
            await asyncio.sleep(first + step_s + len(finishing) * s.leave_s)
            first, ran = 0.0, ran + 1
            for member in members.values():
                member[0] -= 1
            for key in finishing:
                _, k, _, ids = members.pop(key)
                resident.release(ids)
                finished.append((key, self._result(gpu, key, k)))
            if finishing or ran >= steps or not members:
                break
            if interrupt is not None and interrupt.is_set():
                break
        left = {key: m[0] for key, m in members.items()}
        return StepDone(finished, left, started, ran=ran, paused=paused)

    def prepare_steps(self) -> None: ...

    async def set_levels(self, levels) -> None: ...  # noqa: ANN001

    async def alive(self) -> list[bool]:
        return [True] * self.count


PROMPTS = load_prompts("data/diffusiondb_prompts_4k.txt")[60:120]  # the stream's own


def workload(rate_qpm: float, n: int = 150, seed: int = 0) -> list[Request]:
    """DiffusionDB prompts with repeats (so the cache hits at several levels), Poisson."""
    texts = load_prompts("data/diffusiondb_prompts_4k.txt")[:60]
    rng = np.random.default_rng(seed)
    prompts = [texts[i] for i in rng.integers(0, len(texts), n)]
    times = 10.0 + np.cumsum(rng.exponential(60.0 / rate_qpm, n))
    return [
        Request(i, float(t), p, "default", float(t) + SLO_S)
        for i, (t, p) in enumerate(zip(times, prompts, strict=True))
    ]


def live(
    policy: str,
    requests: list[Request],
    cache_dir,  # noqa: ANN001
    workers: TimedWorkers | None = None,
    looks: dict[int, Look] | None = None,
    feature_cache: bool = False,
    edits: dict[int, EditInput] | None = None,
) -> tuple[dict, object]:
    """Per request (GPU, level, interval, outcome, finish) from the live runtime, and the
    runtime; ``looks``: a request's size and adapters; ``edits``: the requests that edit."""
    first = sum(r.arrival_s < requests[0].arrival_s + 60.0 for r in requests)
    config = ServerConfig(
        cache_dir=cache_dir, embedder="hashing", policy=policy, slo_s=SLO_S, expected_qpm=first,
        feature_cache=feature_cache,
    )  # fmt: skip
    loop = VirtualLoop(start=requests[0].arrival_s)
    workers = workers or TimedWorkers(GPUS)
    runtime = runtime_for(config, workers, clock=loop.time)
    workers.steps = step_profile(runtime.setting.profiles[0])  # timed as the policy times them
    out: dict[int, tuple] = {}

    async def one(r: Request) -> None:
        await asyncio.sleep(r.arrival_s - loop.time())
        look = (looks or {}).get(r.id, PLAIN)
        try:
            edit = (edits or {}).get(r.id)
            served = await runtime.submit(
                r.prompt, r.tenant, r.slo_s, look=look, edit=edit, batch=r.batch
            )
        except Refused:
            out[r.id] = (-1, -1, 1, "REFUSED", math.nan)
        except Dropped:
            out[r.id] = (-1, -1, 1, "DROPPED", math.nan)
        else:
            gpu = int(served.result.png)
            out[r.id] = (gpu, served.level, served.interval, "SERVED", loop.time())

    async def main() -> None:
        runtime.start()
        await asyncio.gather(*(one(r) for r in requests))
        await runtime.stop()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return out, runtime


def simulated(runtime, requests: list[Request]) -> dict:  # noqa: ANN001
    embeddings = runtime.embedder.embed([r.prompt for r in requests])
    inputs = SimInputs(
        requests, embeddings, runtime.setting, runtime.quality, runtime.cache.thresholds
    )
    rec = simulate(runtime.policy, inputs).records
    out = {}
    for r in requests:
        status = Status(int(rec.status[r.id]))
        served = status == Status.SERVED
        out[r.id] = (
            int(rec.gpu[r.id]),
            int(rec.level[r.id]),
            int(rec.interval[r.id]) if served and rec.interval is not None else 1,
            status.name,
            float(rec.finish_s[r.id]) if served else math.nan,
        )
    return out


def same(a: tuple, b: tuple) -> bool:
    if a[:4] != b[:4]:
        return False
    return (math.isnan(a[4]) and math.isnan(b[4])) or abs(a[4] - b[4]) < TOLERANCE_S


def compare(sim: dict, got: dict) -> None:
    differ = [(i, sim[i], got.get(i)) for i in sim if got.get(i) is None or not same(sim[i], got[i])]  # fmt: skip
    assert not differ, f"{len(differ)} of {len(sim)} differ, first (sim, live): {differ[:4]}"


NAMES = sorted({get_policy(f"{base}{mods}").name for base in POLICIES for mods in ("", "+shed+admit")})  # fmt: skip


@pytest.mark.parametrize("rate_qpm", [MODERATE_QPM, OVERLOADED_QPM])
@pytest.mark.parametrize("policy", NAMES)
def test_every_request_gets_the_same_gpu_level_outcome_and_finish_on_both_clocks(
    tmp_path, policy, rate_qpm
):
    requests = workload(rate_qpm)
    got, runtime = live(policy, requests, tmp_path)
    sim = simulated(runtime, requests)
    compare(sim, got)
    # it decided something: GPUs, and under overload whom to turn away or drop
    outcomes = {s for _, _, _, s, _ in sim.values()}
    assert {0, 1} <= {g for g, _, _, s, _ in sim.values() if s == "SERVED"}
    if rate_qpm == OVERLOADED_QPM:
        assert outcomes & {"DROPPED", "REFUSED"} or any(
            f > requests[i].deadline_s for i, (_, _, _, s, f) in sim.items() if s == "SERVED"
        ), outcomes


SIZES = ((1024, 1024), (1152, 896), (768, 768))
ADAPTERS = tuple(f"adapter{i}" for i in range(6))


def looked(kind_: str, requests: list[Request]) -> tuple[TimedWorkers, dict, list[Request]]:
    """The path users get beyond the reference profile: feature caching on (the serve
    default), a size mix, or adapters with bounded residency; the workers, each request's
    look, and the requests as the simulator sees them (each in its look's cache namespace)."""
    base = reference_profile()
    rng = np.random.default_rng(7)
    looks: dict[int, Look] = {}
    if kind_ == "feature-cache":
        workers = TimedWorkers(GPUS, replace(base, cached_step_share=REFERENCE_CACHED_STEP_SHARE))
    elif kind_ == "sizes":
        workers = TimedWorkers(GPUS, sizes=SIZES)
        for r in requests:
            size = SIZES[int(rng.choice(3, p=[0.6, 0.2, 0.2]))]
            looks[r.id] = Look(size=None if size == SIZES[0] else size)
    else:
        workers = TimedWorkers(GPUS, for_adapters(base, 2, 0.4), adapters=ADAPTERS)
        for r in requests:
            looks[r.id] = Look(lora=((ADAPTERS[int(rng.integers(0, 6))], 1.0),))
    shapes = shape_table(workers.native, workers.sizes)
    seen = []
    for r in requests:
        look = looks.get(r.id, PLAIN)
        adapters = tuple(sorted({ADAPTERS.index(n) + 1 for n, _ in look.lora}))
        seen.append(
            replace(
                r, tenant=cache_space("default", look), shape=shape_index(shapes, look.size),
                adapters=adapters,
            )
        )  # fmt: skip
    return workers, looks, seen


@pytest.mark.parametrize("rate_qpm", [MODERATE_QPM, OVERLOADED_QPM])
@pytest.mark.parametrize("kind_", ["feature-cache", "sizes", "adapters"])
def test_the_default_path_decides_the_same_on_both_clocks(tmp_path, kind_, rate_qpm):
    """``promptserve-step`` as users get it: per request the same GPU, K, interval, outcome
    and finish time live and simulated."""
    requests = workload(rate_qpm)
    workers, looks, seen = looked(kind_, requests)
    got, runtime = live("promptserve-step", requests, tmp_path, workers, looks, True)
    sim = simulated(runtime, seen)
    compare(sim, got)
    served = [v for v in sim.values() if v[3] == "SERVED"]
    assert {0, 1} <= {g for g, *_ in served}
    if kind_ == "feature-cache":  # it chose intervals: the axis was exercised
        assert {r for _, _, r, _, _ in served} - {1}


@pytest.mark.parametrize("rate_qpm", [MODERATE_QPM, OVERLOADED_QPM])
def test_an_edit_mix_decides_the_same_on_both_clocks(tmp_path, rate_qpm):
    """30% edits at strength 0.3-0.8 beside generations, feature caching on: every request the
    same GPU, start, interval, outcome and finish; each edit from its own start step."""
    requests = workload(rate_qpm)
    # (seed 5 puts an arrival 4 us after a boundary whose leaver is still being decoded: the
    # simulator reports a boundary at its last step and adds the decode, a live GPU after the
    # decode, so that arrival sees two states; a gap of both clocks' as old as the decode
    # model, generations alike, and not this test's subject)
    seen = with_edits(requests, EditMix(0.3, 0.3, 0.8), seed=6)
    picture = np.zeros((64, 64, 3), np.uint8)
    edits = {r.id: EditInput(picture, r.strength) for r in seen if r.strength is not None}
    workers = TimedWorkers(GPUS, replace(reference_profile(), cached_step_share=0.3))
    got, runtime = live("promptserve-step", requests, tmp_path, workers, None, True, edits)
    sim = simulated(runtime, seen)
    compare(sim, got)
    starts = {i: start_step(50, e.strength) for i, e in edits.items()}
    served = {i: v for i, v in sim.items() if v[3] == "SERVED"}
    assert {i: served[i][1] for i in starts if i in served} == {
        i: k for i, k in starts.items() if i in served
    }
    assert len([i for i in starts if i in served]) > len(starts) // 2


@pytest.mark.parametrize("rate_qpm", [MODERATE_QPM, OVERLOADED_QPM])
def test_a_background_stream_decides_the_same_on_both_clocks(tmp_path, rate_qpm):
    """A background stream beside the requests (``--batch 0.4:3600``): every request and job
    the same GPU, level, outcome and finish on both clocks, the jobs paused where interactive
    requests join and resumed from the step they reached."""
    requests = with_batch(workload(rate_qpm, 100), BatchMix(0.4, 3600.0), PROMPTS, seed=2)
    got, runtime = live("promptserve-step", requests, tmp_path)
    sim = simulated(runtime, requests)
    compare(sim, got)
    jobs = [r.id for r in requests if r.batch]
    assert all(sim[i][3] == "SERVED" for i in jobs)
    assert runtime.counters.resumes == runtime.counters.pauses
    if rate_qpm == MODERATE_QPM:  # overloaded, the interactive requests hold every GPU
        assert runtime.counters.pauses > 0


@pytest.mark.parametrize("rate_qpm", [MODERATE_QPM, OVERLOADED_QPM])
def test_the_selector_chooses_the_same_on_both_clocks(tmp_path, rate_qpm):
    """``+select``: the live runtime's selections (replays on a thread) are the simulator's,
    at the same times with the same replayed scores, so every request is decided the same."""
    requests = workload(rate_qpm, n=300)
    got, runtime = live("promptserve-step+select", requests, tmp_path)
    compare(simulated(runtime, requests), got)
    embeddings = runtime.embedder.embed([r.prompt for r in requests])
    inputs = SimInputs(
        requests, embeddings, runtime.setting, runtime.quality, runtime.cache.thresholds
    )
    sim = [(c.at_s, c.chosen, c.scores) for c in simulate(runtime.policy, inputs).choices]
    history = runtime.selection.selector.history
    assert [(c.at_s, c.chosen, c.scores) for c in history] == sim
    stats = runtime.selection.stats
    assert stats.selections == len(sim) >= 5 and set(stats.scores) == {"price", "fastest"}
    assert stats.cpu_s > 0 and stats.skipped["budget"] == 0


def test_a_failing_selection_keeps_the_rule_and_the_re_price(tmp_path, monkeypatch):
    """Replays that raise cost nothing but a logged loop error: the rule serving stays and
    the re-price still comes, so every request is decided as plain ``promptserve-step``."""
    from promptserve.server.selection import LiveSelection

    def broken(self, now, window, replans):  # noqa: ANN001, ANN202
        raise RuntimeError("a replay failed")

    monkeypatch.setattr(LiveSelection, "_score", broken)
    requests = workload(MODERATE_QPM, n=200)
    got, runtime = live("promptserve-step+select", requests, tmp_path)
    assert runtime.counters.loop_errors >= 5 and runtime.selection.stats.selections == 0
    embeddings = runtime.embedder.embed([r.prompt for r in requests])
    inputs = SimInputs(
        requests, embeddings, runtime.setting, runtime.quality, runtime.cache.thresholds
    )
    rec = simulate(get_policy("promptserve-step"), inputs).records
    plain = {
        r.id: (
            int(rec.gpu[r.id]), int(rec.level[r.id]), 1, Status(int(rec.status[r.id])).name,
            float(rec.finish_s[r.id]) if rec.status[r.id] == Status.SERVED else math.nan,
        )
        for r in requests
    }  # fmt: skip
    compare(plain, got)
