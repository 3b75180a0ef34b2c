"""Feature caching as a second approximation axis: the step policy chooses (K, r) at join by
the price, the simulator records and scores the interval, and a server runs and reports it."""

import dataclasses

import httpx
import numpy as np
import openai
import pytest

from factories import client, modeled_app, tiny_app, until_cached
from promptserve.loadgen import read_metric
from promptserve.policy import Status, get_policy
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.intake import DELIVERY_MARGIN_S
from promptserve.policy.step import StepConfig, StepScheduler
from promptserve.policy.types import Demand
from promptserve.profile import reference_profile, with_feature_cache
from promptserve.quality import interval_quality, kept_by_intervals, quality_model
from promptserve.server.live import LiveServer
from promptserve.sim.live import profile_from
from promptserve.sim.simulator import simulate
from promptserve.steptime import kind, step_profile
from test_stepwise import poisson

CACHED = with_feature_cache(reference_profile(), r_max=4)
QM = quality_model(CACHED.levels, CACHED.quality, "mild")
Q_R = tuple(interval_quality("mild").q_r(r) for r in (1, 2, 3, 4))


def scheduler(rule="price", max_r=False, gpus=2) -> StepScheduler:
    config = StepConfig(rule, shed=True, admission=True, max_r=max_r)
    sp = step_profile(CACHED)
    return StepScheduler(sp, gpus, QM.matrix(), config, LoadEstimator(CACHED.levels), Q_R)


def test_with_slack_every_request_runs_in_full_and_under_load_the_price_buys_intervals():
    sched = scheduler()
    assert sched.pricing.options[:4] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert sched.reprice(Demand(10.0, (1.0, 0, 0, 0, 0, 0)), 21.0) == 0.0
    for o in sched.pricing.choice[0]:
        assert sched.pricing.options[o] == (0, 1)  # no price: K = 0 at every step full
    price = sched.reprice(Demand(140.0, (0.2, 0.4, 0.2, 0.1, 0.05, 0.05)), 21.0)
    assert price > 0
    chosen = {sched.pricing.options[o] for row in sched.pricing.choice for o in row}
    assert any(r > 1 for _, r in chosen)  # an interval is cheaper in points than a level
    # the next cheaper options in GPU time, from the preferred one to the fastest
    cheaper = sched.levels.cheaper(dataclasses.replace(_job(), k_max=25), 0, 1)
    costs = [(50 - k) * sched.profile.interval_weight(r) for k, r in cheaper]
    assert cheaper[0] == (0, 1) and costs == sorted(costs, reverse=True)
    assert cheaper[-1] == (25, 4)


def test_a_gpu_of_mixed_intervals_is_full_by_its_pace_and_a_burst_takes_the_interval_first():
    """A GPU slowed by members at short intervals is full by its pace, and the interval is
    the lever that frees it; a GPU full even at the longest interval needs the level too."""
    from promptserve.policy.types import Job

    sched = scheduler(gpus=1)
    sched.reprice(Demand(1.0, (1.0, 0, 0, 0, 0, 0)), 21.0)  # slack: price 0
    job = Job(0, 0.0, 21.0, 10, 25, 10)
    assert sched.levels.preferred(job, 0.0) == (0, 1)  # in full, every step full
    gpu, busy = sched.gpus[0], sched.pricing.busy_at
    # a full run finishes within 90% of the 21 s SLO with up to 7 members at r = 1 (84 ms
    # x 4.3 x 50), many more at r = 4: by the count alone, 8 members at r = 1 are not full
    assert busy > 8
    for i in range(7):
        sched.life.admit_member(gpu, Job(i + 1, 0.0, 60.0, 0, 0, 0), 0, [], 1)
    assert not sched.bursts.saturated(0.0)
    sched.life.admit_member(gpu, Job(8, 0.0, 60.0, 0, 0, 0), 0, [], 1)
    assert gpu.count < busy and sched.bursts.saturated(0.0)  # their pace: a full run would be late
    # the burst's first lever is the interval, at the level the price picks there (K = 0:
    # a cached step costs a fraction of a point, a skipped one more)
    assert sched.levels.preferred(job, 0.0) == (0, 4)
    sched.queue.push(Job(9, 0.0, 60.0, 0, 0, 0))  # it was not enough
    assert sched.levels.preferred(job, 0.0) == (25, 4)  # the fastest level too
    sched.queue.remove(9)
    # the same members at the longest interval: the pace of a GPU with room
    for member in list(gpu.by_id.values()):
        gpu.count_shape(kind(0, 1), -1)
        gpu.count_shape(kind(0, 4), 1)
        member.r = 4
    assert not sched.bursts.saturated(0.0) and sched.levels.preferred(job, 0.0) == (0, 1)
    # more members than even the longest interval lets a full run share the GPU with: the
    # interval is not enough, the level moves too
    for i in range(busy - 8 + 1):
        sched.life.admit_member(gpu, Job(20 + i, 0.0, 60.0, 0, 0, 0), 0, [], 4)
    assert sched.bursts.saturated(0.0) and sched.levels.preferred(job, 0.0) == (25, 4)


