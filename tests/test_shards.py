"""The sharded control plane (``policy/shards.py``, ``sim/sharded.py``) and the scaled-up
workload it is measured on (``workload/scaled.py``)."""

import copy
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from factories import boundary
from promptserve.cache.embed import HashingEmbedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.errors import InputError
from promptserve.policy import Setting, Status, get_policy
from promptserve.policy.shards import ShardLoad, ShardRing, gpu_targets, plan_moves
from promptserve.policy.step import StepConfig, StepScheduler
from promptserve.policy.types import Job
from promptserve.profile import reference_profile
from promptserve.quality import quality_model
from promptserve.sim.events import EventRun
from promptserve.sim.sharded import sharded_scheduler
from promptserve.sim.simulator import SimInputs, simulate
from promptserve.steptime import step_profile
from promptserve.workload.arrivals import read_trace_offsets
from promptserve.workload.scaled import Rows, superposed_arrivals, tenant_requests

ROOT = Path(__file__).resolve().parents[1]
PROFILE = reference_profile()
QM = quality_model(PROFILE.levels, PROFILE.quality, "mild")
WORDS = ["cat", "castle", "forest", "robot", "ship", "storm", "neon", "city", "dragon", "moon"]
PROMPTS = [
    " ".join(np.random.default_rng(i).choice(WORDS, 4)) + ("" if i % 3 else f" v{i}")
    for i in range(300)
]


def load(rate: float, arrivals: int = 100) -> ShardLoad:
    return ShardLoad(rate, 40.0, arrivals)


def scaled_inputs(gpus: int, rate_each: float, minutes: float, seed: int = 1) -> SimInputs:
    offsets = read_trace_offsets(ROOT / "data/AzureLLMInferenceTrace_conv.csv")
    times, copy_of = superposed_arrivals(offsets, gpus // 2, rate_each, minutes, seed)
    requests, rows = tenant_requests(PROMPTS, times, copy_of, 21.0, seed)
    emb = Rows(HashingEmbedder().embed(PROMPTS), rows)
    setting = Setting((PROFILE,) * gpus, QM.matrix(), 21.0)
    return SimInputs(requests, emb, setting, QM, shipped_thresholds("clip"), seed)


# -- the ring ----------------------------------------------------------------------------------


def test_the_ring_spreads_tenants_and_adding_a_shard_moves_only_what_it_takes():
    tenants = [f"tenant-{i}" for i in range(8000)]
    eight, nine = ShardRing(8), ShardRing(9)
    before = [eight.shard_of(t) for t in tenants]
    counts = Counter(before)
    assert set(counts) == set(range(8))
    assert max(counts.values()) < 1.6 * len(tenants) / 8  # 64 points a shard: a rough balance
    after = [nine.shard_of(t) for t in tenants]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == 8 for _, a in moved)  # only to the new shard
    assert 0.5 / 9 < len(moved) / len(tenants) < 1.6 / 9
    assert ShardRing(8).shard_of("tenant-7") == before[7]  # the same in every process
    with pytest.raises(ValueError, match="n_shards"):
        ShardRing(0)


# -- the controller ----------------------------------------------------------------------------


def test_the_tenant_router_routes_keys_by_the_ring_peers_by_name_and_the_rest_spread():
    from promptserve.distributed.tenant_router import PEER, session_header_trusted, shard_for
    from promptserve.edge.keys import key_digest

    ring = ShardRing(2)
    tenants = {key_digest(f"sk-key-of-tenant-{i}"): f"tenant-{i}" for i in range(20)}
    for i in range(20):  # a tenant's key always lands on its tenant's shard
        shards = {
            shard_for(f"Bearer sk-key-of-tenant-{i}", f"r{j}", ring, tenants) for j in range(9)
        }
        assert shards == {ring.shard_of(f"tenant-{i}")}
    assert shard_for(f"{PEER}1", "r", ring, tenants) == 1  # an ingress replica asking a peer
    # no key, or a key nobody holds: spread by the request id over both shards
    assert {shard_for("", f"r{j}", ring, tenants) for j in range(40)} == {0, 1}
    assert {shard_for(f"Bearer wrong-{j}", f"r{j}", ring, tenants) for j in range(40)} == {0, 1}
    assert shard_for("Bearer sk-key-of-tenant-0", "r", ring, {}) == ring.shard_of("default")
    assert session_header_trusted("authorization") and session_header_trusted("Authorization")
    assert not session_header_trusted("x-session-id")  # Serve's default: a client's own header


def test_the_ring_remembers_a_bounded_number_of_tenants():
    from promptserve.policy.shards import MEMO_TENANTS

    ring = ShardRing(3)
    for i in range(3 * MEMO_TENANTS):
        ring.shard_of(f"t{i}")
    assert len(ring._memo) <= MEMO_TENANTS
    assert ring.shard_of("t5") == ShardRing(3).shard_of("t5")  # forgetting changes nothing


