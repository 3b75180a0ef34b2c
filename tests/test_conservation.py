"""Conservation: under every policy and queue layer, every request ends exactly once."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptserve.cache.embed import HashingEmbedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import (
    POLICIES,
    DispatchConfig,
    Dispatcher,
    Job,
    Setting,
    Status,
    get_policy,
)
from promptserve.profile import reference_profile
from promptserve.quality import quality_model
from promptserve.sim.simulator import SimInputs, simulate
from promptserve.types import Request

PROFILE = reference_profile()
QM = quality_model(PROFILE.levels, PROFILE.quality, "steep")
WORDS = ["cat", "castle", "forest", "robot", "ship", "storm", "neon", "city"]
LAYERS = ("", "+shed", "+admit", "+shed+admit")


def bursty_requests(bursts, deadlines, seed):
    """Requests in bursts of (start s, count, spread s); deadlines cycle through ``deadlines``."""
    rng = np.random.default_rng(seed)
    times = np.sort(
        np.concatenate([start + rng.random(count) * spread for start, count, spread in bursts])
    )
    prompts = [" ".join(rng.choice(WORDS, 3)) for _ in times]
    return [
        Request(i, float(t), p, "default", float(t) + deadlines[i % len(deadlines)])
        for i, (t, p) in enumerate(zip(times, prompts))
    ]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    name=st.sampled_from(sorted(POLICIES)),
    layer=st.sampled_from(LAYERS),
    gpus=st.integers(1, 3),
    bursts=st.lists(
        st.tuples(st.floats(0, 120), st.integers(1, 40), st.floats(0.1, 20)), min_size=1, max_size=4
    ),
    deadlines=st.lists(st.floats(0.5, 40), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
)
def test_every_request_ends_exactly_once(name, layer, gpus, bursts, deadlines, seed):
    requests = bursty_requests(bursts, deadlines, seed)
    emb = HashingEmbedder().embed([r.prompt for r in requests])
    setting = Setting((PROFILE,) * gpus, QM.matrix(), 21.0)
    inputs = SimInputs(requests, emb, setting, QM, shipped_thresholds("clip"), seed)
    result = simulate(get_policy(name + layer), inputs)  # raises if anything is left pending
    rec = result.records
    # every request ended once, in a final state, and its record says what that state means
    assert set(np.unique(rec.status)) <= {Status.SERVED, Status.REFUSED, Status.DROPPED}
    served = rec.status == Status.SERVED
    assert np.all(rec.finish_s[served] >= rec.arrival_s[served] - 1e-9)
    assert set(rec.level[served]) <= set(PROFILE.levels)
    assert np.all(np.isnan(rec.finish_s[~served])) and np.all(rec.level[~served] == -1)
    for i in np.flatnonzero(served)[:50]:
        assert rec.quality[i] == QM.q(int(rec.k_opt[i]), int(rec.level[i]))


def test_an_idle_unpinned_gpu_takes_other_work_when_its_chosen_level_empties():
    # the most urgent level's head is hopeless and dropped; the GPU must then serve level 25
    d = Dispatcher.create([PROFILE], DispatchConfig(8, "escalate", pinned=False))
    d.enqueue(Job(0, 0.0, 1.0, k_opt=0, k_max=0, level=0))
    d.enqueue(Job(1, 0.0, 100.0, k_opt=25, k_max=25, level=25))
    dispatches, outcomes = d.step(0.0)
    assert [o.job.id for o in outcomes] == [0]
    assert [[j.id for j in x.jobs] for x in dispatches] == [[1]]
    assert d.pending() == 0


def test_a_job_escalated_onto_an_idle_gpu_already_passed_over_is_served():
    # GPU 0 (K=25) is idle with nothing queued when GPU 1 (K=0) sheds a job onto level 25
    d = Dispatcher.create([PROFILE, PROFILE], DispatchConfig(8, "escalate"))
    d.set_levels(0.0, [25, 0])
    d.enqueue(Job(0, 0.0, 3.0, k_opt=0, k_max=25, level=0))  # K=0 needs 4.2 s, K=25 2.1 s
    dispatches, outcomes = d.step(0.0)
    assert outcomes == []
    assert [(x.gpu, x.level, [j.id for j in x.jobs]) for x in dispatches] == [(0, 25, [0])]