def _job(exact=False):
    from promptserve.policy.types import Job

    return Job(0, 0.0, 20.0, 0, 0, 0, exact=exact)


def test_a_full_generation_asked_for_takes_no_interval_even_at_the_highest_price():
    sched = scheduler()
    sched.reprice(Demand(400.0, (0.2, 0.4, 0.2, 0.1, 0.05, 0.05)), 21.0)
    assert sched.levels.preferred(_job(), 0.0)[1] > 1  # the price buys an interval for a miss
    assert sched.levels.preferred(_job(exact=True), 0.0) == (0, 1)
    assert sched.spec.fastest(_job(exact=True)) == (0, 1)
    assert sched.levels.cheaper(_job(exact=True), 0, 1) == [(0, 1)]


def test_the_rule_baselines_never_take_an_interval_and_the_max_r_rivals_always_do():
    for rule in ("zero", "max"):
        assert scheduler(rule).spec.intervals == (1,)
    for rule, k in (("zero", 0), ("max", 25), ("price", 0)):
        rival = scheduler(rule, max_r=True)
        assert rival.spec.intervals == (4,)
        rival.reprice(Demand(10.0, (1.0, 0, 0, 0, 0, 0)), 21.0)  # slack: no price
        job = dataclasses.replace(_job(), k_max=25)
        assert rival.levels.preferred(job, 0.0) == (k, 4)
        assert rival.levels.cheaper(job, k, 4) == [(lv, 4) for lv in CACHED.levels if lv >= k]
        assert rival.levels.preferred(dataclasses.replace(job, exact=True, k_max=0), 0.0) == (0, 1)


@pytest.mark.parametrize("rate", [20, 120])
def test_the_simulator_records_each_interval_and_scores_it(rate):
    inputs = poisson(rate, 4, gpus=2)
    setting = dataclasses.replace(
        inputs.setting, profiles=(CACHED,) * 2, quality=QM.matrix(), interval_q=Q_R
    )
    cached = dataclasses.replace(inputs, setting=setting, quality=QM)
    res = simulate(get_policy("promptserve-step"), cached)
    rec = res.records
    served = rec.status == Status.SERVED
    assert (rec.status >= Status.SERVED).all()
    intervals = rec.interval[served]
    plain = simulate(get_policy("promptserve-step"), inputs).records.summary([])
    if rate == 20:  # light load: steps full but where a deadline needs a cheaper one
        assert (intervals == 1).mean() > 0.95
        assert rec.summary([])["effective_quality"] >= plain["effective_quality"] - 0.01
    else:
        assert (intervals > 1).any()
    between = 0
    for i in np.flatnonzero(served):
        level_q = QM.q(int(rec.k_opt[i]), int(rec.level[i]))
        at_last = level_q * Q_R[int(rec.interval[i]) - 1] / 100
        # at its last interval throughout, or raised to it at a burst (then it kept more)
        assert at_last - 1e-9 <= rec.quality[i] <= level_q + 1e-9
        between += rec.quality[i] > at_last + 1e-9
    assert (between > 0) == (rate == 120)  # re-intervalled only under load
    if rate == 120:  # under load the cheaper steps serve more in time
        assert rec.summary([])["served_in_slo"] > plain["served_in_slo"]


