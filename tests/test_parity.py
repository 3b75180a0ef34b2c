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

import numpy as np
import pytest

from promptserve.engine.base import UNET_GUIDANCE, GenerationResult
from promptserve.policy import POLICIES, get_policy
from promptserve.policy.steptime import step_profile
from promptserve.policy.types import Status
from promptserve.profile import reference_profile
from promptserve.server import ServerConfig, runtime_for
from promptserve.server.runtime import Dropped, Refused
from promptserve.server.stepworkers import StepDone
from promptserve.sim.simulator import SimInputs, simulate
from promptserve.types import Request
from promptserve.workload import load_prompts
from virtual_time import VirtualLoop

GPUS, SLO_S, TOLERANCE_S = 2, 21.0, 1e-6
MODERATE_QPM, OVERLOADED_QPM = 75.0, 240.0  # the setting serves ~100 qpm at its fastest level


class TimedWorkers:
    """The executor interface on the loop's clock: a batch takes the profile's batch latency at
    its slowest member's K, a step the profile's step time (the joiners' encodes first, the
    finishers' decodes after). Results name the GPU that ran them and carry small stand-in
    latents at every cache level, so the cache fills as with a real engine."""

    name, shared_store, speedup = "timed", False, 1.0
    guidance = UNET_GUIDANCE
    native = (1024, 1024)
    sizes = (native,)  # one size: its steps are the profile's
    adapters = ()

    def __init__(self, count: int) -> None:
        self.profile, self.count = reference_profile(), count
        self.total_steps, self.levels = self.profile.total_steps, self.profile.levels
        self.steps = step_profile(self.profile)
        self.members: list[dict] = [{} for _ in range(count)]  # key -> [steps left, K]

    def _result(self, gpu: int, key: int, k: int) -> GenerationResult:
        latents = {lv: np.full((4, 8, 8), key, np.float32) for lv in self.levels if lv}
        return GenerationResult(str(gpu).encode(), k, latents)

    async def run(self, gpu, items, on_step, refs=None):  # noqa: ANN001, ANN201
        await asyncio.sleep(self.profile.batch_latency(min(i.k for i in items), len(items)))
        return [self._result(gpu, item.seed, item.k) for item in items]

    async def advance(
        self, gpu, joins, refs, cancels, steps=1, interrupt=None, retimes=None
    ) -> StepDone:  # noqa: ANN001 - one step a call, as a worker may
        members = self.members[gpu]
        for key in cancels:
            members.pop(key, None)
        for key, item in joins:
            members[key] = [self.total_steps - item.k, item.k]
        finishing = [key for key, (left, _) in members.items() if left == 1]
        s = self.steps
        await asyncio.sleep(
            len(joins) * s.join_s + s.iteration_s(len(members)) + len(finishing) * s.leave_s
        )
        for member in members.values():
            member[0] -= 1
        finished = [(key, self._result(gpu, key, members.pop(key)[1])) for key in finishing]
        left = {key: m[0] for key, m in members.items()}
        return StepDone(finished, left, {key: item.k for key, item in joins})

    def prepare_steps(self) -> None: ...

    async def set_levels(self, levels) -> None: ...  # noqa: ANN001

    async def alive(self) -> list[bool]:
        return [True] * self.count


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


def live(policy: str, requests: list[Request], cache_dir) -> tuple[dict, object]:
    """Per request (GPU, level, outcome, finish) from the live runtime, and the runtime."""
    first = sum(r.arrival_s < requests[0].arrival_s + 60.0 for r in requests)
    config = ServerConfig(
        cache_dir=cache_dir, embedder="hashing", policy=policy, slo_s=SLO_S, expected_qpm=first
    )
    loop = VirtualLoop(start=requests[0].arrival_s)
    runtime = runtime_for(config, TimedWorkers(GPUS), clock=loop.time)
    out: dict[int, tuple] = {}

    async def one(r: Request) -> None:
        await asyncio.sleep(r.arrival_s - loop.time())
        try:
            served = await runtime.submit(r.prompt, r.tenant, r.deadline_s - r.arrival_s)
        except Refused:
            out[r.id] = (-1, -1, "REFUSED", math.nan)
        except Dropped:
            out[r.id] = (-1, -1, "DROPPED", math.nan)
        else:
            out[r.id] = (int(served.result.png), served.level, "SERVED", loop.time())

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
            status.name,
            float(rec.finish_s[r.id]) if served else math.nan,
        )
    return out


def same(a: tuple, b: tuple) -> bool:
    if a[:3] != b[:3]:
        return False
    return (math.isnan(a[3]) and math.isnan(b[3])) or abs(a[3] - b[3]) < TOLERANCE_S


NAMES = sorted({get_policy(f"{base}{mods}").name for base in POLICIES for mods in ("", "+shed+admit")})  # fmt: skip


@pytest.mark.parametrize("rate_qpm", [MODERATE_QPM, OVERLOADED_QPM])
@pytest.mark.parametrize("policy", NAMES)
def test_every_request_gets_the_same_gpu_level_outcome_and_finish_on_both_clocks(
    tmp_path, policy, rate_qpm
):
    requests = workload(rate_qpm)
    got, runtime = live(policy, requests, tmp_path)
    sim = simulated(runtime, requests)
    differ = [(i, sim[i], got.get(i)) for i in sim if got.get(i) is None or not same(sim[i], got[i])]  # fmt: skip
    assert not differ, f"{len(differ)} of {len(sim)} differ, first (sim, live): {differ[:4]}"
    # it decided something: GPUs, and under overload whom to turn away or drop
    outcomes = {s for _, _, s, _ in sim.values()}
    assert {0, 1} <= {g for g, _, s, _ in sim.values() if s == "SERVED"}
    if rate_qpm == OVERLOADED_QPM:
        assert outcomes & {"DROPPED", "REFUSED"} or any(
            f > requests[i].deadline_s for i, (_, _, s, f) in sim.items() if s == "SERVED"
        ), outcomes
