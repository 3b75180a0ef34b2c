"""The hindsight reference (``sim/hindsight.py``): a plan of levels run through the step
simulator, and the search that finds one."""

import numpy as np
from tests.test_stepwise import PROFILE, poisson

from promptserve.policy import Status, get_policy
from promptserve.sim.hindsight import planned, price_plan, search
from promptserve.sim.simulator import simulate

BASE = get_policy("promptserve-step")


def in_time_levels(records):
    served = records.status == Status.SERVED
    return served, np.searchsorted(PROFILE.levels, np.maximum(records.level, 0))


def test_a_plan_fixes_the_level_each_request_prefers():
    inputs = poisson(20, 3, gpus=2, seed=1)  # light load: every preferred level fits
    n = len(inputs.requests)
    fastest = np.full(n, len(PROFILE.levels) - 1)
    records = simulate(planned(BASE, fastest), inputs).records
    served, levels = in_time_levels(records)
    assert served.all()
    # with a neighbour (K_opt > 0 needs one) it runs at the plan's level
    assert (levels[served & (records.k_opt > 0)] == len(PROFILE.levels) - 1).all()
    assert (records.level == 0).sum() < n  # and what has no neighbour runs in full
    slowest = simulate(planned(BASE, np.zeros(n, int)), inputs).records
    assert (slowest.level[slowest.status == Status.SERVED] == 0).all()


def test_replaying_the_online_runs_levels_reproduces_its_result():
    inputs = poisson(60, 4, gpus=2, seed=2)
    online = simulate(BASE, inputs).records
    served, levels = in_time_levels(online)
    plan = np.where(served, levels, len(PROFILE.levels) - 1)
    replay = simulate(planned(BASE, plan), inputs).records
    assert np.array_equal(replay.level[served], online.level[served])
    assert replay.summary([])["effective_quality"] >= online.summary([])["effective_quality"]


def test_the_search_is_never_below_the_online_policy_and_keeps_to_its_budget():
    inputs = poisson(90, 3, gpus=2, seed=3)
    online = simulate(BASE, inputs).records.summary([])
    seen = []
    found = search(BASE, inputs, budget=12, on_progress=lambda runs, eq: seen.append(eq))
    assert found.simulations == len(seen) <= 12
    assert found.effective_quality >= online["effective_quality"]
    assert found.effective_quality == max(seen)
    again = simulate(planned(BASE, found.plan), inputs).records.summary([])
    assert again["effective_quality"] == found.effective_quality  # the plan is the result


def test_a_one_price_plan_moves_to_faster_levels_as_the_price_rises():
    quality = np.asarray(poisson(10, 1, gpus=1).setting.quality)
    classes = np.arange(len(PROFILE.levels))
    free = price_plan(classes, quality, PROFILE.levels, PROFILE.total_steps, 0.0)
    dear = price_plan(classes, quality, PROFILE.levels, PROFILE.total_steps, 5.0)
    assert (free == np.argmax(quality, axis=1)).all()
    assert (dear == len(PROFILE.levels) - 1).all() and (dear >= free).all()