def test_targets_follow_the_step_work_and_sum_to_the_pool():
    targets = gpu_targets([load(300.0), load(100.0), load(0.0), load(100.0)], 64)
    assert sum(targets) == 64 and min(targets) >= 1
    assert targets == [37, 13, 1, 13]  # one each, the other 60 split 3 : 1 : 0 : 1
    assert gpu_targets([load(0.0)] * 4, 10) == [3, 3, 2, 2]  # no load: an even split
    fuller = ShardLoad(100.0, 50.0, 100)  # misses: every step
    assert gpu_targets([fuller, ShardLoad(100.0, 25.0, 100)], 32) == [21, 11]
    with pytest.raises(ValueError, match="cannot give"):
        gpu_targets([load(1.0)] * 4, 3)


def test_moves_go_from_over_to_under_and_noise_moves_nothing():
    loads = [load(100.0, 400), load(100.0, 400)]
    assert plan_moves([16, 16], [17, 15], loads) == []  # within one GPU: left alone
    moves = plan_moves([8, 24], [16, 16], loads)
    assert moves == [(1, 0)] * 8
    # with few arrivals seen the target is uncertain: a small gap is not acted on
    few = [load(10.0, 4), load(10.0, 4)]
    assert plan_moves([12, 20], [16, 16], few) == []  # 16 / sqrt(4) = 8 > 4


def test_a_drained_gpu_keeps_its_members_takes_no_one_and_leaves_the_capacity():
    sp = step_profile(PROFILE)
    sched = StepScheduler(sp, 2, QM.matrix(), StepConfig("max", shed=True, admission=True))
    gpu = sched.gpus[0]
    sched.life.admit_member(gpu, Job(0, 0.0, 30.0, 25, 25, 25), 25, [])
    sched.cluster.recount(gpu, 0)
    capacity = sched.pricing.steps_capacity(21.0)
    sched.drain(0)
    assert sched.pricing.steps_capacity(21.0) == pytest.approx(capacity / 2)
    assert sched.cluster.least_loaded() is sched.gpus[1]
    assert list(gpu.by_id) == [0]  # nothing handed back, unlike a lost GPU
    left, joined, _ = boundary(sched, gpu, 25 * sp.iteration_s(1), 25)
    assert [o.job.id for o in left] == [0] and joined == [] and gpu.count == 0
    assert sched.set_up(0, False) == []  # already out; back up it takes members again
    sched.set_up(0, True)
    assert sched.cluster.least_loaded() is sched.gpus[0]


# -- the simulated control plane ---------------------------------------------------------------


def test_one_shard_decides_request_by_request_as_one_global_scheduler():
    inputs = scaled_inputs(8, 60.0, 4.0)
    policy = get_policy("promptserve-step")
    one = simulate(policy, inputs).records
    sched = sharded_scheduler(policy, inputs, 1)
    sharded = EventRun(policy, inputs, None, sched).run().records
    assert len(one.status) > 400 and sched.moved == 0
    assert np.array_equal(one.status, sharded.status)
    assert np.array_equal(one.level, sharded.level) and np.array_equal(one.gpu, sharded.gpu)
    assert np.allclose(one.finish_s, sharded.finish_s, equal_nan=True)