def test_a_server_runs_and_reports_the_interval_a_member_joins_at(tmp_path):
    """The tiny model, the official client: a member whose deadline the policy meets at a
    cheaper interval runs at it (its image is not the full generation of the same seed, asked
    for with ``quality="high"``) and the answer says so."""
    app = tiny_app(tmp_path, policy="promptserve-step")
    profile = app.state.runtime.setting.profiles[0]
    assert profile.feature_r_max == 4 and 0 < profile.cached_step_share < 1  # measured
    with LiveServer(app) as url:
        oai = client(url)
        tight = {"seed": 5, "deadline_ms": int(alone_ms(url)[1]) - 1}

        def image(**extra):
            res = oai.images.generate(prompt="a kite over dunes", **extra)
            return res.data[0].b64_json, res.data[0].model_extra["promptserve"]

        png, meta = image(extra_body=tight)
        full_png, full = image(quality="high", extra_body={"seed": 5})
    assert meta["feature_cache_interval"] > 1 and meta["level_k"] == 0
    assert full["feature_cache_interval"] == 1 and full["level_k"] == 0
    assert png != full_png
    assert meta["predicted_quality"] < full["predicted_quality"]


def alone_ms(url: str) -> dict[int, float]:
    """A miss's run alone on an idle GPU at each interval, as the server's scheduler plans it
    (from the profile ``GET /v1/server`` says it plans with), the delivery margin included."""
    profile = profile_from(httpx.get(f"{url}/v1/server", timeout=30).json()["profile"])
    sched = StepScheduler(step_profile(profile), 1, QM.matrix(), StepConfig("price", True, True))
    return {r: (sched.fit.alone_s(0, r) + DELIVERY_MARGIN_S) * 1e3 for r in sched.profile.intervals}


def assert_a_tight_deadline_buys_an_interval(url: str) -> None:
    """A deadline a full run alone just misses: served, at a cheaper interval (no monkeypatch:
    the deadline check at join takes it), and a deadline below even the fastest interval's
    run is refused for good, naming the field (on an empty cache: a miss). Then a twin of that prompt, at the same
    deadline, resumes at K > 0 with every step full (a level is cheaper in points here)."""
    alone = alone_ms(url)
    assert alone[4] < alone[1]
    oai = client(url)
    with pytest.raises(openai.BadRequestError, match="deadline_ms"):  # the cache is empty
        oai.images.generate(prompt="a lantern", extra_body={"deadline_ms": int(alone[4]) - 20})
    tight = {"seed": 7, "deadline_ms": int(alone[1]) - 1}
    res = oai.images.generate(prompt="a lantern on a jetty", extra_body=tight)
    meta = res.data[0].model_extra["promptserve"]
    assert meta["feature_cache_interval"] > 1 and meta["level_k"] == 0
    until_cached(url, 1)
    twin = oai.images.generate(prompt="a lantern on a jetty", extra_body=tight)
    again = twin.data[0].model_extra["promptserve"]
    assert again["cache_hit"] and again["level_k"] > 0
    assert (again["level_k"], again["feature_cache_interval"]) != (0, 1)
    # a full generation asked for (quality high) runs every step full: that deadline is
    # below its fastest run, so it is refused for good
    with pytest.raises(openai.BadRequestError, match="deadline_ms"):
        oai.images.generate(prompt="a lantern on a jetty", quality="high", extra_body=tight)


def test_a_tight_deadline_is_met_at_a_cheaper_interval(tmp_path):
    with LiveServer(tiny_app(tmp_path, policy="promptserve-step")) as url:
        assert_a_tight_deadline_buys_an_interval(url)


def test_a_step_counts_the_full_and_the_cached_call_by_the_chance_each_runs():
    sp = dataclasses.replace(step_profile(CACHED), r_max=4)
    share, one = sp.cached_step_share, sp.iteration_s(1)
    # alone, a member at r pays its mean step: one full step and r - 1 cached ones every r
    for r in (2, 3, 4):
        assert sp.mix_s({kind(0, r): 1}) == pytest.approx(one * sp.interval_weight(r))
    # two at r = 2: each call runs unless both are in the other phase (3 steps in 4), and
    # then holds 1 / 0.75 members on average
    want = 0.75 * sp.call_s(1 / 0.75) + 0.75 * share * sp.call_s(1 / 0.75)
    assert sp.mix_s({kind(0, 2): 2}) == pytest.approx(want)
    # every member at r = 1: the one call of before, and r = 1 members add no cached call
    assert sp.mix_s({kind(0, 1): 3}) == sp.iteration_s(3)
    with_full = sp.mix_s({kind(0, 1): 1, kind(0, 4): 1})
    assert with_full == pytest.approx(sp.call_s(1.25) + 0.75 * share * one)


