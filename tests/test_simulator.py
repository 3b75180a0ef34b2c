import numpy as np
import pytest

from promptserve.cache.embed import HashingEmbedder
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import POLICIES, Status, get_policy
from promptserve.profile import reference_profile
from promptserve.sim.compare import CompareConfig, compare, sim_inputs
from promptserve.workload import generate_arrivals, make_requests, parse_arrival_spec

PROFILE = reference_profile()
WORDS = ["cat", "castle", "forest", "robot", "ship", "storm", "portrait", "neon", "city", "dragon"]


def workload(n_minutes=6, rate=None, seed=0):
    rng = np.random.default_rng(seed)
    base = [" ".join(rng.choice(WORDS, 5)) for _ in range(60)]
    prompts = [
        b if rng.random() < 0.5 else b + " " + str(rng.choice(WORDS))
        for b in base
        for _ in range(3)
    ]
    spec = parse_arrival_spec("argus" if rate is None else "poisson")
    times = generate_arrivals(
        spec, rate_qpm=rate, minutes=n_minutes, time_scale=140 if rate is None else 1.0, seed=seed
    )
    reqs = make_requests(prompts, times, slo_s=21.0)
    emb = HashingEmbedder().embed([r.prompt for r in reqs])
    return reqs, emb


def run(policies, reqs, emb, seed=0, gpus=8, penalty="mild"):
    config = CompareConfig(gpus, 21.0, penalty, seed)
    inputs = sim_inputs(reqs, emb, PROFILE, shipped_thresholds("clip"), config)
    return compare([get_policy(p) for p in policies], inputs, config)


def test_every_request_ends_exactly_once_under_every_policy():
    reqs, emb = workload()
    rows, oracle, timelines, results = run(list(POLICIES), reqs, emb)
    for res in results:
        status = res.records.status
        assert not np.any(status < Status.SERVED), res.policy
        row = rows[res.policy]
        assert row["served_in_slo"] + row["served_late"] + row["refused"] + row["dropped"] == len(
            reqs
        )
        served = status == Status.SERVED
        assert np.all(res.records.finish_s[served] >= res.records.arrival_s[served])
        assert sum(timelines[res.policy]["offered_qpm"]) == len(reqs)
    assert 0 <= oracle["slo_violation_ratio_lower_bound"] <= 1


def test_same_seed_same_decisions():
    reqs, emb = workload(seed=3)
    a = run(["argus", "promptserve"], reqs, emb, seed=5)[3]
    b = run(["argus", "promptserve"], reqs, emb, seed=5)[3]
    for x, y in zip(a, b):
        assert np.array_equal(x.records.level, y.records.level)
        assert np.array_equal(x.records.status, y.records.status)


def test_oracle_bounds_every_policy():
    reqs, emb = workload()
    rows, oracle, _, _ = run(list(POLICIES), reqs, emb)
    for name, row in rows.items():
        assert row["effective_quality"] <= oracle["effective_quality_upper_bound"] + 1e-6, name
        assert row["slo_violation_ratio"] >= oracle["slo_violation_ratio_lower_bound"] - 1e-6, name


def test_light_load_is_served_in_time_at_full_quality_by_promptserve():
    reqs, emb = workload(n_minutes=5, rate=20)
    rows = run(["promptserve"], reqs, emb)[0]
    assert rows["promptserve"]["slo_violation_ratio"] == 0
    assert rows["promptserve"]["mean_quality"] == pytest.approx(100.0)


def test_clipper_baselines_serve_at_their_one_level():
    reqs, emb = workload(n_minutes=3, rate=30)
    results = run(["clipper-ha", "clipper-ht"], reqs, emb)[3]
    ha, ht = results
    assert set(ha.records.level.tolist()) == {0}
    # requests with no cached neighbour at all cannot skip steps, everyone else runs at 25
    assert set(ht.records.level.tolist()) <= {0, 25} and np.mean(ht.records.level == 25) > 0.9


@pytest.mark.parametrize("rate", [60, 200])
def test_oracle_bounds_every_policy_with_feature_caching_and_sizes(rate):
    """The bound extended to cached steps (at their own cost, a member answered as early as
    a cached-step run can be) and to sizes (each at its own cost) holds for every policy,
    at a moderate load and past capacity."""
    from promptserve.profile import for_sizes, with_feature_cache
    from promptserve.workload.looks import LookMix, with_looks

    reqs, emb = workload(n_minutes=4, rate=rate, seed=2)
    sizes = ((1024, 1024), (1152, 896), (768, 768), (1280, 1280))
    reqs = with_looks(reqs, LookMix(sizes=sizes, size_weights=(0.4, 0.2, 0.2, 0.2)), 2)
    assert len({r.shape for r in reqs}) == 4
    profile = for_sizes(with_feature_cache(PROFILE), sizes)
    config = CompareConfig(2, 21.0, "mild", 2)
    inputs = sim_inputs(reqs, emb, profile, shipped_thresholds("clip"), config)
    names = [*POLICIES, "promptserve-step+fixed-r", "continuous-ha+shed+admit+max-r"]
    names += ["continuous-ht+shed+admit+max-r", "promptserve-step+blind"]
    rows, oracle, _, _ = compare([get_policy(p) for p in names], inputs, config)
    for name, row in rows.items():
        assert row["effective_quality"] <= oracle["effective_quality_upper_bound"] + 1e-6, name
        assert row["slo_violation_ratio"] >= oracle["slo_violation_ratio_lower_bound"] - 1e-6, name
    if rate == 200:  # past capacity the cached steps carry a policy past the full-step bound
        plain = sim_inputs(reqs, emb, for_sizes(PROFILE, sizes), shipped_thresholds("clip"), config)
        full_step_bound = compare([], plain, config)[1]["effective_quality_upper_bound"]
        assert rows["promptserve-step"]["effective_quality"] > full_step_bound