def test_a_tenant_runs_only_on_its_shards_gpus_and_the_controller_feeds_the_loaded_shard():
    inputs = scaled_inputs(16, 70.0, 4.0)
    # skew: every request of the tenants on shard 0 of 4 arrives twice as often, by dropping
    # half of everyone else's
    ring = ShardRing(4)
    keep = [r for r in inputs.requests if ring.shard_of(r.tenant) == 0 or r.id % 2 == 0]
    rows = np.array([inputs.embeddings.rows[r.id] for r in keep])
    requests = [
        type(r)(i, r.arrival_s, r.prompt, r.tenant, r.deadline_s) for i, r in enumerate(keep)
    ]
    skewed = SimInputs(
        requests, Rows(inputs.embeddings.base, rows), inputs.setting, QM, inputs.thresholds, 1
    )
    policy = get_policy("promptserve-step")
    sched = sharded_scheduler(policy, skewed, 4, controller_s=10.0)
    records = EventRun(policy, skewed, None, sched).run().records
    assert sched.moved > 0
    assert all(dst == 0 for _, _, _, dst in sched.handovers[:3])  # the loaded shard first
    assert len(sched.owned[0]) > 4
    # where each GPU belonged when each request finished on it
    initial = [g * 4 // 16 for g in range(16)]
    served = np.flatnonzero(records.status == Status.SERVED)
    assert len(served) > 300
    for i in served:
        g, t = int(records.gpu[i]), float(records.finish_s[i])
        owner = initial[g]
        for at, gpu, src, dst in sched.handovers:
            if gpu == g and at < t:
                assert src == owner
                owner = dst
        assert owner == ring.shard_of(requests[i].tenant), (i, g, t)


# -- the scaled-up workload --------------------------------------------------------------------


def test_copies_keep_the_per_copy_rate_at_their_own_phase_and_tenants():
    offsets = read_trace_offsets(ROOT / "data/AzureLLMInferenceTrace_conv.csv")
    loop_min = len(offsets) / 60.0  # the trace at 60 qpm: every copy replays it once, whole
    times, copy_of = superposed_arrivals(offsets, 6, 60.0, loop_min, seed=3)
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < loop_min * 60
    assert np.allclose(np.bincount(copy_of), len(offsets), atol=3)  # stamps shared at the seam
    firsts = {round(float(times[copy_of == c][0]), 3) for c in range(6)}
    assert len(firsts) == 6  # each at its own phase
    again, _ = superposed_arrivals(offsets, 6, 60.0, loop_min, seed=3)
    assert np.array_equal(times, again)
    requests, rows = tenant_requests(PROMPTS, times, copy_of, 21.0, seed=3)
    assert {r.tenant for r in requests} == {f"svc{c}" for c in range(6)}
    first = [r for r in requests if r.tenant == "svc2"][:3]
    assert [PROMPTS.index(r.prompt) for r in first][1:] == [
        (PROMPTS.index(first[0].prompt) + k) % len(PROMPTS) for k in (1, 2)
    ]
    base = np.arange(12.0).reshape(4, 3)
    view = Rows(base, np.array([2, 0, 2]))
    assert view.shape == (3, 3) and np.array_equal(view[[0, 2]], base[[2, 2]])
    with pytest.raises(InputError, match="copies"):
        superposed_arrivals(offsets, 0, 60.0, 1.0, 0)


def test_an_ingress_replica_refuses_a_tenant_it_does_not_hold_and_passes_the_rest():
    import asyncio

    import httpx

    from promptserve.distributed.deploy import OwnTenantsOnly
    from promptserve.edge.keys import KeyTable

    ring = ShardRing(2)
    names = [f"tenant-{i}" for i in range(20)]
    mine = next(t for t in names if ring.shard_of(t) == 0)
    other = next(t for t in names if ring.shard_of(t) == 1)
    keys = KeyTable({f"sk-{mine}-0123456789": mine, f"sk-{other}-0123456789": other})

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"served"})

    app = OwnTenantsOnly(inner, keys, ring, shard=0)

    async def ask(key: str | None) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/v1/images/x", headers=headers)

    async def all_four() -> list[httpx.Response]:
        keys = (f"sk-{mine}-0123456789", f"sk-{other}-0123456789", None, "nope")
        return [await ask(k) for k in keys]

    own, misrouted, keyless, unknown = asyncio.run(all_four())
    assert own.text == "served" and keyless.text == "served" and unknown.text == "served"
    assert misrouted.status_code == 421
    assert "RAY_SERVE_SESSION_ID_HEADER_KEY" in misrouted.json()["error"]["message"]


# -- the selector over shards (``+select``) ----------------------------------------------------


def test_one_shard_selects_as_one_global_scheduler():
    inputs = scaled_inputs(8, 60.0, 3.0)
    policy = get_policy("promptserve-step+select")
    one = simulate(policy, inputs)
    sched = sharded_scheduler(policy, inputs, 1)
    sharded = EventRun(policy, inputs, None, sched).run()
    assert len(one.choices) > 10
    assert [(c.at_s, c.scores, c.chosen) for c in one.choices] == [
        (c.at_s, c.scores, c.chosen) for c in sharded.choices
    ]
    assert np.array_equal(one.records.level, sharded.records.level)


def test_a_sharded_selector_replays_one_shard_and_its_shared_slots_change_nothing():
    inputs = scaled_inputs(16, 70.0, 3.0)
    policy = get_policy("promptserve-step+select")
    runs = []
    for copier in ("shared", "deep"):
        sched = sharded_scheduler(policy, inputs, 4, controller_s=10.0)
        run = EventRun(policy, inputs, None, sched)
        if copier == "deep":  # every slot copied again
            run.selector.copier = copy.deepcopy  # type: ignore[union-attr]
        runs.append((run.run(), sched, run.selector))
    (shared, sched, selector), (deep, _, _) = runs
    assert len(shared.choices) > 10 and sched._still  # slots it does not own, shared
    assert [(c.at_s, c.scores) for c in shared.choices] == [
        (c.at_s, c.scores) for c in deep.choices
    ]
    assert np.array_equal(shared.records.level, deep.records.level)
    # the window holds the sampled shard's arrivals only
    assert selector._asks and all(sched.in_sample(ask) for _, ask in selector._asks)
    tenants = {inputs.requests[ask.id].tenant for _, ask in selector._asks}
    assert {sched.ring.shard_of(t) for t in tenants} == {sched.sampled}
    # a choice is every shard's
    fastest = replace(sched.config, rule="max")
    sched.use(fastest)
    assert all(shard.config == fastest for shard in sched.shards)