def test_at_a_burst_running_members_move_to_the_longest_interval(tmp_path):
    """One modelled GPU, five times faster than the reference: the burst's first request
    joins at every step full; once the burst fills the GPU the scheduler raises the running
    members' interval at the next boundary (the worker runs it, the answer says what ran at
    which interval, and its predicted quality counts each part's steps)."""
    import asyncio

    app = modeled_app(tmp_path, policy="promptserve-step", speedup=5.0)
    interval_q = app.state.runtime.setting.interval_q
    body = {"prompt": "", "deadline_ms": 3000}

    async def burst(url):
        async with httpx.AsyncClient(timeout=60) as c:
            first = asyncio.create_task(
                c.post(f"{url}/v1/images/generations", json=body | {"prompt": "ship 0"})
            )
            # it has joined, alone, and run a dozen of its 50 steps (17 ms each) before the
            # rest arrive: a burst that came during its join would move it before any step
            await asyncio.sleep(0.25)
            rest = [
                c.post(f"{url}/v1/images/generations", json=body | {"prompt": f"ship {i}"})
                for i in range(1, 12)
            ]
            return [await first, *await asyncio.gather(*rest)]

    with LiveServer(app) as url:
        answers = asyncio.run(burst(url))
        moved = read_metric(url, "promptserve_reintervals")
    served = [r.json()["data"][0]["promptserve"] for r in answers if r.status_code == 200]
    assert moved >= 1
    top = len(interval_q)
    assert any(m["feature_cache_interval"] == top for m in served), served
    # a member moved after running steps says so, and its quality counts each part; one moved
    # at the boundary it joined at (the burst came during its join) ran nothing before
    raised = [m for m in served if m["feature_cache_earlier"]]
    for meta in raised:
        earlier = [tuple(seg) for seg in meta["feature_cache_earlier"]]
        assert all(r < meta["feature_cache_interval"] for r, _ in earlier)
        run = 50 - meta["level_k"]
        kept = kept_by_intervals(interval_q, meta["feature_cache_interval"], earlier, run)
        assert meta["predicted_quality"] == pytest.approx(
            QM.q(meta["k_opt"], meta["level_k"]) * kept, abs=1e-3
        )
        assert (
            QM.q(meta["k_opt"], meta["level_k"]) * interval_q[-1] / 100 < meta["predicted_quality"]
        )


def test_a_run_at_two_intervals_keeps_each_part_s_share():
    q = [100.0, 99.0, 98.0, 97.0]
    assert kept_by_intervals(q, 1, (), 40) == 1.0
    assert kept_by_intervals(q, 3, (), 40) == 0.98
    # 10 steps at r = 1, then 30 at r = 4: a quarter at 100, three quarters at 97
    assert kept_by_intervals(q, 4, ((1, 10),), 40) == pytest.approx((10 * 100 + 30 * 97) / 4000)
    assert kept_by_intervals(q, 4, ((1, 10), (2, 10)), 40) == pytest.approx(
        (10 * 100 + 10 * 99 + 20 * 97) / 4000
    )


def test_a_rule_switch_rebuilds_the_price_tables_for_the_new_options():
    """``use`` (the selector) to the price at the longest interval: the options and the
    tables that index them change together, so every choice names an option at r = 4."""
    sched = scheduler()
    demand = Demand(140.0, (0.2, 0.4, 0.2, 0.1, 0.05, 0.05))
    sched.reprice(demand, 21.0)
    assert len(sched.pricing.options) == 24  # 6 levels x 4 intervals
    sched.use(dataclasses.replace(sched.config, max_r=True))
    assert sched.pricing.options == [(j, 4) for j in range(6)]
    for table in (sched.pricing.choice, sched.pricing.choice_lo, *sched.pricing.at_top):
        assert all(0 <= o < 6 for row in table for o in row)
    assert sched.levels.preferred(dataclasses.replace(_job(), k_max=25), 0.0)[1] == 4
